"""Shared fixtures: tokenizers built in-process, a host with the built-ins only, checkpoints for them.

The tiny checkpoint itself is `sftcore.testing`'s ``tiny_model_dir``, the fixture plugin authors get.

No fixture loads whatever plugins happen to be installed: hosts come from
``load_host(entry_points=False)``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import toy_tokenizers  # tests/ leads sys.path under pytest

from sftcore.host import PLUGIN_ENV
from sftcore.testing import clear_plugin_env



@pytest.fixture(scope="session")
def toks():
    """The builders of tests/toy_tokenizers.py (each cached per session): ``toks.gpt2()`` etc."""
    return toy_tokenizers


@pytest.fixture
def clean_plugin_env(monkeypatch):
    clear_plugin_env(monkeypatch)
    return monkeypatch


@pytest.fixture
def builtin_host(clean_plugin_env):
    """A host with sftcore's own plugins only, unaffected by the caller's SFT_* variables."""
    from sftcore.host import load_host

    return load_host(entry_points=False)


def save_checkpoint(tokenizer, path: Path, *, max_position_embeddings: int = 256) -> Path:
    """A one-layer Llama whose vocabulary fits ``tokenizer``, saved with it as a normal checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def checkpoint_for(tmp_path_factory):
    """``checkpoint_for(tokenizer)``: a tiny checkpoint directory carrying that tokenizer."""

    def make(tokenizer, **kwargs) -> Path:
        return save_checkpoint(tokenizer, tmp_path_factory.mktemp("ckpt"), **kwargs)

    return make


# Build with this interpreter's setuptools when it has one (no network needed); without it, pip
# fetches setuptools into an isolated build environment.
BUILD = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []


@pytest.fixture
def install_isolated(tmp_path):
    """``install_isolated(*projects)``: pip-installs them into a directory of their own and returns
    an environment for subprocesses that puts it on PYTHONPATH (without the caller's plugin switches).

    Never into the running environment: another `sft` command there (another test run, the
    user's) would load these plugins meanwhile, and a run killed before it uninstalls them
    would leave them behind. Removing tmp_path removes the installation.
    """
    site = tmp_path / "site"

    def install(*projects: Path) -> dict[str, str]:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", *BUILD, "--disable-pip-version-check",
             "--target", str(site), *map(str, projects)],
            capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        env = {k: v for k, v in os.environ.items() if k not in PLUGIN_ENV}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
        return env

    return install


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The six rows of cli_runs.ROWS as a JSON Lines file."""
    from cli_runs import ROWS, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", ROWS)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, data):
    """A finished `cli_runs.TWO_STEPS` run, with a complete checkpoint after each step."""
    from cli_runs import run_two_steps

    from sftcore.run.checkpoints import MARKER

    output = tmp_path_factory.mktemp("finished") / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        result = run_two_steps(monkeypatch, tiny_model_dir, data, output, load=True)
    assert result.exit_code == 0, result.output
    assert (output / "checkpoint-2" / MARKER).is_file()
    return output
