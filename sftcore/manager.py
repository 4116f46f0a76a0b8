"""Builds the plugin manager on demand: built-ins first, then entry points, one at a time.

A plugin that fails to import, has a malformed hook, or raises while registering is reported
in one line and left out; everything else keeps working. ``SFT_STRICT_PLUGINS=1`` turns those
reports into errors, ``SFT_DISABLE_PLUGINS=a,b`` blocks plugins by name, and
``SFT_TRACE_PLUGINS=1`` prints every hook call and which plugins answered.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

import sftcore
from sftcore import hookspecs
from sftcore.catalogue import load_catalogue
from sftcore.errors import PluginError
from sftcore.registry import STAGES, Component, Registry

ENTRY_POINT_GROUP = "sft"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    builtin: bool


@dataclass
class Host:
    """What the CLI and the runner use: the loaded plugins, their components and any problems."""

    pm: pluggy.PluginManager
    registry: Registry
    plugins: list[PluginInfo] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    trace: bool = False

    def call_each(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call ``hook`` on every plugin separately; return ``(plugin, result)`` for those that answered.

        A plugin raising here is reported as a `PluginError` naming it: a run must not go on
        without a component the user asked for, but it must say whose code failed.
        """
        results = []
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            args = {k: kwargs[k] for k in impl.argnames}
            try:
                result = impl.function(**args)
            except Exception as exc:
                raise PluginError(
                    f"plugin '{impl.plugin_name}' failed in {hook}: {type(exc).__name__}: {exc}; "
                    f"disable it with SFT_DISABLE_PLUGINS={impl.plugin_name}"
                ) from exc
            if self.trace:
                print(f"sft trace: {hook} -> {impl.plugin_name}: {result!r}", file=sys.stderr)
            if result is not None:
                results.append((impl.plugin_name, result))
        return results


def env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def load_host(
    *,
    disable: Iterable[str] = (),
    strict: bool | None = None,
    entry_points: bool = True,
    extra: Mapping[str, object] | None = None,
) -> Host:
    """Build a fresh host.

    :param disable: plugin names to block, on top of ``SFT_DISABLE_PLUGINS``.
    :param strict: make any plugin problem fatal (default: ``SFT_STRICT_PLUGINS``).
    :param entry_points: load third-party plugins from the ``sft`` entry-point group.
    :param extra: more plugins ``{name: module_or_object}``, registered after the built-ins
        (tests and embedding applications use this).
    """
    strict = env_flag("SFT_STRICT_PLUGINS") if strict is None else strict
    blocked = set(env_list("SFT_DISABLE_PLUGINS")) | set(disable)
    pm = pluggy.PluginManager(sftcore.PROJECT)
    pm.add_hookspecs(hookspecs)
    host = Host(pm=pm, registry=Registry(), trace=env_flag("SFT_TRACE_PLUGINS"))
    own = metadata_version("sftcore")

    def report(message: str) -> None:
        if strict:
            raise PluginError(message)
        host.problems.append(message)

    def add(name: str, load: Callable[[], object], dist: str, version: str, builtin: bool) -> None:
        if name in blocked:
            host.blocked.append(name)
            return
        how = f"disable it with SFT_DISABLE_PLUGINS={name} or --disable-plugin {name}"
        try:
            plugin = load()
            pm.register(plugin, name=name)
        except Exception as exc:  # any import-time failure of someone else's code
            report(f"plugin '{name}' ({dist} {version}) failed to load: {type(exc).__name__}: {one_line(exc)}; {how}")
            return
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            pm.unregister(name=name)
            report(f"plugin '{name}' ({dist} {version}) has an invalid hook: {one_line(exc)}; {how}")
            return
        host.plugins.append(PluginInfo(name, dist, version, builtin))

    for name, module in load_catalogue().plugins.items():
        add(name, lambda m=module: importlib.import_module(m), "sftcore", own, True)
    for name, obj in (extra or {}).items():
        add(name, lambda o=obj: o, "(local)", "", False)
    if entry_points:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else "(unknown distribution)"
            version = ep.dist.version if ep.dist else "?"
            add(ep.name, ep.load, dist, version, False)

    _collect_components(host, report)
    return host


def _collect_components(host: Host, report: Callable[[str], None]) -> None:
    infos = {p.name: p for p in host.plugins}
    for stage, hook in STAGES.items():
        for impl in getattr(host.pm.hook, hook).get_hookimpls():
            info = infos[impl.plugin_name]
            registered: list[str] = []

            def register(
                name: str, factory: Callable[..., Any], *, description: str = "", override: bool = False
            ) -> None:
                host.registry.add(
                    Component(
                        stage=stage,
                        name=name,
                        factory=factory,
                        plugin=info.name,
                        description=description,
                        override=override,
                        distribution=info.distribution,
                        version=info.version,
                    )
                )
                registered.append(name)

            try:
                impl.function(register=register)
            except PluginError:
                raise  # name clashes are configuration errors, never skipped
            except Exception as exc:
                report(
                    f"plugin '{info.name}' ({info.distribution} {info.version}) failed in {hook}: "
                    f"{type(exc).__name__}: {one_line(exc)}; disable it with SFT_DISABLE_PLUGINS={info.name}"
                )
            if host.trace:
                print(f"sft trace: {hook} -> {info.name}: {', '.join(registered) or '(none)'}", file=sys.stderr)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line: pluggy's validation errors span several."""
    return " ".join(str(exc).split())


def metadata_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return sftcore.__version__
