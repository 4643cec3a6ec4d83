"""The README's main job: `vs-vllm quickstart` on the tiny local model, end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_quickstart_prints_both_prompt_token_counts():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("vs-vllm")), "quickstart", "--max-tokens", "3"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    full = int(re.search(r"all visual tokens \(ratio 1\.0\): (\d+) prompt tokens", out)[1])
    kept = int(re.search(r"VisionSelector \(ratio 0\.3, norm\): (\d+) prompt tokens", out)[1])
    # The generated 448x336 image has 54 visual tokens at the tiny model's max_pixels; 16 kept.
    assert full - kept == 54 - 16
    assert "server stopped" in out
