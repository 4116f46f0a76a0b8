"""Train the tiny byte-level BPE tokenizer shipped in sftcore/assets/tiny-llama (vocab 512).

Trained on the demo set formatted with the Alpaca templates, so the prompt scaffolding gets
merges of its own. Llama convention: BOS ``<s>`` added in front, EOS ``</s>`` appended by the
masker only, pad ``<pad>``.
Usage: python scripts/train_tokenizer.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from sftcore_plugins.alpaca import AlpacaTemplate

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512
SPECIALS = ["<s>", "</s>", "<pad>"]


def corpus() -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "sftcore/assets/demo.jsonl").read_text().splitlines()]
    out = []
    for marker in ("Response", "Output"):
        template = AlpacaTemplate(response_marker=marker)
        out += ["".join(template.format(row)) for row in rows]
    return out


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=512
    )
    out = ROOT / "sftcore/assets/tiny-llama"
    fast.save_pretrained(out)
    # Name the class every transformers 5.x resolves, not the backend alias newer releases write.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    print(f"vocab {tok.get_vocab_size()} -> {out}")


if __name__ == "__main__":
    main()
