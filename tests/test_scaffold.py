"""`sft plugins new NAME`: the skeleton it writes, and that its test passes once pip-installed."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest
from click.testing import CliRunner

from sftcore.cli import cli
from sftcore.errors import UsageError
from sftcore.scaffold import skeleton, write_skeleton
from sftcore.testing import check_mask_invariants

FILES = {"pyproject.toml", "README.md", "sft_plugin_fancy_qa.py", "tests/test_sft_plugin_fancy_qa.py"}


def test_skeleton_names_follow_one_scheme():
    files = skeleton("fancy-qa")
    assert set(files) == FILES
    pyproject = files["pyproject.toml"]
    assert 'name = "sft-plugin-fancy-qa"' in pyproject
    assert '[project.entry-points.sft]\nfancy-qa = "sft_plugin_fancy_qa"' in pyproject
    assert 'py-modules = ["sft_plugin_fancy_qa"]' in pyproject
    assert "class FancyQaTemplate:" in files["sft_plugin_fancy_qa.py"]
    assert "from sftcore.testing import check_mask_invariants" in files["tests/test_sft_plugin_fancy_qa.py"]


@pytest.mark.parametrize("name", ["Fancy", "fancy_qa", "-x", "x-", "2fast", "a--b", ""])
def test_bad_names_are_usage_errors(name):
    with pytest.raises(UsageError, match="must be lowercase letters and digits"):
        skeleton(name)


def test_the_generated_module_registers_a_sound_template(tmp_path, sft_host, tiny_tokenizer):
    target = write_skeleton("fancy-qa", tmp_path)
    spec = importlib.util.spec_from_file_location("sft_plugin_fancy_qa", target / "sft_plugin_fancy_qa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    host = sft_host(module)
    template = host.registry.build("template", "fancy-qa")
    assert template.format({"instruction": "Hi?", "output": " Hello. "}) == ("### Question:\nHi?\n\n### Answer:\n", "Hello.")
    rows = [{"instruction": "Name a colour.", "output": "Blue."}, {"instruction": "2 + 2?", "output": "4"}]
    check_mask_invariants(template, host.registry.build("masker", "response-only"), tiny_tokenizer, rows)


def test_write_refuses_an_existing_directory(tmp_path):
    (tmp_path / "sft-plugin-qa").mkdir()
    with pytest.raises(UsageError, match="exists already"):
        write_skeleton("qa", tmp_path)


@pytest.fixture
def plain_env(monkeypatch):
    monkeypatch.delenv("SFT_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("SFT_STRICT_PLUGINS", raising=False)


def test_cli_new_writes_the_skeleton(tmp_path, plain_env):
    result = CliRunner().invoke(cli, ["plugins", "new", "fancy-qa", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    target = tmp_path / "sft-plugin-fancy-qa"
    assert {str(p.relative_to(target).as_posix()) for p in target.rglob("*") if p.is_file()} == FILES
    assert f"pip install -e {target}" in result.output


def test_cli_new_refuses_a_name_a_template_has(tmp_path, plain_env):
    result = CliRunner().invoke(cli, ["plugins", "new", "alpaca", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "template 'alpaca' is already provided by alpaca (sftcore" in result.output
    assert not list(tmp_path.iterdir())


def sft_entry_points() -> set[str]:
    from importlib.metadata import entry_points

    importlib.invalidate_caches()
    return {ep.name for ep in entry_points(group="sft")}


@pytest.mark.slow
def test_the_generated_test_passes_after_pip_install(tmp_path, install_isolated):
    before = sft_entry_points()
    target = write_skeleton("scaffoldcheck", tmp_path)
    env = install_isolated(target)
    # This environment is untouched: an `sft` command running in it meanwhile sees no new plugin.
    assert "scaffoldcheck" not in sft_entry_points() and sft_entry_points() == before
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(target), "-p", "no:cacheprovider", "-q"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout
