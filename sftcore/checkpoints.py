"""What an output directory may hold before a run writes to it, and which checkpoint a run resumes.

The Trainer writes ``checkpoint-N`` in place, file by file, so a process killed while saving
leaves a directory that looks like a checkpoint and is not one. A checkpoint counts as
complete only once it holds `MARKER`, which `sftcore.interrupt` writes from ``on_save``: the
Trainer calls it after the weights, optimizer, scheduler, RNG state and trainer_state.json
are all on disk.

Rules for ``output`` (`check_output`):

* empty or missing: a new run;
* ``--resume``: must hold an sft run whose saved config matches this one, and a complete
  checkpoint; training continues from the newest;
* ``--overwrite``: the previous run's checkpoints and records are removed first, so they can
  never be resumed or mistaken for this run's; other files are left alone;
* anything else is refused: another run's checkpoints would be overwritten or resumed by mistake.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sftcore import config as cfg
from sftcore.errors import UsageError
from sftcore.train import CONFIG_FILE, SUMMARY_FILE

log = logging.getLogger("sftcore.run")

MARKER = "sft-checkpoint-complete"
# The run's own records, removed by --overwrite with its checkpoints (the model files it replaces).
RUN_RECORDS = (CONFIG_FILE, SUMMARY_FILE, "loss.csv", "loss.png", "trainer_state.json")
# Settings a resumed run may change: where and how often it writes, not what it learns.
RESUMABLE_CHANGES = {
    "output", "cache_dir", "training.save_steps", "training.save_total_limit", "training.logging_steps",
    "training.report_to", "training.dataloader_num_workers",
}
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoints(output: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` directory, oldest first."""
    if not output.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output.iterdir() if p.is_dir() and (m := _CHECKPOINT.fullmatch(p.name))]
    return sorted(found)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / MARKER).is_file() and (checkpoint / "trainer_state.json").is_file()


def newest_complete(output: Path) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint, and the incomplete ones newer than it (left by a kill)."""
    incomplete: list[Path] = []
    for _step, path in reversed(checkpoints(output)):
        if is_complete(path):
            return path, incomplete
        incomplete.append(path)
    return None, incomplete


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """How ``current`` differs from a saved effective config, ignoring `RESUMABLE_CHANGES`.

    A ``max_length`` left unset now takes the saved one: the run resolved it from the model.
    """
    old, new = _flat(saved), _flat(current)
    if new.get("max_length") is None:
        new.pop("max_length", None)
        old.pop("max_length", None)
    keys = sorted((old.keys() | new.keys()) - RESUMABLE_CHANGES)
    return [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_output(output: Path, config: Mapping[str, Any], *, resume: bool, overwrite: bool, remove: bool = True) -> Path | None:
    """Apply the output rules (module docstring); return the checkpoint to resume from, if any.

    ``remove=False`` (a process other than the main one) only checks, leaving removal to the main one.
    """
    if resume and overwrite:
        raise UsageError("--resume continues the run in the output directory, --overwrite replaces it: pass one of them")
    if not (output.is_dir() and any(output.iterdir())):
        if resume:
            raise UsageError(f"--resume: {output} holds no run to resume; leave out --resume to start one")
        return None
    if overwrite:
        if remove:
            clear(output)
        return None
    saved_file = output / CONFIG_FILE
    if not saved_file.is_file():
        raise UsageError(
            f"output {output} is not empty and holds no sft run; choose another --output, or pass --overwrite to write into it"
        )
    changed = differences(cfg.load_yaml(str(saved_file)), config)
    if changed:
        what = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        verb = "--resume needs the config it was started with" if resume else "choose another --output"
        raise UsageError(f"output {output} holds a run with another config ({what}); {verb}, or pass --overwrite to replace it")
    if (output / SUMMARY_FILE).is_file():  # written once a run has trained to its end
        what = "--resume: nothing is left to train" if resume else "choose another --output"
        raise UsageError(f"output {output} holds this run, finished; {what}, or pass --overwrite to train it again")
    if not resume:
        raise UsageError(
            f"output {output} already holds this run, stopped before its end; pass --resume to continue it from "
            f"its last checkpoint, or --overwrite to start again"
        )
    if (config.get("training") or {}).get("save_only_model"):
        raise UsageError(
            f"--resume: {output} was trained with save_only_model, so its checkpoints hold no optimizer, "
            f"scheduler or RNG state to continue from; pass --overwrite to start again"
        )
    checkpoint, ignored = newest_complete(output)
    for path in ignored:
        log.warning("ignoring %s: it was not completely written (the run stopped while saving it)", path)
    if checkpoint is None:
        raise UsageError(f"--resume: {output} has no complete checkpoint to resume from; pass --overwrite to start again")
    log.info("resuming from %s", checkpoint)
    return checkpoint


def clear(output: Path) -> None:
    """Remove the previous run's checkpoints and records (never anything else) before a new run."""
    removed = [path for _step, path in checkpoints(output)] + [output / n for n in RUN_RECORDS if (output / n).is_file()]
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if removed:
        log.info("--overwrite: removed %s from %s", ", ".join(p.name for p in removed), output)


def logged_losses(checkpoint: Path | None, key: str = "loss") -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` (``loss``, ``eval_loss``) as logged up to ``checkpoint`` (its
    trainer_state.json), so a resumed curve is whole."""
    if checkpoint is None:
        return []
    history = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")).get("log_history", [])
    return [(int(entry["step"]), float(entry[key])) for entry in history if key in entry and "step" in entry]
