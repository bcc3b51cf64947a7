"""Export consolidated fp32 weights of a pretraining run.

Writes, under ``RUN_DIR/export/``:

* ``encoder.pt`` — the image encoder (the timm trunk) as ``{"state_dict", "spec"}``, the spec a
  :class:`~pretrain.encoders.spec.ModelSpec` (timm name + overrides, no classifier); this is what
  fine-tuning loads.
* ``clip.pt`` — the whole CLIP model and its model config, for zero-shot evaluation.
* ``open_clip/`` — ``open_clip_config.json`` (model and preprocessing config) and
  ``open_clip_model.safetensors``, the layout open_clip loads itself:
  ``open_clip.create_model_and_transforms("local-dir:RUN_DIR/export/open_clip")`` and
  ``open_clip.get_tokenizer("local-dir:...")``. The image tower is open_clip's timm tower, so the
  encoder must be registered with timm first: ``import pretrain.encoders`` for DAT++ / DWNet, and
  :func:`register_open_clip_export` for an architecture the config shrank (the demo's), which
  registers it under the name the config file uses.
* ``timm/`` — the image encoder for timm users (``model.safetensors`` + ``config.json``, see
  :mod:`pretrain.encoders.timm_export`): ``timm.create_model("local-dir:RUN_DIR/export/timm")``,
  or ``pretrained_cfg_overlay=dict(file=...)``, and smp's ``tu-`` encoders through the same
  keyword arguments.

The fp32 weights come from DeepSpeed's ZeRO optimizer shards (``zero_to_fp32``), not from
the bf16 copies the engine computes with. The trainer writes the export when a run completes;
this module's command writes it again from any checkpoint tag:

    python -m pretrain.export --run-dir runs/demo/pretrain [--tag step_00001000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from data_tools.files import atomic_torch_save, atomic_write, atomic_write_text
from pretrain.clip_model import build_clip, register_variant
from pretrain.config import ModelConfig
from pretrain.encoders.spec import SPEC_KEY, ModelSpec
from pretrain.encoders.timm_export import write_timm_export
from pretrain.engine.checkpoint import fp32_state_dict
from pretrain.engine.images import OPENAI_MEAN, OPENAI_STD

TRUNK_PREFIX = "clip.visual.trunk."
CLIP_PREFIX = "clip."


def write_clip_exports(state: dict[str, torch.Tensor], model: dict[str, Any], out: Path) -> Path:
    """Write ``encoder.pt`` and ``clip.pt`` from the fp32 state dict of a ``ContrastiveTask``
    (keys ``clip.*``) and the run's ``model`` config section."""
    model_cfg = ModelConfig.model_validate(model)
    clip_state = {k[len(CLIP_PREFIX):]: v for k, v in state.items() if k.startswith(CLIP_PREFIX)}
    trunk_state = {k[len(TRUNK_PREFIX):]: v for k, v in state.items()
                   if k.startswith(TRUNK_PREFIX)}
    if not trunk_state:
        raise RuntimeError(f"no image-encoder weights ({TRUNK_PREFIX}*) to export")
    out.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(model_cfg.image.name, dict(model_cfg.image.overrides))
    atomic_torch_save({"state_dict": trunk_state, SPEC_KEY: spec.to_dict()}, out / "encoder.pt")
    atomic_torch_save({"state_dict": clip_state, "model": model}, out / "clip.pt")
    write_timm_export(trunk_state, spec, image_pretrained_cfg(model_cfg), out / "timm")
    write_open_clip_export(clip_state, model_cfg, out / "open_clip")
    return out


def image_pretrained_cfg(model_cfg: ModelConfig) -> dict[str, Any]:
    """How the image tower was fed in pretraining (open_clip's evaluation preprocessing)."""
    size = model_cfg.image.image_size
    return {"input_size": (3, size, size), "mean": OPENAI_MEAN, "std": OPENAI_STD,
            "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center"}


def open_clip_model_cfg(model_cfg: ModelConfig) -> dict[str, Any]:
    """The ``model_cfg`` open_clip builds the same ``CLIP`` from (see
    :func:`pretrain.clip_model.build_clip`)."""
    image, text = model_cfg.image, model_cfg.text
    return {
        "embed_dim": model_cfg.embed_dim,
        "vision_cfg": {"timm_model_name": register_variant(image.name, image.overrides),
                       "timm_model_pretrained": False, "timm_pool": image.pool,
                       "timm_proj": image.proj, "timm_drop_path": image.drop_path,
                       "image_size": image.image_size},
        "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size,
                     "width": text.width, "heads": text.heads, "layers": text.layers},
    }


def write_open_clip_export(clip_state: dict[str, torch.Tensor], model_cfg: ModelConfig,
                           out: Path) -> Path:
    """``open_clip_model.safetensors`` + ``open_clip_config.json`` in ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in clip_state.items()}
    # open_clip keeps the temperature (and SigLIP bias) 0-dim; ours are 1-element tensors
    # because DeepSpeed's broadcast cannot view 0-dim parameters.
    for name in ("logit_scale", "logit_bias"):
        if name in state:
            state[name] = state[name].reshape(())
    cfg = open_clip_model_cfg(model_cfg)
    if "logit_bias" in state:
        cfg["init_logit_bias"] = float(state["logit_bias"])
    atomic_write(out / "open_clip_model.safetensors",
                 lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    image = model_cfg.image
    config = {
        "model_cfg": cfg,
        "preprocess_cfg": {"size": image.image_size, "mean": list(OPENAI_MEAN),
                           "std": list(OPENAI_STD), "interpolation": "bicubic",
                           "resize_mode": "shortest"},
        # Not read by open_clip: how to register a shrunken tower's timm name in a new process.
        "timm_variant": {"name": cfg["vision_cfg"]["timm_model_name"], "base": image.name,
                         "overrides": dict(image.overrides)},
    }
    atomic_write_text(out / "open_clip_config.json", json.dumps(config, indent=2) + "\n")
    return out


def register_open_clip_export(directory: Path | str) -> str:
    """Register the timm tower an open_clip export names (this project's encoders, and the
    variant a shrunken config made), so ``open_clip.create_model_and_transforms("local-dir:"
    + directory)`` can build it in this process. Returns the timm name."""
    config = json.loads((Path(directory) / "open_clip_config.json").read_text())
    variant = config["timm_variant"]
    name = register_variant(variant["base"], variant["overrides"])
    if name != variant["name"]:
        raise ValueError(f"{directory}: the export's tower {variant['name']!r} does not match "
                         f"its overrides (registered as {name!r})")
    return name


def export_from_checkpoint(run_dir: Path | str, tag: str | None = None) -> Path:
    """Consolidate the checkpoint ``tag`` (default: latest) and write the export files."""
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    state = fp32_state_dict(run_dir / "checkpoints", tag=tag)
    return write_clip_exports(state, config["model"], run_dir / "export")


def load_exported_clip(path: Path | str) -> tuple[torch.nn.Module, ModelConfig]:
    """Rebuild the CLIP model of an export (``clip.pt``), in eval mode."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model_cfg = ModelConfig.model_validate(payload["model"])
    has_bias = "logit_bias" in payload["state_dict"]
    clip = build_clip(model_cfg, init_logit_bias=0.0 if has_bias else None)
    clip.load_state_dict(payload["state_dict"], strict=True)
    return clip.eval(), model_cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export fp32 weights from a pretraining run.")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "checkpoints" / "latest").is_file():
        parser.error(f"{args.run_dir}: no checkpoint (checkpoints/latest missing)")
    print(export_from_checkpoint(args.run_dir, args.tag))


if __name__ == "__main__":
    main()
