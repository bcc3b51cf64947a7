"""The shard writer: fixed tar headers, a parquet schema any metadata fits, nothing published
when writing fails."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_data_helpers import image_bytes

from data_tools.shard_writer import Sample, ShardWriter, write_shard


def test_tar_headers_carry_nothing_that_varies_between_runs(tmp_path: Path) -> None:
    write_shard(tmp_path, 3, [Sample(image_bytes(), "a caption")])
    with tarfile.open(tmp_path / "00003.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["000030000.jpg", "000030000.txt", "000030000.json"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "", "", 0o444)}


def test_parquet_holds_rows_whose_extra_fields_disagree_on_type(tmp_path: Path) -> None:
    samples = [Sample(image_bytes(), "one", meta={"rating": 5, "tags": ["a", "b"]}),
               Sample(image_bytes(), "two", meta={"rating": "five", "source": {"x": 1}}),
               Sample(image_bytes(), "three", meta={"rating": None})]
    stats = write_shard(tmp_path, 0, samples)
    table = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    assert stats["count"] == 3 and len(table) == 3
    assert [row["rating"] for row in table] == ["5", '"five"', None]
    assert json.loads(table[0]["tags"]) == ["a", "b"] and table[2]["source"] is None


def test_a_failed_shard_leaves_no_file_that_looks_complete(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image extension"), ShardWriter(tmp_path, 0) as writer:
        writer.add(Sample(image_bytes(), "fine"))
        writer.add(Sample(b"GIF89a", "bad extension", image_ext="gif"))
    assert list(tmp_path.iterdir()) == []
