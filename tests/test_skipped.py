"""The per-run skip list: whole lines from concurrent processes, nothing without a run dir."""

from __future__ import annotations

import multiprocessing as mp

from pretrain.engine.skipped import SKIPPED_FILE, SkipLog, read_skipped


def _write_many(run_dir: str, rank: int) -> None:
    log = SkipLog(run_dir, rank=rank)
    for index in range(200):
        log.record("train", f"/data/{rank}/{index:05d}.jpg" + "x" * 300, "truncated JPEG")


def test_concurrent_writers_leave_whole_lines(tmp_path):
    workers = [mp.get_context("fork").Process(target=_write_many, args=(str(tmp_path), r))
               for r in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    records = read_skipped(tmp_path)
    assert len(records) == 600
    assert {r["rank"] for r in records} == {0, 1, 2}
    assert all(r["split"] == "train" and r["reason"] == "truncated JPEG" for r in records)


def test_no_run_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    SkipLog(None).record("val", "a.jpg", "unreadable")
    assert not (tmp_path / SKIPPED_FILE).exists()
    assert read_skipped(tmp_path) == []


def _record_once_twice(run_dir: str) -> None:
    log = SkipLog(run_dir, rank=1)
    log.record_once("val", "/data/val/3.jpg", "truncated")
    log.record_once("val", "/data/val/3.jpg", "truncated")


def test_a_file_met_at_every_evaluation_is_listed_once(tmp_path):
    log = SkipLog(tmp_path)
    log.record_once("val", "/data/val/3.jpg", "truncated")
    log.record_once("val", "/data/val/3.jpg", "truncated")  # the next evaluation, same process
    worker = mp.get_context("fork").Process(target=_record_once_twice, args=(str(tmp_path),))
    worker.start()  # a data worker of a later evaluation, forked afresh
    worker.join()
    log.record_once("train", "/data/val/3.jpg", "truncated")  # another split is another entry
    assert [(r["split"], r["path"]) for r in read_skipped(tmp_path)] == [
        ("val", "/data/val/3.jpg"), ("train", "/data/val/3.jpg")]
