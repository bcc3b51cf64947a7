"""The entry points run as the README runs them: as scripts, whose folder Python puts first on
the import path, where launch/pretrain.py and launch/finetune.py share their names with the
packages they import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("script", ["pretrain.py", "finetune.py", "demo.py"])
def test_each_entry_point_starts_as_a_script(script: str, tmp_path) -> None:  # noqa: ANN001
    result = subprocess.run([sys.executable, str(ROOT / "launch" / script), "--help"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
