"""Collator `pad`: right-pad to the longest row (optionally to a multiple of N).

``attention_mask`` comes from each row's length, never from ``input_ids != pad``: the pad id
may equal EOS, and the real EOS must stay visible.

``group_by_length``: batches of rows of similar length, so less padding, drawn as transformers'
LengthGroupedSampler does: shuffle, cut into megabatches of 50 batches, sort each by length.
"""

from __future__ import annotations

import random
from typing import Any

from sftcore import IGNORE_INDEX, hookimpl

MEGABATCH = 50  # batches per sorted megabatch: transformers' LengthGroupedSampler's value


class PadCollator:
    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None, group_by_length: bool = False) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError("pad_to_multiple_of must be a positive integer")
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of
        if group_by_length:  # only then: without a batch_sampler the Trainer shuffles rows itself
            self.batch_sampler = length_grouped

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, (feature, n) in enumerate(zip(features, lengths)):
            input_ids[i, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(feature["labels"], dtype=torch.long)
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def length_grouped(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of row indices of similar length; every row once; ceil(rows / batch_size) batches."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    size = MEGABATCH * batch_size
    batches = []
    for start in range(0, len(order), size):
        mega = sorted(order[start : start + size], key=lambda i: lengths[i], reverse=True)
        batches += [mega[i : i + batch_size] for i in range(0, len(mega), batch_size)]
    return batches


@hookimpl
def register_collators(register):
    register("pad", PadCollator, description="right-pad ids with pad, labels with -100; mask from lengths")
