"""Caption decoding and cleaning: UTF-8 enforced, control characters and whitespace normalised.

Captions from crawls carry stray bytes: Windows-1252 text, NULs, carriage returns, tabs,
zero-width spaces, byte-order marks, runs of spaces. A caption is kept only when it is valid
UTF-8; it is then NFC-normalised (so the same text always has the same bytes), control
characters become spaces, invisible format characters are dropped, and every run of whitespace
(including newlines and non-breaking spaces) becomes a single space.
"""

from __future__ import annotations

import unicodedata

from data_tools.skips import Skip

# C0 and C1 control characters (Unicode category Cc) become spaces; a byte-order mark or a
# zero-width space inside a caption is invisible noise and is dropped.
_CLEAN_TABLE = {code: " " for code in (*range(0x00, 0x20), *range(0x7F, 0xA0))}
_CLEAN_TABLE.update({0xFEFF: None, 0x200B: None})


def decode_caption(raw: str | bytes) -> str:
    """Text of a caption given as bytes (strict UTF-8, BOM allowed) or as text.

    Text containing lone surrogates (a JSON ``"\\ud800"`` escape, a file name decoded with
    ``surrogateescape``) is not valid Unicode and is rejected like invalid bytes.
    """
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise Skip("caption_not_utf8", str(error)) from None
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as error:
        raise Skip("caption_not_utf8", str(error)) from None
    return raw


def clean_caption(text: str) -> str:
    """NFC-normalised text with control characters removed and whitespace collapsed."""
    text = unicodedata.normalize("NFC", text).translate(_CLEAN_TABLE)
    return " ".join(text.split())


def caption_or_skip(raw: str | bytes | None, min_length: int = 1) -> str:
    """The cleaned caption, or :class:`Skip` naming why it cannot be used."""
    if raw is None:
        raise Skip("missing_caption")
    text = clean_caption(decode_caption(raw))
    if not text:
        raise Skip("empty_caption")
    if len(text) < min_length:
        raise Skip("caption_too_short", f"{len(text)} < {min_length} characters")
    return text
