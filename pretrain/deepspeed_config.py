"""Derive the DeepSpeed JSON config from a validated job config (never written by hand)."""

from __future__ import annotations

from typing import Any, Protocol

from pretrain.config import DeepSpeedConfig


class OptimizerSchedule(Protocol):
    """The fields of a job's ``train`` section that the DeepSpeed JSON needs."""

    steps: int
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float
    grad_clip: float
    grad_accum: int


def deepspeed_config(
    ds: DeepSpeedConfig, train: OptimizerSchedule, micro_batch: int, world_size: int
) -> dict[str, Any]:
    """The ``deepspeed.initialize`` config for one job.

    The optimizer is AdamW with ``torch_adam`` so the same JSON runs on CPU (FusedAdam is
    CUDA-only); on GPUs ``torch.optim.AdamW`` uses its fused/foreach kernels. The schedule is
    DeepSpeed's ``WarmupCosineLR``, which scales each parameter group's own lr, so per-tower
    learning rates and layer decay survive it, and its state is checkpointed by DeepSpeed.
    """
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": micro_batch * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "steps_per_print": 10**9,  # our own metrics logger reports progress
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "eps": train.eps,
                "weight_decay": train.weight_decay,
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": train.steps,
                "warmup_num_steps": max(2, train.warmup_steps),
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0 if train.warmup_steps else 1.0,
                "cos_min_ratio": train.min_lr_ratio,
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
