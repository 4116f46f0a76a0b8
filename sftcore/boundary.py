"""The host's side of every call into plugin code.

Loading a plugin runs its module under a time limit with ``sys.stdout`` pointed at stderr, so
a plugin that hangs is named instead of hanging every command, and one that prints cannot
corrupt ``sft plugins --json`` or ``sft preview --json``. A built component is wrapped in a
`Checked` proxy that checks what each call returns against the protocol in
`sftcore.protocols`, and refuses anything else in one line naming the component, its plugin
and distribution; without it, a collator returning a list or a loader returning one object
surfaced as a traceback deep inside transformers, and float ids were silently truncated.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import reprlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from sftcore import IGNORE_INDEX
from sftcore.data.segments import template_answer
from sftcore.errors import DataError, FieldError, PluginError, RowDropped, SftError, UsageError

log = logging.getLogger("sftcore.plugins")

TIMEOUT_VARIABLE = "SFT_PLUGIN_TIMEOUT"
# The limit names a plugin that hangs; it must not cut a slow import short, since a library
# interrupted mid-import cannot be imported again in the process (the run then stops). A cold
# `import torch, transformers` takes ~10 s on a local disk and 30 s or more on NFS or Lustre.
DEFAULT_TIMEOUT = 60.0

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 40
_short.maxlevel = 1  # a batch returned in a list reads [{...}], not a page of tensors


class PluginTimeout(BaseException):
    """Raised into a plugin's code when its time is up.

    A `BaseException`, so that the plugin's own ``except Exception`` cannot swallow it.
    ``importing``: the modules whose import was under way at that moment, outermost first.
    """

    def __init__(self, seconds: float, importing: tuple[str, ...] = ()) -> None:
        super().__init__(seconds)
        self.importing = importing


def importing_now() -> tuple[str, ...]:
    """Modules being imported right now, outermost first.

    Python marks a module's spec ``_initializing`` until its code has run, and keeps sys.modules
    in insertion order; a finished import moves its module to the end, so those still under
    way keep the order they started in.
    """
    return tuple(
        name for name, module in list(sys.modules.items())
        if getattr(getattr(module, "__spec__", None), "_initializing", False)
    )


def plugin_timeout() -> float:
    """Seconds each plugin may take to load and to register (``SFT_PLUGIN_TIMEOUT``; 0: no limit)."""
    raw = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{TIMEOUT_VARIABLE} must be a number of seconds (0 for no limit), got {raw!r}")
    return value


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `PluginTimeout` inside the block once ``seconds`` have passed (0: no limit).

    Signals reach only the main thread of the main interpreter, so elsewhere the block runs
    without a limit; so it does while another timer is armed (pytest-timeout's, say), which
    one process-wide ``ITIMER_REAL`` cannot share.
    """
    usable = (
        seconds > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    )
    if not usable:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise PluginTimeout(seconds, importing_now())

    try:
        previous = signal.signal(signal.SIGALRM, expire)
    except ValueError:  # a subinterpreter's main thread
        yield
        return
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    finally:
        # Nested: an alarm landing while the timer is cancelled must not skip the restore.
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def plugin_code(seconds: float) -> Iterator[None]:
    """Around a plugin's import and registration hooks: a time limit, and stdout sent to stderr."""
    with time_limit(seconds), contextlib.redirect_stdout(sys.stderr):
        yield


def exception_text(exc: BaseException) -> str:
    """An exception from plugin code on one line; an exit reads as the call it was."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def kind(value: Any) -> str:
    """A returned value as an error message shows it: its type and a short repr."""
    return f"{type(value).__name__} {' '.join(_short.repr(value).split())}"


# ---- components -----------------------------------------------------------------------------


def plugin_label(plugin: str, distribution: str | None = None, version: str | None = None) -> str:
    """``'pad' (sftcore 0.2.0)``: how every message names a plugin."""
    where = " ".join(part for part in (distribution, version) if part)
    return f"'{plugin}' ({where})" if where else f"'{plugin}'"


def fix_or_disable(plugin: str) -> str:
    """What a message about a plugin's failure tells the user to do."""
    return f"fix the plugin or {disable_hint(plugin)}"


def disable_hint(plugin: str, *, flag: bool = False) -> str:
    """How to leave a plugin out: ``disable it with SFT_DISABLE_PLUGINS=NAME`` (and the CLI flag)."""
    return f"disable it with SFT_DISABLE_PLUGINS={plugin}" + (f" or --disable-plugin {plugin}" if flag else "")


def component_origin(component: Any) -> str:
    """``collator 'pad' of plugin 'pad' (sftcore 0.2.0)``: how messages name a registered component."""
    return f"{component.stage} '{component.name}' of plugin {plugin_label(component.plugin, component.distribution, component.version)}"


class Checked:
    """A built component behind the host's boundary; what it does not check passes through.

    ``isinstance`` sees the component's own class (``__class__``), so code that asks what it
    was given keeps working. Holds only the component and a label, so it pickles to a
    spawned masking worker.
    """

    entry = ""  # the method the protocol requires
    # What a component may raise, by its contract; anything else is its failure, named in one line.
    contract_errors: tuple[type[BaseException], ...] = (SftError, RowDropped, FieldError)

    def __init__(self, inner: Any, origin: str, plugin: str) -> None:
        vars(self).update(inner=inner, origin=origin, plugin=plugin)
        if not callable(getattr(inner, self.entry, None) if self.entry else inner):
            what = f"has no {self.entry}() method" if self.entry else "is not callable"
            raise self.wrong(f"its factory returned {kind(inner)}, which {what}")

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return type(vars(self)["inner"])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "inner" not in vars(self):
            raise AttributeError(name)
        return getattr(vars(self)["inner"], name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.inner, self.origin, self.plugin))

    def wrong(self, problem: str) -> PluginError:
        return PluginError(f"{self.origin}: {problem}; {advice(self)}")

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args)`` with stdout sent to stderr: machine-readable output stays clean."""
        saved = sys.stdout
        sys.stdout = sys.stderr  # assigned, not redirect_stdout: templates run once per row
        try:
            return function(*args, **kwargs)
        except SystemExit as exc:
            raise self.wrong(exception_text(exc)) from None
        except self.contract_errors:
            raise
        except Exception as exc:
            log.debug("%s raised", self.origin, exc_info=True)  # `sft -v` shows where
            raise self.wrong(f"raised {exception_text(exc)} (sft -v shows where)") from exc
        finally:
            sys.stdout = saved


def _rebuild(cls: type, inner: Any, origin: str, plugin: str) -> Checked:
    return cls(inner, origin, plugin)


class CheckedTemplate(Checked):
    entry = "format"
    # A template's KeyError, TypeError or ValueError is a row it cannot format: a bad row (pipeline.format_rows).
    contract_errors = (*Checked.contract_errors, KeyError, TypeError, ValueError)

    def format(self, example: Mapping[str, Any]) -> Any:
        return template_answer(self.call(self.inner.format, example), self.wrong, kind)

    def format_prompt(self, example: Mapping[str, Any]) -> str:
        method = getattr(self.inner, "format_prompt", None)
        if not callable(method):
            raise self.wrong("it has no format_prompt() method, which sft generate needs")
        prompt = self.call(method, example)
        if not isinstance(prompt, str):
            raise self.wrong(f"format_prompt() returned {kind(prompt)}, not a string")
        return prompt


class CheckedMasker(Checked):
    """Output is checked by the host, per row (`sftcore.data.pipeline.check_masked`): it knows the row."""

    def __call__(self, prompt: str, response: str, tokenizer: Any, max_length: int) -> Any:
        return self.call(self.inner, prompt, response, tokenizer, max_length)

    def __getattr__(self, name: str) -> Any:
        value = super().__getattr__(name)
        if name in ("batch", "segments") and callable(value):
            return lambda *args: self.call(value, *args)
        return value


class CheckedCollator(Checked):
    def __call__(self, features: list[Any]) -> Any:
        return check_batch(self, self.call(self.inner, features))


def check_batch(collator: Checked, batch: Any) -> Any:
    """A collator's batch: a mapping whose ``input_ids`` and ``labels`` are 2-D integer tensors
    of one shape, ids non-negative, labels a token id or -100. Checked on every batch: a few
    attribute reads and two vectorised comparisons, microseconds against a training step."""
    import torch

    if not isinstance(batch, Mapping):
        raise collator.wrong(f"returned {kind(batch)}, not a mapping of tensors")
    shapes = []
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise collator.wrong(f"returned a batch without {key} (keys: {', '.join(map(str, batch)) or 'none'})")
        value = batch[key]
        if not isinstance(value, torch.Tensor):
            raise collator.wrong(f"returned {key} as {kind(value)}, not a torch tensor")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise collator.wrong(f"returned {key} of dtype {value.dtype}; token ids and labels are integers")
        if value.dim() != 2:
            raise collator.wrong(f"returned {key} of shape {tuple(value.shape)}; a batch is 2-D (rows, positions)")
        shapes.append(tuple(value.shape))
    if shapes[0] != shapes[1]:
        raise collator.wrong(f"returned input_ids of shape {shapes[0]} but labels of shape {shapes[1]}")
    ids, labels = batch["input_ids"], batch["labels"]
    if bool((ids < 0).any()):
        raise collator.wrong(f"returned input_ids holding {int(ids.min())}; ids are >= 0")
    # The loss ignores -100 only; any other negative label fails deep in cross_entropy (on CUDA, an assert).
    wrong = (labels < 0) & (labels != IGNORE_INDEX)
    if bool(wrong.any()):
        raise collator.wrong(f"returned labels holding {int(labels[wrong][0])}; labels are >= 0 or {IGNORE_INDEX}")
    return batch


class CheckedLoader(Checked):
    entry = "load"

    def load(self, model_name_or_path: str, **options: Any) -> tuple[Any, Any]:
        import torch

        result = self.call(self.inner.load, model_name_or_path, **options)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise self.wrong(f"load() returned {kind(result)}, not a (model, tokenizer) pair")
        model, tokenizer = result
        if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
            raise self.wrong(f"load() returned a model of {kind(model)}, not a torch.nn.Module with a config")
        check_tokenizer(self, tokenizer, "load()")
        return model, tokenizer

    def __getattr__(self, name: str) -> Any:
        value = super().__getattr__(name)
        if name == "load_tokenizer" and callable(value):
            return lambda *args, **kwargs: check_tokenizer(self, self.call(value, *args, **kwargs), "load_tokenizer()")
        return value


def check_tokenizer(loader: Checked, tokenizer: Any, call: str) -> Any:
    """A tokenizer as the host uses it: ``decode()``, a numeric ``model_max_length`` and a pad id
    that is an int or None. None is allowed: a padding-free collator (packed) needs no pad token,
    and a collator that does says so when it is built (`sftcore.options.option_problems`)."""
    length = getattr(tokenizer, "model_max_length", None)
    if not callable(getattr(tokenizer, "decode", None)) or isinstance(length, bool) or not isinstance(length, (int, float)):
        raise loader.wrong(f"{call} returned {kind(tokenizer)}, not a tokenizer with decode() and model_max_length")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int)):
        raise loader.wrong(f"{call} returned a tokenizer whose pad_token_id is {kind(pad)}, not an int or None")
    return tokenizer


class CheckedReader(Checked):
    entry = "read"
    contract_errors = (Exception,)  # read() itself names a reader's failure, with the file (and ends on StopIteration)

    def read(self, path: str) -> Iterator[tuple[int, Any]]:
        rows = self.call(self.inner.read, path)
        try:
            rows = iter(rows)
        except TypeError:
            raise self.wrong(f"read() returned {kind(rows)}, not an iterator of (row_number, row)") from None
        while True:
            try:
                item = self.call(next, rows)
            except StopIteration:
                return
            except SftError:
                raise
            except Exception as exc:  # the contract: nothing but DataError escapes a reader
                raise self.wrong(f"failed reading {path}: {exception_text(exc)}") from None
            yield self.checked_row(item)

    def checked_row(self, item: Any) -> tuple[int, Any]:
        if not isinstance(item, tuple) or len(item) != 2:
            raise self.wrong(f"read() yielded {kind(item)}, not a (row_number, row) pair")
        number, row = item
        if isinstance(number, bool) or not isinstance(number, int):
            raise self.wrong(f"read() yielded a row number of {kind(number)}, not an int")
        if not isinstance(row, (Mapping, DataError)):
            raise self.wrong(f"read() yielded row {number} as {kind(row)}, not a mapping of fields")
        return number, row


class CheckedAdapter(Checked):
    entry = "apply"

    def apply(self, model: Any, tokenizer: Any) -> Any:
        trained = self.call(self.inner.apply, model, tokenizer)
        if not hasattr(trained, "config") or not any(p.requires_grad for p in getattr(trained, "parameters", list)()):
            raise self.wrong(f"apply() returned a {type(trained).__name__} without a config or without a parameter to train")
        return trained


WRAPPERS: dict[str, type[Checked]] = {
    "template": CheckedTemplate,
    "masker": CheckedMasker,
    "collator": CheckedCollator,
    "loader": CheckedLoader,
    "reader": CheckedReader,
    "adapter": CheckedAdapter,
}


@contextlib.contextmanager
def building(component: Any) -> Iterator[None]:
    """Around a component's factory call: plugin code too, so stdout goes to stderr and an exit
    is the plugin's error."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except SystemExit as exc:
        raise PluginError(
            f"{component_origin(component)}: its factory called sys.exit({exc.code!r}); {fix_or_disable(component.plugin)}"
        ) from None


def checked(component: Any, built: Any) -> Any:
    """``built`` (what ``component.factory`` returned) behind the boundary of its stage."""
    return WRAPPERS[component.stage](built, component_origin(component), component.plugin)


def origin_of(component: Any, stage: str) -> str:
    """How messages name a component: its origin when checked, else its class."""
    if isinstance(component, Checked):
        return vars(component)["origin"]
    return f"{stage} {type(component).__name__}"


def advice(component: Any) -> str:
    """What to do about a component's bad output."""
    if isinstance(component, Checked):
        return fix_or_disable(vars(component)["plugin"])
    return "fix the component"
