"""Derive the DeepSpeed JSON config from a validated job config (never written by hand)."""

from __future__ import annotations

from typing import Any

from pretrain.engine.config import DeepSpeedConfig, OptimizerConfig


def deepspeed_config(ds: DeepSpeedConfig, optimizer: OptimizerConfig, grad_accum: int,
                     micro_batch: int, world_size: int) -> dict[str, Any]:
    """The ``deepspeed.initialize`` config for one job.

    The optimizer is AdamW with ``torch_adam`` so the same JSON runs on CPU (FusedAdam is
    CUDA-only); ``optimizer.fused`` selects torch's fused AdamW kernel, on CPUs and GPUs
    alike. The learning-rate schedule is not in the JSON: the trainer hands DeepSpeed its own
    (:mod:`pretrain.engine.schedule`), which DeepSpeed steps and checkpoints.
    """
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": optimizer.grad_clip,
        "steps_per_print": 10**9,  # our own metrics logger reports progress
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optimizer.lr,
                "betas": list(optimizer.betas),
                "eps": optimizer.eps,
                "weight_decay": optimizer.weight_decay,
                "torch_adam": True,
                "adam_w_mode": True,
                **({"fused": True} if optimizer.fused else {}),
            },
        },
        "zero_optimization": _zero_section(ds),
    }
    if ds.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000}
    return config


def _zero_section(ds: DeepSpeedConfig) -> dict[str, Any]:
    if ds.zero_stage == 0:  # DeepSpeed all-reduces the gradients in buckets of 5e8 elements
        return {"stage": 0}
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.zero_stage >= 2,
        "contiguous_gradients": ds.zero_stage >= 2,
        "reduce_bucket_size": 5e8,
    }
    if ds.zero_stage == 3:
        # Gather whole layers ahead of use; keep small parameters resident.
        zero |= {
            "stage3_prefetch_bucket_size": 5e8,
            "stage3_param_persistence_threshold": 1e6,
            "stage3_gather_16bit_weights_on_model_save": False,
        }
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return zero
