"""Captions: UTF-8 enforced, control characters and whitespace cleaned, minimum length."""

from __future__ import annotations

import pytest

from data_tools.captions import caption_or_skip, clean_caption
from data_tools.skips import Skip


def test_whitespace_and_control_characters_become_single_spaces() -> None:
    raw = "  a\tdog\r\non\x00the\x1b  beach\u00a0\u2028at\u200b night\ufeff \x85 "
    assert clean_caption(raw) == "a dog on the beach at night"


def test_same_text_in_different_unicode_forms_gives_the_same_caption() -> None:
    decomposed = "cafe\u0301 au lait"
    assert clean_caption(decomposed) == "caf\u00e9 au lait"
    assert clean_caption(decomposed).encode() == "café au lait".encode()


def test_utf8_bytes_are_decoded_and_a_bom_dropped() -> None:
    assert caption_or_skip("\ufeffune tête".encode()) == "une tête"


@pytest.mark.parametrize("raw", ["caf\xe9 cr\xe8me".encode("cp1252"), b"\xff\xfe", "a\ud800b"])
def test_invalid_utf8_is_rejected(raw: str | bytes) -> None:
    with pytest.raises(Skip) as skip:
        caption_or_skip(raw)
    assert skip.value.reason == "caption_not_utf8"


@pytest.mark.parametrize("raw", ["", " \n\t ", b"\x00\x01", None])
def test_empty_or_missing_caption(raw: str | bytes | None) -> None:
    with pytest.raises(Skip) as skip:
        caption_or_skip(raw)
    assert skip.value.reason == ("missing_caption" if raw is None else "empty_caption")


def test_minimum_length_counts_cleaned_characters() -> None:
    assert caption_or_skip("a  red\n\nball", min_length=10) == "a red ball"
    with pytest.raises(Skip) as skip:
        caption_or_skip("a  red\n\nbal", min_length=10)
    assert skip.value.reason == "caption_too_short"
