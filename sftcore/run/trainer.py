"""The run's Trainer: the Hugging Face Trainer, batching with the collator's own batch sampler.

A collator may define ``batch_sampler(lengths, batch_size, seed) -> Iterable[list[int]]``
(packing to a token budget, length grouping). The host then draws the batches once per epoch
with ``seed + epoch``, shuffles their order with the same seed, and under torch.distributed
hands each rank every world-size-th batch, all ranks the same number.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any


class EpochBatches:
    """A batch sampler for ``torch.utils.data.DataLoader`` built on a collator's ``batch_sampler``.

    The number of batches must not depend on the seed (it sets the length of an epoch and the
    learning-rate schedule); a sampler that breaks this fails loudly at the next epoch.
    """

    def __init__(
        self,
        make: Callable[[list[int], int, int], Iterable[Sequence[int]]],
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if rank is None or world_size is None:
            rank, world_size = distributed_rank()
        # Not `batch_size`: accelerate's shard wrapper would then hold back every batch of another size.
        self.make, self.lengths, self.rows_per_batch, self.seed = make, list(lengths), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._total = len(self._draw(0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _draw(self, epoch: int) -> list[list[int]]:
        return [list(batch) for batch in self.make(self.lengths, self.rows_per_batch, self.seed + epoch)]

    def __len__(self) -> int:
        return math.ceil(self._total / self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._draw(self.epoch)
        if len(batches) != self._total:
            raise RuntimeError(f"the collator's batch_sampler drew {len(batches)} batches, {self._total} before; the count must not depend on the seed")
        random.Random(self.seed + self.epoch).shuffle(batches)
        # Every rank takes the same number of batches (collectives must match); the last few
        # repeat from the start, as torch's DistributedSampler does.
        share = len(self)
        batches += batches[: share * self.world_size - len(batches)]
        self.epoch += 1  # a caller that never calls set_epoch still gets a new order each epoch
        return iter(batches[self.rank :: self.world_size])


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` under an initialised torch.distributed, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def row_lengths(dataset: Sequence[Any]) -> list[int]:
    lengths = getattr(dataset, "lengths", None)  # sftcore.data.cache.FlatRows knows them without building rows
    return list(lengths) if lengths is not None else [len(row["input_ids"]) for row in dataset]


def keep_own_sharding(loader: Any, sampler: EpochBatches) -> None:
    """Undo accelerate's sharding of ``sampler`` across processes: it already took this rank's share.

    The shard wrapper also gets a ``set_epoch`` that reaches ``sampler``: it has none, and a run
    resumed mid-epoch on several processes sets the epoch only through the loader, so ``sampler``
    would otherwise draw epoch 0's batches and skip the wrong ones.
    """
    shard = getattr(loader, "batch_sampler", None)
    if shard is not sampler and getattr(shard, "batch_sampler", None) is sampler:
        shard.num_processes, shard.process_index = 1, 0
        shard.set_epoch = sampler.set_epoch


def trainer_class() -> type:
    """The Trainer subclass `sft run` uses (built on first use: importing transformers is slow)."""
    from torch.utils.data import DataLoader
    from transformers import Trainer

    class SftTrainer(Trainer):
        def get_train_dataloader(self) -> Any:
            make = getattr(self.data_collator, "batch_sampler", None)
            if make is None or self.train_dataset is None:
                return super().get_train_dataloader()
            sampler = EpochBatches(make, row_lengths(self.train_dataset), self._train_batch_size, self.args.seed)
            loader = DataLoader(
                self.train_dataset,
                batch_sampler=sampler,
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
                persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
            )
            prepared = self.accelerator.prepare(loader)
            keep_own_sharding(prepared, sampler)
            return prepared

        def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
            # Held-out batches are collated by the collator itself, not through the run's
            # BatchCounter: the summary's tokens/s and padding count training batches only.
            counting = self.data_collator
            self.data_collator = getattr(counting, "collator", counting)
            try:
                return super().get_eval_dataloader(eval_dataset)
            finally:
                self.data_collator = counting

        def _issue_warnings_after_load(self, load_result: Any) -> None:
            # A checkpoint stores a tied weight once (the embeddings, not lm_head); resuming
            # would otherwise warn of a "missing" lm_head.weight on every tied model.
            missing = untied_missing(self.model, load_result.missing_keys)
            super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    return SftTrainer


def untied_missing(model: Any, missing: Sequence[str]) -> list[str]:
    """The ``missing`` parameter names not tied to a parameter that was loaded under another name."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    absent = set(missing)
    loaded_alias = {name for group in names.values() if any(n not in absent for n in group) for name in group}
    return [name for name in missing if name not in loaded_alias]
