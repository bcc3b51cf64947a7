"""How a training stream that can no longer read its files ends the run: in one line, never a
hang.

An exception raised inside a data-loader worker reaches the rank's main process as a wall of
tracebacks, and the exception's traceback keeps the loader's iterator alive, so its workers
are never told to stop and the interpreter's exit waits on them for ever. A stream that gives
up therefore yields one item, :func:`stream_error`, instead of raising (what
:class:`pretrain.engine.stream.ResumableStream` does with every stream's give-up);
:class:`pretrain.engine.stream.TrainLoader` stops its workers and raises the message as
``TrainingAborted`` (one line, exit 1).

Every file-based stream (the ImageFolder classification stream, the ADE-layout segmentation
stream, the COCO detection stream) counts its failed reads with one :class:`FailureStreak`
(through :class:`pretrain.engine.stream.FilePass`): each failure goes to the run's skip list
(:class:`pretrain.engine.skipped.SkipLog`); a streak of ``min(GIVE_UP_AFTER_FAILURES, files in
the split)`` failures in a row gives up, naming the split, the config field that points at it
and the first few files with their reasons.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pretrain.engine.skipped import SkipLog

STREAM_ERROR = "stream_error"  # the one item a worker yields when its stream cannot go on
# 1000 failed reads in a row is no longer bad luck (the shard stream gives up on a shard set
# after as many undecodable samples, pretrain.engine.shard_stream); a smaller split gives
# up sooner.
GIVE_UP_AFTER_FAILURES = 1000
SHOWN_FILES = 3  # files named in the one-line message
_REASON_CHARS = 160


def stream_error(message: str) -> dict[str, Any]:
    """The item a stream yields instead of raising (see the module docstring)."""
    return {STREAM_ERROR: message}


def failure_reason(error: BaseException) -> str:
    """A short, single-line reason for a failed read (``FileNotFoundError: ...``)."""
    text = " ".join(str(error).split()) or "no detail"
    if len(text) > _REASON_CHARS:
        text = text[:_REASON_CHARS - 3] + "..."
    return f"{type(error).__name__}: {text}"


class FailureStreak:
    """Counts a stream's failed reads in a row and decides when it gives up.

    ``split``: ``"train"`` or ``"val"`` (the skip list's field); ``source``: what the user set,
    e.g. ``"data.train_images /data/coco/train2017"``; ``files``: how many files the split has
    (a small split gives up once it has failed that many times in a row).
    """

    def __init__(self, split: str, source: str, files: int, skips: SkipLog | None = None) -> None:
        self.split, self.source = split, source
        self.limit = max(1, min(GIVE_UP_AFTER_FAILURES, files))
        self.skips = skips or SkipLog(None)
        self.count = 0
        self.first: list[str] = []

    def succeeded(self) -> None:
        self.count = 0
        self.first = []

    def failed(self, path: str | Path, error: BaseException) -> str | None:
        """Record one failed read; returns the give-up message once the streak is long enough
        (the caller yields :func:`stream_error` of it), else ``None``."""
        reason = failure_reason(error)
        self.skips.record_once(self.split, str(path), reason)
        self.count += 1
        if len(self.first) < SHOWN_FILES:
            self.first.append(f"{path} ({reason})")
        if self.count < self.limit:
            return None
        listed = ("; every skipped file is listed in "
                  f"{self.skips.path}" if self.skips.path is not None else "")
        return (f"{self.source}: the last {self.count} images read all failed to decode "
                f"(the {self.split} split; first {', '.join(self.first)}){listed}")


def unreadable_split_error(field: str, folder: str | Path, files: int, first: str | Path,
                           reason: str) -> str:
    """The one line an evaluation gives when none of a validation split's files could be
    read: the config field to fix, the folder, the first file and why it failed."""
    return (f"{field} {folder}: none of the {files} validation images could be read, e.g. "
            f"{first} ({reason}); fix {field} (every unreadable file is listed in the run's "
            "skipped.jsonl)")
