"""Training throughput on one GPU: the Stanford Alpaca recipe against sftcore and TRL.

A TinyLlama-1.1B-shaped Llama with random weights (hidden 2048, 22 layers, 32 heads, 4 KV heads,
vocabulary 32000) trains on the Alpaca sample, batches of 16 rows, max length 1024, bf16
autocast, in one process run:

* reference: stanford_alpaca's preprocessing and collator (right padding, mask = ids != pad), sdpa;
* sftcore: the prepared rows, the `packed` collator (16 x 1024 tokens a batch, best-fit
  decreasing) and the attention the flash loader picks for padding-free batches (FlashAttention
  4, 3 or 2, else PyTorch's varlen kernel, else sdpa);
* trl: SFTTrainer with BFD packing and padding-free batches, same attention, when trl imports;
* sftcore-lora, sftcore-qlora (when asked for with --variants): the sftcore variant with the
  built-in `lora` adapter (r 8 on every linear layer of the decoder blocks), and with `qlora`
  (the base saved, then loaded in 4 bits through bitsandbytes; CUDA only, else skipped).

Before training, the loss of one batch of the same rows with the same weights, padded under sdpa
and packed under sftcore's attention, is printed: the two must agree (bf16 tolerance).

The second epoch is timed (clocks read after a device synchronisation). Printed per variant:
real (non-pad) tokens/s, padding fraction, peak memory, MFU against 780 TFLOP/s (bf16 dense on
an H100, measured) with 6 x parameters FLOPs per token (4 x for an adapter run: the frozen
weights get no gradient), and the ratio to the reference.

    python bench/train_gpu.py --data /work/shared/data/alpaca_en_demo.json
    python bench/train_gpu.py --data /work/shared/data/alpaca_en_demo.json --tiny   # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prep import IGNORE_INDEX, bpe_tokenizer, reference_rows, reference_tokenizer  # noqa: E402

TINYLLAMA = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
    vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
TINY = dict(TINYLLAMA, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
PEAK_FLOPS = 780e12


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def epoch_clock(counter, timed_epoch: int):
    """A callback timing epoch ``timed_epoch`` (0-based) and the tokens collated in it."""
    from transformers import TrainerCallback

    class EpochClock(TrainerCallback):
        epochs_begun, started, seconds, real, positions = 0, 0.0, None, 0, 0

        def on_epoch_begin(self, args, state, control, **kwargs):
            if self.epochs_begun == timed_epoch:
                synchronize()
                counter.real_tokens = counter.positions = 0
                self.started = time.perf_counter()
            self.epochs_begun += 1

        def on_epoch_end(self, args, state, control, **kwargs):
            if self.epochs_begun == timed_epoch + 1:
                synchronize()
                self.seconds = time.perf_counter() - self.started
                self.real, self.positions = counter.real_tokens, counter.positions

    return EpochClock()


def new_model(shape: dict, attention: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), attn_implementation=attention)
    return model.to("cuda") if torch.cuda.is_available() else model


def training_args(output: Path, args, **extra):
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output), per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
        learning_rate=2e-5, lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0,
        bf16=torch.cuda.is_available(), logging_steps=50, save_strategy="no", report_to="none",
        remove_unused_columns=False, dataloader_pin_memory=torch.cuda.is_available(), seed=0,
        disable_tqdm=True, **extra,
    )


# ---- variants: each returns (trainer, counter, attention) ------------------------------------


def variant_reference(args, rows, tok_dir, shape, output):
    from torch.nn.utils.rnn import pad_sequence
    from transformers import Trainer

    from sftcore.run.stats import BatchCounter

    tokenizer = reference_tokenizer(tok_dir)
    tokenizer.model_max_length = args.max_length
    data = reference_rows(rows, tokenizer)
    dataset = [{"input_ids": i, "labels": lab} for i, lab in zip(data["input_ids"], data["labels"])]
    pad = tokenizer.pad_token_id

    def collate(instances):  # stanford_alpaca DataCollatorForSupervisedDataset
        input_ids = pad_sequence([i["input_ids"] for i in instances], batch_first=True, padding_value=pad)
        labels = pad_sequence([i["labels"] for i in instances], batch_first=True, padding_value=IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": input_ids.ne(pad)}

    counter = BatchCounter(collate)
    model = new_model(shape, "sdpa")
    return Trainer(model=model, args=training_args(output, args), train_dataset=dataset, data_collator=counter), counter, "sdpa"


def packed_attention() -> str:
    from sftcore_plugins.flash import pick_attention

    attention, _ = pick_attention("auto", packing=True)
    if attention == "sft_varlen":
        from sftcore.model import varlen

        varlen.register()
    return attention


def variant_sftcore(args, rows, tok_dir, shape, output, adapter=None):
    from sftcore import config as cfg
    from sftcore.data.prepare import prepare_data
    from sftcore.host import load_host
    from sftcore.run.stats import BatchCounter
    from sftcore.run.trainer import trainer_class
    from sftcore_plugins.packed import PackedCollator

    data_file = output / "rows.json"
    data_file.write_text(json.dumps(rows), encoding="utf-8")
    config = cfg.effective({"model": str(tok_dir), "data": str(data_file), "max_length": args.max_length, "cache_dir": False})
    prepared = prepare_data(load_host(entry_points=False), config, progress=False)
    attention = packed_attention()
    counter = BatchCounter(PackedCollator(max_tokens_per_batch=args.batch_size * args.max_length, attn_implementation=attention))
    model = new_model(shape, attention)
    if hasattr(adapter, "load_options"):  # qlora: the same weights, loaded again in 4 bits
        model = reloaded(model, output / "base", attention, adapter.load_options())
    if args.chunked_loss:
        from sftcore.model.loss import enable_chunked_loss

        enable_chunked_loss(model)
    if adapter is not None:
        model = adapter.apply(model, None)
    trainer = trainer_class()(model=model, args=training_args(output, args), train_dataset=prepared.rows, data_collator=counter)
    return trainer, counter, attention


def reloaded(model, directory: Path, attention: str, load_options: dict):
    import torch
    from transformers import AutoModelForCausalLM

    model.to(torch.bfloat16).save_pretrained(directory)
    del model
    return AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation=attention, dtype=torch.bfloat16, device_map={"": 0}, **load_options
    )


def variant_sftcore_lora(args, rows, tok_dir, shape, output):
    from sftcore_plugins.lora import LoraAdapter

    return variant_sftcore(args, rows, tok_dir, shape, output, adapter=LoraAdapter())


def variant_sftcore_qlora(args, rows, tok_dir, shape, output):
    from sftcore_plugins.lora import QLoraAdapter

    return variant_sftcore(args, rows, tok_dir, shape, output, adapter=QLoraAdapter())


def check_datasets_location() -> None:
    """Raise ImportError where ``datasets`` would fail to build any Dataset.

    datasets fingerprints a Dataset with dill, which pickles by value every module whose file is
    neither under a sys prefix nor in a path naming ``site-packages`` (a ``pip install --target``
    tree, for one) and then fails on pyarrow with ``PicklingError: Can't pickle <class
    'MonthDayNano'>``.
    """
    import importlib.util

    spec = importlib.util.find_spec("pyarrow")
    if spec is None or spec.origin is None:
        return  # the import below reports it
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    if "site-packages" not in spec.origin and not any(spec.origin.startswith(p) for p in prefixes):
        raise ImportError(
            f"pyarrow is imported from {Path(spec.origin).parent}, outside any site-packages directory, where "
            "datasets cannot fingerprint a Dataset; reach that tree through a path that names one "
            "(bench/gpu_session.sh does: ln -s /tmp/site /tmp/py/site-packages)"
        )


def variant_trl(args, rows, tok_dir, shape, output):
    check_datasets_location()
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sftcore.run.stats import BatchCounter
    from sftcore_plugins.alpaca import AlpacaTemplate

    template = AlpacaTemplate()
    pairs = [template.format(r) for r in rows]
    dataset = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    attention = packed_attention()
    model = new_model(shape, attention)
    config = SFTConfig(
        **training_args(output, args).to_dict() | {
            "max_length": args.max_length, "packing": True, "packing_strategy": "bfd", "padding_free": True,
            "completion_only_loss": True, "gradient_checkpointing": False, "dataset_num_proc": None,
        }
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    counter = BatchCounter(trainer.data_collator)
    trainer.data_collator = counter
    return trainer, counter, attention


VARIANTS = {
    "reference": variant_reference, "sftcore": variant_sftcore, "trl": variant_trl,
    "sftcore-lora": variant_sftcore_lora, "sftcore-qlora": variant_sftcore_qlora,
}


def loss_agreement(args, rows, tok_dir, shape, root) -> dict:
    """One batch of the same rows, same weights: the padded batch under sdpa against sftcore's
    packed batch under the attention it trains with. Mean loss per supervised token, bf16 autocast."""
    import torch

    from sftcore import config as cfg
    from sftcore.host import load_host
    from sftcore.data.prepare import prepare_data
    from sftcore_plugins.packed import PackedCollator
    from sftcore_plugins.pad import PadCollator

    data_file = root / "agreement.json"
    data_file.write_text(json.dumps(rows[: args.batch_size]), encoding="utf-8")
    config = cfg.effective({"model": str(tok_dir), "data": str(data_file), "max_length": args.max_length, "cache_dir": False})
    batch = list(prepare_data(load_host(entry_points=False), config, progress=False).rows)
    attention = packed_attention()
    padded = PadCollator(pad_token_id=0)(batch)
    packed = PackedCollator(max_tokens_per_batch=args.batch_size * args.max_length, attn_implementation=attention)(batch)
    cuda = torch.cuda.is_available()
    losses = {}
    for name, impl, inputs in (("padded", "sdpa", padded), ("packed", attention, packed)):
        model = new_model(shape, impl)  # seeded: the same weights both times
        device = next(model.parameters()).device
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
        with torch.no_grad(), torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            losses[name] = float(model(**inputs).loss)
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    result = {"rows": len(batch), "padded_sdpa": losses["padded"], f"packed_{attention}": losses["packed"],
              "relative_difference": abs(losses["packed"] - losses["padded"]) / abs(losses["padded"])}
    print(json.dumps({"loss_agreement": result}), flush=True)
    return result


def measure(name, build, args, rows, tok_dir, shape, root) -> dict | None:
    import torch

    output = root / name
    output.mkdir()
    from sftcore.errors import SftError

    try:
        trainer, counter, attention = build(args, rows, tok_dir, shape, output)
    except (ImportError, SftError) as exc:  # a package or a GPU this machine lacks
        print(f"{name}: skipped ({exc})", flush=True)
        return None
    from transformers.trainer_callback import PrinterCallback

    clock = epoch_clock(counter, timed_epoch=args.epochs - 1)
    trainer.add_callback(clock)
    trainer.remove_callback(PrinterCallback)  # a dict per logged step
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    params = sum(p.numel() for p in trainer.model.parameters())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = {
        "variant": name, "attention": attention, "seconds": clock.seconds, "real_tokens": clock.real,
        "tokens_per_s": clock.real / clock.seconds, "padding": 1 - clock.real / max(clock.positions, 1), "params": params,
        "trainable": trainable,
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    flops_per_token = (6 if trainable == params else 4) * params
    result["mfu"] = flops_per_token * result["tokens_per_s"] / PEAK_FLOPS
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="The Alpaca sample (JSON array), read in place.")
    parser.add_argument("--tiny", action="store_true", help="A 2-layer model, 64 rows, max length 256, batches of 4: runs on a CPU.")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--rows", type=int)
    parser.add_argument("--variants", default="reference,sftcore,trl")
    parser.add_argument("--chunked-loss", action="store_true", help="sftcore variant: loss over the lm_head in chunks.")
    args = parser.parse_args()
    args.batch_size = args.batch_size or (4 if args.tiny else 16)
    args.max_length = args.max_length or (256 if args.tiny else 1024)
    rows = json.loads(args.data.read_text(encoding="utf-8"))[: args.rows or (64 if args.tiny else None)]
    shape = TINY if args.tiny else TINYLLAMA

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device}; torch {torch.__version__}; rows {len(rows)}, batch {args.batch_size}, "
          f"max_length {args.max_length}, epochs {args.epochs} (the last one timed)", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok_dir = bpe_tokenizer(args.data, shape["vocab_size"] - 1, root)  # room for the reference's [PAD]
        agreement = loss_agreement(args, rows, tok_dir, shape, root)
        for name in args.variants.split(","):
            result = measure(name, VARIANTS[name], args, rows, tok_dir, shape, root)
            if result:
                results.append(result)
    base = next((r for r in results if r["variant"] == "reference"), None)
    memory = "peak GiB" if torch.cuda.is_available() else "max RSS GiB"
    print(f"\n{'variant':13s} {'attention':18s} {'epoch s':>8s} {'real tok/s':>11s} {'padding':>8s} {memory:>12s} {'MFU':>6s} {'vs ref':>7s}")
    for r in results:
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mfu = f"{r['mfu']:.1%}" if torch.cuda.is_available() else "n/a"
        print(f"{r['variant']:13s} {r['attention']:18s} {r['seconds']:8.1f} {r['tokens_per_s']:11,.0f} "
              f"{r['padding']:8.1%} {r['peak_gb']:12.2f} {mfu:>6s} {ratio:>7s}")
    packed_name = next(k for k in agreement if k.startswith("packed_"))
    print(f"\nloss on the same {agreement['rows']} rows, same weights: padded (sdpa) {agreement['padded_sdpa']:.5f}, "
          f"packed ({packed_name[7:]}) {agreement[packed_name]:.5f}, relative difference {agreement['relative_difference']:.2e}")


if __name__ == "__main__":
    main()
