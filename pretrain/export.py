"""Export consolidated fp32 weights from a run's latest DeepSpeed checkpoint.

Writes, under ``RUN_DIR/export/``:

* ``encoder.pt`` — the image encoder (the timm trunk) as ``{"state_dict", "encoder"}`` where
  ``encoder`` = ``{"timm_name", "overrides"}`` says how to rebuild it with
  ``timm.create_model(timm_name, num_classes=0, **overrides)``; this is what fine-tuning loads.
* ``clip.pt`` — the whole CLIP model and its model config, for zero-shot evaluation.

The fp32 weights come from DeepSpeed's ZeRO optimizer shards (``zero_to_fp32``), not from
the bf16 copies the engine computes with.

    python -m pretrain.export --run-dir runs/demo/pretrain
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from pretrain.config import ModelConfig
from pretrain.models.clip import build_clip, encoder_spec

TRUNK_PREFIX = "clip.visual.trunk."
CLIP_PREFIX = "clip."


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_from_checkpoint(run_dir: Path | str, tag: str | None = None) -> Path:
    """Consolidate the checkpoint ``tag`` (default: latest) and write the export files."""
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    model_cfg = ModelConfig.model_validate(config["model"])
    state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)
    clip_state = {k[len(CLIP_PREFIX):]: v for k, v in state.items() if k.startswith(CLIP_PREFIX)}
    trunk_state = {k[len(TRUNK_PREFIX):]: v for k, v in state.items()
                   if k.startswith(TRUNK_PREFIX)}
    if not trunk_state:
        raise RuntimeError(f"no image-encoder weights ({TRUNK_PREFIX}*) in {run_dir}")
    out = run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    spec = encoder_spec(model_cfg.image.name, model_cfg.image.overrides)
    _atomic_save({"state_dict": trunk_state, "encoder": spec}, out / "encoder.pt")
    _atomic_save({"state_dict": clip_state, "model": config["model"]}, out / "clip.pt")
    return out


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
