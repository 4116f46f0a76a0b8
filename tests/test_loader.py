"""The `flash` loader on CPU: attention choice, tokenizer preparation and the pad-token fallbacks."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import transformers

from sftcore.model.vocab import PAD_MULTIPLE
from sftcore_plugins.flash import FlashLoader, pick_attention, pick_dtype


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return FlashLoader().load(str(tiny_model_dir))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_pick_attention_without_cuda():
    attention, why = pick_attention()
    assert attention == "sdpa"
    assert "no CUDA" in why
    assert pick_dtype() == torch.float32


@pytest.mark.parametrize("forced", ["eager", "sdpa", "flash_attention_2"])
def test_pick_attention_honours_a_forced_value(forced):
    assert pick_attention(forced) == (forced, "asked for with attn_implementation")
    assert pick_dtype("bfloat16") == torch.bfloat16


def test_tiny_checkpoint_loads_ready_to_train(loaded, tiny_model_dir, caplog):
    model, tok = loaded
    assert tok.padding_side == "right"
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 2, "an existing pad is kept"
    assert model.get_input_embeddings().weight.shape[0] == 512, "no resize when a pad exists"
    assert model.config.pad_token_id == 2
    assert tok.model_max_length == 512
    if not torch.cuda.is_available():
        assert model.config._attn_implementation == "sdpa"
        assert model.dtype == torch.float32
    with caplog.at_level(logging.INFO, logger="sftcore.loader"):
        FlashLoader(attn_implementation="eager", dtype="bfloat16").load(str(tiny_model_dir))
    assert "attention: eager (asked for with attn_implementation); dtype: bfloat16" in caplog.text


def test_forced_attention_and_dtype_reach_the_model(tiny_model_dir):
    model, _ = FlashLoader(attn_implementation="eager", dtype="bfloat16").load(str(tiny_model_dir))
    assert model.config._attn_implementation == "eager"
    assert model.dtype == torch.bfloat16


def test_right_padding_and_max_length_are_set(tiny_model_dir, tmp_path):
    path = tmp_path / "left"
    shutil.copytree(tiny_model_dir, path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(padding_side="left", model_max_length=1_000_000)
    config_path.write_text(json.dumps(config))

    _, tok = FlashLoader().load(str(path))
    assert tok.padding_side == "right"
    assert tok.model_max_length == 512, "taken from max_position_embeddings"
    _, tok = FlashLoader(max_length=128).load(str(path))
    assert tok.model_max_length == 128
    _, tok = FlashLoader().load(str(path), max_length=64)
    assert tok.model_max_length == 64


def test_missing_pad_uses_unk_when_distinct_from_eos(toks, checkpoint_for):
    model, tok = FlashLoader().load(str(checkpoint_for(toks.sentencepiece())))
    assert tok.pad_token == "<unk>" and tok.pad_token_id == tok.unk_token_id
    assert tok.pad_token_id not in (tok.bos_token_id, tok.eos_token_id)
    assert model.get_input_embeddings().weight.shape[0] == len(toks.sentencepiece())
    assert model.config.pad_token_id == tok.pad_token_id


def test_missing_pad_uses_a_reserved_special_token(toks, checkpoint_for):
    model, tok = FlashLoader().load(str(checkpoint_for(toks.llama3(with_pad=False))))
    assert tok.pad_token == "<|reserved_special_token_0|>"
    assert tok.pad_token_id not in (tok.bos_token_id, tok.eos_token_id)
    assert len(tok) == len(toks.llama3(with_pad=False)), "no token added"
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id


def test_missing_pad_adds_one_and_resizes_to_a_multiple_of_64(toks, checkpoint_for):
    """GPT-2: unk is the EOS and there is no reserved token, so a new `<|pad|>` is added."""
    before = len(toks.gpt2())
    model, tok = FlashLoader().load(str(checkpoint_for(toks.gpt2())))
    assert tok.pad_token == "<|pad|>"
    assert tok.pad_token_id == before and len(tok) == before + 1
    assert tok.pad_token_id != tok.eos_token_id
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % PAD_MULTIPLE == 0 and len(tok) <= rows < len(tok) + PAD_MULTIPLE
    assert model.get_output_embeddings().weight.shape[0] == rows
    assert model.config.vocab_size == rows
    assert model.config.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, tok.pad_token_id]]))
    assert out.logits.shape[-1] == rows and torch.isfinite(out.logits).all()


def test_trust_remote_code_and_pickle_default_off(tiny_model_dir, monkeypatch):
    calls = {}
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained

        def record(path, *args, _name=cls.__name__, _original=original, **kwargs):
            calls[_name] = kwargs
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", record)

    assert FlashLoader().options["trust_remote_code"] is False
    FlashLoader().load(str(tiny_model_dir))
    assert calls["AutoTokenizer"]["trust_remote_code"] is False
    model_kwargs = calls["AutoModelForCausalLM"]
    assert model_kwargs["trust_remote_code"] is False
    assert model_kwargs["use_safetensors"] is True, "no pickle unless allow_pickle=True"
    assert "dtype" in model_kwargs and "torch_dtype" not in model_kwargs

    FlashLoader(trust_remote_code=True, allow_pickle=True).load(str(tiny_model_dir))
    assert calls["AutoTokenizer"]["trust_remote_code"] is True
    assert calls["AutoModelForCausalLM"]["use_safetensors"] is None


def test_loader_options_are_checked(builtin_host):
    from sftcore.options import option_problems

    component = builtin_host.registry.get("loader", "flash")
    assert option_problems(component, {"trust_remote_code": "yes"}) == [
        "loader 'flash' option 'trust_remote_code' must be bool, got 'yes'"
    ]
    assert option_problems(component, {"attn_implementation": "flash_attention_2", "max_length": 2048}) == []


def test_load_tokenizer_prepares_without_weights(toks, checkpoint_for, tiny_model_dir, tmp_path):
    loader = FlashLoader()
    tok = loader.load_tokenizer(str(checkpoint_for(toks.gpt2())))
    assert tok.padding_side == "right" and tok.model_max_length == 256
    assert tok.pad_token_id is None, "only `load` adds a pad (it may resize the model)"
    assert loader.load_tokenizer(str(tiny_model_dir), max_length=32).model_max_length == 32

    only = tmp_path / "tokenizer-only"
    only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, only / name)
    tok = loader.load_tokenizer(str(only))
    assert tok.model_max_length == 512 and tok.padding_side == "right"


def test_loaded_tokenizer_appends_no_eos_of_its_own(toks, checkpoint_for):
    """A post-processor that appends EOS would end every inference prompt in EOS; the loader
    rebuilds it to add BOS only, and the saved tokenizer keeps that."""
    source = toks.sentencepiece(add_eos=True)
    assert source("hello world")["input_ids"][-1] == source.eos_token_id, "the fixture appends EOS"
    _, tok = FlashLoader().load(str(checkpoint_for(source)))
    ids = tok("hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert ids == [tok.bos_token_id] + tok("hello world", add_special_tokens=False)["input_ids"]
