"""Which weight files sftcore loads: safetensors, never a pickle unless the user says so.

A pickle (``pytorch_model.bin``, ``*.pt``) can run arbitrary code while it loads. transformers
loads them with ``weights_only=True`` today, but that guard has had escapes; safetensors holds
tensors and nothing else. A checkpoint directory with pickles only is refused with a message
saying how to convert it, or how to opt in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sftcore.errors import SftError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Trainer bookkeeping the model loader never reads (TrainingArguments, optimizer, RNG state).
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"}


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


@contextmanager
def loading(what: str, path: str) -> Iterator[None]:
    """Turn what transformers raises for a missing, partial or corrupt checkpoint into one line.

    A file cut short by a killed copy fails in safetensors' header check (SafetensorError).
    """
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as exc:
        raise SftError(f"cannot load the {what} from {path}: {' '.join(str(exc).split())}") from None
