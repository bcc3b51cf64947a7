"""Write tests/data/resolved_configs.json: every shipped config, fully resolved and validated.

tests/test_config_inheritance.py checks that every config under configs/ still resolves to
exactly this snapshot, so that refactoring the files (``base:`` inheritance, moved comments)
changes no value. Regenerate it ONLY when a value change is intended, and review the diff:

    PYTHONPATH=. python tests/scripts/resolved_configs.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
SNAPSHOT = ROOT / "tests" / "data" / "resolved_configs.json"


def shipped_configs() -> list[Path]:
    """Every job config under configs/; ``_*.yaml`` files are bases, not jobs."""
    return sorted(path for path in CONFIGS.rglob("*.yaml") if not path.name.startswith("_"))


def resolve_all() -> dict[str, Any]:
    """{path relative to configs/: the validated config as JSON} for every shipped config."""
    from finetune.config import FinetuneConfig
    from pretrain.config import PretrainConfig
    from pretrain.engine.config import load_config

    resolved = {}
    for path in shipped_configs():
        relative = path.relative_to(CONFIGS).as_posix()
        schema = PretrainConfig if relative.startswith("pretrain/") else FinetuneConfig
        resolved[relative] = load_config(schema, path).model_dump(mode="json")
    return resolved


def render(resolved: dict[str, Any]) -> str:
    return json.dumps(resolved, sort_keys=True, indent=1) + "\n"


def main() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(render(resolve_all()))
    print(f"wrote {SNAPSHOT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
