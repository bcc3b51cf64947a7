"""Bring a pretrained encoder into a fine-tuning model.

The encoder comes from an export of this project (``encoder.pt`` / ``classifier.pt``, whose
:class:`~pretrain.encoders.spec.ModelSpec` says how to rebuild it) or from any checkpoint
:mod:`pretrain.encoders.weights` understands (official DaViT / DAT++ / DWNet, timm), with the
architecture named by the caller. Every read goes through that module's safe loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.encoders.spec import ModelSpec, read_spec
from pretrain.encoders.weights import check_encoder_weights, load_encoder_weights


def resolve_spec(weights: str | None, name: str | None, overrides: dict[str, Any]) -> ModelSpec:
    """The encoder's spec: from the weights file when it carries one, else ``name``.

    Raises ``ValueError`` when neither says, or when they contradict each other."""
    spec = read_spec(weights) if weights is not None else None
    if spec is not None:
        if name is not None and name != spec.timm_name:
            raise ValueError(f"encoder.name {name!r} contradicts {weights}, which holds a "
                             f"{spec.timm_name!r}")
        return ModelSpec(spec.timm_name, dict(spec.overrides))
    if name is None:
        raise ValueError(f"{weights} does not say which encoder it holds: set encoder.name")
    return ModelSpec(name, dict(overrides))


def check_weights(spec: ModelSpec, weights: str | Path, **timm_kwargs: Any) -> None:
    """Fail now, with one message naming the file, if ``weights`` would not load into the
    model of ``spec``: unreadable or unsafe file, missing or unexpected keys, other shapes. The
    model is built on the meta device, so this costs no memory even for DaViT-G."""
    with torch.device("meta"):
        model = spec.build_timm(**timm_kwargs)
    check_encoder_weights(model, weights, skip_classifier=True)


def build_encoder(spec: ModelSpec, weights: str | None, drop_path: float = 0.0,
                  grad_checkpointing: bool = False, **timm_kwargs: Any) -> nn.Module:
    """Create the timm encoder (with ``timm_kwargs`` such as ``num_classes``) and load weights;
    a classifier head the checkpoint lacks or sizes differently stays freshly initialised."""
    model = spec.build_timm(drop_path_rate=drop_path, **timm_kwargs)
    if weights is not None:
        load_encoder_weights(model, weights, skip_classifier=True)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def config_for_checkpoint(cfg: Any, checkpoint: str | Path) -> Any:
    """``cfg`` (a fine-tuning config) for evaluating ``checkpoint`` only: the encoder built as
    the checkpoint's spec says (or as ``encoder.name`` when it carries none), its weights not
    read. Raises ``ValueError`` when neither says which encoder it is."""
    spec = read_spec(checkpoint)
    encoder = cfg.encoder.model_copy(update={"weights": None})
    if spec is not None:
        encoder = encoder.model_copy(update={"name": spec.timm_name,
                                             "overrides": dict(spec.overrides)})
    elif encoder.name is None:
        raise ValueError(f"{checkpoint} does not say which encoder it holds: set "
                         "encoder.name (and encoder.overrides)")
    return cfg.model_copy(update={"encoder": encoder})


def load_task_weights(module: nn.Module, state: dict[str, torch.Tensor], checkpoint: str | Path,
                      what: str, spec: ModelSpec | None = None) -> None:
    """Load a task checkpoint (``--eval-only``) into ``module``, all or nothing; ``ValueError``
    in one line when its keys or shapes are another model's (``load_state_dict`` would raise a
    page of size mismatches), saying what the checkpoint records it was built for."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        found = [f"{len(found)} {kind} (e.g. {found[0]})" for kind, found in (
            ("tensors of other shapes", shapes), ("missing keys", missing),
            ("unexpected keys", unexpected)) if found]
        built = ""
        if spec is not None:  # what the export says it is: the settings to evaluate it with
            options = {k: v for k, v in spec.options.items() if not isinstance(v, list)}
            built = (f"; it records a {spec.task or 'model'} on {spec.timm_name} with "
                     f"{spec.num_classes} classes and {options}")
        raise ValueError(f"{checkpoint}: not this config's {what}: {', '.join(found)}{built}; "
                         "evaluate it with the settings that trained it")
    module.load_state_dict(state)
