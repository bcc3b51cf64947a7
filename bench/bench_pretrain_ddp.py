"""Training throughput of this pipeline against a bare PyTorch DDP loop, in one run.

    python bench/bench_pretrain_ddp.py [--steps 40] [--skip 10] [--repeats 3] [--samples 2048]

Both sides train the demo model (configs/pretrain/demo.yaml: DaViT scaled down, small text
tower, fp32, micro-batch 64 per rank) on 2 CPU ranks over gloo, on the same synthetic shards
(``data_tools.synthetic``) read by the same resumable loader (``pretrain.data``):

* ``deepspeed``: ``launch/pretrain.py`` under the DeepSpeed launcher, i.e. the shared
  ``Trainer`` with ``ClipTask``, the config's ZeRO stage, its per-step agreement on finite
  loss / preemption, metrics;
* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` around ``build_clip``, open_clip's
  ``ClipLoss(local_loss=True, gather_with_grad=True)``, ``torch.optim.AdamW`` with the same
  parameter groups and gradient clipping, started with ``torch.multiprocessing``; the loop
  open_clip's own trainer runs, minus its logging.

The first ``--skip`` steps (start-up, allocator warm-up, loader fill) are not timed: DeepSpeed's
per-step rate still climbs for about ten steps (120 samples/s at steps 3-6, ~145 from step 14 in
one run here), so a short window would time warm-up rather than the steady state a long run
lives in. DeepSpeed's rate comes from its per-step ``metrics.jsonl`` records (``log.every=1``);
DDP's from the wall clock of the timed steps. The DeepSpeed side starts as the README says
(nothing added to the environment: each rank takes its share of the cores by the entry points'
thread policy); the DDP ranks run one intra-op thread each, what torchrun gives several local
ranks. The two sides run ``--repeats`` times,
interleaved, so that background load on a shared machine hits both alike. Prints every run's
samples/s, the best of each side, the ratio of the bests and the median of the per-repeat
ratios DeepSpeed / DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
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

from data_tools.mixture import load_mixture  # noqa: E402
from data_tools.synthetic import write_synthetic_shards  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.engine.config import load_config  # noqa: E402

RANKS = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_ddp_group(rank: int, port: int) -> None:
    """Start a bare DDP rank as torchrun would: one intra-op thread (torchrun's default for
    several local ranks), then gloo on loopback."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)


# --------------------------------------------------------------------------- DeepSpeed side
def run_deepspeed(shards: str, run_dir: Path, steps: int, overrides: list[str]) -> Path:
    """Run the real entry point on 2 ranks; returns its metrics.jsonl."""
    launcher = Path(sys.executable).with_name("deepspeed")
    command = [
        str(launcher), "--num_gpus", str(RANKS), "--master_port", str(free_port()),
        str(ROOT / "launch" / "pretrain.py"), "--config", "demo", "--run-dir", str(run_dir),
        "--set", f"data.train={shards}", "--set", f"schedule.steps={steps}",
        "--set", "schedule.warmup_steps=1", "--set", "log.every=1", "--set", "log.progress=false",
        "--set", "log.wandb.mode=disabled", "--set", f"checkpoint.every={10 * steps}",
        *[arg for item in overrides for arg in ("--set", item)],
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"deepspeed run failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return run_dir / "metrics.jsonl"


def deepspeed_rate(metrics: Path, skip: int) -> float:
    """Samples/s over the steps after ``skip``, from per-step records (time = batch / rate)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    timed = [r for r in records if r["step"] > skip]
    samples_per_step = records[0]["samples_seen"] // records[0]["step"]
    seconds = sum(samples_per_step / r["samples_per_s"] for r in timed)
    return len(timed) * samples_per_step / seconds


# --------------------------------------------------------------------------- DDP side
def ddp_worker(rank: int, cfg_tree: dict, shards: str, steps: int, skip: int, port: int,
               results: mp.SimpleQueue) -> None:
    """One rank of the bare DDP loop; rank 0 reports the timed samples/s."""
    import math

    from open_clip.loss import ClipLoss
    from torch.nn.parallel import DistributedDataParallel

    from pretrain.clip_model import build_clip, build_tokenizer
    from pretrain.clip_task import clip_param_groups
    from pretrain.data import build_train_loader

    join_ddp_group(rank, port)
    cfg = PretrainConfig.model_validate(cfg_tree)
    torch.manual_seed(cfg.train.seed)
    clip = build_clip(cfg.model)
    model = DistributedDataParallel(clip)
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank,
                       world_size=RANKS)
    groups = clip_param_groups(torch.nn.ModuleDict({"clip": clip}), cfg)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=cfg.optimizer.betas,
                                  eps=cfg.optimizer.eps, weight_decay=cfg.optimizer.weight_decay)
    loader = build_train_loader(
        shard_sets=load_mixture(shards), tokenize=build_tokenizer(cfg.model.text.context_length),
        image_size=cfg.model.image.image_size, batch_size=cfg.data.batch_size,
        num_workers=cfg.data.workers, seed=cfg.train.seed, rank=rank,
        shuffle_buffer=cfg.data.shuffle_buffer, shuffle_initial=cfg.data.shuffle_initial,
        scale=cfg.data.scale)
    max_log_scale = math.log(cfg.loss.max_logit_scale)
    start = time.perf_counter()
    for step in range(steps):
        if step == skip:
            dist.barrier()
            start = time.perf_counter()
        batch = next(loader)
        image_features, text_features, logit_scale = model(batch["image"], batch["text"])
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), cfg.optimizer.grad_clip)
        optimizer.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, max_log_scale)  # as open_clip's trainer does
    dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        results.put((steps - skip) * cfg.data.batch_size * RANKS / elapsed)
    dist.destroy_process_group()


def run_ddp(cfg: PretrainConfig, shards: str, steps: int, skip: int) -> float:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(ddp_worker, args=(cfg.model_dump(mode="json"), shards, steps, skip,
                                         free_port(), results),
                       nprocs=RANKS, join=True, start_method="spawn")
    return results.get()


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per side")
    parser.add_argument("--skip", type=int, default=10, help="leading steps left out of timing")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per side")
    parser.add_argument("--samples", type=int, default=2048, help="synthetic pairs to write")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override for both sides")
    args = parser.parse_args(argv)
    if not 0 <= args.skip < args.steps or args.repeats < 1:
        parser.error("--skip must be smaller than --steps, --repeats at least 1")
    cfg = load_config(PretrainConfig, "demo", args.overrides, kind="pretrain")
    rates: dict[str, list[float]] = {"deepspeed": [], "ddp": []}
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        shards = write_synthetic_shards(Path(tmp) / "shards", args.samples, seed=0,
                                        image_size=cfg.model.image.image_size,
                                        samples_per_shard=256, progress=False)
        for repeat in range(args.repeats):
            metrics = run_deepspeed(shards, Path(tmp) / f"run{repeat}", args.steps,
                                    args.overrides)
            rates["deepspeed"].append(deepspeed_rate(metrics, args.skip))
            rates["ddp"].append(run_ddp(cfg, shards, args.steps, args.skip))
    print(f"demo model, {cfg.deepspeed.precision}, {RANKS} CPU ranks (gloo), micro-batch "
          f"{cfg.data.batch_size} per rank, steps {args.skip + 1}..{args.steps} timed, "
          f"best of {args.repeats} interleaved runs")
    labels = {"deepspeed": f"deepspeed (Trainer + ClipTask, ZeRO-{cfg.deepspeed.zero_stage})",
              "ddp": "ddp (DDP + ClipLoss + AdamW)"}
    for side, label in labels.items():
        runs = ", ".join(f"{rate:.1f}" for rate in rates[side])
        print(f"{label:<34}{max(rates[side]):8.1f} samples/s   (runs: {runs})")
    ratio = max(rates["deepspeed"]) / max(rates["ddp"])
    print(f"{'ratio deepspeed / ddp, best runs':<34}{ratio:8.2f}")
    # Each repeat runs both sides back to back, so the per-repeat ratio cancels slow drifts of a
    # shared machine's speed; their median is less at the mercy of one lucky run than best-of.
    per_repeat = [a / b for a, b in zip(rates["deepspeed"], rates["ddp"], strict=True)]
    print(f"{'ratio deepspeed / ddp, median':<34}{statistics.median(per_repeat):8.2f}   (runs: "
          f"{', '.join(f'{r:.2f}' for r in per_repeat)})")


if __name__ == "__main__":
    main()
