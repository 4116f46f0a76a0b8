"""docs/plugins.md is executed: the tutorial for real (files written, the project pip-installed,
the shown commands run and their shown output matched), every reference example run, and the
reference kept in step with sftcore/hookspecs.py and sftcore/protocols.py."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from sftcore import IGNORE_INDEX, hookspecs, protocols
from sftcore.errors import DataError
from sftcore.registry import STAGES
from sftcore.testing import check_mask_invariants, make_host

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
TUTORIAL, HOOKS, PROTOCOLS = "Tutorial: a plugin that replaces the template", "Hook reference", "Protocol reference"
ROWS = [
    {"instruction": "Name a primary colour.", "output": "Blue."},
    {"instruction": "What is 2 + 2?", "input": "", "output": "4"},
    {"instruction": "Translate to French.", "input": "good morning", "output": "Bonjour."},
]


@dataclass
class Block:
    lang: str
    attrs: dict[str, str]
    code: str
    section: str  # the ## heading above it
    heading: str  # the ### heading above it ("" when none)
    line: int

    @property
    def id(self) -> str:
        return f"{self.heading or self.section}:{self.line}"


def parse(text: str) -> tuple[list[Block], dict[str, list[str]]]:
    """Fenced code blocks with their place, and the ### headings of each ## section."""
    blocks: list[Block] = []
    headings: dict[str, list[str]] = {}
    section = heading = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            info = line[3:].split()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            attrs = dict(item.split("=", 1) for item in info[1:])
            blocks.append(Block(info[0] if info else "", attrs, "\n".join(lines[i + 1 : end]) + "\n", section, heading, i + 1))
            i = end + 1
            continue
        if line.startswith("## "):
            section, heading = line[3:].strip(), ""
            headings[section] = []
        elif line.startswith("### "):
            heading = line[4:].strip()
            headings[section].append(heading)
        i += 1
    return blocks, headings


BLOCKS, HEADINGS = parse(DOC.read_text(encoding="utf-8"))


def hookspec_signatures() -> dict[str, str]:
    specs = {n: f for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, "sft_spec")}
    return {name: f"{name}({', '.join(inspect.signature(f).parameters)})" for name, f in specs.items()}


def protocol_classes() -> dict[str, type]:
    return {
        name: cls
        for name, cls in vars(protocols).items()
        if inspect.isclass(cls) and getattr(cls, "_is_protocol", False) and cls.__module__ == protocols.__name__
    }


def section_text(title: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n### {title}\n")
    following = text.find("\n### ", start + 1)
    following_h2 = text.find("\n## ", start + 1)
    ends = [e for e in (following, following_h2) if e != -1]
    return text[start : min(ends) if ends else len(text)]


# --- the reference keeps step with the code ------------------------------------------------


def test_every_hookspec_is_documented_under_its_signature():
    missing = set(hookspec_signatures().values()) - set(HEADINGS[HOOKS])
    assert not missing, f"hooks without a '### name(args)' heading in {DOC.name}: {sorted(missing)}"


def test_every_documented_hook_exists_with_those_arguments():
    unknown = set(HEADINGS[HOOKS]) - set(hookspec_signatures().values())
    assert not unknown, f"{DOC.name} documents hooks sftcore/hookspecs.py does not have: {sorted(unknown)}"


def test_every_protocol_is_documented_with_its_members():
    classes = protocol_classes()
    assert set(HEADINGS[PROTOCOLS]) == set(classes)
    for name, cls in classes.items():
        text = section_text(name)
        for member in protocol_members(cls):
            shown = f"{member}(" if callable(getattr(cls, member, None)) else f"`{member}`"
            assert shown in text or (member == "__call__" and f"({', '.join(_call_args(cls))})" in text), (name, member)


def protocol_members(cls: type) -> set[str]:
    names = {*vars(cls), *getattr(cls, "__annotations__", {})}
    return {n for n in names if not n.startswith("_") or n == "__call__"}


def _call_args(cls: type) -> list[str]:
    return [p for p in inspect.signature(cls.__call__).parameters if p != "self"]


def test_each_hook_and_protocol_section_has_one_python_example():
    for section in (HOOKS, PROTOCOLS):
        for heading in HEADINGS[section]:
            found = [b for b in BLOCKS if b.section == section and b.heading == heading and b.lang == "python"]
            assert len(found) == 1, f"{heading}: {len(found)} python examples"


# --- every reference example runs -----------------------------------------------------------


def as_module(block: Block) -> types.ModuleType:
    module = types.ModuleType(f"docs_example_{block.line}")
    exec(compile(block.code, f"{DOC}:{block.line}", "exec"), module.__dict__)
    return module


HOOK_EXAMPLES = [b for b in BLOCKS if b.section == HOOKS and b.lang == "python"]
PROTOCOL_EXAMPLES = [b for b in BLOCKS if b.section == PROTOCOLS and b.lang == "python"]


@pytest.fixture
def exercise(tiny_tokenizer, tiny_model_dir, tmp_path):
    """Use a freshly registered component of a stage the way a run would."""
    builtins = make_host()
    alpaca, response_only = builtins.registry.build("template", "alpaca"), builtins.registry.build("masker", "response-only")

    def template(component):
        check_mask_invariants(component, response_only, tiny_tokenizer, ROWS)

    def masker(component):
        check_mask_invariants(alpaca, component, tiny_tokenizer, ROWS)

    def collator(component):
        features = [response_only(*alpaca.format(row), tiny_tokenizer, 256) for row in ROWS]
        batch = component(features)
        for i, feature in enumerate(features):
            n = len(feature["labels"])
            assert batch["labels"][i, :n].tolist() == feature["labels"]
            assert batch["input_ids"][i, :n].tolist() == feature["input_ids"]
            assert set(batch["labels"][i, n:].tolist()) <= {IGNORE_INDEX}

    def loader(component):
        model, tokenizer = component.load(str(tiny_model_dir))
        assert tokenizer.padding_side == "right" and tokenizer.pad_token_id is not None
        assert model.config.pad_token_id == tokenizer.pad_token_id

    samples = {".tsv": "instruction\toutput\nName a colour.\tBlue.\nonly one column\n"}

    def reader(component):
        suffix = component.suffixes[0]
        path = tmp_path / f"rows{suffix}"
        path.write_text(samples[suffix], encoding="utf-8")
        rows = list(component.read(str(path)))
        assert rows[0] == (2, {"instruction": "Name a colour.", "output": "Blue."})
        assert rows[1][0] == 3 and isinstance(rows[1][1], DataError)
        with pytest.raises(DataError):
            list(component.read(str(tmp_path / f"missing{suffix}")))

    def adapter(component):
        from sftcore.model.adapters import parameter_counts

        model, tokenizer = builtins.registry.build("loader", "flash").load(str(tiny_model_dir))
        trainable, total = parameter_counts(component.apply(model, tokenizer))
        assert 0 < trainable < total

    return {"template": template, "masker": masker, "collator": collator, "loader": loader, "reader": reader, "adapter": adapter}


PROTOCOL_OF = {
    "template": protocols.Template,
    "masker": protocols.Masker,
    "collator": protocols.Collator,
    "loader": protocols.ModelLoader,
    "reader": protocols.DataReader,
    "adapter": protocols.Adapter,
}


@pytest.mark.parametrize("block", HOOK_EXAMPLES, ids=lambda b: b.id)
def test_hook_example_registers_a_working_component(block, sft_host, exercise):
    module = as_module(block)
    host = sft_host(module)
    ours = [c for c in host.registry.all() if c.plugin == module.__name__]
    hook = block.heading.partition("(")[0]
    if hook == "trainer_callbacks":
        from transformers import TrainerCallback

        [callbacks] = [r for plugin, r in host.call_each("trainer_callbacks", config={"training": {}}) if plugin == module.__name__]
        assert callbacks and all(isinstance(c, TrainerCallback) for c in callbacks)
        return
    assert ours, f"the example under {block.id} registered nothing"
    for component in ours:
        if block.heading:
            assert STAGES[component.stage] == hook, f"{block.id} registers a {component.stage}"
        built = component.factory()
        assert isinstance(built, PROTOCOL_OF[component.stage])
        exercise[component.stage](built)


@pytest.fixture
def tiny_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "sftcore-cache"))


@pytest.mark.parametrize("block", PROTOCOL_EXAMPLES, ids=lambda b: b.id)
def test_protocol_example_runs(block, tiny_cache):
    namespace = vars(as_module(block))
    protocol = protocol_classes()[block.heading]
    assert any(isinstance(value, protocol) for value in namespace.values()), f"{block.id} shows no {block.heading}"


# --- the tutorial, for real -------------------------------------------------------------------

STEP = "@@sft-docs-step {}@@"


def console_steps() -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for every `$ ` line of the tutorial's console blocks."""
    steps: list[tuple[str, list[str]]] = []
    for block in BLOCKS:
        if block.section != TUTORIAL or block.lang != "console":
            continue
        for line in block.code.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif line.strip():
                steps[-1][1].append(line)
    return steps


def unmatched(expected: list[str], output: str) -> list[str]:
    """Expected lines not found in order in the output; spaces are collapsed, `*` matches anything
    and a line `...` stands for lines left out."""
    actual = [" ".join(line.split()) for line in output.splitlines()]
    position, missing = 0, []
    for pattern in (" ".join(line.split()) for line in expected if line.strip() != "..."):
        regex = re.compile(".*".join(map(re.escape, pattern.split("*"))))
        hit = next((i for i in range(position, len(actual)) if regex.fullmatch(actual[i])), None)
        if hit is None:
            missing.append(pattern)
        else:
            position = hit + 1
    return missing


def test_the_output_matcher_wants_every_shown_line_in_order():
    output = "STAGE NAME\ntemplate  qa   qa (sft-plugin-qa 0.1.0)\n[[Blue.</s>]]\nrows: 3 used of 3 read\n"
    assert unmatched(["STAGE  NAME", "...", "template qa *", "[[Blue.</s>]]"], output) == []
    assert unmatched(["rows: 3 used*"], output) == []
    assert unmatched(["[[Blue.</s>]]", "template qa *"], output) == ["template qa *"]
    assert unmatched(["[[Blue]]"], output) == ["[[Blue]]"]


def test_the_tutorial_shows_its_plugin_listed_and_its_tests_passing():
    shown = dict(console_steps())
    assert any("qa (sft-plugin-qa 0.1.0)" in line for line in shown["sft plugins"])
    assert shown["python -m pytest -q tests"] == ["3 passed*"]


@pytest.fixture
def tutorial_dir(tmp_path):
    project = tmp_path / "sft-plugin-qa"
    for block in BLOCKS:
        if block.section == TUTORIAL and "file" in block.attrs:
            path = project / block.attrs["file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.code, encoding="utf-8")
    return project


@pytest.mark.slow
def test_the_tutorial_runs_as_written(tutorial_dir, tmp_path, install_isolated):
    install, *steps = console_steps()
    assert install == ("python -m pip install -e .", []) and steps[0][0] == "sft plugins"
    # The reader's `pip install -e .` goes into their environment; here the project goes into a
    # directory that only these subprocesses have on PYTHONPATH (not editable: a .pth file works
    # only in a site directory), and every later step runs as written.
    installed = install_isolated(tutorial_dir)
    script = "set -eo pipefail\n" + "".join(f"echo '{STEP.format(i)}'\n{c}\n" for i, (c, _) in enumerate(steps))
    env = {k: v for k, v in installed.items() if not k.startswith("SFT_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["SFT_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run(["bash", "-c", script], cwd=tutorial_dir, env=env, capture_output=True, text=True)
    outputs = re.split(r"@@sft-docs-step \d+@@\n", done.stdout)[1:]
    ran = len(outputs)
    assert done.returncode == 0, f"step {ran - 1} `{steps[ran - 1][0]}` failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert ran == len(steps)
    for (command, expected), output in zip(steps, outputs):
        assert not unmatched(expected, output), f"`{command}` printed:\n{output}\nwithout: {unmatched(expected, output)}"

    listing = subprocess.run([str(Path(sys.executable).with_name("sft")), "plugins", "--json"], env=env, capture_output=True, text=True)
    [qa] = [c for c in json.loads(listing.stdout)["components"] if c["name"] == "qa"]
    assert (qa["stage"], qa["plugin"], qa["distribution"], qa["version"]) == ("template", "qa", "sft-plugin-qa", "0.1.0")
