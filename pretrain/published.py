"""The published figures (papers, official READMEs, model cards) this project measures itself
against: parameters and MACs of every encoder, ImageNet top-1, COCO box/mask AP, ADE20K mIoU
and CLIP pretraining references. They ship with the package (``pretrain/published.yaml``).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import yaml


@cache
def _all() -> dict[str, Any]:
    return yaml.safe_load(resources.files("pretrain").joinpath("published.yaml").read_text())


def published(table: str) -> dict[str, Any]:
    """One table of figures by model name, e.g. ``published("classification_imagenet1k")``;
    ``KeyError`` naming the tables there are for an unknown one."""
    tables = _all()
    if table not in tables:
        raise KeyError(f"no published table {table!r}; there are: {', '.join(tables)}")
    return tables[table]
