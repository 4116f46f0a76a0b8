"""Adapters `lora` and `qlora` on PEFT: the base stays frozen, low-rank matrices beside it train.

Targets, unless ``target_modules`` names others: every linear layer inside the decoder blocks
(`sftcore.model.adapters.decoder_linear_names`), never lm_head or the embeddings, which hold
most of a small model's parameters and are tied to each other in many. ``qlora`` loads the base
in 4 bits (NF4, double quantisation, bf16 compute) through bitsandbytes, which needs CUDA.

PEFT is an extra (``pip install 'sftcore[lora]'``); building either adapter without it stops the
run in one line, before any model loads.
"""

from __future__ import annotations

from typing import Any, Literal

from sftcore import hookimpl
from sftcore.errors import SftError
from sftcore.model.adapters import PEFT_INSTALL, decoder_linear_names, peft_quietly, require

QLORA_INSTALL = "pip install 'sftcore[qlora]'"


class LoraAdapter:
    name = "lora"
    install = PEFT_INSTALL

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        target_modules: list[str] | str | None = None,
        modules_to_save: list[str] | None = None,
        use_rslora: bool = False,
        use_dora: bool = False,
        bias: Literal["none", "all", "lora_only"] = "none",
    ) -> None:
        if r < 1:
            raise ValueError(f"r must be a positive integer, got {r}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be >= 0 and < 1, got {dropout}")
        if target_modules is not None and (not target_modules or not all(isinstance(t, str) for t in target_modules)):
            raise ValueError("target_modules must name modules: a non-empty list of names, or one regular expression")
        self.check_machine()
        self.r, self.alpha, self.dropout, self.bias = r, alpha, dropout, bias
        self.target_modules, self.modules_to_save = target_modules, modules_to_save
        self.use_rslora, self.use_dora = use_rslora, use_dora

    def check_machine(self) -> None:
        """Stop in one line, before any model loads, where this adapter cannot run."""
        require("peft", f"adapter '{self.name}'", self.install)

    def peft_config(self, model: Any) -> Any:
        import dataclasses

        from peft import LoraConfig

        # A trained copy of a tied embedding stays tied to the head it is tied to, where PEFT can:
        # otherwise the input side learns, the output side keeps the old rows, and the tie is lost.
        tied = bool(self.modules_to_save) and getattr(model.config, "tie_word_embeddings", False)
        tying = {"ensure_weight_tying": True} if tied and "ensure_weight_tying" in {f.name for f in dataclasses.fields(LoraConfig)} else {}
        return LoraConfig(
            **tying,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules or decoder_linear_names(model),
            modules_to_save=self.modules_to_save,
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            bias=self.bias,
            task_type="CAUSAL_LM",
        )

    def apply(self, model: Any, tokenizer: Any) -> Any:
        from peft import get_peft_model

        config = self.peft_config(model)
        try:
            with peft_quietly():
                return get_peft_model(model, config)
        except ValueError as exc:  # a target_modules name the model does not have
            found = decoder_linear_names(model)
            named = ", ".join(found) if isinstance(found, list) else found
            raise SftError(f"adapter '{self.name}': {' '.join(str(exc).split())} The decoder blocks' linear layers: {named}") from None


class QLoraAdapter(LoraAdapter):
    name = "qlora"
    install = QLORA_INSTALL

    def check_machine(self) -> None:
        import torch

        if not torch.cuda.is_available():  # first: installing bitsandbytes would not help
            raise SftError(
                f"adapter '{self.name}' loads the base in 4 bits with bitsandbytes, which needs a CUDA GPU, and "
                "this machine has none; use --adapter lora"
            )
        require("bitsandbytes", f"adapter '{self.name}'", self.install)
        super().check_machine()

    def load_options(self) -> dict[str, Any]:
        """What the loader passes to ``from_pretrained``: the base in 4 bits."""
        import torch
        from transformers import BitsAndBytesConfig

        # bf16 compute where the GPU has it (Ampere on), fp16 on older cards (T4, V100).
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
        )}

    def apply(self, model: Any, tokenizer: Any) -> Any:
        from peft import prepare_model_for_kbit_training

        # Norms in float32, PEFT's recipe for training on a 4-bit base; the input-grad hook that
        # checkpointing needs is the Trainer's to add (gradient_checkpointing_enable does).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return super().apply(model, tokenizer)


@hookimpl
def register_adapters(register):
    register("lora", LoraAdapter, description="LoRA on PEFT: low-rank adapters on every linear layer of the decoder blocks")
    register("qlora", QLoraAdapter, description="LoRA on a base loaded in 4 bits (bitsandbytes, CUDA only)")
