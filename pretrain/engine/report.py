"""Plots and tables of a run's ``metrics.jsonl``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from pretrain.engine.run_log import read_training_metrics  # noqa: E402


def plot_training(metrics_path: Path | str, output: Path | str, title: str = "") -> Path:
    """Loss and learning rate against steps, side by side, saved as a PNG."""
    records = read_training_metrics(Path(metrics_path))
    if not records:
        raise ValueError(f"{metrics_path} holds no training records")
    steps = [r["step"] for r in records]
    figure, (loss_axis, lr_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_axis.plot(steps, [r["loss"] for r in records], marker=".", color="tab:blue")
    loss_axis.set(xlabel="step", ylabel="training loss", title="loss")
    loss_axis.grid(alpha=0.3)
    lr_axis.plot(steps, [r["lr"] for r in records], marker=".", color="tab:orange")
    lr_axis.set(xlabel="step", ylabel="learning rate", title="learning rate")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr_axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output


def format_table(rows: list[tuple[str, str]], header: tuple[str, str] = ("metric", "value")
                 ) -> str:
    """A plain two-column text table."""
    width = max(len(header[0]), *(len(name) for name, _ in rows))
    lines = [f"{header[0]:<{width}}  {header[1]}", f"{'-' * width}  {'-' * len(header[1])}"]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
