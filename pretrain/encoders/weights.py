"""One loader for encoder weights of every origin the project meets.

Accepted files (``torch.save`` pickles, read with ``weights_only=True``, or ``.safetensors``):

- a bare state dict ``{name: tensor}`` (timm / Hugging Face weights, project exports);
- a dict holding the state dict under ``'state_dict'`` (timm training checkpoints, project
  exports), ``'model'`` (official DAT++, DWNet and DaViT releases, Swin-style training
  checkpoints) or ``'module'`` (DeepSpeed model-state files); the first of these keys present
  wins, and ``read_state_dict(path, key=...)`` picks another one (e.g. ``'state_dict_ema'``).
  A ``'module.'`` prefix left by DistributedDataParallel is stripped.

Training checkpoints often carry their run configuration as an ``argparse.Namespace`` (timm)
or a ``yacs`` ``CfgNode`` (Swin-derived code such as DAT++ and DWNet). ``weights_only`` refuses
both, so they are unpickled into inert stand-ins (plain attributes / an ``OrderedDict``): no code
from the file runs, and any other non-tensor object still raises.

Key layouts: official DaViT checkpoints are converted by timm's own ``checkpoint_filter_fn``;
official DAT++ and DWNet checkpoints already use this project's key names (the models were
written to match them), as do timm checkpoints and the project's exports.

A checkpoint whose keys or shapes differ from the model is never partially loaded: the error
lists missing keys, unexpected keys and shape differences. For a model built without a
classifier (``num_classes=0``, e.g. a CLIP image tower) or with a different class count, pass
``skip_classifier=True``: the classifier is then the only part left out, and it is logged.

timm ``features_only`` wrappers drop the head and final norm, so load into the full encoder and
take features with ``model.forward_intermediates(x, intermediates_only=True)`` or wrap it
afterwards (``timm.models._features.FeatureGetterNet(model, out_indices)``).
"""

from __future__ import annotations

import logging
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet
from timm.models.davit import DaVit
from timm.models.davit import checkpoint_filter_fn as davit_filter_fn
from torch import nn

from pretrain.encoders import dat, dwnet

__all__ = [
    "WeightsMismatchError",
    "check_encoder_weights",
    "convert_state_dict",
    "detect_origin",
    "load_checkpoint_file",
    "load_encoder_weights",
    "read_state_dict",
]

_logger = logging.getLogger(__name__)

_CONTAINER_KEYS = ("state_dict", "model", "module")


class WeightsMismatchError(RuntimeError):
    """The checkpoint does not fit the model; nothing was loaded."""


class _InertNamespace:
    """Receives the attributes of a pickled ``argparse.Namespace``; has no behaviour."""


class _InertConfig:
    """Unpickles a yacs ``CfgNode`` (a dict subclass) as a plain ``OrderedDict``.

    The restricted unpickler only fills dict items into exact dict types, so ``__new__`` hands it
    an ``OrderedDict``, which also accepts the node's attribute state.
    """

    def __new__(cls, *args: object) -> OrderedDict:
        return OrderedDict()


_METADATA_STAND_INS = [
    (_InertNamespace, "argparse.Namespace"),
    (_InertConfig, "yacs.config.CfgNode"),
]


def _is_zip(path: Path) -> bool:
    with path.open("rb") as stream:
        return stream.read(4) == b"PK\x03\x04"


def load_checkpoint_file(path: Path | str, mmap: bool = False) -> object:
    """A checkpoint's contents, read safely (no code from the file runs).

    ``mmap=True`` maps the tensors instead of reading them (only for torch's zip format, the
    default since torch 1.6; older files are read whole), so a large file's small entries, such
    as an export's spec, cost almost nothing. Raises ``FileNotFoundError``, or ``ValueError`` /
    ``pickle.UnpicklingError`` naming the file for a file that is not a readable checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    try:
        with torch.serialization.safe_globals(_METADATA_STAND_INS), warnings.catch_warnings():
            # A pickle of another protocol is refused below with our own message anyway.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=mmap and _is_zip(path))
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(
            f"{path} holds objects other than tensors, plain containers and run configuration "
            f"({error}). Refusing to execute its pickle; if you trust the file, re-save only its "
            "state dict: torch.save(torch.load(path, weights_only=False)['model'], new_path)"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:  # truncated or not a torch file at all
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise ValueError(f"{path}: not a readable checkpoint ({first_line})") from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(value, torch.Tensor) for value in obj.values()
    )


def read_state_dict(path: str | Path, key: str | None = None, mmap: bool = False
                    ) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely and return its state dict (see the module docstring)."""
    path = Path(path)
    checkpoint = load_checkpoint_file(path, mmap=mmap)
    if key is not None:
        if not isinstance(checkpoint, dict) or key not in checkpoint:
            raise KeyError(f"{path} has no entry {key!r}")
        checkpoint = checkpoint[key]
    elif not _is_state_dict(checkpoint) and isinstance(checkpoint, dict):
        found = [name for name in _CONTAINER_KEYS if name in checkpoint]
        if found:
            _logger.info("%s: using the state dict under %r", path, found[0])
            checkpoint = checkpoint[found[0]]
    if not _is_state_dict(checkpoint):
        entries = list(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint)
        raise ValueError(
            f"{path} holds no state dict: expected tensors, bare or under one of "
            f"{_CONTAINER_KEYS}; found {entries}"
        )
    return {name.removeprefix("module."): tensor for name, tensor in checkpoint.items()}


def detect_origin(state_dict: dict[str, torch.Tensor]) -> str:
    """Name the family and key layout of a state dict from its signature keys."""
    if "patch_embeds.0.proj.weight" in state_dict:
        return "davit-official"
    if "stem.conv.weight" in state_dict:
        return "davit-timm"
    if "patch_proj.0.weight" in state_dict:
        return "dat_pp"
    if any(".attn2conv." in name for name in state_dict):
        dynamic = any(name.endswith("attn2conv.conv.conv1.weight") for name in state_dict)
        return "dwnet-dynamic" if dynamic else "dwnet-static"
    return "unknown"


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], str]:
    """Convert a state dict to ``model``'s key layout; returns it with the detected origin."""
    origin = detect_origin(state_dict)
    if isinstance(model, DaVit):
        state_dict = davit_filter_fn(state_dict, model)
    elif isinstance(model, dat.DAT):
        state_dict = dat.checkpoint_filter_fn(state_dict, model)
    elif isinstance(model, dwnet.DWNet):
        state_dict = dwnet.checkpoint_filter_fn(state_dict, model)
    return state_dict, origin


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return tuple(f"{name}." for name in ((names,) if isinstance(names, str) else names))


def _listing(title: str, items: list[str]) -> str:
    shown = "\n  ".join(items)
    return f"{title} ({len(items)}):\n  {shown}"


def _check_fit(
    state_dict: dict[str, torch.Tensor], model: nn.Module, origin: str, skipped: tuple[str, ...]
) -> None:
    expected = {
        name: tensor.shape
        for name, tensor in model.state_dict().items()
        if not name.startswith(skipped)
    }
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{name}: checkpoint {tuple(state_dict[name].shape)} vs model {tuple(shape)}"
        for name, shape in expected.items()
        if name in state_dict and state_dict[name].shape != shape
    )
    if not (missing or unexpected or shapes):
        return
    arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    parts = [f"checkpoint (origin: {origin}) does not fit {arch}; nothing was loaded."]
    parts += [
        _listing(title, items)
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        )
        if items
    ]
    if not skipped and _classifier_prefixes(model):
        head = _classifier_prefixes(model)
        if all(name.startswith(head) for name in missing + unexpected + shapes):
            parts.append("Only the classifier differs: skip_classifier=True keeps the trunk.")
    raise WeightsMismatchError("\n".join(parts))


def check_encoder_weights(
    model: nn.Module, path: str | Path, *, skip_classifier: bool = False, key: str | None = None
) -> str:
    """Check, without loading, that ``path`` would load into ``model`` (which may live on the
    meta device); raises like :func:`load_encoder_weights`. Returns the detected origin."""
    state_dict, origin = convert_state_dict(read_state_dict(path, key, mmap=True), model)
    skipped = _classifier_prefixes(model) if skip_classifier else ()
    state_dict = {name: value for name, value in state_dict.items() if not name.startswith(skipped)}
    _check_fit(state_dict, model, origin, skipped)
    return origin


def load_encoder_weights(
    model: nn.Module, path: str | Path, *, skip_classifier: bool = False, key: str | None = None
) -> str:
    """Load encoder weights from ``path`` of any supported origin, all-or-nothing.

    Returns the detected origin (see :func:`detect_origin`). Raises
    :class:`WeightsMismatchError` listing missing/unexpected keys and shape mismatches.
    """
    if isinstance(model, (FeatureDictNet, FeatureHookNet, FeatureGetterNet)):
        raise TypeError(
            "features_only wrappers have no head or final norm to receive those weights; load "
            "into the full encoder, then use forward_intermediates() or wrap it afterwards"
        )
    state_dict, origin = convert_state_dict(read_state_dict(path, key), model)
    skipped = _classifier_prefixes(model) if skip_classifier else ()
    state_dict = {name: value for name, value in state_dict.items() if not name.startswith(skipped)}
    _check_fit(state_dict, model, origin, skipped)
    model.load_state_dict(state_dict, strict=not skipped)
    if skipped:
        _logger.info("%s: loaded everything except the classifier %s", path, skipped)
    return origin
