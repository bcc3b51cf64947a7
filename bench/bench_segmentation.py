"""Training throughput of the segmentation task against a plain DDP loop, in one run.

    python bench/bench_segmentation.py [--steps 40] [--skip 10] [--repeats 3] [--images 200]

Both sides train the same UPerNet (configs/finetune/ade20k/demo.yaml: the demo's scaled-down
DaViT, decoder 64 channels, auxiliary FCN head, fp32, 8 crops of 64 px per rank) on 2 CPU
ranks over gloo, from the same synthetic ADE-layout images read by the same resumable folder
loader (finetune.segmentation.data):

* ``deepspeed``: ``launch/finetune.py`` under the DeepSpeed launcher, i.e. the shared
  ``Trainer`` with ``SegmentationTask`` (per-step agreement on finite loss / preemption, the
  per-step BatchNorm-statistics average, metrics);
* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` around the same module (its buffers
  broadcast every step, DDP's default), ``torch.optim.AdamW`` with the task's parameter groups
  and gradient clipping, started with ``torch.multiprocessing``.

The first ``--skip`` steps (start-up, loader fill) are not timed. DeepSpeed's rate comes from
its per-step ``metrics.jsonl`` records, DDP's from the wall clock of the timed steps. Thread
counts are as each side is started: the DeepSpeed side as the README starts it (the entry
points' thread policy), the DDP ranks with torchrun's one thread each. The sides run
``--repeats`` times, interleaved, so that background load hits both alike; the median of the
per-repeat ratios is printed last.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
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
from finetune.config import FinetuneConfig  # noqa: E402
from finetune.segmentation.synthetic import write_synthetic_ade  # noqa: E402
from pretrain.engine.config import load_config  # noqa: E402

CONFIG = "ade20k/demo"
ENCODER = ["encoder.weights=null", "encoder.name=davit_tiny",  # the demo's encoder, untrained
           "encoder.overrides={depths: [1, 1, 1, 1], embed_dims: [32, 64, 128, 256], "
           "num_heads: [1, 2, 4, 8]}"]


def overrides(root: Path, steps: int, extra: list[str]) -> list[str]:
    return [*ENCODER, f"data.root={root}", f"schedule.steps={steps}",
            "schedule.warmup_steps=1", "eval.enabled=false", "log.every=1",
            "log.progress=false", "log.wandb.mode=disabled", f"checkpoint.every={10 * steps}",
            *extra]


def run_deepspeed(settings: list[str], run_dir: Path) -> Path:
    launcher = Path(sys.executable).with_name("deepspeed")
    command = [str(launcher), "--num_gpus", str(RANKS), "--master_port", str(free_port()),
               str(ROOT / "launch" / "finetune.py"), "--config", CONFIG,
               "--run-dir", str(run_dir), *[a for s in settings for a in ("--set", s)]]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"deepspeed run failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return run_dir / "metrics.jsonl"


def ddp_worker(rank: int, settings: list[str], steps: int, skip: int, port: int,
               results: mp.SimpleQueue) -> None:
    """One rank of the plain DDP loop; rank 0 reports the timed images/s."""
    from torch.nn.parallel import DistributedDataParallel

    from finetune.segmentation.task import SegmentationTask
    from pretrain.engine.stream import StreamState

    join_ddp_group(rank, port)
    cfg = load_config(FinetuneConfig, CONFIG, settings, kind="finetune")
    task = SegmentationTask(cfg)
    torch.manual_seed(cfg.train.seed)
    module = task.build_module()
    model = DistributedDataParallel(module)
    optimizer = torch.optim.AdamW(task.param_groups(module), lr=cfg.optimizer.lr,
                                  betas=cfg.optimizer.betas, eps=cfg.optimizer.eps,
                                  weight_decay=cfg.optimizer.weight_decay)
    loader = task.build_loader(rank, StreamState.fresh(cfg.data.workers))
    start = time.perf_counter()
    for step in range(steps):
        if step == skip:
            dist.barrier()
            start = time.perf_counter()
        loss = model(next(loader))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optimizer.grad_clip)
        optimizer.step()
    dist.barrier()
    elapsed = time.perf_counter() - start
    loader.close()
    if rank == 0:
        results.put((steps - skip) * cfg.data.batch_size * RANKS / elapsed)
    dist.destroy_process_group()


def run_ddp(settings: list[str], steps: int, skip: int) -> float:
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(ddp_worker, args=(settings, steps, skip, free_port(), results),
                       nprocs=RANKS, join=True, start_method="spawn")
    return results.get()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per side")
    parser.add_argument("--skip", type=int, default=10, help="leading steps left out of timing")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per side")
    parser.add_argument("--images", type=int, default=200, help="synthetic training images")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        metavar="KEY=VALUE", help="config override for both sides")
    args = parser.parse_args(argv)
    if not 0 <= args.skip < args.steps or args.repeats < 1:
        parser.error("--skip must be smaller than --steps, --repeats at least 1")
    rates: dict[str, list[float]] = {"deepspeed": [], "ddp": []}
    with tempfile.TemporaryDirectory(prefix="bench_seg_") as tmp:
        root = write_synthetic_ade(Path(tmp) / "ade", args.images, 8, num_classes=5)
        settings = overrides(root, args.steps, args.extra)
        cfg = load_config(FinetuneConfig, CONFIG, settings, kind="finetune")
        for repeat in range(args.repeats):
            metrics = run_deepspeed(settings, Path(tmp) / f"run{repeat}")
            rates["deepspeed"].append(deepspeed_rate(metrics, args.skip))
            rates["ddp"].append(run_ddp(settings, args.steps, args.skip))
    print(f"UPerNet ({CONFIG}), {cfg.deepspeed.precision}, {RANKS} CPU ranks (gloo), "
          f"{cfg.data.batch_size} crops of {cfg.data.crop_size} px per rank, steps "
          f"{args.skip + 1}..{args.steps} timed, {args.repeats} interleaved runs")
    labels = {"deepspeed": f"deepspeed (Trainer + SegmentationTask, ZeRO-"
                           f"{cfg.deepspeed.zero_stage})",
              "ddp": "ddp (DDP + AdamW)"}
    for side, label in labels.items():
        runs = ", ".join(f"{rate:.1f}" for rate in rates[side])
        print(f"{label:<46}{max(rates[side]):8.1f} images/s   (runs: {runs})")
    per_repeat = [a / b for a, b in zip(rates["deepspeed"], rates["ddp"], strict=True)]
    print(f"{'ratio deepspeed / ddp, median':<46}{statistics.median(per_repeat):8.2f}   (runs: "
          f"{', '.join(f'{r:.2f}' for r in per_repeat)})")


if __name__ == "__main__":
    main()
