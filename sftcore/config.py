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
    epochs: 3                    # the flags' names work too (see FLAG_TO_TRAINING), not beside their field

Relative paths in a config file are read from the file's directory; on the command line, from
the current one. Training values are typed by their field as the user writes them
(`sftcore.run.arguments.typed`),
and every value is checked in one place (`problems`), by `sft validate` and `sft run` alike.

Each component owns its options; this module only routes them by name.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from sftcore.data.pipeline import ROW_POLICIES, row_policy
from sftcore.errors import UsageError
from sftcore.host import load_catalogue
from sftcore.model.adapters import ADAPTER_CONFIG
from sftcore.model.weights import is_weight_file
from sftcore.options import did_you_mean, option_problems, unknown_message
from sftcore.registry import STAGES, Registry
from sftcore.run.arguments import (
    DEMO_TRAINING,
    TRAINING_DEFAULTS,
    training_problems,
    typed,
)

# The top-level keys that hold one value, each also a flag of `sft run` (--eval-data for eval_data).
SCALAR_KEYS = ("model", "data", "eval_data", "eval_split", "output", "max_length", "on_bad_row", "on_duplicate", "cache_dir")
TOP_KEYS = {*SCALAR_KEYS, "training", *STAGES}
# `sft run`'s training flags, which a config file may give at its top level by the same names.
FLAG_TO_TRAINING = {
    "epochs": "num_train_epochs",
    "lr": "learning_rate",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "seed": "seed",
    "max_steps": "max_steps",
}
PATH_KEYS = ("model", "data", "eval_data", "output", "cache_dir")


def load_yaml(path: str) -> dict[str, Any]:
    """A YAML file's top-level mapping, as written (see `read` for a run config as a run takes it)."""
    return _load(path)[0]


def _load(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The mapping, and the words YAML read as booleans in its ``training`` (``no``, ``off``...) by field."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise UsageError(
            f"{path}, line {line}: byte 0x{exc.object[exc.start]:02x} is not UTF-8; save the config as UTF-8 text"
        ) from None
    loader = yaml.SafeLoader(text)  # safe: a config can never construct Python objects
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        # PyYAML's message spans several lines with a source excerpt; the CLI prints one line.
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None) or " ".join(str(exc).split())
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"{path}{where}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of keys at the top, got {type(data).__name__}")
    return data, _bool_words(node, "training")


def _bool_words(node: yaml.Node, key: str) -> dict[str, str]:
    """YAML 1.1 reads ``no``, ``off`` and ``yes`` as booleans; a text field wants the word back."""
    for name, value in node.value if isinstance(node, yaml.MappingNode) else ():
        if isinstance(name, yaml.ScalarNode) and name.value == key and isinstance(value, yaml.MappingNode):
            return {
                field.value: word.value.lower()
                for field, word in value.value
                if isinstance(field, yaml.ScalarNode) and isinstance(word, yaml.ScalarNode) and word.tag.endswith(":bool")
            }
    return {}


def read(path: str) -> dict[str, Any]:
    """A YAML run config as a run takes it: the flags' names moved into ``training``, relative
    paths read from the file's directory (as cwd-relative paths), training values typed by their fields."""
    config, words = _load(path)
    training = config.get("training") or {}
    if isinstance(training, Mapping):  # anything else stays as written, for `problems` to report
        training = {key: typed(key, value, words.get(key)) for key, value in training.items()}
        for flag, field in FLAG_TO_TRAINING.items():
            if flag in config and field not in training:  # both given: left for `problems` to report
                training[field] = typed(field, config.pop(flag))
        if training or "training" in config:
            config["training"] = training
    base = os.path.dirname(path)
    for key in PATH_KEYS:
        value = config.get(key)
        if base and isinstance(value, str) and value and not value.startswith("builtin:") and not os.path.isabs(value):
            config[key] = os.path.normpath(os.path.join(base, value))
            _FROM_FILE[config[key]] = (value, base)
    return config


# A path `read` resolved from a config file's directory -> (the path as written, that directory):
# for the hint when the file is missing there but the same path exists from the current directory.
_FROM_FILE: dict[str, tuple[str, str]] = {}


def not_found(what: str, path: str) -> str:
    """``{what} not found: {path}``, saying so when the path as written in a config file is found from here."""
    written, base = _FROM_FILE.get(path, (None, ""))
    if written is None or not os.path.exists(written):
        return f"{what} not found: {path}"
    return (
        f"{what} not found: {path} (paths in a config file are read from its directory; "
        f"for the {written} in the current directory write {os.path.relpath(written, base)})"
    )


def absolute_paths(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with its relative paths made absolute (from the current directory)."""
    out = dict(config)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and not value.startswith("builtin:"):
            out[key] = os.path.abspath(value)
    return out


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
    if not isinstance(current_options, Mapping):  # options: [1] stays as written, for `problems` to report
        return
    merged = {**current_options, **options}
    config[stage] = {"name": name or current_name, "options": merged}


def parse_assignments(pairs: tuple[str, ...] | list[str], what: str) -> dict[str, Any]:
    """``key=value`` strings to a dict; values are YAML scalars (``3``, ``0.1``, ``true``, ``null``)."""
    return {key: value for key, value, _raw in _assignments(pairs, what)}


def training_assignments(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``--set field=value`` strings to training values, typed by their fields (`typed`)."""
    return {key: typed(key, value, raw.strip().lower()) for key, value, raw in _assignments(pairs, "--set")}


def _assignments(pairs: tuple[str, ...] | list[str], what: str) -> list[tuple[str, Any, str]]:
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{what} expects key=value, got {pair!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value, raw))
    return out


def is_demo(config: Mapping[str, Any]) -> bool:
    return not config.get("model") and not config.get("data")


def effective(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with every default filled in: what a run uses and saves next to its model."""
    out = copy.deepcopy(dict(config))
    demo = is_demo(out)
    if demo:
        from sftcore.assets import BUILTIN_MODEL, DEMO_DATA

        out["data"] = str(DEMO_DATA)
        out["model"] = BUILTIN_MODEL
    training = out.get("training") or {}
    if isinstance(training, Mapping):  # anything else stays as written, for `problems` to report
        out["training"] = {**TRAINING_DEFAULTS, **(DEMO_TRAINING if demo else {}), **training}
    for key, allowed in ROW_POLICIES.items():
        out.setdefault(key, allowed[0])
    for stage in STAGES:
        name, options = component(out, stage)
        out[stage] = {"name": name, "options": options} if name else None
    return out


def problems(
    config: Mapping[str, Any], registry: Registry, *, check_files: bool = True, weights: bool = True,
    tokenizer_only: bool = False,
) -> list[str]:
    """Every problem in an effective config, without loading a model.

    ``check_files``: the files named exist (and, with ``weights``, the model directory holds weights).
    ``tokenizer_only``: ``model`` names a tokenizer directory (``--tokenizer``), read for nothing else.
    """
    found: list[str] = []
    training = config.get("training") or {}
    for key in config:
        if key in FLAG_TO_TRAINING:  # `read` moves a flag's name into training unless its field is there too
            field = FLAG_TO_TRAINING[key]
            both = isinstance(training, Mapping) and field in training
            found.append(f"give {key} or training.{field}, not both" if both else f"{key} belongs in training, as {field}")
        elif key not in TOP_KEYS:
            hint = did_you_mean(key, sorted(TOP_KEYS | FLAG_TO_TRAINING.keys()))
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
                found.append(not_found(f"{key.replace('_', ' ')} file", data))
        model = config.get("model") if isinstance(config.get("model"), str) else None
        if model and not str(model).startswith("builtin:"):
            found += path_problems(model, config, registry, weights=weights, tokenizer_only=tokenizer_only)
        output = config.get("output") if isinstance(config.get("output"), str) else None
        if output and Path(output).exists() and not Path(output).is_dir():
            found.append(f"output must be a directory, but {output} is a file")
    max_length = config.get("max_length")
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2):
        found.append(f"max_length must be an integer >= 2, got {max_length!r}")
    cache_dir = config.get("cache_dir")
    if cache_dir is not None and cache_dir is not False and not isinstance(cache_dir, str):
        found.append(f"cache_dir must be a directory or false (no cache), got {cache_dir!r}")
    for key, allowed in ROW_POLICIES.items():
        if row_policy(config, key) not in allowed:
            words = [f"'{word}'" for word in allowed]
            found.append(f"{key} must be {', '.join(words[:-1])} or {words[-1]}, got {config.get(key)!r}")
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
        found += option_problems(component_, options, host_provided=True)
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


def path_problems(model: str, config: Mapping[str, Any], registry: Registry, *, weights: bool, tokenizer_only: bool) -> list[str]:
    """The model path's problems: a checkpoint's layout only where the built-in loader reads it.

    A third-party loader's model may be anything on disk (an adapter directory, a GGUF file).
    """
    if tokenizer_only:
        return [] if Path(model).is_dir() else [not_found("tokenizer directory", model)]
    if is_builtin(config, registry, "loader"):
        return model_problems(model, weights=weights)
    return [] if Path(model).exists() else [not_found("model", model)]


def is_builtin(config: Mapping[str, Any], registry: Registry, stage: str) -> bool:
    """Whether the stage's component is one of sftcore's own plugins (registry.yaml's); an unknown name counts as one."""
    name = component(config, stage)[0]
    if not isinstance(name, str) or name not in registry.names(stage):
        return True  # reported as unknown; the model is checked as the default loader would read it
    found = registry.get(stage, name)
    return found.distribution == "sftcore" and found.plugin in load_catalogue().plugins


def model_problems(model: str, *, weights: bool = True) -> list[str]:
    """A model directory's problems as the built-in loader reads it, from its file names alone (nothing is loaded)."""
    path = Path(model)
    if not path.is_dir():
        return [not_found("model directory", model)]
    if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        # An adapter run: its tokenizer is all `sft preview` reads; training needs a whole model.
        return [f"{model} holds an adapter, not a model: train on its merged model (sft merge {model} --output DIR)"] if weights else []
    if not (path / "config.json").is_file():
        return [f"model directory {model} has no config.json: give a checkpoint saved with save_pretrained"]
    if weights and not any(path.glob("*.safetensors")) and not any(is_weight_file(p.name) for p in path.iterdir()):
        return [f"model directory {model} has no weights (*.safetensors or pytorch_model.bin): give a checkpoint saved with save_pretrained"]
    return []


def check(config: Mapping[str, Any], registry: Registry) -> None:
    found = problems(config, registry)
    if found:
        raise UsageError(found[0] if len(found) == 1 else "the run config has problems:\n  - " + "\n  - ".join(found))


def dump(config: Mapping[str, Any], path: Path) -> None:
    """Save a config with absolute paths: read back from its own directory (`read`), it names the same files."""
    path.write_text(yaml.safe_dump(absolute_paths(config), sort_keys=False), encoding="utf-8")
