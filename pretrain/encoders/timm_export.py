"""Exports that timm users load without this project: ``model.safetensors`` + ``config.json``.

The folder follows timm's Hugging Face layout (what ``timm.models.push_to_hf_hub`` writes), so
either of these rebuilds the model and loads the weights::

    timm.create_model("local-dir:/path/to/export")
    timm.create_model(spec.timm_name, pretrained=True, **spec.overrides,
                      num_classes=N, pretrained_cfg_overlay=dict(file=".../model.safetensors"))

``config.json`` names the registered *base* architecture (``davit_tiny``) and carries the spec's
overrides as ``model_args``: timm applies them when it builds the model, so an architecture our
configs shrank (registered in-process as a hashed variant by
:func:`pretrain.clip_model.register_variant`) is rebuilt in any process, by timm alone. DAT++
and DWNet are this project's timm models: ``import pretrain.encoders`` registers them first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from data_tools.files import atomic_write, atomic_write_text
from pretrain.encoders.spec import ModelSpec

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# pretrained_cfg fields that describe where the weights came from, not how to use them
_SOURCE_FIELDS = ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "source",
                  "tag", "custom_load", "license", "origin_url", "paper_ids", "paper_name",
                  "notes")


def default_pretrained_cfg(spec: ModelSpec) -> dict[str, Any]:
    """The architecture's own timm pretrained config (input size, mean/std, crop_pct,
    interpolation, classifier name), without its download fields. Built on the meta device."""
    with torch.device("meta"):
        model = spec.build_timm()
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    return {key: value for key, value in cfg.items()
            if key not in _SOURCE_FIELDS and value is not None}


def _num_features(spec: ModelSpec) -> int:
    with torch.device("meta"):
        return int(spec.build_timm().num_features)


def write_timm_export(state_dict: dict[str, torch.Tensor], spec: ModelSpec,
                      pretrained_cfg: dict[str, Any], out_dir: Path | str) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json``; returns ``out_dir``.

    ``state_dict`` holds the timm model's keys (as ``spec.build_timm().state_dict()``);
    ``pretrained_cfg`` overrides the architecture's defaults (e.g. ``mean``, ``std``,
    ``crop_pct``, ``interpolation``, ``input_size`` of the recipe that trained the weights).
    ``num_classes`` comes from the spec (0: an encoder without a classifier).
    """
    from safetensors.torch import save_file  # a timm dependency

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {**default_pretrained_cfg(spec), **pretrained_cfg, "num_classes": spec.num_classes}
    for key in ("mean", "std", "input_size"):
        if key in cfg:
            cfg[key] = list(cfg[key])
    config = {
        "architecture": spec.timm_name,
        "num_classes": spec.num_classes,
        "num_features": _num_features(spec),
        "model_args": dict(spec.overrides),
        "pretrained_cfg": cfg,
    }
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    weights = out_dir / WEIGHTS_FILE
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    # config.json last: a folder with it is complete
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out_dir


def read_timm_export(out_dir: Path | str) -> tuple[ModelSpec, dict[str, Any]]:
    """The spec and pretrained_cfg of an export folder written by :func:`write_timm_export`
    (or any timm Hugging Face folder); ``ValueError`` naming the file if it is not one."""
    path = Path(out_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        spec = ModelSpec(config["architecture"], dict(config.get("model_args") or {}),
                         num_classes=int(config.get("num_classes",
                                                    config["pretrained_cfg"]["num_classes"])))
        return spec, dict(config["pretrained_cfg"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a timm export config ({error!r})") from None
