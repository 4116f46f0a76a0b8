"""ChatML for sftcore: template ``chatml`` and masker ``chatml`` for multi-turn chat rows.

A row is ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``
ending with the assistant reply to learn; an Alpaca row (``instruction``, ``input``,
``output``) is read as one user turn and one assistant turn. Each message renders as::

    <|im_start|>{role}\\n{content}<|im_end|>\\n

The template's prompt is the conversation up to and including the last
``<|im_start|>assistant\\n``; its response is the last assistant content. The masker finds the
earlier assistant turns in the prompt, so it can supervise every assistant turn (``train_on:
all-assistant``, the default) or the last one only (``train_on: last``). Messages may not
contain the markers themselves, so finding turns is unambiguous.

Contents are stripped of surrounding whitespace: the reply is encoded apart from the prompt,
which ends in a newline, and a leading space or newline would merge with that newline into one
token when the whole conversation is encoded as one text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from sftcore import IGNORE_INDEX, RowDropped, hookimpl
from sftcore.errors import FieldError, UsageError
from sftcore.tokens import Marked, encode_marked_offsets, encode_texts, eos_id, special_affixes

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
MARKERS = (IM_START, IM_END)
ROLES = ("system", "user", "assistant")
GENERATION_PROMPT = f"{IM_START}assistant\n"
_ASSISTANT_TURN = re.compile(f"{re.escape(IM_START)}assistant\n(.*?){re.escape(IM_END)}", re.DOTALL)

TrainOn = Literal["all-assistant", "last"]
Truncation = Literal["prompt-left", "drop"]


def render(turns: Sequence[tuple[str, str]]) -> str:
    return "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in turns)


class ChatMLTemplate:
    """Template ``chatml``.

    :param system: a system message to put first when a conversation has none.
    :param messages_field: the row field holding the message list.
    """

    def __init__(self, system: str | None = None, messages_field: str = "messages") -> None:
        self.system = None if system is None else _content(system, "system")
        self.field = messages_field

    def format(self, example: Mapping[str, Any]) -> tuple[str, str]:
        turns = self.turns(example)
        if turns[-1][0] != "assistant":
            if self.field not in example:
                raise FieldError("output", "is missing", reason="missing-field")
            last = f"{self.field}[{len(example[self.field]) - 1}].role"
            raise FieldError(last, "the last message must be the assistant reply to learn", reason="no-reply")
        return _prompt(turns), turns[-1][1]

    def format_prompt(self, example: Mapping[str, Any]) -> str:
        """The conversation before the last assistant reply (or all of it), then the generation prompt."""
        return _prompt(self.turns(example))

    def turns(self, example: Mapping[str, Any]) -> list[tuple[str, str]]:
        """``(role, content)`` pairs, checked; the configured system message first when there is none."""
        if self.field in example:
            turns = self._messages(example[self.field])
        elif "instruction" in example:
            turns = _alpaca(example)
        else:
            raise FieldError(self.field, "is missing (an Alpaca row with 'instruction' is accepted too)", reason="missing-field")
        if self.system and turns[0][0] != "system":
            turns.insert(0, ("system", self.system))
        return turns

    def _messages(self, messages: Any) -> list[tuple[str, str]]:
        if not isinstance(messages, list):
            raise FieldError(self.field, f"must be a list of messages, got {type(messages).__name__}", reason="wrong-type")
        if not messages:
            raise FieldError(self.field, "is empty", reason="empty-field")
        turns = []
        for i, message in enumerate(messages):
            where = f"{self.field}[{i}]"
            if not isinstance(message, Mapping):
                raise FieldError(where, f"must be an object with role and content, got {type(message).__name__}", reason="wrong-type")
            role = message.get("role")
            if role not in ROLES:
                raise FieldError(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}", reason="bad-role")
            if role == "system" and i > 0:
                raise FieldError(f"{where}.role", "a system message may only come first", reason="bad-role")
            turns.append((role, _content(message.get("content"), f"{where}.content")))
        return turns


def _prompt(turns: list[tuple[str, str]]) -> Marked:
    """The prompt, its markers declared: contents cannot hold one (`_content` rejects them)."""
    if turns[-1][0] == "assistant":
        turns = turns[:-1]
    return Marked(render(turns) + GENERATION_PROMPT, MARKERS)


def _alpaca(example: Mapping[str, Any]) -> list[tuple[str, str]]:
    user = _content(example.get("instruction"), "instruction")
    context = example.get("input")
    if context is not None and not isinstance(context, str):
        raise FieldError("input", f"must be a string, got {type(context).__name__}", reason="wrong-type")
    if context and context.strip():
        user += "\n\n" + _content(context, "input")
    turns = [("user", user)]
    if example.get("output") is not None:
        turns.append(("assistant", _content(example["output"], "output")))
    return turns


def _content(value: Any, field: str) -> str:
    if value is None:
        raise FieldError(field, "is missing", reason="missing-field")
    if not isinstance(value, str):
        raise FieldError(field, f"must be a string, got {type(value).__name__}", reason="wrong-type")
    if not value.strip():
        raise FieldError(field, "is empty", reason="empty-field")
    for marker in (IM_START, IM_END):
        if marker in value:
            # The masker finds turns by their markers; one inside a message would split it.
            raise FieldError(field, f"contains the ChatML marker {marker}", reason="marker-in-content")
    return value.strip()


class ChatMLMasker:
    """Masker ``chatml``: supervises assistant turns, each its content plus ``<|im_end|>``.

    The prompt is encoded exactly as ``sftcore.tokens.encode_prompts`` encodes it for ``sft
    generate``, so training and inference see the same prompt ids on every tokenizer: the
    template declares its markers (`sftcore.tokens.Marked`), so a tokenizer that has ChatML
    tokens gets their ids, as its own call and chat template give at inference, with the text
    between them encoded as user text; for one without, the prompt is encoded in one piece, the
    markers as text. (Encoding it turn by turn would not match: a SentencePiece tokenizer starts
    every piece with ``▁``.) Earlier assistant turns inside the prompt are found by character
    offsets; a token that straddles a turn's edge is supervised. The reply is encoded on its
    own and followed by ``<|im_end|>`` (the tokenizer's id when it has that token, else the ids
    of its text) and EOS, unless EOS is ``<|im_end|>`` itself.

    :param train_on: ``all-assistant`` supervises every assistant turn, ``last`` only the reply
        the template returned.
    :param truncation: when a row exceeds ``max_length``, ``prompt-left`` cuts the oldest prompt
        tokens (keeping BOS; a reply cut short loses its end markers), ``drop`` drops the row.
    """

    def __init__(self, train_on: TrainOn = "all-assistant", truncation: Truncation = "prompt-left") -> None:
        if train_on not in ("all-assistant", "last"):
            raise ValueError(f"train_on must be all-assistant or last, not {train_on!r}")
        if truncation not in ("prompt-left", "drop"):
            raise ValueError(f"truncation must be prompt-left or drop, not {truncation!r}")
        self.train_on = train_on
        self.truncation = truncation

    def __call__(self, prompt: str, response: str, tokenizer: Any, max_length: int) -> dict:
        if not (prompt.startswith(IM_START) and prompt.endswith(GENERATION_PROMPT)):
            raise UsageError(
                "the chatml masker needs a ChatML prompt, one that starts with <|im_start|> and ends "
                "with <|im_start|>assistant; use it with the chatml template"
            )
        prefix = special_affixes(tokenizer)[0]
        ids, labels = self._prompt(prompt, tokenizer)
        tail = encode_texts(tokenizer, [response])[0] + end_of_reply(tokenizer)
        return self._fit(prefix + ids, [IGNORE_INDEX] * len(prefix) + labels, tail, len(prefix), max_length)

    def _prompt(self, prompt: str, tokenizer: Any) -> tuple[list[int], list[int]]:
        encoded = encode_marked_offsets(tokenizer, prompt)  # a tokenizer with ChatML tokens
        if encoded is None:
            try:
                plain = tokenizer(prompt, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
            except NotImplementedError:  # slow tokenizers have no offsets
                raise UsageError("the chatml masker needs a fast tokenizer, one that reports character offsets") from None
            encoded = list(plain["input_ids"]), plain["offset_mapping"]
        ids, offsets = encoded
        spans = [(m.start(1), m.end()) for m in _ASSISTANT_TURN.finditer(prompt)] if self.train_on == "all-assistant" else []
        labels = [IGNORE_INDEX] * len(ids)
        for i, (begin, end) in enumerate(offsets):
            if any(begin < stop and max(end, begin + 1) > start for start, stop in spans):
                labels[i] = ids[i]
        return ids, labels

    def _fit(self, ids: list[int], labels: list[int], tail: list[int], n_prefix: int, max_length: int) -> dict:
        truncated = None
        if len(ids) + len(tail) > max_length:
            if self.truncation == "drop":
                raise RowDropped("too-long", f"{len(ids) + len(tail)} tokens > max_length {max_length}")
            keep = min(len(ids), max(max_length - len(tail), max_length // 2))
            if keep < len(ids):
                cut = len(ids) - max(0, keep - n_prefix)
                ids, labels = ids[:n_prefix] + ids[cut:], labels[:n_prefix] + labels[cut:]
                truncated = "prompt"
            room = max(0, max_length - len(ids))
            if room < len(tail):
                tail = tail[:room]
                truncated = "response"
        if not tail:
            raise RowDropped("prompt-too-long", f"no room left for the reply within max_length {max_length}")
        row: dict = {"input_ids": ids + tail, "labels": labels + tail}
        if truncated:
            row["truncated"] = truncated
        return row


def end_of_reply(tokenizer: Any) -> list[int]:
    """``<|im_end|>`` as the tokenizer's id when it has that token, else its text's ids; then EOS unless EOS is it."""
    added = tokenizer.get_added_vocab()
    end = [added[IM_END]] if IM_END in added else encode_texts(tokenizer, [IM_END])[0]
    eos = eos_id(tokenizer)
    return end if end == [eos] else end + [eos]


@hookimpl
def register_templates(register):
    register("chatml", ChatMLTemplate, description="ChatML conversation (messages: system/user/assistant), multi-turn")


@hookimpl
def register_maskers(register):
    register("chatml", ChatMLMasker, description="loss on each assistant turn + <|im_end|> (or the last only); rest -100")
