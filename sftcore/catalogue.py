"""registry.yaml: the first-party catalogue (built-in plugins, their components) and the defaults."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml


@dataclass(frozen=True)
class Catalogue:
    defaults: dict[str, str]
    plugins: dict[str, str]  # plugin name -> module
    components: list[dict[str, str]]


@functools.lru_cache(maxsize=1)
def load_catalogue() -> Catalogue:
    text = resources.files("sftcore").joinpath("registry.yaml").read_text(encoding="utf-8")
    data: dict[str, Any] = yaml.safe_load(text)
    return Catalogue(
        defaults=dict(data["defaults"]),
        plugins={p["name"]: p["module"] for p in data["plugins"]},
        components=list(data["components"]),
    )
