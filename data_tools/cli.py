"""Command-line plumbing shared by the data_tools commands."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the problem (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message, status=2)


def fail(prog: str, message: str, status: int = 2) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(status)
