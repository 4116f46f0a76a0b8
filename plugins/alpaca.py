"""Alpaca prompt templates: `alpaca` (Stanford text) and `alpaca-output` (`### Output:` marker).

Both prompts end in a newline after the response marker, so no token can straddle the
prompt/response seam (a bare `Response:` merges with a leading `-` in byte-level BPE).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sftcore import hookimpl
from sftcore.errors import FieldError
from sftcore.protocols import Segment

HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
HEAD_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"


class AlpacaTemplate:
    def __init__(
        self,
        instruction_field: str = "instruction",
        input_field: str = "input",
        output_field: str = "output",
        response_marker: str = "Response",
    ) -> None:
        self.fields = (instruction_field, input_field, output_field)
        self.marker = response_marker

    def format_prompt(self, example: Mapping[str, Any]) -> str:
        """The inference prompt; the input variant only when ``input`` is a non-blank string."""
        instruction_field, input_field, _ = self.fields
        instruction = _text(example, instruction_field, required=True)
        context = _text(example, input_field, required=False)
        if context.strip():
            return f"{HEAD_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### {self.marker}:\n"
        return f"{HEAD_NO_INPUT}### Instruction:\n{instruction}\n\n### {self.marker}:\n"

    def format(self, example: Mapping[str, Any]) -> list[Segment]:
        """Two segments: the prompt, then the response, trained and followed by EOS."""
        prompt = self.format_prompt(example)  # the fields in reading order: a row missing all names instruction
        return [Segment(prompt), Segment(_text(example, self.fields[2], required=True).strip(), trained=True, eos=True)]


def _text(example: Mapping[str, Any], field: str, *, required: bool) -> str:
    if field not in example or example[field] is None:
        if required:
            raise FieldError(field, "is missing", reason="missing-field")
        return ""
    value = example[field]
    if not isinstance(value, str):
        raise FieldError(field, f"must be a string, got {type(value).__name__}", reason="wrong-type")
    if required and not value.strip():
        raise FieldError(field, "is empty", reason="empty-field")
    return value


def alpaca_output(
    instruction_field: str = "instruction", input_field: str = "input", output_field: str = "output"
) -> AlpacaTemplate:
    return AlpacaTemplate(instruction_field, input_field, output_field, response_marker="Output")


@hookimpl
def register_templates(register):
    register("alpaca", AlpacaTemplate, description="Stanford Alpaca prompt, with and without input")
    register("alpaca-output", alpaca_output, description="Alpaca prompt with the '### Output:' marker")
