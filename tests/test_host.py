"""The plugin host: built-ins through the ordinary path, provenance, clashes, kill switches,
isolation of broken plugins, strict mode, tracing, and help for unknown names and bad options."""

from __future__ import annotations

import importlib
import importlib.metadata
import types
from typing import Literal

import pytest

import sftcore
from sftcore import hookimpl
from sftcore import host as host_module
from sftcore.host import load_catalogue
from sftcore.errors import PluginError, UnknownComponentError, UsageError
from sftcore.host import load_host
from sftcore.options import did_you_mean, option_problems, unknown_message
from sftcore.registry import Component, Registry


class Templates:
    """A throwaway plugin registering templates (instances, so each test gets fresh ones)."""

    def __init__(self, *names: str, override: bool = False) -> None:
        self.names, self.override = names, override

    @hookimpl
    def register_templates(self, register):
        for name in self.names:
            register(name, lambda: None, description=f"test template {name}", override=self.override)


class Collators:
    def __init__(self, *names: str) -> None:
        self.names = names

    @hookimpl
    def register_collators(self, register):
        for name in self.names:
            register(name, lambda: None, description="test collator")


class BadSignature:
    @hookimpl
    def register_templates(self, registr):  # misspelt argument: pluggy rejects the hookimpl
        registr("never", lambda: None)


class UnknownHook:
    @hookimpl
    def register_template(self, register):  # no such hook (singular)
        register("never", lambda: None)


class RaisesInHook:
    @hookimpl
    def register_templates(self, register):
        raise RuntimeError("template table is corrupt")


class FakeDist:
    def __init__(self, name: str, version: str) -> None:
        self.name, self.version = name, version


class FakeEntryPoint:
    def __init__(self, name: str, load, dist: FakeDist | None, module: str = "sft_test_plugin") -> None:
        self.name, self._load, self.dist, self.module = name, load, dist, module

    def load(self):
        return self._load()


def use_entry_points(monkeypatch, *eps: FakeEntryPoint) -> None:
    """Make the host see exactly ``eps`` in the ``sft`` group, whatever is installed."""
    fake = types.SimpleNamespace(
        entry_points=lambda group: list(eps) if group == host_module.ENTRY_POINT_GROUP else [],
        version=importlib.metadata.version,
        PackageNotFoundError=importlib.metadata.PackageNotFoundError,
    )
    monkeypatch.setattr(host_module, "metadata", fake)


@pytest.fixture
def raising_module(tmp_path, monkeypatch):
    """An importable module that raises at import time, like a plugin with a missing dependency."""
    (tmp_path / "sft_test_raises_at_import.py").write_text(
        "raise ImportError('No module named \\'missing_dependency\\'')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint(name="raiser", value="sft_test_raises_at_import", group="sft")
    return FakeEntryPoint("raiser", ep.load, FakeDist("sft-raiser", "0.3.1"), ep.module)


# --- built-ins ---------------------------------------------------------------------------------


def test_builtins_register_through_the_plugin_path(builtin_host):
    catalogue = load_catalogue()
    assert [p.name for p in builtin_host.plugins] == list(catalogue.plugins)
    for info in builtin_host.plugins:
        assert info.builtin and info.distribution == "sftcore"
        assert info.version == importlib.metadata.version("sftcore") == sftcore.__version__
        module = importlib.import_module(catalogue.plugins[info.name])
        assert builtin_host.pm.get_plugin(info.name) is module, "built-ins are ordinary pluggy plugins"
    assert builtin_host.problems == [] and builtin_host.blocked == []
    assert {c.plugin for c in builtin_host.registry.all()} == set(catalogue.plugins)


def test_registration_records_provenance(clean_plugin_env):
    host = load_host(entry_points=False, extra={"mine": Templates("mine-template")})
    pad = host.registry.get("collator", "pad")
    assert (pad.plugin, pad.distribution, pad.version) == ("pad", "sftcore", sftcore.__version__)
    assert pad.provided_by == f"pad (sftcore {sftcore.__version__})"
    mine = host.registry.get("template", "mine-template")
    assert (mine.plugin, mine.distribution, mine.description) == ("mine", "(local)", "test template mine-template")
    assert [p.name for p in host.plugins][-1] == "mine" and not host.plugins[-1].builtin


def test_entry_point_plugin_records_distribution_and_version(clean_plugin_env):
    plugin = Collators("tail-pad")
    use_entry_points(clean_plugin_env, FakeEntryPoint("tailpad", lambda: plugin, FakeDist("sft-tailpad", "1.2.3")))
    host = load_host()
    component = host.registry.get("collator", "tail-pad")
    assert (component.plugin, component.distribution, component.version) == ("tailpad", "sft-tailpad", "1.2.3")
    assert host.plugins[-1] == host_module.PluginInfo("tailpad", "sft-tailpad", "1.2.3", False, "sft_test_plugin")


# --- name clashes ------------------------------------------------------------------------------


def test_duplicate_name_is_an_error_naming_both_plugins(clean_plugin_env):
    with pytest.raises(PluginError) as info:
        load_host(entry_points=False, extra={"copycat": Templates("alpaca")})
    message = str(info.value)
    assert "template 'alpaca'" in message and "'alpaca'" in message and "'copycat'" in message
    assert "override=True" in message

    with pytest.raises(PluginError, match="'first'.*'second'"):
        load_host(entry_points=False, extra={"first": Templates("same"), "second": Templates("same")})


@pytest.mark.parametrize("order", ["override-first", "override-last"])
def test_override_wins_regardless_of_order(clean_plugin_env, order):
    plugins = {"winner": Templates("alpaca", "x", override=True), "plain": Templates("x")}
    if order == "override-last":
        plugins = dict(reversed(plugins.items()))
    host = load_host(entry_points=False, extra=plugins)
    assert host.registry.get("template", "x").plugin == "winner"
    assert host.registry.get("template", "alpaca").plugin == "winner", "overrides the built-in too"
    assert host.registry.get("template", "alpaca-output").plugin == "alpaca"


@pytest.mark.parametrize("override_first", [True, False])
def test_registry_override_in_either_order(override_first):
    plain = Component("collator", "pad", lambda: None, plugin="pad")
    override = Component("collator", "pad", lambda: None, plugin="fast-pad", override=True)
    registry = Registry()
    for component in (override, plain) if override_first else (plain, override):
        registry.add(component)
    assert registry.get("collator", "pad").plugin == "fast-pad"


def test_two_overrides_are_an_error(clean_plugin_env):
    with pytest.raises(PluginError, match="'one'.*'two'"):
        load_host(
            entry_points=False,
            extra={"one": Templates("alpaca", override=True), "two": Templates("alpaca", override=True)},
        )


def test_registry_rejects_invalid_components():
    registry = Registry()
    with pytest.raises(PluginError, match="unknown stage 'optimizer'"):
        registry.add(Component("optimizer", "adam", lambda: None, plugin="p"))
    with pytest.raises(PluginError, match="without a name"):
        registry.add(Component("collator", "", lambda: None, plugin="p"))
    with pytest.raises(PluginError, match="not callable"):
        registry.add(Component("collator", "pad", "PadCollator", plugin="p"))


# --- kill switches -----------------------------------------------------------------------------


def test_disable_argument_blocks_plugins(clean_plugin_env):
    host = load_host(entry_points=False, disable=["pad", "mine"], extra={"mine": Templates("mine")})
    assert "pad" not in host.registry.names("collator")
    assert "mine" not in host.registry.names("template")
    assert sorted(host.blocked) == ["mine", "pad"]
    assert "pad" not in [p.name for p in host.plugins]
    assert "alpaca" in host.registry.names("template")


def test_disable_env_blocks_plugins(clean_plugin_env):
    clean_plugin_env.setenv("SFT_DISABLE_PLUGINS", " pad , flash,")
    host = load_host(entry_points=False)
    assert host.registry.names("collator") == ["packed"] and host.registry.names("loader") == []
    assert sorted(host.blocked) == ["flash", "pad"]
    assert host.registry.names("masker") == ["full", "response-only"]


def test_disabled_entry_point_is_never_loaded(clean_plugin_env):
    def load():
        raise AssertionError("a blocked plugin must not even be imported")

    use_entry_points(clean_plugin_env, FakeEntryPoint("blocked", load, FakeDist("sft-blocked", "1.0")))
    host = load_host(disable=["blocked"])
    assert host.blocked == ["blocked"] and host.problems == []


# --- broken plugins are isolated ---------------------------------------------------------------


def test_broken_plugins_are_isolated(clean_plugin_env, raising_module):
    use_entry_points(clean_plugin_env, raising_module)
    host = load_host(
        extra={
            "badsig": BadSignature(),
            "typo": UnknownHook(),
            "crashes": RaisesInHook(),
            "good": Templates("good"),
        }
    )
    assert len(host.problems) == 4, host.problems
    broken = ("raiser", "badsig", "typo", "crashes")
    for name in broken:
        lines = [p for p in host.problems if f"plugin '{name}'" in p]
        assert len(lines) == 1, (name, host.problems)
        assert "\n" not in lines[0]
        assert f"SFT_DISABLE_PLUGINS={name}" in lines[0]
    by_name = {name: next(p for p in host.problems if f"plugin '{name}'" in p) for name in broken}
    assert "(sft-raiser 0.3.1) failed to load" in by_name["raiser"]
    assert "ImportError" in by_name["raiser"] and "missing_dependency" in by_name["raiser"]
    assert "registr" in by_name["badsig"]
    assert "register_template" in by_name["typo"]
    assert "failed in register_templates" in by_name["crashes"] and "template table is corrupt" in by_name["crashes"]

    loaded = [p.name for p in host.plugins]
    assert "raiser" not in loaded and "badsig" not in loaded and "typo" not in loaded
    assert "good" in host.registry.names("template")
    assert set(load_catalogue().plugins) <= set(loaded)
    for entry in load_catalogue().components:
        assert entry["name"] in host.registry.names(entry["stage"])


@pytest.mark.parametrize("broken", ["import", "signature", "unknown-hook", "raises"])
def test_strict_mode_makes_plugin_problems_fatal(clean_plugin_env, raising_module, broken):
    extra = {"signature": {"bad": BadSignature()}, "unknown-hook": {"bad": UnknownHook()}, "raises": {"bad": RaisesInHook()}}
    if broken == "import":
        use_entry_points(clean_plugin_env, raising_module)
        kwargs = {}
    else:
        kwargs = {"entry_points": False, "extra": extra[broken]}
    with pytest.raises(PluginError, match="plugin '(raiser|bad)'"):
        load_host(strict=True, **kwargs)

    clean_plugin_env.setenv("SFT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError):
        load_host(**kwargs)
    assert load_host(strict=False, **kwargs).problems, "strict=False overrides the environment"


def test_trace_prints_hook_calls(clean_plugin_env, capsys):
    load_host(entry_points=False)
    assert "sft trace" not in capsys.readouterr().err

    clean_plugin_env.setenv("SFT_TRACE_PLUGINS", "1")
    host = load_host(entry_points=False)
    err = capsys.readouterr().err
    assert "sft trace: register_collators -> pad: pad" in err
    assert "sft trace: register_templates -> alpaca: alpaca, alpaca-output" in err
    assert "sft trace: register_maskers -> masking: response-only, full" in err

    host.call_each("trainer_callbacks", config={})
    assert capsys.readouterr().err == ""  # no built-in implements trainer_callbacks


def test_call_each_collects_answers_per_plugin(clean_plugin_env, capsys):
    class Callbacks:
        @hookimpl
        def trainer_callbacks(self, config):
            return [f"callback for {config['name']}"]

    class Silent:
        @hookimpl
        def trainer_callbacks(self, config):
            return None

    clean_plugin_env.setenv("SFT_TRACE_PLUGINS", "1")
    host = load_host(entry_points=False, extra={"cb": Callbacks(), "silent": Silent()})
    capsys.readouterr()
    assert host.call_each("trainer_callbacks", config={"name": "run"}) == [("cb", ["callback for run"])]
    err = capsys.readouterr().err
    assert "sft trace: trainer_callbacks -> cb: ['callback for run']" in err
    assert "sft trace: trainer_callbacks -> silent: None" in err


# --- unknown names and options -----------------------------------------------------------------


def test_unknown_component_suggests_the_close_name(builtin_host):
    with pytest.raises(UnknownComponentError) as info:
        builtin_host.registry.get("collator", "padd")
    assert str(info.value) == "Unknown collator 'padd'. Did you mean 'pad'? Available: packed, pad"
    assert info.value.exit_code == 2
    assert isinstance(info.value, UsageError)

    with pytest.raises(UnknownComponentError) as info:
        builtin_host.registry.get("template", "alpacca")
    assert str(info.value) == "Unknown template 'alpacca'. Did you mean 'alpaca'? Available: alpaca, alpaca-output, chat"

    with pytest.raises(UnknownComponentError) as info:
        builtin_host.registry.get("masker", "zzz")
    assert str(info.value) == "Unknown masker 'zzz'. Available: full, response-only"


def test_unknown_message_with_more_names():
    assert (
        unknown_message("collator", "packd", ["pad", "packed"])
        == "Unknown collator 'packd'. Did you mean 'packed'? Available: pad, packed"
    )
    assert unknown_message("loader", "flash", []) == "Unknown loader 'flash'. Available: (none)"


def test_did_you_mean_is_one_sentence_or_nothing():
    # Every "unknown name" message (components, config keys, TrainingArguments fields and choices) uses it.
    assert did_you_mean("epoch", ["epochs", "data"]) == " Did you mean 'epochs'?"
    assert did_you_mean(3, ["3e"]) == " Did you mean '3e'?"
    assert did_you_mean("zzz", ["pad", "packed"]) == ""


def test_option_problems_reports_every_problem(builtin_host):
    masker = builtin_host.registry.get("masker", "response-only")
    problems = option_problems(masker, {"truncation": "sideways", "train_on_prompt": 1, "bogus": 2})
    assert problems == [
        "masker 'response-only' option 'truncation' must be one of 'prompt-left', 'right', 'drop', got 'sideways'",
        "masker 'response-only' option 'train_on_prompt' must be bool, got 1",
        "masker 'response-only' has no option 'bogus'. Accepted: truncation, train_on_prompt",
    ]
    assert option_problems(masker, {"truncation": "right", "train_on_prompt": True}) == []

    pad = builtin_host.registry.get("collator", "pad")
    assert option_problems(pad, {"pad_to_multiple_of": "8"}) == [
        "collator 'pad' option 'pad_to_multiple_of' must be int | None, got '8'"
    ]
    assert option_problems(pad, {"pad_to_multiple_of": None, "pad_token_id": 3}) == []
    assert option_problems(pad, {"pad_token_id": True}) == ["collator 'pad' option 'pad_token_id' must be int, got True"]


def test_option_problems_missing_required_and_kwargs():
    def factory(path: str, *, size: int, scale: float = 1.0, mode: Literal["a", "b"] = "a"):
        return None

    component = Component("reader", "custom", factory, plugin="p")
    assert option_problems(component, {"scale": 2}) == [
        "reader 'custom' needs option 'path'",
        "reader 'custom' needs option 'size'",
    ]
    assert option_problems(component, {"path": "x", "size": 1, "scale": True}) == [
        "reader 'custom' option 'scale' must be float, got True"
    ]

    def open_ended(size: int = 1, **rest):
        return None

    assert option_problems(Component("reader", "open", open_ended, plugin="p"), {"anything": 1}) == []


def test_build_raises_one_usage_error_listing_all_problems(builtin_host):
    with pytest.raises(UsageError) as info:
        builtin_host.registry.build("collator", "pad", {"pad_to_multiple_of": "8", "colour": "red"})
    assert "pad_to_multiple_of" in str(info.value) and "colour" in str(info.value)
    assert info.value.exit_code == 2
    collator = builtin_host.registry.build("collator", "pad", {"pad_token_id": 5, "pad_to_multiple_of": 8})
    assert (collator.pad_token_id, collator.multiple) == (5, 8)
