"""The ``training`` section against ``transformers.TrainingArguments``: sftcore's defaults, each
value typed by its field as the user wrote it (`typed`) and checked (`training_problems`).

Reading the fields imports transformers' TrainingArguments (not its models, not torch's
kernels); nothing here runs at import time, so `sft --help` stays light.
"""

from __future__ import annotations

import enum
import functools
import math
import typing
from collections.abc import Mapping
from typing import Any

from sftcore.options import accepts, describe, did_you_mean, union_members


# TrainingArguments fields sftcore sets itself: a value in training would override --output, or do nothing.
HOST_TRAINING = {
    "output_dir": "give --output (or output: in the config file)",
    "resume_from_checkpoint": "pass --resume with --output (sftcore picks the checkpoint)",
}

# Where the Trainer, torch's optimizers or numpy's seeding fail, or nothing is trained:
# (lowest, lowest allowed?, highest or None, highest allowed?).
NUMBER_RANGES: dict[str, tuple[float, bool, float | None, bool]] = {
    "per_device_train_batch_size": (1, True, None, False),
    "per_device_eval_batch_size": (1, True, None, False),
    "gradient_accumulation_steps": (1, True, None, False),
    "learning_rate": (0, True, None, False),
    "weight_decay": (0, True, None, False),
    "warmup_steps": (0, True, None, False),
    "adam_epsilon": (0, True, None, False),
    "adam_beta1": (0, True, 1, False),
    "adam_beta2": (0, True, 1, False),
    "seed": (0, True, 2**32 - 1, True),  # numpy seeds with 32 bits
    "data_seed": (0, True, 2**32 - 1, True),
    "dataloader_num_workers": (0, True, None, False),
}

# Text-typed fields TrainingArguments also takes a boolean for: fsdp true turns FSDP on (fsdp_config
# tunes it), a false deepspeed is no DeepSpeed. Any other text field refuses one: a boolean
# accelerator_config would be opened as a file (descriptor 0 or 1).
BOOLEAN_TEXT: dict[str, tuple[bool, ...]] = {"fsdp": (True, False), "deepspeed": (False,)}

# A strategy of "steps" and the field giving its interval (a whole number, or below 1 a fraction of all steps).
STEP_INTERVALS = {"logging_strategy": "logging_steps", "save_strategy": "save_steps", "eval_strategy": "eval_steps"}

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


@functools.lru_cache(maxsize=1)
def training_fields() -> dict[str, Any]:
    """TrainingArguments' dataclass fields by name (imports transformers, not torch's models)."""
    import dataclasses

    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments)}


def typed(key: str, value: Any, word: str | None = None) -> Any:
    """A training value as its field's type reads what the user wrote.

    YAML reads ``no`` as false and ``2e-5`` (no dot) as text: a field choosing among words given
    a boolean gets ``word``, the word written (``save_strategy: no`` is "no"), and a number field
    given text that reads as a number gets the number. Anything else is returned as it is, for
    `problems` (``fsdp: false`` stays false).
    """
    field = training_fields().get(key)
    if field is None:
        return value
    kinds = union_members(field.type)
    literal = {v for kind in kinds if typing.get_origin(kind) is typing.Literal for v in typing.get_args(kind)}
    text = any(kind is str or (isinstance(kind, type) and issubclass(kind, enum.Enum)) for kind in kinds)
    if isinstance(value, bool) and bool not in kinds and value not in literal and (literal or enum_values(field.type)):
        # Only for a field choosing among words (then refused as written if it is none of them):
        # free text keeps the boolean, as fsdp takes true/false and "false" would be an unknown
        # fsdp option, a deepspeed config file named "false".
        return word or str(value).lower()
    if isinstance(value, str) and not text:
        for number in (float, int):
            if number in kinds:
                try:
                    return number(value)
                except ValueError:
                    return value
    return value


def training_problems(training: Mapping[str, Any]) -> list[str]:
    fields = training_fields()
    found, valid = [], {}
    for key, value in training.items():
        if key not in fields:
            hint = did_you_mean(key, sorted(fields))
            found.append(f"training: '{key}' is not a TrainingArguments field.{hint}")
        elif key in HOST_TRAINING:
            found.append(f"training: '{key}' is set by sftcore: {HOST_TRAINING[key]}")
        elif problem := value_problem(key, value, fields[key]):
            found.append(f"training: {problem}")
        else:
            valid[key] = value
    return found + [f"training: {problem}" for problem in step_problems(valid, fields)]


def value_problem(key: str, value: Any, field: Any) -> str | None:
    """What is wrong with one value for its field, on its own: type, choices, range."""
    default, hint = field.default, field.type
    choices = enum_values(hint)
    if isinstance(value, bool) and value in BOOLEAN_TEXT.get(key, ()):
        return None
    if isinstance(default, bool) and not isinstance(value, bool):
        return f"'{key}' must be true or false, got {value!r}"
    number = isinstance(default, (int, float)) and not isinstance(default, bool)
    if number and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return f"'{key}' must be a number, got {value!r}"
    if not _fits(value, hint):
        return f"'{key}' must be {describe(hint)}, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"'{key}' must be a finite number, got {value!r}"
    if choices and value is not None and (not isinstance(value, str) or value not in choices):
        return _not_a_choice(key, value, choices)
    if (item_choices := item_enum_values(hint)) and not choices:
        # A list of choices, or them in one string: TrainingArguments splits "a b" as its command line does.
        items = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
        if wrong := [item for item in items if not isinstance(item, str) or item not in item_choices]:
            return _not_a_choice(key, wrong[0], item_choices)
    if key in NUMBER_RANGES and isinstance(value, (int, float)):
        low, low_ok, high, high_ok = NUMBER_RANGES[key]
        below = value < low or (value == low and not low_ok)
        above = high is not None and (value > high or (value == high and not high_ok))
        if below or above:
            wanted = f"{'>=' if low_ok else '>'} {low}" + (f" and {'<=' if high_ok else '<'} {high}" if high is not None else "")
            return f"'{key}' must be {wanted}, got {value!r}"
    return None


def _not_a_choice(key: str, value: Any, choices: list[str]) -> str:
    listed = did_you_mean(value, choices) or f" One of: {', '.join(choices)}"
    return f"'{key}' does not accept {value!r}.{listed}"


def step_problems(training: Mapping[str, Any], fields: Mapping[str, Any]) -> list[str]:
    """How long the run is and how often it logs, saves, evaluates: checks across fields (each one's type is fine)."""
    found = []
    max_steps = training.get("max_steps", fields["max_steps"].default)
    epochs = training.get("num_train_epochs", fields["num_train_epochs"].default)
    if max_steps != -1 and max_steps <= 0:
        found.append(f"'max_steps' must be > 0, or -1 to train for num_train_epochs; got {max_steps!r}")
    elif max_steps == -1 and epochs <= 0:
        found.append(f"'num_train_epochs' must be > 0 (or max_steps > 0), got {epochs!r}")
    for strategy, steps_key in STEP_INTERVALS.items():
        steps = training.get(steps_key, fields[steps_key].default)
        if str(training.get(strategy, fields[strategy].default)) != "steps" or steps is None:
            continue  # eval_steps None: the Trainer evaluates every logging_steps
        if steps <= 0:
            found.append(f"'{steps_key}' must be > 0 when {strategy} is 'steps', got {steps!r}")
        elif steps > 1 and steps != int(steps):
            found.append(f"'{steps_key}' must be a whole number of steps (or below 1, a fraction of all steps), got {steps!r}")
    return found


def _fits(value: Any, hint: Any) -> bool:
    """`accepts`, with a list's items checked too: ``report_to: [[1]]`` is a list but no list[str]."""
    if isinstance(value, list):
        lists = [arg for arg in union_members(hint) if typing.get_origin(arg) is list]
        if lists:
            return any(all(_fits(item, (typing.get_args(arg) or (Any,))[0]) for item in value) for arg in lists)
    return accepts(value, hint)


def enum_values(hint: Any) -> list[str]:
    """The values of an Enum among a field's types (``SchedulerType | str``): the strings it accepts."""
    for arg in typing.get_args(hint) or (hint,):
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return [str(member.value) for member in arg]
    return []


def item_enum_values(hint: Any) -> list[str]:
    """The values of an Enum a field takes a list of (``str | list[DebugOption]``)."""
    for arg in typing.get_args(hint):
        if typing.get_origin(arg) is list and typing.get_args(arg) and (values := enum_values(typing.get_args(arg)[0])):
            return values
    return []
