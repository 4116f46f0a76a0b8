"""Helpers shared by the end-to-end tests of `sft run`, `sft preview`, `sft generate` and the config.

Commands run in-process on the built-in plugins (plus any throwaway plugin a test passes), never
on whatever plugins happen to be installed; `SFT` is the installed script, for the few tests
that need a real process.
"""

from __future__ import annotations

import atexit
import csv
import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path

from click.testing import CliRunner, Result

from sftcore.cli import cli
from sftcore.host import load_host
from sftcore.testing import clear_plugin_env

SFT = str(Path(sys.executable).with_name("sft"))
# In-process runs cache here, never in the user's ~/.cache/sftcore.
CACHE = tempfile.mkdtemp(prefix="sft-test-cache-")
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)

ROWS = [
    {"instruction": "Give the opposite of the word 'hot'.", "input": "", "output": "The opposite of 'hot' is 'cold'."},
    {"instruction": "Translate the colour into French.", "input": "blue", "output": "bleu"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5"},
    {"instruction": "Name a fruit that is yellow.", "input": "", "output": "- banana\n- lemon"},
    {"instruction": "Give the plural of the word.", "input": "mouse", "output": "mice"},
    {"instruction": "Say hello in Spanish.", "input": "", "output": "hola"},
]
# Far over any small max_length: the row a `--masker-opt truncation=drop` run must drop.
LONG_ROW = {"instruction": "Repeat the word.", "input": "", "output": " ".join(["again"] * 200)}


def sft(monkeypatch, *args: object, extra: dict | None = None) -> Result:
    """``sft ARGS`` in-process; ``extra`` adds plugins ``{name: plugin}`` next to the built-ins."""
    clear_plugin_env(monkeypatch)
    monkeypatch.setenv("SFT_CACHE_DIR", CACHE)
    monkeypatch.setattr("sftcore.commands.common.load_host", functools.partial(load_host, entry_points=False, extra=extra))
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="sft", catch_exceptions=False)


# Two steps with a complete checkpoint after each: the run the output-directory tests work on.
TWO_STEPS = ("--max-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--set", "save_steps=1", "--no-progress")


def run_two_steps(monkeypatch, model, data, output, *extra, load: bool = False) -> Result:
    """`sft run` of `TWO_STEPS` into ``output``; unless ``load``, it must stop before any model loads."""
    if not load:
        forbid_model_loading(monkeypatch)
    return sft(monkeypatch, "run", "--model", model, "--data", data, "--output", output, *TWO_STEPS, *extra)


def forbid_model_loading(monkeypatch) -> None:
    """Make any model or tokenizer load through the built-in loader fail the test."""
    from sftcore_plugins.flash import FlashLoader

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(FlashLoader, "load", refuse)
    monkeypatch.setattr(FlashLoader, "load_tokenizer", refuse)


def loss_points(output: Path, curve: str = "loss") -> list[tuple[int, float]]:
    """``(step, value)`` of a run's ``loss.csv`` (or ``eval_loss.csv`` with ``curve="eval_loss"``)."""
    with open(Path(output) / f"{curve}.csv", newline="") as handle:
        return [(int(row["step"]), float(row[curve])) for row in csv.DictReader(handle)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pretend_packages(monkeypatch, *, missing: tuple[str, ...] = (), present: tuple[str, ...] = ()) -> None:
    """As if ``missing`` were not installed and ``present`` were, for the adapters' package checks."""
    from sftcore.model import adapters

    real = adapters.importlib.util.find_spec
    fake = {**{name: None for name in missing}, **{name: object() for name in present}}
    monkeypatch.setattr(adapters.importlib.util, "find_spec", lambda name, *a: fake[name] if name in fake else real(name, *a))

