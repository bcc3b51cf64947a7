"""Starting a pretraining run from existing weights (``model.init_from``), distinct from resuming.

A whole CLIP model (open_clip's checkpoints and safetensors, or our ``clip.pt``) or only the
image tower (official DaViT / DAT++ / DWNet, timm, our ``encoder.pt``, through the project's
weight loader) is loaded all or nothing, every file read with ``weights_only``. Under ZeRO-3 the
module is already partitioned when it is built, so rank 0 loads into the gathered parameters
and DeepSpeed re-partitions them to every rank.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import deepspeed
import torch
from torch import nn

from pretrain.config import ModelConfig, WarmStart
from pretrain.encoders.weights import (
    WeightsMismatchError,
    check_encoder_weights,
    load_encoder_weights,
    read_state_dict,
)
from pretrain.engine import distributed


def _fit_clip_state(state: dict[str, torch.Tensor], clip: nn.Module, path: str
                    ) -> dict[str, torch.Tensor]:
    # keep_vars: the parameters themselves, whose ds_shape is the full shape under ZeRO-3
    expected = {name: tuple(t.ds_shape if hasattr(t, "ds_shape") else t.shape)
                for name, t in clip.state_dict(keep_vars=True).items()}
    # open_clip keeps the temperature (and SigLIP bias) 0-dim, ours are 1-element tensors
    state = {name: value.reshape(expected[name]) if name in expected and value.numel() == 1
             and len(expected[name]) <= 1 else value for name, value in state.items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{n}: checkpoint {tuple(state[n].shape)} vs model {expected[n]}"
                    for n in expected if n in state and tuple(state[n].shape) != expected[n])
    if missing or unexpected or shapes:
        listing = "; ".join(f"{title} ({len(items)}): {', '.join(items[:5])}"
                            for title, items in (("missing keys", missing),
                                                 ("unexpected keys", unexpected),
                                                 ("shape mismatches", shapes)) if items)
        raise WeightsMismatchError(f"model.init_from.clip {path} does not fit this CLIP "
                                   f"model; nothing was loaded. {listing}")
    return state


def warm_start(clip: nn.Module, init: WarmStart) -> None:
    """Load ``init`` into ``clip`` (an open_clip ``CLIP``) on every rank; a no-op when empty.

    Every rank reads and checks the files first, so a file that does not fit fails on all of
    them alike (never one rank inside a collective while the others wait)."""
    if init.clip is None and init.image is None:
        return
    state = None
    if init.clip is not None:
        state = _fit_clip_state(read_state_dict(init.clip), clip, init.clip)
    if init.image is not None:
        check_encoder_weights(clip.visual.trunk, init.image, skip_classifier=True)
    params = list(clip.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=zero3):
        if zero3 and distributed.rank() != 0:
            return  # rank 0's values reach every partition when the context exits
        if state is not None:
            clip.load_state_dict(state, strict=True)
        if init.image is not None:
            load_encoder_weights(clip.visual.trunk, init.image, skip_classifier=True)


def check_warm_start(model_cfg: ModelConfig) -> None:
    """``--check``: the warm-start files exist and fit the model (built on the meta device);
    raises ``FileNotFoundError`` / ``ValueError`` with one line naming the file."""
    from pretrain.clip_model import build_clip

    init = model_cfg.init_from
    for field, path in (("clip", init.clip), ("image", init.image)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"model.init_from.{field}: no such file {path}")
    if init.clip is None and init.image is None:
        return
    with torch.device("meta"):
        clip = build_clip(model_cfg)
    try:
        if init.clip is not None:
            _fit_clip_state(read_state_dict(init.clip, mmap=True), clip, init.clip)
        if init.image is not None:
            check_encoder_weights(clip.visual.trunk, init.image, skip_classifier=True)
    except (WeightsMismatchError, pickle.UnpicklingError) as error:
        raise ValueError(" ".join(str(error).split())[:600]) from None
