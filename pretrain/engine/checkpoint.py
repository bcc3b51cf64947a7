"""Atomic, resumable DeepSpeed checkpoints.

A checkpoint is a tag directory ``step_00001000/`` holding DeepSpeed's files (model, ZeRO
optimizer shards, scheduler, client state) plus one ``rank_<5-digit rank>.pt`` per rank with what
DeepSpeed does not keep: RNG states and the rank's data-stream position. ``latest`` names the
newest *complete* tag; it is replaced atomically only after every rank has finished writing
(DeepSpeed's own ``latest`` is written by rank 0 before the other ranks are done, so it is not
used). Older tags beyond ``keep`` are removed after ``latest`` moves on, except the
``protected`` one: the trainer's best checkpoint by its evaluation metric, which ``best`` names.

Rank 0 also writes ``run_state.json`` into the tag (step, samples seen, global batch and its
split, ZeRO stage: :mod:`pretrain.engine.resharding`), readable before any process group. A
checkpoint written by another number of ranks is loaded through a universal checkpoint
(``universal/<tag>/``, converted once, the original tag untouched) at ZeRO stages 1-3, as it is
at stage 0; the per-rank files of ranks that did not exist are read from old rank
``rank mod old_world`` (RNG, task state), and every old rank's data-stream state is handed on.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from data_tools.files import atomic_torch_save, atomic_write_text
from pretrain.engine.distributed import barrier
from pretrain.engine.resharding import (
    RUN_STATE_FILE,
    UNIVERSAL_DIR,
    SavedRun,
    SavedStreams,
    needs_universal,
    saved_streams,
    universal_folder,
)

TAG_PATTERN = re.compile(r"^step_(\d{8})$")
# The trainer checkpoints a step before evaluating it, so that checkpoint's client state
# predates the evaluation; what the evaluation made the best is written beside it.
BEST_FILE = "best.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from (numpy: timm's mixup), in a ``weights_only``-safe form."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss,
                  cached_gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss,
                         cached_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def optimizer_param_names(engine: Any) -> list[list[str]]:
    """The module's parameter names in the order of the optimizer's groups: what maps the
    fp32 master copies of a ZeRO-stage-0 checkpoint (kept by position, not name) to names."""
    names = {id(param): name for name, param in engine.module.named_parameters()}
    optimizer = engine.optimizer
    groups = (optimizer.fp16_groups if hasattr(optimizer, "fp16_groups")  # bf16/fp16 master copies
              else [group["params"] for group in optimizer.param_groups])
    return [[names[id(param)] for param in group] for group in groups]


def fp32_state_dict(checkpoint_dir: Path | str, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The fp32 weights (and buffers) of checkpoint ``tag`` (default: the complete ``latest``).

    ZeRO stages 1-3 keep them in their optimizer shards (DeepSpeed consolidates those). Stage 0
    keeps the module whole: in fp32 training it *is* fp32; in bf16 training the fp32 master
    copies are the optimizer's ``fp32_groups``, in the order :func:`optimizer_param_names`
    recorded with the checkpoint.
    """
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag or (checkpoint_dir / "latest").read_text().strip()
    folder = checkpoint_dir / tag
    if any(folder.glob("*_optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=True)
    weights = dict(states["module"])
    master = states["optimizer"].get("fp32_groups") if states.get("optimizer") else None
    if master is not None:
        for names, tensors in zip(states["param_names"], master, strict=True):
            weights.update(zip(names, tensors, strict=True))
    low = sorted(name for name, value in weights.items()
                 if value.is_floating_point() and value.dtype != torch.float32)
    if low:
        raise ValueError(f"{folder}: no fp32 copy of {len(low)} tensors (e.g. {low[0]!r})")
    return weights


def _restore_buffers(engine: Any, folder: Path) -> None:
    """Load the module's buffers (batch-norm statistics...) and, at ZeRO 1-2, its frozen
    parameters from the universal checkpoint.

    DeepSpeed's universal load restores the optimizer's parameters from ``zero/`` and skips the
    module's state dict altogether (``_load_checkpoint``: ``if not
    self.load_universal_checkpoint(): self.load_module_state_dict(...)``), so buffers kept
    their initial values (a segmenter's batch-norm running means came back as zeros), and so
    would parameters outside the optimizer (a linear probe's frozen encoder: its initial
    weights, normally the same pretrained file). Buffers are never partitioned (ZeRO-3
    included); the model-states file beside ``zero/`` holds them under their names, and at
    ZeRO 1-2 the frozen parameters whole (ZeRO-3 partitions those: not handled here).
    """
    states = sorted(folder.glob("*model_states.pt"))
    if not states:
        raise RuntimeError(f"{folder}: no model states file")
    saved = torch.load(states[0], map_location="cpu", weights_only=False)
    module_state = saved["module"]
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            if name in module_state and name in saved.get("buffer_names", module_state):
                buffer.copy_(module_state[name])
        for name, param in engine.module.named_parameters():
            value = module_state.get(name)
            if not param.requires_grad and value is not None and value.shape == param.shape:
                param.copy_(value)


def _restore_group_hyperparameters(engine: Any, folder: Path) -> None:
    """Give every optimizer parameter group its own saved hyperparameters again.

    DeepSpeed's ZeRO-3 universal load copies the *first* group's saved hyperparameters into
    every group (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``; DeepSpeed issue
    6691 is the same loss at other stages): weight decay 0 of a no-decay group would then
    apply to every group. The universal checkpoint keeps each group's; only the parameter
    lists (the optimizer's own flat partitions) are left as they are.
    """
    saved = torch.load(folder / "zero" / "optimizer_state.pt", map_location="cpu",
                       weights_only=False)["optimizer_state_dict"]["param_groups"]
    groups = engine.optimizer.optimizer.param_groups
    if len(saved) != len(groups):
        raise RuntimeError(f"{folder}: {len(saved)} optimizer parameter groups, the model has "
                           f"{len(groups)}")
    for group, hyper in zip(groups, saved, strict=True):
        group.update({key: value for key, value in hyper.items() if key != "params"})


class Checkpointer:
    """Saves and restores a DeepSpeed engine plus per-rank extras under one directory."""

    def __init__(self, directory: Path, keep: int, rank: int) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.rank = rank
        self.protected: str | None = None  # a tag pruning must keep (the best checkpoint)

    def latest_tag(self) -> str | None:
        latest = self.directory / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        return tag if (self.directory / tag).is_dir() else None

    def _rank_file(self, tag: str, rank: int | None = None) -> Path:
        return self.directory / tag / f"rank_{self.rank if rank is None else rank:05d}.pt"

    def save(self, engine: Any, step: int, client_state: dict, rank_state: dict,
             run_state: SavedRun) -> str:
        """Collective: every rank must call it. Returns the tag written."""
        tag = tag_for(step)
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state,
                               save_latest=False)
        atomic_torch_save(rank_state, self._rank_file(tag))
        if self.rank == 0:
            atomic_write_text(self.directory / tag / RUN_STATE_FILE, run_state.to_json())
        barrier()
        if self.rank == 0:
            atomic_write_text(self.directory / "latest", tag)
            if self.protected is not None:
                atomic_write_text(self.directory / "best", self.protected)
            self._prune(keep_newest=tag)
        barrier()
        return tag

    def _prune(self, keep_newest: str) -> None:
        tags = sorted(p.name for p in self.directory.iterdir() if TAG_PATTERN.match(p.name))
        complete = [t for t in tags if t <= keep_newest]
        for stale in complete[: -self.keep]:
            if stale == self.protected:
                continue
            shutil.rmtree(self.directory / stale, ignore_errors=True)
        converted = self.directory / UNIVERSAL_DIR
        if converted.is_dir():  # conversions of tags that are gone, or older than the newest
            for folder in converted.iterdir():
                if folder.name != self.protected and folder.name < keep_newest:
                    shutil.rmtree(folder, ignore_errors=True)

    def record_best(self, best: dict[str, Any]) -> None:
        """After the evaluation of the step just checkpointed made it the best: keep that tag
        (``best``) and, on rank 0, write ``best`` beside it for :meth:`load`."""
        tag = tag_for(int(best["step"]))
        self.protected = tag
        if self.rank == 0 and (self.directory / tag).is_dir():
            atomic_write_text(self.directory / tag / BEST_FILE, json.dumps(best))
            atomic_write_text(self.directory / "best", tag)

    def load(self, engine: Any, saved: SavedRun, world_size: int
             ) -> tuple[dict, dict, SavedStreams]:
        """Restore checkpoint ``saved`` (the latest complete one, see
        :func:`~pretrain.engine.resharding.read_saved_run`) on ``world_size`` ranks.

        Returns DeepSpeed's client state, this rank's extras (``rng``, ``task``) and every old
        rank's saved data-stream state (read on access). On another world size at ZeRO 1-3
        the universal checkpoint must exist (converted beforehand) and the engine must have
        been built with ``"checkpoint": {"load_universal": true}``; the flag is cleared after
        this load.
        """
        tag = saved.tag
        if needs_universal(saved, world_size):
            folder = universal_folder(self.directory, tag)
            if not engine.load_universal_checkpoint():
                raise RuntimeError("a universal load needs the engine built with load_universal")
            load_path, client_state = engine.load_checkpoint(str(folder.parent), tag=tag)
            engine._config.load_universal_checkpoint = False  # later loads are plain ones
            _restore_buffers(engine, folder)
            if engine.zero_optimization_stage() == 3:
                _restore_group_hyperparameters(engine, folder)
        else:
            load_path, client_state = engine.load_checkpoint(str(self.directory), tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.directory / tag}")
        if engine.zero_optimization_stage() == 3:
            # Loading leaves ZeRO-3 parameters gathered. The first forward afterwards records
            # DeepSpeed's parameter-fetch trace, and would record it without those fetches, so
            # every later backward failed with "tracing error ... expected the next 1
            # parameters in the parameter fetch queue". Partition them again first.
            engine.empty_partition_cache()
        # A rank that did not exist in the old run takes the RNG and task state (EMA: the same
        # on every rank, ZeRO-3 has none) of old rank ``rank mod old_world``: its random
        # stream then repeats that rank's, which only matters for augmentation and dropout.
        own = self._rank_file(tag, self.rank % saved.world_size)
        if not own.is_file():
            raise RuntimeError(f"{own} is missing: {tag} is incomplete")
        rank_state = torch.load(own, map_location="cpu", weights_only=True)
        rank_state.pop("data")
        streams = saved_streams(self.directory, saved)
        best = self.directory / tag / BEST_FILE
        if best.is_file():  # the evaluation after this checkpoint improved the best
            client_state = {**client_state, "best": json.loads(best.read_text())}
        return client_state, rank_state, streams
