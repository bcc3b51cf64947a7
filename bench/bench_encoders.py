"""Training throughput of each tiny encoder against DaViT-Tiny, on CPU, in one run.

    python bench/bench_encoders.py [--batch 8] [--size 224] [--repeats 3] [--threads N]

For every model: one forward + backward (sum of logits) on a random batch, timed after a
warm-up step. Repeats are interleaved across models so background load hits all of them alike;
the best repeat is reported as images/s, with the ratio to ``davit_tiny`` measured in the same
process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pretrain.encoders  # noqa: E402,F401  (registers dat_pp_* and dwnet_* with timm)

BASELINE = "davit_tiny"
MODELS = (BASELINE, "dat_pp_tiny", "dwnet_tiny", "dynamic_dwnet_tiny")


def train_step_seconds(model: torch.nn.Module, images: torch.Tensor) -> float:
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    model(images).sum().backward()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if BASELINE not in args.models:
        args.models.insert(0, BASELINE)

    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size)
    models = {name: timm.create_model(name).train() for name in args.models}
    for model in models.values():
        train_step_seconds(model, images)  # warm-up: allocator, oneDNN primitive caches
    best = {name: float("inf") for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            best[name] = min(best[name], train_step_seconds(model, images))

    print(
        f"forward+backward, batch {args.batch}, {args.size}x{args.size}, CPU, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}"
    )
    print(f"{'model':<20}{'images/s':>10}{'vs ' + BASELINE:>16}")
    for name, seconds in best.items():
        throughput = args.batch / seconds
        ratio = best[BASELINE] / seconds
        print(f"{name:<20}{throughput:>10.2f}{ratio:>15.2f}x")


if __name__ == "__main__":
    main()
