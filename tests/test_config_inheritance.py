"""``base:`` inheritance of config files, and the shipped configs' resolved values.

Every config under configs/ (bases, ``_*.yaml``, excepted) must resolve to exactly the values in
tests/data/resolved_configs.json: refactoring the files (moving values into bases) changes
nothing a job sees. Regenerate the snapshot (tests/scripts/resolved_configs.py) only when a value
change is intended.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune.config import FinetuneConfig
from pretrain.config import PretrainConfig
from pretrain.engine.config import ConfigError, load_config, read_config_tree, save_config

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from resolved_configs import CONFIGS, SNAPSHOT, resolve_all, shipped_configs  # noqa: E402


def _differences(expected: Any, actual: Any, where: str = "") -> list[str]:
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = []
        for key in sorted(set(expected) | set(actual)):
            path = f"{where}.{key}" if where else key
            if key not in actual:
                found.append(f"{path} missing")
            elif key not in expected:
                found.append(f"{path} new ({actual[key]!r})")
            else:
                found += _differences(expected[key], actual[key], path)
        return found
    return [] if expected == actual else [f"{where}: {expected!r} -> {actual!r}"]


def test_every_config_resolves_to_its_snapshot() -> None:
    snapshot = json.loads(SNAPSHOT.read_text())
    resolved = resolve_all()
    new, gone = sorted(set(resolved) - set(snapshot)), sorted(set(snapshot) - set(resolved))
    assert not new and not gone, ("configs added or removed (regenerate "
                                  f"tests/data/resolved_configs.json deliberately): new {new}, "
                                  f"gone {gone}")
    changed = {name: _differences(snapshot[name], resolved[name]) for name in snapshot}
    changed = {name: keys for name, keys in changed.items() if keys}
    assert not changed, "\n".join(f"{name}: {'; '.join(keys)}" for name, keys in changed.items())


def test_bases_are_not_jobs() -> None:
    bases = sorted(CONFIGS.rglob("_*.yaml"))
    assert bases, "the recipe families inherit from _*.yaml bases"
    assert not set(bases) & set(shipped_configs())
    with pytest.raises(ConfigError, match=r"_coco_1x.yaml: a base of other configs .*not a job"):
        load_config(FinetuneConfig, "coco/_coco_1x", kind="finetune")
    with pytest.raises(ConfigError, match="not a job"):
        load_config(PretrainConfig, CONFIGS / "pretrain" / "_clip.yaml")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_child_merges_over_its_base(tmp_path: Path) -> None:
    _write(tmp_path / "_base.yaml", "optimizer: {lr: 0.1, betas: [0.9, 0.99]}\n"
                                    "data: {scales: [1, 2, 3], root: a, flip: 0.5}\nname: x\n")
    child = _write(tmp_path / "child.yaml", "base: _base.yaml\noptimizer: {lr: 0.2}\n"
                                            "data: {scales: [4], flip: null}\n")
    assert read_config_tree(child) == {
        "optimizer": {"lr": 0.2, "betas": [0.9, 0.99]},  # mappings merge key by key
        "data": {"scales": [4],  # lists replace
                 "root": "a", "flip": None},  # null sets null, it does not delete
        "name": "x"}


def test_a_chain_of_bases_resolves_in_order(tmp_path: Path) -> None:
    _write(tmp_path / "_a.yaml", "x: {a: 1, b: 1, c: 1}\n")
    _write(tmp_path / "sub" / "_b.yaml", "base: ../_a.yaml\nx: {b: 2, c: 2}\n")
    child = _write(tmp_path / "sub" / "deeper" / "c.yaml", "base: ../_b.yaml\nx: {c: 3}\n")
    assert read_config_tree(child) == {"x": {"a": 1, "b": 2, "c": 3}}


def test_a_missing_base_names_both_files(tmp_path: Path) -> None:
    child = _write(tmp_path / "child.yaml", "base: _nowhere.yaml\n")
    with pytest.raises(ConfigError) as caught:
        read_config_tree(child)
    message = str(caught.value)
    assert "\n" not in message
    assert str(child) in message and str(tmp_path / "_nowhere.yaml") in message


def test_a_cycle_of_bases_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "_a.yaml", "base: _b.yaml\n")
    _write(tmp_path / "_b.yaml", "base: _a.yaml\n")
    child = _write(tmp_path / "c.yaml", "base: _a.yaml\n")
    # the file whose base closes the loop is named, then the chain from the loaded file
    with pytest.raises(ConfigError, match=r"_b.yaml: base: a cycle \(.*c.yaml -> .*_a.yaml -> "
                                          r".*_b.yaml -> .*_a.yaml\)$"):
        read_config_tree(child)
    itself = _write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match="a cycle"):
        read_config_tree(itself)


@pytest.mark.parametrize("value", ["[a.yaml]", "null", "3", "{x: 1}", "''"])
def test_base_must_be_a_path(tmp_path: Path, value: str) -> None:
    child = _write(tmp_path / "child.yaml", f"base: {value}\n")
    with pytest.raises(ConfigError, match=r"child.yaml: base: expected the path of a config"):
        read_config_tree(child)


def test_overrides_apply_after_inheritance_and_errors_name_the_child(tmp_path: Path) -> None:
    demo = CONFIGS / "finetune" / "demo_shapes.yaml"
    _write(tmp_path / "_demo.yaml", demo.read_text())
    child = _write(tmp_path / "child.yaml", "base: _demo.yaml\noptimizer: {lr: 0.5}\n")
    cfg = load_config(FinetuneConfig, child, ["optimizer.lr=0.25", "schedule.warmup_steps=0"])
    assert cfg.optimizer.lr == 0.25 and cfg.schedule.warmup_steps == 0
    plain = load_config(FinetuneConfig, demo)
    assert cfg.data == plain.data and cfg.encoder == plain.encoder
    with pytest.raises(ConfigError, match=r"child.yaml: data.batch_size: Input should be"):
        load_config(FinetuneConfig, child, ["data.batch_size=0"])


def test_saved_configs_are_resolved(tmp_path: Path) -> None:
    child = _write(tmp_path / "child.yaml",
                   f"base: {CONFIGS / 'pretrain' / 'demo.yaml'}\nschedule: {{steps: 70}}\n")
    cfg = load_config(PretrainConfig, child)
    (tmp_path / "run").mkdir()
    save_config(cfg, tmp_path / "run" / "config.yaml")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "base" not in read_config_tree(tmp_path / "run" / "config.yaml") and "base:" not in saved
    assert load_config(PretrainConfig, tmp_path / "run" / "config.yaml") == cfg
    assert cfg.schedule.steps == 70
