"""Plugin code cannot end, hang, print into or crash the host: a plugin that calls sys.exit, hangs
or prints while loading, makes a malformed register() call, or whose components answer outside
their protocol is named in one line (plugin and distribution) and never gives a traceback."""

from __future__ import annotations

import importlib.metadata
import json
import signal
import sys
import time
import types

import numpy as np
import pytest
from click.testing import CliRunner
from cli_runs import ROWS, json_lines, sft, write_jsonl
from test_host import FakeDist, FakeEntryPoint, Templates, use_entry_points

from sftcore import IGNORE_INDEX, hookimpl
from sftcore.host import plugin_callbacks
from sftcore.cli import cli
from sftcore.data.prepare import build_stage
from sftcore.errors import PluginError, SftError, UsageError
from sftcore.host import load_host
from sftcore.data.pipeline import Formatted, Prepared, format_rows, mask_rows, pick_reader, read_rows
from sftcore_plugins.alpaca import AlpacaTemplate

DISABLE = "disable it with SFT_DISABLE_PLUGINS={0} or --disable-plugin {0}"


@pytest.fixture
def plugin_module(tmp_path, clean_plugin_env):
    """``make(name, source)``: an entry point ``name`` of distribution ``sft-NAME 1.0`` whose module
    is ``source``, the only third-party plugin the host sees."""
    clean_plugin_env.syspath_prepend(str(tmp_path))
    clean_plugin_env.delenv("SFT_PLUGIN_TIMEOUT", raising=False)
    made = []

    def make(name: str, source: str) -> FakeEntryPoint:
        module = f"sft_test_{name}_{len(made)}"
        (tmp_path / f"{module}.py").write_text(source)
        ep = importlib.metadata.EntryPoint(name=name, value=module, group="sft")
        made.append(FakeEntryPoint(name, ep.load, FakeDist(f"sft-{name}", "1.0"), ep.module))
        use_entry_points(clean_plugin_env, *made)
        return made[-1]

    yield make
    for number, ep in enumerate(made):
        sys.modules.pop(f"sft_test_{ep.name}_{number}", None)


def sft_with_entry_points(*args: str):
    """``sft ARGS`` in-process; the host sees the entry points `plugin_module` made."""
    return CliRunner().invoke(cli, list(args), prog_name="sft", catch_exceptions=False)


# --- exits, hangs and prints while loading ---------------------------------------------------------


def test_a_plugin_calling_sys_exit_at_import_is_left_out(plugin_module, monkeypatch):
    plugin_module("quitter", "import sys\nsys.exit(0)\n")
    result = sft_with_entry_points("plugins", "--json")
    assert result.exit_code == 0
    line = f"plugin 'quitter' (sft-quitter 1.0) failed to load: it called sys.exit(0); {DISABLE.format('quitter')}"
    assert result.stderr == f"Warning: {line}\n"
    data = json.loads(result.stdout)
    assert data["problems"] == [line]
    assert "quitter" not in {p["name"] for p in data["plugins"]}


def test_sys_exit_in_a_registration_hook_is_a_plugin_problem(clean_plugin_env):
    class Quits:
        @hookimpl
        def register_templates(self, register):
            register("early", AlpacaTemplate)
            raise SystemExit(3)

    host = load_host(entry_points=False, extra={"quits": Quits()})
    assert host.problems == [
        "plugin 'quits' ((local)) failed in register_templates: it called sys.exit(3); fix the plugin or disable it with SFT_DISABLE_PLUGINS=quits"
    ]
    assert "early" not in host.registry.names("template"), "a failing plugin is left out whole"
    assert "quits" not in [p.name for p in host.plugins]


def test_ctrl_c_while_a_plugin_loads_still_interrupts(plugin_module):
    plugin_module("interrupted", "raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        load_host()


def test_sys_exit_in_trainer_callbacks_is_a_plugin_error(clean_plugin_env):
    class Quits:
        @hookimpl
        def trainer_callbacks(self, config):
            sys.exit(1)

    host = load_host(entry_points=False, extra={"quits": Quits()})
    with pytest.raises(PluginError) as info:
        host.call_each("trainer_callbacks", config={})
    assert str(info.value) == (
        "plugin 'quits' ((local)) failed in trainer_callbacks: it called sys.exit(1); fix the plugin or disable it with SFT_DISABLE_PLUGINS=quits"
    )


needs_free_timer = pytest.mark.skipif(
    not hasattr(signal, "setitimer") or signal.getitimer(signal.ITIMER_REAL)[0] > 0,
    reason="the plugin time limit needs SIGALRM and no other armed timer",
)

HANGS = "import time\ntry:\n    time.sleep(60)\nexcept Exception:  # the limit is not an Exception\n    pass\n"


@needs_free_timer
def test_a_plugin_hanging_at_import_is_named_and_left_out(plugin_module, capsys):
    plugin_module("sleeper", HANGS)
    plugin_module("fine", "from sftcore import hookimpl\n")
    previous = signal.signal(signal.SIGALRM, signal.SIG_IGN)
    try:
        started = time.monotonic()
        with pytest.MonkeyPatch.context() as env:
            env.setenv("SFT_PLUGIN_TIMEOUT", "0.5")
            env.setenv("SFT_TRACE_PLUGINS", "1")
            host = load_host()
        assert time.monotonic() - started < 10
        assert signal.getsignal(signal.SIGALRM) == signal.SIG_IGN, "the previous handler is back"
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0), "the timer is cancelled"
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert host.problems == [
        f"plugin 'sleeper' (sft-sleeper 1.0) did not finish loading in 0.5 s; {DISABLE.format('sleeper')}, "
        "or allow it longer with SFT_PLUGIN_TIMEOUT=SECONDS (0: no limit)"
    ]
    assert "fine" in [p.name for p in host.plugins]
    err = capsys.readouterr().err
    assert "sft trace: loading plugin 'sleeper' (sft-sleeper 1.0)\n" in err
    assert err.index("loading plugin 'sleeper'") < err.index("loading plugin 'fine'")


@needs_free_timer
def test_a_registration_hook_that_hangs_is_named(clean_plugin_env):
    class Hangs:
        @hookimpl
        def register_collators(self, register):
            time.sleep(60)

    clean_plugin_env.setenv("SFT_PLUGIN_TIMEOUT", "0.3")
    host = load_host(entry_points=False, extra={"hangs": Hangs()})
    assert host.problems == [
        "plugin 'hangs' ((local)) did not finish register_collators in 0.3 s; fix the plugin or disable it with SFT_DISABLE_PLUGINS=hangs, "
        "or allow it longer with SFT_PLUGIN_TIMEOUT=SECONDS (0: no limit)"
    ]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


GIVE_UP = "cannot be imported again in this process"
LONGER = "or allow it longer with SFT_PLUGIN_TIMEOUT=SECONDS (0: no limit)"


@needs_free_timer
def test_a_limit_landing_while_a_plugin_imports_a_library_stops_the_command(plugin_module, tmp_path):
    """Python keeps the finished half of an interrupted import (torch's compiled parts): the
    host's own ``import torch`` afterwards fails or registers everything twice, so no going on."""
    (tmp_path / "sft_test_slowlib.py").write_text("import time\ntime.sleep(60)\n")
    plugin_module("heavy", "import sft_test_slowlib\n")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SFT_PLUGIN_TIMEOUT", "0.5")
        result = sft_with_entry_points("plugins")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: plugin 'heavy' (sft-heavy 1.0) did not finish loading in 0.5 s: it was importing sft_test_slowlib, "
        f"which {GIVE_UP}; {DISABLE.format('heavy')}, {LONGER}\n"
    )
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@needs_free_timer
def test_a_limit_landing_while_a_registration_hook_imports_a_library_stops_the_command(clean_plugin_env, tmp_path):
    (tmp_path / "sft_test_slowreg.py").write_text("import time\ntime.sleep(60)\n")
    clean_plugin_env.syspath_prepend(str(tmp_path))
    clean_plugin_env.setenv("SFT_PLUGIN_TIMEOUT", "0.3")

    class Lazy:
        @hookimpl
        def register_collators(self, register):
            import sft_test_slowreg  # noqa: F401

    with pytest.raises(PluginError) as info:
        load_host(entry_points=False, extra={"lazy": Lazy()})
    assert str(info.value) == (
        f"plugin 'lazy' ((local)) did not finish register_collators in 0.3 s: it was importing sft_test_slowreg, "
        f"which {GIVE_UP}; fix the plugin or disable it with SFT_DISABLE_PLUGINS=lazy, {LONGER}"
    )


@pytest.fixture
def package_plugin(tmp_path, clean_plugin_env):
    """Entry point 'pkg' at ``sft_test_pkg.plugin``, which imports a finished library
    (``sft_test_done``), then its own helper, which sleeps ``SFT_TEST_HELPER_SLEEP`` seconds."""
    package = tmp_path / "sft_test_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helper.py").write_text("import os, time\ntime.sleep(float(os.environ.get('SFT_TEST_HELPER_SLEEP', '0')))\n")
    (package / "plugin.py").write_text(
        "import sft_test_done\nfrom sft_test_pkg import helper\nfrom sftcore import hookimpl\n"
        "from sftcore_plugins.alpaca import AlpacaTemplate\n\n\n"
        "@hookimpl\ndef register_templates(register):\n    register('pkg', AlpacaTemplate)\n"
    )
    (tmp_path / "sft_test_done.py").write_text("VALUE = 1\n")
    clean_plugin_env.syspath_prepend(str(tmp_path))
    clean_plugin_env.delenv("SFT_PLUGIN_TIMEOUT", raising=False)
    ep = importlib.metadata.EntryPoint(name="pkg", value="sft_test_pkg.plugin", group="sft")
    use_entry_points(clean_plugin_env, FakeEntryPoint("pkg", ep.load, FakeDist("sft-pkg", "1.0"), ep.module))
    yield clean_plugin_env
    for name in [m for m in sys.modules if m.startswith(("sft_test_pkg", "sft_test_done"))]:
        del sys.modules[name]


@needs_free_timer
def test_a_limit_landing_in_the_plugins_own_code_leaves_it_out_and_forgets_its_modules(package_plugin):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SFT_PLUGIN_TIMEOUT", "0.5")
        env.setenv("SFT_TEST_HELPER_SLEEP", "60")
        host = load_host()
    assert host.problems == [f"plugin 'pkg' (sft-pkg 1.0) did not finish loading in 0.5 s; {DISABLE.format('pkg')}, {LONGER}"]
    assert "pkg" not in [p.name for p in host.plugins]
    assert not [m for m in sys.modules if m.startswith("sft_test_pkg")], "none of the plugin's own modules is left"
    import sft_test_done  # a library the plugin had finished importing stays usable

    assert sft_test_done.VALUE == 1
    again = load_host()  # and the plugin itself imports afresh, whole
    assert again.problems == [] and again.registry.get("template", "pkg").plugin == "pkg"


def test_the_default_limit_leaves_a_slow_library_import_its_time(clean_plugin_env):
    from sftcore.boundary import plugin_timeout

    clean_plugin_env.delenv("SFT_PLUGIN_TIMEOUT", raising=False)
    assert plugin_timeout() == 60


@pytest.mark.parametrize("value", ["soon", "-1", "inf"])
def test_a_bad_timeout_setting_is_a_usage_error(clean_plugin_env, value):
    clean_plugin_env.setenv("SFT_PLUGIN_TIMEOUT", value)
    with pytest.raises(UsageError, match=f"SFT_PLUGIN_TIMEOUT must be a number of seconds \\(0 for no limit\\), got '{value}'"):
        load_host(entry_points=False)


NOISY = """
from sftcore import hookimpl
from sftcore_plugins.alpaca import AlpacaTemplate
print("hello from the import")


@hookimpl
def register_templates(register):
    print("hello from the hook")
    register("noisy", AlpacaTemplate)
"""


def test_printing_while_loading_keeps_plugins_json_clean(plugin_module, monkeypatch):
    plugin_module("noisy", NOISY)
    result = sft_with_entry_points("plugins", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["problems"] == [] and ("template", "noisy") in {(c["stage"], c["name"]) for c in data["components"]}
    assert result.stderr == "hello from the import\nhello from the hook\n"


class NoisyComponents:
    """A template and a masker that print when built and on every call."""

    @hookimpl
    def register_templates(self, register):
        class Noisy(AlpacaTemplate):
            def __init__(self):
                print("building")
                super().__init__()

            def format(self, example):
                print("formatting")
                return super().format(example)

        register("noisy", Noisy)

    @hookimpl
    def register_maskers(self, register):
        from sftcore_plugins.masking import SeparateMasker

        class Noisy(SeparateMasker):
            def batch(self, *args):
                print("masking")
                return super().batch(*args)

        register("noisy", Noisy)


def test_components_printing_keep_preview_json_clean(monkeypatch, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
    result = sft(
        monkeypatch, "preview", "--json", "--model", tiny_model_dir, "--data", data, "--template", "noisy",
        "--masker", "noisy", extra={"noisy": NoisyComponents()},
    )
    assert result.exit_code == 0, result.output
    assert [row["row"] for row in json_lines(result.stdout)] == [1, 2]
    assert result.stderr.count("formatting") == 2 and result.stderr.count("masking") == 1  # one batch
    assert result.stderr.count("building") == 1


# --- malformed register() calls ------------------------------------------------------------------


class Registers:
    """Registers a good template, then makes the call ``args, kwargs``."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs

    @hookimpl
    def register_templates(self, register):
        register("fine-first", AlpacaTemplate)
        try:
            register(*self.args, **self.kwargs)
        except Exception:  # swallowing the refusal does not keep the plugin in
            pass


@pytest.mark.parametrize(
    ("args", "kwargs", "problem"),
    [
        ((42, AlpacaTemplate), {}, "register() needs a non-empty string name, got int 42"),
        (("", AlpacaTemplate), {}, "register() needs a non-empty string name, got str ''"),
        ((None, AlpacaTemplate), {}, "register() needs a non-empty string name, got NoneType None"),
        (("t", "AlpacaTemplate"), {}, "register('t', ...) got a factory that is not callable: str 'AlpacaTemplate'"),
        (("t", AlpacaTemplate), {"description": 7}, "register('t', ...) got a description that is not a string: int 7"),
        (("t", AlpacaTemplate), {"override": "yes"}, "register('t', ...) got override=str 'yes'; it is True or False"),
    ],
)
def test_a_malformed_register_call_leaves_the_plugin_out(clean_plugin_env, args, kwargs, problem):
    host = load_host(entry_points=False, extra={"sloppy": Registers(*args, **kwargs)})
    assert host.problems == [
        f"plugin 'sloppy' ((local)) made a bad call in register_templates: {problem}; "
        "fix the plugin or disable it with SFT_DISABLE_PLUGINS=sloppy"
    ]
    assert "fine-first" not in host.registry.names("template") and "t" not in host.registry.names("template")
    assert "sloppy" not in [p.name for p in host.plugins]
    assert "alpaca" in host.registry.names("template")
    with pytest.raises(PluginError, match="plugin 'sloppy'"):
        load_host(entry_points=False, strict=True, extra={"sloppy": Registers(*args, **kwargs)})


def test_register_42_no_longer_stops_every_command(monkeypatch):
    result = sft(monkeypatch, "plugins", extra={"sloppy": Registers(42, AlpacaTemplate)})
    assert result.exit_code == 0
    assert result.stderr.startswith("Warning: plugin 'sloppy' ((local)) made a bad call in register_templates: ")


def test_name_clashes_stay_errors(clean_plugin_env):
    with pytest.raises(PluginError, match="registered by both 'alpaca' and 'copycat'"):
        load_host(entry_points=False, extra={"copycat": Templates("alpaca")})


# --- trainer_callbacks -------------------------------------------------------------------------


def callbacks_plugin(answer):
    class Answers:
        @hookimpl
        def trainer_callbacks(self, config):
            return answer

    return Answers()


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ("x", "str 'x', not a list of TrainerCallback"),
        (42, "int 42, not a list of TrainerCallback"),
        ({"cb": 1}, "dict {'cb': 1}, not a list of TrainerCallback"),
        ([42], "int 42 in its list, not a TrainerCallback"),
        ([dict], "type <class 'dict'> in its list, not a TrainerCallback"),
    ],
)
def test_trainer_callbacks_answers_are_checked(clean_plugin_env, answer, problem):
    host = load_host(entry_points=False, extra={"cbs": callbacks_plugin(answer)})
    with pytest.raises(PluginError) as info:
        plugin_callbacks(host, {})
    assert str(info.value) == (
        f"plugin 'cbs' ((local)) returned from trainer_callbacks {problem}; fix the plugin or disable it with SFT_DISABLE_PLUGINS=cbs"
    )


def test_trainer_callbacks_take_instances_classes_and_tuples(clean_plugin_env):
    from transformers import TrainerCallback

    instance = TrainerCallback()
    host = load_host(entry_points=False, extra={"a": callbacks_plugin([instance, TrainerCallback]), "b": callbacks_plugin(())})
    assert plugin_callbacks(host, {}) == [instance, TrainerCallback]


@pytest.mark.slow
def test_a_run_with_bad_callbacks_stops_in_one_line(monkeypatch, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
    result = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", tmp_path / "out", "--max-steps", "1",
        "--no-progress", extra={"cbs": callbacks_plugin("x")},
    )
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        "Error: plugin 'cbs' ((local)) returned from trainer_callbacks str 'x', not a list of TrainerCallback; "
        "fix the plugin or disable it with SFT_DISABLE_PLUGINS=cbs"
    )


# --- component answers -------------------------------------------------------------------------

ROW = {"instruction": "Say hi.", "input": "", "output": "hi"}
FEATURES = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}]


class Registering:
    """Registers ``factory`` as the component ``name`` ('bad') of ``stage``."""

    def __init__(self, stage: str, factory, name: str = "bad") -> None:
        self.stage, self.factory, self.name = stage, factory, name

    def _register(self, stage, register):
        if stage == self.stage:
            register(self.name, self.factory)

    @hookimpl
    def register_templates(self, register):
        self._register("template", register)

    @hookimpl
    def register_maskers(self, register):
        self._register("masker", register)

    @hookimpl
    def register_collators(self, register):
        self._register("collator", register)

    @hookimpl
    def register_model_loaders(self, register):
        self._register("loader", register)

    @hookimpl
    def register_data_readers(self, register):
        self._register("reader", register)


def answering(method: str, value, **attributes):
    """A factory whose component's ``method`` returns ``value`` (a callable: its result)."""

    def call(self, *args, **kwargs):
        return value() if callable(value) and not isinstance(value, type) else value

    return lambda: type("Answers", (), {method: call, **attributes})()


def tensor(values, **kwargs):
    import torch

    return torch.tensor(values, **kwargs)


def batch(**overrides):
    import torch

    out = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[IGNORE_INDEX, 6, 7]])}
    out.update({k: v() for k, v in overrides.items()})
    return {k: v for k, v in out.items() if v is not None}


def model():
    import torch

    module = torch.nn.Linear(1, 1)
    module.config = types.SimpleNamespace()
    return module


TOKENIZER = types.SimpleNamespace(pad_token_id=0, model_max_length=64, decode=lambda ids, **kw: "")


def masked(**row):
    return {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], **row}


def use(stage: str, host, path, call: str = ""):
    """Drive the component 'bad' of ``stage`` the way the host does."""
    config = {
        stage: {"name": "bad", "options": {}},
        "template": {"name": "bad" if stage == "template" else "alpaca", "options": {}},
    }
    if stage == "template" and call == "format_prompt":
        return build_stage(host, config, "template").format_prompt(ROW)
    if stage == "template":
        return format_rows(build_stage(host, config, "template"), [(1, ROW)], str(path), "skip", Prepared())
    if stage == "reader" and call == "suffix":  # a suffix no declared reader claims: 'bad' is built to learn its own
        return pick_reader(host.registry, str(path.with_suffix(".csv")))
    if stage == "reader":
        rows = read_rows(build_stage(host, config, "reader"), str(path))
        return format_rows(build_stage(host, config, "template"), rows, str(path), "skip", Prepared())
    if stage == "masker":
        return mask_rows(build_stage(host, config, "masker"), [Formatted(1, "p", "r")], None, 64, Prepared())
    if stage == "collator":
        return build_stage(host, config, "collator")(FEATURES)
    if call == "load_tokenizer":
        return build_stage(host, config, "loader").load_tokenizer("m")
    return build_stage(host, config, "loader").load("m")


def raises_midway():
    yield 1, ROW
    raise RuntimeError("lost the file handle")


WRONG = {
    # templates: format() -> (str, str), format_prompt() -> str
    "template-str": ("template", answering("format", "prompt and response"), "", "format() returned str"),
    "template-1-tuple": ("template", answering("format", ("p",)), "", "format() returned tuple ('p',), not a (prompt"),
    "template-3-tuple": ("template", answering("format", ("p", "r", "x")), "", "format() returned tuple"),
    "template-int-prompt": ("template", answering("format", (1, "r")), "", "format() returned a prompt of int 1, not a string"),
    "template-none-response": ("template", answering("format", ("p", None)), "", "a response of NoneType None"),
    "template-none": ("template", answering("format", None), "", "format() returned NoneType None"),
    "template-prompt-int": ("template", answering("format", ("p", "r"), format_prompt=lambda self, ex: 5), "format_prompt",
                            "format_prompt() returned int 5, not a string"),
    "template-factory-none": ("template", lambda: None, "", "its factory returned NoneType None, which has no format() method"),
    "template-factory-exits": ("template", lambda: sys.exit(2), "", "its factory called sys.exit(2)"),
    "template-exits": ("template", answering("format", lambda: sys.exit(3)), "", "it called sys.exit(3)"),
    # readers: read() -> iterator of (int, mapping | DataError)
    "reader-none": ("reader", answering("read", None, suffixes=(".jsonl",)), "", "read() returned NoneType None, not an iterator"),
    "reader-bare-rows": ("reader", answering("read", [ROW], suffixes=(".jsonl",)), "", "read() yielded dict"),
    "reader-str-number": ("reader", answering("read", [("1", ROW)]), "", "a row number of str '1', not an int"),
    "reader-list-row": ("reader", answering("read", [(1, ["hi"])]), "", "read() yielded row 1 as list ['hi'], not a mapping"),
    "reader-raises": ("reader", answering("read", raises_midway), "", "failed reading"),
    "reader-suffixes": ("reader", answering("read", [], suffixes=5), "suffix", "suffixes is int 5, not a tuple of strings"),
    # maskers: a mapping of int lists
    "masker-list": ("masker", answering("__call__", [5, 6, 7]), "", "returned list [5, 6, 7] for row 1, not a mapping"),
    "masker-none": ("masker", answering("__call__", None), "", "returned NoneType None for row 1"),
    "masker-float-ids": ("masker", answering("__call__", masked(input_ids=[5.0, 6.0, 7.9])), "", "input_ids holds float 5.0"),
    "masker-bool-labels": ("masker", answering("__call__", masked(labels=[IGNORE_INDEX, True, True])), "", "labels holds bool True"),
    "masker-numpy-floats": ("masker", answering("__call__", masked(input_ids=list(np.array([5.0, 6.0, 7.0])))), "",
                            "input_ids holds float64 "),
    "masker-negative-id": ("masker", answering("__call__", masked(input_ids=[-5, 6, 7])), "", "input_ids holds -5; ids are >= 0"),
    "masker-label-minus-101": ("masker", answering("__call__", masked(labels=[-101, 6, 7])), "", "labels holds -101; labels are >= 0 or -100"),
    "masker-str-ids": ("masker", answering("__call__", masked(input_ids="567")), "", "input_ids is str '567', not a list of ints"),
    "masker-truncated": ("masker", answering("__call__", masked(truncated=5)), "", "truncated is int 5"),
    "masker-short-batch": ("masker", answering("batch", [], __call__=lambda *a: masked()), "", "batch() returned 0 results for 1 rows"),
    # collators: a mapping of 2-D integer tensors of one shape
    "collator-list": ("collator", answering("__call__", lambda: [batch()]), "", "returned list [{...}], not a mapping of tensors"),
    "collator-no-labels": ("collator", answering("__call__", lambda: batch(labels=lambda: None)), "", "a batch without labels"),
    "collator-lists": ("collator", answering("__call__", {"input_ids": [[5, 6]], "labels": [[5, 6]]}), "",
                       "returned input_ids as list [[...]], not a torch tensor"),
    "collator-float-labels": ("collator", answering("__call__", lambda: batch(labels=lambda: tensor([[0.5, 6.0, 7.0]]))), "",
                              "returned labels of dtype torch.float32"),
    "collator-1d": ("collator", answering("__call__", lambda: batch(input_ids=lambda: tensor([5, 6, 7]))), "",
                    "returned input_ids of shape (3,); a batch is 2-D"),
    "collator-shapes": ("collator", answering("__call__", lambda: batch(labels=lambda: tensor([[6, 7]]))), "",
                        "returned input_ids of shape (1, 3) but labels of shape (1, 2)"),
    "collator-negative-id": ("collator", answering("__call__", lambda: batch(input_ids=lambda: tensor([[5, -6, 7]]))), "",
                             "returned input_ids holding -6; ids are >= 0"),
    "collator-label-minus-1": ("collator", answering("__call__", lambda: batch(labels=lambda: tensor([[-100, -1, 7]]))), "",
                               "returned labels holding -1; labels are >= 0 or -100"),
    # loaders: load() -> (torch.nn.Module with a config, tokenizer with a pad id)
    "loader-model-only": ("loader", answering("load", model), "", "load() returned Linear"),
    "loader-not-a-module": ("loader", answering("load", (object(), TOKENIZER)), "", "a model of object"),
    "loader-str-pad": ("loader", answering("load", lambda: (model(), types.SimpleNamespace(**{**vars(TOKENIZER), "pad_token_id": "0"}))),
                       "", "load() returned a tokenizer whose pad_token_id is str '0', not an int or None"),
    "loader-not-a-tokenizer": ("loader", answering("load", lambda: (model(), "gpt2")), "",
                               "load() returned str 'gpt2', not a tokenizer with decode() and model_max_length"),
    "loader-tokenizer-none": ("loader", answering("load", None, load_tokenizer=lambda self, path: None), "load_tokenizer",
                              "load_tokenizer() returned NoneType None, not a tokenizer"),
    # raising what no contract allows: the component's failure, named, not a traceback
    "template-raises": ("template", answering("format", lambda: 1 / 0), "", "raised ZeroDivisionError: division by zero"),
    "masker-raises": ("masker", answering("__call__", lambda: {}["input_ids"]), "", "raised KeyError: 'input_ids'"),
    "collator-raises": ("collator", answering("__call__", lambda: [][0]), "", "raised IndexError: list index out of range"),
    "loader-raises": ("loader", answering("load", lambda: open("/nonexistent/model")), "", "raised FileNotFoundError"),
}


@pytest.mark.parametrize("variant", list(WRONG))
def test_a_wrong_answer_is_one_line_naming_the_plugin(clean_plugin_env, tmp_path, variant):
    stage, factory, call, problem = WRONG[variant]
    path = write_jsonl(tmp_path / "d.jsonl", [ROW])
    host = load_host(entry_points=False, extra={"bad": Registering(stage, factory)})
    assert host.problems == []
    with pytest.raises(SftError) as info:
        use(stage, host, path, call)
    message = str(info.value)
    assert isinstance(info.value, PluginError), message
    assert message.startswith(f"{stage} 'bad' of plugin 'bad' ((local)): "), message
    assert problem in message
    assert message.endswith("; fix the plugin or disable it with SFT_DISABLE_PLUGINS=bad")
    assert "\n" not in message


def test_a_template_failing_on_a_row_is_still_a_bad_row(clean_plugin_env, tmp_path):
    """A template's KeyError/TypeError/ValueError means "this row cannot be formatted": the host
    counts or reports that row (format_rows), so the boundary lets those through."""
    host = load_host(entry_points=False, extra={"bad": Registering("template", answering("format", lambda: {}["question"]))})
    prepared = Prepared()
    assert use("template", host, write_jsonl(tmp_path / "d.jsonl", [ROW])) == []  # use() formats under "skip"
    formatted = format_rows(build_stage(host, {"template": {"name": "bad", "options": {}}}, "template"),
                            [(1, ROW)], "d.jsonl", "skip", prepared)
    assert formatted == [] and prepared.skipped == {"bad-row": 1}


def test_right_answers_pass_the_boundary(builtin_host, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROW])
    config = {stage: {"name": name, "options": {}} for stage, name in [("template", "alpaca"), ("collator", "pad")]}
    prepared = Prepared()
    rows = read_rows(pick_reader(builtin_host.registry, str(path)), str(path))
    items = format_rows(build_stage(builtin_host, config, "template"), rows, str(path), "error", prepared)
    assert [(i.row, i.response) for i in items] == [(1, "hi")]
    numpy_ids = answering("__call__", masked(input_ids=list(np.array([5, 6, 7]))))  # numpy ints are ints
    host = load_host(entry_points=False, extra={"np": Registering("masker", numpy_ids)})
    mask_rows(build_stage(host, {"masker": {"name": "bad", "options": {}}}, "masker"), items, None, 64, prepared)
    assert prepared.rows[0]["input_ids"] == [5, 6, 7]
    assert build_stage(builtin_host, config, "collator")(FEATURES)["input_ids"].tolist() == [[5, 6, 7]]


def test_a_bad_masker_stops_preview_in_one_line(monkeypatch, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:1])
    result = sft(
        monkeypatch, "preview", "--json", "--model", tiny_model_dir, "--data", data, "--masker", "bad",
        extra={"bad": Registering("masker", answering("__call__", masked(input_ids=[5.0, 6.0, 7.0])))},
    )
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (
        "Error: masker 'bad' of plugin 'bad' ((local)): output for row 1: input_ids holds float 5.0; "
        "token ids and labels are ints; fix the plugin or disable it with SFT_DISABLE_PLUGINS=bad\n"
    )


# --- readers picked by suffix ------------------------------------------------------------------


class NeedsDelimiter:
    suffixes = (".csv",)

    def __init__(self, delimiter: str) -> None:
        self.delimiter = delimiter

    def read(self, path):
        return iter(())


class FailsToBuild:
    suffixes = (".csv",)

    def __init__(self) -> None:
        raise RuntimeError("no csv module")


@pytest.mark.parametrize("factory", [NeedsDelimiter, FailsToBuild])
def test_a_reader_that_cannot_be_built_bare_leaves_jsonl_detection_alone(clean_plugin_env, factory):
    from sftcore.data.pipeline import reader_component
    from sftcore_plugins.readers import JsonLinesReader

    host = load_host(entry_points=False, extra={"csvp": Registering("reader", factory)})
    assert isinstance(pick_reader(host.registry, "data.jsonl"), JsonLinesReader)
    assert reader_component(host.registry, "data.jsonl").name == "jsonl"


def test_a_reader_picked_by_suffix_that_needs_an_option_says_how_to_give_it(clean_plugin_env):
    host = load_host(entry_points=False, extra={"csvp": Registering("reader", NeedsDelimiter)})
    with pytest.raises(UsageError) as info:
        pick_reader(host.registry, "data.csv")
    assert str(info.value) == (
        "data.csv: the reader 'bad' of plugin 'csvp' ((local)) reads '.csv' files but needs option 'delimiter'; "
        "name it with its options in the config (reader: {name: bad, options: {...}})"
    )


def test_a_reader_picked_by_suffix_whose_factory_fails_is_its_plugins_error(clean_plugin_env):
    host = load_host(entry_points=False, extra={"csvp": Registering("reader", FailsToBuild)})
    with pytest.raises(PluginError) as info:
        pick_reader(host.registry, "data.csv")
    assert str(info.value) == (
        "reader 'bad' of plugin 'csvp' ((local)): its factory raised RuntimeError: no csv module; "
        "fix the plugin or disable it with SFT_DISABLE_PLUGINS=csvp"
    )


class SuffixProperty:
    """A reader meeting the protocol with a property: its class declares nothing, so it is built to ask."""

    @property
    def suffixes(self):
        return (".csv",)

    def read(self, path):
        return iter(())


class NeedsSep:
    """Declares no suffixes and cannot be built bare: passed over, named only if nothing matches."""

    def __init__(self, sep: str) -> None:
        self.suffixes = (".psv",)

    def read(self, path):
        return iter(())


def test_readers_that_declare_no_suffixes_on_their_class_neither_stop_others_nor_are_lost(clean_plugin_env):
    host = load_host(entry_points=False, extra={
        "prop": Registering("reader", SuffixProperty, "prop"), "needy": Registering("reader", NeedsSep, "needy"),
    })
    from sftcore_plugins.readers import JsonLinesReader

    assert isinstance(pick_reader(host.registry, "data.jsonl"), JsonLinesReader)
    assert isinstance(pick_reader(host.registry, "data.csv"), SuffixProperty)
    with pytest.raises(UsageError) as info:
        pick_reader(host.registry, "data.tsv")
    message = str(info.value)
    assert message.startswith("data.tsv: no reader for '.tsv' files; known: .csv, ")
    assert "readers not built without options: needy (data.tsv: the reader 'needy' of plugin 'needy' ((local)) " \
        "cannot be built without options: needs option 'sep'" in message, message


# --- a tokenizer without a pad token -----------------------------------------------------------

NO_PAD = types.SimpleNamespace(**{**vars(TOKENIZER), "pad_token_id": None})


def test_a_loader_may_return_a_tokenizer_without_a_pad_id(clean_plugin_env):
    host = load_host(entry_points=False, extra={"bad": Registering("loader", answering("load", lambda: (model(), NO_PAD)))})
    _, tokenizer = build_stage(host, {"loader": {"name": "bad", "options": {}}}, "loader").load("m")
    assert tokenizer.pad_token_id is None


def test_without_a_pad_id_the_pad_collator_refuses_in_one_line_and_packed_builds(builtin_host):
    with pytest.raises(UsageError) as info:
        build_stage(builtin_host, {"collator": {"name": "pad", "options": {}}}, "collator", pad_token_id=None)
    assert str(info.value) == (
        "collator 'pad' option 'pad_token_id' must be int, got None: the tokenizer has no pad token; use a loader "
        "that adds one, give the collator a pad_token_id option, or use a padding-free collator (packed)"
    )
    packed = build_stage(builtin_host, {"collator": {"name": "packed", "options": {}}}, "collator", pad_token_id=None)
    assert packed(FEATURES)["input_ids"].tolist() == [[5, 6, 7]]
