"""Tests marked ``gpu`` run on a CUDA device only; elsewhere they are skipped, never failed.

How to run them on the H100 machine: docs/gpu.md.
"""

from __future__ import annotations

import pytest
import torch


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(scope="session")
def gpu_checkpoint(tmp_path_factory):
    """The tiny Llama widened to head_dim 128 (FlashAttention's common case), random weights, saved once."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from sftcore.assets import TINY_LLAMA

    config = AutoConfig.from_pretrained(TINY_LLAMA)
    config.update({"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpu-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_LLAMA / name, path / name)
    return path
