"""Evaluations of a CLIP model: zero-shot classification and image-text retrieval.

Both are :class:`~pretrain.engine.task.Evaluator` s, so the same objects run inside training (every
``eval.every`` steps, on every rank over its slice, through the trainer) and on an export
(``python -m pretrain.evaluate``, one process). The module they are given is the trainer's
``ContrastiveTask`` (or any module with a ``clip`` attribute): they call
``module.clip.encode_image`` / ``encode_text``.

* Zero-shot: one text embedding per class, averaged over prompt templates (open_clip's
  ``build_zero_shot_classifier``, computed once per evaluation on every rank), against the
  normalised image embeddings; top-1 and top-5 from counts summed over ranks.
* Retrieval: image and caption embeddings of the whole split are gathered from every rank;
  image-to-text recall@k counts an image as found when any of its captions is among the k
  nearest captions, text-to-image recall@k a caption when its image is among the k nearest
  images.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from PIL import Image
from torch import nn

from pretrain.config import RetrievalEval, ZeroShotEval
from pretrain.engine import distributed
from pretrain.engine.eval_slices import SlicedSplit, image_folder, sliced_loader
from pretrain.engine.images import decode_image
from pretrain.engine.task import Batch, Evaluator

Template = str | Callable[[str], str]
RECALL_AT = (1, 5, 10)


# --------------------------------------------------------------------------- class names, prompts
def imagenet_names_for(wnids: list[str]) -> list[str]:
    """open_clip's ImageNet class names for ImageNet wnids (folder names of ImageNet splits);
    the names are indexed like timm's sorted ImageNet synsets."""
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo().label_names()
    unknown = [w for w in wnids if w not in synsets]
    if unknown:
        raise ValueError(f"classes: imagenet: {len(unknown)} folders are not ImageNet wnids, "
                         f"e.g. {unknown[0]!r} (use classes: folders or a names file)")
    return [IMAGENET_CLASSNAMES[synsets.index(w)] for w in wnids]


def _lines(path: str, what: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what}: no such file {path} (or use a built-in choice)")
    lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what}: {path} is empty")
    return lines


def resolve_classnames(spec: ZeroShotEval, folders: list[str] | None) -> list[str]:
    """The class names of a zero-shot set, in class-index order."""
    classes = spec.classes
    if isinstance(classes, list):
        return classes
    if classes == "folders":
        if folders is None:
            raise ValueError(f"eval {spec.name}: classes: folders needs an image folder")
        return folders
    if classes == "imagenet":
        return imagenet_names_for(folders) if folders is not None else list(IMAGENET_CLASSNAMES)
    return _lines(classes, f"eval {spec.name} classes")


def resolve_templates(spec: ZeroShotEval) -> list[Template]:
    templates = spec.templates
    if isinstance(templates, list):
        result: list[Template] = templates
    elif templates == "openai":
        result = list(OPENAI_IMAGENET_TEMPLATES)
    else:
        result = _lines(templates, f"eval {spec.name} templates")
    bad = [t for t in result if isinstance(t, str) and "{}" not in t]
    if bad:
        raise ValueError(f"eval {spec.name}: template {bad[0]!r} has no {{}} for the class")
    return result


# --------------------------------------------------------------------------- decoding
def _image_of_file(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def _sample_meta(sample: dict[str, Any]) -> dict[str, Any]:
    return json.loads(sample["json"]) if "json" in sample else {}


class _LabelledShardDecoder:
    def __init__(self, transform: Callable, label_key: str, classnames: list[str]) -> None:
        self.transform, self.label_key, self.classnames = transform, label_key, classnames

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        label = _sample_meta(sample)[self.label_key]
        index = self.classnames.index(label) if isinstance(label, str) else int(label)
        if not 0 <= index < len(self.classnames):
            raise ValueError(f"label {label!r} outside the {len(self.classnames)} classes")
        return self.transform(decode_image(sample)), index


class _FolderDecoder:
    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, item: tuple[Path, int]) -> tuple[torch.Tensor, int]:
        path, label = item
        return self.transform(_image_of_file(path)), label


def _collate_labelled(items: list[tuple[torch.Tensor, int]]) -> Batch:
    images, labels = zip(*items, strict=True)
    return {"image": torch.stack(images), "label": torch.tensor(labels)}


class _CaptionedDecoder:
    """Sample -> (image, its captions, its key); captions from the .json's ``captions`` list
    when present (COCO / Flickr style), else the .txt."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, list[str], str]:
        captions = _sample_meta(sample).get("captions")
        if not captions:
            captions = [sample["txt"].decode("utf-8").strip()]
        if not all(isinstance(c, str) and c.strip() for c in captions):
            raise ValueError(f"sample {sample.get('__key__')} has an empty caption")
        return self.transform(decode_image(sample)), captions, str(sample["__key__"])


class _CaptionCollator:
    def __init__(self, tokenize: Callable[[list[str]], torch.Tensor]) -> None:
        self.tokenize = tokenize

    def __call__(self, items: list[tuple[torch.Tensor, list[str], str]]) -> Batch:
        images, captions, keys = zip(*items, strict=True)
        owners = [i for i, texts in enumerate(captions) for _ in texts]
        return {"image": torch.stack(images),
                "text": self.tokenize([t for texts in captions for t in texts]),
                "caption_owner": torch.tensor(owners), "keys": list(keys)}


# --------------------------------------------------------------------------- evaluators
class ZeroShotEvaluator(Evaluator):
    def __init__(self, batches: Iterable[Batch], classnames: list[str],
                 templates: list[Template], tokenizer: Callable) -> None:
        self._batches = batches
        self.classnames, self.templates, self.tokenizer = classnames, templates, tokenizer
        self.k = min(5, len(classnames))
        self.reset()

    def batches(self) -> Iterable[Batch]:
        return self._batches

    def reset(self) -> None:
        self.classifier: torch.Tensor | None = None
        self.counts = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-k hits, images
        self.skipped = 0

    def prepare(self, module: nn.Module) -> None:
        device = next(module.parameters()).device
        classifier = build_zero_shot_classifier(
            module.clip, self.tokenizer, self.classnames, self.templates,
            num_classes_per_batch=10, device=device, use_tqdm=False)
        self.classifier = classifier.float()

    def update(self, module: nn.Module, batch: Batch, counted: bool) -> None:
        features = module.clip.encode_image(batch["image"], normalize=True).float()
        if not counted:
            return
        top = (features @ self.classifier).topk(self.k, dim=1).indices
        hits = top == batch["label"][:, None]
        self.counts += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item(),
                                     len(hits)], dtype=torch.float64)
        self.skipped += int(batch.get("skipped", 0))

    def compute(self) -> dict[str, Any]:
        top1, topk, images, skipped = distributed.all_reduce(
            torch.cat([self.counts, torch.tensor([float(self.skipped)], dtype=torch.float64)]))
        if images == 0:
            raise ValueError("the zero-shot set yielded no image")
        return {"top1": float(top1 / images), f"top{self.k}": float(topk / images),
                "samples": int(images), "skipped": int(skipped)}


class RetrievalEvaluator(Evaluator):
    def __init__(self, batches: Iterable[Batch]) -> None:
        self._batches = batches
        self.reset()

    def batches(self) -> Iterable[Batch]:
        return self._batches

    def reset(self) -> None:
        self.keys: list[str] = []
        self.image_features: list[torch.Tensor] = []
        self.text_features: list[torch.Tensor] = []
        self.owners: list[str] = []  # the image key of each caption

    def update(self, module: nn.Module, batch: Batch, counted: bool) -> None:
        images = module.clip.encode_image(batch["image"], normalize=True).float()
        texts = module.clip.encode_text(batch["text"], normalize=True).float()
        if not counted:
            return
        self.keys += batch["keys"]
        self.owners += [batch["keys"][i] for i in batch["caption_owner"].tolist()]
        self.image_features.append(images.cpu())
        self.text_features.append(texts.cpu())

    def compute(self) -> dict[str, Any]:
        local = (self.keys, self.owners,
                 torch.cat(self.image_features) if self.image_features else torch.zeros(0),
                 torch.cat(self.text_features) if self.text_features else torch.zeros(0))
        parts = [p for p in distributed.all_gather_objects(local) if p[0]]
        if not parts:
            raise ValueError("the retrieval set yielded no image")
        keys = [k for p in parts for k in p[0]]
        owners = [k for p in parts for k in p[1]]
        images = torch.cat([p[2] for p in parts])
        texts = torch.cat([p[3] for p in parts])
        return {**retrieval_recalls(images, texts, keys, owners),
                "images": len(keys), "captions": len(owners)}


def retrieval_recalls(images: torch.Tensor, texts: torch.Tensor, keys: list[str],
                      owners: list[str]) -> dict[str, float]:
    """Recall@k both ways from normalised embeddings; ``owners[j]`` is the key of caption j's
    image. Ties count against the model (a strict ranking)."""
    index = {key: i for i, key in enumerate(keys)}
    if len(index) != len(keys):
        raise ValueError("retrieval images must have unique keys")
    owner = torch.tensor([index[k] for k in owners])
    similarity = images @ texts.T  # images x captions
    results = {}
    for k in RECALL_AT:
        text_top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices  # per image
        found = (owner[text_top] == torch.arange(len(keys))[:, None]).any(dim=1)
        results[f"i2t_r{k}"] = found.float().mean().item()
        image_top = similarity.T.topk(min(k, similarity.shape[0]), dim=1).indices  # per caption
        results[f"t2i_r{k}"] = (image_top == owner[:, None]).any(dim=1).float().mean().item()
    return results


# --------------------------------------------------------------------------- building them
def zero_shot_evaluator(spec: ZeroShotEval, transform: Callable, tokenizer: Callable,
                        batch_size: int, workers: int, rank: int, world_size: int
                        ) -> ZeroShotEvaluator:
    if Path(spec.images).is_dir():
        folders, items = image_folder(spec.images)
        split = SlicedSplit(lambda: items, _FolderDecoder(transform), _collate_labelled,
                            batch_size, rank, world_size, limit=spec.limit)
    else:
        if spec.label_key is None:
            raise ValueError(f"eval {spec.name}: shards need label_key (the .json field)")
        folders = None
        classnames = resolve_classnames(spec, None)
        split = SlicedSplit(spec.images, _LabelledShardDecoder(transform, spec.label_key,
                                                               classnames),
                            _collate_labelled, batch_size, rank, world_size, limit=spec.limit)
    classnames = resolve_classnames(spec, folders)
    return ZeroShotEvaluator(sliced_loader(split, workers), classnames,
                             resolve_templates(spec), tokenizer)


def retrieval_evaluator(spec: RetrievalEval, transform: Callable, tokenizer: Callable,
                        batch_size: int, workers: int, rank: int, world_size: int
                        ) -> RetrievalEvaluator:
    split = SlicedSplit(spec.shards, _CaptionedDecoder(transform), _CaptionCollator(tokenizer),
                        batch_size, rank, world_size, limit=spec.limit)
    return RetrievalEvaluator(sliced_loader(split, workers))


def clip_evaluators(zero_shot: list[ZeroShotEval], retrieval: list[RetrievalEval],
                    transform: Callable, tokenizer: Callable, batch_size: int, workers: int,
                    rank: int, world_size: int) -> dict[str, Evaluator]:
    """Every configured evaluation by name, in config order (zero-shot sets first)."""
    evaluators: dict[str, Evaluator] = {}
    for spec in zero_shot:
        evaluators[spec.name] = zero_shot_evaluator(spec, transform, tokenizer, batch_size,
                                                    workers, rank, world_size)
    for spec in retrieval:
        evaluators[spec.name] = retrieval_evaluator(spec, transform, tokenizer, batch_size,
                                                    workers, rank, world_size)
    return evaluators


__all__ = ["RetrievalEvaluator", "ZeroShotEvaluator", "clip_evaluators", "imagenet_names_for",
           "retrieval_recalls"]
