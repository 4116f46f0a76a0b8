"""examples/sft-plugin-chatml: a third-party distribution that swaps the template and the masker.

The quick tests read the example from the source tree. The slow ones pip-install a copy (not
editable, as a user would) into a directory of their own that only their subprocesses see, find it
in `sft plugins`, run its own tests against the installed module, and train, preview and generate
with it by name.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sft-plugin-chatml"
CHAT = EXAMPLE / "data" / "chat.jsonl"
SFT = str(Path(sys.executable).with_name("sft"))
PUBLIC = {"sftcore", "sftcore.errors", "sftcore.tokens"}


def run(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("SFT_DISABLE_PLUGINS", "SFT_STRICT_PLUGINS", "PYTHONPATH")}
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env={**base, **(env or {})})


def test_the_example_imports_only_sftcores_public_api():
    tree = ast.parse((EXAMPLE / "sft_plugin_chatml.py").read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    sftcore = {name for name in imported if name.split(".")[0].startswith("sftcore")}
    assert sftcore <= PUBLIC, sftcore - PUBLIC


def test_the_entry_point_is_in_group_sft():
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["name"] == "sft-plugin-chatml"
    assert project["entry-points"]["sft"] == {"chatml": "sft_plugin_chatml"}


def test_the_examples_own_tests_pass_from_the_source_tree(tmp_path):
    done = run(sys.executable, "-m", "pytest", str(EXAMPLE), "-q", "-p", "no:cacheprovider", cwd=tmp_path, env={"PYTHONPATH": str(EXAMPLE)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and "skipped" not in done.stdout


class Installed(NamedTuple):
    source: Path  # the copy that was installed, with its tests
    env: dict[str, str]  # for subprocesses: the installation on PYTHONPATH


@pytest.fixture
def installed(tmp_path, install_isolated) -> Installed:
    """A copy of the example pip-installed (not editable) by ``install_isolated``; copied so that
    the build leaves no build/ or egg-info in the source tree."""
    source = tmp_path / "example" / EXAMPLE.name
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    return Installed(source, install_isolated(source))


@pytest.mark.slow
def test_sft_plugins_lists_both_components_with_their_distribution(installed, tmp_path):
    done = run(SFT, "plugins", "--json", cwd=tmp_path, env=installed.env)
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    found = {(c["stage"], c["name"]): c for c in listing["components"] if c["plugin"] == "chatml"}
    assert set(found) == {("template", "chatml"), ("masker", "chatml")}
    assert {(c["distribution"], c["version"]) for c in found.values()} == {("sft-plugin-chatml", "0.1.0")}
    assert listing["problems"] == []


@pytest.mark.slow
def test_the_examples_own_tests_pass_against_the_installed_module(installed, tmp_path):
    where = run(sys.executable, "-c", "import sft_plugin_chatml; print(sft_plugin_chatml.__file__)", cwd=tmp_path, env=installed.env)
    site = Path(installed.env["PYTHONPATH"].split(os.pathsep)[0])
    assert Path(where.stdout.strip()).parent == site, where.stdout + where.stderr
    done = run(sys.executable, "-m", "pytest", str(installed.source / "tests"), "-q", "-p", "no:cacheprovider", cwd=tmp_path, env=installed.env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and "skipped" not in done.stdout


def preview(model: Path, cwd: Path, env: dict, *options: str) -> list[dict]:
    done = run(SFT, "preview", "--json", "--model", str(model), "--data", str(CHAT), "--template", "chatml", "--masker", "chatml", *options, cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.slow
def test_preview_shows_every_assistant_turn_supervised_and_takes_options(installed, tiny_model_dir, tmp_path):
    every = preview(tiny_model_dir, tmp_path, installed.env)
    last = preview(tiny_model_dir, tmp_path, installed.env, "--masker-opt", "train_on=last")
    assert len(every) == len(last) == 20
    four_turns = every[3]  # "What is 2 + 2?" ... three assistant replies
    assert four_turns["prompt"].count("<|im_start|>assistant\n") == 3 and four_turns["response"] == "4<|im_end|>"
    assert all(r["input_ids"][-1] == 1 and r["labels"][-1] == 1 for r in every)  # EOS </s> closes each row

    def supervised(record):
        return sum(label != -100 for label in record["labels"])

    single = [i for i, r in enumerate(every) if r["prompt"].count("<|im_start|>assistant\n") == 1]
    multi = [i for i in range(20) if i not in single]
    assert all(supervised(every[i]) == supervised(last[i]) for i in single)
    assert all(supervised(every[i]) > supervised(last[i]) for i in multi)


@pytest.mark.slow
def test_sft_run_trains_with_the_chatml_stages_and_generate_uses_them(installed, tiny_model_dir, tmp_path):
    output = tmp_path / "run"
    done = run(
        SFT, "run", "--model", str(tiny_model_dir), "--data", str(CHAT), "--template", "chatml",
        "--masker", "chatml", "--output", str(output), "--max-steps", "3", "--no-progress", cwd=tmp_path, env=installed.env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    import yaml

    saved = yaml.safe_load((output / "sft_config.yaml").read_text(encoding="utf-8"))
    assert saved["template"]["name"] == saved["masker"]["name"] == "chatml"
    answer = run(SFT, "generate", "--model", str(output), "--instruction", "What is 2 + 2?", "--max-new-tokens", "4", "--show-prompt", cwd=tmp_path, env=installed.env)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.startswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_a_model_with_chatml_tokens_trains_and_previews_on_their_ids(installed, tiny_model_dir, tmp_path):
    """A checkpoint whose tokenizer has <|im_start|> and <|im_end|> (as Qwen's has): every marker
    of a row is that token, as the tokenizer's own call gives the conversation at inference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "chatml-model"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])

    for record in preview(model_dir, tmp_path, installed.env):
        ids, prompt = record["input_ids"], record["prompt"]
        assert ids.count(start) == prompt.count("<|im_start|>") and ids.count(end) == prompt.count("<|im_end|>") + 1
        if "</s>" not in prompt:  # a user's "</s>" is text here, and EOS in the tokenizer's own parse
            assert ids[: len(tokenizer(prompt)["input_ids"])] == tokenizer(prompt)["input_ids"]
        assert ids[-2:] == [end, tokenizer.eos_token_id]
    done = run(
        SFT, "run", "--model", str(model_dir), "--data", str(CHAT), "--template", "chatml", "--masker", "chatml",
        "--output", str(tmp_path / "run"), "--max-steps", "2", "--no-progress", cwd=tmp_path, env=installed.env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
