"""Untrusted files and code: no pickle weights by default, nothing in a config is executed, remote
code only on request and logged, a blocked plugin is never imported."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import ROWS, SFT, sft, write_jsonl

from sftcore.errors import SftError
from sftcore_plugins.flash import FlashLoader

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pickle_checkpoint(tmp_path_factory):
    """The tiny model with its weights in pytorch_model.bin only, as older checkpoints ship."""
    import torch
    from safetensors.torch import load_file

    from sftcore.assets import tiny_model

    path = tiny_model(tmp_path_factory.mktemp("pickle") / "m")
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return path


def test_a_pickle_only_checkpoint_is_refused_in_one_line(monkeypatch, tmp_path, pickle_checkpoint):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    result = sft(monkeypatch, "run", "--model", pickle_checkpoint, "--data", data, "--output", tmp_path / "out", "--no-progress")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {pickle_checkpoint} has weights only as pickle (pytorch_model.bin), which can run code when loaded; "
        "convert them to safetensors, or pass --loader-opt allow_pickle=true if you trust the file\n"
    )


def test_allow_pickle_is_the_opt_in(pickle_checkpoint):
    model, _ = FlashLoader(allow_pickle=True).load(str(pickle_checkpoint))
    assert model.config.vocab_size == 512


def cut_short(source: Path, target: Path) -> Path:
    """A copy of a checkpoint whose weights file stops half way, as a killed copy leaves it."""
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return target


def test_a_checkpoint_cut_short_is_one_line_not_a_traceback(tmp_path, tiny_model_dir):
    broken = cut_short(tiny_model_dir, tmp_path / "cut")
    with pytest.raises(SftError, match=rf"^cannot load the model from {re.escape(str(broken))}: .*deserializing header"):
        FlashLoader().load(str(broken))


def test_generate_on_weights_cut_short_is_one_line(monkeypatch, tmp_path, tiny_model_dir):
    run_dir = cut_short(tiny_model_dir, tmp_path / "run")
    (run_dir / "sft_config.yaml").write_text("template: alpaca\n")
    (run_dir / "summary.json").write_text("{}")  # a finished run, copied by a copy that was killed
    result = sft(monkeypatch, "generate", "--model", run_dir, "--instruction", "Say hi.", "--no-progress")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: cannot load the model from {run_dir}: Error while deserializing header")
    assert len(result.stderr.splitlines()) == 1


EXPLOIT = "!!python/object/apply:os.system [\"touch {marker}\"]"


@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_config_with_python_tags_is_rejected_and_never_executed(monkeypatch, tmp_path, command):
    marker = tmp_path / "executed"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"model: {EXPLOIT.format(marker=marker)}\n")
    args = ["--config", config_file] if command == "run" else [config_file]
    result = sft(monkeypatch, command, *args)
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {config_file}, line 1, column 8: invalid YAML: "
        "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'\n"
    )
    assert not marker.exists()


def test_python_tags_in_flags_stay_text(monkeypatch, tmp_path):
    marker = tmp_path / "executed"
    result = sft(monkeypatch, "run", "--set", f"seed={EXPLOIT.format(marker=marker)}", "--output", tmp_path / "out")
    assert result.exit_code == 2
    assert "training: 'seed' must be a number, got '!!python/object/apply:os.system" in result.stderr
    assert not marker.exists()


def test_component_names_are_looked_up_never_imported(monkeypatch, tmp_path):
    """No dotted paths: a config can only pick among registered components."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text("collator: os.system\ntemplate: {name: subprocess.Popen}\n")
    result = sft(monkeypatch, "validate", config_file)
    assert result.exit_code == 2
    assert "Unknown collator 'os.system'." in result.stderr and "Unknown template 'subprocess.Popen'." in result.stderr


def test_every_yaml_load_in_the_code_is_safe():
    """Meta-test: the code never loads YAML or pickles with a loader that can build objects."""
    unsafe = re.compile(r"yaml\.(load|full_load|unsafe_load|load_all)\(|Loader\s*=|pickle\.loads?\(|torch\.load\(")
    sources = [p for d in ("sftcore", "plugins", "examples") for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 20
    found = [f"{p.relative_to(ROOT)}:{n}" for p in sources for n, line in enumerate(p.read_text().splitlines(), 1) if unsafe.search(line)]
    assert found == []
    assert any("yaml.safe_load(" in p.read_text() for p in sources)


def test_trust_remote_code_is_off_by_default_and_logged_when_on(caplog, tiny_model_dir):
    warning = f"trust_remote_code is on: code shipped in {tiny_model_dir} will run"
    with caplog.at_level(logging.WARNING, logger="sftcore.loader"):
        FlashLoader().load(str(tiny_model_dir))
        assert not caplog.records
        FlashLoader(trust_remote_code=True).load_tokenizer(str(tiny_model_dir))  # sft preview and sft prepare
        assert [r.getMessage() for r in caplog.records] == [warning]
        caplog.clear()
        FlashLoader(trust_remote_code=True).load(str(tiny_model_dir))
        assert [r.getMessage() for r in caplog.records] == [warning], "said once per load"


def test_a_blocked_plugin_is_never_imported(tmp_path):
    """A real distribution on the path, with an `sft` entry point whose import leaves a trace."""
    trace = tmp_path / "imported"
    site = tmp_path / "site"
    (site / "sft_plugin_evil-1.0.dist-info").mkdir(parents=True)
    (site / "sft_plugin_evil-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: sft-plugin-evil\nVersion: 1.0\n")
    (site / "sft_plugin_evil-1.0.dist-info" / "entry_points.txt").write_text("[sft]\nevil = sft_plugin_evil\n")
    (site / "sft_plugin_evil.py").write_text(f"open({str(trace)!r}, 'w').write('ran')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    for var in ("SFT_DISABLE_PLUGINS", "SFT_STRICT_PLUGINS"):
        env.pop(var, None)

    blocked = subprocess.run([SFT, "--disable-plugin", "evil", "plugins", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert blocked.returncode == 0, blocked.stderr
    assert '"blocked": [\n    "evil"\n  ]' in blocked.stdout
    assert not trace.exists(), "a blocked plugin's module was imported"

    env["SFT_DISABLE_PLUGINS"] = "evil"
    assert subprocess.run([SFT, "plugins"], env=env, capture_output=True, timeout=120).returncode == 0
    assert not trace.exists()

    env.pop("SFT_DISABLE_PLUGINS")
    subprocess.run([SFT, "plugins"], env=env, capture_output=True, timeout=120)
    assert trace.read_text() == "ran", "the same plugin, not blocked, is imported: the test can see an import"
    assert sys.executable  # the subprocesses ran the same interpreter's `sft` script
