"""Counters a run keeps while it trains: batch padding and the logged loss curve."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("sftcore.run")
# What the run's log says once when it writes no loss.png: the plot is an optional extra.
NO_PLOT = "loss.png not drawn: matplotlib is not installed (pip install 'sftcore[plot]')"


@dataclass
class BatchCounter:
    """Wraps a collator and counts real and padded token positions of every batch it makes."""

    collator: Any
    real_tokens: int = 0
    positions: int = 0

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch = self.collator(features)
        self.real_tokens += sum(len(f["input_ids"]) for f in features)
        self.positions += int(batch["input_ids"].numel())
        return batch

    def __getattr__(self, name: str) -> Any:  # expose the collator's own extras (batch_sampler, ...)
        return getattr(self.collator, name)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.positions if self.positions else 0.0


@dataclass
class LossCurve:
    points: list[tuple[int, float]] = field(default_factory=list)
    eval_points: list[tuple[int, float]] = field(default_factory=list)  # held-out loss, when there is eval data
    eval_seconds: float = 0.0  # time spent evaluating inside the training loop

    def write(self, directory: Path) -> list[Path]:
        """``loss.csv`` always, ``eval_loss.csv`` with eval points; ``loss.png`` when matplotlib is
        installed (``sftcore[plot]``)."""
        written = [directory / "loss.csv"]
        _write_csv(written[0], "loss", self.points)
        if self.eval_points:
            written.append(directory / "eval_loss.csv")
            _write_csv(written[-1], "eval_loss", self.eval_points)
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.info(NO_PLOT)
            return written
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([p[0] for p in self.points], [p[1] for p in self.points], label="training")
        if self.eval_points:
            ax.plot([p[0] for p in self.eval_points], [p[1] for p in self.eval_points], "o-", label="held out")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(directory / "loss.png", dpi=100)
        plt.close(fig)
        written.append(directory / "loss.png")
        return written


def _write_csv(path: Path, column: str, points: list[tuple[int, float]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", column])
        writer.writerows(points)
