#!/usr/bin/env bash
# Reproduce the chapter's pretraining run on "The Verdict", every setting spelled out (they are
# also gptcli's defaults), then sample from the result as the chapter does.
#   train/val loss: about 9.8/9.9 at step 0, about 0.4/6.4 at step 85 (book, CPU).
set -euo pipefail
# With no argument, `gptcli train` uses the-verdict.txt, downloaded once into gptcli's cache.
gptcli train ${1:+"$1"} \
  --preset 124M --context-length 256 --drop-rate 0.1 --no-qkv-bias \
  --train-ratio 0.9 --batch-size 2 --epochs 10 \
  --lr 4e-4 --weight-decay 0.1 \
  --eval-freq 5 --eval-iter 5 --seed 123 \
  --sample-prompt "Every effort moves you" --sample-tokens 50 \
  --out runs/chapter
gptcli sample --model runs/chapter "Every effort moves you" --max-new-tokens 25 --top-k 25 --temperature 1.4 --seed 123
gptcli eval --run runs/chapter
