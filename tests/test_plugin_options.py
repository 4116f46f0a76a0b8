"""`sft plugins` shows each component's options (name, default, type) from its factory's
signature, in the listing and in --json; those the host passes itself are marked."""

from __future__ import annotations

import functools
import json
from typing import Literal

import pytest
from click.testing import CliRunner

from sftcore import hookimpl
from sftcore.cli import cli
from sftcore.host import load_host


class Fancy:
    def __init__(self, width: int, mode: Literal["a", "b"] = "a", pad_token_id: int = 0, **more) -> None:
        pass


class Opaque:
    """A factory whose signature cannot be read (as some C-implemented callables)."""

    __signature__ = property(lambda self: (_ for _ in ()).throw(ValueError("no signature")))

    def __call__(self, **options):
        return self


def unannotated(size=3):
    return size


class Extras:
    @hookimpl
    def register_collators(self, register):
        register("fancy", Fancy, description="test collator")

    @hookimpl
    def register_templates(self, register):
        register("bare", unannotated, description="test template")


@pytest.fixture
def plugins(clean_plugin_env):
    def run(*args: str):
        host = functools.partial(load_host, entry_points=False, extra={"extras": Extras()})
        clean_plugin_env.setattr("sftcore.commands.common.load_host", host)
        result = CliRunner().invoke(cli, ["plugins", *args], prog_name="sft", catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    return run


def section(listing: str, header: str) -> list[str]:
    """The option lines under ``header`` in the human listing."""
    lines = listing.splitlines()
    start = lines.index(header) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return lines[start:end]


def test_the_listing_shows_each_option_with_its_default_and_type(plugins):
    listing = plugins()
    assert "\nOPTIONS (--STAGE-opt KEY=VALUE)\n" in listing
    assert section(listing, "collator fancy:") == [
        "  width         required  int",
        "  mode          = 'a'     one of 'a', 'b'",
        "  pad_token_id  = 0       int  (set by sft unless given)",
        "  (and any other KEY: the factory takes **kwargs)",
    ]
    assert section(listing, "template bare:") == ["  size  = 3  any"]
    assert section(listing, "reader jsonl:") == ["  (no options)"]
    assert "  packing              = False   bool  (set by sft unless given)" in section(listing, "loader flash:")
    # The loader's attn_implementation is the user's to choose; only the collator's is the host's.
    assert [line for line in section(listing, "loader flash:") if "attn_implementation" in line][0].endswith("'eager'")


def test_json_gives_the_same_options(plugins):
    components = {(c["stage"], c["name"]): c for c in json.loads(plugins("--json"))["components"]}
    fancy = components[("collator", "fancy")]
    assert fancy["options"] == [
        {"name": "width", "type": "int", "required": True, "default": None, "set_by_host": False},
        {"name": "mode", "type": "one of 'a', 'b'", "required": False, "default": "a", "set_by_host": False},
        {"name": "pad_token_id", "type": "int", "required": False, "default": 0, "set_by_host": True},
    ]
    assert fancy["other_options"] is True
    pad = {o["name"]: o for o in components[("collator", "pad")]["options"]}
    assert pad["pad_token_id"]["set_by_host"] and not pad["group_by_length"]["set_by_host"]
    assert pad["pad_to_multiple_of"] == {
        "name": "pad_to_multiple_of", "type": "int | None", "required": False, "default": None, "set_by_host": False,
    }
    assert (components[("reader", "json")]["options"], components[("reader", "json")]["other_options"]) == ([], False)


def test_a_factory_without_a_readable_signature_says_so():
    from sftcore.commands.plugins import option_lines, options_of
    from sftcore.registry import Component

    component = Component("collator", "opaque", Opaque(), "extras")
    assert options_of(component) == {"options": None, "other_options": True}
    assert option_lines(component) == ["  (options not known: its factory has no signature to read)"]
