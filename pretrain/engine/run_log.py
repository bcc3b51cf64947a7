"""Training metrics: ``metrics.jsonl`` (one JSON object per logged step) and a wandb run.

Only rank 0 writes. wandb is offline unless the config says otherwise, so a run never needs
a network; ``wandb sync`` uploads it later.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from data_tools.files import atomic_write_text


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float (also inside dicts and lists) as ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(item) for item in value]
    return value


def strict_json(value: Any, **dumps_kwargs: Any) -> str:
    """JSON that strict readers accept: a value that is not a number (a class absent from a
    split has no IoU) is written as ``null``, never as a bare ``NaN``."""
    return json.dumps(finite_or_null(value), allow_nan=False, **dumps_kwargs)


def write_eval_json(run_dir: Path | str, payload: dict[str, Any]) -> None:
    """``RUN_DIR/eval.json`` (every job's evaluation record), strict JSON, written atomically."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(run_dir) / "eval.json", strict_json(payload, indent=2))


def peak_memory_gb() -> float:
    """Peak accelerator memory if there is one, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / 2**20 if sys.platform != "darwin" else kilobytes / 2**30


class MetricsLogger:
    def __init__(self, run_dir: Path, config: dict, wandb_cfg: Any, enabled: bool,
                 resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        if wandb_cfg.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb_run = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                mode=wandb_cfg.mode,
                dir=str(run_dir),
                config=config,
                id=_run_id(run_dir),
                resume="allow",
            )

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines the interrupted run logged after its last checkpoint."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` with ``time`` (Unix seconds when it was logged: where a run's wall
        clock went, start-up included, can be read from the file alone)."""
        if not self.enabled:
            return
        with self.path.open("a") as stream:
            stream.write(strict_json({**record, "time": round(time.time(), 3)}) + "\n")
        if self.wandb_run is not None:
            self._to_wandb(lambda: self.wandb_run.log(record, step=record["step"]))

    def close(self) -> None:
        if self.wandb_run is not None:
            self._to_wandb(self.wandb_run.finish)
            self.wandb_run = None

    def _to_wandb(self, call: Callable[[], Any]) -> None:
        """wandb mirrors ``metrics.jsonl``. Its service is a child process of rank 0, so a
        cluster's preemption signal reaches it too (SLURM signals every process of the job,
        DeepSpeed's launcher every descendant of a rank): when it is gone, say so once and go
        on without it, so that the preempted step still saves its checkpoint."""
        try:
            call()
        except Exception as error:  # whatever wandb raises for its lost service
            print(f"wandb stopped logging ({type(error).__name__}: {error}); metrics.jsonl "
                  "has every record", file=sys.stderr)
            self.wandb_run = None
            import wandb

            # Unregisters wandb's exit hook, which would print the lost connection again.
            with contextlib.suppress(Exception):
                wandb.teardown()


def _run_id(run_dir: Path) -> str:
    """A stable wandb id per run directory, so a resumed run continues the same wandb run."""
    id_file = Path(run_dir) / "wandb_id.txt"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    return id_file.read_text().strip()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record: training log records (with ``loss``) and evaluation records (``eval/...``
    keys), in the order they were logged."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_training_metrics(path: Path) -> list[dict[str, Any]]:
    """Only the training log records (one per ``log.every`` steps)."""
    return [record for record in read_metrics(path) if "loss" in record]
