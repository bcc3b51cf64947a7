"""This pipeline against open_clip_train on the same model, data, batch, precision and ranks.

    python bench/bench_open_clip_peer.py [--precision fp32 bf16] [--steps 12] [--skip 4]
                                         [--repeats 3] [--batch 8] [--image-size 256]
    python bench/bench_open_clip_peer.py --gpu      # one GPU, bf16, with MFU for both sides

Both sides train the same CLIP: timm ``davit_tiny`` image tower (avg pool, linear projection)
and the 12-layer, 512-wide, 8-head text tower of 77 tokens, embed_dim 512
(``configs/pretrain/davit_tiny.yaml``; open_clip gets the same architecture as a model config
registered from a temporary JSON). Same generated shards (``data_tools.synthetic``, 256-px JPEGs),
same image size (224 px by default), same per-rank batch, same loss (open_clip's ``ClipLoss``
with local loss and gather with grad), same AdamW hyper-parameters and gradient clipping, one
data worker per rank, 2 CPU ranks over gloo.

Each side starts the way its own README tells a user to start it, with this process's
environment as it is (no thread or other variable added):

* ``ours``: ``deepspeed --num_gpus 2 launch/pretrain.py --config davit_tiny --run-dir ...
  --set ...`` (the README's command), with the config's defaults (ZeRO stage, loader, thread
  policy) except the data, batch, size, precision, schedule length and ``log.every=1``: its
  per-step ``metrics.jsonl`` records give the rate (one tiny all-reduce a step, noise against
  seconds-long steps), and wandb off (``--set log.wandb.mode=disabled``).
* ``open_clip``: ``torchrun --nproc_per_node 2`` (open_clip's README), whose script is this file
  in ``--open-clip-worker`` mode: a CPU shim that then calls ``open_clip_train.main.main`` with
  the arguments open_clip's README uses. The shim changes nothing of the speed: DDP gets no
  ``device_ids`` on a CPU module; ``pandas`` (imported for CSV datasets only, not installed
  here) is stubbed when missing; webdataset 1.0's end-of-shard markers are turned off for
  open_clip's webdataset-0.2 sample grouping; the davit_tiny config is registered; and the time
  of each call of its LR scheduler (once at the start of every step) is written to a JSON file:
  step ``i`` lasts from its call to the next. torchrun gives each rank one intra-op thread when
  the user set no thread count (it says so in a warning); the runs start in their own directory
  because torchrun's parser reads open_clip's ``--logs`` as an ambiguous abbreviation of its own
  ``--logs-specs`` (open_clip's default ``./logs`` is used instead).

fp32 is fp32 on both sides; bf16 is each stack's bf16: DeepSpeed's ``bf16`` section (bf16
weights and activations, fp32 master weights in the optimizer) against open_clip's
``--precision amp_bf16`` (fp32 weights under ``torch.autocast``).

The first ``--skip`` steps are start-up and are not timed. The sides run ``--repeats`` times,
interleaved (and in alternating order) per precision; the printed ratio is the median of the
per-repeat ratios ours / open_clip. ``--phases`` adds a per-step breakdown of both sides
(data wait, forward, backward, optimizer, collectives) measured by wrapping their calls; it
synchronises the GPU around each phase there, so it is for profiling, not for the ratio.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL_NAME = "davit_tiny_peer_bench"
# Peak dense bf16 FLOP/s per GPU for MFU, by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
             "L4": 121e12, "4090": 165e12}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def user_environment() -> dict[str, str]:
    """This process's environment, as a user's shell would hand it to either launcher."""
    return dict(os.environ)


def open_clip_model_config(image_size: int) -> dict:
    """davit_tiny CLIP as ``pretrain.clip_model.build_clip`` builds it for davit_tiny.yaml."""
    return {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "davit_tiny", "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": "linear", "timm_drop_path": 0.0,
                       "image_size": image_size},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                     "layers": 12},
    }


# --------------------------------------------------------------------------- phase timers
class PhaseTimer:
    """Accumulates wall time per named phase and per step (``--phases``)."""

    def __init__(self, sync) -> None:  # noqa: ANN001
        self.sync = sync
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = {}
        self.depth = 0

    def wrap(self, name: str, fn):  # noqa: ANN001, ANN201
        timer = self

        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if timer.depth:  # nested (e.g. an all-reduce inside backward): count it as its own
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                timer.current[name] = timer.current.get(name, 0.0) + time.perf_counter() - start
                return out
            timer.sync()
            timer.depth += 1
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                timer.sync()
            finally:
                timer.depth -= 1
            timer.current[name] = timer.current.get(name, 0.0) + time.perf_counter() - start
            return out

        return wrapped

    def next_step(self) -> None:
        self.steps.append(self.current)
        self.current = {}


def _wrap_collectives(timer: PhaseTimer) -> None:
    import torch.distributed as dist

    for name in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_gather",
                 "reduce_scatter", "broadcast", "reduce"):
        if hasattr(dist, name):
            setattr(dist, name, timer.wrap("collectives", getattr(dist, name)))


def _sync_fn():  # noqa: ANN202
    import torch

    return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


# --------------------------------------------------------------------------- open_clip worker
def patch_open_clip_train() -> None:
    """What open_clip_train needs to import and read shards with this environment's packages."""
    try:
        import pandas  # noqa: F401
    except ImportError:  # open_clip_train.data imports it for CSV datasets only; not a dependency
        import types

        sys.modules["pandas"] = types.ModuleType("pandas")
    from open_clip_train import data as oc_data

    # webdataset 1.0 ends each shard's file stream with an empty "end of shard" dict, which
    # open_clip's group_by_keys_nothrow (written for webdataset 0.2) reads as a file and fails on.
    expander = oc_data.tar_file_expander
    if not getattr(expander, "_peer_patched", False):
        def patched(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            return expander(*args, **{**kwargs, "eof_value": None})

        patched._peer_patched = True
        oc_data.tar_file_expander = patched


def open_clip_worker(argv: list[str]) -> None:
    """One rank of open_clip_train.main, with what it needs on a CPU.

    ``argv``: TIMES_JSON MODEL_CONFIG_DIR PHASES(0|1), then open_clip_train's arguments."""
    import open_clip
    import torch
    from torch.nn.parallel import DistributedDataParallel

    patch_open_clip_train()
    from open_clip_train import main as oc_main
    from open_clip_train import train as oc_train

    times_path, config_dir, phases, argv = argv[0], Path(argv[1]), argv[2] == "1", argv[3:]
    open_clip.add_model_config(config_dir)
    rank = int(os.environ.get("RANK", "0"))

    class CpuSafeDDP(DistributedDataParallel):
        """DDP refuses ``device_ids`` for a CPU module; open_clip passes ``[device]`` always."""

        def __init__(self, module, device_ids=None, **kwargs):  # noqa: ANN001, ANN003
            if device_ids and torch.device(device_ids[0]).type == "cpu":
                device_ids = None
            super().__init__(module, device_ids=device_ids, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuSafeDDP
    stamps: list[float] = []
    timer = PhaseTimer(_sync_fn()) if phases else None

    def write() -> None:
        if rank == 0:
            Path(times_path).write_text(json.dumps(
                {"stamps": stamps, "phases": timer.steps if timer else []}))

    schedulers = {name: getattr(oc_main, name) for name in ("cosine_lr", "const_lr")}

    def timed_scheduler(make):  # noqa: ANN001, ANN202
        def build(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            inner = make(*args, **kwargs)

            def step(i):  # noqa: ANN001, ANN202
                _sync_fn()()
                stamps.append(time.perf_counter())
                if timer is not None and stamps[:-1]:
                    timer.next_step()
                write()
                return inner(i)

            return step

        return build

    for name, make in schedulers.items():
        setattr(oc_main, name, timed_scheduler(make))

    if timer is not None:
        original_train = oc_train.train_one_epoch

        def train_one_epoch(model, data, loss, epoch, optimizer, *rest, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            model.forward = timer.wrap("forward", model.forward)
            loss.forward = timer.wrap("loss", loss.forward)
            optimizer.step = timer.wrap("optimizer", optimizer.step)
            oc_train.backward = timer.wrap("backward", oc_train.backward)
            torch.nn.utils.clip_grad_norm_ = timer.wrap("optimizer", torch.nn.utils.clip_grad_norm_)
            _wrap_collectives(timer)
            dataloader = data["train"].dataloader
            real_iter = type(dataloader).__iter__

            def timed_iter(self):  # noqa: ANN001, ANN202
                iterator = real_iter(self)
                while True:
                    start = time.perf_counter()
                    try:
                        item = next(iterator)
                    except StopIteration:
                        return
                    timer.current["data"] = (timer.current.get("data", 0.0)
                                             + time.perf_counter() - start)
                    yield item

            type(dataloader).__iter__ = timed_iter
            return original_train(model, data, loss, epoch, optimizer, *rest, **kwargs)

        oc_main.train_one_epoch = train_one_epoch
    try:
        oc_main.main(argv)
    finally:
        write()


# --------------------------------------------------------------------------- our worker (phases)
def ours_worker(argv: list[str]) -> None:
    """``launch/pretrain.py`` with the Trainer's calls timed (``--phases`` only).

    ``argv``: TIMES_JSON, then launch/pretrain.py's arguments."""
    import runpy

    from pretrain.engine import trainer as engine_module

    times_path, argv = argv[0], argv[1:]
    timer = PhaseTimer(_sync_fn())
    rank = int(os.environ.get("RANK", "0"))
    original_init = engine_module.Trainer.__init__
    original_step = engine_module.Trainer.train_step

    def init(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        original_init(self, *args, **kwargs)
        engine = self.engine
        engine.forward = timer.wrap("forward", engine.forward)
        engine.backward = timer.wrap("backward", engine.backward)
        engine.step = timer.wrap("optimizer", engine.step)
        loader = self.loader
        real_next = type(loader).__next__

        class TimedLoader(type(loader)):
            def __next__(self):  # noqa: ANN204
                start = time.perf_counter()
                item = real_next(self)
                timer.current["data"] = timer.current.get("data", 0.0) + time.perf_counter() - start
                return item

        loader.__class__ = TimedLoader
        _wrap_collectives(timer)

    def train_step(self, window):  # noqa: ANN001, ANN202
        out = original_step(self, window)
        timer.next_step()
        if rank == 0:
            Path(times_path).write_text(json.dumps({"phases": timer.steps}))
        return out

    engine_module.Trainer.__init__ = init
    engine_module.Trainer.train_step = train_step
    sys.argv = [str(ROOT / "launch" / "pretrain.py"), *argv]
    runpy.run_path(str(ROOT / "launch" / "pretrain.py"), run_name="__main__")


# --------------------------------------------------------------------------- sides
class Setup:
    def __init__(self, args: argparse.Namespace, tmp: Path, shards: str, num_shards: int) -> None:
        self.args, self.tmp, self.shards, self.num_shards = args, tmp, shards, num_shards
        self.ranks = 1 if args.gpu else 2
        self.model_dir = tmp / "open_clip_models"
        self.model_dir.mkdir(exist_ok=True)
        (self.model_dir / f"{MODEL_NAME}.json").write_text(
            json.dumps(open_clip_model_config(args.image_size)))
        self.counter = 0

    def fresh_dir(self, name: str) -> Path:
        self.counter += 1
        return self.tmp / f"{name}{self.counter}"


def run_ours(setup: Setup, precision: str) -> dict:
    args = setup.args
    run_dir = setup.fresh_dir("ours")
    times = run_dir.with_suffix(".times.json")
    script_args = [
        "--config", "davit_tiny", "--run-dir", str(run_dir),
        *[a for item in [
            f"data.train={setup.shards}", f"data.batch_size={args.batch}",
            f"data.workers={args.workers}", f"model.image.image_size={args.image_size}",
            f"deepspeed.precision={precision}", f"schedule.steps={args.steps}",
            "schedule.warmup_steps=1", "log.every=1", "log.progress=false",
            "log.wandb.mode=disabled", f"checkpoint.every={10 * args.steps}",
            *args.ours_set] for a in ("--set", item)],
    ]
    launcher = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus",
                str(setup.ranks), "--master_port", str(free_port())]
    if args.phases:
        command = [*launcher, str(Path(__file__).resolve()), "--ours-worker", str(times),
                   *script_args]
    else:
        command = [*launcher, str(ROOT / "launch" / "pretrain.py"), *script_args]
    launched = time.time()
    result = subprocess.run(command, cwd=ROOT, env=user_environment(), capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"our run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip() and "samples_per_s" in line]
    global_batch = args.batch * setup.ranks
    seconds = [global_batch / r["samples_per_s"] for r in records if r["step"] > args.skip]
    out = {"rate": len(seconds) * global_batch / sum(seconds), "step_s": seconds,
           "losses": [r["loss"] for r in records],
           "startup_s": records[0]["time"] - launched,  # to the end of step 1
           "wall_s": time.time() - launched}
    if args.phases and times.exists():
        out["phases"] = json.loads(times.read_text())["phases"][args.skip:]
    return out


def run_open_clip(setup: Setup, precision: str) -> dict:
    args = setup.args
    logs = setup.fresh_dir("open_clip")
    times = logs.with_suffix(".times.json")
    global_batch = args.batch * setup.ranks
    logs.mkdir(parents=True)
    oc_args = [
        "--train-data", setup.shards, "--dataset-type", "webdataset",
        "--train-num-samples", str(args.steps * global_batch), "--epochs", "1",
        "--model", MODEL_NAME, "--batch-size", str(args.batch), "--workers", str(args.workers),
        "--precision", {"bf16": "amp_bf16", "fp32": "fp32"}[precision],
        "--lr", "5e-4", "--wd", "0.2", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
        "--warmup", "1", "--grad-clip-norm", "1.0", "--local-loss", "--gather-with-grad",
        "--seed", "0", "--name", "bench",
        "--save-frequency", "0", "--log-every-n-steps", "1000", "--zeroshot-frequency", "0",
        "--device", "cuda" if args.gpu else "cpu",
    ]
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", str(setup.ranks), "--master_port",
               str(free_port()), str(Path(__file__).resolve()), "--open-clip-worker",
               str(times), str(setup.model_dir), "1" if args.phases else "0", *oc_args]
    # open_clip writes ./logs/bench (its default --logs, see the module docstring)
    launched = time.perf_counter()  # CLOCK_MONOTONIC: the same clock as the worker's stamps
    result = subprocess.run(command, cwd=logs, env=user_environment(), capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"open_clip run failed:\n{result.stdout[-3000:]}\n"
                         f"{result.stderr[-3000:]}")
    data = json.loads(times.read_text())
    stamps = data["stamps"]
    seconds = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][args.skip:]
    out = {"rate": len(seconds) * global_batch / sum(seconds), "step_s": seconds,
           "startup_s": stamps[1] - launched,  # to the end of step 1 (the start of step 2)
           "wall_s": time.perf_counter() - launched}
    if args.phases:
        out["phases"] = data["phases"][args.skip:]
    return out


def mean_phases(steps: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({k for s in steps for k in s})
    return {n: statistics.mean(s.get(n, 0.0) for s in steps) for n in names}


def flops_per_sample(image_size: int) -> float:
    from pretrain.config import PretrainConfig
    from pretrain.engine.config import load_config
    from pretrain.flops import train_flops_per_sample

    cfg = load_config(PretrainConfig, "davit_tiny", [f"model.image.image_size={image_size}"],
                      kind="pretrain")
    return train_flops_per_sample(cfg.model)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    worker_args = [a for a in argv if not a.startswith("--local_rank")]  # DeepSpeed's launcher
    if worker_args and worker_args[0] == "--open-clip-worker":
        return open_clip_worker(worker_args[1:])
    if worker_args and worker_args[0] == "--ours-worker":
        return ours_worker(worker_args[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"],
                        default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=12, help="training steps per run")
    parser.add_argument("--skip", type=int, default=4, help="leading steps left out of timing")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per side")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per rank")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=1, help="data workers per rank")
    parser.add_argument("--samples", type=int, default=1024, help="synthetic pairs to write")
    parser.add_argument("--gpu", action="store_true",
                        help="one GPU rank, bf16; prints MFU for both sides")
    parser.add_argument("--phases", action="store_true", help="per-step phase breakdown")
    parser.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for our side (to measure a lever)")
    parser.add_argument("--sides", nargs="+", choices=["ours", "open_clip"],
                        default=["ours", "open_clip"], help="run only these (no ratio)")
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    args = parser.parse_args(argv)
    if args.gpu:
        args.precision = ["bf16"] if args.precision == ["fp32", "bf16"] else args.precision
    if not 0 <= args.skip < args.steps - 1:
        parser.error("--skip must be smaller than --steps - 1")
    if "OMP_NUM_THREADS" in os.environ:
        print(f"note: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} is set in this shell and "
              "reaches both sides: the figures are not those of a fresh shell", flush=True)

    from data_tools.synthetic import write_synthetic_shards

    results: dict[str, dict[str, list[dict]]] = {
        p: {"ours": [], "open_clip": []} for p in args.precision}
    with tempfile.TemporaryDirectory(prefix="bench_peer_") as tmp_name:
        tmp = Path(tmp_name)
        num_shards = 8
        shards = write_synthetic_shards(tmp / "shards", args.samples, seed=0,
                                        image_size=args.image_size,
                                        samples_per_shard=args.samples // num_shards,
                                        progress=False)
        setup = Setup(args, tmp, shards, num_shards)
        for repeat in range(args.repeats):
            for precision in args.precision:
                order = [("ours", run_ours), ("open_clip", run_open_clip)]
                order = [(side, run) for side, run in order if side in args.sides]
                for side, run in order if repeat % 2 == 0 else order[::-1]:
                    outcome = run(setup, precision)
                    results[precision][side].append(outcome)
                    print(f"  repeat {repeat} {precision} {side:<9} {outcome['rate']:6.2f} "
                          f"samples/s", flush=True)
    load = os.getloadavg()
    device = ("1 GPU" if args.gpu else
              "2 CPU ranks (gloo; deepspeed launcher vs torchrun, each with its own threads)")
    print(f"davit_tiny CLIP (12x512 text), {args.image_size} px, batch {args.batch} per rank, "
          f"{device}, {args.workers} data worker(s) per rank, steps {args.skip + 1}.."
          f"{args.steps - 1} timed, {args.repeats} interleaved repeats; load average now "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    flops = flops_per_sample(args.image_size) if args.gpu else None
    peak = None
    if args.gpu:
        import torch

        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    for precision, sides in results.items():
        for side, runs in sides.items():
            rates = [r["rate"] for r in runs]
            if not rates:
                continue
            startup = statistics.median(r["startup_s"] for r in runs)
            wall = statistics.median(r["wall_s"] for r in runs)
            line = (f"{precision} {side:<10}median {statistics.median(rates):6.2f} samples/s  "
                    f"(runs: {', '.join(f'{x:.2f}' for x in rates)}); launch to the end of "
                    f"step 1 {startup:.1f} s, whole run {wall:.1f} s")
            if flops and peak:
                line += f"  MFU {statistics.median(rates) * flops / peak:.3f}"
            print(line)
        if len(args.sides) == 2:
            per_repeat = [a["rate"] / b["rate"]
                          for a, b in zip(sides["ours"], sides["open_clip"], strict=True)]
            print(f"{precision} ratio ours / open_clip, median "
                  f"{statistics.median(per_repeat):.2f}  "
                  f"(runs: {', '.join(f'{r:.2f}' for r in per_repeat)})")
        if args.phases:
            for side, runs in sides.items():
                if not runs:
                    continue
                phases = mean_phases([s for r in runs for s in r.get("phases", [])])
                step = statistics.median(s for r in runs for s in r["step_s"])
                parts = ", ".join(f"{k} {v:.3f}" for k, v in phases.items())
                print(f"{precision} {side:<10}per step (s): total {step:.3f}: {parts}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
