"""ImageNet as users have it: an ImageFolder tree (``train/<wnid>/*.JPEG``), listed and turned
into labelled shards.

The class index of an image is the position of its folder's name in the class list (the sorted
folder names unless a list is given), which for ImageNet-1K's wnids is the standard index order
(timm's and torchvision's). Class names come from timm's ImageNet metadata, not a typed list.

Labelled shards keep the shard writer's layout; each sample's ``.json`` holds ``cls`` (the class
index) and ``wnid`` (its folder), its ``.txt`` the class name, and ``classes.json`` beside the
shards lists the classes in index order. Images that do not decode are skipped and counted by
reason, as in the caption shard builder. Valid RGB or greyscale JPEGs are stored as they are
(no re-encoding loss); other files (ImageNet has CMYK JPEGs and a PNG named ``.JPEG``) are
re-encoded as RGB JPEG.
"""

from __future__ import annotations

import io
import json
import os
import random
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_tools.files import atomic_write_text
from data_tools.images import SAFE_FORMATS, to_rgb
from data_tools.shard_writer import (
    Sample,
    ShardWriter,
    is_complete,
    read_stats,
    shard_pattern,
    write_sizes,
)
from data_tools.skips import Skip

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CLASSES_FILE = "classes.json"


@dataclass(frozen=True)
class ImageFolderIndex:
    """An ImageFolder's images in a fixed order (class, then file name) with class indices.

    ``files`` holds paths relative to ``root`` as a numpy byte-string array: 1.28M ImageNet
    paths cost ~80 MB once, and forked loader workers share it without touching Python
    refcounts (a list of str would be copied page by page into every worker).
    """

    root: Path
    classes: list[str]
    files: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.root / os.fsdecode(self.files[index])


def scan_imagefolder(root: Path | str, classes: list[str] | None = None) -> ImageFolderIndex:
    """List ``root/<class>/**/<image>``; ``classes`` fixes the class order (and which folders
    count), e.g. the training split's for a validation split. Raises ``FileNotFoundError`` or
    ``ValueError`` naming the folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such image folder: {root}")
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if classes is None:
        classes = folders
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise ValueError(f"{root}: folders {unknown[:5]} are not among the {len(classes)} "
                         "classes")
    files: list[bytes] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue  # a validation split may lack a class
        for directory, subdirs, names in os.walk(folder):
            subdirs.sort()
            for file_name in sorted(names):
                if file_name.lower().endswith(IMAGE_SUFFIXES):
                    relative = os.path.relpath(os.path.join(directory, file_name), root)
                    files.append(os.fsencode(relative))
                    labels.append(index)
    if not files:
        raise ValueError(f"{root}: expected one sub-folder of images per class "
                         f"({', '.join(IMAGE_SUFFIXES)}), found {len(folders)} folders and no "
                         "image")
    return ImageFolderIndex(root, list(classes), np.array(files), np.array(labels, np.int64))


def class_names(wnids: list[str]) -> list[str]:
    """Readable names of WordNet ids from timm's ImageNet metadata (the first lemma, e.g.
    ``n01440764`` -> ``tench``); a folder name that is no wnid stays as it is."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-22k")  # the superset: every ImageNet-1K and 21K wnid
    names = []
    for wnid in wnids:
        try:
            names.append(info.label_name_to_description(wnid).split(",")[0].strip())
        except (KeyError, ValueError):
            names.append(wnid)
    return names


# --------------------------------------------------------------------------- images
def read_image_file(path: Path) -> tuple[bytes, str]:
    """The file's bytes ready for a shard (``(data, "jpg")``): kept as they are when they are
    an RGB or greyscale JPEG, else decoded and re-encoded as RGB JPEG. Raises :class:`Skip`."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise Skip("unreadable_file", f"{path}: {error}") from None
    if not data:
        raise Skip("empty_file", str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=SAFE_FORMATS)
            image.load()
        except UnidentifiedImageError:
            raise Skip("not_an_image", str(path)) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise Skip("too_many_pixels", str(path)) from None
        except (OSError, SyntaxError, ValueError) as error:
            reason = "truncated_image" if "truncated" in str(error).lower() else "corrupt_image"
            raise Skip(reason, f"{path}: {error}") from None
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
        return data, "jpg"
    out = io.BytesIO()
    to_rgb(image).save(out, format="JPEG", quality=95)
    return out.getvalue(), "jpg"


# --------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class ShardTask:
    index: int
    items: list[tuple[str, int]]  # (path relative to the root, class index)


def _write_shard(task: ShardTask, root: Path, output: Path, classes: list[str],
                 names: list[str], report: Callable[[int], None]) -> dict[str, Any]:
    skipped: Counter[str] = Counter()
    with ShardWriter(output, task.index) as writer:
        for relative, label in task.items:
            try:
                data, ext = read_image_file(root / relative)
            except Skip as skip:
                skipped[skip.reason] += 1
                continue
            finally:
                report(1)
            writer.add(Sample(image=data, caption=names[label], image_ext=ext, meta={
                "cls": label, "wnid": classes[label], "source_path": relative}))
        return writer.finish({"skipped": dict(skipped)})


class _ShardJob:
    """Picklable ``fn(task, report)`` for the worker pool."""

    def __init__(self, root: Path, output: Path, classes: list[str], names: list[str]) -> None:
        self.root, self.output, self.classes, self.names = root, output, classes, names

    def __call__(self, task: ShardTask, report: Callable[[int], None]) -> dict[str, Any]:
        return _write_shard(task, self.root, self.output, self.classes, self.names, report)


def imagefolder_to_shards(root: Path | str, output: Path | str, samples_per_shard: int = 1000,
                          shuffle_seed: int | None = 0, classes: list[str] | None = None,
                          workers: int = 1, progress: Callable[[int], None] | None = None,
                          ) -> dict[str, Any]:
    """Write labelled shards of an ImageFolder; returns a summary (pattern, samples, skipped
    by reason, classes).

    ``shuffle_seed`` mixes the classes across shards (a training stream reads a few shards at a
    time, so class-sorted shards would give class-sorted batches); ``None`` keeps the folder
    order (validation). Shards already complete in ``output`` (from an interrupted run with the
    same arguments) are kept; ``classes.json`` and ``sizes.json`` are written last.
    """
    from data_tools.workers import WorkerPool

    index = scan_imagefolder(root, classes)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    order = list(range(len(index)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    items = [(os.fsdecode(index.files[i]), int(index.labels[i])) for i in order]
    tasks = [ShardTask(n, items[start:start + samples_per_shard])
             for n, start in enumerate(range(0, len(items), samples_per_shard))]
    names = class_names(index.classes)
    job = _ShardJob(index.root, output, index.classes, names)
    stats = [read_stats(output, t.index) for t in tasks if is_complete(output, t.index)]
    todo = [t for t in tasks if not is_complete(output, t.index)]
    with WorkerPool(workers) as pool:
        stats += list(pool.unordered_map(job, todo, progress or (lambda count: None)))
    skipped: Counter[str] = Counter()
    for shard_stats in stats:
        skipped.update(shard_stats.get("skipped", {}))
    atomic_write_text(output / CLASSES_FILE, json.dumps(
        {"wnids": index.classes, "names": names}, indent=1) + "\n")
    sizes = write_sizes(output, [t.index for t in tasks])
    return {"shards": shard_pattern(output, len(tasks)), "samples": sum(sizes.values()),
            "skipped": dict(skipped), "classes": len(index.classes)}


def read_classes(shard_dir: Path | str) -> list[str]:
    """The wnids (class index order) that :func:`imagefolder_to_shards` wrote beside shards."""
    path = Path(shard_dir) / CLASSES_FILE
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["wnids"])
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: no class list ({error})") from None
