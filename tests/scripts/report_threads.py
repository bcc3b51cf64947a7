"""Test helper, run under a launcher: apply the entry points' thread policy, then print the
intra-op thread count this rank and one of its data-loader workers run with.

    deepspeed --num_gpus 2 tests/scripts/report_threads.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from pretrain.engine.threads import apply_thread_policy  # noqa: E402


class WorkerThreads(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> int:
        return torch.get_num_threads()


def main() -> None:
    apply_thread_policy()
    worker = next(iter(DataLoader(WorkerThreads(), num_workers=1)))
    print(f"rank {os.environ['RANK']} threads {torch.get_num_threads()} "
          f"worker_threads {int(worker)}", flush=True)


if __name__ == "__main__":
    main()
