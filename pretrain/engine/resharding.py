"""Resuming a run on a different number of ranks: what the checkpoint says about the run that
wrote it, the batch split for the new world size, and DeepSpeed universal checkpoints.

Everything here but :func:`convert_to_universal`'s caller-side wait runs before any process
group, so a refusal is one line (exit 2) and nothing in the run directory has changed.

``run_state.json`` (written by rank 0 beside every tag, before ``latest`` moves to it) holds
what the next launch must know before DeepSpeed starts: the step, ``samples_seen``, the global
batch and its split (micro-batch x accumulation x world size) and the ZeRO stage. Checkpoints
older than that file are read from their ``rank_*.pt`` count, the run's ``config.yaml`` and
``step x global batch``.

A ZeRO stage 1-3 checkpoint keeps the optimizer (fp32 masters, Adam moments) partitioned by
data-parallel rank, and DeepSpeed refuses to load it on another world size. DeepSpeed's
``ds_to_universal`` rewrites it as one file per parameter and state (``zero/<name>/fp32.pt``,
``exp_avg.pt``, ``exp_avg_sq.pt``), which any world size loads (``"checkpoint":
{"load_universal": true}``). The conversion writes ``checkpoints/universal/<tag>/`` (built in a
temporary sibling and renamed when complete), never touching the original tag. Stage 0 keeps
the whole optimizer in ``mp_rank_00_model_states.pt`` on every rank (also under bf16: DeepSpeed's
stage-0 wrapper holds full fp32 masters), so it loads on any world size as it is.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from pretrain.engine.stream import resume_stream_state

RUN_STATE_FILE = "run_state.json"
UNIVERSAL_DIR = "universal"
COMPLETE_FILE = "converted.json"  # written last in a finished conversion


class ResumeRefused(ValueError):
    """A resume that cannot go ahead as configured; the message is one line."""


@dataclass(frozen=True)
class SavedRun:
    """What a checkpoint tag says about the run that wrote it."""

    tag: str
    step: int
    samples_seen: int
    global_batch: int
    micro_batch: int
    grad_accum: int
    world_size: int
    zero_stage: int
    # The split the config asked for (data.batch_size, train.grad_accum), before a world-size
    # change re-split it to keep the global batch: what tells a deliberate change from the
    # same command re-run on another number of ranks.
    requested_micro_batch: int = 0
    requested_grad_accum: int = 0

    def __post_init__(self) -> None:
        if not self.requested_micro_batch:  # written before these fields existed
            object.__setattr__(self, "requested_micro_batch", self.micro_batch)
            object.__setattr__(self, "requested_grad_accum", self.grad_accum)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def read_saved_run(checkpoint_dir: Path) -> SavedRun | None:
    """The latest complete tag's :class:`SavedRun`, or ``None`` when there is no checkpoint."""
    checkpoint_dir = Path(checkpoint_dir)
    latest = checkpoint_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    folder = checkpoint_dir / tag
    if not folder.is_dir():
        return None
    state_file = folder / RUN_STATE_FILE
    if state_file.is_file():
        return SavedRun(**json.loads(state_file.read_text()))
    # A checkpoint from before run_state.json: its own files and the run's config.yaml.
    world = len(list(folder.glob("rank_*.pt")))
    config = yaml.safe_load((checkpoint_dir.parent / "config.yaml").read_text())
    micro, accum = int(config["data"]["batch_size"]), int(config["train"]["grad_accum"])
    step = int(tag.removeprefix("step_"))
    return SavedRun(tag=tag, step=step, samples_seen=step * micro * accum * world,
                    global_batch=micro * accum * world, micro_batch=micro, grad_accum=accum,
                    world_size=world, zero_stage=int(config["deepspeed"]["zero_stage"]))


def batch_split(saved: SavedRun, world: int, micro: int, accum: int) -> tuple[int, int]:
    """The (micro-batch, accumulation) to resume with on ``world`` ranks, given the config's.

    When the config asks for the split the checkpoint's run asked for (the same command, on
    another number of ranks), the saved global batch is kept: the same micro-batch and the
    accumulation that makes ``micro x accum x world`` equal to it if that is an integer, else
    the largest micro-batch not above the configured one that divides the per-rank share
    (with its accumulation). A config asking for another ``data.batch_size`` or
    ``train.grad_accum`` is a deliberate change and is taken as it is (the schedule then
    continues by samples seen). :class:`ResumeRefused` when no split exists, naming the
    options.
    """
    if (micro, accum) != (saved.requested_micro_batch, saved.requested_grad_accum):
        return micro, accum  # deliberate
    if world == saved.world_size:
        return saved.micro_batch, saved.grad_accum
    per_rank, remainder = divmod(saved.global_batch, world)
    if remainder == 0:
        if per_rank % micro == 0:
            return micro, per_rank // micro
        for smaller in range(min(micro, per_rank), 0, -1):
            if per_rank % smaller == 0:
                return smaller, per_rank // smaller
    options = sorted({d for d in range(1, world * 8 + 1) if saved.global_batch % d == 0})
    raise ResumeRefused(
        f"checkpoint {saved.tag} was trained with a global batch of {saved.global_batch} "
        f"({saved.micro_batch} x {saved.grad_accum} x {saved.world_size} ranks), which "
        f"{world} ranks cannot split evenly: run on a number of ranks that divides it (e.g. "
        f"{', '.join(map(str, options[-4:]))}) or change the global batch deliberately with "
        f"--set train.grad_accum=N and/or --set data.batch_size=M (the schedule then "
        f"continues by samples seen)")


def schedule_offset(saved: SavedRun | None, global_batch: int) -> float:
    """Where the learning-rate schedule stands relative to the step counter.

    The schedule is resolved for the current global batch; its position after ``step``
    optimizer steps is ``samples_seen / global_batch``. A run that never changed its global
    batch has ``samples_seen == step x global_batch`` and an offset of 0; after a deliberate
    change the step counter keeps counting optimizer steps (tags stay increasing) and the
    schedule is read at ``step + offset``.
    """
    if saved is None:
        return 0.0
    return saved.samples_seen / global_batch - saved.step


class SavedStreams(Sequence):
    """Every old rank's saved data-stream state (``rank_*.pt``'s ``data``), read on first
    access and memory-mapped (the rest of those files, e.g. an EMA copy of the weights, is not
    read): resuming on the same layout reads one file per rank, not one per old rank."""

    def __init__(self, folder: Path, old_world: int) -> None:
        self.folder = Path(folder)
        self.old_world = old_world
        self._read: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.old_world

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not 0 <= index < self.old_world:
            raise IndexError(index)
        if index not in self._read:
            import torch

            state = torch.load(self.folder / f"rank_{index:05d}.pt", map_location="cpu",
                               weights_only=True, mmap=True)
            self._read[index] = state["data"]
        return self._read[index]


def saved_streams(checkpoint_dir: Path, saved: SavedRun) -> SavedStreams:
    return SavedStreams(Path(checkpoint_dir) / saved.tag, saved.world_size)


def needs_universal(saved: SavedRun | None, world: int) -> bool:
    return saved is not None and saved.world_size != world and saved.zero_stage > 0


def universal_folder(checkpoint_dir: Path, tag: str) -> Path:
    return Path(checkpoint_dir) / UNIVERSAL_DIR / tag


def universal_complete(checkpoint_dir: Path, tag: str) -> bool:
    return (universal_folder(checkpoint_dir, tag) / COMPLETE_FILE).is_file()


def convert_to_universal(checkpoint_dir: Path, saved: SavedRun) -> Path:
    """Rank 0 (one process): ``checkpoints/universal/<tag>/`` from ``checkpoints/<tag>/``, unless
    it is already complete. DeepSpeed's progress output goes to ``conversion.log`` in it."""
    from deepspeed.checkpoint import ds_to_universal

    checkpoint_dir = Path(checkpoint_dir)
    out = universal_folder(checkpoint_dir, saved.tag)
    if universal_complete(checkpoint_dir, saved.tag):
        return out
    partial = out.with_name(f".{saved.tag}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    namespace = _conversion_args(checkpoint_dir / saved.tag, partial)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(namespace)
    except Exception as error:  # DeepSpeed's asserts and errors: one line, the log kept
        (partial / "conversion.log").write_text(log.getvalue())
        raise ResumeRefused(
            f"converting {checkpoint_dir / saved.tag} to a universal checkpoint failed "
            f"({type(error).__name__}: {' '.join(str(error).split())[:300]}); DeepSpeed's "
            f"output is in {partial / 'conversion.log'}") from None
    (partial / "conversion.log").write_text(log.getvalue())
    (partial / COMPLETE_FILE).write_text(json.dumps(
        {"source": saved.tag, "source_world_size": saved.world_size}))
    shutil.rmtree(out, ignore_errors=True)  # an incomplete folder of an older layout
    partial.rename(out)
    return out


def _conversion_args(source: Path, out: Path) -> Any:
    import argparse

    # ds_to_universal's own options; one worker each: it runs inside rank 0, and its process
    # pools would fork a process holding torch's threads.
    return argparse.Namespace(
        input_folder=str(source), output_folder=str(out), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True,
        # Checkpoints written before the trainer saved DeepSpeed's universal_checkpoint_info
        # lack it; for a model without tensor or pipeline parallelism it is only a version.
        inject_missing_state=True)


def wait_for_universal(checkpoint_dir: Path, tag: str, timeout: float) -> None:
    """Ranks other than 0, before the process group: wait (up to ``timeout`` s, the job's
    collective timeout) for rank 0's conversion to finish."""
    deadline = time.monotonic() + timeout
    while not universal_complete(checkpoint_dir, tag):
        if time.monotonic() > deadline:
            raise ResumeRefused(
                f"rank 0 did not finish converting {Path(checkpoint_dir) / tag} to a universal "
                f"checkpoint within train.collective_timeout ({timeout:g} s)")
        time.sleep(0.5)


def conversion_note(saved: SavedRun, world: int, folder: Path | None) -> str:
    where = (f"converted to a universal checkpoint in {folder}" if folder is not None
             else "ZeRO stage 0 keeps the whole optimizer on every rank: loaded as it is")
    return (f"checkpoint {saved.tag} was written by {saved.world_size} ranks; {where} for "
            f"{world} ranks")


def batch_note(saved: SavedRun, micro: int, accum: int, world: int) -> str | None:
    new_global = micro * accum * world
    if new_global == saved.global_batch:
        if (micro, accum, world) == (saved.micro_batch, saved.grad_accum, saved.world_size):
            return None
        return (f"global batch {saved.global_batch} kept: data.batch_size={micro} x "
                f"train.grad_accum={accum} x {world} ranks (was {saved.micro_batch} x "
                f"{saved.grad_accum} x {saved.world_size})")
    steps = saved.samples_seen / new_global
    return (f"global batch changed from {saved.global_batch} to {new_global}: the schedule "
            f"continues from samples_seen={saved.samples_seen} (step {saved.step}, schedule "
            f"position {steps:.6g} at the new batch)")


def ceil_steps(total: int, offset: float) -> int:
    """The step count at which the schedule (``total`` steps, read at ``step + offset``) ends."""
    return max(0, math.ceil(total - offset - 1e-9))


def prepare_resume(cfg: Any, run_dir: Path, world: int, rank: int) -> tuple[Any, list[str]]:
    """Before any process group, on every rank: ``cfg`` with the batch split to resume with
    and the lines rank 0 prints about it; at ZeRO 1-3 on a new world size rank 0 converts
    the checkpoint to a universal one while the other ranks wait for it. Raises
    :class:`ResumeRefused` (one line) when the resume cannot go ahead; nothing is written then.
    """
    checkpoints = Path(run_dir) / "checkpoints"
    saved = read_saved_run(checkpoints)
    if saved is None:
        return cfg, []
    if saved.zero_stage != cfg.deepspeed.zero_stage and world != saved.world_size:
        raise ResumeRefused(
            f"checkpoint {saved.tag} was written at ZeRO stage {saved.zero_stage} by "
            f"{saved.world_size} ranks: change the world size or the ZeRO stage, not both")
    micro, accum = batch_split(saved, world, cfg.data.batch_size, cfg.train.grad_accum)
    try:  # the same verdict the trainer reaches after loading, before anything is written
        resume_stream_state(saved_streams(checkpoints, saved), saved.world_size, rank, world,
                            cfg.data.workers)
    except ValueError as error:
        raise ResumeRefused(f"cannot resume {saved.tag}: {error}") from None
    if (micro, accum) != (cfg.data.batch_size, cfg.train.grad_accum):
        cfg = cfg.model_copy(update={
            "data": cfg.data.model_copy(update={"batch_size": micro}),
            "train": cfg.train.model_copy(update={"grad_accum": accum})})
    lines = []
    if saved.world_size != world:
        folder = None
        if needs_universal(saved, world):
            folder = universal_folder(checkpoints, saved.tag)
            if rank == 0:
                convert_to_universal(checkpoints, saved)
            else:
                wait_for_universal(checkpoints, saved.tag, cfg.train.collective_timeout)
        lines.append(conversion_note(saved, world, folder))
    note = batch_note(saved, micro, accum, world)
    if note:
        lines.append(note)
    return cfg, lines
