"""Which checkpoint a run resumes: a ``checkpoint-N`` counts only once it is complete.

The Trainer writes ``checkpoint-N`` in place, file by file, so a process killed while saving
leaves a directory that looks like a checkpoint and is not one. A checkpoint counts as
complete only once it holds `MARKER`, which `sftcore.run.interrupt` writes from ``on_save``: the
Trainer calls it after the weights, optimizer, scheduler, RNG state and trainer_state.json
are all on disk. The marker lists every file's size and a digest, so a file damaged since (a
bad disk, a partial copy) makes the checkpoint incomplete again.

The digest is a whole file's sha256 up to `WHOLE_HASH_BYTES` (256 MiB); a larger file gets
the sha256 of its first and last `END_BYTES` (16 MiB each) instead (``sha256_ends``), so a
save of a 7B model's 80 GB reads about 1 GB rather than all of it (sha256 runs at ~1.2 GB/s).
Detected: any file missing or of another size; any change in a file up to 256 MiB; a change
within the first or last 16 MiB of a larger one (a truncated or half-copied file, a damaged
header). Not detected: a change that keeps the size in the middle of a file over 256 MiB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("sftcore.run")


MARKER = "sft-checkpoint-complete"


# What the Trainer and sftcore write into a checkpoint: an unmarked checkpoint-N (a save killed
# part way) holding anything else is not sftcore's, and --overwrite leaves it.
CHECKPOINT_FILES = (
    MARKER, f"{MARKER}.tmp", "trainer_state.json", "training_args.bin", "optimizer*.pt", "scheduler*.pt",
    "scaler.pt", "rng_state*.pth", "model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "vocab.*", "merges.txt", "*.model", "global_step*", "latest", "zero_to_fp32.py",
    "pytorch_model_fsdp*", "optimizer_*", "adapter_*", "README.md", "preprocessor_config.json",
    "processor_config.json", "chat_template.json", "video_preprocessor_config.json",
)


WHOLE_HASH_BYTES = 256 << 20  # files up to this size are hashed whole


END_BYTES = 16 << 20  # of a larger file, the sha256 covers this much of its start and of its end


_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoints(output: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` directory, oldest first."""
    if not output.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output.iterdir() if p.is_dir() and (m := _CHECKPOINT.fullmatch(p.name))]
    return sorted(found)


def write_marker(checkpoint: Path, step: int) -> None:
    """Write `MARKER` into ``checkpoint``: the step and every other file's size and digest (`fingerprint`)."""
    files = {
        path.relative_to(checkpoint).as_posix(): fingerprint(path)
        for path in sorted(checkpoint.rglob("*"))
        if path.is_file() and path.name not in (MARKER, f"{MARKER}.tmp")
    }
    write_whole(checkpoint / MARKER, json.dumps({"step": step, "files": files}, indent=1) + "\n")


def write_whole(path: Path, text: str) -> None:
    """Write ``path`` under ``<name>.tmp``, then rename it: a kill leaves the old file or none, never half of one.

    For the files whose presence means something (a checkpoint's marker, a run's summary.json).
    """
    temporary = path.with_name(f"{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def fingerprint(path: Path) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file up to `WHOLE_HASH_BYTES`, ``{"size", "sha256_ends"}`` of a larger one."""
    size = path.stat().st_size
    if size <= WHOLE_HASH_BYTES:
        from sftcore.data.cache import file_digest

        return {"size": size, "sha256": file_digest(path, remember=False)}
    return {"size": size, "sha256_ends": _ends_digest(path)}


def _ends_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for offset in (0, os.fstat(handle.fileno()).st_size - END_BYTES):
            handle.seek(offset)
            remaining = END_BYTES
            while remaining and (block := handle.read(min(remaining, 1 << 20))):
                digest.update(block)
                remaining -= len(block)
    return digest.hexdigest()


def _differs(path: Path, expected: Mapping[str, Any]) -> bool:
    if "sha256_ends" in expected:
        return _ends_digest(path) != expected["sha256_ends"]
    from sftcore.data.cache import file_digest

    return file_digest(path, remember=False) != expected["sha256"]  # a whole file's, as any marker holds


def damage(checkpoint: Path, *, verify: bool = True) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or None when it is complete and intact.

    ``verify=False`` checks names and sizes only, without reading the files (module docstring).
    """
    if not (checkpoint / MARKER).is_file() or not (checkpoint / "trainer_state.json").is_file():
        return "it was not completely written (the run stopped while saving it)"
    text = (checkpoint / MARKER).read_text(encoding="utf-8", errors="replace")
    if text.strip().isdigit():  # an earlier sftcore wrote the bare step: nothing to verify
        return None
    try:
        listed = json.loads(text)["files"]
    except (ValueError, TypeError, KeyError):
        return f"its {MARKER} file is damaged"
    if not _well_formed(listed):
        return f"its {MARKER} file is damaged"
    for name, expected in listed.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['size']} when saved"
        if verify and _differs(path, expected):
            return f"{name} differs from the file saved (sha256)"
    return None


def _well_formed(listed: Any) -> bool:
    """Whether a marker's ``files`` maps each name to its integer size and a digest string."""
    return isinstance(listed, Mapping) and all(
        isinstance(entry, Mapping)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256_ends", entry.get("sha256")), str)
        for entry in listed.values()
    )


def is_complete(checkpoint: Path, *, verify: bool = True) -> bool:
    return damage(checkpoint, verify=verify) is None


def newest_complete(output: Path, *, verify: bool = True) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint, and the incomplete or damaged ones newer than it."""
    checkpoint, incomplete = newest_with_reasons(output, verify)
    return checkpoint, [path for path, _why in incomplete]


def newest_with_reasons(output: Path, verify: bool) -> tuple[Path | None, list[tuple[Path, str]]]:
    """`newest_complete`, with why each newer one is not: each checkpoint is read once."""
    incomplete: list[tuple[Path, str]] = []
    for _step, path in reversed(checkpoints(output)):
        if (why := damage(path, verify=verify)) is None:
            return path, incomplete
        incomplete.append((path, why))
    return None, incomplete


def logged_losses(checkpoint: Path | None, key: str = "loss") -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` (``loss``, ``eval_loss``) as logged up to ``checkpoint`` (its
    trainer_state.json), so a resumed curve is whole."""
    if checkpoint is None:
        return []
    history = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")).get("log_history", [])
    return [(int(entry["step"]), float(entry[key])) for entry in history if key in entry and "step" in entry]
