"""The component registry: (stage, name) -> factory, with provenance and helpful lookups."""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sftcore.errors import PluginError, UnknownComponentError, UsageError

# stage -> the registration hook that fills it. The order is the pipeline's order.
STAGES: dict[str, str] = {
    "reader": "register_data_readers",
    "template": "register_templates",
    "masker": "register_maskers",
    "collator": "register_collators",
    "loader": "register_model_loaders",
}


@dataclass(frozen=True)
class Component:
    stage: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    description: str = ""
    override: bool = False
    distribution: str | None = None
    version: str | None = None

    @property
    def provided_by(self) -> str:
        if self.distribution:
            return f"{self.plugin} ({self.distribution} {self.version})"
        return self.plugin


class Registry:
    """Components by stage. Name clashes are errors unless exactly one side asked to override."""

    def __init__(self) -> None:
        self._components: dict[str, dict[str, Component]] = {stage: {} for stage in STAGES}

    def add(self, component: Component) -> None:
        if component.stage not in self._components:
            raise PluginError(f"plugin '{component.plugin}' registered unknown stage '{component.stage}'")
        if not isinstance(component.name, str) or not component.name:
            raise PluginError(f"plugin '{component.plugin}' registered a {component.stage} without a name")
        if not callable(component.factory):
            raise PluginError(
                f"plugin '{component.plugin}' registered {component.stage} '{component.name}' "
                f"with a factory that is not callable: {component.factory!r}"
            )
        stage = self._components[component.stage]
        existing = stage.get(component.name)
        if existing is None or (component.override and not existing.override):
            stage[component.name] = component
            return
        if existing.override and not component.override:
            return
        raise PluginError(
            f"{component.stage} '{component.name}' is registered by both '{existing.plugin}' and "
            f"'{component.plugin}'; disable one of them (SFT_DISABLE_PLUGINS) or register with "
            f"override=True to replace the other on purpose"
        )

    def names(self, stage: str) -> list[str]:
        return sorted(self._components[stage])

    def all(self) -> list[Component]:
        return [c for stage in STAGES for c in sorted(self._components[stage].values(), key=lambda c: c.name)]

    def get(self, stage: str, name: str) -> Component:
        try:
            return self._components[stage][name]
        except KeyError:
            raise UnknownComponentError(unknown_message(stage, name, self.names(stage))) from None

    def build(self, stage: str, name: str, options: Mapping[str, Any] | None = None) -> Any:
        """Build a component, checking ``options`` against its factory first."""
        component = self.get(stage, name)
        problems = option_problems(component, options or {})
        if problems:
            raise UsageError("; ".join(problems))
        return component.factory(**dict(options or {}))


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` to a mistyped ``word``, or "" when none is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_message(stage: str, name: str, available: list[str]) -> str:
    listed = ", ".join(available) if available else "(none)"
    return f"Unknown {stage} '{name}'.{did_you_mean(name, available)} Available: {listed}"


_SIMPLE = (bool, int, float, str)
# Options the host passes from what it loaded, which may be None; why, for a factory that needs a value.
MISSING_HOST_VALUE = {
    "pad_token_id": "the tokenizer has no pad token; use a loader that adds one, give the collator a "
    "pad_token_id option, or use a padding-free collator (packed)",
}


def _accepts(value: Any, hint: Any) -> bool:
    """True when ``value`` fits ``hint`` for the plain types options use; unknown hints accept anything."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_accepts(value, arg) for arg in typing.get_args(hint))
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


def _describe(hint: Any) -> str:
    """A type hint as a user reads it; a Literal lists its values (not just "Literal")."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def option_problems(
    component: Component, options: Mapping[str, Any], host_provided: Iterable[str] = ()
) -> list[str]:
    """Every way ``options`` do not fit the component's factory, as messages (empty when fine).

    ``host_provided`` names options the host passes itself (such as a collator's pad id).
    """
    label = f"{component.stage} '{component.name}'"
    try:
        signature = inspect.signature(component.factory)
    except (TypeError, ValueError):
        return []
    params = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    try:
        hints = typing.get_type_hints(component.factory.__init__ if inspect.isclass(component.factory) else component.factory)
    except Exception:  # unresolvable annotations: skip type checks, keep name checks
        hints = {}
    problems = []
    for key, value in options.items():
        if key not in named:
            if not takes_any:
                accepted = ", ".join(named) or "no options"
                problems.append(f"{label} has no option '{key}' (accepted: {accepted})")
            continue
        hint = hints.get(key, inspect.Parameter.empty)
        if not _accepts(value, hint):
            why = f": {MISSING_HOST_VALUE[key]}" if value is None and key in MISSING_HOST_VALUE else ""
            problems.append(f"{label} option '{key}' must be {_describe(hint)}, got {value!r}{why}")
    for n, p in named.items():
        if p.default is inspect.Parameter.empty and n not in options and n not in set(host_provided):
            problems.append(f"{label} needs option '{n}'")
    return problems
