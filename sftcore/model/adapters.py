"""The host's side of adapters: what they target, what trains, and an adapter run's files.

An adapter run's output holds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's
format: `peft.PeftModel.from_pretrained` and `peft.AutoPeftModelForCausalLM` load it), never a
copy of the base. `load_adapter_model` rebuilds the trained model from the base and those files;
`merge` folds the adapter into the base and writes a plain checkpoint.

Importing this module imports neither torch nor PEFT.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sftcore.errors import SftError, UsageError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_INSTALL = "pip install 'sftcore[lora]'"
# The oldest of each package the adapters run with (transformers 5.17 needs peft 0.19.1; 0.21 is
# the one tested); pyproject's extras ask for the same (tests/test_adapters.py keeps them in step).
MINIMUM = {"peft": "0.21", "bitsandbytes": "0.43"}
MODEL_CARD = "README.md"  # PEFT's model card, written beside every adapter it saves


def require(package: str, who: str, install: str = PEFT_INSTALL) -> None:
    """Stop in one line when ``package`` is not installed, or older than `MINIMUM` allows; ``who``
    needs it, ``install`` installs it."""
    if importlib.util.find_spec(package) is None:
        raise SftError(f"{who} needs the {package} package, which is not installed: {install}")
    from importlib import metadata

    from packaging.version import Version

    try:
        installed = metadata.version(package)
    except metadata.PackageNotFoundError:  # importable without metadata (a source tree): nothing to compare
        return
    if package in MINIMUM and Version(installed) < Version(MINIMUM[package]):
        raise SftError(f"{who} needs {package} {MINIMUM[package]} or newer, and {installed} is installed: {install.replace('pip install', 'pip install -U', 1)}")


@contextmanager
def peft_quietly() -> Iterator[None]:
    """PEFT reads ``is_gradient_checkpointing``, which transformers 5 deprecates: a FutureWarning
    with traceback lines on every model it wraps or loads, about nothing the user can change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def adapter_base(run: str | os.PathLike, base: str | os.PathLike, flag: str = "--base") -> str:
    """``base`` when the checkpoint an adapter run's adapter goes on is there; refused in one line otherwise."""
    if is_adapter_dir(run) and not (Path(base) / "config.json").is_file():
        raise UsageError(
            f"{run}: its adapter goes on the model it was trained from, {base}, which is not there "
            f"(moved or deleted?); restore it, or pass {flag} PATH"
        )
    return str(base)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def decoder_blocks(model: Any) -> tuple[str, Any]:
    """``(name, ModuleList)`` of the model's decoder blocks: the list of repeated modules holding
    the most parameters (``model.layers`` in a Llama), so a vision tower's or a head's list loses."""
    import torch

    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise SftError(
            f"{type(model).__name__} has no list of decoder blocks to put adapters on; name the layers with "
            "--adapter-opt target_modules=[...]"
        )
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def decoder_linear_names(model: Any) -> list[str] | str:
    """What PEFT's ``target_modules`` takes for every linear layer inside the decoder blocks.

    Their short names (``q_proj``, ``down_proj``...) when no linear layer outside the blocks shares
    one, which keeps ``adapter_config.json`` readable; else a regular expression of the blocks'
    paths, so that lm_head or a projection outside the blocks is never wrapped.
    """
    import re

    import torch

    from transformers.pytorch_utils import Conv1D

    linear = (torch.nn.Linear, Conv1D)  # GPT-2's layers are Conv1D: a linear layer with its weight transposed
    prefix, blocks = decoder_blocks(model)
    inside = {f"{prefix}.{name}" for name, m in blocks.named_modules() if isinstance(m, linear)}
    short = sorted({name.rpartition(".")[2] for name in inside})
    if not short:
        raise SftError(f"the decoder blocks of {type(model).__name__} hold no linear layer; name the layers with --adapter-opt target_modules=[...]")
    outside = {
        name.rpartition(".")[2] for name, m in model.named_modules()
        if isinstance(m, linear) and name not in inside
    }
    if not outside & set(short):
        return short
    return rf"(.*\.)?{re.escape(prefix)}\.\d+\.(.*\.)?({'|'.join(map(re.escape, short))})"


def parameter_counts(model: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameters, each tied tensor counted once; a 4-bit tensor (bitsandbytes
    packs two values per byte) as the values it holds, not its bytes."""
    trainable = total = 0
    seen: set[int] = set()
    for parameter in model.parameters():  # parameters() yields a tied tensor once
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        count = parameter.numel()
        if type(parameter).__name__ == "Params4bit":
            count *= 2 * getattr(getattr(parameter, "quant_storage", None), "itemsize", 1)
        total += count
        trainable += count if parameter.requires_grad else 0
    return trainable, total


def parameters_line(trainable: int, total: int) -> str:
    """``parameters: 12,345 trainable of 1,234,567 (1.00%)``: the summary's line."""
    return f"parameters: {trainable:,} trainable of {total:,} ({trainable / max(total, 1):.2%})"


def load_adapter_model(run: str | os.PathLike, base: str | os.PathLike, dtype: Any = None) -> Any:
    """The model an adapter run trained: ``base`` (the checkpoint it started from) with the run's adapter.

    Embedding rows the run's loader added (a pad token, say) are in the adapter file; the base is
    resized to them first, since PEFT's loading cannot.
    """
    require("peft", f"the adapter run {run}")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftcore.model.weights import loading

    with loading("model", str(base)):
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype or "auto", use_safetensors=True)
    rows = saved_embedding_rows(run, model)
    if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)  # the saved rows replace them all
    with loading("adapter", str(run)), peft_quietly():
        return PeftModel.from_pretrained(model, str(run))


def saved_embedding_rows(run: str | os.PathLike, model: Any) -> int | None:
    """How many embedding rows the run's adapter file holds for the input embeddings, or None (not saved)."""
    from safetensors import safe_open

    embeddings = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is embeddings), None)
    if name is None:
        return None
    with safe_open(str(Path(run) / ADAPTER_WEIGHTS), framework="pt") as weights:
        for key in weights.keys():
            if key.endswith(f"{name}.weight"):
                return int(weights.get_slice(key).get_shape()[0])
    return None


def merge(
    run: str | os.PathLike, base: str | os.PathLike, output: str | os.PathLike, records: tuple[str, ...] = ()
) -> list[str]:
    """Fold the run's adapter into ``base`` and save a plain checkpoint (safetensors) with the
    run's tokenizer and its ``records`` (file names, copied) in ``output``; return the files written.

    Merged in float32 on the CPU (memory: 4 bytes a parameter) and saved in the base's own
    precision, so bf16 rounding happens once. A qlora run merges into the full-precision base, not
    the 4-bit one it trained on. The checkpoint is written beside ``output`` and renamed into place:
    a failed merge leaves nothing.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer

    run, output = Path(run), Path(output)
    if not is_adapter_dir(run):
        raise UsageError(f"{run} holds no adapter ({ADAPTER_CONFIG}): only an adapter run can be merged")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"{output} already exists and is not an empty directory; choose another --output")
    saved = getattr(AutoConfig.from_pretrained(str(base)), "dtype", None)
    model = load_adapter_model(run, base, dtype=torch.float32).merge_and_unload()
    if isinstance(saved, torch.dtype) and saved != torch.float32:
        model = model.to(saved)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(str(run)).save_pretrained(staging)
        for name in records:
            shutil.copy2(run / name, staging / name)
        if output.exists():
            output.rmdir()  # empty, checked above
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(p.name for p in output.iterdir())
