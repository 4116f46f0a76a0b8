"""ChatML for sftcore: template ``chatml`` and masker ``chatml`` for multi-turn chat rows.

A row is ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``
ending with an assistant reply; an Alpaca row (``instruction``, ``input``, ``output``) is read
as one user turn and one assistant turn. Each message renders as::

    <|im_start|>{role}\\n{content}<|im_end|>\\n

The template answers with segments (``sftcore.tokens.Segment``): for each assistant turn
the conversation before it up to ``<|im_start|>assistant\\n``, untrained, then its content and
``<|im_end|>``, trained, so no masker has to find the turns again. The masker decides which
turns learn (``train_on: all-assistant``, the default, or ``last``), ends the last reply with
EOS (unless EOS is ``<|im_end|>`` itself) and cuts rows that are too long; sftcore's
``sftcore.tokens.mask_examples`` puts each turn after its inference prompt's ids.
Messages may not contain the markers themselves.

Contents are stripped of surrounding whitespace: each reply is encoded apart from its prompt,
which ends in a newline, and a leading space or newline would merge with that newline into one
token when the whole conversation is encoded as one text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from sftcore import IGNORE_INDEX, RowDropped, hookimpl
from sftcore.errors import FieldError, UsageError
from sftcore.tokens import Marked, Segment, eos_id, mask_examples, special_affixes

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
MARKERS = (IM_START, IM_END)
ROLES = ("system", "user", "assistant")
GENERATION_PROMPT = f"{IM_START}assistant\n"

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

    def format(self, example: Mapping[str, Any]) -> list[Segment]:
        """Per assistant turn: the text before it (untrained), then its content and ``<|im_end|>`` (trained)."""
        turns = self.turns(example)
        if turns[-1][0] != "assistant":
            if self.field not in example:
                raise FieldError("output", "is missing", reason="missing-field")
            last = f"{self.field}[{len(example[self.field]) - 1}].role"
            raise FieldError(last, "the last message must be the assistant reply to learn", reason="no-reply")
        segments, before = [], []
        for role, content in turns:
            if role == "assistant":
                # After a reply, its <|im_end|>'s newline: the rendering continues exactly.
                segments.append(Segment(Marked(("\n" if segments else "") + render(before) + GENERATION_PROMPT, MARKERS)))
                segments.append(Segment(Marked(content + IM_END, MARKERS), trained=True))
                before = []
            else:
                before.append((role, content))
        return segments

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

    It masks the template's segments (``segments()``): each reply after its inference prompt's
    ids, exactly as ``sft generate`` encodes the prompt (the template declares its markers,
    `sftcore.tokens.Marked`, so a tokenizer with ChatML tokens gets their ids, one without gets
    them as text), the reply encoded on its own; turns share a row while their prompts' ids
    continue it (`sftcore.tokens.mask_examples`). The last reply ends with EOS, unless
    EOS is ``<|im_end|>`` itself.

    :param train_on: ``all-assistant`` supervises every assistant turn, ``last`` only the last.
    :param truncation: when a turn's row exceeds ``max_length``, ``prompt-left`` cuts the oldest
        prompt tokens (keeping BOS; a reply cut short loses its end markers), ``drop`` drops it.
    """

    def __init__(self, train_on: TrainOn = "all-assistant", truncation: Truncation = "prompt-left") -> None:
        if train_on not in ("all-assistant", "last"):
            raise ValueError(f"train_on must be all-assistant or last, not {train_on!r}")
        if truncation not in ("prompt-left", "drop"):
            raise ValueError(f"truncation must be prompt-left or drop, not {truncation!r}")
        self.train_on = train_on
        self.truncation = truncation

    def __call__(self, prompt: str, response: str, tokenizer: Any, max_length: int) -> dict:
        """A (prompt, response) pair is not a ChatML conversation: refused (see `segments`)."""
        raise _not_chatml()

    def segments(self, examples: Sequence[Sequence[Segment]], tokenizer: Any, max_length: int) -> list[Any]:
        if not all(any(IM_START in str(s.text) for s in segments) for segments in examples):
            raise _not_chatml()
        eos_is_end = tokenizer.get_added_vocab().get(IM_END) == eos_id(tokenizer)
        chosen = [self._choose(list(segments), eos_is_end) for segments in examples]
        n_prefix = len(special_affixes(tokenizer)[0])
        return mask_examples(chosen, tokenizer, max_length, lambda p, r: self._fit(p, r, n_prefix, max_length))

    def _choose(self, segments: list[Segment], eos_is_end: bool) -> list[Segment]:
        """The turns that learn (all, or the last), the last one ending with EOS."""
        last = max(i for i, s in enumerate(segments) if s.trained)
        out = [s.replace(trained=False) if s.trained and self.train_on == "last" and i != last else s for i, s in enumerate(segments)]
        out[last] = out[last].replace(eos=not eos_is_end)
        return out

    def _fit(self, prompt: list[int], reply: list[int], n_prefix: int, max_length: int) -> dict:
        truncated = None
        if len(prompt) + len(reply) > max_length:
            if self.truncation == "drop":
                raise RowDropped("too-long", f"{len(prompt) + len(reply)} tokens > max_length {max_length}")
            keep = min(len(prompt), max(max_length - len(reply), max_length // 2))
            if keep < len(prompt):
                prompt = prompt[:n_prefix] + prompt[len(prompt) - max(0, keep - n_prefix) :]
                truncated = "prompt"
            room = max(0, max_length - len(prompt))
            if room < len(reply):
                reply = reply[:room]
                truncated = "response"
        if not reply:
            raise RowDropped("prompt-too-long", f"no room left for the reply within max_length {max_length}")
        row: dict = {"input_ids": prompt + reply, "labels": [IGNORE_INDEX] * len(prompt) + reply}
        if truncated:
            row["truncated"] = truncated
        return row


def _not_chatml() -> UsageError:
    return UsageError(
        "the chatml masker needs a ChatML conversation, the chatml template's segments; use it with the chatml template"
    )


@hookimpl
def register_templates(register):
    register("chatml", ChatMLTemplate, description="ChatML conversation (messages: system/user/assistant), multi-turn")


@hookimpl
def register_maskers(register):
    register("chatml", ChatMLMasker, description="loss on each assistant turn + <|im_end|> (or the last only); rest -100")
