"""What every input kind yields: :class:`Item`, one candidate sample in input order.

An item names where its image bytes live (a file, or a member of a tar) and carries its caption
(text, raw bytes, or a sidecar file to read) and extra metadata. Reading and decoding happen
later, in the worker that builds the item's shard, so enumerating an input is cheap and the
same input always enumerates to the same items in the same order. Problems found while
enumerating (an unsafe path, a malformed manifest row) are recorded on the item as a skip
reason, so they are counted with the shard the item falls in like any other bad sample.
"""

from __future__ import annotations

import datetime
import decimal
import math
import os
from dataclasses import dataclass, field
from typing import Any

# Fields the builder writes into every sample's .json; input metadata that uses one of these
# names is kept under ``source_<name>`` instead of being overwritten or overwriting.
RESERVED_FIELDS = frozenset({
    "key", "caption", "captions", "status", "source_id", "sha256",
    "width", "height", "original_width", "original_height",
})


class InvocationError(Exception):
    """The command line cannot work (missing input, unusable manifest, bad option value)."""


@dataclass(frozen=True, slots=True)
class FileRef:
    path: str


@dataclass(frozen=True, slots=True)
class TarMemberRef:
    path: str
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Item:
    """One candidate sample: where its image is, its caption(s), and extra metadata."""

    source_id: str
    image: FileRef | TarMemberRef | None = None
    captions: tuple[str | bytes, ...] = ()
    caption_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None


def display(text: str) -> str:
    """Printable UTF-8 text for a path or string that may hold undecodable bytes.

    File names on Linux are bytes; Python decodes the invalid ones to lone surrogates, which
    JSON and parquet cannot store. They are shown as backslash escapes instead.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = os.fsencode(text)  # undo surrogateescape: the original bytes
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def safe_join(root: str, value: str) -> str | None:
    """``value`` (a path taken from data) resolved under ``root``, or None when it escapes.

    Relative paths are joined to ``root``; absolute paths are accepted only when they lie under
    it. The check is lexical (``..`` is resolved, symbolic links are not): it stops data from
    naming files outside the root, while a root that itself links to other disks keeps working.
    """
    if not value or "\x00" in value:
        return None
    root = os.path.normpath(os.path.abspath(root))
    candidate = os.path.normpath(value if os.path.isabs(value) else os.path.join(root, value))
    prefix = root if root.endswith(os.sep) else root + os.sep
    return candidate if candidate.startswith(prefix) else None


def json_safe(value: Any) -> Any:
    """``value`` as something ``json.dumps`` writes as strict JSON and parquet can store."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return display(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {display(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    return display(str(value))


def carry_extras(fields: dict[str, Any]) -> dict[str, Any]:
    """Input metadata for a sample's .json, JSON-safe, reserved names moved to ``source_*``."""
    extra = {}
    for name, value in fields.items():
        name = display(str(name))
        extra[f"source_{name}" if name in RESERVED_FIELDS else name] = json_safe(value)
    return extra
