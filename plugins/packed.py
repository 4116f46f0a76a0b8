"""Collator `packed`: padding-free batches, several examples concatenated into one row.

No padding and no attention mask: ``position_ids`` restart at 0 for each example, which is how
transformers tells examples apart (a block-diagonal mask for sdpa and eager, sequence lengths
for FlashAttention's varlen kernels). The label at each example's first position is -100, so no
example learns to predict its first token from the one before it; a padded batch never trains
that position either (labels are shifted by one), so the loss per token is the same.

Under a varlen attention implementation (FlashAttention, ``sft_varlen``) the batch also carries
``cu_seq_lens_q/k`` and ``max_length_q/k``: without them transformers derives them from
``position_ids`` in every layer, a device-to-host sync each time. ``padding_free = True`` tells
the host so, and the flash loader then prefers such an implementation.

Batches are filled to ``max_tokens_per_batch`` (default: batch size x the longest row, the most
a padded batch can hold) by best-fit decreasing: rows longest first, each into the fullest
batch it still fits.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any

from sftcore import IGNORE_INDEX, hookimpl
from sftcore.errors import UsageError

log = logging.getLogger("sftcore.collator")
VARLEN_ATTENTION = ("flash", "sft_varlen")  # implementations that read cu_seq_lens_q/k (substrings)


class PackedCollator:
    padding_free = True

    def __init__(self, max_tokens_per_batch: int | None = None, attn_implementation: str | None = None) -> None:
        if max_tokens_per_batch is not None and max_tokens_per_batch < 1:
            raise ValueError("max_tokens_per_batch must be a positive integer")
        self.max_tokens = max_tokens_per_batch
        self.varlen = any(name in (attn_implementation or "") for name in VARLEN_ATTENTION)
        if attn_implementation and not self.varlen:
            log.warning(
                "packed batches under %s attend over the whole packed row, masked per example: the cost grows "
                "with the square of max_tokens_per_batch; FlashAttention's varlen kernels do not pay it",
                attn_implementation,
            )

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        input_ids = torch.tensor([t for f in features for t in f["input_ids"]], dtype=torch.long)
        labels = torch.tensor([t for f in features for t in f["labels"]], dtype=torch.long)
        position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])
        starts = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        labels[starts[:-1].long()] = IGNORE_INDEX
        batch = {
            "input_ids": input_ids[None], "labels": labels[None], "position_ids": position_ids[None],
            # transformers builds its per-example mask for sdpa and eager only when no KV cache is
            # passed, and models make one by default (config.use_cache), in training too: without
            # this, examples would attend to each other.
            "use_cache": False,
        }
        if self.varlen:
            longest = max(lengths)
            batch.update(cu_seq_lens_q=starts, cu_seq_lens_k=starts, max_length_q=longest, max_length_k=longest)
        return batch

    def batch_sampler(self, lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
        budget = self.max_tokens or batch_size * max(lengths)
        return best_fit_decreasing(lengths, budget)


def best_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` in bins of at most ``budget`` tokens; deterministic, longest first."""
    if lengths and max(lengths) > budget:
        raise UsageError(
            f"a row of {max(lengths)} tokens exceeds max_tokens_per_batch {budget}; raise it or lower max_length"
        )
    bins: list[list[int]] = []
    # (room left, bin index), sorted: the first entry with room >= n is the best fit.
    room: list[tuple[int, int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[index]
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            bins.append([index])
            bisect.insort(room, (budget - n, len(bins) - 1))
            continue
        left, chosen = room.pop(at)
        bins[chosen].append(index)
        bisect.insort(room, (left - n, chosen))
    return bins


@hookimpl
def register_collators(register):
    register(
        "packed", PackedCollator,
        description="padding-free: examples concatenated to a token budget, position_ids restart per example",
    )
