"""registry.yaml and the built-in plugins stay in step: every entry resolves, every built-in is listed."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from sftcore.host import load_catalogue
from sftcore.registry import STAGES

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = load_catalogue()


def test_packaged_catalogue_is_the_repository_file():
    assert yaml.safe_load((ROOT / "registry.yaml").read_text(encoding="utf-8")) == {
        "defaults": CATALOGUE.defaults,
        "plugins": [{"name": n, "module": m} for n, m in CATALOGUE.plugins.items()],
        "components": CATALOGUE.components,
    }


@pytest.mark.parametrize("name", list(CATALOGUE.plugins))
def test_every_plugin_module_imports(name):
    module = importlib.import_module(CATALOGUE.plugins[name])
    assert any(hasattr(module, hook) for hook in STAGES.values()), f"{module.__name__} implements no registration hook"


@pytest.mark.parametrize("entry", CATALOGUE.components, ids=lambda e: f"{e['stage']}:{e['name']}")
def test_every_listed_component_resolves(builtin_host, entry):
    assert entry["stage"] in STAGES
    assert entry["plugin"] in CATALOGUE.plugins
    component = builtin_host.registry.get(entry["stage"], entry["name"])
    assert component.plugin == entry["plugin"]
    assert isinstance(component.description, str) and component.description.strip()
    assert component.distribution == "sftcore"


def test_every_builtin_component_is_listed(builtin_host):
    listed = {(e["stage"], e["name"]) for e in CATALOGUE.components}
    registered = {(c.stage, c.name) for c in builtin_host.registry.all()}
    assert registered == listed
    assert len(listed) == len(CATALOGUE.components), "registry.yaml lists a component twice"


def test_every_default_resolves(builtin_host):
    assert set(CATALOGUE.defaults) == {"template", "masker", "collator", "loader", "adapter"}
    for stage, name in CATALOGUE.defaults.items():
        component = builtin_host.registry.get(stage, name)
        built = builtin_host.registry.build(stage, name)
        assert built is not None, component


def test_default_components_satisfy_their_protocols(builtin_host):
    from sftcore import protocols

    expected = {
        "template": protocols.Template,
        "masker": protocols.Masker,
        "collator": protocols.Collator,
        "loader": protocols.ModelLoader,
        "adapter": protocols.Adapter,
    }
    for stage, name in CATALOGUE.defaults.items():
        assert isinstance(builtin_host.registry.build(stage, name), expected[stage]), (stage, name)
    for name in builtin_host.registry.names("reader"):
        reader = builtin_host.registry.build("reader", name)
        assert isinstance(reader, protocols.DataReader) and reader.suffixes
