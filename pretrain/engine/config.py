"""Validated job configuration: YAML file + ``--set a.b=value`` overrides -> pydantic model.

Every job (pretraining, each fine-tuning task) has one schema, assembled from sections that are
defined once here and shared: ``train`` (seed, accumulation, guards), ``optimizer``,
``schedule``, the data stream's common fields, ``eval``, ``deepspeed``, ``log`` and
``checkpoint`` (:class:`JobConfig`). Unknown keys and bad values are rejected at load time with a
one-line :class:`ConfigError` naming the file and the field path, before any process group
starts. A file may start from another with ``base: <path>`` (relative to the file's folder): the
base's tree, with the file's keys merged over it (:func:`read_config_tree`). The resolved config
is saved next to the run, and the DeepSpeed JSON is derived from it
(:mod:`pretrain.engine.deepspeed_config`), never written by hand.
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from data_tools.files import atomic_write_text

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A bad config file or override; the message is one line naming the problem."""


def _is_number_type(annotation: Any) -> bool:
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(arg in (int, float) for arg in typing.get_args(annotation))
    return False


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated, and a
    boolean is never taken for a number (pydantic would read ``steps: true`` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if (isinstance(value, bool) and info.field_name is not None
                and _is_number_type(cls.model_fields[info.field_name].annotation)):
            raise ValueError(f"expected a number, got the boolean {value}")
        return value


def check_warmup(warmup_steps: int, steps: int) -> None:
    if warmup_steps and warmup_steps >= steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be smaller than steps ({steps})")


# --------------------------------------------------------------------------- shared sections
AttentionKernel = Literal["auto", "torch", "math"]  # see pretrain/engine/attention.py


class TrainConfig(Section):
    seed: int = 0
    # Accumulation multiplies the samples per optimizer step. For contrastive pretraining it
    # does NOT grow the negative set: each micro-batch's loss only sees the negatives of the
    # same micro-step on all ranks.
    grad_accum: int = Field(1, ge=1)
    # Non-finite micro-batches are dropped and replaced; this many in a row abort the run.
    max_nonfinite_batches: int = Field(5, ge=1)
    # Attention kernel of training steps (pretrain/engine/attention.py): "auto" = the math kernel on
    # CPUs at bf16 (PyTorch's flash backward is slow there), PyTorch's choice otherwise;
    # "torch" = always PyTorch's choice; "math" = always the math kernel.
    attention_kernel: AttentionKernel = "auto"
    # Seconds any collective (ours, DeepSpeed's, ZeRO's) waits for every rank before the job
    # ends naming the rank that did not arrive (pretrain/engine/distributed.py). Long enough for the
    # slowest legitimate wait (the others wait while rank 0 exports the final weights or
    # scores COCO alone, a slow checkpoint write), short enough that a frozen node costs
    # minutes, not torch's 30-minute default.
    collective_timeout: float = Field(600.0, ge=1.0)


class OptimizerConfig(Section):
    """AdamW (the optimizer of every published recipe this project follows)."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    # torch's fused AdamW kernel (CPU and CUDA): one pass over the states instead of one per op,
    # the same update up to rounding; ~5x faster optimizer steps on a CPU (docs/performance.md).
    fused: bool = True


class ScheduleConfig(Section):
    """Length and learning-rate schedule, in optimizer steps or in epochs of the training data.

    Warmup rises linearly from ``warmup_start`` x lr to lr; then ``decay`` shapes the rest:
    ``cosine`` to ``min_lr_ratio`` x lr, ``poly`` (``(1 - progress) ** power`` down to
    ``min_lr_ratio``), ``step`` (x ``gamma`` at each of ``milestones``) or ``constant``.
    Milestones and warmup are in the unit of the length: steps with ``steps``, epochs with
    ``epochs`` (``warmup_steps`` may still be given in steps with epochs).
    """

    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    warmup_steps: int = Field(0, ge=0)
    warmup_epochs: float | None = Field(None, ge=0)
    warmup_start: float = Field(0.0, ge=0, le=1)
    decay: Literal["cosine", "poly", "step", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    power: float = Field(1.0, gt=0)
    milestones: list[float] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> ScheduleConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of steps and epochs")
        if self.warmup_epochs is not None and self.epochs is None:
            raise ValueError("warmup_epochs needs epochs (with steps, use warmup_steps)")
        if self.warmup_epochs is not None and self.warmup_steps:
            raise ValueError("set warmup_steps or warmup_epochs, not both")
        if self.steps is not None:
            check_warmup(self.warmup_steps, self.steps)
        if self.milestones and self.decay != "step":
            raise ValueError("milestones only apply to decay: step")
        if self.milestones != sorted(self.milestones):
            raise ValueError("milestones must increase")
        return self


class StreamConfig(Section):
    """What every training data stream shares (the task's data section adds its own fields)."""

    batch_size: int = Field(..., ge=1, description="micro-batch per rank")
    workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(2000, ge=1)
    shuffle_initial: int = Field(500, ge=1)
    # Samples in one epoch of the training data, for schedules in epochs when the shards carry
    # no sizes.json (or to define an epoch differently).
    epoch_samples: int | None = Field(None, ge=1)


class EvalConfig(Section):
    # Evaluate every this many steps (and always after the last step); null: only at the end.
    every: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)  # per rank
    # The metric that picks the best checkpoint (a key of the task's evaluation), and whether
    # larger is better; null keeps no best checkpoint.
    best_metric: str | None = None
    best_mode: Literal["max", "min"] = "max"
    enabled: bool = True


class DeepSpeedConfig(Section):
    # 0: plain data parallelism (gradients all-reduced, optimizer states replicated; at bf16
    # DeepSpeed still shards the fp32 master weights); 1-3: ZeRO stages.
    zero_stage: Literal[0, 1, 2, 3] = 1
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    offload_optimizer: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "davit-pretrain"
    entity: str | None = None


class LogConfig(Section):
    every: int = Field(10, ge=1)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    peak_flops_per_device: float | None = Field(None, gt=0)  # for MFU, e.g. 989e12 (H100 bf16)
    progress: bool = True


class CheckpointConfig(Section):
    every: int = Field(1000, ge=1)
    keep: int = Field(2, ge=1)


class JobConfig(Section):
    """The sections every job has; a job's schema adds its model, data and task sections."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    data: StreamConfig


# --------------------------------------------------------------------------- loading
Cfg = TypeVar("Cfg", bound=BaseModel)
# What load_config validates with: a job schema, or a tagged_union() of several.
Schema = type[Cfg] | TypeAdapter[Cfg]

_TAG_ERROR = "config_tag"


def tagged_union(key: str, *schemas: type[Cfg]) -> TypeAdapter[Cfg]:
    """pydantic's discriminated union of job schemas on the top-level ``key``: each schema
    declares ``key`` as a ``Literal`` of its tag(s), and the tree's ``key`` picks the schema
    (validating the tree returns that schema's model).

    The discriminator is a function rather than the field name because every :class:`Section`
    field has a ``mode="before"`` validator, which pydantic refuses on a discriminator field.
    """
    tags: dict[str, type[Cfg]] = {}
    for schema in schemas:
        for tag in typing.get_args(schema.model_fields[key].annotation):
            tags[tag] = schema

    def tag_of(tree: Any) -> Any:
        value = tree.get(key) if isinstance(tree, dict) else getattr(tree, key, None)
        return value if isinstance(value, str) else None

    choices = tuple(Annotated[schema, Tag(tag)] for tag, schema in tags.items())
    discriminator = Discriminator(
        tag_of, custom_error_type=_TAG_ERROR, custom_error_message=f"{key}: missing or unknown",
        custom_error_context={"key": key, "expected": ", ".join(sorted(tags))})
    return TypeAdapter(Annotated[Union[choices], discriminator])  # noqa: UP007 (a runtime tuple)


def resolve_config_path(name: str | Path, kind: str) -> Path:
    """A path that exists is used as is; a bare name resolves under ``configs/<kind>/``.

    ``_*.yaml`` files are bases that configs name in ``base:``, not jobs: they are refused.
    """
    path = Path(name)
    candidates = [path, CONFIG_ROOT / kind / path]
    if path.suffix not in (".yaml", ".yml"):
        candidates.append(CONFIG_ROOT / kind / f"{path}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            if candidate.name.startswith("_"):
                raise ConfigError(f"{candidate}: a base of other configs (a _*.yaml file), not a "
                                  "job; run a config that names it in base:")
            return candidate
    raise ConfigError(f"config file not found: {name} (looked in . and {CONFIG_ROOT / kind})")


def apply_override(tree: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict; the value is parsed as YAML (so 3, 1e-3, true)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. schedule.steps=100")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[: depth + 1])} is not a section")
        node = child
    node[keys[-1]] = _parse_number(value)


def _parse_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string; accept it as the number users mean."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def merge_trees(base: dict, child: dict) -> dict:
    """``child`` over ``base``: mappings merge key by key (recursively); anything else in the
    child (a scalar, a list, null) replaces the base's value. Neither input is modified."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict:
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree


def read_config_tree(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The file's tree with its ``base:`` chain resolved (the ``base`` key dropped).

    ``base: <path>`` (relative to the file's own folder) names a file whose resolved tree this
    one starts from; the file's keys are merged over it (:func:`merge_trees`). A base may have
    its own base, to any depth.
    """
    tree = _read_yaml(path)
    if "base" not in tree:
        return tree
    base = tree.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected the path of a config file, got {base!r}")
    chain = (*_chain, path.resolve())
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: {base} not found (looked for {base_path})")
    if base_path.resolve() in chain:
        cycle = " -> ".join(str(link) for link in (*chain, base_path.resolve()))
        raise ConfigError(f"{path}: base: a cycle ({cycle})")
    return merge_trees(read_config_tree(base_path, chain), tree)


def _format_validation_error(source: str, error: ValidationError, tree: dict,
                             tagged: bool) -> str:
    problems = []
    for item in error.errors():
        if item["type"] == _TAG_ERROR:
            key, expected = item["ctx"]["key"], item["ctx"]["expected"]
            value = tree.get(key)
            problems.append(f"{key}: {'missing' if value is None else repr(value)} "
                            f"(expected one of: {expected})")
            continue
        # in a tagged union, pydantic's location starts with the tag of the chosen schema
        loc = item["loc"][1:] if tagged else item["loc"]
        where = ".".join(str(part) for part in loc) or "(top level)"
        message = item["msg"].replace("Value error, ", "")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"{where}: {message}")
    return f"{source}: " + "; ".join(problems)


def load_config(
    schema: Schema[Cfg], name: str | Path, overrides: list[str] | tuple[str, ...] = (),
    kind: str = "",
) -> Cfg:
    """Read (resolving ``base:``), override and validate a config; raises :class:`ConfigError`
    with a one-line message. ``schema`` is a job schema or a :func:`tagged_union` of several."""
    path = resolve_config_path(name, kind or "")
    tree = read_config_tree(path)
    for assignment in overrides:
        apply_override(tree, assignment)
    tagged = isinstance(schema, TypeAdapter)
    try:
        return schema.validate_python(tree) if tagged else schema.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(str(path), error, tree, tagged)) from None


def save_config(config: BaseModel, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
