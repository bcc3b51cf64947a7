"""The build_shards command end to end: every input kind, every bad-input class counted,
byte-identical output across runs and worker counts, resume after a kill, shards that
webdataset reads back, and one-line errors for bad invocations."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from test_data_helpers import (
    build,
    gradient_jpeg,
    image_bytes,
    png_header_only,
    read_samples,
    tar_digests,
    write_pair,
)

from data_tools import build_shards, inspect_shards
from data_tools.synthetic import write_synthetic_shards

ROOT = Path(__file__).resolve().parents[1]
GOOD = [f"g{i}" for i in range(6)]


@pytest.fixture(scope="module")
def dirty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six good pairs and one of every bad-input class, as a crawl would deliver them."""
    root = tmp_path_factory.mktemp("dirty") / "crawl"
    for index, name in enumerate(GOOD):
        write_pair(root, f"{name}.jpg", gradient_jpeg((40, 30), seed=index), f"good {name}")
    write_pair(root / "sub", "a_dup_badcap.jpg", gradient_jpeg((40, 30), seed=1), "  \n")
    (root / "nocap.jpg").write_bytes(gradient_jpeg((40, 30), seed=20))
    write_pair(root, "empty.jpg", b"", "zero bytes")
    write_pair(root, "trunc.jpg", gradient_jpeg((256, 256), seed=21)[:1200], "cut short")
    write_pair(root, "corrupt.png", png_header_only(16, 16, pixel_data=b"garbage" * 20), "bad")
    write_pair(root, "html.jpg", b"<!doctype html><title>404</title>", "text saved as an image")
    write_pair(root, "bomb.png", png_header_only(60_000, 60_000), "decompression bomb")
    write_pair(root, "latin.jpg", gradient_jpeg((40, 30), seed=22), "caf\xe9".encode("cp1252"))
    write_pair(root, "blank.jpg", gradient_jpeg((40, 30), seed=23), "\t \r\n")
    write_pair(root, "zdup.jpg", gradient_jpeg((40, 30), seed=0), "same bytes as g0")
    write_pair(root, "short.jpg", gradient_jpeg((40, 30), seed=24), "ab")
    write_pair(root, "tiny.jpg", image_bytes((4, 4)), "too small")
    os.mkfifo(root / "fifo.jpg")  # would block a naive reader forever
    (root / "fifo.txt").write_text("a pipe")
    os.symlink(root / "nowhere.jpg", root / "gone.jpg")
    (root / "gone.txt").write_text("broken link")
    return root


DIRTY_SKIPS = {
    "missing_caption": 1, "empty_file": 1, "truncated_image": 1, "corrupt_image": 1,
    "not_an_image": 1, "too_many_pixels": 1, "caption_not_utf8": 1, "empty_caption": 2,
    "duplicate": 1, "unreadable_file": 1, "missing_file": 1, "caption_too_short": 1,
    "image_too_small": 1,
}
DIRTY_ARGS = ["--samples-per-shard", "5", "--image-size", "24", "--dedup",
              "--min-caption-length", "3", "--min-image-size", "8"]


def test_every_bad_input_class_is_skipped_and_counted(dirty: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = build(["--input", str(dirty), "--output", str(out), *DIRTY_ARGS])
    assert summary["skipped"] == DIRTY_SKIPS
    assert summary["samples"] == len(GOOD)
    assert summary["input_items"] == len(GOOD) + sum(DIRTY_SKIPS.values())
    per_shard = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert sum(sum(s["skipped"].values()) for s in per_shard) == sum(DIRTY_SKIPS.values())
    assert json.loads((out / "sizes.json").read_text()) == {
        f"{s['shard']}.tar": s["count"] for s in per_shard}
    samples = read_samples(out)
    assert [s["txt"] for s in samples] == [f"good {n}" for n in GOOD]
    meta = samples[0]["json"]
    assert meta["source_id"] == "g0.jpg" and meta["status"] == "success"
    assert (meta["original_width"], meta["original_height"]) == (40, 30)
    assert samples[0]["jpg"].size == (32, 24) == (meta["width"], meta["height"])
    assert re.fullmatch(r"[0-9]{9}", meta["key"]) and meta["key"] == samples[0]["__key__"]
    assert len(meta["sha256"]) == 64


def test_same_input_gives_byte_identical_shards_for_any_worker_count(
        dirty: Path, tmp_path: Path) -> None:
    def run(name: str, workers: str) -> str:
        args = ["--input", str(dirty), "--output", str(tmp_path / name), *DIRTY_ARGS]
        return build([*args, "--workers", workers])["worker_start"]

    assert run("a", "1") == run("b", "1") == "inline"
    assert run("c", "2") == "fork"  # this process has one thread: workers are forked
    other_thread = threading.Event()
    waiter = threading.Thread(target=other_thread.wait)
    waiter.start()
    try:
        assert run("d", "3") == "spawn"  # with another thread alive a fork is unsafe
    finally:
        other_thread.set()
        waiter.join()

    def files(name: str) -> dict[str, bytes]:
        out = tmp_path / name
        return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "summary.json"}

    assert files("a") == files("b") == files("c") == files("d")
    assert len(tar_digests(tmp_path / "a")) == 4  # 20 items at 5 per shard


KILLER = """
import os, signal, sys
import data_tools.shard_writer as writer
from data_tools import build_shards
point, target = sys.argv[1], sys.argv[2]
members = 0
add_member, atomic_write = writer._add_member, writer.atomic_write_bytes
def add(tar, name, payload):
    global members
    members += 1
    if point == "member" and members == int(target):
        os.kill(os.getpid(), signal.SIGKILL)
    add_member(tar, name, payload)
def write(path, payload):
    if point == "file" and path.name == target:
        os.kill(os.getpid(), signal.SIGKILL)
    atomic_write(path, payload)
writer._add_member, writer.atomic_write_bytes = add, write
build_shards.main(sys.argv[3:])
"""


@pytest.mark.parametrize(("point", "target"), [
    ("member", "7"),  # shard 00001 (g0..g4; 00000 holds only bad items) is half written
    ("file", "00001_stats.json"),  # shard 00001's tar and parquet are in place, stats are not
])
def test_killed_build_resumes_to_the_same_shards(dirty: Path, tmp_path: Path, point: str,
                                                 target: str) -> None:
    args = ["--input", str(dirty), "--output", str(tmp_path / "killed"), *DIRTY_ARGS,
            "--no-progress"]
    result = subprocess.run([sys.executable, "-c", KILLER, point, target, *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    killed = tmp_path / "killed"
    assert (killed / "00000_stats.json").exists() and not (killed / "00001_stats.json").exists()
    partial = "00001.tar.tmp" if point == "member" else "00001.tar"
    assert (killed / partial).exists()  # killed in the middle of shard 00001
    summary = build(args[:-1])
    assert summary["resumed_shards"] == 1
    build(["--input", str(dirty), "--output", str(tmp_path / "clean"), *DIRTY_ARGS])
    def files(out: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "summary.json"}
    assert files(killed) == files(tmp_path / "clean")  # no .tmp left behind either


def test_resume_rebuilds_shards_of_a_build_with_other_options(dirty: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "out"
    build(["--input", str(dirty), "--output", str(out), *DIRTY_ARGS])
    again = build(["--input", str(dirty), "--output", str(out), *DIRTY_ARGS])
    assert again["resumed_shards"] == again["shards"] == 4
    with open(out / "00002.tar", "r+b") as tar:  # damaged after the build: rebuilt on resume
        tar.truncate(2048)
    repaired = build(["--input", str(dirty), "--output", str(out), *DIRTY_ARGS])
    assert repaired["resumed_shards"] == 3 and len(read_samples(out)) == len(GOOD)
    changed = build(["--input", str(dirty), "--output", str(out), *DIRTY_ARGS[:-4],
                     "--image-size", "12"])
    assert changed["resumed_shards"] == 0
    assert read_samples(out)[0]["jpg"].size == (16, 12)


def test_all_input_kinds_in_one_build(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    write_pair(photos, "a.jpg", gradient_jpeg((40, 30), seed=1), "from a folder")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "m.png").write_bytes(image_bytes((30, 30), fmt="PNG"))
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,alt,photographer\nimgs/m.png,from a manifest,Ada\n"
                        "imgs/missing.jpg,gone,Bob\n")
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "imgs/m.png"}],
        "annotations": [{"id": 1, "image_id": 7, "caption": "coco one"},
                        {"id": 2, "image_id": 7, "caption": "coco two"}]}))
    shards = write_synthetic_shards(tmp_path / "synthetic", 3, seed=2, image_size=32,
                                    samples_per_shard=2, progress=False)
    out = tmp_path / "out"
    summary = build(["--input", str(photos), "--input", str(manifest), "--input", str(coco),
                     "--input", shards, "--output", str(out), "--image-size", "16",
                     "--image-column", "path", "--caption-column", "alt"])
    assert summary["skipped"] == {"missing_file": 1}
    samples = read_samples(out)
    assert [s["txt"] for s in samples[:3]] == ["from a folder", "from a manifest", "coco one"]
    assert samples[1]["json"]["photographer"] == "Ada"
    assert samples[2]["json"]["captions"] == ["coco one", "coco two"]
    assert samples[2]["json"]["id"] == 7
    resharded = samples[3:]
    assert len(resharded) == 3
    assert all({"color", "shape", "background"} <= set(s["json"]) for s in resharded)
    assert all(s["json"]["shape"] in s["txt"] and s["jpg"].size == (16, 16) for s in resharded)
    per_caption = build(["--input", str(coco), "--output", str(tmp_path / "pc"),
                         "--coco-mode", "per-caption"])
    assert per_caption["samples"] == 2


def test_resize_mode_and_output_format_options(tmp_path: Path) -> None:
    write_pair(tmp_path / "photos", "a.jpg", gradient_jpeg((60, 30)), "wide")
    out = tmp_path / "out"
    build(["--input", str(tmp_path / "photos"), "--output", str(out), "--image-size", "20",
           "--resize-mode", "center_crop", "--output-format", "webp", "--quality", "80"])
    [sample] = read_samples(out)
    assert sample["webp"].size == (20, 20) and "jpg" not in sample


def test_paths_from_data_never_leave_their_root_or_name_outputs(tmp_path: Path) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(image_bytes())
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.jpg").write_bytes(image_bytes())
    (data / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "ok.jpg", "caption": "fine"},
        {"image": "../secret.jpg", "caption": "dot dot"},
        {"image": str(secret), "caption": "absolute"},
        {"image": "ok.jpg\u0000.png", "caption": "nul byte"}]))
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        for name, payload in (("../../../escaped.jpg", image_bytes()), ("../../../escaped.txt",
                                                                         b"evil member")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, __import__("io").BytesIO(payload))
    out = tmp_path / "out"
    summary = build(["--input", str(data / "list.jsonl"), "--input", str(evil),
                     "--output", str(out)])
    assert summary["skipped"] == {"path_outside_root": 3}
    assert [s["txt"] for s in read_samples(out)] == ["fine", "evil member"]
    names = {p.name for p in out.iterdir()}
    assert names == {"00000.tar", "00000.parquet", "00000_stats.json", "sizes.json",
                     "summary.json", ".build.lock"}
    assert not any(p.name.startswith("escaped") for p in tmp_path.rglob("*"))


@pytest.mark.parametrize(("args", "message"), [
    (["--input", "{tmp}/nope", "--output", "{tmp}/out"], "input not found: {tmp}/nope"),
    (["--input", "{tmp}/photos", "--output", "{tmp}/afile/out"], "is not a writable directory"),
    (["--input", "{tmp}/photos", "--output", "{tmp}/out", "--shuffle"],
     "unrecognized arguments: --shuffle"),
    (["--input", "{tmp}/photos", "--output", "{tmp}/out", "--samples-per-shard", "20000"],
     "--samples-per-shard must be in 1..10000"),
    (["--input", "{tmp}/list.csv", "--output", "{tmp}/out"], "has no caption column"),
])
def test_bad_invocations_exit_non_zero_with_one_line(tmp_path: Path, args: list[str],
                                                     message: str) -> None:
    write_pair(tmp_path / "photos", "a.jpg", image_bytes(), "a")
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "list.csv").write_text("image,label\na.jpg,3\n")
    args = [a.format(tmp=tmp_path) for a in args]
    result = subprocess.run([sys.executable, "-m", "data_tools.build_shards", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("build_shards: error: ")
    assert message.format(tmp=tmp_path) in lines[0]


def test_progress_bar_reports_images_per_second(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    write_pair(tmp_path / "photos", "a.jpg", image_bytes(), "a")
    assert build_shards.main(["--input", str(tmp_path / "photos"),
                              "--output", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "img/s" in captured.err
    assert "wrote 1 samples in 1 shards" in captured.out


def _tar_of(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_a_key_repeated_right_after_itself_is_skipped_as_duplicate_key(
        tmp_path: Path, capsys) -> None:  # noqa: ANN001
    shard = _tar_of(tmp_path / "dups.tar", [
        ("dup.jpg", gradient_jpeg((20, 20), seed=1)), ("dup.txt", b"first"),
        ("dup.jpg", gradient_jpeg((20, 20), seed=2)), ("dup.txt", b"second"),
        ("other.jpg", gradient_jpeg((20, 20), seed=3)), ("other.txt", b"other"),
    ])
    summary = build(["--input", str(shard), "--output", str(tmp_path / "out"),
                     "--image-size", "16"])
    assert summary["samples"] == 2 and summary["skipped"] == {"duplicate_key": 1}
    assert [s["txt"] for s in read_samples(tmp_path / "out")] == ["first", "other"]
    assert "skipped duplicate_key: 1" in capsys.readouterr().out


PAUSED = """
import sys, time
from pathlib import Path
import data_tools.shard_writer as writer
from data_tools import build_shards
go = Path(sys.argv[1])
finish = writer.ShardWriter.finish
def finish_when_told(self, extra=None):
    Path(str(go) + ".waiting").touch()
    while not go.exists():
        time.sleep(0.02)
    return finish(self, extra)
writer.ShardWriter.finish = finish_when_told
sys.exit(build_shards.main(sys.argv[2:]))
"""


def test_a_second_build_into_the_same_output_is_refused_while_the_first_runs(
        dirty: Path, tmp_path: Path) -> None:
    out, go = tmp_path / "out", tmp_path / "go"
    args = ["--input", str(dirty), "--output", str(out), *DIRTY_ARGS, "--no-progress"]
    first = subprocess.Popen([sys.executable, "-c", PAUSED, str(go), *args], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not Path(str(go) + ".waiting").exists():  # the first build is writing a shard
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "data_tools.build_shards", *args],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"build_shards: error: another build is writing {out}"]
        first.kill()  # kill -9 while holding the lock: the kernel releases it
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    summary = build(args[:-1])  # not blocked by a stale lock; resumes what was complete
    assert summary["samples"] == len(GOOD)
    assert inspect_shards.main([str(out), "--quiet"]) == 0


PARENT_PAUSED = """
import os, sys, time
from pathlib import Path
import data_tools.shard_writer as writer
from data_tools import build_shards
go, parent = Path(sys.argv[1]), os.getpid()
finish = writer.ShardWriter.finish
def parent_waits(self, extra=None):
    while os.getpid() == parent and not go.exists():  # forked workers carry on
        Path(str(go) + ".waiting").touch()
        time.sleep(0.02)
    return finish(self, extra)
writer.ShardWriter.finish = parent_waits
sys.exit(build_shards.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_workers_die_when_the_build_is_killed(dirty: Path, tmp_path: Path, start: str) -> None:
    """kill -9 of the build process: its workers (here: one idle, waiting for tasks) follow."""
    import psutil

    go = tmp_path / "go"
    args = ["--input", str(dirty), "--output", str(tmp_path / "out"), *DIRTY_ARGS,
            "--no-progress", "--workers", "2"]
    script = PARENT_PAUSED if start == "fork" else (  # another thread: workers are spawned
        "import threading; threading.Thread(target=threading.Event().wait, daemon=True)"
        ".start()\n" + PARENT_PAUSED)
    build_process = subprocess.Popen([sys.executable, "-c", script, str(go), *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while not (Path(str(go) + ".waiting").exists() and workers):
            assert build_process.poll() is None, build_process.communicate()
            assert time.monotonic() < deadline, "the build never started its worker"
            workers = [p for p in psutil.Process(build_process.pid).children()
                       if "resource_tracker" not in " ".join(p.cmdline())]
            time.sleep(0.05)
        assert all(("spawn_main" in " ".join(w.cmdline())) == (start == "spawn")
                   for w in workers)
        build_process.kill()
        build_process.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=5)
        assert alive == [], f"workers outlived the killed build: {alive}"
    finally:
        for worker in workers:
            if worker.is_running():
                worker.kill()
        if build_process.poll() is None:
            build_process.kill()
