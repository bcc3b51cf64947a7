"""A COCO ``instances_*.json`` as detection targets: contiguous labels, xyxy boxes, masks.

COCO's category ids have gaps (1..90 with 80 used), so a model predicts contiguous labels
1..K (0 is the background of torchvision's detectors) and :meth:`CocoIndex.category_of` maps
them back for evaluation. Crowd objects (``iscrowd=1``) are ignore regions of the evaluation,
never training targets, and a box that is empty once clipped to its image cannot be learned:
both are left out of :meth:`CocoIndex.target`, and an image left with no object at all is left
out of :meth:`CocoIndex.training_image_ids` (validation keeps every image; COCOeval reads the
original json, crowds included).

The json is read with :func:`json.load` and only what training needs is kept per image, so
the index is checked once, with one-line errors naming the file, and costs no pycocotools
indexing. Masks are decoded on demand with ``pycocotools.mask`` exactly as ``COCO.annToMask``
decodes them (polygons with several parts merged, uncompressed and compressed RLE).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch

# A polygon part needs three points; pycocotools reads a first part of exactly four numbers as
# a box, and rejects shorter ones.
_MIN_POLYGON_COORDS = 6


def clipped_box(bbox: Any, height: int, width: int) -> tuple[float, float, float, float] | None:
    """COCO ``[x, y, w, h]`` -> ``(x1, y1, x2, y2)`` clipped to the image, or None when the
    clipped box is under one pixel wide or high (nothing a detector can regress to)."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    return x1, y1, x2, y2


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """One object's mask (H, W) uint8 from a COCO segmentation: a polygon list (parts merged),
    an uncompressed RLE (``counts`` a list) or a compressed one (``counts`` a string)."""
    if isinstance(segmentation, list):
        parts = [p for p in segmentation
                 if len(p) >= _MIN_POLYGON_COORDS and len(p) % 2 == 0]
        if not parts:
            raise ValueError("a polygon needs at least three points")
        rle = mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str | bytes):
        rle = segmentation
    else:
        raise ValueError("segmentation is neither polygons nor RLE")
    if [int(s) for s in rle["size"]] != [height, width]:
        raise ValueError(f"RLE of size {rle['size']} on an image of {height}x{width}")
    with warnings.catch_warnings():
        # pycocotools 2.0.x's decode trips numpy 2's copy=False deprecation; harmless
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return np.ascontiguousarray(mask_utils.decode(rle))


class CocoIndex:
    """Images, categories and per-image objects of one COCO annotation file (module
    docstring). Raises ``FileNotFoundError`` / ``ValueError`` in one line naming the file."""

    def __init__(self, annotation_file: str | Path, image_root: str | Path) -> None:
        self.annotation_file, self.image_root = Path(annotation_file), Path(image_root)
        data = self._load()
        self._images: dict[int, dict[str, Any]] = {}
        for image in self._list(data, "images"):
            try:
                image_id = int(image["id"])
                entry = {"file_name": str(image["file_name"]),
                         "height": int(image["height"]), "width": int(image["width"])}
            except (KeyError, TypeError, ValueError) as error:
                raise self._error(f"an image entry lacks id/file_name/height/width ({error})"
                                  ) from None
            if image_id in self._images:
                raise self._error(f"image id {image_id} appears twice")
            self._images[image_id] = entry
        categories: dict[int, str] = {}
        for category in self._list(data, "categories"):
            try:
                category_id, name = int(category["id"]), str(category["name"])
            except (KeyError, TypeError, ValueError) as error:
                raise self._error(f"a category entry lacks id/name ({error})") from None
            if category_id in categories:
                raise self._error(f"category id {category_id} appears twice")
            categories[category_id] = name
        if not categories:
            raise self._error("no categories")
        self.category_ids: list[int] = sorted(categories)
        self.category_names: list[str] = [categories[c] for c in self.category_ids]
        self.num_classes: int = len(self.category_ids)
        self.image_ids: list[int] = sorted(self._images)
        self._labels = {c: k + 1 for k, c in enumerate(self.category_ids)}
        self._objects: dict[int, list[dict[str, Any]]] = {i: [] for i in self._images}
        for annotation in self._list(data, "annotations"):
            self._add(annotation)
        self._training_ids: list[int] | None = None

    def _load(self) -> dict[str, Any]:
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"{self.annotation_file}: no such annotation file")
        try:
            with open(self.annotation_file, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise self._error(f"not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise self._error("not a COCO annotation file (the top level is not an object)")
        return data

    def _list(self, data: dict[str, Any], key: str) -> list[dict[str, Any]]:
        if not isinstance(data.get(key), list):
            raise self._error(f"no '{key}' list (not a COCO instances file?)")
        return data[key]

    def _error(self, message: str) -> ValueError:
        return ValueError(f"{self.annotation_file}: {message}")

    def _add(self, annotation: dict[str, Any]) -> None:
        ann_id = annotation.get("id", "?")
        try:
            image_id, category_id = int(annotation["image_id"]), int(annotation["category_id"])
            bbox = [float(v) for v in annotation["bbox"]]
        except (KeyError, TypeError, ValueError) as error:
            raise self._error(f"annotation {ann_id} lacks image_id/category_id/bbox "
                              f"({error})") from None
        if image_id not in self._images:
            raise self._error(f"annotation {ann_id} refers to unknown image {image_id}")
        if category_id not in self._labels:
            raise self._error(f"annotation {ann_id} refers to unknown category {category_id}")
        if len(bbox) != 4:
            raise self._error(f"annotation {ann_id}: bbox has {len(bbox)} numbers, not 4")
        # Only what target() needs is kept, the segmentation as one JSON string: COCO train's
        # polygons as Python lists are tens of millions of float objects, which every forked
        # data worker would slowly copy as their reference counts change.
        segmentation = annotation.get("segmentation")
        self._objects[image_id].append({
            "label": self._labels[category_id], "bbox": bbox,
            "iscrowd": bool(annotation.get("iscrowd", 0)),
            "segmentation": json.dumps(segmentation, separators=(",", ":"))
            if segmentation else None, "id": ann_id,
        })

    def label_of(self, category_id: int) -> int:
        """The contiguous label (1..K) of a COCO category id."""
        try:
            return self._labels[int(category_id)]
        except KeyError:
            raise ValueError(f"{self.annotation_file}: unknown category {category_id}") from None

    def category_of(self, label: int) -> int:
        """The COCO category id of a contiguous label (1..K)."""
        if not 1 <= int(label) <= self.num_classes:
            raise ValueError(f"label {label} is not in 1..{self.num_classes}")
        return self.category_ids[int(label) - 1]

    def image_size(self, image_id: int) -> tuple[int, int]:
        """(height, width) as the json records it (no image is read)."""
        image = self._images[image_id]
        return image["height"], image["width"]

    def listed_path(self, image_id: int) -> str:
        """``image_root / file_name`` as text, unchecked: for messages and the skip list."""
        return str(self.image_root / self._images[image_id]["file_name"])

    def image_path(self, image_id: int) -> Path:
        """``image_root / file_name``; a ``file_name`` that is absolute or climbs out of the
        image root is refused, so a hostile json cannot make the loader read other files."""
        name = self._images[image_id]["file_name"]
        normal = os.path.normpath(name)
        if os.path.isabs(name) or normal == ".." or normal.startswith(".." + os.sep):
            raise ValueError(f"{self.annotation_file}: image {image_id} has file_name {name!r}, "
                             f"which is outside {self.image_root}")
        return self.image_root / normal

    def _usable(self, image_id: int) -> list[tuple[dict[str, Any], tuple[float, ...]]]:
        height, width = self.image_size(image_id)
        usable = []
        for obj in self._objects[image_id]:
            box = None if obj["iscrowd"] else clipped_box(obj["bbox"], height, width)
            if box is not None:
                usable.append((obj, box))
        return usable

    def training_image_ids(self) -> list[int]:
        """Images with at least one non-crowd object whose clipped box is at least a pixel wide
        and high; the others teach a detector nothing and are left out of training."""
        if self._training_ids is None:
            self._training_ids = [i for i in self.image_ids if self._usable(i)]
        return list(self._training_ids)

    def target(self, image_id: int) -> dict[str, torch.Tensor]:
        """The image's usable objects (module docstring): ``boxes`` float32 (N, 4) xyxy pixels,
        ``labels`` int64 (N,) in 1..K, ``masks`` uint8 (N, H, W). An object without a
        segmentation (a box-only file) gets its box as mask."""
        height, width = self.image_size(image_id)
        usable = self._usable(image_id)
        masks = np.zeros((len(usable), height, width), dtype=np.uint8)
        for n, (obj, box) in enumerate(usable):
            if obj["segmentation"]:
                try:
                    masks[n] = decode_segmentation(json.loads(obj["segmentation"]), height,
                                                   width)
                except ValueError as error:
                    raise ValueError(f"{self.annotation_file}: annotation {obj['id']}: "
                                     f"{error}") from None
            else:
                x1, y1, x2, y2 = box
                masks[n, int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = 1
        return {
            "boxes": torch.tensor([box for _, box in usable],
                                  dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([obj["label"] for obj, _ in usable], dtype=torch.int64),
            "masks": torch.from_numpy(masks),
        }
