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
    backend = _plain_backend(tokenizer)
    if backend is None:
        return None
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = before


class Marked(str):
    """Text a template rendered, whose ``markers`` are the template's own structure (ChatML's
    ``<|im_start|>``, say), never user text: the template rejects contents holding one.

    Where the tokenizer has a marker as an added token, `encode_prompts` encodes it as that
    token's id, splitting the text around it as the tokenizer's own call does at inference (see
    `marker_backend`), while any other special-token string stays text, so a ``</s>`` typed by a
    user never becomes EOS. A marker the tokenizer lacks is text. Slicing or adding gives a
    plain ``str``; `clip_text` keeps the markers.
    """

    markers: tuple[str, ...]

    def __new__(cls, text: str, markers: Sequence[str]) -> Marked:
        marked = super().__new__(cls, text)
        marked.markers = tuple(markers)
        return marked

    def __reduce__(self) -> tuple[Any, ...]:
        return Marked, (str(self), self.markers)


def _plain_backend(tokenizer: Any) -> Any | None:
    """The tokenizer's Rust backend where calling it gives what the tokenizer's own call gives:
    a tokenizer class that does not override the call, with no truncation or padding set."""
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
    return backend


def marker_backend(tokenizer: Any, markers: Sequence[str]) -> Any | None:
    """A copy of the tokenizer's Rust backend that splits text at ``markers`` and at nothing else.

    In the copy, the markers the tokenizer has as added tokens are ordinary added tokens (always
    matched) and every other special token stays special, so with ``encode_special_tokens`` on
    it encodes a marker as its id and a ``</s>`` typed by a user as text. Around each marker it
    does exactly what the tokenizer's own call does (a SentencePiece ``▁`` only at the very
    start, ``lstrip``/``rstrip``, normalization), since that is the same code. None where the
    tokenizer has none of the markers or no plain Rust backend: the markers are then text.
    Built once per tokenizer, markers and vocabulary size.
    """
    if not markers:
        return None
    backend = _plain_backend(tokenizer)
    if backend is None:
        return None
    key = (tuple(markers), len(tokenizer))
    cached = getattr(tokenizer, "_sftcore_marker_backend", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    import json

    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    found = [token for token in spec.get("added_tokens", []) if token["content"] in markers]
    for token in found:
        token["special"] = False
    copy = Tokenizer.from_str(json.dumps(spec)) if found else None
    if copy is not None:
        copy.encode_special_tokens = True
    try:
        tokenizer._sftcore_marker_backend = (key, copy)
    except AttributeError:
        pass
    return copy


def encode_marked(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """`encode_texts`, but with the markers of `Marked` texts as their token ids (see `Marked`)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, text in enumerate(texts):
        groups.setdefault(getattr(text, "markers", ()), []).append(index)
    out: list[list[int]] = [[] for _ in texts]
    for markers, indices in groups.items():
        copy = marker_backend(tokenizer, markers)
        group = [texts[i] for i in indices]
        if copy is None:
            encoded = encode_texts(tokenizer, group)
        else:
            encode = getattr(copy, "encode_batch_fast", copy.encode_batch)
            encoded = [encoding.ids for encoding in encode([str(text) for text in group], add_special_tokens=False)]
        for i, ids in zip(indices, encoded):
            out[i] = ids
    return out


def encode_marked_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
    """`encode_marked` of one text with each token's character span; None where its markers are
    not tokens of this tokenizer (the text is then encoded as plain text)."""
    copy = marker_backend(tokenizer, getattr(text, "markers", ()))
    if copy is None:
        return None
    encoding = copy.encode(str(text), add_special_tokens=False)
    return list(encoding.ids), [tuple(span) for span in encoding.offsets]


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Inference ids of each prompt: the tokenizer's leading specials (BOS) + the text's ids."""
    prefix = special_affixes(tokenizer)[0]
    return [prefix + ids for ids in encode_marked(tokenizer, prompts)]


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
    clipped = text[:limit] if keep == "head" else text[-limit:]
    return Marked(clipped, text.markers) if isinstance(text, Marked) else clipped


def eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        from sftcore.errors import SftError

        raise SftError("the tokenizer has no EOS token: set `eos_token` in its tokenizer_config.json")
    return int(eos)


# Public here, defined in sftcore.data.segments (which imports this module): what a masker of
# segments needs. Looked up on first use, so importing either module never imports the other's.
SEGMENT_HELPERS = ("Segment", "Outcome", "mask_examples", "as_segments")


def __getattr__(name: str) -> Any:
    if name in SEGMENT_HELPERS:
        from sftcore.data import segments

        return getattr(segments, name)
    raise AttributeError(f"module 'sftcore.tokens' has no attribute {name!r}")
