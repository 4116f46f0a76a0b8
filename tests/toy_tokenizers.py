"""Small tokenizers of the three families sftcore must handle, trained in-process (nothing downloaded).

* ``gpt2``: byte-level BPE, no BOS added, EOS ``<|endoftext|>`` (also its BOS/unk name), no pad.
* ``sentencepiece``: Metaspace with a prefix ``▁``, BOS ``<s>`` added, EOS ``</s>``, unk ``<unk>``, no pad.
* ``llama3``: the Llama-3/Qwen split regex + byte-level BPE, BOS ``<|begin_of_text|>`` added,
  EOS ``<|end_of_text|>``, pad == EOS, plus reserved special tokens as Llama-3 ships them.
* ``tiny``: the tokenizer shipped in ``sftcore/assets/tiny-llama``.

Variants: ``sentencepiece(prepend_scheme="always")``, ``sentencepiece(add_eos=True)`` (the
post-processor appends EOS itself) and ``llama3(with_pad=False)`` (no pad, as Llama-3 ships).

The corpus mixes plain sentences with Alpaca-formatted rows, and puts ``:-`` and ``:X`` after
``Response`` so the merges that cause the reference recipe's token-boundary bug exist.
"""

from __future__ import annotations

import functools
import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from sftcore.assets import TINY_LLAMA

VOCAB = 900

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
STANFORD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:"
)

_WORDS = (
    "the a an of to and in is it that for on with as was at by this be from or are have not "
    "list give name write explain describe translate summarize classify find make three five "
    "colors words ideas reasons steps tips cat dog house tree river city water light time year "
    "good new first last long great little own other old right big high different small large "
    "next early young important few public bad same able hot cold up down opposite sentence"
).split()
_OPENERS = ["- ", "-", ": ", ":", "* ", "1. ", "", "", "", "The ", "Sure: "]


def corpus(seed: int = 0, n: int = 400) -> list[str]:
    """Plain sentences, bullet lists and Alpaca rows (both markers, with and without input)."""
    rng = random.Random(seed)

    def sentence(k: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(k))

    texts = []
    for i in range(n):
        instruction = sentence(rng.randint(3, 9)).capitalize() + "."
        output = rng.choice(_OPENERS) + sentence(rng.randint(2, 12))
        if i % 3 == 0:
            prompt = STANFORD_INPUT.format(instruction=instruction, input=sentence(rng.randint(2, 6)))
        else:
            prompt = STANFORD_NO_INPUT.format(instruction=instruction)
        if i % 5 == 0:
            prompt = prompt.replace("### Response:", "### Output:")
        # Stanford's tail (no separator), sftcore's tail (newline) and free text with ':-' merges.
        texts.append(prompt + output)
        texts.append(prompt + "\n" + output)
        texts.append(f"{sentence(rng.randint(4, 14))}:-{sentence(2)} 12{rng.randint(0, 999)}, {sentence(3)}!")
    return texts


def _train(pre_tokenizer, specials: list[str], *, byte_level: bool, unk: str | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


@functools.cache
def gpt2() -> PreTrainedTokenizerFast:
    tok = _train(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"], byte_level=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=1024,
    )


@functools.cache
def _sentencepiece_core(prepend_scheme: str) -> Tokenizer:
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    tok = _train(pre, ["<unk>", "<s>", "</s>"], byte_level=False, unk="<unk>")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    return tok


@functools.cache
def sentencepiece(prepend_scheme: str = "first", add_eos: bool = False) -> PreTrainedTokenizerFast:
    """Llama-2 style. ``add_eos=True`` makes the post-processor append ``</s>`` too (EOS off-by-one bug)."""
    tok = Tokenizer.from_str(_sentencepiece_core(prepend_scheme).to_str())
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    single = "<s> $A </s>" if add_eos else "<s> $A"
    pair = "<s> $A </s> <s> $B </s>" if add_eos else "<s> $A <s> $B"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=2048
    )


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]


@functools.cache
def _llama3_core() -> Tokenizer:
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok = _train(pre, LLAMA3_SPECIALS, byte_level=True)
    tok.decoder = decoders.ByteLevel()
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    return tok


@functools.cache
def llama3(with_pad: bool = True) -> PreTrainedTokenizerFast:
    """Llama-3 style; ``with_pad=True`` sets pad = EOS, as most Llama-3 fine-tuning recipes do."""
    tok = Tokenizer.from_str(_llama3_core().to_str())
    extra = {"pad_token": "<|end_of_text|>"} if with_pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        model_max_length=8192,
        additional_special_tokens=LLAMA3_SPECIALS[2:],
        **extra,
    )


@functools.cache
def tiny() -> PreTrainedTokenizerFast:
    """The tokenizer shipped with the tiny Llama (byte-level BPE, BOS ``<s>``, EOS ``</s>``, pad ``<pad>``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_LLAMA))


BUILDERS = {
    "gpt2": gpt2,
    "sentencepiece": sentencepiece,
    "sentencepiece-always": functools.partial(sentencepiece, prepend_scheme="always"),
    "sentencepiece-adds-eos": functools.partial(sentencepiece, add_eos=True),
    "llama3": llama3,
    "tiny": tiny,
}
"""Every family by name; the property tests run on all of them."""
