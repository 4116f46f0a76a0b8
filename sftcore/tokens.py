"""Tokenizer conventions shared by maskers, `sft generate` and the test kit.

Prompt and response are tokenized separately and their ids concatenated, so the prompt's ids
are exactly what the model sees at inference and no token straddles the seam. User text is
encoded with ``split_special_tokens=True``: a literal ``</s>`` in a response stays text and
can never smuggle in a second EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_PROBE = "sftcore probe"


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special ids ``tokenizer(text)`` puts before and after the text (BOS, EOS, ...)."""
    cached = getattr(tokenizer, "_sftcore_affixes", None)
    if cached is not None:
        return cached
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            affixes = (list(full[:start]), list(full[start + len(plain) :]))
            break
    else:  # the tokenizer rewrites text when adding specials; fall back to its BOS convention
        bos = getattr(tokenizer, "bos_token_id", None)
        affixes = ([bos] if bos is not None and full[:1] == [bos] else [], [])
    try:
        tokenizer._sftcore_affixes = affixes
    except AttributeError:
        pass
    return affixes


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text alone: no special tokens added, special-token strings kept as text.

    Each distinct text is encoded once: data sets repeat prompts, and mixtures repeat whole rows.
    Every returned list is a fresh copy, so a caller may change one without touching another.
    """
    if not texts:
        return []
    unique = list(dict.fromkeys(texts))
    encoded = _backend_encode(tokenizer, unique)
    if encoded is None:
        # verbose=False: no "longer than the maximum ... indexing errors" warning; the masker enforces max_length.
        encoded = tokenizer(unique, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
        encoded = [list(ids) for ids in encoded]
    if len(unique) == len(texts):
        return encoded  # each list fresh from the tokenizer
    by_text = dict(zip(unique, encoded))
    return [list(by_text[text]) for text in texts]


def _backend_encode(tokenizer: Any, texts: list[str]) -> list[list[int]] | None:
    """What ``encode_texts`` asks of ``tokenizer``, straight from its Rust backend; None where that
    is not known to give the same ids.

    transformers' own call also computes character offsets and builds a Python object per text,
    then drops both: on Alpaca-sized rows that is about a third of the tokenizing time. Only a
    tokenizer class that does not override the call, with no truncation or padding set on its
    backend, takes this path; tests/test_cache.py checks it against the plain call.
    """
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "_tokenizer", None)
    cls = type(tokenizer)
    if (
        backend is None
        or not isinstance(tokenizer, PreTrainedTokenizerFast)
        or cls.__call__ is not PreTrainedTokenizerFast.__call__
        or getattr(cls, "_encode_plus", None) is not getattr(PreTrainedTokenizerFast, "_encode_plus", None)
        or backend.truncation is not None
        or backend.padding is not None
    ):
        return None
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = before


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Inference ids of each prompt: the tokenizer's leading specials (BOS) + the text's ids."""
    prefix = special_affixes(tokenizer)[0]
    return [prefix + ids for ids in encode_texts(tokenizer, prompts)]


# Characters kept beyond the bound in `clip_text`, so rows of ordinary length are never touched.
CLIP_MARGIN = 4096


def max_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters of text one token stands for: its longest vocabulary entry.

    A vocabulary entry spells its text with at least as many characters as the text has:
    byte-level BPE spells each byte with one character, SentencePiece a space with one '▁',
    byte fallback one byte with six ('<0xE9>').
    """
    cached = getattr(tokenizer, "_sftcore_token_chars", None)
    if cached is not None:
        return cached
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    try:
        tokenizer._sftcore_token_chars = longest
    except AttributeError:
        pass
    return longest


def clip_text(tokenizer: Any, text: str, max_length: int, keep: str = "head") -> str:
    """``text`` cut to a length that still makes more than ``max_length`` tokens; ``keep``: head or tail.

    A multi-megabyte row would otherwise be tokenized whole (seconds and gigabytes of ids) only
    to be cut to ``max_length``. The bound doubles the characters ``max_length + 1`` tokens can
    stand for (normalizers may fold two characters into one), plus a margin; tokens can differ
    from the whole text's only around the cut, far past the ``max_length`` tokens kept.
    """
    limit = 2 * (max_length + 1) * max_token_chars(tokenizer) + CLIP_MARGIN
    if len(text) <= limit:
        return text
    return text[:limit] if keep == "head" else text[-limit:]


def eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        from sftcore.errors import SftError

        raise SftError("the tokenizer has no EOS token: set `eos_token` in its tokenizer_config.json")
    return int(eos)
