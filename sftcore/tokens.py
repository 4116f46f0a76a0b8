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
    """Token ids of each text alone: no special tokens added, special-token strings kept as text."""
    if not texts:
        return []
    # verbose=False: no "longer than the maximum ... indexing errors" warning; the masker enforces max_length.
    encoded = tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Inference ids of each prompt: the tokenizer's leading specials (BOS) + the text's ids."""
    prefix = special_affixes(tokenizer)[0]
    return [prefix + ids for ids in encode_texts(tokenizer, prompts)]


def eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        from sftcore.errors import SftError

        raise SftError("the tokenizer has no EOS token: set `eos_token` in its tokenizer_config.json")
    return int(eos)
