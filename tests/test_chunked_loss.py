"""Chunked loss: the same loss and gradients as the model's own, without ever building whole logits."""

from __future__ import annotations

import random

import pytest
import torch

from sftcore import IGNORE_INDEX
from sftcore.errors import SftError
from sftcore.model.loss import enable_chunked_loss
from sftcore_plugins.packed import PackedCollator
from sftcore_plugins.pad import PadCollator

VOCAB = 512


def tiny_llama(seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftcore.assets import TINY_LLAMA

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(TINY_LLAMA)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config)


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, response = rng.randint(2, 15), rng.randint(1, 12)
        ids = [rng.randrange(3, VOCAB) for _ in range(prompt + response)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def loss_and_grads(model, batch, **extra):
    model.zero_grad()
    loss = model(**batch, **extra).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


BATCHES = {
    "padded": lambda r: PadCollator(pad_token_id=2)(r),
    "packed": lambda r: PackedCollator()(r),
}


@pytest.mark.parametrize("layout", list(BATCHES))
@pytest.mark.parametrize("num_items", [None, 57])
def test_loss_and_gradients_equal_the_plain_path(layout, num_items):
    batch = BATCHES[layout](rows(5))
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    plain = tiny_llama().train()
    expected_loss, expected_grads = loss_and_grads(plain, batch, **extra)
    chunked = enable_chunked_loss(tiny_llama().train(), chunk=7)  # several chunks, the last one short
    loss, grads = loss_and_grads(chunked, batch, **extra)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_no_logits_tensor_larger_than_a_chunk(monkeypatch):
    """Every vocabulary-wide tensor made in forward and backward has at most `chunk` rows."""
    import torch.nn.functional as F

    seen = []
    linear = F.linear

    def spy(input, weight, bias=None):
        out = linear(input, weight, bias)
        if out.shape[-1] == VOCAB:
            seen.append(out.numel() // VOCAB)
        return out

    monkeypatch.setattr(F, "linear", spy)
    batch = PackedCollator()(rows(8, seed=1))
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    model = enable_chunked_loss(tiny_llama().train(), chunk=16)
    model(**batch)  # the first call also checks itself against the plain loss on a short probe
    seen.clear()
    model(**batch).loss.backward()
    assert supervised > 32 and max(seen) <= 16
    assert sum(seen) == 2 * supervised, "each supervised position once forward, once recomputed"

    seen.clear()
    plain = tiny_llama().train()
    plain(**batch).loss.backward()
    assert max(seen) == batch["input_ids"].numel(), "the plain path builds logits for every position"


def test_without_labels_the_model_is_unchanged():
    model = enable_chunked_loss(tiny_llama().eval(), chunk=4)
    reference = tiny_llama().eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
        assert model(input_ids=ids, labels=ids).logits is None


def test_a_model_that_soft_caps_its_logits_is_refused():
    """Gemma 2's real cap (30): on a fresh model's small logits it changes nothing a probe could see."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0, attn_implementation="eager",
    )
    with pytest.raises(SftError, match="Gemma2ForCausalLM transforms its logits \\(final_logit_softcapping=30.0\\)"):
        enable_chunked_loss(Gemma2ForCausalLM(config), chunk=8)


def test_an_unlisted_logit_transform_is_caught_by_the_probe(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.get_output_embeddings().register_forward_hook(lambda module, inputs, output: output * 3.0)
    model = enable_chunked_loss(model, chunk=8)
    ids = torch.randint(3, 500, (2, 12))
    with pytest.raises(SftError, match="LlamaForCausalLM's own loss .* is not lm_head \\+ cross-entropy"):
        model(input_ids=ids, labels=ids)


def test_the_loader_option(tiny_model_dir):
    from sftcore_plugins.flash import FlashLoader

    model, _ = FlashLoader(chunked_loss=True, loss_chunk_tokens=5).load(str(tiny_model_dir))
    plain, _ = FlashLoader().load(str(tiny_model_dir))
    batch = PadCollator(pad_token_id=2)(rows(3, seed=4))
    out = model(**batch)
    assert out.logits is None
    with torch.no_grad():
        assert out.loss.item() == pytest.approx(plain(**batch).loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="positive"):
        FlashLoader(loss_chunk_tokens=0)


@pytest.mark.slow
def test_sft_run_with_chunked_loss(monkeypatch, tmp_path, tiny_model_dir):
    import json

    from cli_runs import ROWS, sft, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    output = tmp_path / "out"
    result = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", data, "--output", output,
        "--loader-opt", "chunked_loss=true", "--loader-opt", "loss_chunk_tokens=8",
        "--max-steps", 4, "--batch-size", 3, "--lr", 3e-3, "--no-progress",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["last_loss"] < summary["first_loss"]
