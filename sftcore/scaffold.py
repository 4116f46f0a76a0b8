"""`sft plugins new NAME`: the skeleton of a plugin distribution, ready to install and test.

``sft-plugin-NAME/`` holds a pyproject with the entry point in group ``sft``, a module
``sft_plugin_NAME`` with one hook implementation registering template ``NAME``, and a test
that uses ``sftcore.testing``; that test passes as soon as the directory is pip-installed.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

from sftcore import __version__
from sftcore.errors import UsageError

NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")

PYPROJECT = Template('''\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "An sftcore plugin: template $name"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["sftcore>=$sftcore"]

[project.entry-points.sft]
$name = "$module"

[tool.setuptools]
py-modules = ["$module"]

[tool.pytest.ini_options]
testpaths = ["tests"]
''')

README = Template('''\
# $dist

An sftcore plugin providing the prompt template `$name`.

```console
$$ pip install -e .
$$ sft plugins                      # lists template $name, provided by $name ($dist 0.1.0)
$$ python -m pytest
$$ sft run --data train.jsonl --template $name
```
''')

MODULE = Template('''\
"""sftcore plugin $name: the prompt template `$name`.

Rows are ``{"instruction": ..., "output": ...}``. Both prompt markers end in a newline, so no
token straddles the seam between prompt and response.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sftcore import hookimpl
from sftcore.errors import FieldError


class $cls:
    """Options (``--template-opt KEY=VALUE``) are this constructor's parameters."""

    def __init__(self, instruction_field: str = "instruction", output_field: str = "output") -> None:
        self.instruction_field = instruction_field
        self.output_field = output_field

    def format_prompt(self, example: Mapping[str, Any]) -> str:
        return f"### Question:\\n{_text(example, self.instruction_field)}\\n\\n### Answer:\\n"

    def format(self, example: Mapping[str, Any]) -> tuple[str, str]:
        return self.format_prompt(example), _text(example, self.output_field)


def _text(example: Mapping[str, Any], field: str) -> str:
    value = example.get(field)
    if value is None:
        raise FieldError(field, "is missing", reason="missing-field")
    if not isinstance(value, str):
        raise FieldError(field, f"must be a string, got {type(value).__name__}", reason="wrong-type")
    if not value.strip():
        raise FieldError(field, "is empty", reason="empty-field")
    return value.strip()


@hookimpl
def register_templates(register):
    register("$name", $cls, description="### Question: / ### Answer: prompt")
''')

TEST = Template('''\
import pytest

import $module
from sftcore.errors import FieldError
from sftcore.host import load_host
from sftcore.testing import check_mask_invariants

ROWS = [
    {"instruction": "Name a primary colour.", "output": "Blue."},
    {"instruction": "What is 2 + 2?", "output": "4"},
    {"instruction": "Say hello in French.", "output": "Bonjour!"},
]


def test_the_installed_distribution_provides_the_template():
    component = load_host().registry.get("template", "$name")
    assert (component.plugin, component.distribution) == ("$name", "$dist")


def test_masks_keep_the_inference_prompt_and_supervise_the_answer(sft_host, tiny_tokenizer):
    host = sft_host($module)
    template = host.registry.build("template", "$name")
    masker = host.registry.build("masker", "response-only")
    check_mask_invariants(template, masker, tiny_tokenizer, ROWS)


def test_a_row_without_an_answer_names_the_field(sft_host):
    template = sft_host($module).registry.build("template", "$name")
    with pytest.raises(FieldError) as info:
        template.format({"instruction": "Hi."})
    assert info.value.field == "output"
''')


def skeleton(name: str) -> dict[str, str]:
    """Relative path -> text of every file of ``sft-plugin-NAME``."""
    if not NAME.fullmatch(name):
        raise UsageError(
            f"plugin name {name!r} must be lowercase letters and digits, words joined by '-', starting with a letter"
        )
    module = "sft_plugin_" + name.replace("-", "_")
    fields = {
        "name": name,
        "dist": f"sft-plugin-{name}",
        "module": module,
        "cls": "".join(part.capitalize() for part in name.split("-")) + "Template",
        "sftcore": ".".join(__version__.split(".")[:2]),
    }
    return {
        "pyproject.toml": PYPROJECT.substitute(fields),
        "README.md": README.substitute(fields),
        f"{module}.py": MODULE.substitute(fields),
        f"tests/test_{module}.py": TEST.substitute(fields),
    }


def write_skeleton(name: str, parent: str | Path = ".") -> Path:
    """Write ``sft-plugin-NAME/`` under ``parent``; refuse to touch a directory that exists."""
    files = skeleton(name)
    target = Path(parent) / f"sft-plugin-{name}"
    if target.exists():
        raise UsageError(f"{target} exists already; remove it or pick another --dir")
    for relative, text in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target
