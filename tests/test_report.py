"""Plots and summaries read metrics.jsonl with evaluation records mixed in."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.engine.report import plot_training
from pretrain.engine.run_log import read_metrics, read_training_metrics


def test_plot_skips_evaluation_records(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 2.0, "lr": 1e-3}, {"step": 2, "loss": 1.5, "lr": 1e-3},
               {"step": 2, "eval/top1": 0.5}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert len(read_metrics(metrics)) == 3
    assert [r["step"] for r in read_training_metrics(metrics)] == [1, 2]
    output = plot_training(metrics, tmp_path / "training.png")
    assert output.stat().st_size > 1000
