"""Template output as segments, and segments to training rows.

A template formats a row as ordered `Segment`s, each trained or not. The masker's one rule: the
ids before a trained segment are the inference prompt's ids, the tokenization of all the text
before it (since the last ``restart``) as one prompt; a trained segment is encoded on its own
and appended. Several trained segments share a row while each one's prompt ids begin with the
row's ids; where they do not (a seam the whole text tokenizes differently, a row that would
grow past ``max_length``), the turn starts a row of its own with exactly its prompt's ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from sftcore.tokens import Marked, encode_marked, encode_texts, special_affixes


class Segment(str):
    """One piece of a formatted row: its text (the segment reads and compares as it), and how it trains.

    ``trained``: its ids are supervised. ``eos``: the tokenizer's EOS id follows it (trained with
    it). ``restart``: the text before it is not its context; it begins a new row (a chat template
    whose rendering of later turns changes earlier ones). ``left_out``: why a reply that is in the
    text was not trained (counted); such a segment is never trained. ``text`` is the text as the
    template gave it (a `Marked` or `Rendered` keeps its markers there). A pair of segments
    unpacks as ``prompt, response``, as a template's pair does.
    """

    text: str
    trained: bool
    eos: bool
    restart: bool
    left_out: str

    def __new__(cls, text: str, trained: bool = False, eos: bool = False, restart: bool = False, left_out: str = "") -> Segment:
        segment = super().__new__(cls, text)
        segment.text, segment.trained, segment.eos, segment.restart, segment.left_out = text, trained, eos, restart, left_out
        return segment

    def replace(self, **changes: Any) -> Segment:
        """A copy with some of ``trained``, ``eos``, ``restart``, ``left_out`` (or ``text``) changed."""
        fields = {"text": self.text, "trained": self.trained, "eos": self.eos, "restart": self.restart, "left_out": self.left_out}
        return Segment(**{**fields, **changes})

    def __reduce__(self) -> tuple[Any, ...]:
        return Segment, (self.text, self.trained, self.eos, self.restart, self.left_out)

    def __repr__(self) -> str:
        flags = "".join(f", {k}={getattr(self, k)!r}" for k in ("trained", "eos", "restart", "left_out") if getattr(self, k))
        return f"Segment({self.text!r}{flags})"


def template_answer(result: Any, wrong: Any, kind: Any) -> Any:
    """A template's ``format()`` answer as the host takes it: a non-empty list of `Segment`s with
    text, or a ``(prompt, response)`` pair of strings; else ``wrong(problem)``, raised."""
    if isinstance(result, list) and result and all(isinstance(s, Segment) and isinstance(s.text, str) for s in result):
        return result
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise wrong(f"format() returned {kind(result)}, not a (prompt, response) pair of strings or a list of segments")
    for part, value in zip(("prompt", "response"), result):
        if not isinstance(value, str):
            raise wrong(f"format() returned a {part} of {kind(value)}, not a string")
    return result[0], result[1]


def as_segments(result: Any) -> list[Segment]:
    """A template's answer as segments: a ``(prompt, response)`` pair is the prompt untrained, then
    the response trained and followed by EOS."""
    if isinstance(result, list):
        return result
    return [Segment(result[0]), Segment(result[1], trained=True, eos=True)]


def pair_of(segments: Sequence[Segment]) -> tuple[str, str] | None:
    """``(prompt, response)`` of segments shaped as a pair (`as_segments`), else None."""
    if len(segments) != 2:
        return None
    prompt, response = segments
    plain = not (prompt.trained or prompt.eos or prompt.left_out or response.restart or response.left_out)
    return (prompt.text, response.text) if plain and response.trained and response.eos else None


class Rendered(str):
    """Text a chat template rendered: it reads as the template wrote it, while ``coded`` holds
    the same text with the template's own markers (those that are tokens) as private sentinel
    characters, so that a marker string written inside a message stays text.

    ``owns_specials``: the text begins with the template's BOS where it has one, so no leading
    special token of the tokenizer is added (as ``apply_chat_template`` tokenizes). Slicing or
    adding gives a plain ``str``; `join` keeps both forms.
    """

    coded: str
    encoder: Any
    owns_specials = True

    def __new__(cls, text: str, coded: str, encoder: Any) -> Rendered:
        rendered = super().__new__(cls, text)
        rendered.coded, rendered.encoder = coded, encoder
        return rendered

    def __reduce__(self) -> tuple[Any, ...]:
        return Rendered, (str(self), self.coded, self.encoder)


def join(texts: Sequence[str], like: str = "") -> str:
    """``"".join(texts)``, keeping `Rendered` (all of one encoder) and `Marked` (one marker set);
    no texts join to an empty text of ``like``'s kind."""
    if not texts:
        texts = [like[:0] if not isinstance(like, (Rendered, Marked)) else _empty(like)]
    if all(isinstance(t, Rendered) for t in texts):
        return Rendered("".join(texts), "".join(t.coded for t in texts), texts[0].encoder)
    if all(isinstance(t, Marked) for t in texts):
        return Marked("".join(texts), texts[0].markers)
    return "".join(texts)


def _empty(like: str) -> str:
    return Rendered("", "", like.encoder) if isinstance(like, Rendered) else Marked("", like.markers)


def encode_prompt_texts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Inference ids of each prompt: leading specials (unless the text owns them) + the text's ids."""
    prefix = special_affixes(tokenizer)[0]
    ids = encode_any(tokenizer, prompts)
    return [p if getattr(text, "owns_specials", False) else prefix + p for text, p in zip(prompts, ids)]


def encode_any(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Each text's ids alone: `Rendered` by its encoder, `Marked` with its markers, else as plain text."""
    out: list[list[int]] = [[] for _ in texts]
    rendered = [i for i, t in enumerate(texts) if isinstance(t, Rendered)]
    marked = [i for i, t in enumerate(texts) if isinstance(t, Marked)]
    plain = [i for i, t in enumerate(texts) if not isinstance(t, (Rendered, Marked))]
    if rendered:
        encoder = texts[rendered[0]].encoder
        for i, ids in zip(rendered, encoder.encode([texts[i].coded for i in rendered])):
            out[i] = ids
    for group, encode in ((marked, encode_marked), (plain, encode_texts)):
        if group:
            for i, ids in zip(group, encode(tokenizer, [texts[i] for i in group])):
                out[i] = ids
    return out


class Turn(NamedTuple):
    """A trained segment with the text before it: ``prompt`` (since the last restart) and ``reply``."""

    prompt: str
    reply: str
    eos: bool
    restart: bool


def turns_of(segments: Sequence[Segment]) -> tuple[list[Turn], list[str]]:
    """The trained turns of a segment list, and the reasons of the replies left out."""
    turns: list[Turn] = []
    left_out = [s.left_out for s in segments if s.left_out]
    context: list[str] = []
    restart = True
    for segment in segments:
        if segment.restart:
            context, restart = [], True
        if segment.trained and not segment.left_out:
            turns.append(Turn(join(context, like=segment.text), segment.text, segment.eos, restart))
            restart = False
        context.append(segment.text)
    return turns, left_out


class Outcome(NamedTuple):
    """What one example became: its training rows, and the reasons of the turns left out."""

    rows: list[dict]
    left_out: list[str]


def mask_examples(
    examples: Sequence[Sequence[Segment]], tokenizer: Any, max_length: int, fit: Any, supervise_prompt: bool = False
) -> list[Outcome]:
    """Each example's rows (`rows_of`), its prompts and replies encoded in one batch."""
    from sftcore.tokens import eos_id

    per = [turns_of(segments) for segments in examples]
    flat = [turn for turns, _ in per for turn in turns]
    prompts = encode_prompt_texts(tokenizer, [t.prompt for t in flat])
    replies = encode_any(tokenizer, [t.reply for t in flat])
    if any(t.eos for t in flat):
        eos = eos_id(tokenizer)
        replies = [r + [eos] if t.eos else r for t, r in zip(flat, replies)]
    out, at = [], 0
    for turns, left_out in per:
        n = len(turns)
        rows, dropped = rows_of(turns, prompts[at : at + n], replies[at : at + n], max_length, fit, supervise_prompt)
        out.append(Outcome(rows, left_out + dropped))
        at += n
    return out


def rows_of(
    turns: Sequence[Turn], prompt_ids: Sequence[list[int]], reply_ids: Sequence[list[int]], max_length: int, fit: Any,
    supervise_prompt: bool = False,
) -> tuple[list[dict], list[str]]:
    """One example's training rows from its turns' ids (``reply_ids`` with any EOS appended), and
    the reasons of the turns that fit no row.

    A turn joins the row before it when its prompt's ids begin with that row's ids and the
    row stays within ``max_length``; otherwise it starts a row: ``fit(prompt, reply)`` gives it
    (cut to ``max_length``, marked ``truncated``) or raises `RowDropped`. Each row counts its ``turns``.
    """
    from sftcore import IGNORE_INDEX, RowDropped

    rows: list[dict] = []
    dropped: list[str] = []
    for turn, prompt, reply in zip(turns, prompt_ids, reply_ids):
        row = rows[-1] if rows and not turn.restart and "truncated" not in rows[-1] else None
        if row is not None and len(prompt) + len(reply) <= max_length and prompt[: len(row["input_ids"])] == row["input_ids"]:
            gap = prompt[len(row["input_ids"]) :]
            row["input_ids"] += gap + reply
            row["labels"] += (gap if supervise_prompt else [IGNORE_INDEX] * len(gap)) + reply
            row["turns"] += 1
            continue
        try:
            new = fit(prompt, reply)
        except RowDropped as exc:
            dropped.append(exc.reason)
            continue
        new["turns"] = 1
        rows.append(new)
    return rows, dropped


def fit_whole(prompt: list[int], reply: list[int], max_length: int) -> dict:
    """A turn's row as it is, or `RowDropped` when it is longer than ``max_length``."""
    from sftcore import IGNORE_INDEX, RowDropped

    if len(prompt) + len(reply) > max_length:
        raise RowDropped("too-long", f"more than max_length {max_length} tokens")
    return {"input_ids": prompt + reply, "labels": [IGNORE_INDEX] * len(prompt) + reply}
