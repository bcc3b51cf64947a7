"""A pretrained encoder as a dense-prediction backbone: timm features at strides 4-32, each
followed by a LayerNorm, as the official DaViT / DAT++ / DWNet detection and segmentation
backbones have (timm's feature outputs are the raw stage outputs).

Task-agnostic on purpose (segmentation and detection both use it): the encoder comes from a
:class:`~pretrain.encoders.spec.ModelSpec` and a weights file, the output is a list of NCHW maps,
and :attr:`Backbone.channels` / :attr:`Backbone.strides` describe them.

Weights (all or nothing, one error listing what does not fit):

- an encoder checkpoint of any origin :mod:`pretrain.encoders.weights` reads (our pretraining
  export ``encoder.pt``, official classification releases, timm): the trunk loads, the per-level
  norms start fresh;
- an official mmseg / mmdet checkpoint: its ``backbone.*`` entries, the trunk in the official
  key layout plus the per-level norms ``backbone.norm0`` .. ``backbone.norm3``, load together
  (the heads' entries are left to the task).

Why not smp's ``tu-<name>`` encoder: it builds a ``features_only`` timm wrapper, which drops the
head and final norm, so none of our weight loader's checks (official key conversion, all or
nothing) apply to it; it has no place for per-level norms (smp's UPerNet puts its own inside
the decoder, with other names than the official checkpoints); and it cannot pass our
ModelSpec's architecture overrides to a pruned model. The decoder heads take this module's
features instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from timm.layers import LayerNorm2d
from torch import nn

from finetune.transfer import build_encoder
from pretrain.encoders.spec import ModelSpec
from pretrain.encoders.weights import (
    WeightsMismatchError,
    check_encoder_weights,
    convert_state_dict,
    detect_origin,
    read_state_dict,
)

BACKBONE_PREFIX = "backbone."  # official mmseg/mmdet checkpoints keep the encoder under it
_NORM_KEY = re.compile(r"^norm(\d+)\.")
# nn.LayerNorm's default, as the official backbones' per-output norms (Swin-derived code).
NORM_EPS = 1e-5


def is_dense_checkpoint(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict is a whole detector / segmenter with its encoder under
    ``backbone.`` (official mmseg / mmdet layout) rather than a bare encoder."""
    return any(key.startswith(BACKBONE_PREFIX) for key in state_dict)


class Backbone(nn.Module):
    """``forward(image) -> [features at out_indices]`` (NCHW), each through ``norm{i}``."""

    def __init__(self, spec: ModelSpec, weights: str | Path | None = None,
                 out_indices: tuple[int, ...] = (0, 1, 2, 3), drop_path: float = 0.0,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.out_indices = tuple(out_indices)
        dense = None
        if weights is not None:
            state_dict = read_state_dict(weights)
            if is_dense_checkpoint(state_dict):
                dense = state_dict  # loads after pruning, with the norms
        # Encoder weights go into the full model first: their head / final-norm keys have a
        # place there, so the all-or-nothing check of the weight loader applies unchanged.
        self.body = build_encoder(spec, None if dense is not None or weights is None
                                  else str(weights), drop_path=drop_path,
                                  grad_checkpointing=grad_checkpointing, num_classes=0)
        info = self.body.feature_info
        self.channels = [int(info[i]["num_chs"]) for i in self.out_indices]
        self.strides = [int(info[i]["reduction"]) for i in self.out_indices]
        # The head and final norm serve classification only; pruning drops their parameters
        # (they would get no gradient, which ZeRO's bookkeeping dislikes).
        self.body.prune_intermediate_layers(list(self.out_indices), prune_norm=True,
                                            prune_head=True)
        for level, index in enumerate(self.out_indices):
            self.add_module(f"norm{index}", LayerNorm2d(self.channels[level], eps=NORM_EPS))
        if dense is not None:
            self.load_dense_state_dict(dense, source=str(weights))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        features = self.body.forward_intermediates(
            image, indices=list(self.out_indices), intermediates_only=True, stop_early=True)
        return [getattr(self, f"norm{index}")(feature)
                for index, feature in zip(self.out_indices, features, strict=True)]

    def load_dense_state_dict(self, state_dict: dict[str, torch.Tensor],
                              source: str = "checkpoint") -> None:
        """Load the ``backbone.*`` entries of an official dense checkpoint (trunk in its
        official key layout + ``norm{i}``), all or nothing."""
        self.load_state_dict(self.convert_dense(state_dict, source))

    def convert_dense(self, state_dict: dict[str, torch.Tensor],
                      source: str = "checkpoint") -> dict[str, torch.Tensor]:
        """``state_dict`` (official dense layout) in this module's keys; raises
        :class:`WeightsMismatchError` listing every key or shape that does not fit."""
        trunk, norms = {}, {}
        for key, value in state_dict.items():
            if not key.startswith(BACKBONE_PREFIX):
                continue  # decode / auxiliary heads, necks: not the backbone's
            name = key[len(BACKBONE_PREFIX):]
            (norms if _NORM_KEY.match(name) else trunk)[name] = value
        origin = detect_origin(trunk)
        trunk, _ = convert_state_dict(trunk, self.body)
        converted = {**{f"body.{k}": v for k, v in trunk.items()}, **norms}
        _check_fit(converted, self, source, origin)
        return converted


def _check_fit(state_dict: dict[str, torch.Tensor], module: nn.Module, source: str,
               origin: str) -> None:
    expected = {name: tensor.shape for name, tensor in module.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(f"{name}: checkpoint {tuple(state_dict[name].shape)} vs model "
                    f"{tuple(shape)}" for name, shape in expected.items()
                    if name in state_dict and state_dict[name].shape != shape)
    if not (missing or unexpected or shapes):
        return
    parts = [f"{source}: the backbone (origin: {origin}) does not fit; nothing was loaded."]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            parts.append(f"{title} ({len(items)}):\n  " + "\n  ".join(items))
    raise WeightsMismatchError("\n".join(parts))


def check_backbone_weights(spec: ModelSpec, weights: str | Path,
                           out_indices: tuple[int, ...] = (0, 1, 2, 3)) -> None:
    """Raise now (naming the file) if ``weights`` would not load into the backbone of
    ``spec``; the model is built on the meta device, so this costs no memory."""
    state_dict = read_state_dict(weights, mmap=True)
    if not is_dense_checkpoint(state_dict):
        with torch.device("meta"):
            model = spec.build_timm(num_classes=0)
        check_encoder_weights(model, weights, skip_classifier=True)
        return
    with torch.device("meta"):
        backbone = Backbone(spec, None, out_indices)
    backbone.convert_dense(state_dict, source=str(weights))
