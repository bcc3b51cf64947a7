"""Dependencies point one way: library code does not import the demo's synthetic data, encoders
do not import training configuration, pretraining does not import fine-tuning."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _offenders(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)} imports {name}" for path in files
            for name in sorted(_imports(path))
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


def test_library_code_does_not_import_the_demo_data() -> None:
    files = [*(ROOT / "pretrain").rglob("*.py"), *(ROOT / "finetune").rglob("*.py")]
    assert _offenders(files, ("data_tools.synthetic",)) == []


def test_encoders_do_not_import_training_configuration() -> None:
    encoders = [ROOT / "pretrain" / "models" / name
                for name in ("dat.py", "dwnet.py", "weights.py", "spec.py", "summary.py",
                             "timm_export.py")]
    assert _offenders(encoders, ("pretrain.config", "finetune", "pretrain.engine")) == []


def test_pretraining_does_not_import_finetuning() -> None:
    assert _offenders(list((ROOT / "pretrain").rglob("*.py")), ("finetune",)) == []
