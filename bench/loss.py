"""The loss head alone, plain against chunked (sftcore.model.loss): peak memory and time of forward + backward.

Hidden states of T tokens (hidden size H) go through an lm_head of V rows and cross-entropy, as
a causal LM's last step does; 70% of the positions are supervised, as in the Alpaca sample.
Each measurement runs in a fresh process, and peak memory is its resident-set growth (CPU) or
torch's peak allocation (CUDA).

    python bench/loss.py                       # T=2048, H=2048, V=32000 (TinyLlama's head), fp32
    python bench/loss.py --tokens 16384 --vocab 128256 --dtype bfloat16   # a Llama-3 head, on a GPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time


def run(mode: str, tokens: int, hidden: int, vocab: int, dtype: str, chunk: int, queue) -> None:
    import torch
    import torch.nn.functional as F

    from sftcore.model.loss import chunked_causal_lm_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    states = torch.randn(1, tokens, hidden, device=device, dtype=dt, requires_grad=True)
    weight = (torch.randn(vocab, hidden, device=device, dtype=dt) * hidden**-0.5).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), device=device)
    labels[torch.rand(1, tokens, device=device) < 0.3] = -100

    def step():
        if mode == "plain":  # what transformers' CausalLM forward and ForCausalLMLoss do
            logits = F.linear(states, weight).float()
            shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
            loss = F.cross_entropy(logits.view(-1, vocab), shifted.reshape(-1), ignore_index=-100)
        else:
            loss = chunked_causal_lm_loss(states, weight, None, labels, chunk)
        loss.backward()
        states.grad = weight.grad = None
        return loss.detach()

    if device == "cuda":
        step()  # warm-up: kernels, allocator pools
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:  # the resident set's high-water mark only rises: measure the first step
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    seconds = time.perf_counter() - started
    queue.put({"mode": mode, "device": device, "loss": loss.item(), "seconds": seconds, "extra_peak_mib": peak / 2**20})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--chunk", type=int, default=1024)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    results = []
    # Chunked first: on a CPU the resident set only grows, so a fresh process per mode.
    for mode in ("chunked", "plain"):
        queue = context.Queue()
        process = context.Process(target=run, args=(mode, args.tokens, args.hidden, args.vocab, args.dtype, args.chunk, queue))
        process.start()
        results.append(queue.get())
        process.join()
    print(f"tokens {args.tokens}, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}, chunk {args.chunk}, "
          f"device {results[0]['device']}")
    for r in results:
        print(json.dumps(r))
    chunked, plain = results
    print(f"loss equal: {abs(chunked['loss'] - plain['loss']) < 1e-3 * abs(plain['loss'])}; "
          f"peak above inputs: plain {plain['extra_peak_mib']:.0f} MiB, chunked {chunked['extra_peak_mib']:.0f} MiB; "
          f"time: plain {plain['seconds']:.2f} s, chunked {chunked['seconds']:.2f} s")


if __name__ == "__main__":
    main()
