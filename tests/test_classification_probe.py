"""The linear probe and the EMA as the classification task builds them (in this process, no
DeepSpeed): a probe trains only the classifier, without weight decay, and its encoder keeps its
eval behaviour; the EMA follows the weights and restores from its saved state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_tools.imagefolder_synthetic import write_synthetic_imagefolder
from finetune.config import FinetuneConfig
from pretrain.engine.config import load_config
from pretrain.engine.stream import StreamState

TINY = "{depths: [1, 1, 1, 1], embed_dims: [16, 32, 48, 64], num_heads: [1, 1, 1, 2]}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("probe")
    write_synthetic_imagefolder(root / "train", 3, per_class=4, seed=0, image_size=32)
    return root / "train"


def _task(folder: Path, *overrides: str):  # noqa: ANN202 (a ClassificationTask)
    from finetune.classification.task import ClassificationTask

    cfg = load_config(FinetuneConfig, "demo_shapes", [
        "encoder.weights=null", "encoder.name=davit_tiny", f"encoder.overrides={TINY}",
        "data.layout=imagefolder", f"data.train={folder}", f"data.val={folder}",
        "data.classes=null", "data.num_classes=3", "data.image_size=32", "data.batch_size=6",
        "data.workers=0", *overrides], kind="finetune")
    return ClassificationTask(cfg)


def test_linear_probe_trains_only_the_classifier(folder: Path) -> None:
    task = _task(folder, "linear_probe=true", "encoder.drop_path=0.3")
    module = task.build_module()
    groups = task.param_groups(module)
    head = module.model.get_classifier()
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in head.parameters()}
    assert all(not p.requires_grad for n, p in module.model.named_parameters()
               if not n.startswith("head.fc."))
    module.train()
    assert not module.model.training  # BatchNorm statistics and dropout stay frozen
    trunk = {k: v.clone() for k, v in module.model.state_dict().items()
             if not k.startswith("head.fc.")}
    before = head.weight.detach().clone()
    optimizer = torch.optim.AdamW(groups)
    loader = task.build_loader(0, StreamState.fresh(0))
    for _ in range(3):
        optimizer.zero_grad()
        module(next(loader))["loss"].backward()
        optimizer.step()
    loader.close()
    after = module.model.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in trunk.items())
    assert not torch.equal(before, head.weight)


def test_ema_follows_the_weights_and_restores(folder: Path) -> None:
    task = _task(folder, "ema.enabled=true", "ema.decay=0.5", "ema.warmup=false")
    module = task.build_module()
    with torch.no_grad():
        start = {k: v.clone() for k, v in module.model.state_dict().items()}
        task.after_optimizer_step(module, 1)  # first update: the EMA starts from the weights
        for parameter in module.model.parameters():
            parameter.add_(1.0)
        task.after_optimizer_step(module, 2)
    ema = task.ema.module.state_dict()
    name = "head.fc.weight"
    assert torch.allclose(ema[name], start[name] + 0.5)  # decay 0.5: half way to the weights
    assert ema[name].dtype == torch.float32
    saved = task.state_dict()
    restored = _task(folder, "ema.enabled=true", "ema.decay=0.5", "ema.warmup=false")
    restored.build_module()  # the EMA is rebuilt around the task's module
    restored.load_state_dict(saved)
    assert restored.ema.updates == 2
    for key, value in restored.ema.module.state_dict().items():
        assert torch.equal(value, ema[key]), key
