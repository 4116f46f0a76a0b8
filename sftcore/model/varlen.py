"""Attention implementation ``sft_varlen``: PyTorch's own varlen FlashAttention kernel, no flash-attn package.

For padding-free (packed) batches: several examples share one row, ``position_ids`` restart at
0 for each, and attention must stay inside each example. ``register()`` adds the implementation
to transformers' ``AttentionInterface``; a model loaded with ``attn_implementation="sft_varlen"``
then finds each example's boundaries from ``cu_seq_lens_q`` when the batch carries it, else from
``position_ids`` and the padding mask, and attends with ``torch.nn.attention.varlen.varlen_attn``
(CUDA, fp16/bf16). sdpa would need a block-diagonal mask of batch x length^2 instead.

Where that kernel cannot run (a CPU, fp32, a torch without it) the same function takes a
reference path, one causal sdpa call per example: exact, slow, and what the CPU tests compare.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sftcore.errors import SftError

NAME = "sft_varlen"
KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # what PyTorch's flash kernel takes


class VarlenError(SftError):
    """A model or batch that ``sft_varlen`` cannot attend over correctly."""


def kernel() -> Callable[..., Any] | None:
    """``torch.nn.attention.varlen.varlen_attn``, or None in a torch without it (before 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def kernel_runs(query: Any) -> bool:
    """Whether the varlen kernel takes this query: it exists, and the query is fp16/bf16 on CUDA."""
    return query.is_cuda and query.dtype in KERNEL_DTYPES and kernel() is not None


def register(name: str = NAME) -> str:
    """Add the implementation to transformers under ``name`` (idempotent); return the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, attention_forward)
    # FlashAttention's mask builder hands over the 2-D padding mask when there is padding and
    # None otherwise: exactly what boundaries() needs, never a length^2 tensor.
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


@dataclass
class Segments:
    """Where the examples of a flattened batch are: ``cu[i]:cu[i+1]`` is example i among the kept tokens."""

    keep: Any  # flat indices of real (non-pad) tokens into batch*length, or None when all are real
    cu: Any  # int32 (examples + 1,)
    longest: int


# The last batch's boundaries, reused by every layer of the same forward pass: they receive the
# very same mask and position tensors, and finding boundaries costs a device-to-host sync.
_last: tuple[tuple[Any, ...], Segments] | None = None


def _same(a: Any, b: Any) -> bool:
    """Tensors by identity (the cached ones are held, so an id is never reused), the rest by value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return a == b


def boundaries(query: Any, attention_mask: Any, position_ids: Any, cu_seq_lens: Any, longest: Any) -> Segments:
    global _last
    key = (attention_mask, position_ids, cu_seq_lens, query.shape[0], query.shape[2], query.device)
    if _last is not None and all(_same(a, b) for a, b in zip(_last[0], key)):
        return _last[1]
    found = _find_segments(query, attention_mask, position_ids, cu_seq_lens, longest)
    _last = (key, found)
    return found


def _find_segments(query: Any, attention_mask: Any, position_ids: Any, cu_seq_lens: Any, longest: Any) -> Segments:
    batch, length, device = query.shape[0], query.shape[2], query.device
    if cu_seq_lens is not None and attention_mask is None:
        cu = cu_seq_lens.to(device=device, dtype=torch.int32)
        if int(cu[-1]) != batch * length:
            raise VarlenError(f"cu_seq_lens_q covers {int(cu[-1])} tokens, the batch has {batch * length}")
        return Segments(None, cu, int(longest) if longest is not None else int(cu.diff().max()))
    if attention_mask is not None and attention_mask.dim() != 2:
        raise VarlenError(f"{NAME} expects a 2-D padding mask, got shape {tuple(attention_mask.shape)}")
    real = (
        attention_mask.to(device=device, dtype=torch.bool)
        if attention_mask is not None
        else torch.ones(batch, length, dtype=torch.bool, device=device)
    )
    if position_ids is None:
        positions = torch.arange(length, device=device).expand(batch, length)
    else:
        positions = position_ids.to(device).expand(batch, length)
    # An example starts at each row's start, where positions do not count on by one (packing),
    # and right after a pad (left padding).
    start = torch.ones(batch, length, dtype=torch.bool, device=device)
    start[:, 1:] = (positions[:, 1:] != positions[:, :-1] + 1) | ~real[:, :-1]
    real, start = real.reshape(-1), start.reshape(-1)
    keep = None if bool(real.all()) else real.nonzero().squeeze(1)
    if keep is not None:
        start = start[keep]
    first = start.nonzero().squeeze(1)
    cu = torch.cat([first, first.new_tensor([start.numel()])]).to(torch.int32)
    return Segments(keep, cu, int(cu.diff().max()))


def attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention-function contract: (batch, heads, length, dim) in, (batch, length, heads, dim) out."""
    batch, heads, length, dim = query.shape
    unsupported = {
        "attention dropout": dropout,
        "a sliding window": sliding_window,
        "logit soft-capping": softcap,
        "attention sinks": kwargs.get("s_aux"),
    }
    for what, value_ in unsupported.items():
        if value_:
            raise VarlenError(f"{NAME} does not implement {what}; load the model with attn_implementation=sdpa or flash_attention_*")
    if key.shape[2] != length:
        raise VarlenError(
            f"{NAME} attends over training batches only (queries and keys of equal length, no cache); "
            "load the model with attn_implementation=sdpa to generate"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    found = boundaries(
        query, attention_mask, kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    )
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], dim)
    if found.keep is not None:
        q, k, v = q[found.keep], k[found.keep], v[found.keep]
    if kernel_runs(q):
        out = call_kernel(kernel(), q, k, v, found.cu, found.longest, scaling, causal)
    else:
        out = reference(q, k, v, found.cu, scaling, causal)
    if found.keep is not None:  # pad positions get zeros; their labels are -100
        out = out.new_zeros(batch * length, heads, dim).index_copy(0, found.keep, out)
    return out.view(batch, length, heads, dim), None


@functools.lru_cache(maxsize=4)
def _parameters(fn: Callable[..., Any]) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def call_kernel(
    fn: Callable[..., Any], q: Any, k: Any, v: Any, cu: Any, longest: int, scale: float | None, causal: bool
) -> Any:
    """Call ``varlen_attn`` in whichever signature this torch has.

    torch 2.10: ``(..., max_q, max_k, is_causal=False, return_aux=None)``. Later (2.12, 2.13):
    keyword-only ``scale``, ``window_size=(-1, 0)`` for causal, ``enable_gqa`` for fewer
    key/value heads. What the kernel lacks is done here: key/value heads repeated, the query
    pre-scaled (the kernel divides by sqrt(dim)).
    """
    params = _parameters(fn)
    options: dict[str, Any] = {}
    if "window_size" in params:
        options["window_size"] = (-1, 0) if causal else (-1, -1)
    elif "is_causal" in params:
        options["is_causal"] = causal
    elif causal:
        raise VarlenError("this torch's varlen_attn takes neither window_size nor is_causal; it cannot attend causally")
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if scale is not None:
        if "scale" in params:
            options["scale"] = scale
        else:
            q = q * (scale * math.sqrt(q.shape[-1]))
    return fn(q, k, v, cu, cu, longest, longest, **options)


def reference(q: Any, k: Any, v: Any, cu: Any, scale: float | None, causal: bool) -> Any:
    """The same attention with one sdpa call per example: (tokens, heads, dim) in and out."""
    from torch.nn.functional import scaled_dot_product_attention

    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # head h reads key/value head h // groups, as transformers' repeat_kv lays them out
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bounds = cu.tolist()
    parts = []
    for start, end in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        parts.append(scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale).transpose(0, 1))
    return torch.cat(parts)
