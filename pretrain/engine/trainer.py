"""The DeepSpeed Trainer every job shares: engine, loop, guards, evaluation, checkpoints, metrics.

One object owns model, optimizer, schedule, data stream and evaluation state, so one checkpoint
restores them all (torchtitan's shape). What differs between jobs is a
:class:`~pretrain.engine.task.Task`; the trainer composes with it. Every rank runs the same
code; rank 0 also logs and exports.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from data_tools.files import atomic_write_text
from data_tools.workers import signal_when_parent_dies
from pretrain.engine import distributed
from pretrain.engine.attention import training_attention
from pretrain.engine.checkpoint import (
    Checkpointer,
    capture_rng_state,
    fp32_state_dict,
    optimizer_param_names,
    restore_rng_state,
    tag_for,
)
from pretrain.engine.config import JobConfig, save_config
from pretrain.engine.deepspeed_config import deepspeed_config
from pretrain.engine.errors import TrainingAborted
from pretrain.engine.host_memory import keep_freed_host_memory
from pretrain.engine.resharding import (
    SavedRun,
    ceil_steps,
    convert_to_universal,
    needs_universal,
    read_saved_run,
    schedule_offset,
    universal_complete,
)
from pretrain.engine.run_log import MetricsLogger, peak_memory_gb, write_eval_json
from pretrain.engine.schedule import resolve_schedule
from pretrain.engine.skipped import SKIPPED_FILE
from pretrain.engine.stream import StreamState, resume_stream_state
from pretrain.engine.task import (
    Batch,
    Evaluator,
    LossOutput,
    Task,
    batch_to_device,
    run_evaluation,
)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
__all__ = ["Trainer", "TrainingAborted"]


def undo_optimizer_warm_up_step(engine: Any) -> None:
    """Undo the optimizer step DeepSpeed's stage-0 mixed-precision wrapper takes at start-up.

    At ZeRO stage 0 under bf16/fp16, DeepSpeed wraps a torch optimizer in
    ``FP16_UnfusedOptimizer``, which allocates the optimizer states by stepping once with zero
    gradients. For AdamW that step is not a no-op: it counts as Adam's first step (the bias
    corrections of every later step shift by one) and decays the fp32 master weights at the
    initial learning rate. Measured on the demo (bf16, 2 ranks, lr warm-up over 2 steps): the
    loss after the first real update was 1% away from ZeRO-2's and fp32's, which agree to 0.2%.
    The states are allocated again, lazily, by the first real step.
    """
    optimizer = engine.optimizer
    if type(optimizer).__name__ != "FP16_UnfusedOptimizer":
        return
    optimizer.optimizer.state.clear()
    with torch.no_grad():
        for low, master in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True):
            for low_param, master_param in zip(low, master, strict=True):
                master_param.copy_(low_param)  # the masters were exact fp32 copies of these


class Trainer:
    """Runs a task's schedule of optimizer steps under DeepSpeed.

    ``cfg``'s batch split is the one to run with: on a world-size change the entry point has
    already made it keep the checkpoint's global batch
    (:func:`pretrain.engine.resharding.batch_split`) and, at ZeRO 1-3, converted the checkpoint
    to a universal one (the trainer converts it itself, rank 0 while the others wait at a
    barrier, when it was not). ``RUN_DIR/config.yaml`` and ``deepspeed.json`` are written once
    this launch has completed its first optimizer step, so a launch that fails before that
    (a refused resume, a crash) leaves the run directory describing its checkpoints.
    """

    def __init__(self, cfg: JobConfig, task: Task, run_dir: Path,
                 requested_batch: tuple[int, int] | None = None) -> None:
        launcher = os.getppid()
        self.cfg, self.task = cfg, task
        self.run_dir = Path(run_dir)
        distributed.init_distributed(cfg.deepspeed.backend, cfg.train.collective_timeout)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        checkpoints = self.run_dir / "checkpoints"
        self.saved: SavedRun | None = read_saved_run(checkpoints)
        self.micro_batch = cfg.data.batch_size
        # (data.batch_size, train.grad_accum) as the config asked, before any re-split
        self.requested_batch = requested_batch or (self.micro_batch, cfg.train.grad_accum)
        self.global_batch = self.micro_batch * cfg.train.grad_accum * self.world_size
        self.schedule = resolve_schedule(cfg.schedule, task.epoch_samples(), self.global_batch)
        # After a deliberate change of the global batch the schedule continues by samples
        # seen: it is read at step + offset (resharding.schedule_offset; 0 otherwise).
        self.schedule_offset = schedule_offset(self.saved, self.global_batch)
        self.total_steps = ceil_steps(self.schedule.total_steps, self.schedule_offset)
        precision = cfg.deepspeed
        if task.autocast:  # the module autocasts its own forward; DeepSpeed keeps fp32 weights
            precision = precision.model_copy(update={"precision": "fp32"})
        self.ds_config = deepspeed_config(precision, cfg.optimizer, cfg.train.grad_accum,
                                          self.micro_batch, self.world_size)
        self._run_files_written = False
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        init_config = self.ds_config
        if needs_universal(self.saved, self.world_size):
            if not universal_complete(checkpoints, self.saved.tag):
                if self.is_main:
                    convert_to_universal(checkpoints, self.saved)
                distributed.barrier()
            # DeepSpeed's universal loading, for the resume only (Checkpointer.load clears it)
            init_config = {**self.ds_config, "checkpoint": {"load_universal": True}}

        if cfg.deepspeed.zero_stage == 0 and get_accelerator().device_name() == "cpu":
            keep_freed_host_memory()  # pays at stage 0 only (engine/host_memory.py)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config,
                                 enabled=cfg.deepspeed.zero_stage == 3):
            module = task.build_module()
        offset, factor = self.schedule_offset, self.schedule.factor
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, model_parameters=task.param_groups(module), config=init_config,
            lr_scheduler=lambda optimizer: LambdaLR(optimizer, lambda s: factor(s + offset)))
        undo_optimizer_warm_up_step(self.engine)
        torch.manual_seed(cfg.train.seed + 1 + self.rank)  # per-rank stochastic depth etc.
        self.device = self.engine.device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            precision.precision, torch.float32)
        compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            cfg.deepspeed.precision, torch.float32)  # a self-autocasting task's too
        self.attention = functools.partial(training_attention, cfg.train.attention_kernel,
                                           self.device, compute_dtype)

        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep,
                                         self.rank)
        self.step = 0
        self.samples_seen = 0
        self.nonfinite_batches = 0  # dropped micro-batches, over the whole run
        self.nonfinite_in_a_row = 0
        self.best: dict[str, Any] | None = None  # {"step", "metric", "value"} of the best eval
        task.run_dir = self.run_dir
        self.evaluator: Evaluator | dict[str, Evaluator] | None = (
            task.evaluator(self.rank, self.world_size) if cfg.eval.enabled else None)
        if isinstance(self.evaluator, dict) and not self.evaluator:
            self.evaluator = None
        try:
            self.loader = task.build_loader(self.rank, self._resume(cfg.data.workers))
        except ValueError as error:  # e.g. a saved position this stream cannot continue
            # not every_rank: a rank-local cause must still be printed by the rank that met it
            raise TrainingAborted(f"the training stream: {' '.join(str(error).split())}"
                                  ) from None
        self.metrics = MetricsLogger(self.run_dir, cfg.model_dump(mode="json"), cfg.log.wandb,
                                     enabled=self.is_main, resume_step=self.step)
        self.flops_per_sample = task.flops_per_sample() if self.is_main else 0.0
        self._stop_signal: int | None = None
        self.exported = False
        self._skips_noted = False
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, self._request_stop)
        # A rank outliving its launcher (torchrun's or DeepSpeed's, killed) would train on
        # unwatched: its death is a preemption signal, so the ranks save and exit together.
        signal_when_parent_dies(launcher, signal.SIGTERM)

    # ------------------------------------------------------------------ resume
    def _resume(self, num_workers: int) -> StreamState:
        """Restore the latest checkpoint of this run directory, if any. A stream layout the
        checkpoint cannot continue ends the job in one line, before "resumed"."""
        saved = self.saved
        if saved is None:
            return StreamState.fresh(num_workers)
        client_state, rank_state, streams = self.checkpointer.load(self.engine, saved,
                                                                   self.world_size)
        try:
            stream = resume_stream_state(streams, saved.world_size, self.rank, self.world_size,
                                         num_workers)
        except ValueError as error:  # every rank reaches the same verdict
            raise TrainingAborted(f"cannot resume {saved.tag}: {error}", every_rank=True
                                  ) from None
        self.step = int(client_state["step"])
        # Counted, not recomputed: the global batch may have changed since (resharding.py).
        self.samples_seen = int(client_state.get("samples_seen", saved.samples_seen))
        self.nonfinite_batches = int(client_state.get("nonfinite_batches", 0))
        self.best = client_state.get("best")
        self.checkpointer.protected = self._best_tag()
        self._align_learning_rates()
        restore_rng_state(rank_state["rng"])
        self.task.load_state_dict(rank_state.get("task", {}))
        if self.is_main:
            print(f"resumed from {saved.tag} at step {self.step}")
        return stream

    def _align_learning_rates(self) -> None:
        """Set every parameter group's lr to the schedule's value at the restored step.

        The optimizer's restored lr is the one of the step before; a universal load restores
        the param groups from its own copy (DeepSpeed issue 6691), and after a change of the
        global batch the schedule position moved. Recomputing it from the scheduler (base lr
        x factor) makes the first resumed step use what an uninterrupted run would use.
        """
        scheduler = self.engine.lr_scheduler
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        lrs = [base * factor for base in scheduler.base_lrs]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs

    def _best_tag(self) -> str | None:
        return tag_for(self.best["step"]) if self.best is not None else None

    def save(self) -> None:
        client_state = {"step": self.step, "samples_seen": self.samples_seen,
                        "global_batch": self.global_batch,
                        "nonfinite_batches": self.nonfinite_batches, "best": self.best,
                        # what DeepSpeed's ds_to_universal requires (no tensor/pipeline
                        # parallelism here: only the format's version)
                        UNIVERSAL_CHECKPOINT_INFO: {
                            UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        if self.cfg.deepspeed.zero_stage == 0:
            client_state["param_names"] = optimizer_param_names(self.engine)
        rank_state = {"rng": capture_rng_state(), "data": self.loader.state_dict(),
                      "task": self.task.state_dict()}
        run_state = SavedRun(tag=tag_for(self.step), step=self.step,
                             samples_seen=self.samples_seen, global_batch=self.global_batch,
                             micro_batch=self.micro_batch, grad_accum=self.cfg.train.grad_accum,
                             world_size=self.world_size,
                             zero_stage=self.cfg.deepspeed.zero_stage,
                             requested_micro_batch=self.requested_batch[0],
                             requested_grad_accum=self.requested_batch[1])
        self.checkpointer.save(self.engine, self.step, client_state, rank_state, run_state)

    def _write_run_files(self) -> None:
        """Rank 0, once this launch's first optimizer step is done: the config it runs with."""
        self._run_files_written = True
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            atomic_write_text(self.run_dir / "deepspeed.json", json.dumps(self.ds_config, indent=2))

    # ------------------------------------------------------------------ loop
    def _request_stop(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    def train(self) -> str:
        """Run to the schedule's last step; returns ``"completed"`` or ``"preempted"``."""
        try:
            outcome = self._train_loop()
        except RuntimeError as error:
            if isinstance(error, TrainingAborted) or not distributed.is_collective_failure(error):
                raise
            # A rank did not arrive within train.collective_timeout: name it (on one rank).
            report = distributed.missing_ranks_report(self.cfg.train.collective_timeout)
            raise TrainingAborted(report and f"at step {self.step + 1}: {report}") from None
        finally:
            self.loader.close()
            self.metrics.close()
        if outcome == "completed" and self.is_main and not self.exported:
            self.export()  # a run resumed after its last step (killed before exporting)
        distributed.barrier()
        return outcome

    def _train_loop(self) -> str:
        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.task.label,
                   unit="step", disable=not (self.is_main and cfg.log.progress),
                   dynamic_ncols=True)
        window = _Window()
        try:
            while self.step < self.total_steps:
                loss, parts, stop = self.train_step(window)
                self.step += 1
                self.samples_seen += self.global_batch
                if not self._run_files_written:
                    self._write_run_files()
                self.task.after_optimizer_step(self.engine.module, self.step)
                bar.update(1)
                window.add_loss(loss, parts)
                last = self.step == self.total_steps
                if self.step % cfg.log.every == 0 or last:
                    record = self._log_record(window)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    self.metrics.log(record)
                    self._point_to_skip_list(record["skipped_samples"])
                    window = _Window()
                due = self._evaluation_due(last)
                if stop or due or self.step % cfg.checkpoint.every == 0 or last:
                    self.save()  # before evaluating: a failed evaluation loses no training
                if last and self.is_main:
                    self.export()  # before the final evaluation, for the same reason
                if due:
                    self._evaluate_and_log(last)
                if stop:
                    return "preempted"
        finally:
            bar.close()
        return "completed"

    def _point_to_skip_list(self, skipped: int) -> None:
        """Once per run, when training first skips something, say where files are listed."""
        if skipped and self.is_main and not self._skips_noted:
            self._skips_noted = True
            print(f"step {self.step}: {skipped} training samples skipped so far (counted as "
                  f"skipped_samples in metrics.jsonl; unreadable files are listed in "
                  f"{self.run_dir / SKIPPED_FILE})", flush=True)

    def train_step(self, window: _Window) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
        """One optimizer step over ``grad_accum`` finite micro-batches.

        Returns the step's mean loss, its mean loss parts (device tensors: no host sync beyond
        the flags) and whether to stop.

        Ranks agree on two flags per micro-batch with one tiny all-reduce: whether any rank's
        loss is non-finite and whether any rank received a preemption signal. A non-finite
        micro-batch is dropped on every rank before its backward and replaced by the next
        one: no update sees it, and DeepSpeed's micro-step count, which places its gradient
        accumulation boundaries, stays exactly ``grad_accum`` per optimizer step (skipping
        only the backward would move the boundary into the next step). A preemption signal
        ends the run after this step.
        """
        train = self.cfg.train
        outputs: list[LossOutput] = []
        stop = False
        while len(outputs) < train.grad_accum:
            start = time.perf_counter()
            batch = next(self.loader)
            fetched = time.perf_counter()
            output = self.forward(batch)
            loss = output["loss"]
            flags = torch.stack([(~torch.isfinite(loss.detach())).float().reshape(()),
                                 torch.tensor(float(self._stop_signal is not None),
                                              device=loss.device)])
            nonfinite, stop_now = distributed.all_reduce(flags, op="max").tolist()
            stop = stop or stop_now > 0
            if nonfinite == 0:
                with self.attention():
                    self.engine.backward(loss)
                self.engine.step()
                outputs.append({k: v.detach().float() for k, v in output.items()})
                self.nonfinite_in_a_row = 0
            else:
                self.nonfinite_batches += 1
                self.nonfinite_in_a_row += 1
                if self.nonfinite_in_a_row >= train.max_nonfinite_batches:
                    raise TrainingAborted(
                        f"{self.nonfinite_in_a_row} non-finite losses in a row at step "
                        f"{self.step + 1}; stopping without saving (the last checkpoint is "
                        "intact)", every_rank=True)  # every rank counted the same flags
            window.add_time(data=fetched - start, compute=time.perf_counter() - fetched)
        mean = {key: torch.stack([o[key] for o in outputs]).mean() for key in outputs[0]}
        loss = mean.pop("loss")
        return loss, mean, stop

    def forward(self, batch: Batch) -> LossOutput:
        """The task module's output for one micro-batch, through the engine."""
        batch = self.task.prepare_batch(self.to_device(batch))
        with self.attention():
            output = self.engine(batch)
        if isinstance(output, torch.Tensor):
            return {"loss": output}
        return output

    def to_device(self, batch: Batch) -> Batch:
        return batch_to_device(batch, self.device, self.dtype, self.task.input_keys)

    # ------------------------------------------------------------------ evaluation
    def _evaluation_due(self, last: bool) -> bool:
        every = self.cfg.eval.every
        return self.evaluator is not None and (last or bool(every and self.step % every == 0))

    def _evaluate_and_log(self, last: bool) -> None:
        """Evaluate the step just checkpointed (and, if last, exported). A data error ends
        the run in one line that says what was kept and how to evaluate it again."""
        try:
            results = self.evaluate()
        except (ValueError, OSError) as error:
            raise TrainingAborted(f"evaluation at step {self.step} failed: "
                                  f"{' '.join(str(error).split())}; {self._kept(last)}") from None
        if self._track_best(results):
            self.checkpointer.record_best(self.best)
        record = {"step": self.step, **{f"eval/{k}": v for k, v in results.items()}}
        if self.best is not None:
            record[f"eval/best_{self.best['metric']}"] = self.best["value"]
        self.metrics.log(record)
        if self.is_main:
            write_eval_json(self.run_dir, {"step": self.step, "results": results,
                                           "best": self.best})
            if results.get("skipped"):
                print(f"step {self.step}: {results['skipped']} validation files could not be "
                      f"read, listed in {self.run_dir / SKIPPED_FILE}", flush=True)

    def _kept(self, last: bool) -> str:
        """What a failed evaluation leaves, and how to evaluate it again."""
        checkpoint = self.checkpointer.directory / tag_for(self.step)
        export = self.task.eval_only_file(self.run_dir / "export")
        if last and export is not None:
            return (f"training is complete and kept ({checkpoint}, {export}): fix the "
                    f"validation data and evaluate only, with --eval-only {export}")
        return (f"the training so far is kept ({checkpoint}): fix the validation data and "
                "re-run the same command to resume from there")

    def evaluate(self) -> dict[str, Any]:
        """Every rank evaluates its slice and the evaluators reduce (see
        :func:`pretrain.engine.task.run_evaluation`); several named evaluators run one after the
        other, their metrics prefixed with the name."""
        module = self.engine.module
        if isinstance(self.evaluator, dict):
            return {f"{name}/{metric}": value
                    for name, evaluator in self.evaluator.items()
                    for metric, value in run_evaluation(evaluator, module,
                                                        self.to_device).items()}
        return run_evaluation(self.evaluator, module, self.to_device)

    def _track_best(self, results: dict[str, float]) -> bool:
        metric = self.cfg.eval.best_metric
        if metric is None:
            return False
        if metric not in results:
            raise KeyError(f"eval.best_metric {metric!r} is not among the evaluation's "
                           f"metrics: {sorted(results)}")
        value = results[metric]
        better = max if self.cfg.eval.best_mode == "max" else min
        if self.best is not None and better(value, self.best["value"]) == self.best["value"]:
            return False
        self.best = {"step": self.step, "metric": metric, "value": value}
        self.checkpointer.protected = self._best_tag()
        return True

    # ------------------------------------------------------------------ export and logs
    def export(self) -> None:
        """Rank 0: consolidate the last checkpoint's fp32 weights (from the ZeRO optimizer
        shards, not the engine's bf16 copies) and let the task write its deliverable."""
        state = fp32_state_dict(self.checkpointer.directory)
        out = self.run_dir / "export"
        out.mkdir(parents=True, exist_ok=True)
        self.task.export(state, out)
        self.exported = True

    def _log_record(self, window: _Window) -> dict[str, Any]:
        names = sorted(window.part_sums)
        device = window.loss_sum.device
        # Every rank's data wait and busy time in its own slot: the same all-reduce as the
        # sums tells which rank waited longest (the slow one), not only rank 0's view.
        slots = torch.zeros(2 * self.world_size, dtype=torch.float64, device=device)
        slots[self.rank] = window.data_s
        slots[self.world_size + self.rank] = window.data_s + window.compute_s
        reduced = distributed.all_reduce(torch.cat([torch.stack(
            [window.loss_sum, *(window.part_sums[n] for n in names),
             torch.tensor(float(self.loader.state.skipped), device=device)]).double(), slots]))
        sums, data_s, busy_s = reduced.split(
            [len(reduced) - 2 * self.world_size, self.world_size, self.world_size])
        waiter, slowest = int(data_s.argmax()), int(busy_s.argmax())
        peak = distributed.all_reduce([peak_memory_gb()], op="max")
        per_rank_steps = window.steps * self.world_size
        samples_per_s = window.steps * self.global_batch / max(window.elapsed, 1e-9)
        record = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "loss": float(sums[0]) / per_rank_steps,
            **{name: float(sums[1 + i]) / per_rank_steps for i, name in enumerate(names)},
            "lr": self.engine.get_lr()[0],
            "samples_per_s": samples_per_s,
            "samples_per_s_per_device": samples_per_s / self.world_size,
            "data_wait_s": float(data_s[waiter]),
            "data_wait_rank": waiter,
            "compute_s": float(busy_s[waiter] - data_s[waiter]),
            "data_wait_fraction": float(data_s[waiter] / max(busy_s[waiter], 1e-9)),
            "step_time_s": float(busy_s[slowest]) / window.steps,
            "step_time_rank": slowest,
            "peak_memory_gb": float(peak[0]),
            "skipped_samples": int(sums[-1]),
            "nonfinite_batches": self.nonfinite_batches,
            **self.task.log_values(self.engine.module),
        }
        peak_flops = self.cfg.log.peak_flops_per_device
        if peak_flops and self.flops_per_sample:
            record["mfu"] = samples_per_s * self.flops_per_sample / (peak_flops * self.world_size)
        return record


class _Window:
    """Accumulates losses (on the device, so logging costs one sync) and timings between two
    log records."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.steps = 0
        self.loss_sum: torch.Tensor = torch.zeros(())
        self.part_sums: dict[str, torch.Tensor] = {}
        self.data_s = self.compute_s = 0.0

    def add_loss(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        self.loss_sum = self.loss_sum.to(loss.device) + loss
        for name, value in parts.items():
            self.part_sums[name] = self.part_sums.get(name, torch.zeros((), device=value.device)
                                                      ) + value

    def add_time(self, data: float, compute: float) -> None:
        self.data_s += data
        self.compute_s += compute

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.began
