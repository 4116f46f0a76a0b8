"""Data preparation speed: sftcore cold (batched) and cached, against the Stanford Alpaca recipe.

The reference is stanford_alpaca's ``preprocess`` reimplemented as written there: each row is
tokenized twice (prompt, then prompt + response), one row per tokenizer call, padding "longest"
and truncation at 512, tensors out. sftcore's numbers are the whole `sft prepare` path from the
file: hash the inputs, read, template, load the tokenizer, mask in batches, store (cold), or
find and load the stored entry (cached). All three run in this one process, on the same rows
and the same tokenizer.

    python bench/prep.py --data /work/shared/data/alpaca_en_demo.json
    python bench/prep.py --data .../alpaca_en_demo.json --tokenizer tiny --unique --profile

``--unique`` appends a copy number to every repeated instruction, so no two rows are equal (the
masker encodes a repeated text once per batch). ``--profile`` prints the cold path's top cProfile
entries.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import logging
import pstats
import sys
import tempfile
import time
from pathlib import Path

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
IGNORE_INDEX = -100


# ---- the reference recipe (tatsu-lab/stanford_alpaca train.py) ------------------------------


def _tokenize_fn(strings, tokenizer):
    tokenized_list = [
        tokenizer(text, return_tensors="pt", padding="longest", max_length=tokenizer.model_max_length, truncation=True)
        for text in strings
    ]
    input_ids = labels = [tokenized.input_ids[0] for tokenized in tokenized_list]
    input_ids_lens = labels_lens = [tokenized.input_ids.ne(tokenizer.pad_token_id).sum().item() for tokenized in tokenized_list]
    return dict(input_ids=input_ids, labels=labels, input_ids_lens=input_ids_lens, labels_lens=labels_lens)


def preprocess(sources, targets, tokenizer):
    examples = [s + t for s, t in zip(sources, targets)]
    examples_tokenized, sources_tokenized = [_tokenize_fn(strings, tokenizer) for strings in (examples, sources)]
    input_ids = examples_tokenized["input_ids"]
    labels = copy.deepcopy(input_ids)
    for label, source_len in zip(labels, sources_tokenized["input_ids_lens"]):
        label[:source_len] = IGNORE_INDEX
    return dict(input_ids=input_ids, labels=labels)


def reference(path: Path, tokenizer) -> dict:
    return reference_rows(json.loads(path.read_text(encoding="utf-8")), tokenizer)


def reference_rows(rows: list[dict], tokenizer) -> dict:
    sources = [(PROMPT_INPUT if row.get("input", "") != "" else PROMPT_NO_INPUT).format_map(row) for row in rows]
    targets = [f"{row['output']}{tokenizer.eos_token}" for row in rows]
    return preprocess(sources, targets, tokenizer)


# ---- inputs ----------------------------------------------------------------------------------


def write_rows(source: Path, n: int, unique: bool, directory: Path) -> Path:
    base = json.loads(source.read_text(encoding="utf-8"))
    rows = []
    for i in range(n):
        row = dict(base[i % len(base)])
        if unique and i >= len(base):
            row["instruction"] = f"{row['instruction']} (copy {i // len(base)})"
        rows.append(row)
    path = directory / "alpaca.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def bpe_tokenizer(source: Path, vocab: int, directory: Path) -> Path:
    """A GPT-2-style byte-level BPE trained on the data, saved as a tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rows = json.loads(source.read_text(encoding="utf-8"))
    texts = [" ".join(str(row.get(k, "")) for k in ("instruction", "input", "output")) for row in rows]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
        model_max_length=512,
    )
    target = directory / "bpe"
    tokenizer.save_pretrained(target)
    return target


def reference_tokenizer(directory: Path):
    """The tokenizer as the recipe prepares it: a new [PAD] when there is no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, model_max_length=512, padding_side="right")
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


# ---- measuring -------------------------------------------------------------------------------


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="The Alpaca sample (JSON array), read in place.")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--tokenizer", choices=["bpe", "tiny"], default="bpe", help="bpe: trained on the data; tiny: sftcore's.")
    parser.add_argument("--vocab", type=int, default=16_000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--unique", action="store_true", help="No two rows equal.")
    parser.add_argument("--profile", action="store_true", help="Print the cold path's top cProfile entries.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from sftcore import config as cfg
    from sftcore.assets import TINY_LLAMA
    from sftcore.host import load_host
    from sftcore.data.prepare import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_rows(args.data, args.rows, args.unique, tmp)
        tok_dir = bpe_tokenizer(args.data, args.vocab, tmp) if args.tokenizer == "bpe" else TINY_LLAMA
        tokenizer = reference_tokenizer(tok_dir)
        host = load_host(entry_points=False)
        config = cfg.effective({"model": str(tok_dir), "data": str(data), "max_length": args.max_length, "cache_dir": str(tmp / "cache")})

        ref, ref_s = timed(lambda: reference(data, tokenizer))
        ref_tokens = sum(len(x) for x in ref["input_ids"])
        del ref  # 100K tensors: not to be carried into sftcore's runs (nor into forked workers)
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        cold, cold_s = timed(lambda: prepare_data(host, dict(config), progress=False, workers=args.workers))
        if profiler:
            profiler.disable()
        cached, cached_s = timed(lambda: prepare_data(host, dict(config), progress=False))
        assert len(cached.rows) == len(cold.rows) and cached.tokens == cold.tokens

    n = args.rows
    print(f"rows: {n} ({'unique' if args.unique else 'the sample repeated'}), tokenizer: {args.tokenizer} "
          f"(vocab {len(tokenizer)}), max_length {args.max_length}, workers {args.workers}")
    print(f"tokens: reference {ref_tokens}, sftcore {cold.tokens} "
          f"({cold.supervised_tokens} supervised)")
    print(f"{'reference (Stanford Alpaca preprocess)':40s} {ref_s:8.2f} s {n / ref_s:12,.0f} rows/s")
    print(f"{'sftcore cold (batched)':40s} {cold_s:8.2f} s {n / cold_s:12,.0f} rows/s  {ref_s / cold_s:6.1f}x")
    print(f"{'sftcore cached':40s} {cached_s:8.2f} s {n / cached_s:12,.0f} rows/s  {ref_s / cached_s:6.1f}x")
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
        print(out.getvalue())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
