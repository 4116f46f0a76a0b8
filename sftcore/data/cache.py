"""The prepared-data cache: masked rows on disk, keyed by everything that shapes them.

A run (or `sft prepare`) with the same data file content, tokenizer files, reader, template,
masker and loader (names, options, versions, code), ``max_length`` and ``on_bad_row`` loads
the rows instead of tokenizing again. An entry is one safetensors file of flat arrays plus the
row counts as JSON: loading it never runs code, unlike a pickle. It is written under a
temporary name and renamed, so a killed write is never taken for a complete entry; an entry
that does not read back whole is ignored and rebuilt. A temporary names its writer (pid and
host), so the next use of the cache removes one whose writer is dead. A cache that cannot be
written (read-only, full) is skipped with a warning: the run goes on without it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import re
import socket
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from sftcore import IGNORE_INDEX, __version__
from sftcore.data.pipeline import ROW_POLICIES, Prepared, row_policy

log = logging.getLogger("sftcore.data.cache")

FORMAT = 1  # bump when the file layout or what a key covers changes
# Weights never shape tokenization, and hashing gigabytes would cost more than tokenizing.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz", ".npy")
# A temporary not written to for this long is removed whoever wrote it: a writer on another
# machine (a shared cache), of an older sftcore, or a dead one whose pid a live process reuses.
STALE_TEMP_SECONDS = 3600
HOST = socket.gethostname()
# ".<pid>@<host>.<mkstemp's random part>.tmp"
_TEMPORARY = re.compile(r"\.(\d+)@(.+)\.[A-Za-z0-9_]+\.tmp")


class FlatRows(Sequence):
    """Masked rows as flat arrays; ``rows[i]`` is the dict a collator receives.

    ``offsets[i]:offsets[i + 1]`` spans row ``i`` in ``input_ids`` and ``labels``; ``source[i]``
    is its row number in the data file; ``truncated[i]`` indexes ``truncated_names`` (-1: not cut).
    """

    def __init__(self, input_ids, labels, offsets, source, truncated, truncated_names: Sequence[str]) -> None:
        self.input_ids, self.labels, self.offsets = input_ids, labels, offsets
        self.source, self.truncated, self.truncated_names = source, truncated, list(truncated_names)

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]]) -> FlatRows:
        import numpy as np

        lengths = np.fromiter((len(r["input_ids"]) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        names: dict[str, int] = {}
        truncated = np.array([names.setdefault(r["truncated"], len(names)) if r.get("truncated") else -1 for r in rows], dtype=np.int8)
        return cls(
            input_ids=_flat(rows, "input_ids", int(offsets[-1])),
            labels=_flat(rows, "labels", int(offsets[-1])),
            offsets=offsets,
            source=np.array([r["row"] for r in rows], dtype=np.int64),
            truncated=truncated,
            truncated_names=list(names),
        )

    def select(self, indices: Sequence[int]) -> FlatRows:
        """The rows at ``indices``, in that order, as flat arrays of their own."""
        import numpy as np

        index = np.asarray(indices, dtype=np.int64)
        starts, ends = self.offsets[index], self.offsets[index + 1]
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        spans = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)]) if len(index) else np.zeros(0, np.int64)
        return FlatRows(
            self.input_ids[spans], self.labels[spans], offsets, self.source[index], self.truncated[index],
            self.truncated_names,
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        row = {"input_ids": self.input_ids[start:end].tolist(), "labels": self.labels[start:end].tolist(), "row": int(self.source[index])}
        if self.truncated[index] >= 0:
            row["truncated"] = self.truncated_names[self.truncated[index]]
        return row

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> list[int]:
        import numpy as np

        return np.diff(self.offsets).tolist()

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def supervised_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def arrays(self) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids, "labels": self.labels, "offsets": self.offsets,
            "source": self.source, "truncated": self.truncated,
        }


def _flat(rows: Sequence[Mapping[str, Any]], field: str, total: int):
    import itertools

    import numpy as np

    return np.fromiter(itertools.chain.from_iterable(r[field] for r in rows), dtype=np.int32, count=total)


def flatten(prepared: Prepared) -> Prepared:
    """``prepared`` with its rows as `FlatRows` (compact, counted with numpy, storable)."""
    if not isinstance(prepared.rows, FlatRows):
        prepared.rows = FlatRows.from_rows(prepared.rows)
    return prepared


# ---- keys ----------------------------------------------------------------------------------


def file_digest(path: str | os.PathLike, *, remember: bool = True) -> str:
    """The sha256 of a file's content, hashed once per process while its size and mtime stay.

    ``remember=False`` reads it again whatever: a check for damage must not trust a stat.
    """
    if not remember:
        return _sha256(path)
    stat = os.stat(path)
    stamp = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if stamp not in _digests:  # a run hashes its data file for the cache key and for the run's record
        _digests[stamp] = _sha256(path)
    return _digests[stamp]


_digests: dict[tuple[str, int, int, int], str] = {}


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_digest(directory: str | os.PathLike) -> str:
    """Every file of a tokenizer or checkpoint directory but the weights, by name and content.

    Not only tokenizer files: a tokenizer may read any file of its directory (its config's
    ``model_max_length``, a remote-code vocabulary). An extra file only costs a cache miss.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            digest.update(f"{path.name}\0{file_digest(path)}\0".encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def package_digest(root: Path = Path(__file__).resolve().parent.parent) -> str:
    """The digest of every module of the sftcore package: the host's code that shapes a masked row
    (the data path, the token conventions, the checks on components' answers) is all in it, so no
    list of modules has to be kept; editing any of them starts new entries."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(f"{path.relative_to(root).as_posix()}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def source_digest(obj: Any) -> str | None:
    """The digest of the source file defining ``obj``, so editing a plugin invalidates its entries."""
    try:
        path = inspect.getsourcefile(obj)
    except TypeError:
        return None
    return file_digest(path) if path and os.path.isfile(path) else None


def component_identity(registry: Any, stage: str, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    component = registry.get(stage, name)
    return {
        "name": name,
        "options": dict(options),
        "provided_by": component.provided_by,
        "code": source_digest(component.factory),
    }


def key_parts(host: Any, config: Mapping[str, Any], tokenizer_dir: str | os.PathLike) -> dict[str, Any]:
    """What a prepared entry depends on, for an effective run config (see `sftcore.config.effective`)."""

    from sftcore.data.pipeline import reader_component

    if config.get("reader"):
        reader = component_identity(host.registry, "reader", config["reader"]["name"], config["reader"]["options"])
    else:
        reader = component_identity(host.registry, "reader", reader_component(host.registry, config["data"]).name, {})
    stages = {stage: component_identity(host.registry, stage, config[stage]["name"], config[stage]["options"]) for stage in ("template", "masker", "loader")}
    return {
        "format": FORMAT,
        "sftcore": __version__,
        "own_code": package_digest(),
        "libraries": {lib: _version(lib) for lib in ("transformers", "tokenizers")},
        "data": file_digest(config["data"]),
        # A file a template reads (chat_template=FILE.jinja) decides the rows as much as the data does.
        "template_files": {k: file_digest(v) for k, v in config["template"]["options"].items() if isinstance(v, str) and Path(v).is_file()},
        "tokenizer": tokenizer_digest(tokenizer_dir),
        "reader": reader,
        **stages,
        "max_length": config.get("max_length"),
        **{key: row_policy(config, key) for key in ROW_POLICIES},
    }


def make_key(parts: Mapping[str, Any]) -> str:
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ---- entries -------------------------------------------------------------------------------


def entry_path(directory: str | os.PathLike, key: str) -> Path:
    return Path(directory) / f"{key}.safetensors"


def _checksum(arrays: Mapping[str, Any]) -> int:
    value = 0
    for name in sorted(arrays):
        value = zlib.crc32(memoryview(arrays[name]).cast("B"), value)
    return value


def store(directory: str | os.PathLike, key: str, prepared: Prepared, max_length: int) -> Path | None:
    """Write ``prepared`` (rows flattened first) as the entry for ``key``; returns its path, or
    None (with a warning) when the cache cannot be written."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    rows = flatten(prepared).rows
    arrays = rows.arrays()
    meta = {
        "format": FORMAT,
        "key": key,
        "max_length": max_length,
        "rows_read": prepared.rows_read,
        "skipped": dict(prepared.skipped),
        "dropped": dict(prepared.dropped),
        "truncated": dict(prepared.truncated),
        "dropped_rows": {str(k): v for k, v in prepared.dropped_rows.items()},
        "duplicates": prepared.duplicates,
        "turns": dict(prepared.turns),
        "truncated_names": rows.truncated_names,
        "checksum": _checksum(arrays),
    }
    target = entry_path(directory, key)
    temporary = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(target.parent)
        handle, temporary = tempfile.mkstemp(prefix=f".{os.getpid()}@{HOST}.", suffix=".tmp", dir=target.parent)
        os.close(handle)
        save_file(arrays, temporary, metadata={"sftcore": json.dumps(meta)})
        os.replace(temporary, target)  # atomic: readers see the old entry, none, or the whole new one
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        _unlink(temporary)
        log.warning("cannot write the prepared-data cache in %s (%s); going on without it", target.parent, _reason(exc))
        return None
    except BaseException:
        _unlink(temporary)
        raise
    return target


def _unlink(path: str | None) -> None:
    if path is not None:
        Path(path).unlink(missing_ok=True)


def _reason(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def load(directory: str | os.PathLike, key: str) -> tuple[Prepared, int] | None:
    """``(prepared, max_length)`` stored for ``key``, or None when there is no whole entry."""
    path = entry_path(directory, key)
    if path.parent.is_dir():
        _remove_stale_temporaries(path.parent)
    if not path.is_file():
        return None
    try:
        return _read(path, key)
    except Exception as exc:  # a damaged file can fail in any layer (header, JSON, arrays): rebuild it
        log.warning("ignoring the damaged cache entry %s (%s: %s); preparing the data again", path, type(exc).__name__, exc)
        return None


def _read(path: Path, key: str) -> tuple[Prepared, int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        meta = json.loads(handle.metadata()["sftcore"])
        arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    if meta.get("format") != FORMAT or meta.get("key") != key:
        raise ValueError("written for another key or format")
    if meta["checksum"] != _checksum(arrays):
        raise ValueError("checksum mismatch")
    rows = FlatRows(**arrays, truncated_names=meta["truncated_names"])
    offsets = rows.offsets
    n = len(rows)
    if not (offsets[0] == 0 and offsets[-1] == len(rows.input_ids) == len(rows.labels) and len(rows.source) == len(rows.truncated) == n):
        raise ValueError("inconsistent array lengths")
    prepared = Prepared(
        rows=rows,
        rows_read=int(meta["rows_read"]),
        skipped=Counter(meta["skipped"]),
        dropped=Counter(meta["dropped"]),
        truncated=Counter(meta["truncated"]),
        dropped_rows={int(k): v for k, v in meta["dropped_rows"].items()},
        duplicates=int(meta.get("duplicates", 0)),
        turns=Counter(meta.get("turns", {})),
    )
    return prepared, int(meta["max_length"])


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporaries a killed write left behind, never those of a write in progress."""
    for path in directory.glob(".*.tmp"):
        try:
            if _abandoned(path):
                path.unlink()
        except OSError:  # gone already (another process removed it), or the cache is read-only
            continue


def _abandoned(path: Path) -> bool:
    # A live writer keeps writing to its file; one untouched this long is stale whoever holds
    # its pid now (a pid is reused, after a reboot or a container restart).
    if path.stat().st_mtime < time.time() - STALE_TEMP_SECONDS:
        return True
    match = _TEMPORARY.fullmatch(path.name)
    return bool(match and match.group(2) == HOST and not _alive(int(match.group(1))))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
