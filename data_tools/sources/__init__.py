"""Input kinds the shard builder reads, each enumerated as :class:`Item` s in a stable order.

``folder``   images with sidecar captions, nested folders too           (sources/folder.py)
``manifest`` .csv / .tsv / .parquet / .jsonl with image-path + caption  (sources/manifest.py)
``coco``     COCO-captions JSON                                          (sources/coco.py)
``shards``   existing WebDataset tars: a tar, a folder of tars, a brace pattern (sources/shards.py)

The kind is detected from the path (:func:`detect_kind`) unless forced. Several inputs are read
one after another in command-line order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from data_tools.sources.base import (
    FileRef,
    InvocationError,
    Item,
    TarMemberRef,
    display,
    safe_join,
)
from data_tools.sources.coco import COCO_MODES, CocoSource
from data_tools.sources.folder import IMAGE_SUFFIXES, FolderSource
from data_tools.sources.manifest import MANIFEST_FORMATS, ManifestSource
from data_tools.sources.shards import ShardSource

__all__ = [
    "COCO_MODES", "KINDS", "FileRef", "InvocationError", "Item", "Source", "SourceSpec",
    "TarMemberRef", "detect_kind", "display", "iter_items", "open_source", "safe_join",
]

KINDS = ("folder", "manifest", "coco", "shards")


class Source(Protocol):
    kind: str

    def describe(self) -> dict[str, Any]: ...

    def items(self) -> Iterator[Item]: ...


@dataclass(frozen=True)
class SourceSpec:
    """One ``--input`` and the options that say how to read it."""

    path: str
    kind: str = "auto"
    image_column: str | None = None
    caption_column: str | None = None
    data_root: str | None = None
    coco_mode: str = "per-image"


def detect_kind(path: str) -> str:
    """The input kind of ``path``, from what it is and how it is named."""
    if not os.path.exists(path):
        if "{" in path and ".." in path:
            return "shards"  # a brace pattern names files that exist only once expanded
        raise InvocationError(f"input not found: {path}")
    if os.path.isdir(path):
        return "shards" if _is_shard_folder(path) else "folder"
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".tar":
        return "shards"
    if suffix in MANIFEST_FORMATS:
        return "manifest"
    if suffix == ".json":
        return "coco"
    raise InvocationError(f"cannot tell what kind of input {path} is; pass --input-format")


def _is_shard_folder(path: str) -> bool:
    """A folder whose top level holds tars and no images is a shard set, not an image tree."""
    names = os.listdir(path)
    has_tars = any(name.endswith(".tar") for name in names)
    has_images = any(os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES for name in names)
    return has_tars and not has_images


def open_source(spec: SourceSpec) -> Source:
    """Validate one input and return its source; raises :class:`InvocationError`."""
    kind = detect_kind(spec.path) if spec.kind == "auto" else spec.kind
    if kind not in KINDS:
        raise InvocationError(f"unknown input format {kind!r} (choose from {', '.join(KINDS)})")
    if kind != "shards" and not os.path.exists(spec.path):
        raise InvocationError(f"input not found: {spec.path}")
    if kind == "folder":
        if not os.path.isdir(spec.path):
            raise InvocationError(f"folder input {spec.path} is not a directory")
        return FolderSource(spec.path)
    if kind == "manifest":
        return ManifestSource(spec.path, spec.image_column, spec.caption_column, spec.data_root)
    if kind == "coco":
        return CocoSource(spec.path, spec.data_root, spec.coco_mode)
    return ShardSource(spec.path)


def iter_items(sources: list[Source]) -> Iterator[Item]:
    """Every item of every source, in command-line order, then each source's own order."""
    for source in sources:
        yield from source.items()
