"""Why a sample was skipped: one reason per bad input class, counted in stats and summaries.

A bad sample never stops a build. Code that finds one raises :class:`Skip` with a reason from
:data:`REASONS`; the shard builder catches it, counts it, and moves on to the next sample.
"""

from __future__ import annotations

REASONS: dict[str, str] = {
    "missing_file": "the image file does not exist",
    "unreadable_file": "the image file could not be read (permissions, I/O error, not a file)",
    "empty_file": "the image file has 0 bytes",
    "file_too_large": "the image or caption file is larger than the byte limit",
    "truncated_file": "a tar member ends before its declared size",
    "not_an_image": "the bytes are not an image of a supported format (text, HTML, ...)",
    "truncated_image": "the image data ends early",
    "corrupt_image": "the image could not be decoded",
    "unsupported_image_mode": "the image's colour mode cannot be converted to RGB",
    "too_many_pixels": "the image (or its resized output) exceeds --max-pixels",
    "image_too_small": "the image's smaller side is below --min-image-size",
    "aspect_ratio_too_large": "the image's aspect ratio exceeds --max-aspect-ratio",
    "missing_caption": "no caption was found for the image",
    "caption_not_utf8": "the caption is not valid UTF-8",
    "empty_caption": "the caption is empty after cleaning",
    "caption_too_short": "the caption is shorter than --min-caption-length after cleaning",
    "duplicate": "the image bytes were already written earlier in input order (--dedup)",
    "missing_path": "the manifest row has no image path",
    "path_outside_root": "the image path is absolute or leaves the data root",
    "unsupported_url": "the image is a URL (download it first, e.g. with img2dataset)",
    "bad_row": "the manifest row could not be parsed",
    "duplicate_key": "an input tar repeats a sample's key right after it (the first is kept)",
    "unreadable_input": "an input shard could not be read (missing, truncated or corrupt tar)",
}


class Skip(Exception):
    """A sample that cannot be written; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
