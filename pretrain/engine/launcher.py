"""Start DeepSpeed jobs from Python (the demo, tests and benchmarks): argument lists, never a
shell string, and a free rendezvous port so concurrent jobs on one machine do not collide."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_command(script: str, args: list[str], ranks: int) -> list[str]:
    """``deepspeed --num_gpus R --master_port P launch/<script> ARGS`` for this interpreter."""
    launcher = Path(sys.executable).with_name("deepspeed")
    return [str(launcher), "--num_gpus", str(ranks), "--master_port", str(find_free_port()),
            str(ROOT / "launch" / script), *args]
