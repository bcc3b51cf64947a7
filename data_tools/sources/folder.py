"""A folder tree of images with sidecar captions: ``a/b/name.jpg`` + ``a/b/name.txt``.

The tree is walked depth first with the entries of every folder sorted by the bytes of their
names (files and subfolders together), so the order does not depend on the file system, the
locale, or how the files were copied. Symbolic
links to files are followed (the user chose the folder), links to directories are not (no
cycles). A directory that cannot be listed is counted as one ``unreadable_input``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from data_tools.sources.base import FileRef, Item, display

IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp",
    ".tif", ".tiff", ".ppm", ".ico", ".jp2", ".avif",
})


class FolderSource:
    kind = "folder"

    def __init__(self, root: str) -> None:
        self.root = root

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": os.path.abspath(self.root)}

    def items(self) -> Iterator[Item]:
        # Depth first, entries sorted by name bytes at every level; an explicit stack, so any
        # nesting depth works.
        stack = [self._listing(self.root)]
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
            elif isinstance(entry, Item):
                yield entry
            elif entry[0].is_dir(follow_symlinks=False):
                stack.append(self._listing(entry[0].path))
            elif (item := self._item(*entry)) is not None:
                yield item

    def _listing(self, directory: str) -> Iterator[tuple[os.DirEntry, set[str]] | Item]:
        """A folder's entries in order, each with the set of names beside it (for sidecars)."""
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda e: os.fsencode(e.name))
        except OSError:
            yield Item(source_id=display(os.path.relpath(directory, self.root)),
                       skip="unreadable_input")
            return
        names = {entry.name for entry in entries}
        for entry in entries:
            yield entry, names

    def _item(self, entry: os.DirEntry, names: set[str]) -> Item | None:
        stem, suffix = os.path.splitext(entry.name)
        if suffix.lower() not in IMAGE_SUFFIXES:
            return None
        source_id = display(os.path.relpath(entry.path, self.root))
        caption_name = _sidecar(stem, names)
        if caption_name is None:
            return Item(source_id=source_id, skip="missing_caption")
        caption_file = os.path.join(os.path.dirname(entry.path), caption_name)
        return Item(source_id=source_id, image=FileRef(entry.path), caption_file=caption_file)


def _sidecar(stem: str, present: set[str]) -> str | None:
    for suffix in (".txt", ".TXT"):
        if stem + suffix in present:
            return stem + suffix
    return None
