"""The built distributions carry the bundled data, and a wheel installed into a fresh virtual
environment trains offline: no network, no repository, an empty gptcli cache."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

BUNDLED = ("gptcli/assets/the-verdict.txt", "gptcli/assets/gpt2/encoder.json", "gptcli/assets/gpt2/vocab.bpe",
           "gptcli/assets/README.md")


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m build` (sdist, then the wheel from it) of this checkout, with the installed setuptools
    (no isolated environment to download)."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO_ROOT)],
                   check=True, capture_output=True, timeout=300)
    return out


def test_wheel_and_sdist_contain_the_bundled_data(dists: Path) -> None:
    (wheel,) = dists.glob("gptcli-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(BUNDLED) <= names
    (sdist,) = dists.glob("gptcli-*.tar.gz")
    with tarfile.open(sdist) as archive:
        members = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert set(BUNDLED) <= members


def _offline_env(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GPTCLI_", "PYTHON"))}
    dead = "http://127.0.0.1:9"  # nothing listens there: any download attempt fails at once
    env.update(GPTCLI_HOME=str(home), HTTP_PROXY=dead, HTTPS_PROXY=dead, http_proxy=dead, https_proxy=dead,
               NO_PROXY="", no_proxy="")
    return env


def test_the_installed_wheel_trains_offline(dists: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    (wheel,) = dists.glob("gptcli-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index",
                    "--no-deps", str(wheel)], check=True, timeout=300)
    # The dependencies (torch, tiktoken, ...) come from this environment's site-packages, offline.
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _offline_env(tmp_path / "home")
    where = subprocess.run([str(python), "-c", "import gptcli; print(gptcli.__file__)"], cwd=work, env=env,
                           check=True, capture_output=True, text=True).stdout
    assert where.startswith(site), where  # the wheel's copy, not this checkout
    result = subprocess.run([str(venv / "bin" / "gptcli"), "train", "--preset", "tiny", "--max-steps", "2",
                             "--json", "--no-plots", "--out", "run"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (work / "run" / "model.safetensors").is_file()
    assert '"val_loss"' in result.stdout
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("the-verdict.txt"))
