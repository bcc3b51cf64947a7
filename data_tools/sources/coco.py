"""COCO-captions JSON: ``images`` (``id``, ``file_name``, ...) and ``annotations``
(``image_id``, ``caption``).

``per-image`` (the default) makes one sample per image: its first caption goes to ``.txt`` and
all of them to the ``captions`` list of the ``.json``. ``per-caption`` makes one sample per
annotation (five copies of each COCO image, one caption each), as CLIP training on COCO often
does. Images come in the order of the ``images`` list, captions in annotation order.

``file_name`` resolves against the data root (``--data-root``, for COCO usually the
``train2017/`` folder; the JSON's folder by default) and must stay inside it.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from data_tools.sources.base import (
    FileRef,
    InvocationError,
    Item,
    carry_extras,
    display,
    safe_join,
)

COCO_MODES = ("per-image", "per-caption")


class CocoSource:
    kind = "coco"

    def __init__(self, path: str, data_root: str | None = None, mode: str = "per-image") -> None:
        if mode not in COCO_MODES:
            raise InvocationError(f"COCO mode {mode!r} is not one of {', '.join(COCO_MODES)}")
        self.path = path
        self.mode = mode
        self.data_root = data_root or os.path.dirname(os.path.abspath(path))
        try:
            with open(path, "rb") as handle:
                data = json.load(handle)
        except (OSError, ValueError) as error:
            raise InvocationError(f"cannot read COCO captions {path}: {error}") from None
        if not (isinstance(data, dict) and isinstance(data.get("images"), list)
                and isinstance(data.get("annotations"), list)):
            raise InvocationError(f"{path} is not COCO captions (needs 'images' and 'annotations')")
        self._images = data["images"]
        self._annotations = data["annotations"]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": os.path.abspath(self.path), "mode": self.mode,
                "data_root": os.path.abspath(self.data_root)}

    def items(self) -> Iterator[Item]:
        captions = self._captions_by_image()
        for index, image in enumerate(self._images):
            yield from self._image_items(index, image, captions)

    def _captions_by_image(self) -> dict[Any, list[tuple[Any, str]]]:
        captions: dict[Any, list[tuple[Any, str]]] = defaultdict(list)
        for annotation in self._annotations:
            if isinstance(annotation, dict) and annotation.get("caption") is not None:
                caption = annotation["caption"]
                captions[_hashable(annotation.get("image_id"))].append(
                    (annotation.get("id"), caption if isinstance(caption, str) else str(caption))
                )
        return captions

    def _image_items(self, index: int, image: Any,
                     captions: dict[Any, list[tuple[Any, str]]]) -> Iterator[Item]:
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str):
            yield Item(source_id=f"{display(os.path.basename(self.path))}:{index}", skip="bad_row")
            return
        file_name = image["file_name"]
        source_id = display(file_name)
        extra = carry_extras({k: v for k, v in image.items() if k != "file_name"})
        path = safe_join(self.data_root, file_name)
        if path is None:
            yield Item(source_id=source_id, extra=extra, skip="path_outside_root")
            return
        found = captions.get(_hashable(image.get("id")), [])
        if not found:
            yield Item(source_id=source_id, extra=extra, skip="missing_caption")
        elif self.mode == "per-image":
            texts = tuple(text for _, text in found)
            yield Item(source_id=source_id, image=FileRef(path), captions=texts, extra=extra)
        else:
            for annotation_id, text in found:
                yield Item(source_id=source_id, image=FileRef(path), captions=(text,),
                           extra={**extra, "annotation_id": annotation_id})


def _hashable(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool | type(None)) else repr(value)
