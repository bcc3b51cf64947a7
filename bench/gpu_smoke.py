"""GPU smoke test: a short pretraining and a short fine-tuning on one device, on generated data,
through the real launchers; prints samples/s, MFU and peak memory, exits non-zero on any failure.

    python bench/gpu_smoke.py                # GPU: bf16, DaViT-T at 224 px, 12-layer text tower
    python bench/gpu_smoke.py --device cpu   # anywhere: fp32, the tests' tiny model (slow)

The GPU run pretrains ``davit_tiny`` (224 px, the recipes' 512-wide 12-layer text tower) for
``--steps`` steps under ZeRO-1 in bf16, exports it, fine-tunes the export as a classifier (with
in-training evaluation) for as many steps, and checks that both losses are finite and fell
(the mean of the last half of the log windows below that of the first half). MFU
divides the model FLOPs per second by the device's peak (``--peak-tflops``, else looked up from
the device name for A100, H100 and H200). Samples/s and MFU are the mean of the log windows
after the first (start-up and compilation excluded). Everything lands in ``--out`` (a temporary
folder by default); ``bench/gpu_smoke.sh`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_tools.synthetic import COLORS, write_synthetic_shards  # noqa: E402
from pretrain.engine.launcher import deepspeed_command  # noqa: E402
from pretrain.engine.run_log import read_training_metrics  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, SXM parts
TINY_IMAGE = "{depths: [1, 1, 1, 1], embed_dims: [16, 32, 48, 64], num_heads: [1, 1, 1, 2]}"


def device_settings(device: str, steps: int) -> tuple[list[str], list[str], int]:
    """(pretraining overrides, fine-tuning overrides, image size) for the device."""
    if device == "gpu":
        size = 224
        pretrain = ["model.image.overrides={}", "model.embed_dim=512", "model.text.width=512",
                    "model.text.heads=8", "model.text.layers=12", "model.text.context_length=77",
                    "data.batch_size=128", "data.workers=6", "deepspeed.precision=bf16",
                    "deepspeed.zero_stage=1"]
        finetune = ["data.batch_size=128", "data.workers=6", "deepspeed.precision=bf16",
                    "eval.batch_size=256"]
    else:
        size = 32
        pretrain = [f"model.image.overrides={TINY_IMAGE}", "model.embed_dim=32",
                    "model.text.width=32", "model.text.heads=2", "model.text.layers=1",
                    "model.text.context_length=16", "data.batch_size=16", "data.workers=1",
                    "deepspeed.precision=fp32", "deepspeed.zero_stage=1"]
        finetune = ["data.batch_size=16", "data.workers=1", "deepspeed.precision=fp32",
                    "eval.batch_size=64"]
    common = [f"schedule.steps={steps}", f"schedule.warmup_steps={max(1, steps // 10)}",
              f"log.every={max(1, steps // 5)}", "log.progress=false",
              f"checkpoint.every={steps}"]
    pretrain += common + [f"model.image.image_size={size}", "data.shuffle_buffer=256",
                          "data.shuffle_initial=64"]
    # the colour labels: learnt in a few steps, so a falling loss is a fair check
    finetune += common + [f"data.image_size={size}", "data.shuffle_buffer=256",
                          "data.shuffle_initial=64", f"eval.every={steps}",
                          "data.label_key=color", f"data.classes=[{', '.join(COLORS)}]",
                          f"data.num_classes={len(COLORS)}"]
    return pretrain, finetune, size


def peak_flops(device: str, given_tflops: float | None) -> float | None:
    if given_tflops:
        return given_tflops * 1e12
    if device != "gpu":
        return None
    import torch

    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def run_job(script: str, args: list[str], overrides: list[str], log: Path) -> float:
    """One rank through the DeepSpeed launcher; raises with the log's tail on failure."""
    command = deepspeed_command(script, [*args, *(x for o in overrides for x in ("--set", o))],
                                ranks=1)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    began = time.perf_counter()
    with log.open("w") as stream:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=stream,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise RuntimeError(f"{script} failed with exit code {result.returncode}:\n{tail}")
    return time.perf_counter() - began


def summarise(name: str, run_dir: Path, wall_s: float) -> dict[str, float]:
    """Throughput and memory of a run's metrics; raises if its loss is not finite or rose."""
    records = read_training_metrics(run_dir / "metrics.jsonl")
    if not records or not all(math.isfinite(r["loss"]) for r in records):
        raise RuntimeError(f"{name}: missing or non-finite losses in {run_dir}")
    half = max(1, len(records) // 2)
    early, late = (sum(r["loss"] for r in part) / len(part)
                   for part in (records[:half], records[-half:]))
    if late >= early:
        raise RuntimeError(f"{name}: loss did not fall (mean {early:.4f} over the first "
                           f"log windows, {late:.4f} over the last)")
    steady = records[1:] or records

    def mean(key: str) -> float | None:
        values = [r[key] for r in steady if key in r]
        return sum(values) / len(values) if values else None

    return {"samples_per_s": mean("samples_per_s"), "mfu": mean("mfu"),
            "peak_memory_gb": max(r["peak_memory_gb"] for r in records),
            "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"], "wall_s": wall_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per job (default: 60 on a GPU, 20 on the CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak bf16 TFLOPs, for MFU")
    parser.add_argument("--out", type=Path, default=None, help="working folder")
    args = parser.parse_args(argv)
    import torch

    device = args.device
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        parser.error("--device gpu: no CUDA device is visible")
    steps = args.steps or (60 if device == "gpu" else 20)
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    out.mkdir(parents=True, exist_ok=True)
    pretrain_overrides, finetune_overrides, size = device_settings(device, steps)
    peak = peak_flops(device, args.peak_tflops)
    if peak:
        pretrain_overrides.append(f"log.peak_flops_per_device={peak}")
        finetune_overrides.append(f"log.peak_flops_per_device={peak}")

    samples = 4096 if device == "gpu" else 512
    print(f"== generating {samples} {size}-px samples per split in {out}", flush=True)
    train = write_synthetic_shards(out / "data/train", samples, 0, image_size=size,
                                   samples_per_shard=512, progress=False)
    labelled = write_synthetic_shards(out / "data/labelled", samples, 2, image_size=size,
                                      samples_per_shard=512, progress=False)
    heldout = write_synthetic_shards(out / "data/heldout", samples // 4, 1, image_size=size,
                                     samples_per_shard=512, progress=False)

    results = {}
    print(f"== pretraining ({device}, {steps} steps)", flush=True)
    pretrain_dir = out / "pretrain"
    wall = run_job("pretrain.py", ["--config", "demo", "--run-dir", str(pretrain_dir)],
                   [f"data.train={train}", *pretrain_overrides], out / "pretrain.log")
    results["pretrain"] = summarise("pretrain", pretrain_dir, wall)

    print(f"== fine-tuning ({device}, {steps} steps)", flush=True)
    finetune_dir = out / "finetune"
    wall = run_job("finetune.py", ["--config", "demo_shapes", "--run-dir", str(finetune_dir)],
                   [f"encoder.weights={pretrain_dir / 'export' / 'encoder.pt'}",
                    f"data.train={labelled}", f"data.val={heldout}", *finetune_overrides],
                   out / "finetune.log")
    results["finetune"] = summarise("finetune", finetune_dir, wall)
    results["finetune"]["eval_top1"] = json.loads(
        (finetune_dir / "eval.json").read_text())["results"]["top1"]

    device_name = torch.cuda.get_device_name() if device == "gpu" else "cpu"
    print(f"\n{'job':<10}{'samples/s':>12}{'MFU':>8}{'peak GB':>10}{'loss':>18}{'wall s':>9}")
    for name, r in results.items():
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"
        print(f"{name:<10}{r['samples_per_s']:>12.1f}{mfu:>8}{r['peak_memory_gb']:>10.2f}"
              f"{loss:>18}{r['wall_s']:>9.0f}")
    print(f"device: {device_name}; fine-tuned top-1 {results['finetune']['eval_top1']:.3f}")
    (out / "smoke.json").write_text(json.dumps({"device": device_name, **results}, indent=2))
    print(f"wrote {out / 'smoke.json'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as error:
        print(f"gpu smoke failed: {error}", file=sys.stderr)
        sys.exit(1)
