"""`--help` of the commands: real metavars and choices, defaults from the settings, and fast (no torch,
numpy or pydantic imported)."""

import dataclasses
import json
import subprocess
import sys

import pytest
import typer.main

from gptcli.cli import app
from gptcli.settings import DEFAULTS, TrainSettings

COMMANDS = ("train", "prepare", "fetch", "convert", "info")


def help_text(command: str) -> str:
    """The plain (un-boxed) help, as a pipe sees it, in a fresh interpreter; also which heavy modules it loaded."""
    code = (
        "import sys, json, io, contextlib\n"
        "from gptcli.cli import main\n"
        f"sys.argv = ['gptcli', {command!r}, '--help']\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "    main()\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'pydantic', 'safetensors', 'matplotlib') if m in sys.modules)\n"
        "print(json.dumps({'help': out.getvalue(), 'heavy': heavy}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"COLUMNS": "200", "TYPER_USE_RICH": "0", "PATH": "/usr/bin:/bin"})
    return result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_metavars_and_loads_nothing_heavy(command):
    report = json.loads(help_text(command))
    assert report["heavy"] == [], f"`gptcli {command} --help` imported {report['heavy']}"
    text = report["help"]
    assert "Usage: gptcli" in text
    for typer_label in ("<bool>", "<str>", "<int>", "<float>", "<path>"):
        assert typer_label not in text, f"{typer_label} in `gptcli {command} --help`"


def test_choices_are_listed():
    train = json.loads(help_text("train"))["help"]
    for choices in ("[constant|cosine]", "[auto|fp32|bf16]", "[epochs|random]", "[auto|cpu|cuda|mps]", "[exact|fast]"):
        assert choices in train
    assert "--lr FLOAT" in train and "--epochs INTEGER" in train and "--out PATH" in train
    assert "[auto|document|position]" in json.loads(help_text("prepare"))["help"]
    assert "[124M|355M|774M|1558M]" in json.loads(help_text("fetch"))["help"]
    convert = json.loads(help_text("convert"))["help"]
    assert "[gptcli|hf|book|gguf]" in convert and "[f32|f16|q8_0]" in convert


def test_train_options_take_their_defaults_from_the_settings():
    params = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    fields = [f.name for f in dataclasses.fields(TrainSettings) if f.name not in ("corpus", "config", "init", "out")]
    assert set(fields) <= set(params)
    for name in fields:
        assert params[name].default == getattr(DEFAULTS, name), name
    for name in ("context_length", "drop_rate", "qkv_bias", "vocab_size", "tie_weights"):
        assert params[name].default == getattr(DEFAULTS.config, name), name


def test_train_options_are_their_declarations():
    """Each option of `train` is one declared field: its Typer option carries the field's default, help
    and panel, and what --resume may change is declared with the options."""
    from gptcli.commands.train import CommandOptions
    from gptcli.options import declared
    from gptcli.settings import RESUMABLE, ModelOptions, TrainOptions

    params = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    groups = (ModelOptions, TrainOptions, CommandOptions)
    fields = [(field, spec) for group in groups for field, spec, _ in declared(group)]
    assert sorted(field.name for field, _ in fields) == sorted(params)
    for field, spec in fields:
        param = params[field.name]
        assert (param.default, param.help, getattr(param, "rich_help_panel", None)) == (
            field.default, spec.help, spec.panel), field.name
    assert set(RESUMABLE) == {"epochs", "max_steps", "save_every", "keep_checkpoints", "plots", "device",
                              "strict_precision"}
