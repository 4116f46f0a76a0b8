"""`sft preview`: the exact ids and labels training would use, with the mask made visible."""

from __future__ import annotations

import json
import sys

import click

from sftcore import IGNORE_INDEX
from sftcore.commands.common import data_config, data_options


def spans(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[bool, str]]:
    """Runs of (supervised?, decoded text) in order."""
    out: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels):
        supervised = label != IGNORE_INDEX
        if out and out[-1][0] == supervised:
            out[-1][1].append(token)
        else:
            out.append((supervised, [token]))
    return [(s, tokenizer.decode(run, skip_special_tokens=False)) for s, run in out]


@click.command("preview")
@data_options("Run config (e.g. a run's sft_config.yaml).")
@click.option("-n", "limit", type=int, help="Show only the first N rows.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per row: prompt, response, input_ids, labels.")
@click.pass_context
def command(ctx: click.Context, config_file, tokenizer_path, limit, as_json, **values) -> None:
    """Show what the model will be trained on: prompt tokens masked, response tokens supervised.

    With no --model and no --data (and no config naming them): the bundled demo, as `sft run`.
    """
    from sftcore.data.prepare import format_data, load_tokenizer, mask_data, resolve_max_length, tokenizer_source

    host, config = data_config(ctx, config_file, tokenizer_path, values)
    tokenizer = load_tokenizer(host, config, tokenizer_source(config))
    max_length = resolve_max_length(config, tokenizer)
    items, prepared = format_data(host, config, limit=limit, tokenizer=tokenizer)
    mask_data(host, config, items, prepared, tokenizer, max_length, progress=False)
    masked: dict[int, list[dict]] = {}  # a conversation split into rows has several
    for row in prepared.rows:
        masked.setdefault(row["row"], []).append(row)
    for item in items:
        rows = masked.get(item.row, [None])
        for row in rows:
            record = {"row": item.row, "prompt": item.prompt, "response": item.response}
            if len(rows) > 1:  # a conversation split into rows, a trained turn each: that turn's texts
                record.update(split_texts(tokenizer, row))
            if row is None:
                record["dropped"] = prepared.dropped_rows[item.row]
            else:
                record.update(input_ids=row["input_ids"], labels=row["labels"])
                if "truncated" in row:
                    record["truncated"] = row["truncated"]
            if as_json:
                click.echo(json.dumps(record, ensure_ascii=False))
            else:
                show(tokenizer, record)
    if not as_json:
        turns = "".join(f", {n} {what}" for what, n in sorted(prepared.turns.items()) if what != "trained" and n)
        click.echo(
            f"{len(prepared.rows)} rows kept, {sum(prepared.dropped.values())} dropped, "
            f"{sum(prepared.skipped.values())} skipped; "
            + (f"{prepared.supervised_tokens} tokens trained in {prepared.turns['trained']} turns{turns}; " if prepared.turns else "")
            + f"max_length {max_length}"
        )


def show(tokenizer, record: dict) -> None:
    if "dropped" in record:
        click.echo(click.style(f"row {record['row']}: dropped ({record['dropped']})", fg="red", bold=True))
        return
    ids, labels = record["input_ids"], record["labels"]
    supervised = sum(1 for label in labels if label != IGNORE_INDEX)
    note = f", truncated: {record['truncated']}" if "truncated" in record else ""
    click.echo(click.style(f"row {record['row']}: {len(ids)} tokens, {supervised} trained{note}", bold=True))
    color = sys.stdout.isatty()
    parts = []
    for trained, text in spans(tokenizer, ids, labels):
        if color:
            parts.append(click.style(text, fg="green", bold=True) if trained else click.style(text, dim=True))
        else:
            parts.append(f"[[{text}]]" if trained else text)
    click.echo("".join(parts))
    click.echo("")


def split_texts(tokenizer, row: dict) -> dict[str, str]:
    """``prompt`` and ``response`` of one row of a split conversation: the text before its trained
    turn and the turn's trained text, decoded from the row's own ids."""
    ids, labels = list(row["input_ids"]), list(row["labels"])
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    return {"prompt": tokenizer.decode(ids[:first]), "response": tokenizer.decode(trained)}

