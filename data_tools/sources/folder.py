"""A folder tree of images with sidecar captions: ``a/b/name.jpg`` + ``a/b/name.txt``.

The tree is walked in byte order of names (directories and files sorted at every level), so the
order does not depend on the file system, the locale, or how the files were copied. Symbolic
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
        errors: list[OSError] = []
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=errors.append):
            yield from self._errors(errors)
            dirnames.sort(key=os.fsencode)
            present = set(filenames)
            for name in sorted(filenames, key=os.fsencode):
                stem, suffix = os.path.splitext(name)
                if suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                yield self._item(dirpath, name, _sidecar(stem, present))
        yield from self._errors(errors)

    def _item(self, dirpath: str, name: str, caption_name: str | None) -> Item:
        path = os.path.join(dirpath, name)
        source_id = display(os.path.relpath(path, self.root))
        if caption_name is None:
            return Item(source_id=source_id, skip="missing_caption")
        caption_file = os.path.join(dirpath, caption_name)
        return Item(source_id=source_id, image=FileRef(path), caption_file=caption_file)

    def _errors(self, errors: list[OSError]) -> Iterator[Item]:
        while errors:
            error = errors.pop(0)
            yield Item(source_id=display(str(error.filename)), skip="unreadable_input")


def _sidecar(stem: str, present: set[str]) -> str | None:
    for suffix in (".txt", ".TXT"):
        if stem + suffix in present:
            return stem + suffix
    return None
