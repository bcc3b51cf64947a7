"""Export consolidated fp32 weights of a pretraining run.

Writes, under ``RUN_DIR/export/``:

* ``encoder.pt`` — the image encoder (the timm trunk) as ``{"state_dict", "spec"}``, the spec a
  :class:`~pretrain.models.spec.ModelSpec` (timm name + overrides, no classifier); this is what
  fine-tuning loads.
* ``clip.pt`` — the whole CLIP model and its model config, for zero-shot evaluation.

The fp32 weights come from DeepSpeed's ZeRO optimizer shards (``zero_to_fp32``), not from
the bf16 copies the engine computes with. The trainer writes the export when a run completes;
this module's command writes it again from any checkpoint tag:

    python -m pretrain.export --run-dir runs/demo/pretrain [--tag step_00001000]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import yaml
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from data_tools.files import atomic_torch_save
from pretrain.config import ModelConfig
from pretrain.models.clip import build_clip
from pretrain.models.spec import SPEC_KEY, ModelSpec

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
    return out


def export_from_checkpoint(run_dir: Path | str, tag: str | None = None) -> Path:
    """Consolidate the checkpoint ``tag`` (default: latest) and write the export files."""
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)
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
