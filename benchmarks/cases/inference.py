"""`--only inference`: evaluation, then generation, on the same GPT-2 124M weights (random, GPT-2-like
scales) in every implementation: the chapter's GPTModel, gptcli's GPT in fp32 and bf16, and
transformers' GPT2LMHeadModel in fp32 and bf16 when it is installed."""

from __future__ import annotations

import gc
from typing import Any

import torch

from benchmarks.cases.common import hf_gpt2, random_gpt2
from benchmarks.cases.evaluation import evaluation
from benchmarks.cases.generation import generation
from benchmarks.harness import Suite, have_transformers, log


def inference_models(tiny: bool) -> dict[str, Any]:
    """The models by implementation name, and their config under "config"."""
    from benchmarks.chapter import GPTModel, config_dict, from_gptcli_state_dict
    from gptcli.model import GPT

    model = random_gpt2(tiny)
    config = model.config
    state = model.state_dict()
    chapter = GPTModel(config_dict(config)).eval()
    chapter_state = chapter.state_dict()  # keeps its attention-mask buffers
    chapter_state.update(from_gptcli_state_dict(state, config.n_layers))
    chapter.load_state_dict(chapter_state)
    bf16 = GPT(config).eval()
    bf16.load_state_dict(state)
    models: dict[str, Any] = {"config": config, "chapter": chapter, "gptcli": model,
                              "gptcli bf16": bf16.to(torch.bfloat16)}
    if have_transformers():
        hf = hf_gpt2(config, state)
        models["hf"] = hf
        models["hf bf16"] = hf_gpt2(config, state).to(torch.bfloat16)
    return models


def run(suite: Suite) -> None:
    log("generation and evaluation")
    models = inference_models(suite.plan.tiny)
    evaluation(suite, models)
    generation(suite, models)
    del models
    gc.collect()
