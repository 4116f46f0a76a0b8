"""`sft plugins new NAME`: the skeleton it writes, and that its test passes once pip-installed."""

from __future__ import annotations

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


# Build with this interpreter's setuptools when it has one (no network needed); without it, pip
# fetches setuptools into an isolated build environment.
BUILD = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


@pytest.fixture
def installed_skeleton(tmp_path):
    """``sft-plugin-scaffoldcheck`` written and pip-installed (editable) into this interpreter; uninstalled after."""
    target = write_skeleton("scaffoldcheck", tmp_path)
    done = pip("install", "--no-deps", *BUILD, "-e", str(target))
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        yield target
    finally:
        pip("uninstall", "-y", "sft-plugin-scaffoldcheck")


@pytest.mark.slow
def test_the_generated_test_passes_after_pip_install(installed_skeleton):
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(installed_skeleton), "-p", "no:cacheprovider", "-q"],
        capture_output=True,
        text=True,
        cwd=installed_skeleton.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout
