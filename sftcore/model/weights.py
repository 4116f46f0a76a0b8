"""Loading a checkpoint's files: which weight files load, the tokenizer's JSON files checked, and
transformers' own loading reports and bars kept in line.

Weights: safetensors, never a pickle unless the user says so. A pickle (``pytorch_model.bin``, ``*.pt``) can run arbitrary code while it loads. transformers
loads them with ``weights_only=True`` today, but that guard has had escapes; safetensors holds
tensors and nothing else. A checkpoint directory with pickles only is refused with a message
saying how to convert it, or how to opt in.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sftcore.errors import SftError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Trainer bookkeeping the model loader never reads (TrainingArguments, optimizer, RNG state).
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"}
# The weight files `save_pretrained` writes, whole or sharded (pickles with safe_serialization=False).
WEIGHT_FILES = (
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json",
)


def is_weight_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in WEIGHT_FILES)


def check_weights(path: str, allow_pickle: bool = False) -> None:
    """Raise `SftError` unless the local checkpoint ``path`` has weights sftcore may load.

    A name that is not a local directory (a hub id) is left to transformers.
    """
    directory = Path(path)
    if not directory.is_dir() or any(directory.glob("*.safetensors")):
        return
    pickled = sorted(
        p.name for p in directory.iterdir()
        if p.suffix in PICKLE_SUFFIXES and p.name not in NOT_WEIGHTS and not p.name.startswith("rng_state")
    )
    if not pickled:
        raise SftError(f"{path} has no model weights (no *.safetensors file)")
    if not allow_pickle:
        raise SftError(
            f"{path} has weights only as pickle ({', '.join(pickled[:3])}), which can run code when loaded; "
            f"convert them to safetensors, or pass --loader-opt allow_pickle=true if you trust the file"
        )


# The JSON files a checkpoint's config and tokenizer are read from.
JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# transformers' load report row for a tensor of another shape than the config makes.
_MISMATCH = re.compile(r"^\s*(\S+)\s*\|\s*MISMATCH\s*\|.*?ckpt: torch\.Size\(\[([^\]]*)\]\) vs model: ?torch\.Size\(\[([^\]]*)\]\)", re.M)


def check_json_files(path: str) -> None:
    """Raise `SftError` naming the first JSON file of the checkpoint ``path`` that does not parse.

    transformers reports a broken config.json as the tokenizer's failure, without the position.
    """
    directory = Path(path)
    if not directory.is_dir():
        return
    for name in JSON_FILES:
        file = directory / name
        if not file.is_file():
            continue
        try:
            json.loads(file.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            where = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
            raise SftError(
                f"{file} is not valid JSON ({getattr(exc, 'msg', exc)}{where}); restore it from where the checkpoint came from"
            ) from None


@contextmanager
def loading(what: str, path: str) -> Iterator[None]:
    """Turn what transformers raises for a missing, partial or corrupt checkpoint into one line.

    A file cut short by a killed copy fails in safetensors' header check (SafetensorError). A
    tokenizer.json of the wrong structure fails anywhere (KeyError, TypeError, the tokenizers
    library's plain Exception): it is named when the tokenizers library cannot read it either.
    """
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as exc:
        raise SftError(f"cannot load the {what} from {path}: {' '.join(str(exc).split())}") from None
    except Exception as exc:
        problem = tokenizer_file_problem(path) if what == "tokenizer" else None
        if problem is None:
            raise
        raise SftError(problem) from exc


def tokenizer_file_problem(path: str) -> str | None:
    """Why the tokenizers library cannot read ``path``/tokenizer.json, or None when it can (or there is none)."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        Tokenizer.from_file(str(file))
    except Exception as exc:  # the library raises plain Exception for a file of the wrong structure
        return (
            f"{file} is not a tokenizer the tokenizers library can read ({' '.join(str(exc).split())}); "
            "replace it with the tokenizer.json saved with the model"
        )
    return None


@contextmanager
def loading_model(path: str) -> Iterator[None]:
    """`loading` for the weights, plus a tensor whose shape is not the one config.json makes.

    transformers logs a table of every such tensor, then raises a RuntimeError pointing to it;
    the table is held back and its first row becomes the error.
    """
    report = _HeldReport()
    logger = logging.getLogger("transformers.modeling_utils")  # from_pretrained passes its own to the report
    logger.addFilter(report)
    try:
        with loading("model", path):
            yield
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        raise SftError(report.mismatch(path)) from None
    finally:
        logger.removeFilter(report)
        report.release(logger)


class _HeldReport(logging.Filter):
    """Holds back transformers' load reports; `release` logs them when no error replaced them."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.used = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" not in str(record.msg):
            return True
        self.records.append(record)
        return False

    def mismatch(self, path: str) -> str:
        self.used = True
        rows = _MISMATCH.findall("\n".join(r.getMessage() for r in self.records))
        what = "a weight's shape is not the one config.json gives"
        if rows:
            name, saved, expected = rows[0]
            more = f" (and {len(rows) - 1} more tensors)" if len(rows) > 1 else ""
            what = f"{name} is [{saved}] in the weights but config.json makes it [{expected}]{more}"
        return (
            f"cannot load the model from {path}: {what}; config.json does not describe these weights, "
            "use the config.json saved with them"
        )

    def release(self, logger: logging.Logger) -> None:
        if not self.used:
            for record in self.records:
                logger.handle(record)


@contextmanager
def transformers_bars(enabled: bool) -> Iterator[None]:
    """Switch off transformers' own bars ("Loading weights", "Writing model shards") while inside.

    They bypass our ``progress`` flag; the previous setting is restored, since it is process-wide.
    """
    from transformers.utils import logging as hf_logging

    if enabled or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
