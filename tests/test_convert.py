"""`gptcli convert`: OpenAI's TensorFlow checkpoint (the real-TensorFlow fixture) without TensorFlow,
Hugging Face round trips, and clear errors without output for corrupt or foreign files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.config import GPTConfig
from gptcli.formats.tfbundle import TensorBundle, crc32c, unmask_crc
from gptcli.modelfile import load_model, read_metadata, save_model
from tests.conftest import OPENAI_TINY, openai_tiny_arrays

runner = CliRunner()
EXPECTED = json.loads((OPENAI_TINY / "expected.json").read_text())
PROMPT = EXPECTED["prompt"]["token_ids"]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def greedy(logits_of, ids: list[int], steps: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            nxt = logits_of(x)[0, -1].argmax()
            x = torch.cat([x, nxt.view(1, 1)], dim=1)
    return x[0, len(ids) :].tolist()


def hf_from_openai_arrays(directory: Path):
    """transformers' GPT2LMHeadModel holding the fixture's arrays (checked against the hashes of what
    TensorFlow saved), mapped by hand."""
    transformers = pytest.importorskip("transformers")
    hp = json.loads((directory / "hparams.json").read_text())
    config = transformers.GPT2Config(
        vocab_size=hp["n_vocab"],
        n_positions=hp["n_ctx"],
        n_embd=hp["n_embd"],
        n_head=hp["n_head"],
        n_layer=hp["n_layer"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    arrays = openai_tiny_arrays()
    state = {
        "transformer.wte.weight": arrays["model/wte"],
        "transformer.wpe.weight": arrays["model/wpe"],
        "transformer.ln_f.weight": arrays["model/ln_f/g"],
        "transformer.ln_f.bias": arrays["model/ln_f/b"],
    }
    for i in range(hp["n_layer"]):
        for module in ("ln_1", "ln_2"):
            state[f"transformer.h.{i}.{module}.weight"] = arrays[f"model/h{i}/{module}/g"]
            state[f"transformer.h.{i}.{module}.bias"] = arrays[f"model/h{i}/{module}/b"]
        for module in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            hf = module.replace("/", ".")
            state[f"transformer.h.{i}.{hf}.weight"] = arrays[f"model/h{i}/{module}/w"][0]  # Conv1D: (in, out)
            state[f"transformer.h.{i}.{hf}.bias"] = arrays[f"model/h{i}/{module}/b"]
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


def hf_logits(model):
    return lambda x: model(x).logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "gpt2-tiny.safetensors"
    result = invoke("convert", OPENAI_TINY, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_bundle_reader_is_bit_exact_with_the_arrays() -> None:
    arrays = openai_tiny_arrays()  # asserts every array's dtype, shape and sha256
    bundle = TensorBundle(OPENAI_TINY / "model.ckpt")
    assert set(arrays) <= set(bundle.entries) and len(arrays) == 28


def test_crc32c() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    data = np.random.default_rng(0).integers(0, 256, 300_001, dtype=np.uint8).tobytes()
    from gptcli.formats.tfbundle import _crc_register_py

    assert crc32c(data) == _crc_register_py(0xFFFFFFFF, data) ^ 0xFFFFFFFF  # lane-parallel == serial
    assert unmask_crc(((0x12345678 >> 15 | 0x12345678 << 17) + 0xA282EAD8) & 0xFFFFFFFF) == 0x12345678


def test_converted_openai_matches_transformers_and_expected(converted: Path) -> None:
    model, _ = load_model(converted)
    config = model.config
    assert (config.vocab_size, config.context_length, config.emb_dim, config.n_heads, config.n_layers) == (
        50257,
        128,
        24,
        2,
        2,
    )
    assert config.qkv_bias and config.tie_weights
    assert read_metadata(converted)["format"] == "gptcli"

    hf = hf_from_openai_arrays(OPENAI_TINY)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    new_tokens = greedy(model, PROMPT, 20)
    assert new_tokens == greedy(hf_logits(hf), PROMPT, 20)
    assert new_tokens == EXPECTED["greedy"]["new_token_ids"]
    expected_last = np.asarray(EXPECTED["logits_last"]["values"], dtype=np.float32)
    assert np.abs(ours[0, -1].numpy() - expected_last).max() < 1e-4

    loss_ids = torch.tensor([EXPECTED["loss"]["token_ids"]])
    with torch.no_grad():
        logits = model(loss_ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits[0], loss_ids[0, 1:]).item()
    assert abs(loss - EXPECTED["loss"]["loss"]) < 1e-4


def test_default_output_and_json(tmp_path: Path) -> None:
    release = tmp_path / "124M"
    shutil.copytree(OPENAI_TINY, release)
    result = invoke("convert", release, "--json", "--no-verify")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["output"] == str(release / "model.safetensors") and report["from"] == "openai"
    assert report["config"]["emb_dim"] == 24
    model, _ = load_model(release)  # the release dir doubles as a run dir
    assert model.config.n_layers == 2


def test_hf_export_of_converted_openai_model(converted: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    result = invoke("convert", converted, "--to", "hf", "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    reference = hf_from_openai_arrays(OPENAI_TINY)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert (hf(ids).logits - reference(ids).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("tied", [True, False])
def test_hf_round_trip_from_transformers(tmp_path: Path, tied: bool) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=320,
        n_positions=32,
        n_embd=16,
        n_head=4,
        n_layer=2,
        tie_word_embeddings=tied,
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    result = invoke("convert", tmp_path / "hf", "--out", tmp_path / "ours.safetensors")
    assert result.exit_code == 0, result.output
    model, _ = load_model(tmp_path / "ours.safetensors")
    assert model.config.tie_weights is tied
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("preset", ["chapter", "gpt2-like"])
def test_hf_round_trip_of_gptcli_model(tmp_path: Path, preset: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    from gptcli.model import GPT

    # The chapter's models have no qkv bias and an untied head; GPT-2's have both.
    gpt2_like = preset == "gpt2-like"
    config = GPTConfig(
        vocab_size=300,
        context_length=16,
        emb_dim=16,
        n_heads=2,
        n_layers=2,
        qkv_bias=gpt2_like,
        tie_weights=gpt2_like,
    )
    model = GPT(config).eval()
    save_model(tmp_path / "model.safetensors", model)
    result = invoke("convert", tmp_path / "model.safetensors", "--to", "hf", "--out", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-5
    # ...and back again.
    result = invoke("convert", tmp_path / "hf", "--out", tmp_path / "back.safetensors")
    assert result.exit_code == 0, result.output
    back, _ = load_model(tmp_path / "back.safetensors")
    with torch.no_grad():
        assert (back(ids) - model(ids)).abs().max().item() < 1e-5


def _corrupt_copy(tmp_path: Path, change: str) -> Path:
    release = tmp_path / "release"
    shutil.copytree(OPENAI_TINY, release)
    for path in release.iterdir():
        path.chmod(0o644)
    index = release / "model.ckpt.index"
    data = release / "model.ckpt.data-00000-of-00001"
    if change == "index-magic":
        raw = bytearray(index.read_bytes())
        raw[-1] ^= 0xFF
        index.write_bytes(raw)
    elif change == "index-truncated":
        index.write_bytes(index.read_bytes()[:500])
    elif change == "index-block-flipped":
        raw = bytearray(index.read_bytes())
        raw[40] ^= 0x01  # inside the data block: its stored CRC no longer matches
        index.write_bytes(raw)
    elif change == "index-foreign":
        index.write_bytes(b"this is not a checkpoint index" * 10)
    elif change == "data-truncated":
        data.write_bytes(data.read_bytes()[:1_000_000])
    elif change == "data-flipped":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        data.write_bytes(raw)
    elif change == "data-missing":
        data.unlink()
    elif change == "hparams-wider":
        (release / "hparams.json").write_text(json.dumps({**EXPECTED["hparams"], "n_embd": 32}))
    elif change == "hparams-deeper":
        (release / "hparams.json").write_text(json.dumps({**EXPECTED["hparams"], "n_layer": 3}))
    elif change == "hparams-garbage":
        (release / "hparams.json").write_text("{not json")
    return release


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("index-magic", "wrong magic number"),
        ("index-truncated", "wrong magic number"),
        ("index-block-flipped", "checksum mismatch in the block"),
        ("index-foreign", "not a TensorFlow checkpoint index"),
        ("data-truncated", "past the end of the file"),
        ("data-flipped", "checksum mismatch for model/"),
        ("data-missing", "checkpoint data file not found"),
        ("hparams-wider", "expected [50257, 32]"),
        ("hparams-deeper", "variable model/h2/"),
        ("hparams-garbage", "is not valid JSON"),
    ],
)
def test_corrupt_checkpoints_fail_cleanly(tmp_path: Path, change: str, message: str) -> None:
    release = _corrupt_copy(tmp_path, change)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = invoke("convert", release, "--out", out_dir / "model.safetensors")
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert list(out_dir.iterdir()) == []  # no output, no temporary leftovers


def test_data_corruption_passes_with_no_verify_but_shapes_still_checked(tmp_path: Path) -> None:
    release = _corrupt_copy(tmp_path, "data-flipped")
    result = invoke("convert", release, "--out", tmp_path / "m.safetensors", "--no-verify")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.safetensors").is_file()
    # --no-verify skips the checksums only: a shape that disagrees with hparams.json still fails.
    wider = _corrupt_copy(tmp_path / "wider", "hparams-wider")
    result = invoke("convert", wider, "--out", tmp_path / "w.safetensors", "--no-verify")
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "expected [50257, 32]" in lines[0], result.stderr
    assert not (tmp_path / "w.safetensors").exists()


def test_refuses_to_overwrite_its_source_and_unknown_inputs(tmp_path: Path, converted: Path) -> None:
    copy = tmp_path / "m.safetensors"
    shutil.copy(converted, copy)
    result = invoke("convert", copy, "--out", copy)
    assert result.exit_code == 2 and "refusing to overwrite" in result.stderr
    (tmp_path / "empty").mkdir()
    result = invoke("convert", tmp_path / "empty")
    assert result.exit_code == 1 and "holds no known model" in result.stderr
    result = invoke("convert", tmp_path / "missing")
    assert result.exit_code == 1 and "not found" in result.stderr


def test_hf_unsupported_variant_is_refused(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=8, n_embd=8, n_head=2, n_layer=1, activation_function="relu"
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    result = invoke("convert", tmp_path / "hf", "--out", tmp_path / "m.safetensors")
    assert result.exit_code == 1 and "activation_function='relu' is not supported" in result.stderr
    assert not (tmp_path / "m.safetensors").exists()


# ------------------------------------------------------------------------------------------------
# A minimal TensorFlow bundle writer, for shapes and dtypes the real-TensorFlow fixture does not
# cover (2-D Conv1D weights, float16, many table blocks) and for the 124M-sized benchmark.

_TF_DTYPE = {np.dtype(np.float32): 1, np.dtype(np.float16): 19, np.dtype(np.float64): 2}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes | int, wire: int = 0) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(int(payload))
    if wire == 5:
        return key + int(payload).to_bytes(4, "little")
    return key + _varint(len(payload)) + bytes(payload)


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _block(entries: list[tuple[bytes, bytes]], restart_interval: int = 16) -> bytes:
    out, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        else:
            restarts.append(len(out))
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        previous = key
    for offset in restarts or [0]:
        out += offset.to_bytes(4, "little")
    return bytes(out + len(restarts or [0]).to_bytes(4, "little"))


def _separator(start: bytes, limit: bytes | None) -> bytes:
    """LevelDB's short index keys: >= every key of a block and < the next block's first key."""
    i = 0
    while limit is not None and i < min(len(start), len(limit)) and start[i] == limit[i]:
        i += 1
    if limit is None:
        i = next((j for j, byte in enumerate(start) if byte != 0xFF), len(start))
        return start[:i] + bytes([start[i] + 1]) if i < len(start) else start
    if i < min(len(start), len(limit)) and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start


def write_table(path: Path, entries: list[tuple[bytes, bytes]], block_size: int = 4096) -> None:
    out = bytearray()

    def emit(block: bytes) -> bytes:
        handle = _varint(len(out)) + _varint(len(block))
        out.extend(block + b"\x00" + _masked_crc(block + b"\x00").to_bytes(4, "little"))
        return handle

    blocks: list[list[tuple[bytes, bytes]]] = [[]]
    size = 0
    for key, value in entries:
        if size >= block_size:
            blocks.append([])
            size = 0
        blocks[-1].append((key, value))
        size += len(key) + len(value) + 3
    index = []
    for i, block in enumerate(blocks):
        following = blocks[i + 1][0][0] if i + 1 < len(blocks) else None
        index.append((_separator(block[-1][0], following), emit(_block(block))))
    meta_handle = emit(_block([]))
    index_handle = emit(_block(index, restart_interval=1))
    footer = (meta_handle + index_handle).ljust(40, b"\x00")
    path.write_bytes(bytes(out) + footer + (0xDB4775248B80FB57).to_bytes(8, "little"))


def write_bundle(prefix: Path, tensors, block_size: int = 4096) -> None:
    """Write (name, array) pairs as a TensorFlow V2 checkpoint `<prefix>.index` + one data shard."""
    entries, offset = {}, 0
    with open(f"{prefix}.data-00000-of-00001", "wb") as data:
        for name, array in tensors:
            raw = np.ascontiguousarray(array).tobytes()
            shape = b"".join(_field(2, _field(1, d), 2) for d in array.shape)
            entries[name.encode()] = (
                _field(1, _TF_DTYPE[array.dtype])
                + _field(2, shape, 2)
                + _field(4, offset)
                + _field(5, len(raw))
                + _field(6, _masked_crc(raw), 5)
            )
            data.write(raw)
            offset += len(raw)
    header = _field(1, 1) + _field(3, _field(1, 1), 2)
    write_table(Path(f"{prefix}.index"), [(b"", header)] + sorted(entries.items()), block_size)


def random_gpt2_arrays(hp: dict[str, int], dtype=np.float32, conv_rank: int = 3, seed: int = 0):
    """OpenAI-named random arrays for hparams `hp`, yielded one at a time."""
    rng = np.random.default_rng(seed)
    c = hp["n_embd"]

    def arr(*shape: int):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.1).astype(dtype)

    def conv(n_in: int, n_out: int):
        return arr(1, n_in, n_out) if conv_rank == 3 else arr(n_in, n_out)

    yield "model/wte", arr(hp["n_vocab"], c)
    yield "model/wpe", arr(hp["n_ctx"], c)
    for i in range(hp["n_layer"]):
        p = f"model/h{i}/"
        yield p + "ln_1/g", 1 + arr(c)
        yield p + "ln_1/b", arr(c)
        yield p + "attn/c_attn/w", conv(c, 3 * c)
        yield p + "attn/c_attn/b", arr(3 * c)
        yield p + "attn/c_proj/w", conv(c, c)
        yield p + "attn/c_proj/b", arr(c)
        yield p + "ln_2/g", 1 + arr(c)
        yield p + "ln_2/b", arr(c)
        yield p + "mlp/c_fc/w", conv(c, 4 * c)
        yield p + "mlp/c_fc/b", arr(4 * c)
        yield p + "mlp/c_proj/w", conv(4 * c, c)
        yield p + "mlp/c_proj/b", arr(c)
    yield "model/ln_f/g", 1 + arr(c)
    yield "model/ln_f/b", arr(c)
    yield "model/global_step", np.array(7, dtype=np.float64)  # extra variables are ignored


def make_release(directory: Path, hp: dict[str, int], **kwargs) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hparams.json").write_text(json.dumps(hp))
    (directory / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
    block_size = kwargs.pop("block_size", 4096)
    arrays = dict(random_gpt2_arrays(hp, **kwargs))
    write_bundle(directory / "model.ckpt", arrays.items(), block_size)
    return arrays


def test_our_writer_reproduces_the_tensorflow_fixture_entries(tmp_path: Path) -> None:
    from gptcli.formats.tfbundle import read_table

    entries = read_table(OPENAI_TINY / "model.ckpt.index")
    write_table(tmp_path / "copy.index", entries)
    assert (tmp_path / "copy.index").read_bytes() == (OPENAI_TINY / "model.ckpt.index").read_bytes()


@pytest.mark.parametrize(("dtype", "conv_rank"), [(np.float16, 2), (np.float64, 3)])
def test_synthetic_checkpoint_other_layouts(tmp_path: Path, dtype, conv_rank: int) -> None:
    hp = {"n_vocab": 97, "n_ctx": 16, "n_embd": 8, "n_head": 2, "n_layer": 3}
    # A tiny block size spreads the index over many blocks with prefix-compressed keys.
    arrays = make_release(tmp_path / "rel", hp, dtype=dtype, conv_rank=conv_rank, block_size=128)
    from gptcli.formats.tfbundle import read_table

    assert len(read_table(tmp_path / "rel" / "model.ckpt.index")) == len(arrays) + 1
    result = invoke("convert", tmp_path / "rel", "--out", tmp_path / "m.safetensors")
    assert result.exit_code == 0, result.output
    from safetensors.numpy import load_file

    state = load_file(str(tmp_path / "m.safetensors"))
    assert np.array_equal(state["tok_emb.weight"], arrays["model/wte"].astype(np.float32))
    w = arrays["model/h2/mlp/c_fc/w"].reshape(8, 32)
    assert np.array_equal(state["blocks.2.ff.fc.weight"], w.T.astype(np.float32))
    assert np.array_equal(state["blocks.1.att.qkv.bias"], arrays["model/h1/attn/c_attn/b"].astype(np.float32))
    assert "out_head.weight" not in state
    model, _ = load_model(tmp_path / "m.safetensors")
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 97)


def test_command_modules_import_nothing_heavy() -> None:
    code = (
        "import sys, gptcli.commands.convert, gptcli.commands.fetch\n"
        "heavy = {'torch', 'numpy', 'requests', 'rich', 'safetensors'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hf_sharded_checkpoint_and_pickle_refusal(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.GPT2Config(vocab_size=128, n_positions=16, n_embd=16, n_head=2, n_layer=2)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    result = invoke("convert", tmp_path / "sharded", "--out", tmp_path / "m.safetensors")
    assert result.exit_code == 0, result.output
    model, _ = load_model(tmp_path / "m.safetensors")
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-5

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tmp_path / "sharded" / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    result = invoke("convert", pickled, "--out", tmp_path / "p.safetensors")
    assert result.exit_code == 1 and "pickle" in result.stderr


def test_format_table_matches_the_commands_choices() -> None:
    from gptcli.choices import SOURCE_FORMATS, TARGET_FORMATS
    from gptcli.formats.registry import FORMATS, READERS, WRITERS

    assert set(READERS) == set(SOURCE_FORMATS) - {"auto"}
    assert set(WRITERS) == set(TARGET_FORMATS)
    assert all(module.NAME == name for name, module in FORMATS.items())
