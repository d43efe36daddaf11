"""Fast paths of the model, kept apart from the architecture (gptcli/model.py).

Each computes what the plain method it replaces computes (tests/test_model_fast.py), faster or in
less memory, and each is entered the same way: a model method marked `@fast_path(name)` asks the
kernel behind that name first, and runs its own plain body when the kernel declines
(returns None: another device, no autograd, an unsupported dtype, torch.compile tracing).

| name           | method                          | kernel module    | what it saves                        |
|----------------|---------------------------------|------------------|--------------------------------------|
| `dropout`      | `Dropout.forward`               | `dropout`        | 1-byte masks instead of float ones   |
| `attention`    | `CausalSelfAttention.attend`    | `attention`      | recomputed weights, no (T, T) floats |
| `feed_forward` | `FeedForward.forward`           | `feed_forward`   | recomputed GELU                      |
| `lm_head_loss` | `GPT.loss`                      | `loss`           | logits a chunk at a time             |
| `linear`       | `Linear.forward`                | `decoding`       | decoding steps on prepacked weights  |

One switch turns every one of them off: the environment variable GPTCLI_KERNELS=0. The kernel
modules are imported on first use (`dispatch.KERNELS`), never by importing the model.
Dropout draws torch's own masks by default; `set_dropout_rng(model, "fast")` opts a model in to a
cheaper, different random stream.
"""

from gptcli.kernels.dispatch import (
    DROPOUT_RNGS,
    ENV_SWITCH,
    DropoutRng,
    dropout_rng,
    enabled,
    fast_path,
    set_dropout_rng,
)

__all__ = ["DROPOUT_RNGS", "ENV_SWITCH", "DropoutRng", "dropout_rng", "enabled", "fast_path", "set_dropout_rng"]
