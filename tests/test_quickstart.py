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


class _Stop(Exception):
    pass


@pytest.mark.parametrize("real_model", [True, False])
def test_real_models_are_served_with_their_own_settings(monkeypatch, tmp_path, real_model):
    """``--model`` (a real model): no float32, 2048-token context or eager mode forced on it;
    only the tiny local model gets those test settings."""
    import argparse
    import contextlib

    from vs_vllm import quickstart
    from vs_vllm.local_server import TINY_MODEL_SERVE_ARGS

    seen: list[tuple[str, tuple[str, ...]]] = []

    @contextlib.contextmanager
    def fake_served(model, *args, **kwargs):
        seen.append((str(model), args))
        raise _Stop
        yield  # pragma: no cover

    monkeypatch.setattr(quickstart, "served", fake_served)
    parser = argparse.ArgumentParser()
    quickstart.add_arguments(parser)
    argv = ["--model", str(tmp_path / "my-model")] if real_model else []
    with pytest.raises(_Stop):
        quickstart.run(parser.parse_args([*argv, "--serve-arg=--max-num-seqs=4"]))
    ((model, args),) = seen
    assert "--vision-keep-ratio" in args and "--max-num-seqs=4" in args
    if real_model:
        assert model == str(tmp_path / "my-model")
        assert not {"--dtype", "--max-model-len", "--enforce-eager"} & set(args)
    else:
        assert args[: len(TINY_MODEL_SERVE_ARGS)] == TINY_MODEL_SERVE_ARGS
