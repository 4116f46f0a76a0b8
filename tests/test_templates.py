"""The `alpaca` and `alpaca-output` templates: exact Stanford text, field checks, column names."""

from __future__ import annotations

import pytest

from sftcore.errors import FieldError
from sftcore_plugins.alpaca import AlpacaTemplate, alpaca_output

# Verbatim from tatsu-lab/stanford_alpaca train.py PROMPT_DICT.
STANFORD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def test_stanford_no_input_prompt_plus_newline():
    prompt, response = AlpacaTemplate().format({"instruction": "Name a color.", "input": "", "output": "Red."})
    # The trailing newline keeps the response's first token off the prompt's last one.
    assert prompt == STANFORD_NO_INPUT.format(instruction="Name a color.") + "\n"
    assert response == "Red."


def test_stanford_input_prompt_plus_newline():
    row = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}
    prompt, response = AlpacaTemplate().format(row)
    assert prompt == STANFORD_INPUT.format(instruction="Translate.", input="Bonjour") + "\n"
    assert response == "Hello"


def test_alpaca_output_marker():
    row = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}
    prompt, _ = alpaca_output().format(row)
    assert prompt == STANFORD_INPUT.format(instruction="Translate.", input="Bonjour").replace(
        "### Response:", "### Output:"
    ) + "\n"
    prompt, _ = alpaca_output().format({**row, "input": ""})
    assert prompt.endswith("### Instruction:\nTranslate.\n\n### Output:\n")
    assert "Response" not in prompt


@pytest.mark.parametrize("value", [None, "", "   ", "\n\t"], ids=["none", "empty", "spaces", "whitespace"])
def test_missing_or_blank_input_uses_the_no_input_prompt(value):
    row = {"instruction": "Name a color.", "output": "Red."}
    if value is not None:
        row["input"] = value
    for absent in (row, {k: v for k, v in row.items() if k != "input"}):
        assert AlpacaTemplate().format(absent)[0] == STANFORD_NO_INPUT.format(instruction="Name a color.") + "\n"


def test_text_is_kept_verbatim_except_the_response_strip():
    row = {"instruction": "  Say\n hi ", "input": " ctx ", "output": "\n  - hi there \n"}
    prompt, response = AlpacaTemplate().format(row)
    assert "### Instruction:\n  Say\n hi \n\n### Input:\n ctx \n\n" in prompt
    assert response == "- hi there"


@pytest.mark.parametrize(
    "template", [AlpacaTemplate(), alpaca_output(), AlpacaTemplate(response_marker="Answer")], ids=["alpaca", "output", "answer"]
)
@pytest.mark.parametrize(
    "row",
    [
        {"instruction": "Do it.", "output": "Done."},
        {"instruction": "Do it.", "input": "with care", "output": "Done."},
        {"instruction": "Do it.", "input": "", "output": "Done.", "extra": 3},
    ],
)
def test_format_prompt_equals_the_training_prompt(template, row):
    assert template.format_prompt(row) == template.format(row)[0]
    assert template.format_prompt({k: v for k, v in row.items() if k != "output"}) == template.format(row)[0]


@pytest.mark.parametrize(
    ("row", "field", "reason", "message"),
    [
        ({"output": "x"}, "instruction", "missing-field", "is missing"),
        ({"instruction": None, "output": "x"}, "instruction", "missing-field", "is missing"),
        ({"instruction": "  ", "output": "x"}, "instruction", "empty-field", "is empty"),
        ({"instruction": 3, "output": "x"}, "instruction", "wrong-type", "must be a string, got int"),
        ({"instruction": "a"}, "output", "missing-field", "is missing"),
        ({"instruction": "a", "output": ""}, "output", "empty-field", "is empty"),
        ({"instruction": "a", "output": " \n"}, "output", "empty-field", "is empty"),
        ({"instruction": "a", "output": ["x"]}, "output", "wrong-type", "must be a string, got list"),
        ({"instruction": "a", "input": 7, "output": "x"}, "input", "wrong-type", "must be a string, got int"),
        ({}, "instruction", "missing-field", "is missing"),  # fields in reading order
        ({"input": 7}, "instruction", "missing-field", "is missing"),
        ({"instruction": "a", "input": 7}, "input", "wrong-type", "must be a string, got int"),
    ],
)
def test_field_errors(row, field, reason, message):
    with pytest.raises(FieldError) as info:
        AlpacaTemplate().format(row)
    assert (info.value.field, info.value.reason, info.value.message) == (field, reason, message)
    assert str(info.value) == f"field '{field}': {message}"


def test_format_prompt_needs_no_output_but_checks_instruction():
    assert AlpacaTemplate().format_prompt({"instruction": "Hi"}).endswith("### Instruction:\nHi\n\n### Response:\n")
    with pytest.raises(FieldError, match="field 'instruction': is missing"):
        AlpacaTemplate().format_prompt({"input": "x"})


@pytest.mark.parametrize("factory", [AlpacaTemplate, alpaca_output])
def test_column_name_options(factory):
    template = factory(instruction_field="question", input_field="context", output_field="answer")
    row = {"question": "Q?", "context": "C", "answer": " A ", "instruction": "ignored", "output": "ignored"}
    prompt, response = template.format(row)
    assert "### Instruction:\nQ?\n\n### Input:\nC\n\n" in prompt
    assert "ignored" not in prompt and response == "A"
    with pytest.raises(FieldError) as info:
        template.format({"instruction": "Q?", "answer": "A"})
    assert info.value.field == "question"


def test_templates_build_from_the_registry_with_options(builtin_host):
    template = builtin_host.registry.build("template", "alpaca-output", {"output_field": "completion"})
    assert template.format({"instruction": "I", "completion": "C"}) == [  # segments: prompt, then response
        STANFORD_NO_INPUT.format(instruction="I").replace("Response", "Output") + "\n",
        "C",
    ]
