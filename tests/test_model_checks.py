"""The model against its data and files: ids without embeddings, another model's tokenizer,
max_length beyond the model's positions, broken checkpoint files, the chunked-loss hint."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest
from cli_runs import ROWS, sft, write_jsonl

from sftcore import hookimpl
from sftcore.assets import DEMO_DATA
from sftcore.data.prepare import model_positions
from sftcore.errors import SftError
from sftcore.model.loss import LARGE_VOCABULARY, chunked_loss_advice
from sftcore.model.vocab import check_token_ids
from sftcore_plugins.flash import FlashLoader
from sftcore_plugins.masking import SeparateMasker


def small_model(path, tokenizer, vocab_size: int, hidden: int = 16):
    """A one-layer Llama of ``vocab_size`` embedding rows saved with ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---- ids without an embedding row ------------------------------------------------------------


class OutOfRangeMasker:
    """A masker plugin whose third row ends in an id no tiny-Llama embedding has."""

    BAD_ID = 5000

    @hookimpl
    def register_maskers(self, register):
        def factory():
            inner = SeparateMasker()

            def mask(prompt, response, tokenizer, max_length):
                row = inner(prompt, response, tokenizer, max_length)
                if "French" in prompt:
                    row["input_ids"][-1] = row["labels"][-1] = self.BAD_ID
                return row

            return mask

        register("bad-ids", factory, description="response-only, with an id beyond the vocabulary")


@pytest.mark.slow
def test_an_id_beyond_the_embeddings_stops_the_run_before_training(monkeypatch, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    result = sft(
        monkeypatch, "run", "--data", data, "--model", "builtin:tiny-llama", "--masker", "bad-ids",
        "--output", tmp_path / "out", "--no-progress", "--max-steps", 1, extra={"bad": OutOfRangeMasker()},
    )
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == (
        "Error: token id 5000 has no embedding (the model has 512: ids 0-511) in 1 of 6 prepared rows, the first "
        "from data row 2: no token of the tokenizer has that id, so the masker made it; check the masker"
    )
    assert not (tmp_path / "out" / "trainer_state.json").exists()


def test_an_out_of_range_eos_is_named_as_the_likely_cause(toks):
    import torch

    tokenizer = copy.deepcopy(toks.gpt2())  # the builders' tokenizers are shared: never change them
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>"})  # as a tokenizer_config.json naming a new EOS does
    embeddings = torch.nn.Embedding(900, 4)
    model = type("Model", (), {"get_input_embeddings": lambda self: embeddings})()
    rows = [
        {"input_ids": [5, 6], "labels": [-100, 6], "row": 1},
        {"input_ids": [5, tokenizer.eos_token_id], "labels": [-100, tokenizer.eos_token_id], "row": 2},
        {"input_ids": [tokenizer.eos_token_id], "labels": [-100], "row": 4},
    ]
    check_token_ids(model, tokenizer, rows[:1], None)
    with pytest.raises(SftError) as caught:
        check_token_ids(model, tokenizer, rows)
    assert str(caught.value) == (
        "token id 900 has no embedding (the model has 900: ids 0-899) in 2 of 3 prepared rows, the first from data "
        "row 2: it is the tokenizer's EOS '<|im_end|>'; check eos_token in tokenizer_config.json against the model's own"
    )


# ---- another model's tokenizer; tokens added to the model's own -------------------------------


def test_another_models_tokenizer_is_refused_not_resized(toks, tmp_path, monkeypatch):
    import transformers

    path = small_model(tmp_path / "m", toks.gpt2(), vocab_size=256)
    expected = (
        f"the tokenizer in {path} has a vocabulary of 900 tokens but the model's embeddings have 256 rows: "
        "it is another model's tokenizer; use the tokenizer saved with this model"
    )
    with pytest.raises(SftError) as caught:
        FlashLoader().load(str(path))
    assert str(caught.value) == expected

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(SftError) as caught:
        FlashLoader().load(str(path))
    assert str(caught.value) == expected, "refused from config.json, before the weights load"


def test_added_tokens_get_embedding_rows_and_a_log_line(toks, tmp_path, caplog):
    tokenizer = copy.deepcopy(toks.sentencepiece())  # shared by other tests
    path = small_model(tmp_path / "m", tokenizer, vocab_size=len(tokenizer))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.save_pretrained(path)
    with caplog.at_level(logging.INFO, logger="sftcore.loader"):
        model, tok = FlashLoader().load(str(path))
    assert model.get_input_embeddings().weight.shape[0] == 960
    assert tok.pad_token == "<unk>", "the pad is an existing token: only the two markers are new"
    assert (
        "embeddings: 900 -> 960 rows for 2 token(s) added to the model's 900 (<|im_start|>, <|im_end|>), "
        "initialised to the mean of the others"
    ) in caplog.messages


def test_the_trainer_finds_the_pad_token_already_aligned(toks, checkpoint_for, caplog):
    """transformers warns on every run when the generation config's pad differs from the tokenizer's."""
    from transformers.trainer_utils import align_special_tokens

    model, tok = FlashLoader().load(str(checkpoint_for(toks.gpt2())))
    assert model.generation_config.pad_token_id == tok.pad_token_id == model.config.pad_token_id
    logger = logging.getLogger("transformers.trainer_utils")
    logger.addHandler(caplog.handler)
    try:
        align_special_tokens(model, tok)
    finally:
        logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "PAD/BOS/EOS" in r.getMessage()]


# ---- max_length beyond the model's positions ---------------------------------------------------


def test_a_max_length_beyond_the_positions_is_capped_alike_in_preview_and_prepare(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sftcore.run")
    shown = sft(monkeypatch, "preview", "-n", 1, "--max-length", 100_000)
    assert shown.exit_code == 0, shown.output
    assert shown.output.splitlines()[-1] == "1 rows kept, 0 dropped, 0 skipped; max_length 512"
    assert (
        "max_length: 100000 is more than the model takes (max_position_embeddings 512 in config.json); capped to 512"
    ) in caplog.messages
    asked = sft(monkeypatch, "prepare", "--max-length", 100_000, "--no-progress")
    exact = sft(monkeypatch, "prepare", "--max-length", 512, "--no-progress")
    assert "max_length 512;" in asked.output and "max_length 512;" in exact.output
    entries = [m.rsplit(" ", 1)[-1] for m in caplog.messages if m.startswith("prepared data:")]
    assert len(entries) == 2 and entries[0] == entries[1], "one cache entry for the capped and the exact length"


@pytest.mark.slow
def test_a_capped_max_length_is_the_same_run_when_asked_again(monkeypatch, tmp_path):
    """The saved config holds the capped length: the same command must find its own run again,
    not "a run with another config" (the output check runs before the data is prepared)."""
    command = ("run", "--max-length", 100_000, "--max-steps", 2, "--output", tmp_path / "out", "--no-progress")
    first = sft(monkeypatch, *command)
    assert first.exit_code == 0, first.output
    again = sft(monkeypatch, *command)
    assert again.exit_code == 2
    assert "holds this run, finished" in again.stderr, again.stderr


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"max_position_embeddings": 2048}, (2048, "max_position_embeddings 2048")),
        ({"n_positions": 1024, "n_ctx": 1024}, (1024, "n_positions 1024")),
        ({"vocab_size": 50280}, None),  # a state-space model: no positions
        (  # Qwen's yarn: the length is stretched by the factor
            {"max_position_embeddings": 32768, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
            (131072, "max_position_embeddings 32768 x yarn rope factor 4.0"),
        ),
        (  # Llama 3.1: max_position_embeddings is already the stretched length
            {"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}},
            (131072, "max_position_embeddings 131072"),
        ),
        ({"text_config": {"max_position_embeddings": 8192}}, (8192, "max_position_embeddings 8192")),
    ],
)
def test_model_positions_from_config_json(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_positions(str(tmp_path)) == expected


# ---- broken checkpoint files -------------------------------------------------------------------


@pytest.fixture
def copy_of(tiny_model_dir, tmp_path):
    def make():
        return shutil.copytree(tiny_model_dir, tmp_path / "copy")

    return make


def test_a_tokenizer_json_of_the_wrong_structure_is_one_line(monkeypatch, copy_of):
    path = copy_of()
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    result = sft(monkeypatch, "preview", "--model", path, "--data", DEMO_DATA, "-n", 1)
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Error: {path}/tokenizer.json is not a tokenizer the tokenizers library can read (Missing vocab/merges at "
        "line 1 column 44); replace it with the tokenizer.json saved with the model"
    ]


def test_a_config_json_that_is_not_json_is_named(copy_of):
    path = copy_of()
    (path / "config.json").write_text('{"vocab_size": 512,\n')
    with pytest.raises(SftError) as caught:
        FlashLoader().load_tokenizer(str(path))
    assert str(caught.value) == (
        f"{path}/config.json is not valid JSON (Expecting property name enclosed in double quotes at line 2, column 1); "
        "restore it from where the checkpoint came from"
    )


def test_a_weight_of_another_shape_than_config_json_says_is_one_line(copy_of):
    path = copy_of()
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
    with pytest.raises(SftError) as caught:
        FlashLoader().load(str(path))
    message = str(caught.value)
    assert message.startswith(f"cannot load the model from {path}: "), message
    assert "in the weights but config.json makes it [" in message and "more tensors)" in message
    assert message.endswith("; config.json does not describe these weights, use the config.json saved with them")


# ---- the chunked-loss hint ---------------------------------------------------------------------


def test_chunked_loss_advice_from_the_vocabulary_size():
    from transformers import Gemma2Config, LlamaConfig

    assert chunked_loss_advice(LlamaConfig(), 32_000) is None
    assert chunked_loss_advice(LlamaConfig(), LARGE_VOCABULARY - 1) is None
    assert chunked_loss_advice(LlamaConfig(), 151_936) == (
        "loss: a vocabulary of 151,936 tokens makes the full logits (tokens x vocabulary, and a float32 copy) "
        "the likely peak of memory and time; --loader-opt chunked_loss=true computes the loss in chunks without them"
    )
    assert chunked_loss_advice(Gemma2Config(), 256_000) is None, "the chunked loss refuses a soft-capped model"


def test_the_loader_logs_the_hint_for_a_large_vocabulary_only_when_chunked_loss_is_off(toks, tmp_path, caplog):
    path = small_model(tmp_path / "m", toks.tiny(), vocab_size=LARGE_VOCABULARY, hidden=8)
    with caplog.at_level(logging.INFO, logger="sftcore.loader"):
        FlashLoader().load(str(path))
        plain = [m for m in caplog.messages if "chunked_loss=true" in m]
        caplog.clear()
        FlashLoader(chunked_loss=True).load(str(path))
    assert len(plain) == 1 and plain[0].startswith("loss: a vocabulary of 65,536 tokens")
    assert not [m for m in caplog.messages if "chunked_loss=true" in m]
