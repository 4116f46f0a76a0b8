"""Maskers `response-only` (loss on the response and EOS) and `full` (loss on every token).

Truncation policies, applied when prompt + response + EOS exceed ``max_length``:

* ``prompt-left`` (default): cut the prompt's oldest tokens, keeping its leading specials
  (BOS) and its end (the response marker). The prompt keeps at least half the budget when it
  is that long; the response gets the rest. A response cut short loses its EOS (the model must
  not learn to stop mid-sentence) and is counted as ``truncated: response``.
* ``right``: the reference recipe's behaviour, cut the whole sequence on the right; a row left
  without a supervised token is dropped.
* ``drop``: drop every row that does not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from sftcore import IGNORE_INDEX, RowDropped, hookimpl
from sftcore.data.segments import mask_examples, pair_of
from sftcore.tokens import clip_text, encode_prompts, encode_texts, eos_id, special_affixes

Truncation = Literal["prompt-left", "right", "drop"]


class SeparateMasker:
    """Prompt and response tokenized separately; ids concatenated; EOS appended as an id."""

    def __init__(self, truncation: Truncation = "prompt-left", train_on_prompt: bool = False) -> None:
        if truncation not in ("prompt-left", "right", "drop"):
            raise ValueError(f"truncation must be prompt-left, right or drop, not {truncation!r}")
        self.truncation = truncation
        self.train_on_prompt = train_on_prompt

    def __call__(self, prompt: str, response: str, tokenizer: Any, max_length: int) -> dict:
        result = self.batch([prompt], [response], tokenizer, max_length)[0]
        if isinstance(result, RowDropped):
            raise result
        return result

    def batch(
        self, prompts: Sequence[str], responses: Sequence[str], tokenizer: Any, max_length: int
    ) -> list[dict | RowDropped]:
        eos = eos_id(tokenizer)
        n_prefix = len(special_affixes(tokenizer)[0])
        # Truncation keeps the prompt's end (its response marker), except `right`, which keeps its start.
        side = "head" if self.truncation == "right" else "tail"
        clipped_prompts = [clip_text(tokenizer, p, max_length, side) for p in prompts]
        clipped_responses = [clip_text(tokenizer, r, max_length, "head") for r in responses]
        out: list[dict | RowDropped] = []
        encoded = zip(encode_prompts(tokenizer, clipped_prompts), encode_texts(tokenizer, clipped_responses))
        for i, (p, r) in enumerate(encoded):
            # A clipped text is a cut text, whatever its token count: a normalizer that folds
            # long runs (of spaces, say) could bring a clipped response under max_length, and
            # it must still not end in EOS.
            cut_response = len(clipped_responses[i]) < len(responses[i])
            try:
                row = self._one(p, r if cut_response else r + [eos], n_prefix, max_length)
            except RowDropped as dropped:
                out.append(dropped)
                continue
            if cut_response:
                row["truncated"] = "response"
            elif len(clipped_prompts[i]) < len(prompts[i]) and "truncated" not in row:
                row["truncated"] = "prompt"
            out.append(row)
        return out

    def segments(self, examples: Sequence[Sequence[Any]], tokenizer: Any, max_length: int) -> list[Any]:
        """Each row's segments masked: a pair as `batch` masks it; a conversation's (an `Outcome`)
        each trained segment after its inference prompt's ids, several sharing a row while their
        prompts' ids continue it, a turn alone too long for ``max_length`` cut as a pair is."""
        pairs = [pair_of(segments) for segments in examples]
        out: list[Any] = [None] * len(examples)
        simple = [i for i, pair in enumerate(pairs) if pair is not None]
        for i, result in zip(simple, self.batch([pairs[i][0] for i in simple], [pairs[i][1] for i in simple], tokenizer, max_length)):
            out[i] = result
        talks = [i for i, pair in enumerate(pairs) if pair is None]
        if talks:
            n_prefix = len(special_affixes(tokenizer)[0])
            fit = lambda prompt, reply: self._one(prompt, reply, n_prefix, max_length)  # noqa: E731
            masked = mask_examples([examples[i] for i in talks], tokenizer, max_length, fit, supervise_prompt=self.train_on_prompt)
            for i, outcome in zip(talks, masked):
                out[i] = outcome
        return out

    def _one(self, prompt: list[int], response: list[int], n_prefix: int, max_length: int) -> dict:
        truncated = None
        if len(prompt) + len(response) > max_length:
            if self.truncation == "drop":
                raise RowDropped("too-long", f"more than max_length {max_length} tokens")  # a clipped row's count is not its length
            if self.truncation == "right":
                response = response[: max(0, max_length - len(prompt))]
                prompt = prompt[:max_length]
                truncated = "response"
            else:
                keep = min(len(prompt), max(max_length - len(response), max_length // 2))
                if keep < len(prompt):
                    tail = max(0, keep - n_prefix)
                    prompt = prompt[:n_prefix] + (prompt[len(prompt) - tail :] if tail else [])
                    truncated = "prompt"
                room = max_length - len(prompt)
                if room < len(response):
                    response = response[: max(0, room)]
                    truncated = "response"
        if not response and not (self.train_on_prompt and len(prompt) > 1):  # `full` still learns the prompt
            raise RowDropped("prompt-too-long", f"no room left for the response within max_length {max_length}")
        labels = (prompt if self.train_on_prompt else [IGNORE_INDEX] * len(prompt)) + response
        row: dict = {"input_ids": prompt + response, "labels": list(labels)}
        if truncated:
            row["truncated"] = truncated
        return row


def full_masker(truncation: Truncation = "prompt-left") -> SeparateMasker:
    return SeparateMasker(truncation=truncation, train_on_prompt=True)


@hookimpl
def register_maskers(register):
    register("response-only", SeparateMasker, description="loss on response tokens and EOS only; prompt is -100")
    register("full", full_masker, description="loss on every token (prompt too), for comparison")
