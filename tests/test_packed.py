"""The `packed` collator and batch samplers: padding-free batches that train exactly as padded ones,
examples that never see each other, token-budget bins, and the run loop's per-epoch batching."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sftcore import IGNORE_INDEX
from sftcore.errors import UsageError
from sftcore.run.trainer import EpochBatches
from sftcore_plugins.packed import PackedCollator, best_fit_decreasing
from sftcore_plugins.pad import PadCollator, length_grouped

ROWS = [
    {"input_ids": [0, 5, 6, 7, 1], "labels": [IGNORE_INDEX, IGNORE_INDEX, 6, 7, 1]},
    {"input_ids": [0, 9, 1], "labels": [IGNORE_INDEX, 9, 1]},
    {"input_ids": [0, 5, 6, 8, 8, 9, 1], "labels": [0, 5, 6, 8, 8, 9, 1]},  # a `full`-masker row: BOS labelled
]


def test_packed_batch_is_one_row_with_restarting_positions():
    batch = PackedCollator()(ROWS)
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"}, "no attention_mask: it would hide the boundaries"
    assert batch["use_cache"] is False
    assert batch["input_ids"].tolist() == [[0, 5, 6, 7, 1, 0, 9, 1, 0, 5, 6, 8, 8, 9, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6]]
    assert batch["labels"].tolist() == [[
        IGNORE_INDEX, IGNORE_INDEX, 6, 7, 1,
        IGNORE_INDEX, 9, 1,
        IGNORE_INDEX, 5, 6, 8, 8, 9, 1,
    ]]
    assert ROWS[2]["labels"][0] == 0, "the input rows are not modified"


@pytest.mark.parametrize("attention", ["flash_attention_2", "flash_attention_4", "kernels-community/flash-attn3", "sft_varlen"])
def test_flash_batches_carry_the_varlen_arguments(attention):
    batch = PackedCollator(attn_implementation=attention)(ROWS)
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 5, 8, 15]
    assert batch["max_length_q"] == batch["max_length_k"] == 7


@pytest.mark.parametrize("attention", [None, "sdpa", "eager", "flex_attention"])
def test_other_attention_gets_no_varlen_arguments(attention):
    assert "cu_seq_lens_q" not in PackedCollator(attn_implementation=attention)(ROWS)


def test_the_varlen_argument_names_are_those_transformers_reads():
    import inspect

    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    params = inspect.signature(_flash_attention_forward).parameters
    assert {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids"} <= set(params)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=80), st.integers(64, 200))
def test_best_fit_decreasing_bins(lengths, budget):
    bins = best_fit_decreasing(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths))), "every row exactly once"
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert max(loads) <= budget
    # Any-fit property: a later bin was opened because its first row fitted no earlier bin.
    assert all(loads[a] + loads[b] > budget for a in range(len(bins)) for b in range(a + 1, len(bins)))
    assert best_fit_decreasing(lengths, budget) == bins, "deterministic"


def test_a_row_over_the_budget_is_a_usage_error():
    with pytest.raises(UsageError, match="a row of 9 tokens exceeds max_tokens_per_batch 8"):
        PackedCollator(max_tokens_per_batch=8).batch_sampler([3, 9, 2], batch_size=4, seed=0)


def test_default_budget_is_what_a_padded_batch_can_hold():
    lengths = [10, 3, 7, 7, 2, 9]
    bins = PackedCollator().batch_sampler(lengths, batch_size=2, seed=0)
    assert bins == [[0, 5], [2, 3, 1, 4]], "2 x 10 tokens a bin: 10+9, then 7+7+3+2"


def test_length_grouping_covers_every_row_with_less_padding():
    rng = random.Random(1)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    grouped = length_grouped(lengths, batch_size=8, seed=3)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert len(grouped) == 125 and all(len(b) == 8 for b in grouped)
    assert length_grouped(lengths, 8, 3) == grouped and length_grouped(lengths, 8, 4) != grouped

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    order = list(range(1000))
    random.Random(3).shuffle(order)
    assert padding(grouped) < 0.25 * padding([order[i : i + 8] for i in range(0, 1000, 8)])


def test_pad_has_a_batch_sampler_only_when_grouping():
    assert not hasattr(PadCollator(), "batch_sampler")
    assert PadCollator(group_by_length=True).batch_sampler is length_grouped


def test_epoch_batches_shuffle_per_epoch_and_cover_every_row():
    sampler = EpochBatches(length_grouped, [5, 1, 4, 4, 9, 2, 3, 8, 7, 6], batch_size=3, seed=11, rank=0, world_size=1)
    epochs = [list(sampler) for _ in range(3)]
    assert len(sampler) == 4
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(10))
    assert epochs[0] != epochs[1]
    sampler.set_epoch(1)
    assert list(sampler) == epochs[1], "set_epoch replays an epoch"


def test_epoch_batches_give_each_rank_its_own_equal_share():
    lengths = list(range(1, 24))
    make = PackedCollator(max_tokens_per_batch=30).batch_sampler
    total = len(make(lengths, 4, 0))
    shares = [list(EpochBatches(make, lengths, 4, seed=5, rank=r, world_size=3)) for r in range(3)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == -(-total // 3)
    drawn = [tuple(b) for s in shares for b in s]
    assert len(set(drawn)) == total, "together the ranks draw every bin; only the last few repeat"


def test_accelerate_passes_our_rank_share_through_unchanged():
    """Under several processes accelerate wraps the batch sampler to shard it again; undone, every
    packed bin (of any number of rows) comes through as the sampler drew it."""
    from types import SimpleNamespace

    from accelerate.data_loader import BatchSamplerShard

    from sftcore.run.trainer import keep_own_sharding

    lengths = [random.Random(i).randint(3, 40) for i in range(50)]
    sampler = EpochBatches(PackedCollator(max_tokens_per_batch=64).batch_sampler, lengths, 4, seed=0, rank=1, world_size=2)
    shard = BatchSamplerShard(sampler, num_processes=2, process_index=1)
    keep_own_sharding(SimpleNamespace(batch_sampler=shard), sampler)
    sampler.set_epoch(0)
    expected = list(sampler)
    sampler.set_epoch(0)
    assert list(shard) == expected and len(shard) == len(sampler) == len(expected)


def test_epoch_batches_read_the_rank_from_torch_distributed(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    sampler = EpochBatches(length_grouped, list(range(1, 9)), batch_size=2, seed=0)
    assert (sampler.rank, sampler.world_size, len(sampler)) == (1, 2, 2)


# ---- the model sees packed rows as it sees padded ones ----------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftcore.assets import TINY_LLAMA

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TINY_LLAMA)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).eval()


def random_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, response = rng.randint(2, 12), rng.randint(1, 10)
        ids = [rng.randrange(3, 512) for _ in range(prompt + response)]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def token_losses(model, batch) -> torch.Tensor:
    """Cross-entropy of every supervised target, in batch order, as the model's loss shifts labels."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    return losses[targets != IGNORE_INDEX]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_padded_loss(tiny_llama, attention):
    tiny_llama.config._attn_implementation = attention
    rows = random_rows(6)
    packed = PackedCollator()(rows)
    padded = PadCollator(pad_token_id=2)(rows)
    with torch.no_grad():
        assert tiny_llama(**packed).loss.item() == pytest.approx(tiny_llama(**padded).loss.item(), rel=1e-5)
    # Per token, in the same order (row by row): the same targets, the same losses.
    torch.testing.assert_close(token_losses(tiny_llama, packed), token_losses(tiny_llama, padded), rtol=1e-4, atol=1e-5)


def test_packed_loss_equals_padded_batches_of_other_sizes(tiny_llama):
    """One packed batch of 7 rows against padded batches of 3, 3 and 1: the token-weighted mean agrees."""
    tiny_llama.config._attn_implementation = "sdpa"
    rows = random_rows(7, seed=1)
    packed = token_losses(tiny_llama, PackedCollator()(rows))
    pieces = [token_losses(tiny_llama, PadCollator(pad_token_id=2)(rows[i : i + 3])) for i in (0, 3, 6)]
    torch.testing.assert_close(packed, torch.cat(pieces), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        whole = tiny_llama(**PackedCollator()(rows)).loss
    assert whole.item() == pytest.approx(torch.cat(pieces).mean().item(), rel=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(tiny_llama, attention):
    tiny_llama.config._attn_implementation = attention
    rows = random_rows(4, seed=2)
    changed = [dict(r) for r in rows]
    changed[1] = {**rows[1], "input_ids": [(t * 7 + 1) % 509 + 3 for t in rows[1]["input_ids"]]}
    spans, start = [], 0
    for r in rows:
        spans.append(slice(start, start + len(r["input_ids"])))
        start += len(r["input_ids"])

    def logits(batch_rows):
        batch = PackedCollator()(batch_rows)
        with torch.no_grad():
            return tiny_llama(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]

    before, after = logits(rows), logits(changed)
    for i, span in enumerate(spans):
        if i == 1:
            assert not torch.allclose(before[span], after[span]), "the changed example's own logits move"
        else:
            torch.testing.assert_close(before[span], after[span], rtol=0, atol=1e-5)


# ---- the run loop batches with the collator's sampler -----------------------------------------


def test_trainer_draws_batches_from_the_collator(tiny_llama, tmp_path):
    from transformers import TrainingArguments

    from sftcore.run.trainer import trainer_class

    rows = random_rows(20, seed=3)
    collator = PackedCollator(max_tokens_per_batch=40)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none",
        remove_unused_columns=False, use_cpu=True, seed=7,
    )
    trainer = trainer_class()(model=tiny_llama, args=args, train_dataset=rows, data_collator=collator)
    loader = trainer.get_train_dataloader()
    bins = collator.batch_sampler([len(r["input_ids"]) for r in rows], 4, 7)
    assert len(loader) == len(bins)
    batches = list(loader)
    assert all(b["input_ids"].shape[0] == 1 and b["input_ids"].shape[1] <= 40 for b in batches)
    assert sum(int((b["position_ids"] == 0).sum()) for b in batches) == len(rows)
    assert sum(b["input_ids"].shape[1] for b in batches) == sum(len(r["input_ids"]) for r in rows)


@pytest.mark.slow
def test_sft_run_with_the_packed_collator(monkeypatch, tmp_path, tiny_model_dir, tiny_tokenizer):
    import json

    from cli_runs import ROWS as DATA
    from cli_runs import sft, write_jsonl

    from sftcore_plugins.alpaca import AlpacaTemplate
    from sftcore_plugins.masking import SeparateMasker

    data = write_jsonl(tmp_path / "train.jsonl", DATA * 3)
    output = tmp_path / "out"
    result = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", output, "--collator", "packed",
        "--collator-opt", "max_tokens_per_batch=256", "--epochs", 2, "--batch-size", 4, "--lr", 3e-3, "--no-progress",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((output / "summary.json").read_text())
    assert summary["padding_fraction"] == 0.0
    assert summary["rows_used"] == 18
    lengths = [len(SeparateMasker()(*AlpacaTemplate().format(row), tiny_tokenizer, 512)["input_ids"]) for row in DATA * 3]
    assert summary["steps"] == 2 * len(best_fit_decreasing(lengths, 256)), "one step per packed bin, each epoch"
    assert summary["last_loss"] < summary["first_loss"]
