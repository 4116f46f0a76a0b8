"""Held-out loss: `--eval-data FILE` or `--eval-split FRACTION`, measured after every epoch, without
changing what training does or what its summary counts."""

from __future__ import annotations

import json

import pytest
import torch
from cli_runs import ROWS, loss_points, sft, write_jsonl

from sftcore.data.cache import FlatRows
from sftcore.data.pipeline import Prepared
from sftcore.data.prepare import eval_rows

TRAIN = [dict(row, instruction=f"{row['instruction']} ({i})") for i in range(4) for row in ROWS]  # 24 rows
HELD_OUT = ROWS[:4]
ARGS = ("--batch-size", "4", "--epochs", "2", "--lr", "1e-3", "--seed", "3", "--no-progress")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-data")
    return write_jsonl(root / "train.jsonl", TRAIN), write_jsonl(root / "held.jsonl", HELD_OUT)


def test_held_out_rows_do_not_change_training_and_get_their_own_curve(monkeypatch, tmp_path, tiny_model_dir, data):
    train, held = data
    plain = sft(monkeypatch, "run", "--model", tiny_model_dir, "--data", train, "--output", tmp_path / "plain", *ARGS)
    assert plain.exit_code == 0, plain.output
    judged = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", train, "--eval-data", held, "--output", tmp_path / "eval", *ARGS
    )
    assert judged.exit_code == 0, judged.output
    # Training is the same step for step, and its counters do not count held-out batches.
    assert loss_points(tmp_path / "eval") == loss_points(tmp_path / "plain")
    before, after = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("plain", "eval"))
    assert after["padding_fraction"] == before["padding_fraction"] and after["tokens"] == before["tokens"]
    assert before["eval_rows"] == 0 and before["last_eval_loss"] is None
    assert not (tmp_path / "plain" / "eval_loss.csv").exists()
    # One held-out loss per epoch (6 steps each), the last one reported.
    points = loss_points(tmp_path / "eval", "eval_loss")
    assert [step for step, _ in points] == [6, 12]
    assert after["eval_rows"] == 4 and after["last_eval_loss"] == pytest.approx(points[-1][1])
    best_step, best = min(points, key=lambda point: point[1])
    assert (after["best_eval_loss"], after["best_eval_step"]) == (pytest.approx(best), best_step)
    assert (
        f"held-out loss (4 rows): first {points[0][1]:.4f}, last {points[1][1]:.4f}, best {best:.4f} at step {best_step}\n"
        in judged.stdout
    )


def test_the_held_out_loss_is_the_final_models_loss_on_those_rows(monkeypatch, tmp_path, tiny_model_dir, data):
    """The Trainer's eval_loss: each batch's loss per supervised token, averaged over the batches
    weighted by their rows (6 held-out rows, batches of 4 and 2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftcore.tokens import encode_prompts, encode_texts
    from sftcore_plugins.alpaca import AlpacaTemplate
    from sftcore_plugins.pad import PadCollator

    train, _ = data
    held_out = ROWS  # 6 rows
    held = write_jsonl(tmp_path / "held6.jsonl", held_out)
    result = sft(
        monkeypatch, "run", "--model", tiny_model_dir, "--data", train, "--eval-data", held, "--output", tmp_path / "out", *ARGS
    )
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    rows = []
    for row in held_out:  # masked by hand: prompt -100, response + EOS supervised
        prompt, response = AlpacaTemplate().format(row)
        ids = encode_prompts(tokenizer, [prompt])[0]
        reply = encode_texts(tokenizer, [response])[0] + [tokenizer.eos_token_id]
        rows.append({"input_ids": ids + reply, "labels": [-100] * len(ids) + reply})
    collate = PadCollator(pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        first, second = (model(**collate(batch)).loss.item() for batch in (rows[:4], rows[4:]))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["eval_rows"] == 6
    assert summary["last_eval_loss"] == pytest.approx((4 * first + 2 * second) / 6, rel=1e-5)


def test_eval_split_holds_out_a_seeded_fraction_disjoint_from_training():
    import numpy as np

    def prepared(count):
        rows = [{"input_ids": [i] * (i % 5 + 1), "labels": [i] * (i % 5 + 1), "row": i + 1} for i in range(count)]
        return Prepared(rows=FlatRows.from_rows(rows), rows_read=count)

    config = {"eval_split": 0.2, "training": {"seed": 7}}
    data = prepared(50)
    held = eval_rows(None, config, data, progress=False)
    train_sources, held_sources = list(data.rows.source), list(held.source)
    assert len(held_sources) == 10 and len(train_sources) == 40
    assert sorted(train_sources + held_sources) == list(range(1, 51))
    assert held_sources == sorted(held_sources)  # file order kept
    for got in (data.rows, held):  # each row keeps its own ids
        for i in range(len(got)):
            source = int(got.source[i])
            assert got[i]["input_ids"] == [source - 1] * ((source - 1) % 5 + 1)
    again = prepared(50)
    assert list(eval_rows(None, config, again, progress=False).source) == held_sources
    other = prepared(50)
    assert list(eval_rows(None, {**config, "training": {"seed": 8}}, other, progress=False).source) != held_sources
    assert np.array_equal(again.rows.source, data.rows.source)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--eval-split", "0.1", "--eval-data", "x.jsonl"), "give eval_data (a file of held-out rows) or eval_split"),
        (("--eval-split", "1"), "eval_split must be a fraction of the rows between 0 and 1, like 0.05; got 1.0"),
        (("--eval-data", "missing.jsonl"), "eval data file not found: missing.jsonl"),
    ],
)
def test_eval_options_are_checked_before_anything_loads(monkeypatch, tmp_path, tiny_model_dir, data, options, message):
    result = sft(monkeypatch, "run", "--model", tiny_model_dir, "--data", data[0], *options, "--no-progress")
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_a_split_that_leaves_nothing_on_one_side_is_refused():
    data = Prepared(rows=FlatRows.from_rows([{"input_ids": [1], "labels": [1], "row": 1}] * 3), rows_read=3)
    from sftcore.errors import SftError

    with pytest.raises(SftError, match="eval_split 0.1 of 3 rows leaves 0 to evaluate on and 3 to train on"):
        eval_rows(None, {"eval_split": 0.1, "training": {}}, data, progress=False)


def test_ctrl_c_stops_without_a_held_out_pass(monkeypatch, tmp_path, tiny_model_dir, data):
    """The Trainer ends the epoch it stops in, and that would evaluate: on a large held-out set, a
    whole pass between Ctrl-C and the exit."""
    from test_resume import CtrlC
    from transformers import Trainer

    train, held = data
    passes = []
    evaluate = Trainer.evaluate

    def counted(self, *args, **kwargs):
        passes.append(self.state.global_step)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", counted)
    common = ("run", "--model", tiny_model_dir, "--data", train, "--eval-data", held, *ARGS)
    finished = sft(monkeypatch, *common, "--output", tmp_path / "whole")
    assert finished.exit_code == 0 and passes == [6, 12], (passes, finished.output)
    passes.clear()
    stopped = sft(monkeypatch, *common, "--output", tmp_path / "stopped", extra={"ctrl_c": CtrlC(3)})
    assert stopped.exit_code == 130, stopped.output
    assert passes == []
    assert (tmp_path / "stopped" / "checkpoint-3").is_dir()
