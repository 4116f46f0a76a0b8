"""Test kit for sftcore plugin authors, loaded by pytest as the ``sftcore`` plugin (entry point
``pytest11``): install sftcore and these fixtures and helpers are there, no conftest needed.

Fixtures:

* ``sft_host``: ``sft_host(*plugins, builtins=True)`` builds a host with the built-in plugins
  and yours, never whatever else is installed, and makes any plugin problem an error.
* ``tiny_model_dir``: a checkpoint directory of sftcore's tiny Llama (random weights, one per session).
* ``tiny_tokenizer``: the tiny Llama's tokenizer (byte-level BPE, BOS ``<s>``, EOS ``</s>``).

Helpers: ``make_host`` (what ``sft_host`` calls), ``check_mask_invariants``, which runs a
template and a masker over rows and asserts every rule of the masker contract, and
``supervised_runs``, where a row's labels are trained.

Importing this module imports neither torch nor transformers: pytest loads it in every session
of an environment where sftcore is installed, so everything heavy is imported inside fixtures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

from sftcore import IGNORE_INDEX, RowDropped
from sftcore.data.segments import as_segments, pair_of
from sftcore.tokens import encode_prompts, encode_texts, eos_id

if TYPE_CHECKING:
    from sftcore.host import Host

__all__ = ["check_mask_invariants", "make_host", "supervised_runs"]


def make_host(*plugins: object, builtins: bool = True, **named: object) -> Host:
    """A host with the built-in plugins (unless ``builtins=False``) and ``plugins``, and no entry points.

    A module plugin is named after its module, any other object after its class; pass
    ``name=plugin`` to choose the name. Loading is strict: a plugin that fails to import, has an
    invalid hook or raises while registering fails the test instead of being reported and skipped.
    """
    from sftcore.host import load_catalogue
    from sftcore.host import load_host

    extra: dict[str, object] = {}
    for plugin in plugins:
        name = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__name__
        if name in extra or name in named:
            raise ValueError(f"two plugins named '{name}'; pass one as make_host(other_name=plugin)")
        extra[name] = plugin
    extra.update(named)
    disable = () if builtins else tuple(load_catalogue().plugins)
    return load_host(entry_points=False, extra=extra, strict=True, disable=disable)


@pytest.fixture
def sft_host(monkeypatch: pytest.MonkeyPatch):
    """Factory: ``sft_host(*plugins, builtins=True, **named) -> Host`` (see ``make_host``).

    The plugin environment variables of the calling shell are cleared (`clear_plugin_env`), so the
    host is the same everywhere.
    """
    clear_plugin_env(monkeypatch)
    return make_host


def clear_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset every variable that changes which plugins load and how (`sftcore.host.PLUGIN_ENV`)."""
    from sftcore.host import PLUGIN_ENV

    for var in PLUGIN_ENV:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of sftcore's tiny Llama: config, tokenizer and seeded random weights (a few MB)."""
    from sftcore.assets import tiny_model

    return tiny_model(tmp_path_factory.mktemp("sftcore-tiny") / "tiny-llama")


@pytest.fixture
def tiny_tokenizer() -> Any:
    """A fresh copy of the tiny Llama's tokenizer per test (loading it takes milliseconds)."""
    from transformers import AutoTokenizer

    from sftcore.assets import TINY_LLAMA

    return AutoTokenizer.from_pretrained(TINY_LLAMA)


def check_mask_invariants(
    template: Any,
    masker: Any,
    tokenizer: Any,
    rows: Iterable[Mapping[str, Any]],
    *,
    max_length: int = 512,
    supervise_prompt: bool = False,
    every_turn: bool = True,
) -> None:
    """Format and mask each row; raise ``AssertionError`` listing every broken rule, row by row.

    The rules, for each row the masker keeps:

    * ``template.format(row)[0] == template.format_prompt(row)``;
    * ``input_ids`` and ``labels`` have equal length, at most ``max_length``;
    * every supervised label (not -100) equals the input id at its position, and at least one is;
    * ``input_ids`` start with the inference prompt's ids,
      ``sftcore.tokens.encode_prompts(tokenizer, [template.format_prompt(row)])[0]``, unless the
      masker reports the row ``truncated``;
    * after the prompt come the response's ids, then any end-of-turn tokens, then EOS, all of them
      supervised (a row reported ``truncated: "response"`` keeps a prefix of that and no final EOS);
    * no prompt token is supervised, unless ``supervise_prompt`` (a masker that trains on the
      prompt, or on earlier assistant turns that sit in the prompt);
    * a masker's ``batch`` returns what calling it row by row does.

    A template that answers with a conversation's segments (``sftcore.protocols.Segment``, more
    than a pair) is masked by the masker's ``segments()``; for each training row and each trained
    turn in it, the ids before the turn are its inference prompt's
    (``sftcore.data.segments.encode_prompt_texts`` of the text before it), its ids are its own
    encoding (then EOS, where the segment or the masker ends it so), all supervised, and nothing
    else is (unless ``supervise_prompt``); every trained turn is in a row, unless the masker left
    some out or ``every_turn=False`` (a masker that trains some turns only: the last, say).

    A row the masker drops with ``RowDropped`` passes, and is named in the message of any
    failure; a call with no rows, or in which every row is dropped, fails: it checked nothing.
    """
    rows = list(rows)
    eos = eos_id(tokenizer)
    problems: list[str] = []
    dropped: dict[str, list[int]] = {}  # reason -> rows
    pairs: list[tuple[int, str, str]] = []
    singles: list[Any] = []
    conversations = 0  # conversations that kept a row
    for index, row in enumerate(rows):
        where = f"row {index}"
        try:
            segments = as_segments(template.format(row))
            pair = pair_of(segments)
            if pair is None:
                found, kept = _conversation_problems(masker, tokenizer, segments, max_length, supervise_prompt, every_turn)
                problems += [f"{where}: {problem}" for problem in found]
                conversations += kept
                continue
            prompt, response = pair
            inference = template.format_prompt(row)
        except Exception as exc:
            problems.append(f"{where}: the template raised {type(exc).__name__}: {exc}")
            continue
        if prompt != inference:
            at = _first_difference(prompt, inference)
            problems.append(
                f"{where}: format(row)[0] differs from format_prompt(row) at character {at}: "
                f"{prompt[at:at + 30]!r} vs {inference[at:at + 30]!r}"
            )
        try:
            result: Any = masker(prompt, response, tokenizer, max_length)
        except RowDropped as exc:
            dropped.setdefault(exc.reason, []).append(index)
            result = exc
        pairs.append((index, prompt, response))
        singles.append(result)
        if isinstance(result, RowDropped):
            continue
        prompt_ids = encode_prompts(tokenizer, [inference])[0]
        response_ids = encode_texts(tokenizer, [response])[0]
        for problem in _row_problems(result, prompt_ids, response_ids, eos, max_length, supervise_prompt, tokenizer):
            problems.append(f"{where}: {problem}")

    batch = getattr(masker, "batch", None)
    if batch is not None and pairs:
        batched = batch([p for _, p, _ in pairs], [r for _, _, r in pairs], tokenizer, max_length)
        if len(batched) != len(pairs):
            problems.append(f"masker.batch returned {len(batched)} results for {len(pairs)} rows")
        for (index, _, _), one, many in zip(pairs, singles, batched):
            if _outcome(one) != _outcome(many):
                problems.append(f"row {index}: masker.batch gives {_outcome(many)!r}, a single call {_outcome(one)!r}")

    n_dropped = sum(len(indices) for indices in dropped.values())
    if not rows:
        problems.append("no rows were given, so nothing was checked")
    elif pairs and n_dropped == len(pairs) and not conversations:
        problems.append("every row was dropped, so nothing was checked")
    if problems:
        header = f"{len(problems)} mask invariant(s) broken in {len(rows)} rows"
        if dropped:
            header += f"; {n_dropped} dropped (allowed): " + ", ".join(
                f"{reason} (rows {_some(indices)})" for reason, indices in dropped.items()
            )
        raise AssertionError(header + ":\n" + "\n".join(f"- {p}" for p in problems))


def _row_problems(
    result: Any,
    prompt_ids: list[int],
    response_ids: list[int],
    eos: int,
    max_length: int,
    supervise_prompt: bool,
    tokenizer: Any,
) -> list[str]:
    if not isinstance(result, Mapping) or "input_ids" not in result or "labels" not in result:
        return [f"the masker returned {type(result).__name__}, not a mapping with input_ids and labels"]
    ids, labels = list(result["input_ids"]), list(result["labels"])
    truncated = result.get("truncated")
    problems = []
    if len(ids) != len(labels):
        problems.append(f"{len(ids)} input_ids but {len(labels)} labels")
    if len(ids) > max_length:
        problems.append(f"{len(ids)} tokens exceed max_length {max_length}")
    wrong = [i for i, (token, label) in enumerate(zip(ids, labels)) if label != IGNORE_INDEX and label != token]
    if wrong:
        i = wrong[0]
        problems.append(f"{len(wrong)} label(s) differ from the input id there, first at position {i}: label {labels[i]}, input id {ids[i]}")
    if all(label == IGNORE_INDEX for label in labels):
        problems.append("every label is -100: a masker must raise RowDropped for a row it cannot train on")
    if truncated not in (None, "prompt", "response"):
        problems.append(f"truncated is {truncated!r}; it may only be 'prompt' or 'response'")
    if problems:
        return problems  # the positional rules below assume aligned ids and labels

    if ids[: len(prompt_ids)] == prompt_ids:
        start = len(prompt_ids)
    elif truncated:
        start = _response_start(ids, labels, response_ids)
        if start is None:
            return [f"the prompt was cut and the response's ids are not in the supervised tail (ends {_show(tokenizer, ids[-8:])})"]
    else:
        at = _first_difference(ids, prompt_ids)
        return [
            f"input_ids do not start with the inference prompt's ids: position {at} is "
            f"{_show(tokenizer, ids[at:at + 3])} in training, {_show(tokenizer, prompt_ids[at:at + 3])} at inference"
        ]
    if not supervise_prompt:
        supervised = [i for i in range(start) if labels[i] != IGNORE_INDEX]
        if supervised:
            problems.append(
                f"{len(supervised)} prompt token(s) supervised, first at position {supervised[0]} "
                f"({_show(tokenizer, ids[supervised[0]:supervised[0] + 1])}); pass supervise_prompt=True if that is the design"
            )
    after, after_labels = ids[start:], labels[start:]
    masked = [start + i for i, label in enumerate(after_labels) if label == IGNORE_INDEX]
    if masked:
        problems.append(f"{len(masked)} token(s) after the prompt are not supervised, first at position {masked[0]}")
    if truncated == "response":
        if after[: len(response_ids)] != response_ids[: len(after)]:
            problems.append(f"the tokens after the prompt are not the response's ids: {_show(tokenizer, after[:8])}")
        if ids and ids[-1] == eos:
            problems.append("the response was cut but the row still ends with EOS: the model would learn to stop mid-answer")
    else:
        if after[: len(response_ids)] != response_ids:
            problems.append(
                f"the response's ids do not follow the prompt: expected {_show(tokenizer, response_ids[:8])}, "
                f"got {_show(tokenizer, after[:8])}"
            )
        if not ids or ids[-1] != eos or labels[-1] != eos:
            problems.append(f"the row does not end with a supervised EOS (id {eos}); it ends {_show(tokenizer, ids[-3:])}")
    return problems


def _conversation_problems(
    masker: Any, tokenizer: Any, segments: list, max_length: int, supervise_prompt: bool, every_turn: bool
) -> tuple[list[str], int]:
    """What is wrong with one conversation's rows, and 1 when it kept one (else 0)."""
    from sftcore.data.segments import Outcome, encode_any, encode_prompt_texts, turns_of

    if getattr(masker, "segments", None) is None:
        return ["the template answers with a conversation's segments, which a masker without segments() cannot mask"], 0
    [outcome] = masker.segments([segments], tokenizer, max_length)
    if not isinstance(outcome, Outcome):
        return ([] if isinstance(outcome, RowDropped) else [f"segments() gave {type(outcome).__name__}, not an Outcome"]), 0
    turns, _ = turns_of(segments)
    eos = eos_id(tokenizer)
    prompts = encode_prompt_texts(tokenizer, [t.prompt for t in turns])
    replies = [ids + ([eos] if t.eos else []) for t, ids in zip(turns, encode_any(tokenizer, [t.reply for t in turns]))]
    problems, k = [], 0
    for n, row in enumerate(outcome.rows):
        ids, labels = list(row["input_ids"]), list(row["labels"])
        if len(ids) != len(labels) or len(ids) > max_length:
            problems.append(f"training row {n}: {len(ids)} input_ids, {len(labels)} labels, max_length {max_length}")
            continue
        if any(label != IGNORE_INDEX and label != token for token, label in zip(ids, labels)):
            problems.append(f"training row {n}: a supervised label differs from the input id there")
        if supervise_prompt or outcome.left_out:
            continue  # turns are told apart by their masked prompts; none here, or some left out
        for start, end in supervised_runs(labels):
            if not every_turn:  # the masker trains some turns: the run is the next one it matches
                k = next((j for j in range(k, len(turns)) if not _turn_problems(row, start, end, prompts[j], replies[j], eos)), k)
            if k >= len(turns):
                problems.append(f"training row {n}: more supervised runs than trained turns ({len(turns)})")
                break
            problems += [f"turn {k}: {p}" for p in _turn_problems(row, start, end, prompts[k], replies[k], eos, tokenizer)]
            k += 1
    if every_turn and not supervise_prompt and not outcome.left_out and k != len(turns):
        problems.append(f"{k} of {len(turns)} trained turns are in the rows")
    return problems, int(bool(outcome.rows))


def _turn_problems(row: Mapping[str, Any], start: int, end: int, prompt: list[int], reply: list[int], eos: int, tokenizer: Any = None) -> list[str]:
    """Why the supervised run ``[start, end)`` of ``row`` is not this turn after its inference prompt."""
    ids, problems = list(row["input_ids"]), []
    if not row.get("truncated") and ids[:start] != prompt:
        problems.append(f"the ids before it are not its inference prompt's, first differing at {_first_difference(ids, prompt)}")
    got, cut = ids[start:end], row.get("truncated") == "response"
    if (got != reply[: end - start]) if cut else (got not in (reply, reply + [eos])):
        problems.append(f"its supervised ids are not its own encoding (then EOS): {_show(tokenizer, got[:8]) if tokenizer else got[:8]}")
    return problems


def supervised_runs(labels: list[int]) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of supervised labels (not -100), in order."""
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _response_start(ids: list[int], labels: list[int], response_ids: list[int]) -> int | None:
    """Where the response begins in a row whose prompt was cut: the first position of the final
    run of supervised labels from which the ids are the response's (or a prefix of them)."""
    run = len(labels)
    while run > 0 and labels[run - 1] != IGNORE_INDEX:
        run -= 1
    for start in range(run, len(ids)):
        k = min(len(response_ids), len(ids) - start)
        if ids[start : start + k] == response_ids[:k]:
            return start
    return None


def _some(indices: list[int], shown: int = 5) -> str:
    text = ", ".join(map(str, indices[:shown]))
    return text + (f" and {len(indices) - shown} more" if len(indices) > shown else "")


def _outcome(result: Any) -> Any:
    if isinstance(result, RowDropped):
        return ("RowDropped", result.reason)
    if isinstance(result, Mapping):
        return {k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in result.items()}
    return result


def _first_difference(a: Sequence[Any], b: Sequence[Any]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _show(tokenizer: Any, ids: Sequence[int]) -> str:
    try:
        return repr(tokenizer.convert_ids_to_tokens(list(ids)))
    except Exception:  # an id the tokenizer does not know: show the number
        return repr(list(ids))
