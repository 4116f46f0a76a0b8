"""Data flow of one run: file -> rows -> (prompt, response) -> masked rows, with counts.

Nothing here knows a component by name: the template, masker and reader come in built.
"""

from __future__ import annotations

import gc
import hashlib
import numbers
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from sftcore import IGNORE_INDEX
from sftcore.boundary import advice, building, checked, component_origin, exception_text, fix_or_disable, kind, origin_of
from sftcore.data.segments import Outcome, as_segments, join, pair_of, turns_of
from sftcore.errors import DataError, FieldError, PluginError, RowDropped, SftError, UsageError
from sftcore.options import option_problems
from sftcore.registry import Registry

OnBadRow = Literal["error", "skip"]
OnDuplicate = Literal["keep", "skip", "error"]
# What a config, a flag or the cache key may say about bad and repeated rows; the first word is the default.
ROW_POLICIES: dict[str, tuple[str, ...]] = {"on_bad_row": get_args(OnBadRow), "on_duplicate": get_args(OnDuplicate)}
MASK_BATCH = 1024


@dataclass
class Formatted:
    row: int
    prompt: str
    response: str
    segments: tuple | None = None  # a conversation's `sftcore.protocols.Segment`s (a pair is its prompt and response)


@dataclass
class Prepared:
    """Masked rows ready for a collator, plus what happened to every input row."""

    rows: Sequence[dict] = field(default_factory=list)  # input_ids, labels, row (+ truncated); or FlatRows
    rows_read: int = 0
    skipped: Counter = field(default_factory=Counter)  # bad rows under --on-bad-row skip, by reason
    dropped: Counter = field(default_factory=Counter)  # rows a masker could not train on, by reason
    truncated: Counter = field(default_factory=Counter)  # kept rows that were cut: prompt / response
    dropped_rows: dict[int, str] = field(default_factory=dict)  # source row -> reason
    duplicates: int = 0  # rows whose (prompt, response) an earlier row already had, kept or skipped
    turns: Counter = field(default_factory=Counter)  # conversations: trained turns, rows split off, turns left out by reason

    @property
    def tokens(self) -> int:
        counted = getattr(self.rows, "tokens", None)  # sftcore.data.cache.FlatRows counts with numpy
        return counted if counted is not None else sum(len(r["input_ids"]) for r in self.rows)

    @property
    def supervised_tokens(self) -> int:
        counted = getattr(self.rows, "supervised_tokens", None)
        if counted is not None:
            return counted
        return sum(sum(1 for label in r["labels"] if label != IGNORE_INDEX) for r in self.rows)


def row_policy(config: Mapping[str, Any], key: str) -> Any:
    """The config's ``on_bad_row`` or ``on_duplicate``, or its default."""
    return config.get(key, ROW_POLICIES[key][0])


def pick_reader(registry: Registry, path: str, name: str | None = None) -> Any:
    """The reader named, or the one whose suffixes match the file, behind the host's boundary."""
    if name:
        component = registry.get("reader", name)
        with building(component):
            return checked(component, registry.build("reader", name))
    component, built = reader_for(registry, path)
    if built is None:
        built = build_reader(registry, component, path)
    return checked(component, built)


def reader_component(registry: Registry, path: str) -> Any:
    """The reader component whose suffixes match the file."""
    return reader_for(registry, path)[0]


def reader_for(registry: Registry, path: str) -> tuple[Any, Any]:
    """``(component, reader or None)``: the reader whose suffixes match the file.

    Suffixes are read from the factory (a reader class's ``suffixes``) without building it, so
    one reader that cannot be built with no options (a required option, a failing factory)
    cannot stop the others from being found. Only a factory that declares no suffixes is
    built to learn its reader's (returned, so it is not built twice); those come after every
    declared one, so a declared reader wins a suffix both claim. (A ``suffixes`` property is not
    a declaration: on the class it is a property object.) An undeclared one that cannot be built
    bare is passed over, and named only when no reader matches.
    """
    suffix = Path(path).suffix.lower()
    readers = [c for c in registry.all() if c.stage == "reader"]
    known: set[str] = set()
    undeclared = []
    for component in readers:
        declared = getattr(component.factory, "suffixes", None)
        if not isinstance(declared, (tuple, list)):
            undeclared.append(component)
            continue
        suffixes = checked_suffixes(component, declared)
        if suffix in suffixes:
            return component, None
        known.update(suffixes)
    unbuilt: list[str] = []
    for component in undeclared:
        try:
            built = build_reader(registry, component, path, matched=False)
        except SftError as exc:
            unbuilt.append(f"{component.name} ({exc})")
            continue
        suffixes = checked_suffixes(component, getattr(built, "suffixes", ()))
        if suffix in suffixes:
            return component, built
        known.update(suffixes)
    passed_over = f"; readers not built without options: {'; '.join(unbuilt)}" if unbuilt else ""
    raise UsageError(
        f"{path}: no reader for '{suffix or '(no suffix)'}' files; known: {', '.join(sorted(known))}; "
        f"or pass --reader NAME{passed_over}"
    )


def build_reader(registry: Registry, component: Any, path: str, *, matched: bool = True) -> Any:
    """A reader built with no options: the one ``path``'s suffix picked (``matched``), or one built
    to learn its suffixes; a factory that needs options or fails is refused in one line naming it."""
    problems = [p.removeprefix(f"reader '{component.name}' ") for p in option_problems(component, {})]
    if problems:
        what = f"reads '{Path(path).suffix.lower()}' files but" if matched else "cannot be built without options:"
        raise UsageError(
            f"{path}: the {component_origin(component)} {what} {'; '.join(problems)}; name it with its "
            f"options in the config (reader: {{name: {component.name}, options: {{...}}}})"
        )
    try:
        with building(component):
            return component.factory()
    except SftError:
        raise
    except Exception as exc:
        raise PluginError(
            f"{component_origin(component)}: its factory raised {exception_text(exc)}; {fix_or_disable(component.plugin)}"
        ) from exc


def checked_suffixes(component: Any, suffixes: Any) -> tuple[str, ...]:
    """A reader's ``suffixes``: a tuple or list of strings, else its plugin's one-line error."""
    if isinstance(suffixes, str) or not isinstance(suffixes, (list, tuple, set, frozenset)) or not all(
        isinstance(s, str) for s in suffixes
    ):
        raise PluginError(
            f"{component_origin(component)}: suffixes is {kind(suffixes)}, "
            f"not a tuple of strings such as ('.jsonl',); {fix_or_disable(component.plugin)}"
        )
    return tuple(s.lower() for s in suffixes)


def read_rows(reader: Any, path: str) -> Iterator[tuple[int, Mapping[str, Any] | DataError]]:
    if not Path(path).exists():
        raise DataError(path, None, None, "no such file", reason="missing-file")
    yield from reader.read(path)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside (as a decorator: during each call).

    Reading and masking make millions of lists and dicts, and each collection walks every live
    container: on 50K Alpaca rows that was a quarter of the tokenizing time. Rows hold no
    reference cycles; anything else is collected once the collector is back on.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@gc_paused()
def format_rows(
    template: Any,
    rows: Iterable[tuple[int, Mapping[str, Any] | DataError]],
    path: str,
    on_bad_row: OnBadRow,
    prepared: Prepared,
    on_duplicate: OnDuplicate = ROW_POLICIES["on_duplicate"][0],
) -> list[Formatted]:
    """Apply the template; a bad row stops the run (``error``) or is counted and left out (``skip``).

    A row with the same prompt and response as an earlier one is a duplicate: counted, and
    kept, skipped or an error per ``on_duplicate``.
    """
    out: list[Formatted] = []
    seen: dict[bytes, int] = {}
    for number, row in rows:
        prepared.rows_read += 1
        if isinstance(row, DataError):
            problem = row
        else:
            try:
                formatted = as_formatted(number, template.format(row))
                if is_new(seen, number, formatted.prompt, formatted.response, path, on_duplicate, prepared):
                    out.append(formatted)
                continue
            except FieldError as exc:
                problem = DataError(path, number, exc.field, exc.message, reason=exc.reason)
            except (KeyError, TypeError, ValueError) as exc:
                problem = DataError(path, number, None, f"template could not format the row: {exc}", reason="bad-row")
        if on_bad_row == "error":
            raise problem
        prepared.skipped[problem.reason] += 1
    return out


def as_formatted(number: int, result: Any) -> Formatted:
    """A template's answer as segments, with its prompt and response: for a conversation, its last
    trained turn's inference prompt (the history before it) and text, which duplicates are found by."""
    segments = as_segments(result)
    pair = pair_of(segments)
    if pair is not None:  # kept as its two texts: a segment holds a copy, and data sets run to gigabytes
        return Formatted(number, pair[0], pair[1])
    turns = turns_of(segments)[0]
    prompt, response = (turns[-1].prompt, turns[-1].reply) if turns else (join([s.text for s in segments]), "")
    return Formatted(number, prompt, response, tuple(segments))


def is_new(
    seen: dict[bytes, int], number: int, prompt: str, response: str, path: str, on_duplicate: OnDuplicate,
    prepared: Prepared,
) -> bool:
    """Whether a formatted row goes on to masking: a first occurrence, or a duplicate under ``keep``.

    ``seen`` maps a digest of (prompt, response) to its first row: 16 bytes a row, not the text.
    """
    key = hashlib.blake2b(digest_size=16)
    for text in (prompt, response):
        data = str(text).encode("utf-8", "surrogatepass")
        key.update(len(data).to_bytes(8, "little") + data)
    first = seen.setdefault(key.digest(), number)
    if first == number:
        return True
    prepared.duplicates += 1
    if on_duplicate == "error":
        raise DataError(
            path, number, None, f"same prompt and response as row {first}; pass --on-duplicate keep or skip to allow it",
            reason="duplicate",
        )
    if on_duplicate == "skip":
        prepared.skipped["duplicate"] += 1
        return False
    return True


@gc_paused()
def mask_rows(
    masker: Any,
    items: Sequence[Formatted],
    tokenizer: Any,
    max_length: int,
    prepared: Prepared,
    progress: Callable[[int], None] | None = None,
    workers: int = 1,
) -> None:
    """Tokenize and mask in batches (the masker's ``batch`` when it has one), filling ``prepared``.

    ``workers > 1`` masks the batches in that many processes; the rows come back in order.
    """
    from sftcore.data.workers import map_in_order

    chunks = [items[start : start + MASK_BATCH] for start in range(0, len(items), MASK_BATCH)]
    texts = [([i.prompt for i in chunk], [i.response for i in chunk], [i.segments for i in chunk]) for chunk in chunks]
    origin = origin_of(masker, "masker")
    for chunk, results in zip(chunks, map_in_order(mask_texts, texts, (masker, tokenizer, max_length), workers)):
        if not isinstance(results, (list, tuple)) or len(results) != len(chunk):
            # zip() would silently drop the rows a short answer leaves out
            got = f"{len(results)} results" if isinstance(results, (list, tuple)) else kind(results)
            raise PluginError(f"{origin}: batch() returned {got} for {len(chunk)} rows; {advice(masker)}")
        for item, result in zip(chunk, results):
            if isinstance(result, Outcome):
                result = add_turns(prepared, result)
                if not isinstance(result, RowDropped):
                    for one in result:
                        add_row(prepared, item, one, max_length, masker)
                    continue
            if isinstance(result, RowDropped):
                prepared.dropped[result.reason] += 1
                prepared.dropped_rows[item.row] = result.reason
                continue
            add_row(prepared, item, result, max_length, masker)
        if progress:
            progress(len(chunk))


def add_row(prepared: Prepared, item: Formatted, result: Any, max_length: int, masker: Any) -> None:
    check_masked(result, max_length, item.row, masker)
    row = {"input_ids": list(result["input_ids"]), "labels": list(result["labels"]), "row": item.row}
    if result.get("truncated"):
        row["truncated"] = result["truncated"]
        prepared.truncated[result["truncated"]] += 1
    prepared.rows.append(row)


def add_turns(prepared: Prepared, outcome: Outcome) -> list[dict] | RowDropped:
    """Count a conversation's turns; its rows, or `RowDropped` naming why no turn could be trained."""
    for reason in outcome.left_out:
        prepared.turns[f"left out: {reason}"] += 1
    if not outcome.rows:
        return RowDropped(outcome.left_out[0] if outcome.left_out else "no-trained-turn")
    prepared.turns["trained"] += sum(row.get("turns", 1) for row in outcome.rows)
    prepared.turns["rows split off"] += len(outcome.rows) - 1
    return outcome.rows


def mask_texts(
    masker: Any, tokenizer: Any, max_length: int, prompts: list[str], responses: list[str], segments: list | None = None
) -> list[Any]:
    """One batch through the masker: its ``segments()`` answer per row (a masked row, `RowDropped`
    or a conversation's `Outcome`); a masker without one gets rows shaped as pairs as (prompt, response)."""
    by_segments = getattr(masker, "segments", None)
    segments = [s if s else as_segments((p, r)) for s, p, r in zip(segments or [None] * len(prompts), prompts, responses)]
    if by_segments is not None:
        return by_segments(segments, tokenizer, max_length)
    if not all(pair_of(s) for s in segments):
        raise PluginError(
            f"{origin_of(masker, 'masker')}: the template gives segments (a conversation), which this masker "
            "cannot mask (it has no segments() method); use the response-only or full masker"
        )
    batch_fn = getattr(masker, "batch", None)
    if batch_fn is not None:
        return batch_fn(prompts, responses, tokenizer, max_length)
    results: list[Any] = []
    for prompt, response in zip(prompts, responses):
        try:
            results.append(masker(prompt, response, tokenizer, max_length))
        except RowDropped as dropped:
            results.append(dropped)
    return results


def check_masked(result: Any, max_length: int, row: int, masker: Any = None) -> None:
    """Enforce the masker contract, so a faulty third-party masker fails loudly, not silently.

    Ids and labels must be ints (a float id would be truncated by the collator's tensor, a bool
    read as 0 or 1), ids non-negative, labels no lower than -100. The type check is one
    ``set(map(type, ...))`` per row, in C, about the cost of the copy `mask_rows` makes anyway:
    millions of rows pass through here.
    """
    if not isinstance(result, Mapping):
        raise PluginError(
            f"{origin_of(masker, 'masker')}: returned {kind(result)} for row {row}, not a mapping with "
            f"input_ids and labels; {advice(masker)}"
        )
    ids, labels = result.get("input_ids"), result.get("labels")
    where = f"masker output for row {row}"
    if ids is None or labels is None:
        raise UsageError(f"{where} lacks input_ids or labels")
    problem = id_problem("input_ids", ids, 0) or id_problem("labels", labels, IGNORE_INDEX)
    if problem is None and result.get("truncated") not in (None, "prompt", "response"):
        problem = f"truncated is {kind(result['truncated'])}; it is 'prompt' or 'response'"
    if problem:
        raise PluginError(f"{origin_of(masker, 'masker')}: output for row {row}: {problem}; {advice(masker)}")
    if len(ids) != len(labels):
        raise UsageError(f"{where}: {len(ids)} input_ids but {len(labels)} labels")
    if len(ids) > max_length:
        raise UsageError(f"{where}: {len(ids)} tokens exceed max_length {max_length}")
    ignored_after_first = list(labels[1:]).count(IGNORE_INDEX)  # counted in C, not a Python loop
    if ignored_after_first == len(labels) - 1:
        if labels[0] == IGNORE_INDEX:
            raise UsageError(f"{where} has no supervised token; a masker must raise RowDropped instead")
        # The loss shifts labels by one: position 0 is never a prediction target.
        raise UsageError(
            f"{where} supervises only its first token, which is never predicted (labels shift by one "
            "in the loss); a masker must raise RowDropped instead"
        )


def id_problem(key: str, values: Any, lowest: int) -> str | None:
    """Why ``values`` is not a list of ints, each ``>= lowest``.

    Labels between -100 and 0 are refused per batch, by the collator's boundary
    (`sftcore.boundary.check_batch`), where one tensor comparison does it.
    """
    if isinstance(values, (str, bytes, Mapping)) or not (hasattr(values, "__len__") and hasattr(values, "__iter__")):
        return f"{key} is {kind(values)}, not a list of ints"
    types = set(map(type, values))
    if not types <= {int}:
        for t in types:
            if issubclass(t, bool) or not issubclass(t, numbers.Integral):
                bad = next(v for v in values if type(v) is t)
                return f"{key} holds {kind(bad)}; token ids and labels are ints"
    if len(values) and min(values) < lowest:
        return f"{key} holds {min(values)}; " + ("ids are >= 0" if lowest == 0 else f"labels are >= 0 or {lowest}")
    return None
