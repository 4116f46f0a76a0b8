"""`sft --version`, `sft --help` and `sft plugins`: output, JSON schema, kill switch, no torch import,
and (slow) real installed plugin distributions found through the `sft` entry-point group."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import sftcore
from sftcore import hookimpl
from sftcore.host import load_catalogue
from sftcore.cli import cli
from sftcore.host import load_host

SFT = str(Path(sys.executable).with_name("sft"))
STAGES = {"template", "masker", "collator", "loader", "adapter", "reader"}
BUILTINS = ["alpaca", "alpaca-output", "response-only", "full", "pad", "flash", "json", "jsonl"]


@pytest.fixture
def run_sft(clean_plugin_env):
    """Invoke the CLI in-process with the built-in plugins only (never whatever is installed)."""

    def run(*args: str, extra: dict | None = None, env: dict | None = None):
        host = functools.partial(load_host, entry_points=False, extra=extra)
        clean_plugin_env.setattr("sftcore.commands.common.load_host", host)
        return CliRunner().invoke(cli, list(args), prog_name="sft", env=env, catch_exceptions=False)

    return run


def test_version():
    result = subprocess.run([SFT, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"sft, version {sftcore.__version__}"


def test_help_lists_the_commands(run_sft):
    result = run_sft("--help")
    assert result.exit_code == 0
    assert "--disable-plugin NAME" in result.output
    for name in ("run", "plugins", "preview", "generate", "validate"):
        assert f"  {name} " in result.output


def test_plugins_table(run_sft, builtin_host):
    result = run_sft("plugins")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["STAGE", "NAME", "PROVIDED", "BY", "DESCRIPTION"]
    rows = {tuple(line.split()[:2]): line for line in lines[1:] if line.strip()}
    for entry in load_catalogue().components:
        line = rows[(entry["stage"], entry["name"])]
        assert f"{entry['plugin']} (sftcore {sftcore.__version__})" in line
        assert line.endswith(builtin_host.registry.get(entry["stage"], entry["name"]).description)
    assert {name for _, name in rows} >= set(BUILTINS)
    assert [stage for stage, _ in rows][:2] == ["template", "template"], "pipeline order: templates first"
    assert result.stderr == ""


def test_plugins_json_schema(run_sft):
    result = run_sft("plugins", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert {"plugins", "components"} <= set(data)
    assert data["problems"] == [] and data["blocked"] == []
    for plugin in data["plugins"]:
        assert isinstance(plugin["name"], str) and isinstance(plugin["version"], str)
    assert {p["name"] for p in data["plugins"]} == set(load_catalogue().plugins)
    assert all(p["version"] == sftcore.__version__ and p["builtin"] is True for p in data["plugins"])
    for component in data["components"]:
        assert {"stage", "name", "plugin", "description"} <= set(component)
        assert component["stage"] in STAGES
        assert all(isinstance(component[k], str) and component[k] for k in ("stage", "name", "plugin", "description"))
    names = {(c["stage"], c["name"]): c["plugin"] for c in data["components"]}
    assert names == {(e["stage"], e["name"]): e["plugin"] for e in load_catalogue().components}


def test_disable_plugin_flag_and_env(run_sft):
    result = run_sft("--disable-plugin", "pad", "plugins", "--json")
    data = json.loads(result.stdout)
    assert "pad" not in {c["name"] for c in data["components"]}
    assert data["blocked"] == ["pad"]
    assert "alpaca" in {c["name"] for c in data["components"]}

    result = run_sft("--disable-plugin", "pad", "plugins")
    assert " pad " not in result.stdout and "Blocked: pad" in result.stdout

    result = run_sft("plugins", "--json", env={"SFT_DISABLE_PLUGINS": "pad,masking"})
    names = {c["name"] for c in json.loads(result.stdout)["components"]}
    assert not names & {"pad", "response-only", "full"} and "flash" in names


def test_broken_plugin_gives_one_warning_line_and_exit_zero(run_sft):
    class Crashes:
        @hookimpl
        def register_collators(self, register):
            raise RuntimeError("no GPU kernels\nfor this card")

    result = run_sft("plugins", extra={"crashes": Crashes()})
    assert result.exit_code == 0
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("Warning: plugin 'crashes' ")
    assert "SFT_DISABLE_PLUGINS=crashes" in warnings[0]
    assert "pad" in result.stdout

    strict = run_sft("plugins", extra={"crashes": Crashes()}, env={"SFT_STRICT_PLUGINS": "1"})
    assert strict.exit_code == 1
    assert strict.stderr.startswith("Error: plugin 'crashes'")


NO_TORCH = textwrap.dedent(
    """
    import functools, sys
    import sftcore.commands.common as common
    import sftcore.host as host_module
    common.load_host = functools.partial(host_module.load_host, entry_points=False)
    from sftcore.cli import cli
    code = cli.main({args!r}, prog_name="sft", standalone_mode=False)
    heavy = sorted(m for m in ("torch", "transformers", "tokenizers", "numpy") if m in sys.modules)
    assert not heavy, f"sft {args} imported {{heavy}}"
    print("ok", code)
    """
)


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["plugins", "--json"]], ids=" ".join)
def test_cli_does_not_import_torch(args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFT_")}
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH.format(args=args)], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("ok")


# --- real installed distributions (slow) ------------------------------------------------------

SWAPPED = '''
"""A third-party plugin: replaces `alpaca` on purpose and adds a collator."""
from sftcore import hookimpl
from sftcore_plugins.alpaca import AlpacaTemplate
from sftcore_plugins.pad import PadCollator


class TailPad(PadCollator):
    pass


@hookimpl
def register_templates(register):
    register("alpaca", AlpacaTemplate, description="alpaca, swapped in by a plugin", override=True)


@hookimpl
def register_collators(register):
    register("tail-pad", TailPad, description="pad, from a third-party distribution")
'''

BROKEN = 'raise ImportError("No module named \'sft_missing_dependency\'")\n'


def write_distribution(root: Path, dist: str, version: str, module: str, entry: str, source: str) -> Path:
    root.mkdir()
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{dist}"
            version = "{version}"

            [project.entry-points.sft]
            {entry} = "{module}"

            [tool.setuptools]
            py-modules = ["{module}"]
            """
        )
    )
    (root / f"{module}.py").write_text(source)
    return root


@pytest.fixture
def installed_plugins(tmp_path, install_isolated):
    """Both throwaway distributions, installed by ``install_isolated``: the environment for `sft`
    subprocesses that find them, while this interpreter never does."""
    swapped = write_distribution(tmp_path / "swapped", "sft-swapped", "0.4.2", "sft_swapped", "swapped", SWAPPED)
    broken = write_distribution(tmp_path / "broken", "sft-broken", "0.0.7", "sft_broken", "broken", BROKEN)
    return install_isolated(swapped, broken)


@pytest.mark.slow
def test_installed_plugin_distributions(installed_plugins):
    result = subprocess.run([SFT, "plugins", "--json"], capture_output=True, text=True, env=installed_plugins, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    plugins = {p["name"]: p for p in data["plugins"]}
    assert plugins["swapped"]["distribution"] == "sft-swapped"
    assert plugins["swapped"]["version"] == "0.4.2"
    assert plugins["swapped"]["builtin"] is False
    assert "broken" not in plugins
    components = {(c["stage"], c["name"]): c for c in data["components"]}
    alpaca = components[("template", "alpaca")]
    assert (alpaca["plugin"], alpaca["distribution"], alpaca["version"]) == ("swapped", "sft-swapped", "0.4.2")
    assert alpaca["description"] == "alpaca, swapped in by a plugin"
    assert components[("collator", "tail-pad")]["plugin"] == "swapped"
    assert components[("template", "alpaca-output")]["plugin"] == "alpaca"
    assert components[("collator", "pad")]["plugin"] == "pad"

    about_broken = [line for line in result.stderr.splitlines() if "broken" in line]
    assert len(about_broken) == 1, result.stderr
    line = about_broken[0]
    assert line.startswith("Warning: plugin 'broken' (sft-broken 0.0.7) failed to load: ImportError")
    assert "sft_missing_dependency" in line and "SFT_DISABLE_PLUGINS=broken" in line
    assert [p for p in data["problems"] if "broken" in p] == [line.removeprefix("Warning: ")]

    table = subprocess.run([SFT, "plugins"], capture_output=True, text=True, env=installed_plugins, timeout=120)
    assert table.returncode == 0
    alpaca_rows = [line for line in table.stdout.splitlines() if line.split()[:2] == ["template", "alpaca"]]
    assert len(alpaca_rows) == 1 and "swapped (sft-swapped 0.4.2)" in alpaca_rows[0]

    quiet = subprocess.run(
        [SFT, "--disable-plugin", "broken", "plugins", "--json"],
        capture_output=True, text=True, env=installed_plugins, timeout=120,
    )
    assert quiet.returncode == 0 and "broken" not in quiet.stderr
    assert "broken" in json.loads(quiet.stdout)["blocked"]


def test_in_process_runs_ignore_every_plugin_variable_of_the_caller(monkeypatch):
    from cli_runs import sft

    caller = {"SFT_DISABLE_PLUGINS": "pad", "SFT_STRICT_PLUGINS": "1", "SFT_TRACE_PLUGINS": "1", "SFT_PLUGIN_TIMEOUT": "soon"}
    for var, value in caller.items():
        monkeypatch.setenv(var, value)
    result = sft(monkeypatch, "plugins", "--json")
    assert (result.exit_code, result.stderr) == (0, ""), "no timeout error, no trace"
    assert json.loads(result.stdout)["blocked"] == [], "pad is not blocked"
