"""The fine-tuning tasks by name: what ``task:`` in a config selects.

For each task: how to check the inputs its config names before any process starts (``--check``
on a login node, and every rank at start-up), and how to build its
:class:`~pretrain.engine.task.Task`.
Task modules are imported only when used, so checking a config imports no DeepSpeed.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

from data_tools.mixture import load_mixture, shard_set
from finetune.config import (
    ClassificationConfig,
    DetectionConfig,
    EncoderConfig,
    SegmentationConfig,
)
from pretrain.engine.config import JobConfig
from pretrain.engine.task import Task

TASK_CLASSES = {"classification": "finetune.classification.task:ClassificationTask",
                "segmentation": "finetune.segmentation.task:SegmentationTask",
                "detection": "finetune.detection.task:DetectionTask"}


def task_class(cfg: JobConfig) -> type[Task]:
    module, name = TASK_CLASSES[cfg.task].split(":")
    return getattr(importlib.import_module(module), name)


def build_task(cfg: JobConfig) -> Task:
    return task_class(cfg)(cfg)


def check_encoder(encoder: EncoderConfig, **timm_kwargs: int) -> None:
    """The encoder can be built and ``encoder.weights`` would load into it, or ``ValueError`` /
    ``FileNotFoundError`` with one line naming the file and the problem."""
    from finetune.transfer import check_weights, resolve_spec
    from pretrain.encoders.weights import WeightsMismatchError

    weights = encoder.weights
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"encoder.weights: no such file {weights}")
    try:
        spec = resolve_spec(weights, encoder.name, encoder.overrides)
        if weights is not None:
            check_weights(spec, weights, **timm_kwargs)
        elif not spec.is_registered():
            raise ValueError(f"encoder.name: {spec.timm_name!r} is not a registered encoder")
    except WeightsMismatchError as error:
        lines = str(error).splitlines()
        detail = "; ".join(line.strip() for line in lines[1:4])
        raise ValueError(f"encoder.weights {weights}: {lines[0]} {detail}") from None
    except pickle.UnpicklingError:
        raise ValueError(f"encoder.weights {weights}: holds objects other than tensors, plain "
                         "containers and run configuration; refusing to unpickle it (see "
                         "pretrain.encoders.weights to re-save a trusted file)") from None
    except ValueError as error:
        message = " ".join(str(error).split())  # one line
        raise ValueError(message if str(weights) in message
                         else f"encoder.weights {weights}: {message}") from None


def check_inputs(cfg: JobConfig) -> None:
    """Raise ``FileNotFoundError`` / ``ValueError`` for inputs the config names that are
    missing or unusable."""
    if isinstance(cfg, ClassificationConfig):
        check_encoder(cfg.encoder, num_classes=cfg.data.num_classes)
        if cfg.data.layout == "imagefolder":
            from finetune.classification.data import imagefolder_index

            for split in ("train", "val"):
                try:
                    imagefolder_index(cfg.data, split)
                except (FileNotFoundError, ValueError) as error:
                    raise type(error)(f"data.{split}: {error}") from None
        else:
            load_mixture(cfg.data.train)
            shard_set(cfg.data.val)
    if isinstance(cfg, SegmentationConfig):
        from finetune.segmentation.checks import check_segmentation_inputs

        check_segmentation_inputs(cfg)
    if isinstance(cfg, DetectionConfig):
        from finetune.detection.coco import CocoIndex
        from finetune.detection.task import check_same_categories

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


# How many of a split's files start-up checks (a stat each; masks are also decoded).
CHECKED_FILES = 16


def evenly_spaced(items: list, count: int = CHECKED_FILES) -> list:
    """Up to ``count`` items spread over the whole list (first and last included)."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def check_files_resolve(field: str, folder: Path, paths: list[str], named_by: str) -> None:
    """``FileNotFoundError`` naming ``field`` when most of a sample of a split's files are not
    where the config says (a wrong folder fails every read; a few missing files of a real
    data set are skipped and counted at run time)."""
    missing = [path for path in paths if not Path(path).is_file()]
    if paths and len(missing) * 2 > len(paths):
        raise FileNotFoundError(
            f"{field} {folder}: {len(missing)} of {len(paths)} sampled images named by "
            f"{named_by} are not there (e.g. {missing[0]}); set {field} to the folder that "
            "holds them")
