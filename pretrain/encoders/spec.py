"""How to rebuild a model from an export: the one spec every export of the project carries.

An export is ``{"state_dict": ..., "spec": ModelSpec.to_dict()}``. The spec names the timm
architecture and its keyword overrides (how the demo shrinks an encoder), the classifier size
(0: a bare encoder) and, for a task model, the task and its options (e.g. a detector's kind), so
a file alone is enough to rebuild what it holds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
from torch import nn

SPEC_KEY = "spec"


@dataclass(frozen=True)
class ModelSpec:
    timm_name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 0
    task: str | None = None  # None: an encoder or timm classifier; else the fine-tuning task
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown or "timm_name" not in data:
            raise ValueError(f"not a model spec: keys {sorted(data)}")
        return cls(**data)

    def is_registered(self) -> bool:
        import pretrain.encoders  # noqa: F401  (registers this project's encoders with timm)

        return timm.is_model(self.timm_name)

    def build_timm(self, **kwargs: Any) -> nn.Module:
        """The timm model of the spec (random init), with ``kwargs`` overriding the spec."""
        import pretrain.encoders  # noqa: F401  (registers this project's encoders with timm)

        arguments = {**self.overrides, "num_classes": self.num_classes, **kwargs}
        return timm.create_model(self.timm_name, **arguments)


def read_spec(path: Path | str) -> ModelSpec | None:
    """The spec of an export file, or ``None`` for a file without one (any other checkpoint).

    The file is memory-mapped, so only its small spec is read now; a file that cannot be read
    safely raises, naming the file (:func:`pretrain.encoders.weights.load_checkpoint_file`)."""
    from pretrain.encoders.weights import load_checkpoint_file

    payload = load_checkpoint_file(path, mmap=True)
    if isinstance(payload, dict) and isinstance(payload.get(SPEC_KEY), dict):
        return ModelSpec.from_dict(payload[SPEC_KEY])
    return None
