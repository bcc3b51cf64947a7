"""The machinery every job shares (pretraining and each fine-tuning task): config sections,
the DeepSpeed trainer and its task interface, checkpoints, collectives, schedules, the
resumable data streams, evaluation slicing, run logs and the entry points' CLI."""
