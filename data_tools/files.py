"""Writing files so that a crash never leaves half of one behind.

Everything the project publishes (shards' side files, configs, checkpoints' extras, exports,
metrics) is written to ``NAME.tmp`` beside its destination and renamed over it: a rename within
a directory is atomic, so readers see the old file or the new one, never a torn one. This module
is the one place that does it (``data_tools`` is the bottom layer, so every package can use it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path | str, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and rename the result over ``path``; the temporary file is
    removed if ``write`` fails. Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: Path | str, payload: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(payload))


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: Any, path: Path | str) -> Path:
    import torch  # data_tools itself does not need torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
