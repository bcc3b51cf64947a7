"""The classifier a checkpoint holds, for ``launch/finetune.py --config ... --eval-only
CHECKPOINT`` (:mod:`pretrain.engine.eval_only` runs it; the task is
:class:`~finetune.classification.task.ClassificationTask`).

What CHECKPOINT may be, and which evaluation transform it gets:

- a timm export (``model.safetensors`` with ``config.json`` beside it, ours or from the Hub;
  the file or its folder): built by timm from the folder, transformed by its own
  ``pretrained_cfg``;
- a ``classifier.pt`` of this project: rebuilt from its spec, transformed as the config's
  ``data`` section says (the recipe that trained it);
- any other checkpoint the weight loader reads (official DaViT / DAT++ / DWNet releases, timm
  files): the architecture is ``encoder.name`` (+ ``encoder.overrides``) with
  ``data.num_classes`` classes, loaded all or nothing, transformed by the architecture's timm
  pretrained config (resolution, crop_pct, interpolation, mean/std).

Each rank scores its slice of ``data.val`` (shards or an ImageFolder, :func:`validation_split`);
the counts are summed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
from timm.data import create_transform, resolve_data_config
from torch import nn

from finetune.classification.data import (
    LabelledImageDecoder,
    classification_transform,
    collate_labelled,
)
from finetune.classification.imagefolder import ImageFolderSplit
from finetune.config import ClassificationConfig
from pretrain.encoders.spec import ModelSpec, read_spec
from pretrain.encoders.timm_export import CONFIG_FILE
from pretrain.encoders.weights import load_encoder_weights
from pretrain.engine.eval_slices import SlicedSplit
from pretrain.engine.skipped import SkipLog


def load_classifier(checkpoint: Path, cfg: ClassificationConfig
                    ) -> tuple[nn.Module, Callable, list[str] | None]:
    """The classifier in ``checkpoint``, its evaluation transform and its class names (wnids)
    when the checkpoint lists them; see the module docstring."""
    import pretrain.encoders  # noqa: F401  (DAT++ and DWNet for timm's builder)

    checkpoint = Path(checkpoint)
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if checkpoint.is_dir() or (checkpoint.suffix == ".safetensors"
                               and (folder / CONFIG_FILE).is_file()):
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{checkpoint}: a folder without {CONFIG_FILE} (not a timm "
                                    "export)")
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
        names = model.pretrained_cfg.get("label_names")
        return model, create_transform(**resolve_data_config({}, model=model)), names
    spec = read_spec(checkpoint)
    if spec is not None:
        model = spec.build_timm()
        load_encoder_weights(model, checkpoint)
        return model, classification_transform(cfg.data, training=False), None
    encoder = cfg.encoder
    if encoder.name is None:
        raise ValueError(f"--eval-only {checkpoint} does not say which model it holds: set "
                         "encoder.name")
    model = ModelSpec(encoder.name, dict(encoder.overrides)).build_timm(
        num_classes=cfg.data.num_classes)
    load_encoder_weights(model, checkpoint)
    return model, create_transform(**resolve_data_config({}, model=model)), None


def validation_split(cfg: ClassificationConfig, transform: Callable, classes: list[str] | None,
                     num_classes: int, rank: int, world_size: int,
                     skips: SkipLog | None = None) -> Any:
    """This rank's slice of ``data.val`` for a checkpoint's classifier of ``num_classes``,
    in the class order of ``classes`` (its label names) when they name the val folders."""
    data = cfg.data
    if data.layout == "imagefolder":
        from data_tools.imagefolder import scan_imagefolder

        if data.classes is None and classes is not None:
            # a checkpoint's label names fix the order only if they name the val folders
            # (our exports list wnids; other exports may list readable names)
            val = Path(data.val)
            folders = {e.name for e in val.iterdir() if e.is_dir()} if val.is_dir() else set()
            classes = classes if folders <= set(classes) else None
        index = scan_imagefolder(data.val, data.classes or classes)
        if len(index.classes) > num_classes:
            raise ValueError(f"data.val {data.val}: {len(index.classes)} classes, but the "
                             f"checkpoint's classifier has {num_classes}")
        return ImageFolderSplit(index, transform, collate_labelled, cfg.eval.batch_size, rank,
                                world_size, skips)
    return SlicedSplit(data.val, LabelledImageDecoder(data, transform), collate_labelled,
                       cfg.eval.batch_size, rank, world_size)
