"""The files a run's loss curve leaves: loss.csv always, loss.png only with the plot extra, and a
line in the log when it is not drawn."""

from __future__ import annotations

import logging
import sys

import pytest
from cli_runs import loss_points

from sftcore.run.stats import NO_PLOT, LossCurve

POINTS = [(1, 2.5), (2, 2.0), (3, 1.5)]


def test_without_matplotlib_the_log_says_why_there_is_no_plot(monkeypatch, caplog, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets when it is missing
    with caplog.at_level(logging.INFO, logger="sftcore"):
        written = LossCurve(POINTS).write(tmp_path)
    assert written == [tmp_path / "loss.csv"]
    assert loss_points(tmp_path) == POINTS
    assert not (tmp_path / "loss.png").exists()
    assert [r.getMessage() for r in caplog.records] == [NO_PLOT]
    assert NO_PLOT == "loss.png not drawn: matplotlib is not installed (pip install 'sftcore[plot]')"


def test_with_matplotlib_the_plot_is_drawn_without_a_word(caplog, tmp_path):
    pytest.importorskip("matplotlib")
    with caplog.at_level(logging.INFO, logger="sftcore"):
        written = LossCurve(POINTS, [(3, 1.7)]).write(tmp_path)
    assert written == [tmp_path / "loss.csv", tmp_path / "eval_loss.csv", tmp_path / "loss.png"]
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert caplog.records == []
