"""Input checks of a segmentation config, before any process starts (``--check`` and every
rank at start-up): the dataset folders and the encoder weights, in one line each."""

from __future__ import annotations

import pickle
from pathlib import Path

from finetune.checks import check_encoder, evenly_spaced
from finetune.config import SegmentationConfig


def check_segmentation_inputs(cfg: SegmentationConfig) -> None:
    """Raise ``FileNotFoundError`` / ``ValueError`` naming the folder or file at fault."""
    from finetune.backbone import check_backbone_weights, is_dense_checkpoint
    from finetune.segmentation.data import list_samples
    from finetune.transfer import resolve_spec
    from pretrain.encoders.weights import WeightsMismatchError, read_state_dict

    data = cfg.data
    for split in (data.train_split, data.val_split):
        check_masks(cfg, list_samples(data.root, split, data.image_dir, data.label_dir))
    encoder = cfg.encoder
    weights = encoder.weights
    if weights is None or not Path(weights).is_file():
        check_encoder(encoder)  # names a missing file, or an unregistered encoder
        return
    try:
        dense = is_dense_checkpoint(read_state_dict(weights, mmap=True))
    except pickle.UnpicklingError:
        dense = False  # check_encoder words the refusal
    except ValueError as error:
        raise ValueError(" ".join(str(error).split())) from None
    if not dense:
        check_encoder(encoder)
        return
    try:
        spec = resolve_spec(weights, encoder.name, encoder.overrides)
        check_backbone_weights(spec, weights, cfg.model.out_indices)
    except WeightsMismatchError as error:
        lines = str(error).splitlines()
        raise ValueError(f"encoder.weights {lines[0]} "
                         f"{'; '.join(line.strip() for line in lines[1:4])}") from None


def check_masks(cfg: SegmentationConfig, samples: list) -> None:
    """Labels fit ``data.num_classes`` (after ``reduce_zero_label``) on a sample of the split's
    masks, so a forgotten ``reduce_zero_label`` or a wrong class count stops ``--check``
    instead of the first training step (``ValueError`` naming the mask and the fields)."""
    from finetune.segmentation.data import LoadPair

    data = cfg.data
    load = LoadPair(data.reduce_zero_label, data.ignore_index, data.num_classes)
    for _, mask in evenly_spaced(samples):
        try:
            load.read_label(mask)
        except OSError:
            continue  # an unreadable mask is skipped and counted at run time, not fatal
