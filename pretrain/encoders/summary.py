"""Parameters and multiply-accumulates of every registered encoder next to the published figures.

    python -m pretrain.encoders.summary [--published PATH] [--size 224]

Models are built on the meta device, so even DaViT-Giant costs no memory; MACs are counted with
``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) over one forward pass. Like fvcore,
it counts convolutions and matrix products and ignores normalisation, activations, softmax and
``grid_sample``; the papers' "FLOPs" are multiply-accumulates counted the same way.

DAT++'s neighbourhood attention runs as dense products of query tiles with key regions and masks
what lies outside each window; the table reports the architecture's MACs (k*k keys per query),
and a last column the masked products that the tiled computation executes on top.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from pretrain.encoders import ENCODERS
from pretrain.encoders.dat import NeighborhoodAttention, neighbourhood_macs
from pretrain.published import published


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int  # the architecture's multiply-accumulates
    masked_macs: int  # executed on top of ``macs`` by tiled neighbourhood attention


def measure(name: str, size: int = 224) -> Cost:
    """Parameter count and MACs of one forward pass of ``name`` on a (1, 3, size, size) input."""
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        image = torch.empty(1, 3, size, size)
    masked = []

    def count_masked(module: NeighborhoodAttention, inputs: tuple[torch.Tensor]) -> None:
        batch, channels, height, width = inputs[0].shape
        executed, exact = neighbourhood_macs(batch, channels, height, width, module.kernel_size)
        masked.append(executed - exact)

    for module in model.modules():
        if isinstance(module, NeighborhoodAttention):
            module.register_forward_pre_hook(count_masked)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)
    params = sum(p.numel() for p in model.parameters())
    executed = counter.get_total_flops() // 2
    return Cost(params=params, macs=executed - sum(masked), masked_macs=sum(masked))


def load_published(path: Path | None = None) -> dict[str, dict]:
    """ImageNet-1k figures per model name (params_m, flops_g in MACs, ...): the project's own
    (:mod:`pretrain.published`), or those of another YAML file of the same layout."""
    if path is None:
        return published("classification_imagenet1k")
    return yaml.safe_load(path.read_text())["classification_imagenet1k"]


def _relative(ours: float, published: float | None) -> str:
    if published is None:
        return "-"
    return f"{100.0 * (ours - published) / published:+.1f}%"


def table(published: dict[str, dict], size: int = 224) -> str:
    header = (
        f"{'model':<20}{'params M':>10}{'published':>11}{'diff':>8}"
        f"{'GMACs':>9}{'published':>11}{'diff':>8}{'masked GMACs':>14}"
    )
    lines = [header, "-" * len(header)]
    for name in ENCODERS:
        cost = measure(name, size)
        figures = published.get(name, {})
        params_m, gmacs = cost.params / 1e6, cost.macs / 1e9
        ref_params, ref_macs = figures.get("params_m"), figures.get("flops_g")
        lines.append(
            f"{name:<20}{params_m:>10.2f}{_fmt(ref_params):>11}{_relative(params_m, ref_params):>8}"
            f"{gmacs:>9.2f}{_fmt(ref_macs):>11}{_relative(gmacs, ref_macs):>8}"
            f"{cost.masked_macs / 1e9:>14.2f}"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--published", type=Path, default=None,
                        help="YAML of published figures (default: the project's own)")
    parser.add_argument("--size", type=int, default=224, help="square input side in pixels")
    args = parser.parse_args(argv)
    # The published figures are for 224x224 inputs only.
    published = load_published(args.published) if args.size == 224 else {}
    if not published:
        print(f"(no published figures for {args.size}x{args.size}; measurements only)")
    print(table(published, args.size))


if __name__ == "__main__":
    main()
