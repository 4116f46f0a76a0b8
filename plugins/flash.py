"""Model loader `flash`: AutoModelForCausalLM + AutoTokenizer from a local checkpoint.

Attention: FlashAttention 4, 3 or 2 when the package is installed and a CUDA GPU of a
generation it supports is present; for padding-free batches (option ``packing``, which the host
sets for a collator with ``padding_free = True``) PyTorch's own varlen kernel next
(``sft_varlen``, see sftcore.model.varlen); else PyTorch's sdpa. One log line says which and why.
Precision: bf16 where the GPU supports it, fp32 otherwise (CPU training in bf16 is slower).
``chunked_loss``: the loss over the lm_head in chunks of ``loss_chunk_tokens`` (sftcore.model.loss),
never the whole (tokens x vocabulary) logits and their float32 copy, often a run's peak memory.
The tokenizer pads on the right, adds no EOS by itself and gets a pad token if it lacks one:
an unused special token it already has (unk, a reserved or pad token), else a new ``<|pad|>``.
Tokens added to the model's own tokenizer (that pad, chat markers) get embedding rows, resized
to a multiple of 64 and initialised to the mean of the old; a tokenizer of another model (its
base vocabulary larger than the embeddings) is refused (sftcore.model.vocab).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from sftcore import hookimpl
from sftcore.model.vocab import embedding_rows, fit_embeddings, refuse_foreign_tokenizer
from sftcore.model.weights import check_json_files, check_weights, loading, loading_model

log = logging.getLogger("sftcore.loader")

Attention = Literal[
    "auto", "flash_attention_4", "flash_attention_3", "flash_attention_2", "sft_varlen", "sdpa", "eager"
]


def pick_attention(requested: str = "auto", packing: bool = False) -> tuple[str, str]:
    """``(attn_implementation, why)`` for this machine; ``packing``: batches are padding-free."""
    if requested != "auto":
        return requested, "asked for with attn_implementation"
    import torch

    if not torch.cuda.is_available():
        return "sdpa", "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return "sdpa", f"GPU compute capability {major}.{minor} is older than FlashAttention's 8.0"
    from transformers.utils import import_utils as iu

    if major >= 9 and iu.is_flash_attn_4_available():
        return "flash_attention_4", f"flash-attn-4 installed, sm_{major}{minor}"
    if major == 9 and iu.is_flash_attn_3_available():
        return "flash_attention_3", f"flash-attn-3 installed, sm_{major}{minor}"
    if iu.is_flash_attn_2_available():
        return "flash_attention_2", f"flash-attn installed, sm_{major}{minor}"
    missing = "no FlashAttention package installed (pip install 'sftcore[flash]')"
    if not packing:
        return "sdpa", missing
    from sftcore.model import varlen

    if varlen.kernel() is None:
        return "sdpa", f"{missing}; padding-free batches, but torch {torch.__version__} has no varlen_attn"
    return varlen.NAME, f"{missing}; padding-free batches: PyTorch's varlen kernel, sm_{major}{minor}"


def pick_dtype(requested: str = "auto") -> Any:
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class FlashLoader:
    def __init__(
        self,
        attn_implementation: Attention = "auto",
        dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto",
        max_length: int | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        packing: bool = False,
        chunked_loss: bool = False,
        loss_chunk_tokens: int = 1024,
    ) -> None:
        if loss_chunk_tokens < 1:
            raise ValueError("loss_chunk_tokens must be a positive integer")
        self.options = {
            "attn_implementation": attn_implementation,
            "dtype": dtype,
            "max_length": max_length,
            "trust_remote_code": trust_remote_code,
            "allow_pickle": allow_pickle,
            "packing": packing,
            "chunked_loss": chunked_loss,
            "loss_chunk_tokens": loss_chunk_tokens,
        }

    def load(self, model_name_or_path: str, **options: Any) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM

        opts = {**self.options, **options}
        check_weights(model_name_or_path, opts["allow_pickle"])
        attention, why = pick_attention(opts["attn_implementation"], opts["packing"])
        dtype = pick_dtype(opts["dtype"])
        log.info("attention: %s (%s); dtype: %s", attention, why, str(dtype).removeprefix("torch."))
        if attention == "sft_varlen":
            from sftcore.model import varlen

            varlen.register()
            if dtype not in varlen.KERNEL_DTYPES:
                log.warning("sft_varlen: its kernel takes fp16/bf16 only; in %s each example goes through sdpa alone (slow)", dtype)
        tokenizer = self.load_tokenizer(model_name_or_path, **options)
        if rows := config_vocab_size(model_name_or_path, opts["trust_remote_code"]):
            refuse_foreign_tokenizer(rows, tokenizer, model_name_or_path)  # before minutes of loading weights
        with loading_model(model_name_or_path):
            model = AutoModelForCausalLM.from_pretrained(
                model_name_or_path,
                dtype=dtype,
                attn_implementation=attention,
                trust_remote_code=opts["trust_remote_code"],
                use_safetensors=None if opts["allow_pickle"] else True,
                quantization_config=opts.get("quantization_config"),  # an adapter's (qlora: 4 bits)
            )
        if tokenizer.pad_token_id is None:
            add_pad_token(tokenizer)
        fit_embeddings(model, tokenizer, model_name_or_path)
        set_pad_token_id(model, tokenizer.pad_token_id)
        if opts["chunked_loss"]:
            from sftcore.model.loss import enable_chunked_loss

            enable_chunked_loss(model, opts["loss_chunk_tokens"])
            log.info("loss: over the lm_head in chunks of %d tokens", opts["loss_chunk_tokens"])
        else:
            from sftcore.model.loss import chunked_loss_advice

            if advice := chunked_loss_advice(model.config, embedding_rows(model)):
                log.info("%s", advice)
        return model, tokenizer

    def load_tokenizer(self, model_name_or_path: str, **options: Any) -> Any:
        """The tokenizer exactly as `load` prepares it, without loading weights (for `sft preview`).

        Right padding, no automatic EOS, ``model_max_length`` from the option or the model's
        config. A missing pad token is only filled in by `load` (it may resize the model).
        """
        from transformers import AutoConfig, AutoTokenizer

        opts = {**self.options, **options}
        if opts["trust_remote_code"]:  # `load` comes through here too: one warning either way
            log.warning("trust_remote_code is on: code shipped in %s will run", model_name_or_path)
        check_json_files(model_name_or_path)
        with loading("tokenizer", model_name_or_path):
            tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=opts["trust_remote_code"])
        tokenizer.padding_side = "right"
        drop_automatic_eos(tokenizer)
        limit = opts["max_length"]
        if limit is None:
            try:
                config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=opts["trust_remote_code"])
                limit = getattr(config, "max_position_embeddings", None)
            except (OSError, ValueError):  # a tokenizer-only directory
                limit = None
        if limit:
            tokenizer.model_max_length = int(limit)
        return tokenizer


def config_vocab_size(model_name_or_path: str, trust_remote_code: bool) -> int | None:
    """The embedding rows the model's config says it has, or None where it does not say."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # loading the model reports it
        return None
    size = getattr(config.get_text_config(), "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def drop_automatic_eos(tokenizer: Any) -> None:
    """Make ``tokenizer(text)`` add only its leading specials (BOS), never a trailing EOS.

    The masker appends EOS as an id; a tokenizer whose post-processor appends one too would
    put EOS at the end of every inference prompt. ``add_eos_token`` does not cover
    tokenizer.json post-processors, so the post-processor is rebuilt from what it adds.
    """
    from sftcore.tokens import special_affixes

    prefix, suffix = special_affixes(tokenizer)
    if not suffix:
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        log.warning("the tokenizer appends %s itself and cannot be changed; prompts from tokenizer(text) end in it", suffix)
        return
    from tokenizers import processors

    names = tokenizer.convert_ids_to_tokens(prefix)
    backend.post_processor = processors.TemplateProcessing(
        single=[*names, "$A"], pair=[*names, "$A", *names, "$B"], special_tokens=list(zip(names, prefix))
    )
    vars(tokenizer).pop("_sftcore_affixes", None)
    log.info("tokenizer: removed the EOS its post-processor appended (sftcore appends EOS as an id)")


def unused_special(tokenizer: Any) -> str | None:
    """An existing special token that is neither BOS nor EOS and can serve as pad, if any."""
    taken = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in taken:
        return tokenizer.unk_token
    for token_id, added in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items()):
        name = str(added.content).lower()
        if added.special and token_id not in taken and ("pad" in name or "reserved" in name):
            return str(added.content)
    return None


def add_pad_token(tokenizer: Any) -> None:
    """An unused special token as pad, else a new ``<|pad|>`` (`fit_embeddings` gives it a row)."""
    existing = unused_special(tokenizer)
    if existing is not None:
        tokenizer.pad_token = existing
        log.info("pad token: using the unused special token %r", existing)
        return
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    log.info("pad token: added '<|pad|>' (id %d)", tokenizer.pad_token_id)


def set_pad_token_id(model: Any, pad_token_id: int) -> None:
    """The pad id in the model's config and generation config.

    Both: the Trainer otherwise aligns the generation config itself, with a warning on every
    run restating the pad token the lines above have logged.
    """
    model.config.pad_token_id = pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = pad_token_id


@hookimpl
def register_model_loaders(register):
    register("flash", FlashLoader, description="HF checkpoint with FlashAttention when available, else sdpa; bf16")
