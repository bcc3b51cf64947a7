"""Manifests: a table with an image-path column and a caption column (.csv .tsv .parquet .jsonl).

Rows are read in file order, streaming (a manifest may not fit in memory). Relative image paths
resolve against the data root (the manifest's folder unless ``--data-root`` is given) and must
stay inside it. Every other column is carried into the sample's .json.

Text formats are decoded per row, not per file, so one row of Windows-1252 bytes costs one
sample (``caption_not_utf8``) instead of the whole manifest. TSV is read without quote
processing, as the common caption TSVs (Conceptual Captions and alike) contain bare quotes.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

import pyarrow.parquet as pq

from data_tools.sources.base import (
    FileRef,
    InvocationError,
    Item,
    carry_extras,
    display,
    safe_join,
)

MANIFEST_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl",
                    ".ndjson": "jsonl"}
# Tried in order when --image-column / --caption-column are not given.
IMAGE_COLUMNS = ("image_path", "image", "filepath", "file_path", "file_name", "filename", "path",
                 "file", "url")
CAPTION_COLUMNS = ("caption", "text", "txt", "title", "description", "alt")
_BAD_ROW = object()
_PARQUET_BATCH_ROWS = 4096

csv.field_size_limit(2**31 - 1)  # a long caption is not a reason to abort the whole manifest


class ManifestSource:
    kind = "manifest"

    def __init__(
        self,
        path: str,
        image_column: str | None = None,
        caption_column: str | None = None,
        data_root: str | None = None,
    ) -> None:
        self.path = path
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in MANIFEST_FORMATS:
            raise InvocationError(
                f"manifest {path} must end in one of {', '.join(sorted(MANIFEST_FORMATS))}"
            )
        self.format = MANIFEST_FORMATS[suffix]
        self.data_root = data_root or os.path.dirname(os.path.abspath(path))
        columns = self._columns()
        self.image_column = _pick(columns, image_column, IMAGE_COLUMNS, "image", path)
        self.caption_column = _pick(columns, caption_column, CAPTION_COLUMNS, "caption", path)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "path": os.path.abspath(self.path), "format": self.format,
            "image_column": self.image_column, "caption_column": self.caption_column,
            "data_root": os.path.abspath(self.data_root),
        }

    def items(self) -> Iterator[Item]:
        for index, row in enumerate(self._rows()):
            yield self._item(index, row)

    def _item(self, index: int, row: Any) -> Item:
        row_id = f"{display(os.path.basename(self.path))}:{index}"
        if row is _BAD_ROW:
            return Item(source_id=row_id, skip="bad_row")
        value = row.get(self.image_column)
        extra = carry_extras(
            {k: v for k, v in row.items() if k not in (self.image_column, self.caption_column)}
        )
        if value is None or not str(value).strip():
            return Item(source_id=row_id, extra=extra, skip="missing_path")
        value = str(value).strip()
        source_id = display(value)
        if "://" in value:
            return Item(source_id=source_id, extra=extra, skip="unsupported_url")
        path = safe_join(self.data_root, value)
        if path is None:
            return Item(source_id=source_id, extra=extra, skip="path_outside_root")
        caption = row.get(self.caption_column)
        if caption is not None and not isinstance(caption, str | bytes):
            caption = str(caption)  # a caption that parsed as a number is still text
        captions = () if caption is None else (caption,)
        skip = None if captions else "missing_caption"
        return Item(source_id=source_id, image=FileRef(path), captions=captions, extra=extra,
                    skip=skip)

    def _columns(self) -> list[str]:
        try:
            if self.format == "parquet":
                return list(pq.ParquetFile(self.path).schema_arrow.names)
            if self.format == "jsonl":
                for row in self._rows():
                    if row is not _BAD_ROW:
                        return list(row)
                raise InvocationError(f"manifest {self.path} has no JSON object rows")
            with self._open_text() as handle:
                return next(self._csv_reader(handle), [])
        except OSError as error:
            raise InvocationError(f"cannot read manifest {self.path}: {error}") from None
        except Exception as error:  # pyarrow and csv raise their own types for a bad file
            if isinstance(error, InvocationError):
                raise
            raise InvocationError(f"cannot parse manifest {self.path}: {error}") from None

    def _rows(self) -> Iterator[Any]:
        if self.format == "parquet":
            yield from self._parquet_rows()
        elif self.format == "jsonl":
            yield from self._jsonl_rows()
        else:
            yield from self._csv_rows()

    def _open_text(self) -> TextIO:
        # surrogateescape keeps undecodable bytes so only their own row is rejected.
        return open(self.path, encoding="utf-8-sig", errors="surrogateescape", newline="")

    def _csv_reader(self, handle: Iterable[str]) -> Iterator[list[str]]:
        if self.format == "tsv":
            return csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return csv.reader(handle)

    def _csv_rows(self) -> Iterator[Any]:
        with self._open_text() as handle:
            reader = self._csv_reader(handle)
            header = next(reader, [])
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error:
                    yield _BAD_ROW
                    continue
                if not fields:
                    continue  # a blank line is not a sample
                yield dict(zip(header, fields, strict=True)) if len(fields) == len(header) \
                    else _BAD_ROW

    def _jsonl_rows(self) -> Iterator[Any]:
        with open(self.path, "rb") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.decode("utf-8", "surrogateescape"))
                except ValueError:
                    yield _BAD_ROW
                    continue
                yield row if isinstance(row, dict) else _BAD_ROW

    def _parquet_rows(self) -> Iterator[Any]:
        try:
            for batch in pq.ParquetFile(self.path).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
                yield from batch.to_pylist()
        except Exception:  # a corrupt row group ends this manifest, counted, not the build
            yield _BAD_ROW


def _pick(columns: list[str], chosen: str | None, defaults: tuple[str, ...], what: str,
          path: str) -> str:
    if chosen is not None:
        if chosen not in columns:
            raise InvocationError(
                f"manifest {path} has no column {chosen!r} (columns: {', '.join(columns)})"
            )
        return chosen
    for name in defaults:
        if name in columns:
            return name
    raise InvocationError(
        f"manifest {path} has no {what} column; pass --{what}-column "
        f"(columns: {', '.join(columns)})"
    )
