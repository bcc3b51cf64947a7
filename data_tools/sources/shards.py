"""Existing WebDataset shards (a tar, a folder of tars, or a brace pattern), to re-shard,
re-size or filter.

Members are grouped into samples the way webdataset does it: consecutive members sharing the
name up to the first dot of the basename form one sample, the rest of the name is the field
(``jpg``, ``txt``, ``json``). Member names are used only for that grouping, never as paths to
write. An item points at its image by byte offset inside the tar, so the worker that builds
its shard reads just those bytes; captions and metadata (small) are read while enumerating.

Only local, uncompressed tars are read (what webdataset writers produce). A missing, truncated
or corrupt tar costs the samples that cannot be read, counted as ``unreadable_input``; every
complete sample before the damage is kept.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO

import braceexpand

from data_tools.captions import clean_caption, decode_caption
from data_tools.skips import Skip
from data_tools.sources.base import (
    InvocationError,
    Item,
    TarMemberRef,
    carry_extras,
    display,
)

# The image field of a sample, in order of preference.
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "jp2", "avif")
# Fields of the old .json that describe the old sample's state rather than its content:
# regenerated (every sample read from a tar was a success). The rest is carried over: ``url``
# as it is, ``key`` as ``source_key``, ``caption`` as ``source_caption`` where it differs from
# the caption written, the other names the builder writes itself as ``source_<name>``.
_DROPPED_FIELDS = frozenset({"status", "error_message", "source_id"})
# The first download's size (img2dataset's, or an earlier build's) stays the sample's original
# size; the input image may already be a resized copy of it.
_ORIGINAL_SIZE = ("original_width", "original_height")
_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE
_KEY_PATTERN = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def expand_shards(spec: str) -> list[str]:
    """Tar paths named by ``spec``: a folder's ``*.tar`` (sorted), or a brace pattern."""
    if "://" in spec:
        raise InvocationError(f"only local shards can be read, not {spec}")
    if os.path.isdir(spec):
        names = sorted((n for n in os.listdir(spec) if n.endswith(".tar")), key=os.fsencode)
        paths = [os.path.join(spec, name) for name in names]
    else:
        paths = list(braceexpand.braceexpand(spec))
    if not any(os.path.isfile(path) for path in paths):
        raise InvocationError(f"no shards found at {spec}")
    return paths


class ShardSource:
    kind = "shards"

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.paths = expand_shards(spec)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "paths": [os.path.abspath(p) for p in self.paths]}

    def items(self) -> Iterator[Item]:
        for path in self.paths:
            yield from _tar_items(path)


def _tar_items(path: str) -> Iterator[Item]:
    """The samples of one tar. Damage (a truncated or corrupt tar) yields the sample it cut as
    ``truncated_file`` and one ``unreadable_input`` for the tar; samples after it are lost."""
    label = display(path)
    try:
        with open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            yield from _members_to_items(handle, tar, path)
    except (OSError, tarfile.TarError):
        yield Item(source_id=label, skip="unreadable_input")


def _members_to_items(handle: BinaryIO, tar: tarfile.TarFile, path: str) -> Iterator[Item]:
    label = display(path)
    members = iter(tar)
    prefix, group, repeat = None, {}, False
    while True:
        try:
            member = next(members)
        except StopIteration:
            break
        except (OSError, EOFError, tarfile.TarError):
            if group:
                yield Item(source_id=f"{label}#{display(prefix)}", skip="truncated_file")
            yield Item(source_id=label, skip="unreadable_input")
            return
        match = _KEY_PATTERN.match(member.name)
        if not member.isfile() or member.issparse() or match is None:
            continue
        key, field = match.group(1), match.group(2).lower()
        if key != prefix or field in group:  # a field seen again starts a sample of its own
            if group:
                yield _item_or_repeat(tar, path, prefix, group, repeat)
            repeat = key == prefix  # the key right after itself: a duplicate, not a sample
            prefix, group = key, {}
        group[field] = member
    if group:
        yield _item_or_repeat(tar, path, prefix, group, repeat)
    if not ends_cleanly(handle, tar.offset):
        yield Item(source_id=label, skip="unreadable_input")


def ends_cleanly(handle: BinaryIO, offset: int) -> bool:
    """Whether the tar holds its end-of-archive blocks (zeros) where its last member ends.

    tarfile stops iterating silently at a truncated or garbled header past the first member, so
    without this check a damaged tar would simply look shorter.
    """
    handle.seek(offset)
    tail = handle.read(_END_OF_ARCHIVE)
    return len(tail) == _END_OF_ARCHIVE and not tail.strip(b"\0")


def _item_or_repeat(tar: tarfile.TarFile, path: str, prefix: str,
                    group: dict[str, tarfile.TarInfo], repeat: bool) -> Item:
    """The sample of ``group``; a second sample with the key just before it is a
    ``duplicate_key`` skip (the first is kept, as webdataset's reader does)."""
    if repeat:
        return Item(source_id=f"{display(path)}#{display(prefix)}", skip="duplicate_key")
    return _item(tar, path, prefix, group)


def _item(tar: tarfile.TarFile, path: str, prefix: str, group: dict[str, tarfile.TarInfo]) -> Item:
    source_id = f"{display(path)}#{display(prefix)}"
    try:
        caption = _read(tar, group["txt"]) if "txt" in group else None
        meta = _read_json(tar, group["json"]) if "json" in group else {}
    except (OSError, EOFError, tarfile.TarError):
        return Item(source_id=source_id, skip="truncated_file")
    old_id = meta.get("source_id") or meta.get("url")
    if isinstance(old_id, str) and old_id:
        source_id = display(old_id)  # keep the provenance of the original sample
    if caption is None and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    extra = _carried_metadata(meta, caption)
    image_field = next((f for f in IMAGE_FIELDS if f in group), None)
    if image_field is None:
        return Item(source_id=source_id, extra=extra, skip="missing_file")
    if caption is None:
        return Item(source_id=source_id, extra=extra, skip="missing_caption")
    member = group[image_field]
    image = TarMemberRef(path, member.offset_data, member.size)
    return Item(source_id=source_id, image=image, captions=(caption,), extra=extra)


def _carried_metadata(meta: dict[str, Any], caption: str | bytes | None) -> dict[str, Any]:
    """The old .json's fields for the new sample's .json (see ``_DROPPED_FIELDS``)."""
    fields = {k: v for k, v in meta.items()
              if k not in _DROPPED_FIELDS and k not in _ORIGINAL_SIZE and k != "caption"}
    if isinstance(meta.get("caption"), str) and meta["caption"] != _cleaned(caption):
        fields["source_caption"] = meta["caption"]
    extra = carry_extras(fields)
    original = {k: meta[k] for k in _ORIGINAL_SIZE if k in meta}
    if all(isinstance(original.get(k), int) and original[k] > 0 for k in _ORIGINAL_SIZE):
        extra.update(original)  # make_sample keeps these instead of measuring the input
    else:
        extra.update(carry_extras(original))
    return extra


def _cleaned(caption: str | bytes | None) -> str | None:
    try:
        return None if caption is None else clean_caption(decode_caption(caption))
    except Skip:
        return None


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    data = handle.read() if handle is not None else b""
    if len(data) != member.size:
        raise EOFError(f"{member.name} is truncated")
    return data


def _read_json(tar: tarfile.TarFile, member: tarfile.TarInfo) -> dict[str, Any]:
    try:
        meta = json.loads(_read(tar, member))
    except ValueError:
        return {}  # unreadable old metadata is dropped, the sample itself is still good
    return meta if isinstance(meta, dict) else {}
