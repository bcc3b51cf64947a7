"""inspect: counts per shard, sizes.json and stats cross-checked, images decoded; a truncated
tar, a corrupt image or a wrong count makes it exit non-zero."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_data_helpers import gradient_jpeg

from data_tools import inspect_shards
from data_tools.shard_writer import Sample, write_shard, write_sizes
from data_tools.synthetic import write_synthetic_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    write_synthetic_shards(tmp_path / "set", 10, seed=4, image_size=16, samples_per_shard=4,
                           progress=False)
    return tmp_path / "set"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_tools.inspect_shards", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_a_sound_set_passes(shards: Path) -> None:
    result = run(str(shards))
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[-1] == "3 shards, 10 samples, 10 images decoded, 0 problems"
    assert "00002.tar: 2 samples" in result.stdout


@pytest.mark.parametrize("cut", ["inside a member", "between members"])
def test_a_truncated_tar_fails(shards: Path, cut: str) -> None:
    tar_file = shards / "00001.tar"
    with tarfile.open(tar_file) as tar:
        member = tar.getmembers()[4]
    end = member.offset_data + (10 if cut == "inside a member" else 512)
    os.truncate(tar_file, end)
    result = run(str(shards))
    assert result.returncode == 1
    report = result.stdout
    assert "00001.tar" in report and ("truncated" in report or "unreadable tar" in report)
    assert "00000.tar: 4 samples, 4 images decoded, OK" in report


def test_a_corrupt_image_and_wrong_counts_fail(tmp_path: Path) -> None:
    good = Sample(gradient_jpeg((32, 32)), "fine")
    broken = Sample(gradient_jpeg((64, 64))[:700], "cut jpeg")
    write_shard(tmp_path, 0, [good, broken])
    write_shard(tmp_path, 1, [good])
    write_sizes(tmp_path)
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 2, "00001.tar": 5,
                                                     "00002.tar": 1}))
    report = inspect_shards.inspect_set(str(tmp_path))
    text = inspect_shards.format_report(report)
    assert "sample 000000001: image does not decode" in text
    assert "sizes.json says 5 samples, tar has 1" in text
    assert "lists 00002.tar, which does not exist" in text
    assert report.problem_count == 3


def test_sample_fraction_decodes_a_subset(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, 200, seed=0, image_size=16, samples_per_shard=100,
                           progress=False)
    report = inspect_shards.inspect_set(str(tmp_path / "{00000..00001}.tar"), fraction=0.25)
    decoded = sum(s.decoded for s in report.shards)
    assert 25 <= decoded <= 75 and report.problem_count == 0
    again = inspect_shards.inspect_set(str(tmp_path / "{00000..00001}.tar"), fraction=0.25)
    assert [s.decoded for s in again.shards] == [s.decoded for s in report.shards]


def test_missing_shards_and_no_shards(tmp_path: Path, shards: Path) -> None:
    report = inspect_shards.inspect_set(str(shards / "{00000..00003}.tar"))
    assert report.problems == [f"{shards}/00003.tar: missing"]
    result = run(str(tmp_path / "empty-{0..2}.tar"))
    assert result.returncode == 2
    expected = f"inspect: error: no shards found at {tmp_path}/empty-{{0..2}}.tar"
    assert result.stderr.strip() == expected


def test_a_duplicate_key_is_a_problem(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("dup.jpg", gradient_jpeg((20, 20))), ("dup.txt", b"first"),
                              ("dup.jpg", gradient_jpeg((20, 20), 1)), ("dup.txt", b"second")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    result = run(str(shard))
    assert result.returncode == 1, result.stdout
    assert "duplicate key: dup appears twice" in result.stdout
    assert f"{shard}: 2 samples" in result.stdout
