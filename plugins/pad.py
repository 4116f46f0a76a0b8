"""Collator `pad`: right-pad to the longest row (optionally to a multiple of N).

``attention_mask`` comes from each row's length, never from ``input_ids != pad``: the pad id
may equal EOS, and the real EOS must stay visible.
"""

from __future__ import annotations

from typing import Any

from sftcore import IGNORE_INDEX, hookimpl


class PadCollator:
    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError("pad_to_multiple_of must be a positive integer")
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

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


@hookimpl
def register_collators(register):
    register("pad", PadCollator, description="right-pad ids with pad, labels with -100; mask from lengths")
