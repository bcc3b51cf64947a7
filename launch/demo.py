"""The whole pipeline, small, on this machine: data -> CLIP pretraining -> zero-shot -> fine-tune
-> segmentation -> detection.

    make demo          # or: .venv/bin/python launch/demo.py

Runs with 2 DeepSpeed ranks (CPU + gloo when there is no GPU) and writes everything under
runs/demo/: the pretraining, fine-tuning, segmentation and detection runs, training.png and
summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Python puts this script's folder first on sys.path, where launch/pretrain.py and
# launch/finetune.py would shadow the packages of the same names: take the folder off.
if sys.path and Path(sys.path[0]) == Path(__file__).resolve().parent:
    del sys.path[0]

from data_tools.synthetic import write_synthetic_shards, zero_shot_prompts  # noqa: E402
from pretrain.engine.launcher import deepspeed_command  # noqa: E402
from pretrain.engine.report import format_table, plot_training  # noqa: E402
from pretrain.engine.threads import apply_thread_policy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SPLITS = {  # name: (samples, seed); different seeds give disjoint draws
    "train": (4096, 0),
    "labelled": (2048, 2),
    "heldout": (1024, 1),
}
SEGMENTATION_SPLITS = (200, 40)  # synthetic ADE-layout training / held-out images (5 classes)
DETECTION_SPLITS = (64, 16)  # generated COCO training / held-out images (3 shape categories)


def run_deepspeed(script: str, args: list[str], num_ranks: int) -> None:
    command = deepspeed_command(script, args, num_ranks)
    print("+", " ".join(command), flush=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning"}
    subprocess.run(command, cwd=ROOT, env=env, check=True)


def _finetune(config: str, run_dir: Path, pretrain_dir: Path, num_ranks: int,
              *overrides: str) -> dict:
    """Fine-tune the pretrained encoder with ``config``; returns its final evaluation."""
    settings = [f"encoder.weights={pretrain_dir / 'export' / 'encoder.pt'}", *overrides]
    run_deepspeed("finetune.py", ["--config", config, "--run-dir", str(run_dir),
                                  *(x for o in settings for x in ("--set", o))], num_ranks)
    return json.loads((run_dir / "eval.json").read_text())["results"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args(argv)
    apply_thread_policy()  # zero-shot evaluation runs in this process; the jobs choose their own
    began = time.perf_counter()
    out, data = ROOT / args.out, ROOT / args.data
    if out.exists():
        # The demo always starts afresh (resuming is what --run-dir does in the real launchers).
        print(f"removing the previous demo run in {out}", flush=True)
        shutil.rmtree(out)

    print("== 1/6 synthetic data", flush=True)
    patterns = {name: write_synthetic_shards(data / name, count, seed)
                for name, (count, seed) in SPLITS.items()}

    print("== 2/6 CLIP pretraining (DeepSpeed)", flush=True)
    pretrain_dir = out / "pretrain"
    run_deepspeed("pretrain.py", ["--config", "demo", "--run-dir", str(pretrain_dir),
                                  "--set", f"data.train={patterns['train']}"], args.ranks)

    print("== 3/6 zero-shot evaluation", flush=True)
    from pretrain.evaluate import zero_shot_accuracy

    prompts = {field: zero_shot_prompts(field) for field in ("color", "shape")}
    zero_shot = zero_shot_accuracy(pretrain_dir / "export" / "clip.pt", patterns["heldout"],
                                   prompts)

    print("== 4/6 fine-tuning a shape classifier (DeepSpeed)", flush=True)
    finetune_dir = out / "finetune"
    finetune = _finetune("demo_shapes", finetune_dir, pretrain_dir, args.ranks,
                         f"data.train={patterns['labelled']}", f"data.val={patterns['heldout']}")

    print("== 5/6 segmentation: UPerNet on synthetic ADE-layout data (DeepSpeed)", flush=True)
    from finetune.segmentation.synthetic import write_synthetic_ade

    segmentation_dir = out / "segmentation"
    segmentation_data = write_synthetic_ade(data / "segmentation", *SEGMENTATION_SPLITS)
    segmentation = _finetune("ade20k/demo", segmentation_dir, pretrain_dir, args.ranks,
                             f"data.root={segmentation_data}")

    print("== 6/6 detection: Mask R-CNN on a generated COCO (DeepSpeed)", flush=True)
    from data_tools.coco_synthetic import write_synthetic_coco

    detection_data = write_synthetic_coco(data / "coco", *DETECTION_SPLITS, seed=0)
    detection = _finetune("coco/demo", out / "detection", pretrain_dir, args.ranks,
                          f"data.root={detection_data}")

    plot_training(pretrain_dir / "metrics.jsonl", out / "training.png",
                  title="demo CLIP pretraining (2 ranks, DeepSpeed)")
    summary = _summary(pretrain_dir, zero_shot, finetune, segmentation, detection,
                       time.perf_counter() - began)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_table([(k, f"{v:.4f}" if isinstance(v, float) else str(v))
                        for k, v in summary.items()]))
    print(f"\nwrote {out / 'summary.json'} and {out / 'training.png'}")
    return 0


def _summary(pretrain_dir: Path, zero_shot: dict, finetune: dict, segmentation: dict,
             detection: dict, wall_s: float) -> dict:
    from pretrain.engine.run_log import read_training_metrics

    records = read_training_metrics(pretrain_dir / "metrics.jsonl")
    steady = records[1:] or records  # the first window includes start-up
    return {
        "zero_shot_top1_color": zero_shot["zero_shot_top1_color"],
        "zero_shot_top1_shape": zero_shot["zero_shot_top1_shape"],
        "finetune_top1_shape": finetune["top1"],
        "chance_color": 1 / 8,
        "chance_shape": 1 / 3,
        "segmentation_miou_heldout": segmentation["mIoU"],
        "segmentation_aacc_heldout": segmentation["aAcc"],
        "detection_box_ap_heldout": detection["bbox/AP"],
        "detection_mask_ap_heldout": detection["segm/AP"],
        "pretrain_steps": records[-1]["step"],
        "pretrain_samples_seen": records[-1]["samples_seen"],
        "pretrain_final_loss": records[-1]["loss"],
        "train_samples_per_s": sum(r["samples_per_s"] for r in steady) / len(steady),
        "wall_s": wall_s,
    }


if __name__ == "__main__":
    sys.exit(main())
