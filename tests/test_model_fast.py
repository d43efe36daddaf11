"""gptcli.kernels' fast paths equal the plain computations they replace: the chunked output layer and
loss, the CPU attention and dropout functions (torch's own masks by default), the recomputing
feed-forward, the decoding kernels; and gptcli.optim's fused AdamW."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gptcli.model as gm
from gptcli import kernels
from gptcli.config import GPTConfig, get_preset
from gptcli.kernels import attention, decoding, dropout
from gptcli.kernels import loss as head_loss
from gptcli.optim import adamw

TINY = get_preset("tiny").replace(context_length=64)


def clone_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# --- output layer and loss ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1 << 24, 4 * 50257, 50257])  # one chunk, several, one row each
def test_lm_head_loss_equals_linear_then_cross_entropy(monkeypatch, chunk):
    monkeypatch.setattr(head_loss, "LOSS_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    hidden = torch.randn(37, 32, requires_grad=True)
    weight = (torch.randn(50257, 32) * 0.1).requires_grad_()
    targets = torch.randint(0, 50257, (37,))
    targets[[3, 20]] = -100  # not scored

    expected = F.cross_entropy(F.linear(hidden, weight), targets)
    (expected * 0.5).backward()  # an incoming gradient other than 1, as with accumulation
    want = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None

    loss = head_loss.lm_head_loss(hidden, weight, targets)
    (loss * 0.5).backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(hidden.grad, want[0], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(weight.grad, want[1], atol=1e-7, rtol=1e-5)


def test_lm_head_loss_without_grad_and_with_nothing_scored():
    hidden, weight = torch.randn(5, 8), torch.randn(11, 8)
    targets = torch.tensor([1, 2, 3, 4, 5])
    with torch.no_grad():
        got = head_loss.lm_head_loss(hidden, weight, targets)
    torch.testing.assert_close(got, F.cross_entropy(hidden @ weight.t(), targets))
    nothing = torch.full((5,), -100)
    assert math.isnan(head_loss.lm_head_loss(hidden, weight, nothing).item())
    assert math.isnan(F.cross_entropy(hidden @ weight.t(), nothing).item())


@pytest.mark.parametrize("slab", [1 << 27, 2 * 3 * 1000])
def test_lm_head_loss_under_autocast_matches_autocast_linear(monkeypatch, slab):
    """bf16: chunks of 3 rows; the weight gradient in one product, or in slabs of 2 chunks (of the
    10 rows: one full slab of 6 and a last, partial one of 4)."""
    monkeypatch.setattr(head_loss, "LOSS_CHUNK_ELEMENTS", 3 * 1000)
    monkeypatch.setattr(head_loss, "GRADIENT_SLAB_ELEMENTS", slab)
    torch.manual_seed(0)
    hidden = torch.randn(10, 64, requires_grad=True)
    weight = (torch.randn(1000, 64) * 0.1).requires_grad_()
    targets = torch.randint(0, 1000, (10,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    expected.backward()
    want = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_loss.lm_head_loss(hidden, weight, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad, want[0], atol=1e-3, rtol=2e-2)
    torch.testing.assert_close(weight.grad, want[1], atol=1e-3, rtol=2e-2)


@pytest.mark.parametrize("tie", [False, True])
def test_model_loss_and_gradients_equal_the_plain_path(monkeypatch, tie):
    """A training step of `model(x, targets=y)` (fast loss, recomputing feed-forward) against
    the logits and F.cross_entropy with every fast path switched off; no dropout, so equal."""
    config = TINY.replace(drop_rate=0.0, tie_weights=tie)
    torch.manual_seed(1)
    model = gm.GPT(config).train()
    x = torch.randint(0, config.vocab_size, (3, 20))
    y = torch.randint(0, config.vocab_size, (3, 20))

    monkeypatch.setenv("GPTCLI_KERNELS", "0")
    plain = model(x, targets=y)
    plain.backward()
    want = clone_grads(model)
    model.zero_grad(set_to_none=True)

    monkeypatch.delenv("GPTCLI_KERNELS")
    monkeypatch.setattr(head_loss, "LOSS_CHUNK_ELEMENTS", 7 * config.vocab_size)  # several chunks
    fast = model(x, targets=y)
    fast.backward()
    got = clone_grads(model)
    torch.testing.assert_close(fast, plain, atol=1e-6, rtol=1e-6)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)


def test_feed_forward_function_equals_modules(monkeypatch):
    torch.manual_seed(2)
    ff = gm.FeedForward(TINY).train()
    x = torch.randn(2, 9, TINY.emb_dim, requires_grad=True)
    monkeypatch.setenv("GPTCLI_KERNELS", "0")
    plain = ff(x)
    plain.sum().backward()
    want = clone_grads(ff), x.grad.clone()
    ff.zero_grad(set_to_none=True)
    x.grad = None
    monkeypatch.delenv("GPTCLI_KERNELS")
    fast = ff(x)  # training, float32, CPU: the recomputing function
    fast.sum().backward()
    torch.testing.assert_close(fast, plain)
    torch.testing.assert_close(x.grad, want[1])
    for name, grad in want[0].items():
        torch.testing.assert_close(clone_grads(ff)[name], grad, msg=name)


# --- dropout and attention --------------------------------------------------------------------------


def test_attention_with_dropout_equals_the_chapter_formula():
    """Same random numbers, same result: the function against softmax(masked scores) with the mask
    it draws, differentiated by autograd."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))
    p = 0.3
    state = torch.get_rng_state()
    out = attention.causal_attention_with_dropout(q, k, v, p)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None

    torch.set_rng_state(state)
    keep = ~dropout.drop_mask(torch.Size([2, 3, 10, 10]), p, torch.device("cpu"))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    expected = (torch.softmax(scores, -1) * keep / (1 - p)) @ v
    expected.backward(grad)
    torch.testing.assert_close(out, expected)
    for a, b in zip(got, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(a, b)


def test_attention_with_dropout_under_autocast_matches_the_formula():
    torch.manual_seed(9)
    q, k, v = (torch.randn(2, 2, 12, 8, requires_grad=True) for _ in range(3))
    state = torch.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention.causal_attention_with_dropout(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.2)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch.set_rng_state(state)
    keep = ~dropout.drop_mask(torch.Size([2, 2, 12, 12]), 0.2, torch.device("cpu"))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    expected = (torch.softmax(scores, -1) * keep / 0.8) @ v
    expected.sum().backward()
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)
    for a, b in zip(got, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(a, b, atol=1e-1, rtol=5e-2)


def test_attention_without_dropout_is_sdpa_and_dropout_rate_is_p():
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    with torch.no_grad():  # no autograd: torch's own kernel
        torch.testing.assert_close(attention.causal_attention_with_dropout(q, k, v, 0.0),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=True))
    drop = gm.Dropout(0.1).train()
    x = torch.ones(200_000, requires_grad=True)
    y = drop(x)
    assert y.grad_fn is not None and "_Dropout" in type(y.grad_fn).__name__  # the 1-byte-mask kernel
    assert torch.all((y == 0) | torch.isclose(y, torch.tensor(1 / 0.9)))
    assert (y == 0).float().mean().item() == pytest.approx(0.1, abs=0.005)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient is the same scaled mask
    assert drop.eval()(x) is x


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.002])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 17), (2, 4, 64, 64), (999, 401)])
def test_exact_masks_and_values_are_torchs_dropout(threads, p, shape):
    """The default masks are F.dropout's, bit for bit, from the same generator state, and leave the
    generator where F.dropout leaves it (torch draws them serially on some CPUs, with MKL's
    threaded stream on Intel's); the kernel's output is F.dropout's output."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(shape) + 10.0  # no zeros: the zeros of the output are the mask
        torch.manual_seed(11)
        want = F.dropout(x, p, training=True)
        want_state = torch.get_rng_state()
        torch.manual_seed(11)
        dropped = dropout.drop_mask(x.shape, p, x.device)
        assert torch.equal(dropped, want == 0) and torch.equal(torch.get_rng_state(), want_state)
        torch.manual_seed(11)
        got = gm.Dropout(p).train()(x.clone().requires_grad_())
        assert torch.equal(got.detach(), want)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("p", "shape"), [(0.1, (1000, 400)), (0.5, (999, 401)), (0.002, (1000, 400))])
def test_fast_drop_masks_have_the_rate_everywhere(p, shape):
    """The 16-bit path (and the uniform_ fallback for odd sizes and small rates): the rate holds
    overall and at each of the four positions that share one 64-bit draw."""
    torch.manual_seed(0)
    mask = dropout.drop_mask(torch.Size(shape), p, torch.device("cpu"), "fast")
    assert mask.shape == shape and mask.dtype == torch.bool
    tolerance = 5 * math.sqrt(p * (1 - p) / (mask.numel() / 4))  # five standard deviations
    by_position = mask.flatten()[: mask.numel() // 4 * 4].view(-1, 4).float().mean(0)
    assert torch.all((by_position - p).abs() < tolerance), by_position
    assert mask.float().mean().item() == pytest.approx(p, abs=tolerance / 2)


def test_training_with_dropout_is_seeded_and_learns():
    config = TINY.replace(drop_rate=0.1)
    losses = []
    for _ in range(2):
        torch.manual_seed(5)
        model = gm.GPT(config).train()
        optimizer = adamw(model.parameters(), lr=3e-3, weight_decay=0.1)
        x = torch.randint(0, config.vocab_size, (4, 32))
        run = []
        for _ in range(8):
            optimizer.zero_grad(set_to_none=True)
            loss = model(x, targets=x.roll(-1, 1))
            loss.backward()
            optimizer.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == losses[1]  # same seed, same dropout masks, same run
    assert losses[0][-1] < losses[0][0] - 1.0


def test_the_switch_and_the_dropout_rng_choice(monkeypatch):
    """GPTCLI_KERNELS=0 runs the plain modules (torch's dropout: the same masks as the default exact
    kernel, so the same loss); the fast stream is another run, chosen only on request."""
    config = TINY.replace(drop_rate=0.1)
    torch.manual_seed(5)
    model = gm.GPT(config).train()
    x = torch.randint(0, config.vocab_size, (2, 32))

    def seeded_loss() -> float:
        torch.manual_seed(6)
        return model(x, targets=x.roll(-1, 1)).item()

    exact = seeded_loss()
    monkeypatch.setenv("GPTCLI_KERNELS", "0")
    assert not kernels.enabled()
    assert seeded_loss() == pytest.approx(exact, abs=1e-6)
    monkeypatch.delenv("GPTCLI_KERNELS")
    kernels.set_dropout_rng(model, "fast")
    assert abs(seeded_loss() - exact) > 1e-4
    kernels.set_dropout_rng(model, "exact")
    assert seeded_loss() == exact
    with pytest.raises(ValueError, match="exact, fast"):
        kernels.set_dropout_rng(model, "slow")  # type: ignore[arg-type]


# --- decoding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 32, decoding.PACKED_ROWS])
def test_decoding_linear_equals_module(dtype, rows):
    torch.manual_seed(6)
    for out_features in (257, 1024):  # not divisible by the thread count, and divisible
        layer = torch.nn.Linear(64, out_features).to(dtype)
        x = torch.randn(rows, 1, 64).to(dtype)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            with torch.inference_mode(), decoding.PackedWeights():
                got = decoding.decoding_linear(layer, x)
                assert got is not None or (dtype == torch.bfloat16 and not decoding._BF16_KERNELS)
                got = F.linear(x, layer.weight, layer.bias) if got is None else got
                want = F.linear(x, layer.weight, layer.bias)
        finally:
            torch.set_num_threads(threads)
        assert got.shape == want.shape and got.dtype == want.dtype
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got, want, **tol)


def test_cached_decoding_equals_the_full_forward_pass_in_both_dtypes():
    config = GPTConfig(vocab_size=300, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                       qkv_bias=True, tie_weights=True)
    torch.manual_seed(7)
    model = gm.GPT(config).eval()
    idx = torch.randint(0, 300, (1, 12))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        m = model.to(dtype)
        with torch.inference_mode():
            full = m(idx).float()
            cache = gm.KVCache(config, 1, dtype=dtype)
            steps = [m(idx[:, :4], cache)] + [m(idx[:, i : i + 1], cache, last_only=True) for i in range(4, 12)]
        torch.testing.assert_close(torch.cat(steps, 1).float(), full, atol=tol, rtol=tol)


def test_decoding_linear_declines_more_rows_and_int8_weights():
    from gptcli.quantize import Int8Linear

    layer = torch.nn.Linear(64, 256)
    with torch.inference_mode():
        assert decoding.decoding_linear(layer, torch.randn(decoding.PACKED_ROWS + 1, 64)) is None
        int8 = Int8Linear(layer)
        assert int8.weight.dtype == torch.int8
        assert decoding.decoding_linear(int8, torch.randn(1, 64)) is None  # the layer's own forward runs


@pytest.mark.skipif(not decoding._BF16_KERNELS, reason="no oneDNN bfloat16 kernels")
def test_packed_weights_follow_weight_updates():
    layer = torch.nn.Linear(16, 256).to(torch.bfloat16)
    x = torch.randn(1, 16).to(torch.bfloat16)
    with torch.inference_mode():
        assert decoding.decoding_linear(layer, x) is None  # outside a decoding scope nothing is packed
    with decoding.PackedWeights() as scope:
        with torch.inference_mode():
            first = decoding.decoding_linear(layer, x)
        assert len(scope) == 1
        with torch.no_grad():
            layer.weight.mul_(2)  # a new version of the weight: the packed copy is rebuilt
        with torch.inference_mode():
            second = decoding.decoding_linear(layer, x)
            torch.testing.assert_close(second, F.linear(x, layer.weight, layer.bias))
    assert not torch.equal(first, second)
    assert decoding.active_scope() is None


def test_nested_scopes_share_the_outer_packing_and_a_stream_holds_none_between_tokens():
    from gptcli.generate import stream

    layer = torch.nn.Linear(16, 256)
    x = torch.randn(1, 16)
    with decoding.PackedWeights() as outer, torch.inference_mode():
        with decoding.PackedWeights() as inner:
            decoding.decoding_linear(layer, x)
        assert decoding.active_scope() is outer and len(inner) == 0 and len(outer) == 1
    torch.manual_seed(0)
    model = gm.GPT(TINY).eval()
    tokens = stream(model, [1, 2, 3])
    next(tokens)
    assert decoding.active_scope() is None and not torch.is_inference_mode_enabled()  # while the caller holds one
    tokens.close()


# --- optimizer ------------------------------------------------------------------------------------------


def test_adamw_is_fused_on_cpu_and_equals_the_default():
    torch.manual_seed(8)
    a = torch.nn.Linear(8, 8)
    b = torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    fast = adamw(a.parameters(), lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4):
        assert fast.defaults["fused"] is True
    for _ in range(5):
        for model, opt in ((a, fast), (b, plain)):
            opt.zero_grad()
            model(torch.ones(2, 8)).pow(2).sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
    assert adamw([torch.zeros(2, requires_grad=True)], foreach=False).defaults["fused"] in (None, False)


def test_decoding_after_an_optimizer_step_uses_the_new_weights():
    """The fused AdamW update bumps no tensor versions, so a prepacked copy cannot tell that it went
    stale: copies belong to one decoding scope, and a decode after a step (training's epoch sample)
    packs the new weights. The optimizer knows nothing about decoding."""
    from gptcli.kernels.decoding import PACKED_ROWS, PackedWeights, decoding_linear
    from gptcli.model import Linear
    from gptcli.optim import adamw

    torch.manual_seed(0)
    layer = Linear(64, 64, bias=False)  # the bias is not packed: the weight alone can go stale
    optimizer = adamw(layer.parameters(), lr=0.1)
    assert not optimizer._optimizer_step_post_hooks  # no cache to forget after a step
    x = torch.randn(1, 64)
    with torch.no_grad(), PackedWeights() as scope:
        before = decoding_linear(layer, x)  # packs the weight
    if before is None or len(scope) == 0:
        pytest.skip("no prepacked decoding kernel on this build")
    version = layer.weight._version
    layer(torch.randn(PACKED_ROWS + 1, 64)).square().sum().backward()
    optimizer.step()
    if optimizer.defaults.get("fused"):
        assert layer.weight._version == version  # invisible to the copy's version check...
        with torch.no_grad(), scope:
            torch.testing.assert_close(decoding_linear(layer, x), before)  # ...so a reused scope is stale
    with torch.no_grad(), PackedWeights():
        after = decoding_linear(layer, x)
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_epoch_samples_decode_with_the_weights_of_their_epoch(monkeypatch):
    """Training's pattern: sample greedily, take fused AdamW steps, sample again. The second sample
    is what the plain modules (no packed weights) give for the new weights."""
    from gptcli.generate import generate
    from gptcli.optim import adamw

    torch.manual_seed(1)
    model = gm.GPT(TINY.replace(drop_rate=0.0)).eval()
    optimizer = adamw(model.parameters(), lr=3e-2)
    prompt = torch.tensor([[6109, 3626, 6100, 345]])
    first = generate(model, prompt, max_new_tokens=8, stop_at_eos=False)
    assert decoding.active_scope() is None
    x = torch.randint(0, TINY.vocab_size, (2, 16))
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(x, targets=x.roll(-1, 1)).backward()
        optimizer.step()
    model.eval()
    second = generate(model, prompt, max_new_tokens=8, stop_at_eos=False)
    monkeypatch.setenv("GPTCLI_KERNELS", "0")
    assert second == generate(model, prompt, max_new_tokens=8, stop_at_eos=False) != first
