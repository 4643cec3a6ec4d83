"""Bad server settings stop `vs-vllm serve` with one clear line, before any engine starts.

Each case runs the real command in a subprocess (vLLM import only: a few seconds each)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vs_vllm.checkpoint import save_scorer
from vs_vllm.scorer import VisionSelectorScorer

VS_VLLM = str(Path(sys.executable).with_name("vs-vllm"))


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [VS_VLLM, "serve", *args, "--port", "0"], capture_output=True, text=True, timeout=300
    )


def _last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_ratio_out_of_range(tiny_model_dir):
    proc = _serve(str(tiny_model_dir), "--vision-keep-ratio", "0")
    assert proc.returncode == 2
    assert "--vision-keep-ratio must be in (0, 1], got 0.0" in _last_line(proc)
    assert "Traceback" not in proc.stderr


def test_learned_without_checkpoint_on_plain_model(tiny_model_dir):
    proc = _serve(str(tiny_model_dir), "--vision-keep-ratio", "0.3")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = _last_line(proc)
    assert line.startswith("vs-vllm: error: the 'learned' strategy needs scorer weights")
    assert "--vision-selector PATH" in line


def test_checkpoint_hidden_size_mismatch(tiny_model_dir, tmp_path):
    path = save_scorer(VisionSelectorScorer(32), tmp_path / "s.safetensors")
    proc = _serve(str(tiny_model_dir), "--vision-keep-ratio", "0.3", "--vision-selector", str(path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = _last_line(proc)
    assert line.startswith("vs-vllm: error: --vision-selector:")
    assert str(path) in line and "(16, 32)" in line and "(32, 64)" in line


def test_missing_checkpoint_file(tiny_model_dir, tmp_path):
    missing = tmp_path / "nope.safetensors"
    proc = _serve(
        str(tiny_model_dir), "--vision-keep-ratio", "0.3", "--vision-selector", str(missing)
    )
    assert proc.returncode == 1 and str(missing) in _last_line(proc)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,'
        ' "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 64,'
        ' "vocab_size": 100}'
    )
    proc = _serve(str(tmp_path), "--vision-keep-ratio", "0.3", "--vision-selector-strategy", "norm")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = _last_line(proc)
    assert line.startswith("vs-vllm: error:") and "LlamaForCausalLM" in line
    from vs_vllm.models import supported_architectures

    for architecture in supported_architectures():  # one line naming every supported one
        assert architecture in line
