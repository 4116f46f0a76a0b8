"""The component registry: (stage, name) -> factory, with provenance and helpful lookups."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sftcore.errors import PluginError, UnknownComponentError, UsageError
from sftcore.options import option_problems, unknown_message

# stage -> the registration hook that fills it. The order is the pipeline's order.
STAGES: dict[str, str] = {
    "reader": "register_data_readers",
    "template": "register_templates",
    "masker": "register_maskers",
    "collator": "register_collators",
    "loader": "register_model_loaders",
    "adapter": "register_adapters",
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
