"""Run a function over batches in worker processes, results in input order."""

from __future__ import annotations

import gc
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

_shared: tuple[Any, ...] = ()


def map_in_order(
    function: Callable[..., Any], batches: Sequence[tuple[Any, ...]], shared: tuple[Any, ...], workers: int = 1
) -> Iterator[Any]:
    """``function(*shared, *batch)`` for each batch, in order; in ``workers`` processes when above 1.

    ``shared`` (a masker and a tokenizer) reaches each worker once, not once per batch. Workers
    are forked where the platform can, so nothing needs pickling and no worker re-imports
    transformers; elsewhere ``shared`` must pickle.
    """
    workers = min(workers, len(batches))
    if workers <= 1:
        return (function(*shared, *batch) for batch in batches)
    return _pooled(function, batches, shared, workers)


def _pooled(function: Callable[..., Any], batches: Iterable[tuple[Any, ...]], shared: tuple[Any, ...], workers: int) -> Iterator[Any]:
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # A forked worker's garbage collector would walk, and so copy, every page of the parent's
    # heap; frozen objects are left alone.
    gc.freeze()
    try:
        with context.Pool(workers, initializer=_init, initargs=(function, shared)) as pool:
            yield from pool.imap(_call, batches)
    finally:
        gc.unfreeze()


def _init(function: Callable[..., Any], shared: tuple[Any, ...]) -> None:
    global _shared
    # Each worker is one of several processes already: the tokenizer's own thread pool would
    # only oversubscribe the cores (and a forked child cannot use the parent's pool anyway).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _shared = (function, *shared)


def _call(batch: tuple[Any, ...]) -> Any:
    function, *shared = _shared
    return function(*shared, *batch)
