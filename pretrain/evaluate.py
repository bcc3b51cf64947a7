"""Zero-shot evaluation of an exported CLIP model on labelled held-out shards.

Classifiers are built with open_clip's ``build_zero_shot_classifier``: one text embedding per
class, averaged over prompt templates. For the synthetic shapes, the templates for a colour
are the training caption phrasing with every shape and background filled in (a prompt
ensemble, like OpenAI's ImageNet templates), and the same for a shape.

    python -m pretrain.evaluate --export runs/demo/pretrain/export/clip.pt \
        --shards "data/demo/heldout/{00000..00001}.tar"
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from data_tools.synthetic import COLORS, SHAPES, caption_for
from pretrain.data import eval_transform, ordered_dataset
from pretrain.export import load_exported_clip
from pretrain.models.clip import build_tokenizer


def synthetic_templates(attribute: str) -> tuple[list[str], list[str]]:
    """Class names and format templates ("{}" = the class) for ``color`` or ``shape``."""
    if attribute == "color":
        templates = [caption_for("{}", shape, background)
                     for shape in SHAPES for background in COLORS]
        return list(COLORS), templates
    if attribute == "shape":
        templates = [caption_for(color, "{}", background)
                     for color in COLORS for background in COLORS if background != color]
        return list(SHAPES), templates
    raise ValueError(f"unknown attribute {attribute!r}: expected 'color' or 'shape'")


def load_labelled(pattern: str, transform: Callable, limit: int | None = None
                  ) -> tuple[torch.Tensor, list[dict]]:
    """Images (transformed) and metadata of labelled shards, in shard order."""
    dataset = ordered_dataset(pattern).decode("pil")
    images, metas = [], []
    for sample in dataset:
        images.append(transform(sample["jpg"].convert("RGB")))
        metas.append(sample["json"])
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"no samples in {pattern}")
    return torch.stack(images), metas


@torch.no_grad()
def encode_images(clip: torch.nn.Module, images: torch.Tensor, batch_size: int = 256
                  ) -> torch.Tensor:
    chunks = images.split(batch_size)
    return torch.cat([clip.encode_image(chunk, normalize=True) for chunk in chunks])


@torch.no_grad()
def zero_shot_top1(clip: torch.nn.Module, tokenizer: Callable, image_features: torch.Tensor,
                   labels: list[str], classnames: list[str], templates: list[str]) -> float:
    weights = build_zero_shot_classifier(clip, tokenizer, classnames, templates,
                                         num_classes_per_batch=None)
    predictions = (image_features @ weights).argmax(dim=1)
    targets = torch.tensor([classnames.index(label) for label in labels])
    return (predictions == targets).float().mean().item()


def evaluate_synthetic(export_path: str, shards: str, limit: int | None = None
                       ) -> dict[str, float]:
    clip, model_cfg = load_exported_clip(export_path)
    tokenizer = build_tokenizer(model_cfg.text.context_length)
    images, metas = load_labelled(shards, eval_transform(model_cfg.image.image_size), limit)
    features = encode_images(clip, images)
    results = {}
    for attribute in ("color", "shape"):
        classnames, templates = synthetic_templates(attribute)
        labels = [meta[attribute] for meta in metas]
        results[f"zero_shot_top1_{attribute}"] = zero_shot_top1(
            clip, tokenizer, features, labels, classnames, templates)
    results["zero_shot_samples"] = len(metas)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Zero-shot top-1 on labelled synthetic shards")
    parser.add_argument("--export", required=True, help="clip.pt written by pretrain.export")
    parser.add_argument("--shards", required=True, help="brace pattern of held-out shards")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(evaluate_synthetic(args.export, args.shards, args.limit), indent=2))


if __name__ == "__main__":
    main()
