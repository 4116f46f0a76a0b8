"""On a CUDA GPU: FlashAttention 4 and the `sft_varlen` kernel give sdpa's loss, and `sft run` picks them.

bf16 throughout, as the loader picks on a GPU that supports it; losses agree to 1e-2 relative
(bf16 keeps 8 bits of mantissa; a mean over hundreds of tokens is much steadier than that).
Skipped without CUDA (tests/gpu/conftest.py); tests needing flash-attn 4 are skipped without it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sftcore.model import varlen
from sftcore.assets import DEMO_DATA
from sftcore_plugins.flash import FlashLoader
from sftcore_plugins.packed import PackedCollator
from sftcore_plugins.pad import PadCollator

pytestmark = pytest.mark.gpu

LENGTHS = [37, 120, 64, 201, 90, 15, 128, 77]
LOSS_RTOL = 1e-2
SFT = str(Path(sys.executable).with_name("sft"))


def fa4_installed() -> bool:
    from transformers.utils import import_utils

    return import_utils.is_flash_attn_4_available()


needs_fa4 = pytest.mark.skipif(not fa4_installed(), reason="flash-attn 4 is not installed")


def rows() -> list[dict]:
    """Prompt-and-response-like rows: the first half of each row is masked."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, 512, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :]})
    return out


def batch(collator: str, attn: str) -> dict:
    make = PadCollator(pad_token_id=2) if collator == "pad" else PackedCollator(attn_implementation=attn)
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in make(rows()).items()}


def loss_and_grad(checkpoint: Path, attn: str, collator: str) -> tuple[float, torch.Tensor]:
    """The loss of one batch and the gradient of the first layer's query projection."""
    model, _ = FlashLoader(attn_implementation=attn).load(str(checkpoint))
    assert model.config._attn_implementation == attn and model.dtype == torch.bfloat16
    model = model.cuda().train()
    model.config.use_cache = False  # as the Trainer sets it: no KV cache while training
    loss = model(**batch(collator, attn)).loss
    loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad.float().flatten()
    return float(loss.detach()), grad


def assert_same_training_signal(got: tuple[float, torch.Tensor], expected: tuple[float, torch.Tensor]) -> None:
    assert got[0] == pytest.approx(expected[0], rel=LOSS_RTOL)
    assert torch.nn.functional.cosine_similarity(got[1], expected[1], dim=0) > 0.99


@pytest.fixture(scope="module")
def sdpa_padded(gpu_checkpoint):
    return loss_and_grad(gpu_checkpoint, "sdpa", "pad")


def test_sdpa_packed_gives_the_padded_loss(gpu_checkpoint, sdpa_padded):
    """The reference itself: packing changes no loss (labels at each example's start are -100 either way)."""
    assert_same_training_signal(loss_and_grad(gpu_checkpoint, "sdpa", "packed"), sdpa_padded)


@needs_fa4
@pytest.mark.parametrize("collator", ["pad", "packed"])
def test_flash_attention_4_gives_the_sdpa_loss(gpu_checkpoint, sdpa_padded, collator):
    assert_same_training_signal(loss_and_grad(gpu_checkpoint, "flash_attention_4", collator), sdpa_padded)


@pytest.mark.parametrize("collator", ["pad", "packed"])
def test_varlen_kernel_gives_the_sdpa_loss(gpu_checkpoint, sdpa_padded, collator, monkeypatch):
    assert varlen.kernel() is not None, "this torch has no torch.nn.attention.varlen"

    def no_fallback(*args, **kwargs):
        raise AssertionError("sft_varlen took its reference path on the GPU")

    monkeypatch.setattr(varlen, "reference", no_fallback)
    assert_same_training_signal(loss_and_grad(gpu_checkpoint, varlen.NAME, collator), sdpa_padded)


def test_varlen_kernel_attends_within_each_example(monkeypatch):
    """The kernel, through the adapter, against sdpa run on each example alone (GQA, a non-default scale)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [5, 130, 64, 1]
    q = torch.randn(1, 8, sum(lengths), 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 2, sum(lengths), 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 2, sum(lengths), 128, device="cuda", dtype=torch.bfloat16, generator=g)
    positions = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]

    class Module:
        is_causal = True

    got, _ = varlen.attention_forward(Module(), q, k, v, None, scaling=0.05, position_ids=positions)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    flat = [t.transpose(1, 2)[0].float() for t in (q, k, v)]
    expected = varlen.reference(*flat, cu, 0.05, True)
    torch.testing.assert_close(got[0].float(), expected, rtol=2e-2, atol=2e-2)


def demo_rows(tmp_path: Path) -> Path:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:32]))
    return data


def sft_run(checkpoint: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SFT, "run", "--model", str(checkpoint), "--data", str(demo_rows(tmp_path)), "--output", str(tmp_path / "out"),
         "--max-steps", "3", "--batch-size", "8", "--no-progress", *args],
        capture_output=True, text=True, timeout=600, env={**os.environ, "SFT_CACHE_DIR": str(tmp_path / "cache")},
    )


@needs_fa4
@pytest.mark.parametrize("collator", ["pad", "packed"])
def test_sft_run_picks_flash_attention_4(gpu_checkpoint, tmp_path, collator):
    done = sft_run(gpu_checkpoint, tmp_path, "--collator", collator)
    assert done.returncode == 0, done.stderr
    assert "attention: flash_attention_4 (flash-attn-4 installed, sm_" in done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["last_loss"])


def test_sft_run_picks_the_varlen_kernel_for_packed_batches_without_flash_attn(gpu_checkpoint, tmp_path, monkeypatch, caplog):
    from cli_runs import sft
    from transformers.utils import import_utils

    for flavour in (2, 3, 4):
        monkeypatch.setattr(import_utils, f"is_flash_attn_{flavour}_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="sftcore.loader"):
        result = sft(
            monkeypatch, "run", "--model", gpu_checkpoint, "--data", demo_rows(tmp_path), "--output", tmp_path / "out",
            "--collator", "packed", "--max-steps", "3", "--batch-size", "8", "--no-progress",
        )
    assert result.exit_code == 0, result.output
    assert "attention: sft_varlen (" in caplog.text and "PyTorch's varlen kernel" in caplog.text
