"""Component options: a factory's signature read once, options checked against it, and the
options the host provides itself.

Every component is built as ``factory(**options)``. Before anything loads, `option_problems`
checks the user's options against the factory's signature and type hints (unknown names with
the accepted ones, wrong types, missing required values); `sft plugins` shows the same signature.
The host adds the values in `HOST_OPTIONS` to the options of a factory that accepts them.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sftcore.registry import Component

# stage -> option -> what the host passes, when the component's factory takes an option of that
# name (or **kwargs) and the user gave none. Documented in sftcore.hookspecs and docs/plugins.md.
HOST_OPTIONS: dict[str, dict[str, str]] = {
    "template": {
        "tokenizer": "the run's tokenizer, loaded without weights (a chat template renders with it)",
    },
    "collator": {
        "pad_token_id": "the loaded tokenizer's pad token id (None when it has none)",
        "attn_implementation": "the attention implementation the model loaded with (`model.config._attn_implementation`)",
    },
    "loader": {
        "packing": "True when the run's collator is padding-free (it defines `padding_free = True`)",
    },
}
# Options the host passes from what it loaded, which may be None; why, for a factory that needs a value.
MISSING_HOST_VALUE = {
    "pad_token_id": "the tokenizer has no pad token; use a loader that adds one, give the collator a "
    "pad_token_id option, or use a padding-free collator (packed)",
}
_SIMPLE = (bool, int, float, str)


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` to a mistyped ``word``, or "" when none is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_message(stage: str, name: str, available: list[str]) -> str:
    listed = ", ".join(available) if available else "(none)"
    return f"Unknown {stage} '{name}'.{did_you_mean(name, available)} Available: {listed}"


@dataclass(frozen=True)
class Signature:
    """What a factory takes: its named parameters, whether it takes ``**kwargs``, their type hints."""

    named: dict[str, inspect.Parameter]
    takes_any: bool
    hints: dict[str, Any]


def signature(factory: Callable[..., Any]) -> Signature | None:
    """The factory's `Signature`, or None when Python cannot read one (some builtins)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    try:
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except Exception:  # unresolvable annotations: skip type checks, keep name checks
        hints = {}
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return Signature(named, any(p.kind is p.VAR_KEYWORD for p in params.values()), hints)


def with_host_options(stage: str, factory: Callable[..., Any], options: Mapping[str, Any], **provided: Any) -> dict[str, Any]:
    """``options`` plus the host-provided values (keys of ``HOST_OPTIONS[stage]``) the factory accepts
    and the user did not set."""
    unknown = set(provided) - set(HOST_OPTIONS.get(stage, {}))
    assert not unknown, f"not a host option of {stage}: {sorted(unknown)}"  # HOST_OPTIONS is the one list
    sig = signature(factory)
    merged = dict(options)
    for key, value in provided.items():
        if key not in merged and sig is not None and (key in sig.named or sig.takes_any):
            merged[key] = value
    return merged


def accepts(value: Any, hint: Any) -> bool:
    """True when ``value`` fits ``hint`` for the plain types options use; unknown hints accept anything."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(accepts(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in _SIMPLE:
        return isinstance(value, hint)
    if origin in (list, tuple, dict) or hint in (list, tuple, dict):
        return isinstance(value, (origin or hint) if (origin or hint) is not tuple else (list, tuple))
    return True


def union_members(hint: Any) -> tuple[Any, ...]:
    """A type hint's alternatives (``str | None``: str, NoneType); a hint that is no union is its own."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def describe(hint: Any) -> str:
    """A type hint as a user reads it; a Literal lists its values (not just "Literal")."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def option_problems(component: Component, options: Mapping[str, Any], *, host_provided: bool = False) -> list[str]:
    """Every way ``options`` do not fit the component's factory, as messages (empty when fine).

    ``host_provided``: the host will add its `HOST_OPTIONS` for the stage, so a required one is not missing.
    """
    label = f"{component.stage} '{component.name}'"
    sig = signature(component.factory)
    if sig is None:
        return []
    problems = []
    for key, value in options.items():
        if key not in sig.named:
            if not sig.takes_any:
                accepted = ", ".join(sig.named) or "no options"
                problems.append(f"{label} has no option '{key}'.{did_you_mean(key, sig.named)} Accepted: {accepted}")
            continue
        hint = sig.hints.get(key, inspect.Parameter.empty)
        if not accepts(value, hint):
            why = f": {MISSING_HOST_VALUE[key]}" if value is None and key in MISSING_HOST_VALUE else ""
            problems.append(f"{label} option '{key}' must be {describe(hint)}, got {value!r}{why}")
    provided = HOST_OPTIONS.get(component.stage, {}) if host_provided else {}
    for n, p in sig.named.items():
        if p.default is inspect.Parameter.empty and n not in options and n not in provided:
            problems.append(f"{label} needs option '{n}'")
    return problems
