"""The memory planner: its estimate for the demo matches a real 2-rank run's measured peak, and
its table answers the questions a user plans a cluster job with."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import PretrainConfig
from pretrain.engine.config import load_config
from pretrain.engine.run_log import read_metrics
from pretrain.plan import GB, Plan, estimate, format_plan, main, make_plan
from tests.conftest import run_deepspeed

STEPS = 4
# The demo config trains at 48 px, where activations are barely a tenth of the peak (CI measured
# 1.46 GB, 0.14 GB of it activations) and the fixed runtime overhead dominates. At the shards'
# own 64 px activations are 0.21 GB, a clear share, so the comparison tests the model-dependent
# estimate and not only the overhead constant.
OVERRIDES = ["model.image.image_size=64"]


@pytest.fixture(scope="module")
def demo_cfg() -> PretrainConfig:
    return load_config(PretrainConfig, "demo", OVERRIDES, kind="pretrain")


@pytest.fixture(scope="module")
def demo_plan(demo_cfg: PretrainConfig) -> Plan:
    """The planner's answer for the demo on one node of 2 CPU ranks with 4 GB each."""
    return make_plan("demo", demo_cfg, nodes=1, gpus_per_node=2, memory_gb=4.0, device="cpu")


def _compare_with_a_real_run(plan: Plan, cfg: PretrainConfig, overrides: list[str],
                             shards: str, run_dir: Path) -> None:
    run_deepspeed("pretrain.py", [
        "--config", "demo", "--run-dir", str(run_dir),
        "--set", f"data.train={shards}",
        "--set", f"schedule.steps={STEPS}", "--set", "schedule.warmup_steps=1",
        "--set", "log.every=1", "--set", "log.progress=false", "--set", "checkpoint.every=1000",
        *(arg for override in overrides for arg in ("--set", override)),
    ])
    measured = max(r["peak_memory_gb"] for r in read_metrics(run_dir / "metrics.jsonl"))
    row = next(r for r in plan.rows if r.stage == cfg.deepspeed.zero_stage and not r.offload)
    predicted = row.total / GB
    print(f"demo {cfg.deepspeed.precision} peak memory per rank: predicted {predicted:.3f} GB, "
          f"measured {measured:.3f} GB")
    assert row.micro_batch == cfg.data.batch_size
    assert abs(predicted - measured) <= 0.25 * measured, (predicted, measured)
    # The model-dependent part is material: without it the estimate would miss by more.
    assert row.activations > 0.1 * measured * GB


def test_estimate_is_within_25_percent_of_a_real_run(demo_plan: Plan, demo_cfg: PretrainConfig,
                                                     shape_shards: dict[str, str],
                                                     tmp_path: Path) -> None:
    _compare_with_a_real_run(demo_plan, demo_cfg, OVERRIDES, shape_shards["train"], tmp_path)


@pytest.mark.slow
def test_bf16_estimate_is_within_25_percent_of_a_real_run(shape_shards: dict[str, str],
                                                          tmp_path: Path) -> None:
    """bf16 on CPUs trains with the math attention kernel, which keeps attention matrices.
    At 96 px: bf16 halves the activations, and at 64 px they were too close to a tenth of a
    peak that varies between runs (1.31-1.60 GB measured) to be a material share."""
    overrides = ["model.image.image_size=96", "deepspeed.precision=bf16"]
    cfg = load_config(PretrainConfig, "demo", overrides, kind="pretrain")
    plan = make_plan("demo", cfg, nodes=1, gpus_per_node=2, memory_gb=4.0, device="cpu")
    _compare_with_a_real_run(plan, cfg, overrides, shape_shards["train"], tmp_path)


def test_activations_follow_the_attention_kernel_training_uses() -> None:
    """The math kernel (bf16 on CPUs) saves attention matrices; the fused ones do not."""
    cfg = load_config(PretrainConfig, "demo", [*OVERRIDES, "deepspeed.precision=bf16"],
                      kind="pretrain")
    per_sample = {device: make_plan("demo", cfg, nodes=1, gpus_per_node=2, memory_gb=4.0,
                                    device=device).facts.activations[False].per_sample
                  for device in ("cpu", "gpu")}
    assert per_sample["cpu"] > 1.2 * per_sample["gpu"]


def test_checkpointing_cuts_stored_activations(demo_plan: Plan) -> None:
    plain, checkpointed = demo_plan.facts.activations[False], demo_plan.facts.activations[True]
    assert checkpointed.per_sample < plain.per_sample / 5
    # backward still re-materialises one block, which is smaller than the whole network
    assert 0 < checkpointed.recompute_per_sample < plain.per_sample


def test_higher_zero_stages_need_less_model_state(demo_plan: Plan) -> None:
    rows = {(r.stage, r.offload): r for r in demo_plan.rows}
    state = {key: r.params + r.grads + r.optimizer for key, r in rows.items()}
    assert state[0, False] > state[1, False] > state[2, False] > state[3, False]
    for stage in (1, 2, 3):
        assert rows[stage, True].optimizer == 0
        assert rows[stage, True].host == pytest.approx(rows[stage, False].optimizer)


def test_largest_micro_batch_is_the_boundary_of_fitting(demo_plan: Plan,
                                                        demo_cfg: PretrainConfig) -> None:
    budget = demo_plan.memory_gb * GB
    for (stage, offload), best in demo_plan.max_batch.items():
        for checkpointing, batch in best.items():
            def total(b: int, s: int = stage, o: bool = offload, c: bool = checkpointing) -> float:
                return estimate(demo_cfg, demo_plan.facts, demo_plan.world_size, s, o, b,
                                "cpu", None, c).total
            assert total(batch) <= budget < total(batch + 1)
        assert best[True] > best[False]  # checkpointing buys batch


def test_table_lists_every_zero_option(demo_plan: Plan) -> None:
    table = format_plan(demo_plan)
    for label in ("ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-1 + offload", "ZeRO-3 + offload"):
        assert any(line.startswith(label) for line in table.splitlines()), label
    assert "global batch 128" in table  # 64 per rank x 2 ranks
    assert "9.1M parameters" in table


def test_cli_rejects_a_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", "demo", "--set", "deepspeed.zero_stage=4"]) == 2
    assert "deepspeed.zero_stage" in capsys.readouterr().err
