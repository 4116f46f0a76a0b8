"""Adapter `none`: full fine-tuning, every parameter of the loaded model trains (the default)."""

from __future__ import annotations

from typing import Any

from sftcore import hookimpl


class FullFineTuning:
    def apply(self, model: Any, tokenizer: Any) -> Any:
        return model


@hookimpl
def register_adapters(register):
    register("none", FullFineTuning, description="no adapter: full fine-tuning, every parameter trains")
