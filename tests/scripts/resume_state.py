"""Test helper, run under the DeepSpeed launcher on any number of ranks: resume a run's latest
checkpoint exactly as the entry point does (batch split and universal conversion before the
process group, then the Trainer), and write what the live engine holds right after the load.

    deepspeed --num_gpus N tests/scripts/resume_state.py pretrain|finetune RUN_DIR OUT_DIR

OUT_DIR receives ``resumed/`` (the engine's state saved by DeepSpeed the moment after the load,
with the universal checkpoint info, so it can be converted and compared), ``universal/`` (its
conversion, ZeRO 1-3) and ``state.json`` (step, samples_seen, lrs, best, the notes printed).

The data streams are re-dealt to the new layout as in a real resume (tests/test_stream_layouts.py
checks what they then read).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import pretrain.engine.trainer as trainer_module  # noqa: E402
from pretrain.engine import resharding  # noqa: E402
from pretrain.engine.checkpoint import fp32_state_dict, optimizer_param_names  # noqa: E402
from pretrain.engine.config import load_config  # noqa: E402
from pretrain.engine.distributed import barrier  # noqa: E402


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    kind, run_dir, out = args[0], Path(args[1]), Path(args[2])
    if kind == "pretrain":
        from pretrain.clip_task import ClipTask
        from pretrain.config import PretrainConfig

        cfg = load_config(PretrainConfig, run_dir / "config.yaml")
        task_class = ClipTask
    else:
        from finetune.config import FinetuneConfig
        from finetune.registry import task_class as finetune_task

        cfg = load_config(FinetuneConfig, run_dir / "config.yaml")
        task_class = finetune_task(cfg)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    requested = (cfg.data.batch_size, cfg.train.grad_accum)
    cfg, notes = resharding.prepare_resume(cfg, run_dir, world, rank)
    trainer = trainer_module.Trainer(cfg, task_class(cfg), run_dir, requested)
    engine = trainer.engine
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    client_state = {UNIVERSAL_CHECKPOINT_INFO: {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    if cfg.deepspeed.zero_stage == 0:
        client_state["param_names"] = optimizer_param_names(engine)
    engine.save_checkpoint(str(out), tag="resumed", save_latest=False, client_state=client_state)
    task_state = trainer.task.state_dict()
    if task_state:
        torch.save(task_state, out / f"task_{rank}.pt")
    barrier()
    if trainer.is_main:
        if cfg.deepspeed.zero_stage > 0:
            from deepspeed.checkpoint import ds_to_universal

            ds_to_universal.main(resharding._conversion_args(out / "resumed", out / "universal"))
        torch.save(fp32_state_dict(out, "resumed"), out / "fp32.pt")
        lrs = [group["lr"] for group in engine.lr_scheduler.optimizer.param_groups]
        (out / "state.json").write_text(json.dumps({
            "step": trainer.step, "samples_seen": trainer.samples_seen, "lrs": lrs,
            "best": trainer.best, "notes": notes, "grad_accum": cfg.train.grad_accum,
            "batch_size": cfg.data.batch_size, "total_steps": trainer.total_steps}))
    barrier()
    trainer.loader.close()


if __name__ == "__main__":
    main()
