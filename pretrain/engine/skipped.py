"""The per-run list of what a job could not use: ``RUN_DIR/skipped.jsonl``.

Every file, shard or sample that a job skips (an unreadable image, a shard whose server stalls,
a validation image that failed to decode) is one JSON line ``{"split", "path", "reason",
"rank"}``, so the counts a job logs can be traced to the files behind them. Data-loader workers
are separate processes: each line is one ``write`` on a file opened with ``O_APPEND``, which the
kernel appends whole, so lines from concurrent writers never interleave on a local file system.

A split read again and again (validation, at every evaluation) records with
:meth:`SkipLog.record_once`, which lists a file once per split however often it is met, so
the list's length is the count a job reports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SKIPPED_FILE = "skipped.jsonl"


class SkipLog:
    """Appends skip records to ``RUN_DIR/skipped.jsonl``; ``SkipLog(None)`` records nothing
    (a stream used outside a run, e.g. by a benchmark or a test)."""

    def __init__(self, run_dir: Path | str | None, rank: int = 0) -> None:
        self.path = None if run_dir is None else Path(run_dir) / SKIPPED_FILE
        self.rank = rank
        self._listed: tuple[int, set[tuple[str, str]]] | None = None  # (pid, listed files)

    def record_once(self, split: str, path: str, reason: str) -> None:
        """:meth:`record`, unless ``path`` is already listed for ``split`` (read from the file
        once per process: data-loader workers are forked afresh for every pass)."""
        if self.path is None:
            return
        if self._listed is None or self._listed[0] != os.getpid():
            self._listed = (os.getpid(), {(r["split"], r["path"])
                                          for r in read_skipped(self.path.parent)})
        key = (split, str(path))
        if key not in self._listed[1]:
            self._listed[1].add(key)
            self.record(split, path, reason)

    def record(self, split: str, path: str, reason: str) -> None:
        if self.path is None:
            return
        line = json.dumps({"split": split, "path": str(path), "reason": reason,
                           "rank": self.rank}) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)


def read_skipped(run_dir: Path | str) -> list[dict]:
    """Every record of a run's skip list (empty when nothing was skipped)."""
    path = Path(run_dir) / SKIPPED_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
