"""Conversation preparation speed: sftcore's `chat` template and masker against calling
``apply_chat_template`` per turn.

The reference is what a careful loop does without sftcore: for every assistant turn, tokenize
the prompt (``messages[:i]``, generation prompt on) and the conversation through that turn with
``apply_chat_template(tokenize=True)``, and supervise the difference. sftcore renders each
prompt and reply once and encodes them in batches, through the pipeline `sft prepare` uses.
Both run in this process on the same synthetic rows and tokenizer: by default a byte-level BPE
with ChatML turn tokens trained here, or ``--tokenizer DIR`` with its own chat template.

    python bench/chat.py --rows 10000
"""

from __future__ import annotations

import argparse
import random
import time

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = (
    "the a of to and in is it you that for on with as be this hello there how are what why can help "
    "please thanks answer question think about list name three colors cold hot up down sure yes no"
).split()
IGNORE_INDEX = -100


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """Conversations of 1-4 turns, with a system message in a third of them."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": text(4, 10)}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 4)):
            messages += [{"role": "user", "content": text(5, 30)}, {"role": "assistant", "content": text(10, 60)}]
        rows.append({"messages": messages})
    return rows


def chatml_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([m["content"] for row in synthetic_rows(500, seed=1) for m in row["messages"]], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    wrapped.chat_template = CHATML
    return wrapped


def reference(rows: list[dict], tokenizer) -> list[list[dict]]:
    """Per turn: prompt and conversation through the turn, each tokenized by apply_chat_template."""
    out = []
    for row in rows:
        messages, examples = row["messages"], []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = _ids(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True))
            whole = _ids(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True))
            examples.append({"input_ids": whole, "labels": [IGNORE_INDEX] * len(prompt) + whole[len(prompt) :]})
        out.append(examples)
    return out


def _ids(out) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def sftcore_path(rows: list[dict], tokenizer, max_length: int):
    """What `sft prepare` does after reading: the chat template and the response-only masker,
    through the pipeline (batches of MASK_BATCH rows)."""
    from sftcore.data.pipeline import Prepared, format_rows, mask_rows
    from sftcore_plugins.chat import ChatTemplate
    from sftcore_plugins.masking import SeparateMasker

    prepared = Prepared()
    items = format_rows(ChatTemplate(tokenizer=tokenizer), enumerate(rows, 1), "bench", "error", prepared)
    mask_rows(SeparateMasker(), items, tokenizer, max_length, prepared)
    return prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--tokenizer", help="a tokenizer directory with a chat template (default: ChatML trained here)")
    args = parser.parse_args()
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = chatml_tokenizer(args.vocab)
    rows = synthetic_rows(args.rows)
    turns = sum(m["role"] == "assistant" for row in rows for m in row["messages"])

    start = time.perf_counter()
    ours = sftcore_path(rows, tokenizer, max_length=1 << 16)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = reference(rows, tokenizer)
    theirs_s = time.perf_counter() - start

    assert ours.turns["trained"] == turns == sum(len(examples) for examples in theirs), (ours.turns, turns)
    print(f"{args.rows} conversations, {turns} assistant turns")
    print(f"apply_chat_template per turn  {theirs_s:8.2f} s  {args.rows / theirs_s:9.0f} rows/s")
    print(f"sftcore chat (batched)        {ours_s:8.2f} s  {args.rows / ours_s:9.0f} rows/s  {theirs_s / ours_s:5.1f}x")


if __name__ == "__main__":
    main()
