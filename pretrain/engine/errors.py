"""Errors that end a job with one line (the entry points catch them:
pretrain.engine.job_cli)."""

from __future__ import annotations


class TrainingAborted(RuntimeError):
    """The run cannot continue (too many non-finite losses in a row, a data set that yields
    no sample, a rank that did not arrive at a collective); the last checkpoint is intact.

    One voice: ``every_rank`` marks an abort every rank raises together (rank 0 alone prints
    it); otherwise the rank that raises it prints it. A ``None`` message is a rank that stops
    quietly because another rank reports the cause.
    """

    def __init__(self, message: str | None, every_rank: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.every_rank = every_rank

    def printed_by(self, rank: int) -> bool:
        return self.message is not None and (not self.every_rank or rank == 0)
