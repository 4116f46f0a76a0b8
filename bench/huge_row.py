"""One multi-megabyte row through the template and the `response-only` masker: time and peak memory.

The row's instruction (or output) is MB megabytes of words; the masker runs it under each
truncation policy at max_length 256 with the tiny Llama's tokenizer. ``--no-clip`` switches off
the clipping that keeps the masker from tokenizing text it is about to cut, to show what it saves.
Run each configuration in its own process, since peak memory is per process:

    python bench/huge_row.py --mb 20
    python bench/huge_row.py --mb 20 --no-clip
    python bench/huge_row.py --mb 20 --side output
"""

from __future__ import annotations

import argparse
import random
import resource
import time


def words(megabytes: float, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocabulary = ["alpha", "beta", "gamma", "delta", "épsilon", "中文", "-", "12345"]
    return " ".join(rng.choice(vocabulary) for _ in range(int(megabytes * 1_000_000 / 6)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20)
    parser.add_argument("--side", choices=["instruction", "output"], default="instruction")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--no-clip", action="store_true")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from sftcore import tokens
    from sftcore.assets import TINY_LLAMA
    from sftcore_plugins.alpaca import AlpacaTemplate
    from sftcore_plugins.masking import SeparateMasker

    if args.no_clip:
        tokens.CLIP_MARGIN = 10**12
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    row = {"instruction": "Summarise.", "output": "A short answer.", args.side: words(args.mb)}
    prompt, response = AlpacaTemplate().format(row)
    for truncation in ("prompt-left", "right", "drop"):
        started = time.perf_counter()
        result = SeparateMasker(truncation=truncation).batch([prompt], [response], tokenizer, args.max_length)[0]
        seconds = time.perf_counter() - started
        shown = f"{len(result['input_ids'])} tokens" if isinstance(result, dict) else f"dropped ({result.reason})"
        print(f"{args.mb:g} MB {args.side}, {truncation:11s}: {seconds:7.3f} s -> {shown}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory {peak:,.0f} MB ({'no clipping' if args.no_clip else 'clipped'})")


if __name__ == "__main__":
    main()
