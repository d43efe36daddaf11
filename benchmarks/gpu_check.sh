#!/usr/bin/env bash
# gptcli on a CUDA GPU, in under 8 minutes: the tests (their `--device auto` picks CUDA there),
# agreement with the CPU, the command line, sampling speed by dtype and batch, and 124M training
# bursts (fp32/bf16, eager/compiled) with tokens/s and MFU, against nanoGPT's step.
# Measurements: benchmarks/gpu_check.py. Nothing is downloaded.
#
#   bash benchmarks/gpu_check.sh                              # on the GPU machine, from anywhere
#   PYTHON=/opt/venv/bin/python OUT=/tmp/out bash benchmarks/gpu_check.sh
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh           # try the script itself on a CPU (tiny shapes)
#
# PYTHON    a Python with torch (CUDA) and gptcli's dependencies (default python3); the repository
#           goes on PYTHONPATH, so gptcli need not be installed. A directory of the other
#           dependencies may be added with PYTHONPATH=DIR.
# OUT       where gpu_check.json and gpu_check_logs/ go (default: the current directory)
# DEVICE    cuda (default) or cpu;  QUICK=1: tiny shapes
# COMPILE   1: also the torch.compile runs (default; with QUICK=1 the default is 0)
# BUDGET_S  the whole run's time limit in seconds (default 470): parts that would not fit are
#           skipped, and count as failed
# TESTS     the test files (default: those whose commands run on the default device)
#
# Exit status: 0 when every part ran and every check passed; 1 otherwise; 2 when PYTHON lacks a
# dependency or CUDA (one line says which).
set -uo pipefail

OUT=$(mkdir -p "${OUT:-.}" && cd "${OUT:-.}" && pwd) || exit 2  # relative to where it was started
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
BUDGET_S=${BUDGET_S:-470}
if [[ $QUICK == 1 ]]; then COMPILE=${COMPILE:-0}; else COMPILE=${COMPILE:-1}; fi
DEFAULT_TESTS="tests/test_generate.py tests/test_batched.py tests/test_quantize.py tests/test_logprobs.py
  tests/test_evaluate.py tests/test_train.py tests/test_train_precision.py tests/test_chapter_run.py
  tests/test_distributed.py"
SHARDS=8
if [[ $QUICK == 1 ]]; then
  DEFAULT_TESTS="tests/test_batched.py tests/test_train_precision.py"
  SHARDS=2
fi
read -r -d "" -a TEST_FILES <<< "${TESTS:-$DEFAULT_TESTS}" || true
RESERVE_S=15  # kept for the report
DEADLINE=$(( SECONDS + BUDGET_S ))

if ! command -v "$PYTHON" > /dev/null; then
  echo "gpu_check: no Python at PYTHON=$PYTHON"
  exit 2
fi
mkdir -p "$OUT/gpu_check_logs" || exit 2
LOGS=$(cd "$OUT/gpu_check_logs" && pwd)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$SCRATCH"' EXIT
rm -f "$LOGS"/*.json "$LOGS"/*.log "$LOGS"/*.xml
: > "$LOGS/parts.tsv"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPTCLI_HOME="$SCRATCH/home" TORCHINDUCTOR_CACHE_DIR="$SCRATCH/inductor" PYTHONUNBUFFERED=1
MODEL="$SCRATCH/model.safetensors"
QUICK_FLAG=""
[[ $QUICK == 1 ]] && QUICK_FLAG=--quick

helper() {  # SUBCOMMAND [ARGS]: benchmarks/gpu_check.py with the common options
  local command=$1; shift
  "$PYTHON" benchmarks/gpu_check.py "$command" --device "$DEVICE" --scratch "$SCRATCH" --model "$MODEL" \
    $QUICK_FLAG "$@"
}

record() {  # NAME RC SECONDS: a part's outcome (RC: exit status, or skipped/missing) in LOGS/parts.tsv
  printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$LOGS/parts.tsv"
  if [[ $2 == 0 ]]; then
    echo "   $1: ok in $3s"
  elif [[ $2 == skipped ]]; then
    echo "== $1: skipped, out of time (BUDGET_S=$BUDGET_S)"
  else
    echo "   $1: FAILED ($2) after $3s; last lines of $LOGS/$1.log:"
    tail -n 5 "$LOGS/$1.log" 2> /dev/null | sed 's/^/     | /'
  fi
}

limit_for() {  # CAP: seconds a part may take (CAP, or what the budget has left), 0 when under 10
  local left=$(( DEADLINE - SECONDS - RESERVE_S ))
  local limit=$(( $1 < left ? $1 : left ))
  (( limit < 10 )) && limit=0
  echo "$limit"
}

run_part() {  # NAME CAP_S ARGS...: one helper part under a timeout, its result in LOGS/NAME.json
  local name=$1 limit start rc=0
  limit=$(limit_for "$2"); shift 2
  if (( limit == 0 )); then
    record "$name" skipped 0
    return
  fi
  echo "== $name (at most ${limit}s)"
  start=$SECONDS
  timeout -k 10 "$limit" "$PYTHON" benchmarks/gpu_check.py "$@" --device "$DEVICE" --scratch "$SCRATCH" \
    --model "$MODEL" --json "$LOGS/$name.json" $QUICK_FLAG > "$LOGS/$name.log" 2>&1 || rc=$?
  record "$name" "$rc" $(( SECONDS - start ))
}

test_shards() {  # LIMIT: the test files in SHARDS parallel pytest processes; rc 0 when all passed
  local pids=() rc=0 i code
  for (( i = 0; i < SHARDS; i++ )); do
    GPU_CHECK_SHARD="$i/$SHARDS" timeout -k 10 "$1" "$PYTHON" -m pytest -q -p no:cacheprovider \
      -p benchmarks.gpu_check -rfEs --junitxml="$LOGS/junit-$i.xml" "${TEST_FILES[@]}" \
      > "$LOGS/tests-$i.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    code=0
    wait "$pid" || code=$?
    (( code != 0 && code != 5 )) && rc=$code  # 5: this shard had no tests
  done
  cat "$LOGS"/tests-*.log > "$LOGS/tests.log"
  return "$rc"
}

# -- 0. the Python, its dependencies and the GPU
if ! helper deps --json "$LOGS/deps.json" > "$LOGS/deps.log" 2>&1; then
  tail -n 1 "$LOGS/deps.log"
  exit 2
fi
echo "gptcli GPU check on $(tail -n 1 "$LOGS/deps.log")"
run_part model 120 model

# -- 1. the tests, in the background (they use the GPU lightly), while the checks run
tests_limit=$(limit_for 240)
tests_start=$SECONDS
if "$PYTHON" -c "import pytest" 2> /dev/null && (( tests_limit > 0 )); then
  echo "== tests: ${#TEST_FILES[@]} files in $SHARDS processes (at most ${tests_limit}s), in the background"
  test_shards "$tests_limit" &
  tests_pid=$!
else
  tests_pid=""
  echo "pytest missing for $PYTHON, or no time left: tests not run" > "$LOGS/tests.log"
fi

# -- 5. agreement with the CPU, and the command line (not timed, so alongside the tests)
run_part check 240 check
run_part cli 180 cli

if [[ -n $tests_pid ]]; then
  tests_rc=0
  wait "$tests_pid" || tests_rc=$?
  record tests "$tests_rc" $(( SECONDS - tests_start ))
else
  record tests missing 0
fi

# -- 2-4. timings, one at a time with the GPU to themselves (most important first)
run_part sample 90 sample
run_part train-bf16 90 train --precision bf16
if [[ $COMPILE == 1 ]]; then
  run_part train-bf16-compile 150 train --precision bf16 --compile
  run_part nanogpt 150 nanogpt
else
  run_part nanogpt 150 nanogpt --no-compile
fi
run_part train-fp32 90 train --precision fp32
[[ $COMPILE == 1 ]] && run_part train-fp32-compile 150 train --precision fp32 --compile

"$PYTHON" benchmarks/gpu_check.py report --logs "$LOGS" --out "$OUT/gpu_check.json"
