"""The run configuration: YAML file + command-line overrides, validated all at once.

Shape (every key optional; `sft run` with none trains the bundled demo)::

    model: path/to/checkpoint
    data: train.jsonl
    eval_data: null              # held-out rows, same format; or eval_split: 0.05 (a fraction of data)
    output: runs/my-run
    max_length: 1024
    on_bad_row: error            # or skip
    on_duplicate: keep           # a row repeating an earlier prompt and response: keep, skip or error
    cache_dir: null              # prepared-data cache; default <sftcore cache>/prepared, false: none
    template: alpaca             # a name, or {name: alpaca, options: {...}}
    masker: response-only
    collator: pad
    loader: flash
    reader: null                 # picked by file suffix unless named
    training:                    # any transformers.TrainingArguments field
      num_train_epochs: 3
      learning_rate: 2.0e-5

Each component owns its options; this module only routes them by name.
"""

from __future__ import annotations

import copy
import difflib
import enum
import math
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from sftcore.catalogue import load_catalogue
from sftcore.errors import UsageError
from sftcore.registry import STAGES, Registry, _accepts, _describe, option_problems, unknown_message

TOP_KEYS = {
    "model", "data", "eval_data", "eval_split", "output", "max_length", "on_bad_row", "on_duplicate", "cache_dir",
    "training", *STAGES,
}
# Options the host supplies itself, so a factory may require them without the user passing them.
HOST_OPTIONS = {"collator": {"pad_token_id", "attn_implementation"}, "loader": {"packing"}}

TRAINING_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 3,
    "learning_rate": 2e-5,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,  # a float below 1 is a fraction of all steps
    "weight_decay": 0.0,
    "seed": 42,
}
# The bundled demo: a random tiny model memorising a small set on a CPU in well under a minute.
DEMO_TRAINING: dict[str, Any] = {
    "num_train_epochs": 60,
    "learning_rate": 3e-3,
    "per_device_train_batch_size": 16,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "seed": 0,
}


def load_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)  # safe: a config can never construct Python objects
    except yaml.YAMLError as exc:
        # PyYAML's message spans several lines with a source excerpt; the CLI prints one line.
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None) or " ".join(str(exc).split())
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"{path}{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of keys at the top, got {type(data).__name__}")
    return data


def component(config: Mapping[str, Any], stage: str) -> tuple[str | None, dict[str, Any]]:
    """``(name, options)`` for a stage; the name falls back to registry.yaml's default."""
    value = config.get(stage)
    if isinstance(value, Mapping):
        options = value.get("options") or {}
        # Options that are not a mapping stay as written, for `problems` to report.
        name, options = value.get("name"), dict(options) if isinstance(options, Mapping) else options
    else:
        name, options = value, {}
    return (name or load_catalogue().defaults.get(stage)), options


def set_component(config: dict[str, Any], stage: str, name: str | None, options: Mapping[str, Any]) -> None:
    current_name, current_options = component(config, stage)
    if name is None and not options and stage not in config:
        return
    merged = {**current_options, **options}
    config[stage] = {"name": name or current_name, "options": merged}


def parse_assignments(pairs: tuple[str, ...] | list[str], what: str) -> dict[str, Any]:
    """``key=value`` strings to a dict; values are YAML scalars (``3``, ``0.1``, ``true``, ``null``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{what} expects key=value, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def is_demo(config: Mapping[str, Any]) -> bool:
    return not config.get("model") and not config.get("data")


def effective(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with every default filled in: what a run uses and saves next to its model."""
    out = copy.deepcopy(dict(config))
    demo = is_demo(out)
    if demo:
        from sftcore.assets import DEMO_DATA

        out["data"] = str(DEMO_DATA)
        out["model"] = "builtin:tiny-llama"
    training = out.get("training") or {}
    if isinstance(training, Mapping):  # anything else stays as written, for `problems` to report
        out["training"] = {**TRAINING_DEFAULTS, **(DEMO_TRAINING if demo else {}), **training}
    out.setdefault("on_bad_row", "error")
    out.setdefault("on_duplicate", "keep")
    for stage in STAGES:
        name, options = component(out, stage)
        out[stage] = {"name": name, "options": options} if name else None
    return out


def problems(config: Mapping[str, Any], registry: Registry, *, check_files: bool = True) -> list[str]:
    """Every problem in an effective config, without loading a model."""
    found: list[str] = []
    for key in config:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), sorted(TOP_KEYS), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            found.append(f"unknown key '{key}'.{hint}")
    if bool(config.get("model")) != bool(config.get("data")):
        found.append("give both --model and --data (or neither, to train the bundled demo)")
    for key in ("model", "data", "eval_data", "output"):
        if config.get(key) is not None and not isinstance(config[key], str):
            found.append(f"{key} must be a path, got {config[key]!r}")
    found += eval_problems(config)
    if check_files:
        for key in ("data", "eval_data"):
            data = config.get(key) if isinstance(config.get(key), str) else None
            if data and not Path(data).is_file():
                found.append(f"{key.replace('_', ' ')} file not found: {data}")
        model = config.get("model") if isinstance(config.get("model"), str) else None
        if model and not str(model).startswith("builtin:") and not Path(model).is_dir():
            found.append(f"model directory not found: {model}")
        output = config.get("output") if isinstance(config.get("output"), str) else None
        if output and Path(output).exists() and not Path(output).is_dir():
            found.append(f"output must be a directory, but {output} is a file")
    max_length = config.get("max_length")
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2):
        found.append(f"max_length must be an integer >= 2, got {max_length!r}")
    cache_dir = config.get("cache_dir")
    if cache_dir is not None and cache_dir is not False and not isinstance(cache_dir, str):
        found.append(f"cache_dir must be a directory or false (no cache), got {cache_dir!r}")
    if config.get("on_bad_row", "error") not in ("error", "skip"):
        found.append(f"on_bad_row must be 'error' or 'skip', got {config.get('on_bad_row')!r}")
    if config.get("on_duplicate", "keep") not in ("keep", "skip", "error"):
        found.append(f"on_duplicate must be 'keep', 'skip' or 'error', got {config.get('on_duplicate')!r}")
    for stage in STAGES:
        value = config.get(stage)
        if value is None:
            continue
        if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
            found.append(f"{stage} must be a component name or {{name: ..., options: {{...}}}}")
            continue
        options = value.get("options") or {}
        if not isinstance(options, Mapping):
            found.append(f"{stage} options must be a mapping, got {type(options).__name__}")
            continue
        if value["name"] not in registry.names(stage):
            found.append(unknown_message(stage, value["name"], registry.names(stage)))
            continue
        component_ = registry.get(stage, value["name"])
        found += option_problems(component_, options, host_provided=HOST_OPTIONS.get(stage, set()))
    training = config.get("training") or {}
    if isinstance(training, Mapping):
        found += training_problems(training)
    else:
        found.append(f"training must be a mapping of TrainingArguments fields, got {type(training).__name__}")
    return found


def eval_problems(config: Mapping[str, Any]) -> list[str]:
    split = config.get("eval_split")
    if split is None:
        return []
    if config.get("eval_data") is not None:
        return ["give eval_data (a file of held-out rows) or eval_split (a fraction of data), not both"]
    if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 < split < 1:
        return [f"eval_split must be a fraction of the rows between 0 and 1, like 0.05; got {split!r}"]
    return []


def evaluates(config: Mapping[str, Any]) -> bool:
    """Whether the run holds rows out to measure the loss on (eval_data or eval_split)."""
    return config.get("eval_data") is not None or config.get("eval_split") is not None


def training_problems(training: Mapping[str, Any]) -> list[str]:
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    found = []
    for key, value in training.items():
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            found.append(f"training: '{key}' is not a TrainingArguments field.{hint}")
            continue
        default, hint = fields[key].default, fields[key].type
        choices = enum_values(hint)
        if isinstance(default, bool) and not isinstance(value, bool):
            found.append(f"training: '{key}' must be true or false, got {value!r}")
        elif isinstance(default, (int, float)) and not isinstance(default, bool) and (
            not isinstance(value, (int, float)) or isinstance(value, bool)
        ):
            found.append(f"training: '{key}' must be a number, got {value!r}")
        elif not _accepts(value, hint):
            found.append(f"training: '{key}' must be {_describe(hint)}, got {value!r}")
        elif isinstance(value, float) and not math.isfinite(value):
            found.append(f"training: '{key}' must be a finite number, got {value!r}")
        elif choices and isinstance(value, str) and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            listed = f"Did you mean '{close[0]}'?" if close else f"One of: {', '.join(choices)}"
            found.append(f"training: '{key}' does not accept {value!r}. {listed}")
    return found


def enum_values(hint: Any) -> list[str]:
    """The values of an Enum among a field's types (``SchedulerType | str``): the strings it accepts."""
    for arg in typing.get_args(hint) or (hint,):
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return [str(member.value) for member in arg]
    return []


def check(config: Mapping[str, Any], registry: Registry) -> None:
    found = problems(config, registry)
    if found:
        raise UsageError(found[0] if len(found) == 1 else "the run config has problems:\n  - " + "\n  - ".join(found))


def dump(config: Mapping[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
