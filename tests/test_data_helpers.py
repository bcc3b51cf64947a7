"""Helpers shared by the tests/test_data_*.py files (no tests here): small images, inputs, and
reading shards back through webdataset."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from data_tools import build_shards


def image_bytes(size: tuple[int, int] = (48, 32), color: tuple[int, ...] = (200, 30, 30),
                fmt: str = "JPEG", mode: str = "RGB", **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt, **save)
    return buffer.getvalue()


def gradient_jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    """A JPEG with structure (distinct per seed), so distinct images never share bytes."""
    width, height = size
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    image.paste((seed * 37 % 256, seed * 91 % 256, 255 - seed * 13 % 256),
                (0, 0, max(1, width // 3), max(1, height // 3)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_header_only(width: int, height: int, pixel_data: bytes | None = None) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` RGB and whose pixel data is tiny (a
    decompression bomb as far as a decoder can tell before decoding) or ``pixel_data``."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64) if pixel_data is None else pixel_data
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def write_pair(folder: Path, name: str, image: bytes, caption: str | bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(image)
    stem = name.rsplit(".", 1)[0]
    data = caption.encode("utf-8") if isinstance(caption, str) else caption
    (folder / f"{stem}.txt").write_bytes(data)


def read_samples(output: Path) -> list[dict[str, Any]]:
    """Every sample of a built shard set, read with webdataset in shard order."""
    urls = [str(p) for p in sorted(output.glob("*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
    return list(dataset)


def build(args: list[str]) -> dict[str, Any]:
    """Run the build_shards command in this process and return the summary it wrote."""
    assert build_shards.main([*args, "--no-progress"]) == 0
    output = Path(args[args.index("--output") + 1])
    return json.loads((output / "summary.json").read_text())


def tar_digests(output: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(output.glob("*.tar"))}
