"""Turn one :class:`Item` into a :class:`Sample` (or a :class:`Skip`): read, check, encode.

The checks run cheapest first: the recorded skip, the caption, the bytes, the duplicate test,
and only then the image decode. The dedup pre-pass (:func:`content_digest`) runs the same
checks up to the bytes, so an item claims its content hash exactly when it would reach the
decoder; identical bytes always decode the same way, so "the first occurrence in input order
wins" also means "the first one that would have been written wins".
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from typing import BinaryIO

from data_tools.captions import caption_or_skip
from data_tools.images import ImageOptions, encode_image
from data_tools.shard_writer import Sample
from data_tools.skips import Skip
from data_tools.sources import FileRef, Item, TarMemberRef

DEFAULT_MAX_FILE_BYTES = 64 * 2**20
MAX_CAPTION_FILE_BYTES = 2**20


@dataclass(frozen=True)
class SampleOptions:
    """Everything that decides whether and how an item becomes a sample."""

    image: ImageOptions = field(default_factory=ImageOptions)
    min_caption_length: int = 1
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES


class ByteReader:
    """Reads image and caption bytes with a size cap; keeps the current input tar open."""

    def __init__(self) -> None:
        self._tar_path: str | None = None
        self._tar: BinaryIO | None = None

    def read(self, ref: FileRef | TarMemberRef, limit: int) -> bytes:
        if isinstance(ref, TarMemberRef):
            return self._read_member(ref, limit)
        return read_file(ref.path, limit)

    def _read_member(self, ref: TarMemberRef, limit: int) -> bytes:
        if ref.size > limit:
            raise Skip("file_too_large", f"{ref.size} bytes")
        try:
            if self._tar_path != ref.path:
                self.close()
                self._tar = open(ref.path, "rb")  # noqa: SIM115 - kept open across members
                self._tar_path = ref.path
            self._tar.seek(ref.offset)
            data = self._tar.read(ref.size)
        except FileNotFoundError:
            raise Skip("missing_file", ref.path) from None
        except OSError as error:
            raise Skip("unreadable_file", str(error)) from None
        if len(data) != ref.size:
            raise Skip("truncated_file", f"{len(data)} of {ref.size} bytes")
        if not data:
            raise Skip("empty_file")
        return data

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._tar, self._tar_path = None, None


def read_file(path: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, or :class:`Skip`.

    Opened non-blocking and checked with fstat before reading: a FIFO or a device named
    ``x.jpg`` would otherwise block or never end.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise Skip("missing_file", path) from None
    except (OSError, ValueError) as error:
        raise Skip("unreadable_file", str(error)) from None
    with open(fd, "rb", closefd=True) as handle:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise Skip("unreadable_file", f"{path} is not a regular file")
            if info.st_size > limit:
                raise Skip("file_too_large", f"{info.st_size} bytes")
            # Read exactly the stat size: asking for `limit` bytes would make Python allocate
            # that much up front on every call (about 1 ms per image at 64 MiB).
            data = handle.read(info.st_size)
            grew = handle.read(1)
        except OSError as error:
            raise Skip("unreadable_file", str(error)) from None
    if grew or len(data) != info.st_size:
        raise Skip("unreadable_file", f"{path} changed while being read")
    if not data:
        raise Skip("empty_file")
    return data


def _captions(item: Item, options: SampleOptions) -> list[str]:
    raw: tuple[str | bytes, ...] = item.captions
    if item.caption_file is not None:
        try:
            raw = (read_file(item.caption_file, MAX_CAPTION_FILE_BYTES),)
        except Skip as skip:
            if skip.reason == "missing_file":
                raise Skip("missing_caption", item.caption_file) from None
            if skip.reason != "empty_file":
                raise
            raw = (b"",)
    if not raw:
        raise Skip("missing_caption")
    captions, first_problem = [], None
    for text in raw:
        try:
            captions.append(caption_or_skip(text, options.min_caption_length))
        except Skip as skip:
            first_problem = first_problem or skip
    if not captions:
        raise first_problem
    return captions


def _checked_bytes(item: Item, options: SampleOptions,
                   reader: ByteReader) -> tuple[list[str], bytes]:
    if item.skip is not None:
        raise Skip(item.skip)
    captions = _captions(item, options)
    if item.image is None:
        raise Skip("missing_file")
    return captions, reader.read(item.image, options.max_file_bytes)


def content_digest(item: Item, options: SampleOptions, reader: ByteReader) -> bytes | None:
    """sha256 of the item's image bytes if the item would reach the decoder, else None."""
    try:
        _, data = _checked_bytes(item, options, reader)
    except Skip:
        return None
    return hashlib.sha256(data).digest()


def make_sample(item: Item, options: SampleOptions, reader: ByteReader,
                duplicate: bool = False) -> Sample:
    """The encoded sample for ``item``, or :class:`Skip` naming why it is not written."""
    captions, data = _checked_bytes(item, options, reader)
    if duplicate:
        raise Skip("duplicate")
    encoded = encode_image(data, options.image)
    meta = {
        # A re-sharded input that records its first download's size passes it as
        # original_width/height (see sources/shards.py): it wins over the input's own size.
        "original_width": encoded.original_width,
        "original_height": encoded.original_height,
        **item.extra,
        "source_id": item.source_id,
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": encoded.width,
        "height": encoded.height,
    }
    if len(item.captions) > 1:
        meta["captions"] = captions
    return Sample(image=encoded.data, caption=captions[0], image_ext=encoded.ext, meta=meta)
