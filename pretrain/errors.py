"""Errors that end a job with one line (the entry points catch them; see pretrain.job_cli)."""


class TrainingAborted(RuntimeError):
    """The run cannot continue (too many non-finite losses in a row, a data set that yields
    no sample); the last checkpoint is intact."""
