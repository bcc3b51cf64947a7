"""Zero-shot classification of an exported CLIP model on labelled held-out shards.

A classifier is built with open_clip's ``build_zero_shot_classifier``: one text embedding per
class, averaged over prompt templates. Class names and templates come from the caller (the demo
passes its synthetic shapes' prompts; a prompts file gives any others).

    python -m pretrain.evaluate --export runs/demo/pretrain/export/clip.pt \\
        --shards "data/demo/heldout/{00000..00001}.tar" --label-key color --prompts prompts.json

``prompts.json`` holds ``{"classnames": [...], "templates": ["a photo of a {}.", ...]}``; the
label field of each sample's ``.json`` holds its class name.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from pretrain.data import eval_transform, ordered_dataset
from pretrain.export import load_exported_clip
from pretrain.models.clip import build_tokenizer


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


def zero_shot_accuracy(export_path: str | Path, shards: str,
                       prompts: dict[str, tuple[list[str], list[str]]],
                       limit: int | None = None) -> dict[str, float]:
    """Top-1 of the export for each label field of ``prompts`` (field -> (class names,
    templates)), over the same images: ``{"zero_shot_top1_<field>": ..., "zero_shot_samples"}``.
    """
    clip, model_cfg = load_exported_clip(export_path)
    tokenizer = build_tokenizer(model_cfg.text.context_length)
    images, metas = load_labelled(shards, eval_transform(model_cfg.image.image_size), limit)
    features = encode_images(clip, images)
    results = {}
    for field, (classnames, templates) in prompts.items():
        labels = [meta[field] for meta in metas]
        results[f"zero_shot_top1_{field}"] = zero_shot_top1(
            clip, tokenizer, features, labels, classnames, templates)
    results["zero_shot_samples"] = len(metas)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Zero-shot top-1 on labelled shards")
    parser.add_argument("--export", required=True, help="clip.pt written by pretrain.export")
    parser.add_argument("--shards", required=True, help="brace pattern of held-out shards")
    parser.add_argument("--label-key", required=True, help="field of each sample's .json")
    parser.add_argument("--prompts", required=True, type=Path,
                        help='JSON file: {"classnames": [...], "templates": [...]}')
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    prompts = json.loads(args.prompts.read_text())
    result = zero_shot_accuracy(args.export, args.shards, {
        args.label_key: (prompts["classnames"], prompts["templates"])}, args.limit)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
