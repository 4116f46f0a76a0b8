"""On a CUDA GPU with bitsandbytes and peft: `sft run --adapter qlora` trains LoRA on a 4-bit base, and
`sft merge` folds it into the full-precision base. Skipped without CUDA (tests/gpu/conftest.py) or
without either package.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sftcore.assets import DEMO_DATA
from sftcore.model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

pytestmark = pytest.mark.gpu

SFT = str(Path(sys.executable).with_name("sft"))


def test_qlora_trains_on_a_4_bit_base_and_merges_into_the_full_one(gpu_checkpoint, tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    data = tmp_path / "data.jsonl"
    data.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:32]))
    output = tmp_path / "run"
    done = subprocess.run(
        [SFT, "run", "--model", str(gpu_checkpoint), "--data", str(data), "--output", str(output), "--adapter", "qlora",
         "--max-steps", "20", "--batch-size", "8", "--lr", "1e-3", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = {p.name for p in output.iterdir()}
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= files and "model.safetensors" not in files
    summary = json.loads((output / "summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"]
    # A 4-bit tensor counts the values it holds: the total is the base's, plus the adapter's.
    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(gpu_checkpoint).parameters())
    assert summary["total_parameters"] == base + summary["trainable_parameters"]
    merged = subprocess.run([SFT, "merge", str(output), "--output", str(tmp_path / "merged"), "--no-progress"],
                            capture_output=True, text=True, timeout=600)
    assert merged.returncode == 0, merged.stderr[-3000:]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # folded into the full-precision base
