"""Full fine-tuning against LoRA (plugins/lora.py): peak memory and time of a training step.

A randomly initialised Llama (hidden 512, 8 layers, a 32,000-token vocabulary, untied head: about
58M parameters) trains on random tokens with AdamW, in fp32 on a CPU, or in bf16 on a GPU. Full
fine-tuning keeps weights, gradients and two Adam moments for every parameter; LoRA keeps the
frozen base and those four only for the adapters. Each variant runs in a fresh process: peak
memory is the resident set's high-water mark (CPU) or torch's peak allocation (CUDA), also given
as its growth over the process after imports, before the model is built.

    python bench/adapters.py                          # the default model, 1 x 128 tokens a step
    python bench/adapters.py --batch 4 --seq 256      # activations outweigh the optimizer state: LoRA saves less
    python bench/adapters.py --hidden 64 --layers 2 --vocab 512 --steps 2   # seconds, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import time


def peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run(variant: str, args: argparse.Namespace, queue) -> None:
    import peft  # noqa: F401  imported by both variants before the baseline: its memory is no variant's
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftcore.model.adapters import parameter_counts
    from sftcore_plugins.lora import LoraAdapter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    baseline = peak_bytes(device)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64 or 64,
        num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 64, 1), max_position_embeddings=max(args.seq, 64),
        tie_word_embeddings=False,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    if variant == "lora":
        model = LoraAdapter(r=args.r, alpha=2 * args.r).apply(model, None)
    trainable, total = parameter_counts(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    model.train()
    times, losses = [], []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    peak = peak_bytes(device)
    queue.put({
        "variant": variant, "device": device, "trainable": trainable, "total": total,
        "peak_mib": peak / 2**20, "growth_mib": (peak - baseline) / 2**20,
        # The first step allocates the Adam moments and warms the kernels: timed apart.
        "first_step_s": times[0], "step_s": statistics.median(times[1:] or times), "loss": losses[-1],
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (alpha is twice it)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    results = {}
    for variant in ("full", "lora"):  # a fresh process each: the resident set's high-water mark only rises
        queue = context.Queue()
        process = context.Process(target=run, args=(variant, args, queue))
        process.start()
        results[variant] = queue.get()
        process.join()
    print(f"{'variant':8} {'trainable':>12} {'total':>12} {'peak MiB':>9} {'growth MiB':>10} {'step s':>7} {'1st step s':>10}")
    for r in results.values():
        print(f"{r['variant']:8} {r['trainable']:>12,} {r['total']:>12,} {r['peak_mib']:>9.0f} {r['growth_mib']:>10.0f} "
              f"{r['step_s']:>7.3f} {r['first_step_s']:>10.3f}")
    full, lora = results["full"], results["lora"]
    ratios = {
        "trainable": lora["trainable"] / full["trainable"],
        "peak": lora["peak_mib"] / full["peak_mib"],
        "growth": lora["growth_mib"] / max(full["growth_mib"], 1e-9),
        "step_time": lora["step_s"] / full["step_s"],
    }
    print("lora / full: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()))
    print(json.dumps({"adapters": results, "ratios": ratios, "args": vars(args)}))


if __name__ == "__main__":
    main()
