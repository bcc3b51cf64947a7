"""The pretraining data stream: image-text shards (:mod:`pretrain.engine.shard_stream`) ->
open_clip's augmentation and tokenizer -> batches of ``{"image", "text"}``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from open_clip.transform import AugmentationCfg, image_transform

from data_tools.mixture import ShardSet
from data_tools.remote import RemotePolicy
from pretrain.engine.images import OPENAI_MEAN, OPENAI_STD, decode_image, jpeg_draft_size
from pretrain.engine.shard_stream import ShardStream
from pretrain.engine.skipped import SkipLog
from pretrain.engine.stream import StreamState, TrainLoader


def train_transform(image_size: int, scale: tuple[float, float]) -> Callable:
    """open_clip's training augmentation (RandomResizedCrop, bicubic, OpenAI normalisation)."""
    return image_transform(
        image_size, is_train=True, mean=OPENAI_MEAN, std=OPENAI_STD,
        aug_cfg=AugmentationCfg(scale=scale),
    )


def eval_transform(image_size: int) -> Callable:
    return image_transform(image_size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)


def decode_caption(sample: dict[str, Any]) -> str:
    caption = sample["txt"].decode("utf-8").strip()
    if not caption:
        raise ValueError(f"sample {sample.get('__key__')} has an empty caption")
    return caption


class ImageTextDecoder:
    """Raw sample -> (augmented image tensor, caption); ``draft``: see :func:`decode_image`."""

    def __init__(self, transform: Callable, draft: tuple[int, int] | None = None) -> None:
        self.transform = transform
        self.draft = draft

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, str]:
        caption = decode_caption(sample)
        return self.transform(decode_image(sample, self.draft)), caption


class ImageTextCollator:
    def __init__(self, tokenize: Callable[[list[str]], torch.Tensor]) -> None:
        self.tokenize = tokenize

    def __call__(self, items: list[tuple[torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        images, captions = zip(*items, strict=True)
        return {"image": torch.stack(images), "text": self.tokenize(list(captions))}


def build_train_loader(
    shard_sets: list[ShardSet],
    tokenize: Callable[[list[str]], torch.Tensor],
    image_size: int,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int,
    shuffle_buffer: int,
    shuffle_initial: int,
    scale: tuple[float, float],
    state: StreamState | None = None,
    jpeg_draft: bool = True,
    remote: RemotePolicy | None = None,
    skip_log: SkipLog | None = None,
) -> TrainLoader:
    """The image-text loader of pretraining; ``jpeg_draft``: decode large JPEGs at a reduced
    DCT scale that still covers the augmentation (:func:`jpeg_draft_size`); ``remote``: the
    bounds on reading remote shards; ``skip_log``: where shards given up on are listed."""
    draft = jpeg_draft_size(image_size, scale) if jpeg_draft else None
    stream = ShardStream(
        shard_sets=shard_sets,
        decode=ImageTextDecoder(train_transform(image_size, scale), draft),
        collate=ImageTextCollator(tokenize),
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        shuffle_initial=shuffle_initial,
        state=state or StreamState.fresh(num_workers),
        remote=remote,
        skip_log=skip_log,
    )
    return TrainLoader(stream, num_workers)
