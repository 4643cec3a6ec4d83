"""The ``vs-vllm demo`` command."""

from __future__ import annotations

import pytest

from vs_vllm.checkpoint import save_scorer
from vs_vllm.cli import main
from vs_vllm.scorer import VisionSelectorScorer


def test_demo_prints_every_strategy(capsys):
    assert main(["demo", "--tokens", "20,9", "--keep-ratio", "0.3", "--hidden", "16"]) == 0
    out = capsys.readouterr().out
    assert "k = [6, 2]" in out
    for name in ("learned", "uniform", "random", "norm", "diversity"):
        assert f"{name}: kept 8 of 29 tokens" in out
    assert "image 1 (N=9): [2, 6]" in out  # uniform, a known answer


def test_demo_with_checkpoint(tmp_path, capsys):
    path = save_scorer(VisionSelectorScorer(16), tmp_path / "s.safetensors")
    main(["demo", "--hidden", "16", "--strategy", "learned", "--vision-selector", str(path)])
    out = capsys.readouterr().out
    assert str(path) in out and "learned: kept" in out and "uniform" not in out


@pytest.mark.parametrize("ratio", ["0", "1.5", "abc"])
def test_demo_rejects_bad_ratio(ratio, capsys):
    with pytest.raises(SystemExit) as err:
        main(["demo", "--keep-ratio", ratio])
    assert err.value.code == 2
    assert "--keep-ratio" in capsys.readouterr().err


def test_serve_help_lists_the_plugin_flags():
    """``vs-vllm serve --help`` (a first argument starting with "-") reaches vLLM's own serve
    parser, with the plugin's flags."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("vs-vllm")
    out = subprocess.run(
        [str(script), "serve", "--help"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--vision-keep-ratio", "--vision-selector", "--video-keep-ratio", "--port"):
        assert flag in out.stdout, flag
