"""Adapters on the tiny Llama: what LoRA targets and trains, and that its files reload and merge exactly.

The PEFT tests skip where peft is not installed (it is the ``lora`` extra, not a core requirement).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cli_runs import pretend_packages

from sftcore.errors import SftError, UsageError
from sftcore.model import adapters
from sftcore.model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def tiny(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def batch(seed: int = 0):
    import torch

    return torch.randint(3, 500, (4, 24), generator=torch.Generator().manual_seed(seed))


def train(model, steps: int = 12, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on one batch (the model learns it); the losses."""
    import torch

    ids = batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def logits(model, ids=None):
    import torch

    with torch.no_grad():
        return model(input_ids=batch(1) if ids is None else ids).logits


def test_default_targets_are_the_linear_layers_of_the_decoder_blocks(tiny_model_dir):
    model, _ = tiny(tiny_model_dir)
    assert adapters.decoder_linear_names(model) == LLAMA_LINEARS  # not lm_head, not embed_tokens


def test_a_name_shared_outside_the_blocks_becomes_a_pattern_of_the_blocks_only():
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.norm = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])
            self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 2)])  # a smaller list: not the blocks
            self.proj = torch.nn.Linear(4, 4)  # outside the blocks, same short name

    pattern = adapters.decoder_linear_names(Toy())
    assert isinstance(pattern, str)
    names = [name for name, _ in Toy().named_modules()]
    assert [n for n in names if re.fullmatch(pattern, n)] == ["layers.0.proj", "layers.1.proj"]


def test_a_model_without_blocks_is_told_to_name_its_layers():
    import torch

    with pytest.raises(SftError, match=r"^Linear has no list of decoder blocks to put adapters on; name the layers with --adapter-opt target_modules=\[\.\.\.\]$"):
        adapters.decoder_linear_names(torch.nn.Linear(2, 2))


def test_tied_weights_count_once(tiny_model_dir):
    model, _ = tiny(tiny_model_dir)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    trainable, total = adapters.parameter_counts(model)
    assert trainable == total == sum(p.numel() for n, p in model.named_parameters() if n != "lm_head.weight")
    assert adapters.parameters_line(8192, 115008) == "parameters: 8,192 trainable of 115,008 (7.12%)"


def test_missing_peft_is_one_line_before_anything_loads(monkeypatch):
    from sftcore_plugins import lora

    pretend_packages(monkeypatch, missing=("peft",))
    with pytest.raises(SftError) as info:
        lora.LoraAdapter()
    assert str(info.value) == "adapter 'lora' needs the peft package, which is not installed: pip install 'sftcore[lora]'"


def test_qlora_without_cuda_is_one_line():
    import torch

    from sftcore_plugins import lora

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SftError) as info:
        lora.QLoraAdapter()
    assert str(info.value) == (
        "adapter 'qlora' loads the base in 4 bits with bitsandbytes, which needs a CUDA GPU, and this machine has "
        "none; use --adapter lora"
    )


def test_qlora_asks_the_loader_for_4_bits_and_the_loader_passes_them_on(monkeypatch, tiny_model_dir):
    """Without CUDA here, the parts that do not need it: the 4-bit config and the loader's cooperation."""
    import torch
    from transformers import AutoModelForCausalLM

    from sftcore_plugins import lora
    from sftcore_plugins.flash import FlashLoader

    with monkeypatch.context() as patched:
        patched.setattr(torch.cuda, "is_available", lambda: True)
        pretend_packages(patched, present=("bitsandbytes", "peft"))
        patched.setattr(torch.cuda, "is_bf16_supported", lambda *a: True)
        options = lora.QLoraAdapter().load_options()
        patched.setattr(torch.cuda, "is_bf16_supported", lambda *a: False)  # a T4 or V100
        assert lora.QLoraAdapter().load_options()["quantization_config"].bnb_4bit_compute_dtype == torch.float16
    config = options["quantization_config"]
    assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    seen = {}
    loading = AutoModelForCausalLM.from_pretrained

    def recording(path, **kwargs):
        seen.update(kwargs)
        kwargs.pop("quantization_config")  # no bitsandbytes here: load as usual
        return loading(path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    FlashLoader().load(str(tiny_model_dir), **options)
    assert seen["quantization_config"] is config


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"alpha": 0}, "alpha must be > 0, got 0"),
        ({"dropout": 1.0}, "dropout must be >= 0 and < 1, got 1.0"),
        ({"target_modules": []}, "target_modules must name modules: a non-empty list of names, or one regular expression"),
    ],
)
def test_bad_values_are_refused_when_built(options, message):
    from sftcore_plugins import lora

    with pytest.raises(ValueError) as info:
        lora.LoraAdapter(**options)
    assert str(info.value) == message


def test_full_fine_tuning_returns_the_model_itself(tiny_model_dir):
    from sftcore_plugins.full import FullFineTuning

    model, tokenizer = tiny(tiny_model_dir)
    assert FullFineTuning().apply(model, tokenizer) is model


# Everything below needs PEFT.


@pytest.fixture
def lora():
    pytest.importorskip("peft")
    from sftcore_plugins import lora

    return lora


def base_tensors(model) -> dict:
    """The base's tensors by their checkpoint names, read through PEFT's wrapping."""
    out = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        out[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = tensor.clone()
    return out


@pytest.mark.slow
def test_only_the_adapter_trains_and_the_loss_falls(lora, tiny_model_dir):
    model, tokenizer = tiny(tiny_model_dir)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    wrapped = lora.LoraAdapter(r=4).apply(model, tokenizer)
    trained = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert not any("lm_head" in n or "embed_tokens" in n for n in trained)
    lora_before = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    losses = train(wrapped)
    assert losses[-1] < losses[0] - 0.3, losses
    after = base_tensors(wrapped)
    assert after.keys() == before.keys()
    changed = [name for name in before if not __import__("torch").equal(before[name], after[name])]
    assert changed == []  # the base, bit for bit
    moved = [n for n, p in wrapped.named_parameters() if p.requires_grad and not __import__("torch").equal(p, lora_before[n])]
    assert moved  # the adapter did change
    assert adapters.parameter_counts(wrapped) == tuple(wrapped.get_nb_trainable_parameters())


@pytest.mark.slow
def test_the_saved_adapter_reloads_with_peft_and_gives_the_same_logits(lora, tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel

    model, tokenizer = tiny(tiny_model_dir)
    wrapped = lora.LoraAdapter(r=4, alpha=8).apply(model, tokenizer)
    train(wrapped)
    expected = logits(wrapped)
    wrapped.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / ADAPTER_WEIGHTS).is_file() and not (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert sorted(config["target_modules"]) == LLAMA_LINEARS and config["r"] == 4 and config["lora_alpha"] == 8
    reloaded = PeftModel.from_pretrained(tiny(tiny_model_dir)[0], tmp_path)
    assert logits(reloaded).equal(expected)
    assert logits(AutoPeftModelForCausalLM.from_pretrained(tmp_path)).equal(expected)
    assert logits(adapters.load_adapter_model(tmp_path, tiny_model_dir)).equal(expected)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"use_dora": True}, {"use_rslora": True, "dropout": 0.1}])
def test_merged_model_gives_the_adapter_models_logits(lora, tiny_model_dir, tmp_path, options):
    from safetensors import safe_open

    model, tokenizer = tiny(tiny_model_dir)
    wrapped = lora.LoraAdapter(r=4, **options).apply(model, tokenizer)
    train(wrapped)
    expected = logits(wrapped)
    run = tmp_path / "run"
    wrapped.save_pretrained(run)
    tokenizer.save_pretrained(run)
    saved = json.loads((run / ADAPTER_CONFIG).read_text())
    assert saved["use_dora"] == options.get("use_dora", False) and saved["use_rslora"] == options.get("use_rslora", False)
    files = adapters.merge(run, tiny_model_dir, tmp_path / "merged")
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as weights:
        keys = list(weights.keys())
    assert keys and not any("lora" in key or "base_layer" in key for key in keys)
    merged = tiny(tmp_path / "merged")[0]
    assert (logits(merged) - expected).abs().max().item() < 1e-5
    assert not (logits(tiny(tiny_model_dir)[0]) - expected).abs().max().item() < 1e-3  # the adapter mattered


@pytest.mark.slow
def test_merge_refuses_a_full_run_and_a_taken_output(lora, tiny_model_dir, tmp_path):
    with pytest.raises(UsageError, match=r"holds no adapter \(adapter_config.json\): only an adapter run can be merged$"):
        adapters.merge(tiny_model_dir, tiny_model_dir, tmp_path / "out")
    model, tokenizer = tiny(tiny_model_dir)
    run = tmp_path / "run"
    lora.LoraAdapter().apply(model, tokenizer).save_pretrained(run)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(UsageError, match=r"taken already exists and is not an empty directory; choose another --output$"):
        adapters.merge(run, tiny_model_dir, tmp_path / "taken")


@pytest.mark.slow
def test_gradient_checkpointing_still_reaches_the_adapter(lora, tiny_model_dir):
    """Reentrant checkpointing with frozen embeddings gives the adapters inside the blocks no
    gradient unless the embeddings' output asks for one; checkpointing switched on as the Trainer
    does (``gradient_checkpointing_enable``) makes it ask."""
    model, tokenizer = tiny(tiny_model_dir)
    wrapped = lora.LoraAdapter(r=4).apply(model, tokenizer)
    wrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    wrapped.train()
    wrapped(input_ids=batch(), labels=batch()).loss.backward()
    grads = [p.grad for n, p in wrapped.named_parameters() if ".lora_B." in n]
    assert len(grads) == 2 * len(LLAMA_LINEARS)
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.slow
def test_embedding_rows_the_loader_added_are_saved_and_restored(lora, tiny_model_dir, tmp_path):
    """A loader that adds a pad token resizes the embeddings; the adapter file must carry them, or
    reloading gives another model (PEFT saves them when the vocabulary differs from the base's)."""
    from sftcore.model.vocab import fit_embeddings

    model, tokenizer = tiny(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    fit_embeddings(model, tokenizer, str(tiny_model_dir))
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows > 512
    wrapped = lora.LoraAdapter(r=4).apply(model, tokenizer)
    train(wrapped)
    ids = batch(1)
    ids[:, -1] = len(tokenizer) - 1  # the added token
    expected = logits(wrapped, ids)
    wrapped.save_pretrained(tmp_path / "run")
    tokenizer.save_pretrained(tmp_path / "run")
    assert adapters.saved_embedding_rows(tmp_path / "run", wrapped.get_base_model()) == rows
    assert logits(adapters.load_adapter_model(tmp_path / "run", tiny_model_dir), ids).equal(expected)
    adapters.merge(tmp_path / "run", tiny_model_dir, tmp_path / "merged")
    merged = tiny(tmp_path / "merged")[0]
    assert merged.get_input_embeddings().weight.shape[0] == rows
    assert (logits(merged, ids) - expected).abs().max().item() < 1e-5


@pytest.mark.slow
def test_the_bench_runs_both_variants(lora):
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench" / "adapters.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--hidden", "64", "--layers", "2", "--vocab", "512", "--seq", "32", "--steps", "2", "--threads", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    full, lora_ = report["adapters"]["full"], report["adapters"]["lora"]
    assert full["trainable"] == full["total"] and 0 < lora_["trainable"] < full["trainable"] < lora_["total"]
    assert re.search(r"^lora / full: trainable [\d.]+x, peak [\d.]+x, growth [\d.]+x, step_time [\d.]+x$", done.stdout, re.M)


@pytest.mark.slow
def test_a_trained_copy_of_tied_embeddings_stays_tied_to_the_head(lora, tiny_model_dir, tmp_path):
    """modules_to_save=[embed_tokens] on a model whose lm_head is its embeddings: both sides use the
    trained rows, as full fine-tuning would, and the merged model is still tied."""
    model, tokenizer = tiny(tiny_model_dir)
    wrapped = lora.LoraAdapter(r=4, modules_to_save=["embed_tokens"]).apply(model, tokenizer)
    train(wrapped)
    base = wrapped.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    expected = logits(wrapped)
    wrapped.save_pretrained(tmp_path / "run")
    tokenizer.save_pretrained(tmp_path / "run")
    assert logits(adapters.load_adapter_model(tmp_path / "run", tiny_model_dir)).equal(expected)
    adapters.merge(tmp_path / "run", tiny_model_dir, tmp_path / "merged")
    merged = tiny(tmp_path / "merged")[0]
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.get_input_embeddings().weight
    assert (logits(merged) - expected).abs().max().item() < 1e-5


def test_an_old_peft_is_one_line_saying_how_to_upgrade(monkeypatch):
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.13.0" if name == "peft" else real(name))
    with pytest.raises(SftError) as info:
        adapters.require("peft", "adapter 'lora'")
    assert str(info.value) == "adapter 'lora' needs peft 0.21 or newer, and 0.13.0 is installed: pip install -U 'sftcore[lora]'"


def test_the_extras_ask_for_the_versions_the_adapters_need():
    import tomllib

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"peft>={adapters.MINIMUM['peft']}" in extras["lora"]
    assert {f"peft>={adapters.MINIMUM['peft']}", f"bitsandbytes>={adapters.MINIMUM['bitsandbytes']}"} <= set(extras["qlora"])
    assert f"peft>={adapters.MINIMUM['peft']}" in extras["test"]


def test_gpt2_style_conv1d_layers_are_default_targets():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    assert adapters.decoder_linear_names(model) == ["c_attn", "c_fc", "c_proj"]
