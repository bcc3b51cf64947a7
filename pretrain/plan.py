"""Memory planner: per-GPU memory of a pretraining config under each ZeRO stage, before renting
the cluster.

    python -m pretrain.plan --config giant.yaml --nodes 8 --gpus-per-node 8 [--gpu-memory-gb 80]
                            [--micro-batch 128] [--device gpu|cpu] [--set key=value ...]

What it counts, per GPU (or per rank on a CPU), for one micro-batch:

* **model states** (ZeRO paper): mixed-precision Adam holds 2 B of bf16/fp16 parameters, 2 B of
  gradients and 12 B of optimizer state (fp32 master copy, first and second moment) per
  parameter. Stage 0 (plain data parallelism) shards nothing, ZeRO-1 shards the 12 B over the
  data-parallel ranks, ZeRO-2 also the gradients, ZeRO-3 everything. fp32 training holds
  4 + 4 + 12: DeepSpeed's ZeRO optimizer clones an fp32 master partition even when the model
  is already fp32 (``stage_1_and_2.py``). With optimizer offload the optimizer part lives in
  host memory instead (reported in its own column).
* **ZeRO buffers**, read from the DeepSpeed JSON this project derives: ZeRO-2 keeps two
  contiguous gradient buckets (``overlap_comm`` double-buffers them); ZeRO-3 one bucket plus
  the gathered working set of parameters (prefetch bucket + the largest tensor) and the small
  parameters it never partitions (below ``stage3_param_persistence_threshold``).
* **activations**, measured, not guessed: the model is built without memory and run forward
  under ``torch.autograd.graph.saved_tensors_hooks``, summing the bytes of the distinct tensors
  autograd saves for backward (parameters and buffers excluded, since they exist anyway). Two
  micro-batches (1 and 2) separate the per-sample part from the constant part. With activation
  checkpointing, backward re-materialises one checkpointed block at a time, so the largest
  block's activations (measured the same way, without checkpointing) are added. "Without
  memory" means fake tensors: meta storage (shapes and dtypes, no bytes, no compute) that still
  claims to live on the CPU, so kernels are chosen as in a real run. On the bare meta device
  ``scaled_dot_product_attention`` falls back to its math path and saves the attention matrix;
  the fused kernels real runs use (flash attention on GPUs, its CPU port) save only q, k, v,
  the output and the log-sum-exp. Where training itself runs the math kernel (bf16/fp16 on
  CPUs under ``train.attention_kernel: auto``, or ``math`` anywhere;
  ``pretrain/engine/attention.py``)
  the forward is measured under that kernel, attention matrices included.
* **contrastive logits**: with ``local_loss`` each rank scores its micro-batch against the
  whole gathered batch, micro x (micro x world) logits per direction; the saved tensors of that
  computation are measured on the meta device too, plus the gradient of one logit matrix.
* **runtime overhead**, a fixed term so the estimate is comparable with a measured peak: on a
  GPU the CUDA context, cuBLAS/NCCL workspaces and caching-allocator fragmentation, which
  ``torch.cuda.max_memory_allocated`` does not show but the OOM limit does; on a CPU the
  resident size of the interpreter and the libraries the trainer imports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.autograd.graph import saved_tensors_hooks

from pretrain.config import ModelConfig, PretrainConfig
from pretrain.engine.attention import training_attention
from pretrain.engine.config import AttentionKernel
from pretrain.engine.deepspeed_config import deepspeed_config
from pretrain.engine.job_cli import load_or_report
from pretrain.engine.threads import apply_thread_policy

GB = 2**30
Device = Literal["gpu", "cpu"]

# Fixed runtime overhead per process, in GB (see the module docstring).
# gpu: CUDA context with lazy module loading ~0.5-1 GB, cuBLAS/cuDNN workspaces and NCCL
#      communicator buffers ~0.5-1 GB, and the caching allocator's fragmentation, commonly
#      1-2 GB on an 80 GB device under a stable training shape.
# cpu: peak RSS of `python -c "import pretrain.clip_task"` (torch, deepspeed, open_clip,
#      timm, webdataset) measured at 1.07 GB in this project's venv; the tokenizer, gloo and
#      DeepSpeed's shared-memory comm op add a little more.
RUNTIME_OVERHEAD_GB: dict[str, float] = {"gpu": 3.0, "cpu": 1.1}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each model-state part, before ZeRO sharding."""

    param: int
    grad: int
    optimizer: int


STATE_BYTES = {
    "bf16": StateBytes(param=2, grad=2, optimizer=12),
    "fp16": StateBytes(param=2, grad=2, optimizer=12),
    "fp32": StateBytes(param=4, grad=4, optimizer=12),
}


# --------------------------------------------------------------------------- measuring
class SavedTensorMeter:
    """Sums the bytes of distinct tensors autograd saves for backward while active.

    Views count once, through their base tensor; tensors listed in ``exclude`` (the model's
    parameters and buffers, which occupy memory whether or not autograd saves them) count not
    at all. Works on meta tensors, which have a size and a dtype but no storage.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {id(t) for t in exclude}
        self._seen: dict[int, torch.Tensor] = {}  # holds references so ids stay unique
        self.bytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        key = id(base)
        if key not in self._exclude and key not in self._seen:
            self._seen[key] = base
            self.bytes += base.numel() * base.element_size()
        return tensor

    @contextmanager
    def active(self) -> Iterator[SavedTensorMeter]:
        with saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self


def checkpoint_units(model: nn.Module) -> list[nn.Module]:
    """The innermost blocks that activation checkpointing recomputes one at a time.

    timm models and open_clip's text transformer flag checkpointing with a
    ``grad_checkpointing`` attribute and checkpoint each child of their block containers
    (``stages``, ``blocks``, ``resblocks``); nested units (a stage made of blocks) are
    recomputed block by block, so only the innermost count.
    """
    units: list[nn.Module] = []
    for module in model.modules():
        if hasattr(module, "grad_checkpointing"):
            for child in module.children():
                if isinstance(child, nn.Sequential | nn.ModuleList):
                    units.extend(child.children())
    ids = {id(unit) for unit in units}
    return [unit for unit in units
            if not any(id(inner) in ids for inner in unit.modules() if inner is not unit)]


def _set_checkpointing(clip: nn.Module, enabled: bool) -> None:
    clip.visual.set_grad_checkpointing(enabled)
    clip.transformer.grad_checkpointing = enabled


def _forward_saved_bytes(clip: nn.Module, cfg: ModelConfig, micro_batch: int,
                         dtype: torch.dtype) -> tuple[int, int]:
    """(bytes saved for backward by one forward of both towers, largest checkpoint unit).

    Runs under the caller's ``FakeTensorMode``: inputs are created fake too."""
    exclude = [*clip.parameters(), *clip.buffers()]
    meter = SavedTensorMeter(exclude)
    unit_bytes: list[int] = []
    hooks = []
    for unit in checkpoint_units(clip):
        start: list[int] = []
        hooks.append(unit.register_forward_pre_hook(
            lambda module, args, start=start: start.append(meter.bytes)))
        hooks.append(unit.register_forward_hook(
            lambda module, args, out, start=start: unit_bytes.append(meter.bytes - start.pop())))
    size = cfg.image.image_size
    image = torch.empty(micro_batch, 3, size, size, dtype=dtype)
    text = torch.zeros(micro_batch, cfg.text.context_length, dtype=torch.long)
    try:
        with meter.active():
            clip.encode_image(image, normalize=True)
            clip.encode_text(text, normalize=True)
    finally:
        for hook in hooks:
            hook.remove()
    return meter.bytes, max(unit_bytes, default=0)


@dataclass(frozen=True)
class ActivationProfile:
    """Activation bytes of one micro-batch: ``micro x (per_sample + recompute) + constant``."""

    per_sample: float
    constant: float
    recompute_per_sample: float = 0.0  # largest checkpointed block, re-materialised in backward

    def bytes(self, micro_batch: int) -> float:
        return micro_batch * (self.per_sample + self.recompute_per_sample) + self.constant


@dataclass(frozen=True)
class ModelFacts:
    """What the planner measures once per model config (on the meta device)."""

    image_params: int
    text_params: int
    largest_tensor: int  # elements of the largest parameter tensor
    small_params: int  # elements in tensors below ZeRO-3's persistence threshold
    dtype: torch.dtype
    activations: dict[bool, ActivationProfile]  # keyed by activation checkpointing on/off

    @property
    def params(self) -> int:
        return self.image_params + self.text_params


def measure_model(cfg: ModelConfig, precision: str, persistence_threshold: float,
                  attention_kernel: AttentionKernel = "auto",
                  device: Device = "gpu") -> ModelFacts:
    """Build the CLIP model of ``cfg`` on the meta device, move it to fake CPU tensors and
    measure parameters and activations in the training dtype (DeepSpeed casts the whole module
    to bf16/fp16), under the attention kernel training on ``device`` picks."""
    from pretrain.clip_model import build_clip

    with torch.device("meta"):
        clip = build_clip(cfg).to(DTYPES[precision])
    training_device = torch.device("cuda" if device == "gpu" else "cpu")
    kernel = training_attention(attention_kernel, training_device, DTYPES[precision])
    with FakeTensorMode(allow_non_fake_inputs=True), kernel:
        clip = clip.to_empty(device="cpu")
        return _measure_fake_model(clip, cfg, DTYPES[precision], persistence_threshold)


def _measure_fake_model(clip: nn.Module, cfg: ModelConfig, dtype: torch.dtype,
                        persistence_threshold: float) -> ModelFacts:
    clip.train()
    sizes = [p.numel() for p in clip.parameters()]
    image_params = sum(p.numel() for p in clip.visual.parameters())
    measured = {}
    for checkpointing in (False, True):
        _set_checkpointing(clip, checkpointing)
        measured[checkpointing] = [_forward_saved_bytes(clip, cfg, b, dtype) for b in (1, 2)]
    profiles = {}
    for checkpointing, ((one, _), (two, _)) in measured.items():
        # Block sizes come from the pass without checkpointing, which sees inside the blocks.
        (_, unit_one), (_, unit_two) = measured[False]
        profiles[checkpointing] = ActivationProfile(
            per_sample=float(two - one), constant=float(2 * one - two),
            recompute_per_sample=float(unit_two - unit_one) if checkpointing else 0.0)
    return ModelFacts(
        image_params=image_params,
        text_params=sum(sizes) - image_params,
        largest_tensor=max(sizes),
        small_params=sum(n for n in sizes if n < persistence_threshold),
        dtype=dtype,
        activations=profiles,
    )


def contrastive_loss_bytes(micro_batch: int, world_size: int, embed_dim: int,
                           dtype: torch.dtype, kind: str = "clip",
                           local_loss: bool = True) -> float:
    """Memory of the contrastive loss of one micro-batch on one rank, measured on meta tensors.

    Mirrors open_clip: features gathered from every rank with gradients, logits scaled by the
    learned temperature, cross-entropy both ways (CLIP) or a pairwise sigmoid (SigLIP, which
    also sees every rank's texts, chunk by chunk). Counts what autograd saves plus the gradient
    of one logit matrix, which backward materialises while the saved tensors are still alive.
    """
    gathered = micro_batch * world_size
    rows = micro_batch if local_loss or kind == "siglip" else gathered
    meta = {"device": "meta", "dtype": dtype}
    image = torch.empty(micro_batch, embed_dim, requires_grad=True, **meta)
    text = torch.empty(micro_batch, embed_dim, requires_grad=True, **meta)
    scale = torch.empty(1, requires_grad=True, **meta)
    others = torch.empty(gathered - micro_batch, embed_dim, **meta)
    meter = SavedTensorMeter([image, text, scale])
    with meter.active():
        all_image, all_text = torch.cat([image, others]), torch.cat([text, others])
        if kind == "siglip":
            signs = torch.ones(micro_batch, gathered, **meta)
            loss = -F.logsigmoid(signs * (scale * image @ all_text.T)).sum() / micro_batch
        else:
            left_image = image if local_loss else all_image
            left_text = text if local_loss else all_text
            labels = torch.arange(rows, device="meta")
            loss = (F.cross_entropy(scale * left_image @ all_text.T, labels)
                    + F.cross_entropy(scale * left_text @ all_image.T, labels)) / 2
        del loss
    logit_grad = rows * gathered * torch.finfo(dtype).bits // 8
    return float(meter.bytes + logit_grad)


# --------------------------------------------------------------------------- estimating
@dataclass(frozen=True)
class MemoryBreakdown:
    """Estimated peak memory of one GPU (or CPU rank), in bytes, by part."""

    stage: int
    offload: bool
    micro_batch: int
    params: float
    grads: float
    optimizer: float
    buffers: float
    activations: float
    logits: float
    overhead: float
    host: float = 0.0  # offloaded optimizer state, in host memory (not part of the total)

    @property
    def label(self) -> str:
        return f"ZeRO-{self.stage}" + (" + offload" if self.offload else "")

    @property
    def total(self) -> float:
        return (self.params + self.grads + self.optimizer + self.buffers + self.activations
                + self.logits + self.overhead)


def model_state_bytes(params: int, stage: int, world_size: int, precision: str,
                      offload: bool) -> tuple[float, float, float, float]:
    """(parameters, gradients, optimizer, host) bytes per rank under a ZeRO stage."""
    per = STATE_BYTES[precision]
    weights = per.param * params / (world_size if stage >= 3 else 1)
    grads = per.grad * params / (world_size if stage >= 2 else 1)
    # stage 0 replicates the optimizer part (fp32 training has no separate master copy there,
    # so this over-counts it by 4 B/param)
    optimizer = per.optimizer * params / (world_size if stage >= 1 else 1)
    return (weights, grads, 0.0, optimizer) if offload else (weights, grads, optimizer, 0.0)


def zero_buffer_bytes(facts: ModelFacts, stage: int, zero: dict[str, Any],
                      precision: str) -> float:
    """Communication buffers and ZeRO-3's gathered parameters, from the DeepSpeed JSON."""
    if stage <= 1:  # they reduce full gradients after backward, when activations are gone
        return 0.0
    per = STATE_BYTES[precision]
    bucket = min(float(zero["reduce_bucket_size"]), facts.params)
    if stage == 2 and zero.get("contiguous_gradients"):
        return bucket * per.grad * (2 if zero.get("overlap_comm") else 1)
    if stage == 3:
        working_set = min(float(facts.params),
                          zero["stage3_prefetch_bucket_size"] + facts.largest_tensor)
        return (working_set + facts.small_params) * per.param + bucket * per.grad
    return 0.0


def estimate(cfg: PretrainConfig, facts: ModelFacts, world_size: int, stage: int, offload: bool,
             micro_batch: int, device: Device = "gpu", overhead_gb: float | None = None,
             checkpointing: bool | None = None) -> MemoryBreakdown:
    """Peak memory of one rank for ``cfg`` at ``micro_batch`` under ZeRO ``stage``."""
    precision = cfg.deepspeed.precision
    if checkpointing is None:
        checkpointing = cfg.model.image.grad_checkpointing or cfg.model.text.grad_checkpointing
    zero = deepspeed_config(cfg.deepspeed.model_copy(update={"zero_stage": stage}), cfg.optimizer,
                            cfg.train.grad_accum,
                            micro_batch, world_size)["zero_optimization"]
    weights, grads, optimizer, host = model_state_bytes(facts.params, stage, world_size,
                                                        precision, offload)
    overhead = RUNTIME_OVERHEAD_GB[device] if overhead_gb is None else overhead_gb
    return MemoryBreakdown(
        stage=stage, offload=offload, micro_batch=micro_batch,
        params=weights, grads=grads, optimizer=optimizer,
        buffers=zero_buffer_bytes(facts, stage, zero, precision),
        activations=facts.activations[checkpointing].bytes(micro_batch),
        logits=contrastive_loss_bytes(micro_batch, world_size, cfg.model.embed_dim, facts.dtype,
                                      cfg.loss.kind, cfg.loss.local_loss),
        overhead=overhead * GB,
        host=host,
    )


def max_micro_batch(fits: Any, limit: int = 1 << 20) -> int:
    """Largest micro-batch ``b`` with ``fits(b)`` true (memory grows with ``b``); 0 if none."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


@dataclass
class Plan:
    """The planner's answer for one config and cluster shape."""

    config_name: str
    cfg: PretrainConfig
    facts: ModelFacts
    nodes: int
    gpus_per_node: int
    memory_gb: float
    device: Device
    rows: list[MemoryBreakdown] = field(default_factory=list)
    max_batch: dict[tuple[int, bool], dict[bool, int]] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


ZERO_OPTIONS = [(0, False), (1, False), (2, False), (3, False), (1, True), (2, True), (3, True)]


def make_plan(config_name: str, cfg: PretrainConfig, nodes: int, gpus_per_node: int,
              memory_gb: float = 80.0, micro_batch: int | None = None, device: Device = "gpu",
              overhead_gb: float | None = None) -> Plan:
    """Estimate every ZeRO option at the config's (or the given) micro-batch, and the largest
    micro-batch that fits ``memory_gb`` with and without activation checkpointing."""
    threshold = deepspeed_config(cfg.deepspeed.model_copy(update={"zero_stage": 3}), cfg.optimizer,
                                 cfg.train.grad_accum,
                                 1, 1)["zero_optimization"]["stage3_param_persistence_threshold"]
    facts = measure_model(cfg.model, cfg.deepspeed.precision, threshold,
                          cfg.train.attention_kernel, device)
    plan = Plan(config_name, cfg, facts, nodes, gpus_per_node, memory_gb, device)
    batch = micro_batch or cfg.data.batch_size
    world = plan.world_size
    for stage, offload in ZERO_OPTIONS:
        plan.rows.append(estimate(cfg, facts, world, stage, offload, batch, device, overhead_gb))
        plan.max_batch[stage, offload] = {
            checkpointing: max_micro_batch(
                lambda b, c=checkpointing, s=stage, o=offload: estimate(
                    cfg, facts, world, s, o, b, device, overhead_gb, c).total <= memory_gb * GB)
            for checkpointing in (True, False)
        }
    return plan


# --------------------------------------------------------------------------- reporting
def format_plan(plan: Plan) -> str:
    """The plan as a text table (GB per GPU)."""
    cfg, facts = plan.cfg, plan.facts
    on = cfg.model.image.grad_checkpointing or cfg.model.text.grad_checkpointing
    batch = plan.rows[0].micro_batch
    unit = "GPU" if plan.device == "gpu" else "rank"
    off, ckpt = facts.activations[False], facts.activations[True]
    lines = [
        f"{plan.config_name}: {cfg.model.image.name} {facts.image_params / 1e6:.1f}M + text "
        f"{facts.text_params / 1e6:.1f}M = {facts.params / 1e6:.1f}M parameters, "
        f"{cfg.deepspeed.precision}, {plan.world_size} {unit}s ({plan.nodes} nodes x "
        f"{plan.gpus_per_node}), {plan.memory_gb:g} GB per {unit}",
        f"activations per sample (measured with fake tensors): "
        f"{off.per_sample / 2**20:.1f} MB without checkpointing, "
        f"{ckpt.per_sample / 2**20:.1f} MB + {ckpt.recompute_per_sample / 2**20:.1f} MB "
        f"recomputed block with it (config: checkpointing {'on' if on else 'off'})",
        f"micro-batch {batch} x {plan.world_size} {unit}s x grad_accum {cfg.train.grad_accum} = "
        f"global batch {batch * plan.world_size * cfg.train.grad_accum}; contrastive logits "
        f"{batch} x {batch * plan.world_size} per {unit} and direction",
        "",
    ]
    header = (f"{'GB per ' + unit:<18}{'params':>8}{'grads':>8}{'optim':>8}{'buffers':>9}"
              f"{'activ.':>8}{'logits':>8}{'overhead':>9}{'total':>8}{'fits':>6}{'host':>7}"
              f"   max micro-batch (ckpt / no ckpt)")
    lines += [header, "-" * len(header)]
    for row in plan.rows:
        best = plan.max_batch[row.stage, row.offload]
        values = (row.params, row.grads, row.optimizer, row.buffers, row.activations,
                  row.logits, row.overhead, row.total)
        widths = (8, 8, 8, 9, 8, 8, 9, 8)
        cells = "".join(f"{v / GB:>{w}.2f}" for v, w in zip(values, widths, strict=True))
        fits = "yes" if row.total <= plan.memory_gb * GB else "NO"
        lines.append(f"{row.label:<18}{cells}{fits:>6}{row.host / GB:>7.2f}"
                     f"   {best[True]:>7} / {best[False]}")
    lines += [
        "",
        "params/grads/optim: ZeRO paper, 16 B/param in mixed precision (2+2+12), sharded by "
        "stage; host: offloaded optimizer state.",
        f"overhead: fixed {plan.rows[0].overhead / GB:.1f} GB "
        + ("(CUDA context, workspaces, allocator fragmentation)." if plan.device == "gpu"
           else "(interpreter and libraries RSS)."),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Per-GPU memory of a pretraining config "
                                     "under each ZeRO stage, and the largest micro-batch")
    parser.add_argument("--config", required=True, help="YAML path or name under configs/pretrain")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0,
                        help="memory per GPU (per rank with --device cpu)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="micro-batch per GPU (default: the config's data.batch_size)")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="which runtime overhead to add (cpu: the CPU test/demo setting)")
    parser.add_argument("--overhead-gb", type=float, default=None,
                        help="replace the fixed runtime overhead term")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1 or (args.micro_batch or 1) < 1:
        parser.error("--nodes, --gpus-per-node and --micro-batch must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_or_report(PretrainConfig, args.config, args.overrides, kind="pretrain")
    if cfg is None:
        return 2
    try:
        apply_thread_policy(log=sys.stderr)  # the fake-tensor measurement runs on this process
    except ValueError as error:
        print(f"environment error: {error}", file=sys.stderr)
        return 2
    plan = make_plan(args.config, cfg, args.nodes, args.gpus_per_node, args.gpu_memory_gb,
                     args.micro_batch, args.device, args.overhead_gb)
    print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
