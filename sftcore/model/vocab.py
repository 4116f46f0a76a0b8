"""Token ids against the model's input embeddings.

An id without an embedding row fails deep in the forward pass (a 99-line IndexError on CPU, a
device-side assert on CUDA), mid-training. Two checks say why in one line before that:

* `fit_embeddings`, in a loader: a tokenizer whose own (base) vocabulary is larger than the
  embeddings belongs to another model and is refused; tokens added on top of the model's own
  vocabulary (a pad token, chat markers) get new embedding rows, and the log says how many.
* `check_token_ids`, after loading: every id of the prepared rows (any masker's, any loader's)
  has a row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sftcore import IGNORE_INDEX
from sftcore.errors import SftError

log = logging.getLogger("sftcore.loader")

PAD_MULTIPLE = 64  # new embedding rows are rounded up to this: matmul kernels prefer such shapes
SHOWN_TOKENS = 5


def embedding_rows(model: Any) -> int:
    """How many rows the input embeddings have, also where a process holds only a shard of them."""
    weight = model.get_input_embeddings().weight
    shape = getattr(weight, "ds_shape", None)  # DeepSpeed ZeRO-3: weight.shape is (0,), the full one is here
    return int(shape[0] if shape is not None else weight.shape[0])


def fit_embeddings(model: Any, tokenizer: Any, source: str) -> None:
    """Refuse another model's tokenizer; give the tokens added to the model's own tokenizer embedding rows.

    The new rows are initialised to the mean of the old ones (transformers' ``mean_resizing``).
    """
    rows = embedding_rows(model)
    refuse_foreign_tokenizer(rows, tokenizer, source)
    beyond = sorted((i, t) for t, i in tokenizer.get_vocab().items() if i >= rows)
    if not beyond:
        return
    with quiet("transformers.modeling_utils"):  # its mean_resizing notice; the line below says it
        model.resize_token_embeddings(beyond[-1][0] + 1, pad_to_multiple_of=PAD_MULTIPLE, mean_resizing=True)
    names = ", ".join(t for _, t in beyond[:SHOWN_TOKENS]) + (", ..." if len(beyond) > SHOWN_TOKENS else "")
    log.info(
        "embeddings: %d -> %d rows for %d token(s) added to the model's %d (%s), initialised to the mean of the others",
        rows, embedding_rows(model), len(beyond), rows, names,
    )


def refuse_foreign_tokenizer(rows: int, tokenizer: Any, source: str) -> None:
    """Raise `SftError` when the tokenizer's own vocabulary (without added tokens) outgrows ``rows`` embeddings.

    A loader may call it before loading weights too, with the config's ``vocab_size``.
    """
    base = int(tokenizer.vocab_size)
    if base > rows:
        raise SftError(
            f"the tokenizer in {source} has a vocabulary of {base:,} tokens but the model's embeddings have "
            f"{rows:,} rows: it is another model's tokenizer; use the tokenizer saved with this model"
        )


@contextmanager
def quiet(logger_name: str) -> Iterator[None]:
    """Drop ``logger_name``'s records below ERROR while inside (for a notice sftcore states itself)."""
    logger = logging.getLogger(logger_name)
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def check_token_ids(model: Any, tokenizer: Any, *row_sets: Sequence[dict] | None) -> None:
    """Raise `SftError` if an input id or label of the prepared rows has no embedding row in ``model``."""
    from sftcore.data.cache import FlatRows

    rows = embedding_rows(model)
    for row_set in row_sets:
        if not row_set:
            continue
        flat = row_set if isinstance(row_set, FlatRows) else FlatRows.from_rows(row_set)
        found = out_of_range(flat, rows)
        if found is not None:
            token_id, hit, first = found
            raise SftError(
                f"token id {token_id} has no embedding (the model has {rows:,}: ids 0-{rows - 1}) in {hit} of "
                f"{len(flat)} prepared rows, the first from data row {first}: {likely_cause(tokenizer, token_id)}"
            )


def out_of_range(flat: Any, rows: int) -> tuple[int, int, int] | None:
    """``(an offending id, rows holding one, the data row of the first)``, or None when all fit."""
    import numpy as np

    ids, labels = flat.input_ids, flat.labels
    bad = (ids < 0) | (ids >= rows) | ((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= rows)))
    positions = np.flatnonzero(bad)
    if not len(positions):
        return None
    where = np.unique(np.searchsorted(flat.offsets, positions, side="right") - 1)
    first = int(positions[0])
    token_id = int(ids[first]) if not 0 <= ids[first] < rows else int(labels[first])
    return token_id, len(where), int(flat.source[where[0]])


def likely_cause(tokenizer: Any, token_id: int) -> str:
    token = tokenizer.convert_ids_to_tokens(token_id) if token_id >= 0 else None
    if token is None:
        return "no token of the tokenizer has that id, so the masker made it; check the masker"
    if token_id == tokenizer.eos_token_id:
        return (
            f"it is the tokenizer's EOS {token!r}; check eos_token in tokenizer_config.json against the model's own"
        )
    return (
        f"it is the tokenizer's {token!r}, which the model has no embedding for; use the model's own tokenizer, "
        "or a loader that adds embedding rows for added tokens"
    )
