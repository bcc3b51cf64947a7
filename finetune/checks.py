"""Input checks every fine-tuning task shares, run before any process starts (``--check`` on a
login node, and every rank at start-up): the encoder and its weights, and whether a split's
files are where the config says. Each problem is one line naming the field and the file."""

from __future__ import annotations

import pickle
from pathlib import Path

from finetune.config import EncoderConfig


def check_encoder(encoder: EncoderConfig, **timm_kwargs: int) -> None:
    """The encoder can be built and ``encoder.weights`` would load into it, or ``ValueError`` /
    ``FileNotFoundError`` with one line naming the file and the problem."""
    from finetune.transfer import check_weights, resolve_spec
    from pretrain.encoders.weights import WeightsMismatchError

    weights = encoder.weights
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"encoder.weights: no such file {weights}")
    try:
        spec = resolve_spec(weights, encoder.name, encoder.overrides)
        if weights is not None:
            check_weights(spec, weights, **timm_kwargs)
        elif not spec.is_registered():
            raise ValueError(f"encoder.name: {spec.timm_name!r} is not a registered encoder")
    except WeightsMismatchError as error:
        lines = str(error).splitlines()
        detail = "; ".join(line.strip() for line in lines[1:4])
        raise ValueError(f"encoder.weights {weights}: {lines[0]} {detail}") from None
    except pickle.UnpicklingError:
        raise ValueError(f"encoder.weights {weights}: holds objects other than tensors, plain "
                         "containers and run configuration; refusing to unpickle it (see "
                         "pretrain.encoders.weights to re-save a trusted file)") from None
    except ValueError as error:
        message = " ".join(str(error).split())  # one line
        raise ValueError(message if str(weights) in message
                         else f"encoder.weights {weights}: {message}") from None


# How many of a split's files start-up checks (a stat each; masks are also decoded).
CHECKED_FILES = 16


def evenly_spaced(items: list, count: int = CHECKED_FILES) -> list:
    """Up to ``count`` items spread over the whole list (first and last included)."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def check_files_resolve(field: str, folder: Path, paths: list[str], named_by: str) -> None:
    """``FileNotFoundError`` naming ``field`` when most of a sample of a split's files are not
    where the config says (a wrong folder fails every read; a few missing files of a real
    data set are skipped and counted at run time)."""
    missing = [path for path in paths if not Path(path).is_file()]
    if paths and len(missing) * 2 > len(paths):
        raise FileNotFoundError(
            f"{field} {folder}: {len(missing)} of {len(paths)} sampled images named by "
            f"{named_by} are not there (e.g. {missing[0]}); set {field} to the folder that "
            "holds them")
