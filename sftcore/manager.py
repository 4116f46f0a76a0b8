"""Builds the plugin manager on demand: built-ins first, then entry points, one at a time.

A plugin that fails to import, has a malformed hook, raises (``sys.exit`` included) or
registers something malformed while registering, or takes longer than ``SFT_PLUGIN_TIMEOUT``
seconds (default 30) to do either, is reported in one line and left out; everything else keeps
working. Whatever it prints meanwhile goes to stderr. ``SFT_STRICT_PLUGINS=1`` turns those
reports into errors, ``SFT_DISABLE_PLUGINS=a,b`` blocks plugins by name, and
``SFT_TRACE_PLUGINS=1`` names each plugin before it loads and prints every hook call and
which plugins answered. Ctrl-C still interrupts.
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
from sftcore.boundary import PluginTimeout, exception_text, kind, plugin_code, plugin_timeout
from sftcore.catalogue import load_catalogue
from sftcore.errors import PluginError
from sftcore.registry import STAGES, Component, Registry

ENTRY_POINT_GROUP = "sft"
TIMEOUT_HINT = "SFT_PLUGIN_TIMEOUT=SECONDS (0: no limit)"


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
                with plugin_code(0):
                    result = impl.function(**args)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # sys.exit() too: plugin code never ends the host
                raise PluginError(
                    f"plugin {self.label(impl.plugin_name)} failed in {hook}: {exception_text(exc)}; "
                    f"disable it with SFT_DISABLE_PLUGINS={impl.plugin_name}"
                ) from exc
            if self.trace:
                print(f"sft trace: {hook} -> {impl.plugin_name}: {result!r}", file=sys.stderr)
            if result is not None:
                results.append((impl.plugin_name, result))
        return results

    def label(self, plugin: str) -> str:
        """``'name' (distribution version)``, as messages name a plugin."""
        info = next((p for p in self.plugins if p.name == plugin), None)
        return named(plugin, info.distribution, info.version) if info else f"'{plugin}'"


def named(plugin: str, distribution: str, version: str) -> str:
    """``'name' (distribution version)``, as messages name a plugin."""
    return f"'{plugin}' {provenance(distribution, version)}"


def provenance(distribution: str, version: str) -> str:
    """``(distribution version)``; a plugin passed in directly (``(local)``) has no version."""
    return f"({' '.join(part for part in (distribution, version) if part)})"


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
    timeout = plugin_timeout()

    def report(message: str) -> None:
        if strict:
            raise PluginError(message)
        host.problems.append(message)

    def add(name: str, load: Callable[[], object], dist: str, version: str, builtin: bool) -> None:
        if name in blocked:
            host.blocked.append(name)
            return
        how = f"disable it with SFT_DISABLE_PLUGINS={name} or --disable-plugin {name}"
        if host.trace:  # before the import: a plugin that hangs there is named
            print(f"sft trace: loading plugin {name} {provenance(dist, version)}", file=sys.stderr)
        try:
            with plugin_code(timeout):
                plugin = load()
                pm.register(plugin, name=name)
        except KeyboardInterrupt:
            raise
        except PluginTimeout:
            report(
                f"plugin {named(name, dist, version)} did not finish loading in {timeout:g} s; {how}, "
                f"or allow it longer with {TIMEOUT_HINT}"
            )
            return
        except BaseException as exc:  # any import-time failure of someone else's code, sys.exit() too
            report(f"plugin {named(name, dist, version)} failed to load: {exception_text(exc)}; {how}")
            return
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            pm.unregister(name=name)
            report(f"plugin {named(name, dist, version)} has an invalid hook: {one_line(exc)}; {how}")
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

    _collect_components(host, report, timeout)
    return host


def _collect_components(host: Host, report: Callable[[str], None], timeout: float) -> None:
    """Call every registration hook, then add what the plugins registered, in pipeline order.

    A plugin whose hook raises, hangs or makes a malformed ``register`` call is reported and
    left out whole (none of its components, no later hook); a name clash between two valid
    registrations stays an error.
    """
    infos = {p.name: p for p in host.plugins}
    failed: set[str] = set()
    pending: list[Component] = []
    for stage, hook in STAGES.items():
        for impl in getattr(host.pm.hook, hook).get_hookimpls():
            info = infos[impl.plugin_name]
            if info.name in failed:
                continue
            problem = _call_registration(host, info, stage, hook, impl.function, timeout, pending)
            if problem:
                failed.add(info.name)
                report(f"plugin {named(info.name, info.distribution, info.version)} {problem}")
    for name in failed:
        host.pm.unregister(name=name)
    host.plugins[:] = [p for p in host.plugins if p.name not in failed]
    for component in pending:
        if component.plugin not in failed:
            host.registry.add(component)  # a clash raises PluginError: configuration, never skipped


def _call_registration(
    host: Host, info: PluginInfo, stage: str, hook: str, function: Callable[..., Any], timeout: float,
    pending: list[Component],
) -> str | None:
    """Run one registration hook, appending its components to ``pending``; what went wrong, if anything."""
    registered: list[str] = []
    refused: list[str] = []

    def register(name: str, factory: Callable[..., Any], *, description: str = "", override: bool = False) -> None:
        problem = registration_problem(name, factory, description, override)
        if problem:
            refused.append(problem)  # recorded, so a plugin catching the error is left out all the same
            raise PluginError(problem)
        pending.append(
            Component(
                stage=stage, name=name, factory=factory, plugin=info.name, description=description,
                override=override, distribution=info.distribution, version=info.version,
            )
        )
        registered.append(name)

    how = f"disable it with SFT_DISABLE_PLUGINS={info.name}"
    try:
        with plugin_code(timeout):
            function(register=register)
    except KeyboardInterrupt:
        raise
    except PluginTimeout:
        return f"did not finish {hook} in {timeout:g} s; {how}, or allow it longer with {TIMEOUT_HINT}"
    except BaseException as exc:
        if not refused:
            return f"failed in {hook}: {exception_text(exc)}; {how}"
    if refused:
        return f"made a bad call in {hook}: {refused[0]}; fix the plugin or {how}"
    if host.trace:
        print(f"sft trace: {hook} -> {info.name}: {', '.join(registered) or '(none)'}", file=sys.stderr)
    return None


def registration_problem(name: Any, factory: Any, description: Any, override: Any) -> str | None:
    """Why a ``register(...)`` call breaks the `sftcore.hookspecs.Register` contract, or None."""
    if not isinstance(name, str) or not name.strip():
        return f"register() needs a non-empty string name, got {kind(name)}"
    if not callable(factory):
        return f"register({name!r}, ...) got a factory that is not callable: {kind(factory)}"
    if not isinstance(description, str):
        return f"register({name!r}, ...) got a description that is not a string: {kind(description)}"
    if not isinstance(override, bool):
        return f"register({name!r}, ...) got override={kind(override)}; it is True or False"
    return None


def one_line(exc: BaseException) -> str:
    """The exception's message on one line: pluggy's validation errors span several."""
    return " ".join(str(exc).split())


def metadata_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return sftcore.__version__
