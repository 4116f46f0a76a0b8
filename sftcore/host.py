"""The host: plugins to components. Builds the plugin manager on demand: the built-ins that
registry.yaml (the first-party catalogue) lists first, then entry points, one at a time.

A plugin that fails to import, has a malformed hook, raises (``sys.exit`` included) or
registers something malformed while registering, or takes longer than ``SFT_PLUGIN_TIMEOUT``
seconds (default 60) to do either, is reported in one line and left out; everything else keeps
working. A time limit that lands while the plugin imports another package (torch, say) stops
the command instead: that package is left half-initialised and cannot be imported again in
this process. Whatever a plugin prints meanwhile goes to stderr. ``SFT_STRICT_PLUGINS=1`` turns those
reports into errors, ``SFT_DISABLE_PLUGINS=a,b`` blocks plugins by name, and
``SFT_TRACE_PLUGINS=1`` names each plugin before it loads and prints every hook call and
which plugins answered. Ctrl-C still interrupts.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata, resources
from typing import Any

import pluggy
import yaml

import sftcore
from sftcore import hookspecs
from sftcore.boundary import (
    TIMEOUT_VARIABLE, PluginTimeout, disable_hint, exception_text, fix_or_disable, kind, plugin_code, plugin_label, plugin_timeout,
)
from sftcore.errors import PluginError
from sftcore.registry import STAGES, Component, Registry

ENTRY_POINT_GROUP = "sft"
TIMEOUT_HINT = "SFT_PLUGIN_TIMEOUT=SECONDS (0: no limit)"
# Every environment variable that changes which plugins load and how: a hermetic test clears them all.
PLUGIN_ENV = ("SFT_DISABLE_PLUGINS", "SFT_STRICT_PLUGINS", "SFT_TRACE_PLUGINS", TIMEOUT_VARIABLE)


@dataclass(frozen=True)
class Catalogue:
    """registry.yaml: the built-in plugins (name -> module), the components each provides, the default per stage."""

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


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    builtin: bool
    package: str | None = None  # the top-level package its entry point is in: the plugin's own modules


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
                    f"{fix_or_disable(impl.plugin_name)}"
                ) from exc
            if self.trace:
                print(f"sft trace: {hook} -> {impl.plugin_name}: {result!r}", file=sys.stderr)
            if result is not None:
                results.append((impl.plugin_name, result))
        return results

    def label(self, plugin: str) -> str:
        """``'name' (distribution version)``, as messages name a plugin."""
        info = next((p for p in self.plugins if p.name == plugin), None)
        return plugin_label(plugin, info.distribution, info.version) if info else plugin_label(plugin)


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

    def add(name: str, load: Callable[[], object], info: PluginInfo) -> None:
        if name in blocked:
            host.blocked.append(name)
            return
        label = plugin_label(name, info.distribution, info.version)
        how = disable_hint(name, flag=True)
        if host.trace:  # before the import: a plugin that hangs there is named
            print(f"sft trace: loading plugin {label}", file=sys.stderr)
        before = set(sys.modules)
        try:
            with plugin_code(timeout):
                plugin = load()
                pm.register(plugin, name=name)
        except KeyboardInterrupt:
            raise
        except PluginTimeout as exc:
            stop_if_importing(exc, before, info.package, f"plugin {label} did not finish loading", timeout, how)
            forget_own_modules(before, info.package)
            report(f"plugin {label} did not finish loading in {timeout:g} s; {how}, or allow it longer with {TIMEOUT_HINT}")
            return
        except BaseException as exc:  # any import-time failure of someone else's code, sys.exit() too
            report(f"plugin {label} failed to load: {exception_text(exc)}; {how}")
            return
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            pm.unregister(name=name)
            report(f"plugin {label} has an invalid hook: {exception_text(exc)}; {how}")
            return
        host.plugins.append(info)

    for name, module in load_catalogue().plugins.items():
        add(name, lambda m=module: importlib.import_module(m), PluginInfo(name, "sftcore", own, True, top_level(module)))
    for name, obj in (extra or {}).items():
        add(name, lambda o=obj: o, PluginInfo(name, "(local)", "", False))
    if entry_points:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else "(unknown distribution)"
            version = ep.dist.version if ep.dist else "?"
            add(ep.name, ep.load, PluginInfo(ep.name, dist, version, False, top_level(ep.module)))

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
                report(f"plugin {plugin_label(info.name, info.distribution, info.version)} {problem}")
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

    how = fix_or_disable(info.name)
    before = set(sys.modules)
    try:
        with plugin_code(timeout):
            function(register=register)
    except KeyboardInterrupt:
        raise
    except PluginTimeout as exc:
        label = plugin_label(info.name, info.distribution, info.version)
        stop_if_importing(exc, before, info.package, f"plugin {label} did not finish {hook}", timeout, how)
        forget_own_modules(before, info.package)
        return f"did not finish {hook} in {timeout:g} s; {how}, or allow it longer with {TIMEOUT_HINT}"
    except BaseException as exc:
        if not refused:
            return f"failed in {hook}: {exception_text(exc)}; {how}"
    if refused:
        return f"made a bad call in {hook}: {refused[0]}; {how}"
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


def top_level(module: str) -> str:
    """The top-level package of a dotted module name: what a plugin's own modules start with."""
    return module.partition(".")[0]


def owned(module: str, package: str | None) -> bool:
    return package is not None and (module == package or module.startswith(f"{package}."))


def stop_if_importing(
    exc: PluginTimeout, before: set[str], package: str | None, what: str, timeout: float, how: str
) -> None:
    """Raise `PluginError` when the time ran out while the plugin imported another package.

    That package is left half-initialised: Python drops its unfinished modules but keeps the
    finished ones (compiled extensions among them), so importing it again, as the host does
    next (``import torch``), fails or registers everything twice. Nothing can undo that in
    this process, so the command stops. A module being imported already before the plugin
    started (the host's own) is not the plugin's doing.
    """
    foreign = [m for m in exc.importing if m not in before and not owned(m, package)]
    if foreign:
        raise PluginError(
            f"{what} in {timeout:g} s: it was importing {foreign[0]}, which cannot be imported again in this "
            f"process; {how}, or allow it longer with {TIMEOUT_HINT}"
        ) from None


def forget_own_modules(before: set[str], package: str | None) -> None:
    """Drop the plugin's own modules imported since ``before``, finished or not: it is left out,
    and a later host in this process imports it afresh rather than finding half of it."""
    for module in set(sys.modules) - before:
        if owned(module, package):
            del sys.modules[module]


def metadata_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return sftcore.__version__


def plugin_callbacks(host: Any, config: Mapping[str, Any]) -> list[Any]:
    """Every plugin's ``trainer_callbacks``, checked: an iterable of `TrainerCallback` instances
    or classes (the Trainer instantiates a class itself)."""
    from transformers import TrainerCallback

    callbacks: list[Any] = []
    for plugin, contributed in host.call_each("trainer_callbacks", config=config):
        fix = fix_or_disable(plugin)
        label = f"plugin {host.label(plugin)} returned from trainer_callbacks"
        if isinstance(contributed, (str, bytes, Mapping)) or not hasattr(contributed, "__iter__"):
            raise PluginError(f"{label} {kind(contributed)}, not a list of TrainerCallback; {fix}")
        for callback in list(contributed):
            is_class = isinstance(callback, type) and issubclass(callback, TrainerCallback)
            if not (is_class or isinstance(callback, TrainerCallback)):
                raise PluginError(f"{label} {kind(callback)} in its list, not a TrainerCallback; {fix}")
            callbacks.append(callback)
    return callbacks
