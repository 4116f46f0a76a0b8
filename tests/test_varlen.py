"""The `sft_varlen` attention implementation on CPU: its reference path against sdpa, and the kernel adapter.

On a CPU PyTorch's varlen kernel cannot run, so a model with ``sft_varlen`` takes the per-example
sdpa path; these tests pin that path to sdpa's block-diagonal masking, and pin the adapter that
calls the kernel (old and new ``varlen_attn`` signatures) with stand-in kernels. The kernel
itself is compared on a GPU in tests/gpu/.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from sftcore.model import varlen
from sftcore_plugins.flash import FlashLoader, pick_attention

LENGTHS = [5, 9, 3]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    varlen.register()
    load = lambda attn: AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()  # noqa: E731
    return load("sdpa"), load(varlen.NAME)


def packed(lengths, rows=1, seed=0):
    """``rows`` rows, each the examples of ``lengths`` concatenated; positions restart at 0 per example."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (rows, sum(lengths)), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths]).expand(rows, -1)
    return ids, positions


def logits(model, **batch):
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def test_packed_batch_gives_sdpa_block_diagonal_logits(models):
    sdpa, vl = models
    ids, positions = packed(LENGTHS, rows=2)
    expected = logits(sdpa, input_ids=ids, position_ids=positions)  # transformers masks block-diagonally
    got = logits(vl, input_ids=ids, position_ids=positions)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    alone, start = [], 0
    for n in LENGTHS:
        alone.append(logits(sdpa, input_ids=ids[:, start : start + n]))
        start += n
    torch.testing.assert_close(got, torch.cat(alone, dim=1), rtol=1e-4, atol=1e-5)
    # The comparison can tell: one causal sequence over the whole row gives other logits.
    plain = logits(sdpa, input_ids=ids)
    assert (plain[:, LENGTHS[0] :] - expected[:, LENGTHS[0] :]).abs().max() > 1e-2


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_sdpa_on_real_tokens(models, side):
    sdpa, vl = models
    lengths = [7, 4, 10]
    width = max(lengths)
    ids = torch.full((len(lengths), width), 2)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    for row, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols] = torch.randint(3, 512, (n,), generator=g)
        mask[row, cols] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    expected = logits(sdpa, input_ids=ids, attention_mask=mask, position_ids=positions)
    got = logits(vl, input_ids=ids, attention_mask=mask, position_ids=positions)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)


def test_training_step_gives_sdpa_loss_and_gradients(tiny_model_dir):
    varlen.register()
    ids, positions = packed(LENGTHS)
    labels = ids.clone()
    labels[0, [0, LENGTHS[0], LENGTHS[0] + LENGTHS[1]]] = -100
    grads = {}
    for attn in ("sdpa", varlen.NAME):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).train()
        loss = model(input_ids=ids, position_ids=positions, labels=labels, use_cache=False).loss
        loss.backward()
        grads[attn] = (loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[varlen.NAME][0], grads["sdpa"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[varlen.NAME][1], grads["sdpa"][1], rtol=1e-4, atol=1e-6)


def qkv(tokens=17, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, tokens, dim, generator=g)
    k = torch.randn(1, kv_heads, tokens, dim, generator=g)
    v = torch.randn(1, kv_heads, tokens, dim, generator=g)
    return q, k, v


class Module:
    is_causal = True


def test_boundaries_from_the_batch_cu_seq_lens_win_over_position_ids():
    q, k, v = qkv()
    cu = torch.tensor([0, 6, 17], dtype=torch.int32)
    out, _ = varlen.attention_forward(
        Module(), q, k, v, None, position_ids=torch.arange(17)[None], cu_seq_lens_q=cu, max_length_q=11
    )
    flat = [t.transpose(1, 2)[0] for t in (q, k, v)]
    expected = varlen.reference(*flat, cu, None, True)
    torch.testing.assert_close(out[0], expected)


def test_boundaries_found_from_positions_and_padding():
    found = varlen._find_segments(
        torch.empty(2, 1, 6, 1),
        attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]]),
        position_ids=torch.tensor([[0, 1, 0, 1, 2, 3], [0, 0, 1, 0, 1, 2]]),
        cu_seq_lens=None,
        longest=None,
    )
    assert found.keep.tolist() == [0, 1, 2, 3, 7, 8, 9, 10, 11]
    assert found.cu.tolist() == [0, 2, 4, 6, 9] and found.longest == 3


def test_boundaries_are_found_once_per_batch_not_once_per_layer():
    query = torch.empty(1, 1, 6, 1)
    first = torch.tensor([[0, 1, 2, 0, 1, 2]])
    found = varlen.boundaries(query, None, first, None, None)
    assert varlen.boundaries(query, None, first, None, None) is found  # the next layer, same tensors
    other = torch.tensor([[0, 1, 0, 1, 2, 3]])  # the next batch, same shape
    assert varlen.boundaries(query, None, other, None, None).cu.tolist() == [0, 2, 6]


def kernel_standins(calls):
    """The two published ``varlen_attn`` signatures, computing with the reference path."""

    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        calls.append({"is_causal": is_causal, "kv_heads": key.shape[1], "max_q": max_q})
        return varlen.reference(query, key, value, cu_seq_q, None, is_causal)

    def new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
            window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        calls.append({"window_size": window_size, "enable_gqa": enable_gqa, "scale": scale, "kv_heads": key.shape[1]})
        assert enable_gqa or key.shape[1] == query.shape[1]
        return varlen.reference(query, key, value, cu_seq_q, scale, window_size == (-1, 0))

    return old, new


@pytest.mark.parametrize("signature", ["old", "new"])
def test_kernel_adapter_fits_both_varlen_attn_signatures(monkeypatch, signature):
    calls = []
    old, new = kernel_standins(calls)
    monkeypatch.setattr(varlen, "kernel", lambda: {"old": old, "new": new}[signature])
    monkeypatch.setattr(varlen, "kernel_runs", lambda query: True)
    q, k, v = qkv()
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    scale = 0.7  # not 1/sqrt(8): an old kernel cannot take it, the adapter must scale the query
    out, _ = varlen.attention_forward(Module(), q, k, v, None, scaling=scale, position_ids=positions)
    cu = torch.tensor([0, 5, 8, 17], dtype=torch.int32)
    expected = varlen.reference(*[t.transpose(1, 2)[0] for t in (q, k, v)], cu, scale, True)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    if signature == "old":
        assert calls == [{"is_causal": True, "kv_heads": 4, "max_q": 9}]
    else:
        assert calls == [{"window_size": (-1, 0), "enable_gqa": True, "scale": scale, "kv_heads": 2}]


def test_what_it_cannot_attend_is_an_error():
    q, k, v = qkv()
    with pytest.raises(varlen.VarlenError, match="sliding window"):
        varlen.attention_forward(Module(), q, k, v, None, sliding_window=4)
    with pytest.raises(varlen.VarlenError, match="sdpa to generate"):
        varlen.attention_forward(Module(), q[:, :, :1], k, v, None)


def test_the_loader_prefers_varlen_over_sdpa_for_padding_free_batches_on_cuda(monkeypatch):
    from transformers.utils import import_utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    for flavour in (2, 3, 4):
        monkeypatch.setattr(import_utils, f"is_flash_attn_{flavour}_available", lambda: False)
    attention, why = pick_attention("auto", packing=True)
    assert attention == varlen.NAME and "padding-free" in why and "sm_90" in why
    assert pick_attention("auto", packing=False)[0] == "sdpa"
    monkeypatch.setattr(import_utils, "is_flash_attn_4_available", lambda: True)
    assert pick_attention("auto", packing=True) == ("flash_attention_4", "flash-attn-4 installed, sm_90")
    monkeypatch.setattr(varlen, "kernel", lambda: None)
    monkeypatch.setattr(import_utils, "is_flash_attn_4_available", lambda: False)
    attention, why = pick_attention("auto", packing=True)
    assert attention == "sdpa" and "no varlen_attn" in why


def test_the_loader_registers_varlen_when_asked_and_warns_about_fp32(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="sftcore.loader"):
        model, _ = FlashLoader(attn_implementation=varlen.NAME, dtype="float32").load(str(tiny_model_dir))
    assert model.config._attn_implementation == varlen.NAME
    assert "attention: sft_varlen (asked for with attn_implementation)" in caplog.text
    assert "fp16/bf16 only" in caplog.text


@pytest.mark.slow
def test_sft_run_on_packed_batches_logs_the_losses_of_sdpa(monkeypatch, tmp_path, tiny_model_dir):
    """Through the whole run: the packed collator hands sft_varlen its cu_seq_lens, sdpa its position_ids."""
    import csv

    from cli_runs import ROWS, sft, write_jsonl

    data = write_jsonl(tmp_path / "rows.jsonl", ROWS * 2)
    curves = {}
    for attn in ("sdpa", varlen.NAME):
        output = tmp_path / attn
        result = sft(
            monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", output, "--collator", "packed",
            "--loader-opt", f"attn_implementation={attn}", "--max-steps", "3", "--batch-size", "4", "--lr", "1e-3",
            "--no-progress",
        )
        assert result.exit_code == 0, result.output
        with open(output / "loss.csv", newline="") as handle:
            curves[attn] = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert len(curves["sdpa"]) == 3
    assert curves[varlen.NAME] == pytest.approx(curves["sdpa"], rel=1e-5)
