"""The rows a run trains on: components built from the config, data read, templated, tokenized
and masked (or loaded from the prepared-data cache), and the held-out rows.

Nothing here loads model weights: `sft prepare`, `sft preview` and the first half of `sft run`
need a tokenizer at most.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sftcore.assets import BUILTIN_MODEL
from sftcore.boundary import building, checked
from sftcore.errors import SftError
from sftcore.options import with_host_options
from sftcore.host import Host
from sftcore.data.pipeline import Formatted, Prepared, format_rows, mask_rows, pick_reader, read_rows, row_policy

log = logging.getLogger("sftcore.run")


def build_stage(host: Host, config: Mapping[str, Any], stage: str, **host_options: Any) -> Any:
    """Build a configured component, adding the host-provided options (`sftcore.options.HOST_OPTIONS`)
    its factory accepts; the host gets it behind `sftcore.boundary.checked`, which checks what each
    of its calls returns."""
    name = config[stage]["name"]
    options = with_host_options(stage, host.registry.get(stage, name).factory, config[stage]["options"], **host_options)
    try:
        with building(host.registry.get(stage, name)):
            built = host.registry.build(stage, name, options)
    except SftError:
        raise
    except (TypeError, ValueError) as exc:
        raise SftError(f"{stage} '{name}' rejected its options: {exc}") from None
    return checked(host.registry.get(stage, name), built)  # every call's answer checked at the boundary


def model_path(config: Mapping[str, Any]) -> str:
    model = str(config["model"])
    if model == BUILTIN_MODEL:
        from sftcore.assets import tiny_model

        return str(tiny_model(seed=int(config["training"].get("seed", 0))))
    return model


def tokenizer_source(config: Mapping[str, Any]) -> str:
    """Where the run's tokenizer is; the built-in model's ships with sftcore, so no weights are made."""
    if str(config["model"]) == BUILTIN_MODEL:
        from sftcore.assets import TINY_LLAMA

        return str(TINY_LLAMA)
    return str(config["model"])


MAX_LENGTH_CAP = 2048
# Where config.json states the positions a model takes (Llama and most; GPT-2; MPT; ChatGLM; GPT-J).
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
# RoPE scalings that stretch max_position_embeddings by their factor. llama3 and longrope, and yarn
# with an original_max_position_embeddings below it, state the stretched length themselves.
STRETCHING_ROPE = ("linear", "dynamic", "yarn")


def default_max_length_for(tokenizer: Any, positions: int | None = None) -> int:
    """The model's length, capped: a loader sets the tokenizer's model_max_length to the model's."""
    return int(min(tokenizer.model_max_length, MAX_LENGTH_CAP, positions or MAX_LENGTH_CAP))


def model_positions(source: str) -> tuple[int, str] | None:
    """``(positions, where config.json says so)`` for the model at ``source``; None when it does not say.

    Read from config.json itself: no weights, no remote code, cheap enough for `sft preview`.
    """
    try:
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no config (a tokenizer directory) or a broken one, which loading names
        return None
    if not isinstance(config, dict):
        return None
    if isinstance(config.get("text_config"), dict) and not any(f in config for f in POSITION_FIELDS):
        config = config["text_config"]  # a multimodal model: its language model's length
    found = next(((f, config[f]) for f in POSITION_FIELDS if _positive_int(config.get(f))), None)
    if found is None:
        return None
    name, positions = found
    rope = config.get("rope_scaling") or config.get("rope_parameters")
    if isinstance(rope, dict):
        kind, factor = rope.get("rope_type") or rope.get("type"), rope.get("factor")
        original = rope.get("original_max_position_embeddings")
        stretched = isinstance(factor, (int, float)) and factor > 1 and (original is None or original >= positions)
        if kind in STRETCHING_ROPE and stretched:
            return int(positions * factor), f"{name} {positions} x {kind} rope factor {factor}"
    return positions, f"{name} {positions}"


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def cap_max_length(config: dict[str, Any]) -> None:
    """Lower a configured ``max_length`` beyond the model's positions to them, with a log line.

    Capped rather than refused: max_length bounds a row, and no row can be longer than the
    model's positions anyway; asking for more means "cut as little as possible", which the cap
    does. Past them, a learned position table fails with an IndexError and RoPE runs on positions
    it never saw, after tokenizing and padding for a length that takes gigabytes.
    """
    asked = config.get("max_length")
    found = model_positions(tokenizer_source(config)) if asked else None
    if found is not None and asked > found[0]:
        config["max_length"] = found[0]
        log.warning("max_length: %d is more than the model takes (%s in config.json); capped to %d", asked, found[1], found[0])


def resolve_max_length(config: dict[str, Any], tokenizer: Any) -> int:
    """The run's max_length: the configured one (`cap_max_length`), else the model's, capped at 2048."""
    cap_max_length(config)
    if config.get("max_length"):
        return int(config["max_length"])
    found = model_positions(tokenizer_source(config))
    return default_max_length_for(tokenizer, found[0] if found else None)


def format_data(
    host: Host, config: Mapping[str, Any], *, limit: int | None = None, progress: bool = False, tokenizer: Any = None
) -> tuple[list[Formatted], Prepared]:
    """Read and template the rows (the first ``limit`` only, if given), with a count of rows read.

    Needs no model, so `sft run` does it before loading weights: a bad row in a large file
    stops the run in seconds, not after a multi-GB checkpoint has loaded. ``tokenizer`` goes to
    a template that takes one (`template_takes_tokenizer`).
    """
    from tqdm.auto import tqdm

    reader = (
        build_stage(host, config, "reader") if config.get("reader") else pick_reader(host.registry, config["data"])
    )
    prepared = Prepared()
    rows = read_rows(reader, config["data"])
    if limit is not None:
        rows = itertools.islice(rows, limit)
    # Reading a data set of millions of rows takes a while before tokenizing starts.
    rows = tqdm(rows, desc="reading", unit="rows", disable=not progress, leave=False, mininterval=0.5)
    template = build_stage(host, config, "template", **({"tokenizer": tokenizer} if tokenizer is not None else {}))
    items = format_rows(
        template, rows, config["data"], row_policy(config, "on_bad_row"), prepared, row_policy(config, "on_duplicate")
    )
    return items, prepared


def template_takes_tokenizer(host: Host, config: Mapping[str, Any]) -> bool:
    """Whether the configured template renders with the tokenizer (a chat template), which is
    then loaded before the rows are formatted; others format before any tokenizer loads."""
    from sftcore.options import signature

    sig = signature(host.registry.get("template", config["template"]["name"]).factory)
    return sig is not None and "tokenizer" in sig.named


def mask_data(
    host: Host, config: Mapping[str, Any], items: list[Formatted], prepared: Prepared, tokenizer: Any,
    max_length: int, progress: bool = True, workers: int = 1,
) -> Prepared:
    """Tokenize and mask formatted rows into ``prepared`` (in ``workers`` processes when above 1)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc="tokenizing", unit="rows", disable=not progress, leave=False)
    try:
        mask_rows(build_stage(host, config, "masker"), items, tokenizer, max_length, prepared, bar.update, workers)
    finally:
        bar.close()
    return prepared


def load_tokenizer(host: Host, config: Mapping[str, Any], path: str) -> Any:
    """The tokenizer as the configured loader prepares it, without loading weights."""
    loader = build_stage(host, config, "loader")
    if hasattr(loader, "load_tokenizer"):
        return loader.load_tokenizer(path)
    from transformers import AutoTokenizer

    from sftcore.model.weights import check_json_files, loading

    check_json_files(path)
    with loading("tokenizer", path):
        return AutoTokenizer.from_pretrained(path)


def cache_directory(config: Mapping[str, Any]) -> Path | None:
    """Where prepared data is cached: ``cache_dir``, else the sftcore cache; None when ``cache_dir: false``."""
    value = config.get("cache_dir")
    if value is False:
        return None
    if value:
        return Path(value)
    from sftcore.assets import cache_dir

    return cache_dir() / "prepared"


def prepare_data(host: Host, config: dict[str, Any], *, progress: bool = True, workers: int = 1) -> Prepared:
    """The run's masked rows: loaded from the prepared-data cache, or read, templated, masked and stored.

    Needs the tokenizer only, never the weights, and not even that for a bad row, which stops
    the run first. ``config`` gets the resolved max_length.
    """
    from sftcore.data import cache

    cap_max_length(config)  # before the key: a capped length shares the entry of the same length asked for
    directory, key = cache_directory(config), None
    if directory is not None:
        try:
            key = cache.make_key(cache.key_parts(host, config, tokenizer_source(config)))
        except OSError:  # an unreadable data file: format_data reports it
            key = None
    if key is not None and (hit := cache.load(directory, key)) is not None:
        data, config["max_length"] = hit
        log.info("prepared data: %d rows loaded from the cache, %s", len(data.rows), cache.entry_path(directory, key))
        return data
    early = load_tokenizer(host, config, tokenizer_source(config)) if template_takes_tokenizer(host, config) else None
    items, data = format_data(host, config, progress=progress, tokenizer=early)
    tokenizer = early or load_tokenizer(host, config, tokenizer_source(config))
    config["max_length"] = resolve_max_length(config, tokenizer)
    mask_data(host, config, items, data, tokenizer, config["max_length"], progress, workers)
    cache.flatten(data)
    if key is not None and (path := cache.store(directory, key, data, config["max_length"])) is not None:
        log.info("prepared data: %d rows tokenized and cached, %s", len(data.rows), path)
    return data


def eval_rows(host: Host, config: dict[str, Any], data: Prepared, progress: bool) -> Any:
    """The held-out rows: ``eval_data`` prepared like the training data (same components and
    max_length), or an ``eval_split`` fraction of ``data``'s rows, drawn with the run's seed and
    taken out of ``data``; None without either."""
    if config.get("eval_data") is not None:
        held_out = prepare_data(host, {**config, "data": config["eval_data"]}, progress=progress)
        if not held_out.rows:
            raise SftError(f"{config['eval_data']}: no row left to evaluate on ({held_out.rows_read} read)")
        log.info("eval data: %d rows from %s", len(held_out.rows), config["eval_data"])
        return held_out.rows
    if config.get("eval_split") is None:
        return None
    import numpy as np

    from sftcore.data import cache

    count = len(data.rows)
    held = round(count * config["eval_split"])
    if not 0 < held < count:
        raise SftError(
            f"eval_split {config['eval_split']} of {count} rows leaves {held} to evaluate on and {count - held} to train on; "
            "both need at least one"
        )
    order = np.random.default_rng(config["training"].get("seed", 0)).permutation(count)
    rows = cache.flatten(data).rows
    data.rows = rows.select(np.sort(order[held:]))
    log.info("eval split: %d of %d rows held out (eval_split %s)", held, count, config["eval_split"])
    return rows.select(np.sort(order[:held]))
