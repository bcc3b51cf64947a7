"""The fine-tuning tasks by name: the :class:`~pretrain.engine.task.Task` class that ``task:`` in
a config selects. A task module is imported only when its task is used."""

from __future__ import annotations

import importlib

from pretrain.engine.config import JobConfig
from pretrain.engine.task import Task

TASK_CLASSES = {"classification": "finetune.classification.task:ClassificationTask",
                "segmentation": "finetune.segmentation.task:SegmentationTask",
                "detection": "finetune.detection.task:DetectionTask"}


def task_class(cfg: JobConfig) -> type[Task]:
    module, name = TASK_CLASSES[cfg.task].split(":")
    return getattr(importlib.import_module(module), name)


def check_inputs(cfg: JobConfig) -> None:
    """The inputs ``cfg`` names are there and usable (its task's
    :meth:`~pretrain.engine.task.Task.check_inputs`)."""
    task_class(cfg).check_inputs(cfg)
