"""Causal-LM loss over the lm_head in chunks, so the (tokens x vocabulary) logits never exist whole.

The plain path materialises logits for every position and a float32 copy for the loss: for 16K
tokens and a 128K vocabulary that is 4 GiB in bf16 plus 8 GiB in float32, often the run's peak.
Here only supervised positions reach the lm_head, ``chunk`` at a time, and each chunk's logits
are recomputed in the backward pass (activation checkpointing) instead of being kept.
"""

from __future__ import annotations

from typing import Any

from sftcore import IGNORE_INDEX
from sftcore.errors import SftError

PROBE_TOKENS = 32
# From 2**16 tokens on, the plain loss's logits dominate: 4K tokens of a 64K vocabulary are 1 GiB in
# float32, 3 GiB with the model-dtype logits and the gradient, more than a 1B model's weights. Llama 2,
# Mistral (32K) and GPT-2 (50K) stay below; Llama 3 (128K), Qwen (151K) and Gemma (256K) are above.
LARGE_VOCABULARY = 1 << 16
CHUNKED_LOSS_OPTION = "--loader-opt chunked_loss=true"


def chunked_causal_lm_loss(
    hidden: Any, weight: Any, bias: Any, labels: Any, chunk: int, num_items_in_batch: Any = None, shift_labels: Any = None
) -> Any:
    """transformers' ``ForCausalLMLoss`` of ``lm_head(hidden)``, ``chunk`` positions at a time.

    Sum of token losses over ``num_items_in_batch`` when given (the Trainer's count across
    gradient accumulation), else the mean over supervised tokens: exactly as transformers does.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden.reshape(-1, hidden.shape[-1])[keep], targets[keep]
    total = hidden.sum().float() * 0.0  # zero, but part of the graph even with no supervised token
    for start in range(0, len(targets), chunk):
        total = total + checkpoint(
            _chunk_loss, hidden[start : start + chunk], targets[start : start + chunk], weight, bias, use_reentrant=False
        )
    if num_items_in_batch is None:
        return total / keep.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _chunk_loss(hidden: Any, targets: Any, weight: Any, bias: Any) -> Any:
    import torch.nn.functional as F

    logits = F.linear(hidden, weight, bias).float()  # float32 as transformers' loss upcasts
    return F.cross_entropy(logits, targets, reduction="sum")


def enable_chunked_loss(model: Any, chunk: int = 1024) -> Any:
    """Make ``model(..., labels=...)`` return the chunked loss and no logits; without labels it is unchanged.

    A model whose config says it transforms its logits (`logit_transform`) is refused at once;
    the first call with labels also checks, on a short probe, that the model's own loss is the
    lm_head followed by cross-entropy, so that an unlisted transform is refused too rather than
    trained on a different loss.
    """
    if chunk < 1:
        raise SftError("the loss chunk must be a positive number of tokens")
    changed = logit_transform(model.config)
    if changed:  # the probe below could miss it: a soft cap changes nothing while logits are small
        raise SftError(
            f"chunked loss: {type(model).__name__} transforms its logits ({changed}) before the loss, "
            "which the chunked loss does not; turn chunked_loss off"
        )
    base, head = model.base_model, model.get_output_embeddings()
    if base is model or head is None:
        raise SftError(f"chunked loss: {type(model).__name__} has no separate decoder and lm_head")
    original = model.forward
    checked = False

    def chunked(labels: Any, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        shift_labels = kwargs.pop("shift_labels", None)
        kwargs.pop("logits_to_keep", None)
        kwargs.setdefault("use_cache", False)  # no KV cache while computing a loss
        outputs = base(**kwargs)
        loss = chunked_causal_lm_loss(
            outputs.last_hidden_state, head.weight, head.bias, labels, chunk, num_items_in_batch, shift_labels
        )
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def forward(*args: Any, labels: Any = None, **kwargs: Any) -> Any:
        nonlocal checked
        if labels is None:
            return original(*args, **kwargs)
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        if not checked and kwargs.get("input_ids") is not None:
            check_same_loss(model, original, chunked, kwargs["input_ids"])
            checked = True
        return chunked(labels, **kwargs)

    model.forward = forward
    return model


def chunked_loss_advice(config: Any, vocabulary: int) -> str | None:
    """A line suggesting the chunked loss for a model with a large vocabulary, or None.

    None too for a model the chunked loss would refuse (`logit_transform`).
    """
    if vocabulary < LARGE_VOCABULARY or logit_transform(config):
        return None
    return (
        f"loss: a vocabulary of {vocabulary:,} tokens makes the full logits (tokens x vocabulary, and a float32 copy) "
        f"the likely peak of memory and time; {CHUNKED_LOSS_OPTION} computes the loss in chunks without them"
    )


def logit_transform(config: Any) -> str | None:
    """The config setting by which a model changes its logits after the lm_head, if any
    (Gemma's soft cap, Cohere's scale, Granite's divisor)."""
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        return f"final_logit_softcapping={cap}"
    for name in ("logit_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value is not None and value != 1:
            return f"{name}={value}"
    return None


def check_same_loss(model: Any, original: Any, chunked: Any, input_ids: Any) -> None:
    import torch

    probe = input_ids[:1, :PROBE_TOKENS]
    was_training = model.training
    model.eval()  # no dropout: both paths must see the same activations
    try:
        with torch.no_grad():
            expected = original(input_ids=probe, labels=probe, use_cache=False).loss.float()
            got = chunked(probe, input_ids=probe).loss.float()
    finally:
        model.train(was_training)
    low_precision = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    if not torch.allclose(got, expected, rtol=2e-2 if low_precision else 1e-4, atol=1e-4):
        raise SftError(
            f"chunked loss: {type(model).__name__}'s own loss ({expected.item():.5f}) is not lm_head + cross-entropy "
            f"({got.item():.5f}) on a probe (it may scale or soft-cap its logits); turn chunked_loss off"
        )
