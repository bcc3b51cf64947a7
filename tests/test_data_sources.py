"""Input kinds: folders, manifests (csv, tsv, parquet, jsonl), COCO captions and shards; their
order, their metadata, detection, and paths from data that must not escape their root."""

from __future__ import annotations

import csv
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_helpers import image_bytes, write_pair

from data_tools.samples import ByteReader, SampleOptions, make_sample
from data_tools.skips import Skip
from data_tools.sources import (
    InvocationError,
    SourceSpec,
    detect_kind,
    iter_items,
    open_source,
)
from data_tools.synthetic import write_synthetic_shards


def items_of(path: Path | str, **spec: object) -> list:
    return list(iter_items([open_source(SourceSpec(str(path), **spec))]))


def test_folder_nested_sorted_with_sidecar_captions(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    write_pair(root / "b", "z.jpg", image_bytes(), "zed")
    write_pair(root / "b", "a.PNG", image_bytes(fmt="PNG"), "ay")
    write_pair(root / "a" / "deep", "x.jpeg", image_bytes(), "ex")
    write_pair(root, "top.webp", image_bytes(fmt="WEBP"), "top")
    (root / "b" / "orphan.jpg").write_bytes(image_bytes())  # no caption
    (root / "b" / "notes.txt").write_text("a caption with no image is not a sample")
    (root / "b" / "readme.md").write_text("ignored")
    items = items_of(root)
    assert [i.source_id for i in items] == [
        "a/deep/x.jpeg", "b/a.PNG", "b/orphan.jpg", "b/z.jpg", "top.webp"]
    assert items[1].caption_file.endswith("b/a.txt") and items[1].skip is None
    assert items[2].skip == "missing_caption"


def test_folder_with_undecodable_file_name(tmp_path: Path) -> None:
    root = tmp_path / "crawl"
    root.mkdir()
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes, not UTF-8
    (root / name).write_bytes(image_bytes())
    (root / os.fsdecode(b"caf\xe9.txt")).write_text("coffee")
    [item] = items_of(root)
    assert item.source_id == "caf\\xe9.jpg"
    json.dumps(item.source_id).encode("utf-8")  # storable in .json and parquet


def _write_manifest(path: Path, rows: list[dict], fmt: str) -> None:
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]),
                                    delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl"])
def test_manifest_relative_paths_and_extra_columns(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "1.jpg").write_bytes(image_bytes())
    rows = [
        {"file": "imgs/1.jpg", "text": "one", "license": "cc-by", "width": "640"},
        {"file": "../outside.jpg", "text": "escape", "license": "x", "width": "1"},
        {"file": "/etc/passwd", "text": "absolute", "license": "x", "width": "1"},
        {"file": "https://example.com/a.jpg", "text": "url", "license": "x", "width": "1"},
        {"file": "", "text": "no path", "license": "x", "width": "1"},
    ]
    manifest = tmp_path / f"list.{fmt}"
    _write_manifest(manifest, rows, fmt)
    items = items_of(manifest, image_column="file", caption_column="text")
    assert items[0].image.path == str(tmp_path / "imgs" / "1.jpg")
    assert items[0].captions == ("one",) and items[0].skip is None
    # other columns travel with the sample; a reserved name is kept as source_<name>
    assert items[0].extra == {"license": "cc-by", "source_width": "640"}
    assert [i.skip for i in items[1:]] == [
        "path_outside_root", "path_outside_root", "unsupported_url", "missing_path"]


def test_manifest_columns_are_detected_or_named_in_the_error(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_path,caption\nx.jpg,hello\n")
    [item] = items_of(manifest)
    assert item.captions == ("hello",)
    with pytest.raises(InvocationError, match="no column 'alt_text'.*image_path, caption"):
        items_of(manifest, caption_column="alt_text")
    (tmp_path / "n.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InvocationError, match="no image column"):
        items_of(tmp_path / "n.csv")


def test_data_root_allows_absolute_paths_inside_it(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    manifest = tmp_path / "lists" / "m.jsonl"
    manifest.parent.mkdir()
    inside, outside = tmp_path / "data" / "a.jpg", tmp_path / "b.jpg"
    manifest.write_text(json.dumps({"image": str(inside), "caption": "in"}) + "\n"
                        + json.dumps({"image": str(outside), "caption": "out"}) + "\n"
                        + json.dumps({"image": "a.jpg", "caption": "relative"}) + "\n")
    items = items_of(manifest, data_root=str(tmp_path / "data"))
    assert [i.skip for i in items] == [None, "path_outside_root", None]
    assert items[2].image.path == str(inside)


def test_malformed_rows_cost_one_sample_each(tmp_path: Path) -> None:
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_bytes(b'{"image": "a.jpg", "caption": "ok"}\n{not json\n[1, 2]\n\n'
                      b'{"image": "b.jpg", "caption": "caf\xe9"}\n{"image": "c.jpg"}\n')
    items = items_of(jsonl)
    assert [i.skip for i in items] == [None, "bad_row", "bad_row", None, "missing_caption"]
    csv_path = tmp_path / "m.csv"
    csv_path.write_bytes(b"image,caption\na.jpg,fine\nb.jpg,too,many,fields\n"
                         b"c.jpg,\"a caption, with a comma\"\n")
    assert [i.skip for i in items_of(csv_path)] == [None, "bad_row", None]


def test_non_utf8_caption_in_a_csv_costs_only_its_row(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(image_bytes())
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"image,caption\na.jpg,caf\xe9 cr\xe8me\nb.jpg,caf\xc3\xa9\n")
    first, second = items_of(manifest)
    with pytest.raises(Skip) as skip:
        make_sample(first, SampleOptions(), ByteReader())
    assert skip.value.reason == "caption_not_utf8"
    assert make_sample(second, SampleOptions(), ByteReader()).caption == "café"


def _coco(tmp_path: Path) -> Path:
    (tmp_path / "train").mkdir()
    for name in ("1.jpg", "2.jpg"):
        (tmp_path / "train" / name).write_bytes(image_bytes())
    data = {
        "images": [{"id": 2, "file_name": "2.jpg", "width": 48, "height": 32, "license": 3},
                   {"id": 1, "file_name": "1.jpg"},
                   {"id": 3, "file_name": "3.jpg"},
                   {"id": 4, "file_name": "../../secret.jpg"}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "one a"},
                        {"id": 11, "image_id": 2, "caption": "two a"},
                        {"id": 12, "image_id": 1, "caption": "one b"},
                        {"id": 13, "image_id": 4, "caption": "escape"}],
    }
    path = tmp_path / "annotations" / "captions.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    return path


def test_coco_one_sample_per_image_with_all_captions(tmp_path: Path) -> None:
    items = items_of(_coco(tmp_path), data_root=str(tmp_path / "train"))
    assert [i.source_id for i in items] == ["2.jpg", "1.jpg", "3.jpg", "../../secret.jpg"]
    assert items[0].captions == ("two a",)
    assert items[0].extra == {"id": 2, "source_width": 48, "source_height": 32, "license": 3}
    assert items[1].captions == ("one a", "one b")
    assert [i.skip for i in items] == [None, None, "missing_caption", "path_outside_root"]


def test_coco_one_sample_per_caption(tmp_path: Path) -> None:
    items = items_of(_coco(tmp_path), data_root=str(tmp_path / "train"), coco_mode="per-caption")
    usable = [i for i in items if i.skip is None]
    assert [(i.source_id, i.captions, i.extra["annotation_id"]) for i in usable] == [
        ("2.jpg", ("two a",), 11), ("1.jpg", ("one a",), 10), ("1.jpg", ("one b",), 12)]


def test_shards_brace_pattern_keeps_metadata_and_survives_a_truncated_tar(
        tmp_path: Path) -> None:
    pattern = write_synthetic_shards(tmp_path / "in", 10, seed=1, image_size=16,
                                     samples_per_shard=4, progress=False)
    items = items_of(pattern)
    assert len(items) == 10 and all(i.skip is None for i in items)
    assert items[0].source_id == "synthetic-1-0"  # provenance survives re-sharding
    assert {"color", "shape", "background"} <= set(items[0].extra)
    assert isinstance(items[0].captions[0], bytes)
    # cut the middle shard inside its third sample's image
    middle = tmp_path / "in" / "00001.tar"
    with tarfile.open(middle) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".jpg")][2]
    os.truncate(middle, member.offset_data + 10)
    items = items_of(pattern)
    assert [i.skip for i in items[:6]] == [None] * 6  # everything before the damage is kept
    assert [i.skip for i in items[6:8]] == ["truncated_file", "unreadable_input"]
    assert [i.skip for i in items[8:]] == [None, None]  # the next shard is read as usual
    # a tar cut exactly between two members is caught by its missing end-of-archive blocks
    with tarfile.open(tmp_path / "in" / "00002.tar") as tar:
        json_member = [m for m in tar.getmembers() if m.name.endswith(".json")][0]
    os.truncate(tmp_path / "in" / "00002.tar", json_member.offset_data + 512)
    assert [i.skip for i in items_of(pattern)[8:]] == [None, "unreadable_input"]


def test_tar_member_names_are_only_grouping_keys(tmp_path: Path) -> None:
    shard = tmp_path / "evil.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("../../etc/x.jpg", image_bytes()), ("../../etc/x.txt", b"cap"),
                              ("/abs/y.jpg", image_bytes()), ("/abs/y.txt", b"cap2")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, __import__("io").BytesIO(payload))
    items = items_of(shard)
    assert [i.captions for i in items] == [(b"cap",), (b"cap2",)]
    assert all(i.image.path == str(shard) for i in items)


def test_kind_detection_and_forcing(tmp_path: Path) -> None:
    write_pair(tmp_path / "photos", "a.jpg", image_bytes(), "a")
    pattern = write_synthetic_shards(tmp_path / "shards", 3, seed=0, image_size=16,
                                     samples_per_shard=2, progress=False)
    for name in ("m.csv", "m.tsv", "m.parquet", "m.jsonl"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "c.json").write_text("{}")
    assert detect_kind(str(tmp_path / "photos")) == "folder"
    assert detect_kind(str(tmp_path / "shards")) == "shards"
    assert detect_kind(str(tmp_path / "shards" / "00000.tar")) == "shards"
    assert detect_kind(pattern) == "shards"
    assert {detect_kind(str(tmp_path / n)) for n in ("m.csv", "m.tsv", "m.parquet",
                                                      "m.jsonl")} == {"manifest"}
    assert detect_kind(str(tmp_path / "c.json")) == "coco"
    with pytest.raises(InvocationError, match="input not found"):
        detect_kind(str(tmp_path / "nope"))
    (tmp_path / "list.dat").write_text("image,caption\na.jpg,x\n")
    with pytest.raises(InvocationError, match="--input-format"):
        detect_kind(str(tmp_path / "list.dat"))
    with pytest.raises(InvocationError, match="not COCO captions"):
        items_of(tmp_path / "c.json")
    # a folder holding only tars, read as an image folder when forced, finds no images
    assert items_of(tmp_path / "shards", kind="folder") == []
