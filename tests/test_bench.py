"""The benchmark scripts still run end to end (on a CPU, a few rows): a broken bench found only on
the GPU machine would cost its scarce time. Their numbers are not checked here; speed is
measured by running them, as docs/benchmarks.md records."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sftcore.assets import DEMO_DATA

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def alpaca_json(tmp_path_factory) -> Path:
    """The demo rows as a JSON array, the benches' input format."""
    rows = [json.loads(line) for line in DEMO_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    path = tmp_path_factory.mktemp("bench") / "alpaca.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def bench(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_prep_bench_runs_and_its_paths_agree(alpaca_json):
    out = bench(str(BENCH / "prep.py"), "--data", str(alpaca_json), "--rows", "300", "--vocab", "600")
    assert re.search(r"^sftcore cold \(batched\) .* rows/s +[\d.]+x$", out, re.M), out
    assert re.search(r"^sftcore cached .* rows/s +[\d.]+x$", out, re.M), out


@pytest.mark.slow
def test_training_bench_runs_its_variants_and_checks_the_loss(alpaca_json):
    out = bench(
        str(BENCH / "train_gpu.py"), "--data", str(alpaca_json), "--tiny", "--rows", "8", "--epochs", "1",
        "--variants", "reference,sftcore,sftcore-lora",
    )
    agreement = json.loads(next(line for line in out.splitlines() if line.startswith('{"loss_agreement"')))["loss_agreement"]
    assert agreement["relative_difference"] < 1e-4, agreement  # fp32 on a CPU: the same loss
    names = {"reference", "sftcore", "sftcore-lora"}
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] and line.split()[0] in names}
    assert set(rows) == names, out
    assert " 0.0% " in rows["sftcore"] and " 0.0% " in rows["sftcore-lora"], "packed batches carry no padding"
    lora = json.loads(next(line for line in out.splitlines() if line.startswith('{"variant": "sftcore-lora"')))
    assert 0 < lora["trainable"] < lora["params"] / 10, lora
