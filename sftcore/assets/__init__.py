"""Files shipped with sftcore: a tiny Llama config and tokenizer, and a demo Alpaca set.

The tiny model has no weights on disk: `tiny_model()` initialises them from a fixed seed and
saves a normal checkpoint once, so every consumer loads it through the ordinary loader.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

ASSETS = Path(str(resources.files("sftcore.assets")))
DEMO_DATA = ASSETS / "demo.jsonl"
TINY_LLAMA = ASSETS / "tiny-llama"
# What `model` names for the tiny model above: the demo run's model, and one any config may name.
BUILTIN_MODEL = "builtin:tiny-llama"


def cache_dir() -> Path:
    root = os.environ.get("SFT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sftcore")
    return Path(root)


def assets_digest() -> str:
    """A short hash of the tiny model's shipped files: a cached checkpoint made from older ones is not reused."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        digest.update((TINY_LLAMA / name).read_bytes())
    return digest.hexdigest()[:12]


def tiny_model(dest: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """A checkpoint directory of the tiny Llama with random weights (made once, then reused)."""
    from sftcore import __version__

    target = Path(dest) if dest else cache_dir() / f"tiny-llama-{__version__}-{assets_digest()}-seed{seed}"
    if (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_LLAMA / name, tmp / name)
    try:
        tmp.rename(target)  # atomic: a half-written checkpoint is never taken for a whole one
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target
