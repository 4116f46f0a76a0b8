"""What a finished run reports: the lines `sft run` prints and summary.json, written last."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sftcore.model.adapters import parameters_line
from sftcore.run.checkpoints import write_whole
from sftcore.run.outdir import SUMMARY_FILE


@dataclass
class Summary:
    output: str
    rows_read: int
    rows_used: int
    skipped: dict[str, int]
    dropped: dict[str, int]
    truncated: dict[str, int]
    tokens: int
    supervised_tokens: int
    padding_fraction: float
    tokens_per_second: float
    steps: int
    first_loss: float | None
    last_loss: float | None
    seconds: float
    files: list[str] = field(default_factory=list)
    duplicates: int = 0
    eval_rows: int = 0
    first_eval_loss: float | None = None
    last_eval_loss: float | None = None
    best_eval_loss: float | None = None
    best_eval_step: int | None = None
    model_files: list[str] = field(default_factory=list)  # what the final save wrote (--overwrite removes them)
    trainable_parameters: int = 0  # each tied tensor once; an adapter run's adapter alone trains
    total_parameters: int = 0
    turns: dict[str, int] = field(default_factory=dict)  # conversations: trained, rows split off, left out: REASON

    @classmethod
    def of(
        cls, output: Path, data: Any, held_out: Any, collator: Any, curve: Any, steps: int, train_seconds: float,
        seconds: float, files: list[str], model_files: list[str],
    ) -> Summary:
        """The summary of a run: ``data`` its `sftcore.data.pipeline.Prepared` rows, ``collator`` the
        `sftcore.run.stats.BatchCounter` and ``curve`` the `sftcore.run.stats.LossCurve` it trained with;
        ``train_seconds`` the Trainer's own runtime (evaluation inside it is not training's time)."""
        summary = cls(
            output=str(output),
            rows_read=data.rows_read,
            rows_used=len(data.rows),
            skipped=dict(data.skipped),
            dropped=dict(data.dropped),
            truncated=dict(data.truncated),
            tokens=data.tokens,
            supervised_tokens=data.supervised_tokens,
            padding_fraction=collator.padding_fraction,
            tokens_per_second=collator.real_tokens / max(train_seconds - curve.eval_seconds, 1e-9),
            steps=steps,
            first_loss=curve.points[0][1] if curve.points else None,
            last_loss=curve.points[-1][1] if curve.points else None,
            seconds=seconds,
            files=files,
            duplicates=data.duplicates,
            eval_rows=len(held_out) if held_out is not None else 0,
            first_eval_loss=curve.eval_points[0][1] if curve.eval_points else None,
            last_eval_loss=curve.eval_points[-1][1] if curve.eval_points else None,
            model_files=model_files,
            turns={k: v for k, v in sorted(data.turns.items()) if v},
        )
        if curve.eval_points:
            summary.best_eval_step, summary.best_eval_loss = min(curve.eval_points, key=lambda point: point[1])
        return summary

    def lines(self) -> list[str]:
        first = "n/a" if self.first_loss is None else f"{self.first_loss:.4f}"
        last = "n/a" if self.last_loss is None else f"{self.last_loss:.4f}"
        return [
            f"rows: {self.rows_used} used of {self.rows_read} read; skipped: {reasons(self.skipped)}; "
            f"dropped: {reasons(self.dropped)}; truncated: {reasons(self.truncated)}"
            + (f"; duplicates: {self.duplicates}" if self.duplicates else ""),
            f"tokens: {self.tokens} per epoch, {self.supervised_tokens} supervised "
            f"({self.supervised_tokens / max(self.tokens, 1):.0%}); padding {self.padding_fraction:.1%} of batch positions",
            *([f"turns: {reasons(self.turns)}"] if self.turns else []),
            parameters_line(self.trainable_parameters, self.total_parameters),
            f"speed: {self.tokens_per_second:,.0f} real tokens/s over {self.steps} steps in {self.seconds:.1f}s",
            f"loss: first {first}, last {last}",
            *(
                [
                    f"held-out loss ({self.eval_rows} rows): first {_four(self.first_eval_loss)}, "
                    f"last {_four(self.last_eval_loss)}, best {_four(self.best_eval_loss)}"
                    + (f" at step {self.best_eval_step}" if self.best_eval_step is not None else "")
                ]
                if self.eval_rows else []
            ),
            f"saved to {self.output}",
        ]


def _four(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def reasons(counts: Mapping[str, int]) -> str:
    """Counts by reason as the summary prints them: ``bad-json 1, too-long 2`` (or ``none``)."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def write_summary(output: Path, summary: Summary) -> None:
    """summary.json, whole or not at all: it is written last and marks the run finished (`sft generate` checks it)."""
    write_whole(output / SUMMARY_FILE, json.dumps(asdict(summary), indent=2) + "\n")
