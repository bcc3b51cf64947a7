"""Input checks of a detection config, before any process starts (``--check`` and every rank at
start-up): the annotation files and image folders, the encoder weights, and categories that
agree between the splits, in one line each."""

from __future__ import annotations

from pathlib import Path

from finetune.checks import check_encoder, check_files_resolve, evenly_spaced
from finetune.config import DetectionConfig
from finetune.detection.coco import CocoIndex


def check_detection_inputs(cfg: DetectionConfig) -> None:
    """Raise ``FileNotFoundError`` / ``ValueError`` naming the field and file at fault."""
    check_encoder(cfg.encoder)
    data = cfg.data
    indexes = {}
    for split in ("train", "val"):
        annotations = data.path(getattr(data, f"{split}_annotations"))
        images = Path(data.path(getattr(data, f"{split}_images")))
        if not images.is_dir():
            raise FileNotFoundError(f"data.{split}_images: no such folder {images}")
        indexes[split] = CocoIndex(annotations, images)
        check_files_resolve(f"data.{split}_images", images,
                            [indexes[split].listed_path(i)
                             for i in evenly_spaced(indexes[split].image_ids)],
                            f"the file names of {annotations}")
    check_same_categories(indexes["val"], indexes["train"].category_ids,
                          f"the training json's ({indexes['train'].annotation_file})")


def check_same_categories(index: CocoIndex, category_ids: list[int], source: str) -> None:
    """``ValueError`` in one line when a validation json's categories are not ``source``'s
    (labels would map to other classes)."""
    if list(index.category_ids) != list(category_ids):
        extra = sorted(set(index.category_ids) - set(category_ids))
        absent = sorted(set(category_ids) - set(index.category_ids))
        raise ValueError(f"data.val_annotations {index.annotation_file}: its category ids "
                         f"differ from {source}: {len(extra)} only in it (e.g. {extra[:3]}), "
                         f"{len(absent)} missing from it (e.g. {absent[:3]}); validation must "
                         "list the same categories (the original instances_val json does)")
