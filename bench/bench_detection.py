"""Training throughput of the detection task against a plain DDP loop, in one run.

    python bench/bench_detection.py [--steps 30] [--skip 10] [--repeats 3] [--images 160]

bench_segmentation.py's comparison for COCO detection. Both sides train the same Mask R-CNN
(configs/finetune/coco/demo.yaml: FPN and heads 64 wide, fp32, 4 images per rank at short side
128-160 px) over an untrained, scaled-down DaViT on 2 CPU ranks over gloo, from the same
synthetic COCO (``data_tools.coco_synthetic``: instances json + JPEGs) read by the same
resumable, aspect-grouped stream (``CocoTrainStream`` in a ``TrainLoader``):

* ``deepspeed``: ``launch/finetune.py`` under the DeepSpeed launcher, i.e. the shared
  ``Trainer`` with ``DetectionTask`` (per-step agreement on finite loss / preemption, the
  per-step BatchNorm-statistics average, metrics), the config's ZeRO stage;
* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` around the same torchvision detector
  (``build_detection_module``; buffers broadcast every step, DDP's default),
  ``torch.optim.AdamW`` over the task's parameter groups (clipping only where the config
  clips; the demo does not), started with ``torch.multiprocessing``.

Timing as in bench_segmentation.py: ``--skip`` leading steps untimed, DeepSpeed's rate from its
per-step ``metrics.jsonl`` records and DDP's from the wall clock of the timed steps, thread
counts as each side is started (the README's launcher and thread policy; torchrun's one thread
per DDP rank), ``--repeats`` interleaved runs; every run is printed, then the medians and the
median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_pretrain_ddp import (  # noqa: E402
    RANKS,
    deepspeed_rate,
    free_port,
    join_ddp_group,
)
from bench.bench_segmentation import overrides  # noqa: E402
from data_tools.coco_synthetic import write_synthetic_coco  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402
from pretrain.engine.config import load_config  # noqa: E402

CONFIG = "coco/demo"
# bench_segmentation's shared overrides (untrained davit_tiny, no eval, a record a step, ...)
# with a smaller trunk in place of its encoder.overrides, and the demo's lr milestones moved
# past the run.
DETECTION = ["encoder.overrides={depths: [1, 1, 2, 1], embed_dims: [32, 64, 96, 128], "
             "num_heads: [1, 2, 3, 4]}"]
OPTIONS = (("--steps", 30, "training steps per side"),
           ("--skip", 10, "leading steps left out of timing"),
           ("--repeats", 3, "interleaved runs per side"),
           ("--images", 160, "synthetic training images"))


def settings_for(root: Path, steps: int, extra: list[str]) -> list[str]:
    return overrides(root, steps, [*DETECTION, f"schedule.milestones=[{10 * steps}]", *extra])


def run_deepspeed(settings: list[str], run_dir: Path) -> Path:
    """``launch/finetune.py`` on 2 ranks; returns its metrics.jsonl."""
    sets = [arg for item in settings for arg in ("--set", item)]
    command = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(RANKS),
               "--master_port", str(free_port()), str(ROOT / "launch" / "finetune.py"),
               "--config", CONFIG, "--run-dir", str(run_dir), *sets]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"deepspeed run failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return run_dir / "metrics.jsonl"


def timed_steps(step: Callable[[], None], steps: int, skip: int) -> float:
    """Seconds of steps ``skip + 1``..``steps``, their window opened and closed on every rank
    together."""
    for _ in range(skip):
        step()
    dist.barrier()
    began = time.perf_counter()
    for _ in range(steps - skip):
        step()
    dist.barrier()
    return time.perf_counter() - began


def ddp_worker(rank: int, settings: list[str], steps: int, skip: int, port: int,
               results: mp.SimpleQueue) -> None:
    """One rank of the plain DDP loop; rank 0 reports the timed images/s."""
    from torch.nn.parallel import DistributedDataParallel

    from finetune.detection.task import DetectionTask, build_detection_module
    from pretrain.engine.stream import StreamState

    join_ddp_group(rank, port)
    cfg = load_config(FinetuneConfig, CONFIG, settings, kind="finetune")
    task, opt = DetectionTask(cfg), cfg.optimizer
    torch.manual_seed(cfg.train.seed)
    module = build_detection_module(cfg, task.spec, cfg.encoder.weights, task.num_classes)
    model = DistributedDataParallel(module)
    optimizer = torch.optim.AdamW(task.param_groups(module), lr=opt.lr, betas=opt.betas,
                                  eps=opt.eps, weight_decay=opt.weight_decay)
    loader = task.build_loader(rank, StreamState.fresh(cfg.data.workers))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(next(loader))["loss"].backward()
        if opt.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), opt.grad_clip)
        optimizer.step()

    images = (steps - skip) * cfg.data.batch_size * RANKS
    seconds = timed_steps(step, steps, skip)
    loader.close()
    dist.destroy_process_group()
    if rank == 0:
        results.put(images / seconds)


def run_ddp(settings: list[str], steps: int, skip: int) -> float:
    """The DDP loop on 2 spawned ranks (one intra-op thread each); rank 0's images/s."""
    context = mp.get_context("spawn")
    rates = context.SimpleQueue()
    mp.start_processes(ddp_worker, args=(settings, steps, skip, free_port(), rates),
                       nprocs=RANKS, join=True, start_method=context.get_start_method())
    return rates.get()


def report(cfg, rates: dict[str, list[float]], args: argparse.Namespace) -> None:  # noqa: ANN001
    data = cfg.data
    print(f"Mask R-CNN ({CONFIG}), {cfg.deepspeed.precision}, {RANKS} CPU ranks (gloo), "
          f"{data.batch_size} images per rank at short side {min(data.scales)}-"
          f"{max(data.scales)} px, steps {args.skip + 1}..{args.steps} timed, "
          f"{args.repeats} interleaved runs")
    ratios = [ours / theirs for ours, theirs in zip(rates["deepspeed"], rates["ddp"],
                                                    strict=True)]
    rows = {f"deepspeed (Trainer + DetectionTask, ZeRO-{cfg.deepspeed.zero_stage})":
            (rates["deepspeed"], "images/s"), "ddp (DDP + AdamW)": (rates["ddp"], "images/s"),
            "ratio deepspeed / ddp": (ratios, "")}
    for label, (values, unit) in rows.items():
        listed = ", ".join(f"{value:.2f}" for value in values)
        print(f"{label:<44} median {statistics.median(values):6.2f} {unit:<8} (runs: {listed})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default, text in OPTIONS:
        parser.add_argument(flag, type=int, default=default, help=text)
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        metavar="KEY=VALUE", help="config override for both sides")
    args = parser.parse_args(argv)
    if not 0 <= args.skip < args.steps or args.repeats < 1:
        parser.error("--skip must be smaller than --steps, --repeats at least 1")
    with tempfile.TemporaryDirectory(prefix="bench_det_") as tmp:
        root = write_synthetic_coco(Path(tmp) / "coco", train_images=args.images, val_images=4,
                                    seed=0, min_size=96, max_size=160)
        settings = settings_for(root, args.steps, args.extra)
        rates: dict[str, list[float]] = {"deepspeed": [], "ddp": []}
        for repeat in range(args.repeats):  # interleaved: background load hits both sides
            metrics = run_deepspeed(settings, Path(tmp) / f"run{repeat}")
            rates["deepspeed"].append(deepspeed_rate(metrics, args.skip))
            rates["ddp"].append(run_ddp(settings, args.steps, args.skip))
            print(f"repeat {repeat + 1}: deepspeed {rates['deepspeed'][-1]:.2f}, ddp "
                  f"{rates['ddp'][-1]:.2f} images/s", flush=True)
    report(load_config(FinetuneConfig, CONFIG, settings, kind="finetune"), rates, args)


if __name__ == "__main__":
    main()
