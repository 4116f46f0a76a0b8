"""What an output directory may hold before a run writes to it, and the run's own records there.

Rules for ``output`` (`check_output`), which a run checks holding `LOCK_FILE` (`locked`):

* empty or missing: a new run;
* ``--resume``: must hold an sft run whose saved config and data files match this one's, and a
  complete checkpoint (`sftcore.run.checkpoints`); training continues from the newest;
* ``--overwrite``: must hold an sft run; its completion record, final model, checkpoints and
  records are removed first, in that order, so none can be resumed or mistaken for this run's,
  and its sft_config.yaml last, so a kill part way leaves a run the next --overwrite replaces;
  files sftcore did not write are left alone (a checkpoint holding `MARKER` is sftcore's,
  whatever else the Trainer or a plugin saved in it);
* anything else is refused: another run's checkpoints would be overwritten or resumed by mistake.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from sftcore import config as cfg
from sftcore.errors import SftError, UsageError
from sftcore.run.checkpoints import CHECKPOINT_FILES, MARKER, checkpoints, newest_with_reasons
from sftcore.model.weights import is_weight_file

log = logging.getLogger("sftcore.run")

CONFIG_FILE = "sft_config.yaml"  # the effective config, written when the run starts
SUMMARY_FILE = "summary.json"  # written last: the run finished and its final model is whole
LOCK_FILE = ".sft-lock"  # held (flock) by the main process of the run writing the directory
DATA_FILE = "sft_data.json"  # the sha256 of each data file the run trains and evaluates on
# The run's own records, removed by --overwrite with its checkpoints and final model.
RUN_RECORDS = (CONFIG_FILE, DATA_FILE, "loss.csv", "eval_loss.csv", "loss.png", "trainer_state.json")
# Settings a resumed run may change: where and how often it writes, not what it learns.
RESUMABLE_CHANGES = {
    "output", "cache_dir", "training.save_steps", "training.save_total_limit", "training.logging_steps",
    "training.report_to", "training.dataloader_num_workers",
}


# ---- data files ----------------------------------------------------------------------------


def data_digests(config: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``{"data": {"path", "sha256"}, "eval_data": ...}`` for the data files ``config`` names."""
    from sftcore.data.cache import file_digest

    return {
        key: {"path": str(config[key]), "sha256": file_digest(config[key])}
        for key in ("data", "eval_data")
        if config.get(key) is not None
    }


def record_data(output: Path, config: Mapping[str, Any]) -> None:
    (output / DATA_FILE).write_text(json.dumps(data_digests(config), indent=2) + "\n", encoding="utf-8")


def changed_data(output: Path, config: Mapping[str, Any]) -> str | None:
    """How the data files differ from those the run in ``output`` started on, or None."""
    record = output / DATA_FILE
    if not record.is_file():  # a run from before data files were recorded
        return None
    from sftcore.data.cache import file_digest

    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        files = [(key, config.get(key) or then["path"], str(then["sha256"])) for key, then in saved.items()]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise UsageError(
            f"--resume: {record} is damaged, so the data the run started on is not known; restore it, "
            "or pass --overwrite to start again"
        ) from None
    for key, path, sha256 in files:
        try:
            now = file_digest(path)
        except OSError as exc:
            return f"{path} ({key}) cannot be read now ({exc.strerror})"
        if now != sha256:
            return f"{path} ({key}) changed since the run started (sha256 {sha256[:12]} then, {now[:12]} now)"
    return None


# ---- the directory -------------------------------------------------------------------------


def _entries(output: Path) -> list[Path]:
    """What ``output`` holds, besides the lock file a run leaves."""
    return [p for p in output.iterdir() if p.name != LOCK_FILE] if output.is_dir() else []


def holds_run(output: Path) -> bool:
    return (output / CONFIG_FILE).is_file()


def refuse_early(output: Path, config: Mapping[str, Any], *, resume: bool, overwrite: bool) -> None:
    """The refusals that need no lock, so that none leaves a lock file behind: ``--resume`` of a
    missing directory, and a directory another tool wrote (sftcore adds nothing to it)."""
    missing = not (output.exists() or output.is_symlink())
    if missing or (_entries(output) and not holds_run(output)):
        check_output(output, config, resume=resume, overwrite=overwrite, remove=False)


def claim(output: Path) -> None:
    """Create ``output`` (a missing directory or parent); an unusable one is one line, before anything heavy."""
    if output.is_symlink() and not output.exists():
        raise SftError(
            f"output {output} is a symbolic link to {os.readlink(output)}, which does not exist; "
            "create its target, or choose another --output"
        )
    try:
        output.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SftError(f"output {output} is a file, not a directory; choose another --output") from None
    except OSError as exc:
        raise SftError(f"output {output} cannot be created ({exc.strerror}); choose another --output") from None


@contextmanager
def removed_if_unused(output: Path, new: bool) -> Iterator[None]:
    """Leave ``output`` as it was if the run stops before writing into it: a run refused for its
    data leaves nothing behind. The lock file goes from a directory that held nothing else, and
    the directory too when this run made it. Inside `locked`, so no other run has it meanwhile."""
    empty = not _entries(output)
    try:
        yield
    except BaseException:
        if empty and output.is_dir() and not _entries(output):
            with suppress(OSError):  # never hide the error that stopped the run
                (output / LOCK_FILE).unlink(missing_ok=True)
                if new:
                    output.rmdir()
        raise


def take(held: ExitStack, output: Path, config: Mapping[str, Any], *, new: bool, resume: bool, overwrite: bool) -> Path | None:
    """The main process's claim on ``output``: refuse it, or create it, lock it (for as long as
    ``held`` is open) and apply `check_output`; the checkpoint to resume from, if any."""
    refuse_early(output, config, resume=resume, overwrite=overwrite)
    claim(output)
    held.enter_context(locked(output))
    held.enter_context(removed_if_unused(output, new))
    return check_output(output, config, resume=resume, overwrite=overwrite)


@contextmanager
def locked(output: Path) -> Iterator[None]:
    """Hold `LOCK_FILE` in ``output`` while inside: a second run writing there fails at once.

    flock, not a file that exists or not: the kernel drops it when its holder dies, even by
    SIGKILL, so no stale lock outlives a run. The holder's pid is written in, for the message.
    A filesystem without flock (some NFS and Lustre mounts) runs unlocked, with a warning.
    """
    path = output / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise SftError(f"output {output} is not writable ({exc.strerror}); choose another --output") from None
    try:
        if _flock(fd, output):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _flock(fd: int, output: Path) -> bool:
    """Take the lock on ``fd``: True, or False (warned) where the filesystem has no locks."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise SftError(
                f"output {output} is in use by another sft run{pid}; wait for it to end, or choose another --output"
            ) from None
        why = exc.strerror or exc  # ENOLCK, EOPNOTSUPP, ENOSYS: NFS without lockd, some Lustre mounts
    log.warning("output %s cannot be locked (%s); running unlocked: a second run there would not be refused", output, why)
    return False


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


def check_output(
    output: Path, config: Mapping[str, Any], *, resume: bool, overwrite: bool, remove: bool = True, verify: bool = True
) -> Path | None:
    """Apply the output rules (module docstring); return the checkpoint to resume from, if any.

    ``remove=False`` only checks (`refuse_early`); ``verify=False`` checks checkpoints' file
    names and sizes without reading them (`damage`). Only the main process of a run calls it
    (`sftcore.run.distributed.decided`): the others never look at a directory it may be clearing.
    """
    if resume and overwrite:
        raise UsageError("--resume continues the run in the output directory, --overwrite replaces it: pass one of them")
    if not _entries(output):
        if resume:
            raise UsageError(f"--resume: {output} holds no run to resume; leave out --resume to start one")
        return None
    if not holds_run(output):  # --overwrite too: sftcore removes only what it wrote
        raise UsageError(f"output {output} is not empty and holds no sft run; choose another --output, or empty it")
    if overwrite:
        if remove:
            clear(output)
        return None
    saved_file = output / CONFIG_FILE
    # Paths compared absolute: a saved config holds them so (`sftcore.config.dump`), older ones as typed;
    # both with defaults filled in, so a stage added since (adapter) is the default it had, none.
    saved = cfg.effective(cfg.load_yaml(str(saved_file)))
    changed = differences(cfg.absolute_paths(saved), cfg.absolute_paths(cfg.effective(config)))
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
    if (data := changed_data(output, config)) is not None:
        raise UsageError(
            f"--resume: {data}; a resumed run must train on the data it started on: restore that file, "
            "or pass --overwrite to start again on this one"
        )
    if (config.get("training") or {}).get("save_only_model"):
        raise UsageError(
            f"--resume: {output} was trained with save_only_model, so its checkpoints hold no optimizer, "
            f"scheduler or RNG state to continue from; pass --overwrite to start again"
        )
    checkpoint, ignored = newest_with_reasons(output, verify)
    for path, why in ignored:
        log.warning("ignoring %s: %s", path, why)
    if checkpoint is None:
        raise UsageError(f"--resume: {output} has no complete checkpoint to resume from; pass --overwrite to start again")
    log.info("resuming from %s", checkpoint)
    return checkpoint


def clear(output: Path) -> None:
    """Remove the previous run's files (never another's) before a new run in ``output``.

    The completion record goes first, then the final model: a kill part way leaves a run that
    reads as unfinished, never old weights beside a new run's config. The config goes last: it
    is what makes the directory an sft run, which the next --overwrite needs to finish the job.
    """
    summary = output / SUMMARY_FILE
    removed = [summary] if summary.is_file() else []
    removed += [output / name for name in model_files(output) if (output / name).is_file()]
    removed += [path for _step, path in checkpoints(output) if _written_by_trainer(path)]
    removed += [output / name for name in RUN_RECORDS if name != CONFIG_FILE and (output / name).is_file()]
    removed += [output / CONFIG_FILE] if (output / CONFIG_FILE).is_file() else []
    removed = list(dict.fromkeys(removed))  # the summary lists trainer_state.json, a record too
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if removed:
        log.info("--overwrite: removed %s from %s", ", ".join(p.name for p in removed), output)
    for _step, path in checkpoints(output):
        log.warning("--overwrite: left %s: it holds files sftcore does not write", path)


def model_files(output: Path) -> list[str]:
    """The final model's files: those the run's summary lists, and any weights by their names."""
    weights = [p.name for p in output.iterdir() if p.is_file() and is_weight_file(p.name)]
    # Names only, inside output: a summary cannot point the removal elsewhere.
    return sorted({Path(name).name for name in _listed_model_files(output)} | set(weights))


def _listed_model_files(output: Path) -> list[str]:
    try:
        return [str(name) for name in json.loads((output / SUMMARY_FILE).read_text(encoding="utf-8")).get("model_files", [])]
    except (OSError, ValueError, AttributeError):  # no summary (a run stopped before its end), or a damaged one
        return []


def _written_by_trainer(checkpoint: Path) -> bool:
    """Marked by sftcore (whatever else a save put there), or holding only what a save writes."""
    if (checkpoint / MARKER).is_file():
        return True
    return all(any(fnmatch.fnmatch(p.name, f) for f in CHECKPOINT_FILES) for p in checkpoint.iterdir())


