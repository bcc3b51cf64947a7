"""What every job's entry point shares: arguments, config loading that fails in one line,
``--check``, and running a task's training or ``--eval-only`` to an exit code."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

from pretrain.engine.config import ConfigError, Schema, load_config
from pretrain.engine.errors import TrainingAborted
from pretrain.engine.task import Task
from pretrain.engine.threads import apply_thread_policy

Cfg = TypeVar("Cfg", bound=BaseModel)


def skip_final_garbage_collection() -> None:
    """Call last, when a job's process is about to exit.

    Python's shutdown starts with a full garbage collection over every object alive: after a
    job that is torch, DeepSpeed, timm, open_clip and the model, and it took 4-9 s per rank on
    2 CPU cores (``py-spy dump --native``: ``gc_collect_main``) after the job's last line, on
    every job, test and demo stage. Freezing the heap leaves those objects to the normal
    teardown of modules; the job has closed what it wrote (files, loader workers, wandb)."""
    gc.freeze()


def job_parser(description: str, kind: str, run_root: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help=f"YAML path or name under configs/{kind}")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config field, e.g. schedule.steps=100")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help=f"where the run lives (default: {run_root}/<config name>)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, print it resolved, and exit")
    parser.add_argument("--eval-only", dest="eval_only", type=Path, default=None,
                        metavar="CHECKPOINT",
                        help="evaluate CHECKPOINT on the config's validation split instead of "
                             "training (tasks that have such a mode); writes RUN_DIR/eval.json")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def load_or_report(schema: Schema[Cfg], name: str, overrides: list[str], kind: str) -> Cfg | None:
    """The validated config, or ``None`` after printing the one-line problem to stderr."""
    try:
        return load_config(schema, name, overrides, kind=kind)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return None


def run_job(argv: list[str] | None, description: str, kind: str, schema: Schema[Cfg],
            task_class: Callable[[Cfg], type[Task]], run_root: Path = Path("runs")) -> int:
    """Parse, validate (exit 2 on a bad config or missing input, before any process group),
    then train the task ``task_class(cfg)`` names, or evaluate a checkpoint with it.

    The task's :meth:`~pretrain.engine.task.Task.check_inputs` reports inputs the config names
    but the file system lacks (shards, weights) in one line, so ``--check`` on a login node and
    every rank at start-up stop there instead of a traceback per rank after start-up.
    ``--eval-only CHECKPOINT`` runs :func:`pretrain.engine.eval_only.evaluate_checkpoint` (the
    checkpoint holds the weights, so the inputs are not checked beyond it).
    """
    args = job_parser(description, kind, run_root).parse_args(argv)
    cfg = load_or_report(schema, args.config, args.overrides, kind)
    if cfg is None:
        return 2
    task = task_class(cfg)
    if args.eval_only is None:
        try:
            task.check_inputs(cfg)
        except (FileNotFoundError, ValueError) as error:
            print(f"input error: {error}", file=sys.stderr)
            return 2
    if args.check:
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    try:
        apply_thread_policy()
    except ValueError as error:  # a malformed OMP_NUM_THREADS
        print(f"environment error: {error}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or run_root / Path(args.config).stem
    if args.eval_only is not None:
        return _evaluate_only(task, cfg, args.eval_only, run_dir, kind)

    from pretrain.engine.resharding import ResumeRefused, prepare_resume

    try:  # the checkpoint's batch split and world size, before any process group
        requested = (cfg.data.batch_size, cfg.train.grad_accum)
        cfg, notes = prepare_resume(cfg, run_dir, _launch_world_size(), _launch_rank())
    except ResumeRefused as error:
        # Every rank reaches the same verdict from the same files; rank 0 says it and exits
        # 2. The others end quietly with 0: DeepSpeed's launcher kills every rank as soon as
        # one exits non-zero, which could kill rank 0 before it has printed why.
        if _launch_rank() != 0:
            return 0
        print(f"resume refused: {error}", file=sys.stderr)
        return 2
    if _launch_rank() == 0:
        for line in notes:
            print(line, flush=True)

    from pretrain.engine.trainer import Trainer  # DeepSpeed's import: only when training

    try:
        outcome = Trainer(cfg, task(cfg), run_dir, requested_batch=requested).train()
    except TrainingAborted as error:
        if error.printed_by(_launch_rank()):  # one voice: not one line per rank
            print(f"training aborted: {error}", file=sys.stderr)
        return 1
    if _launch_rank() == 0:
        print(f"{kind} {outcome} in {run_dir}")
    return 0


def _launch_world_size() -> int:
    """The number of ranks the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _launch_rank() -> int:
    """This process's rank as its launcher numbered it (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def _evaluate_only(task: type[Task], cfg: Any, checkpoint: Path, run_dir: Path,
                   kind: str) -> int:
    if task.eval_only_export is None:
        print(f"--eval-only: {kind} jobs have no evaluation-only mode", file=sys.stderr)
        return 2
    if not checkpoint.exists():  # a file, or a folder (a timm export)
        print(f"input error: --eval-only: no such file {checkpoint}", file=sys.stderr)
        return 2
    from pretrain.engine.eval_only import evaluate_checkpoint

    try:
        results = evaluate_checkpoint(task, cfg, checkpoint, run_dir)
    except (FileNotFoundError, ValueError) as error:
        print(f"input error: --eval-only {checkpoint}: {' '.join(str(error).split())}",
              file=sys.stderr)
        return 2
    if _launch_rank() == 0:
        shown = {k: v for k, v in results.items() if "." not in k}  # not per-class entries
        print(f"{kind} evaluation of {checkpoint}: {shown} (all in {run_dir / 'eval.json'})")
    return 0
