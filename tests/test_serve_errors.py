"""Bad server settings stop `vs-vllm serve` with one clear line, before any engine starts.

Each case runs the real command in a subprocess (vLLM import only: a few seconds each)."""

from __future__ import annotations

import subprocess
import sys
import threading
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


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The run's one ``vs-vllm: error:`` line (and no traceback, no usage dump)."""
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("vs-vllm: error: "), proc.stderr
    assert errors[0] == _last_line(proc)
    return errors[0]


def test_bad_flag_values_are_one_line(tiny_model_dir):
    for flag, value, says in (
        ("--vision-keep-ratio", "0", "--vision-keep-ratio must be in (0, 1], got 0.0"),
        ("--vision-keep-ratio", "lots", "--vision-keep-ratio must be a number in (0, 1]"),
        ("--vision-selector-strategy", "best", "--vision-selector-strategy must be one of"),
    ):
        proc = _serve(str(tiny_model_dir), flag, value)
        assert proc.returncode == 2, proc.stderr
        assert says in _one_error_line(proc)


def test_evs_with_selection_is_refused_before_the_engine(tiny_model_dir):
    proc = _serve(
        str(tiny_model_dir),
        "--vision-keep-ratio",
        "0.3",
        "--vision-selector-strategy",
        "norm",
        "--video-pruning-rate",
        "0.5",
    )
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert "--video-pruning-rate (vLLM's EVS) and vision token selection cannot be" in line
    assert "EngineCore" not in proc.stderr and "Starting vLLM" not in proc.stderr


def test_selector_without_keep_ratio_warns_that_it_keeps_everything(tiny_model_dir, tmp_path):
    """``--vision-selector PATH`` alone keeps every token: one warning line, before the engine
    starts (the server is stopped once the line is seen)."""
    path = save_scorer(VisionSelectorScorer(64), tmp_path / "s.safetensors")
    proc = subprocess.Popen(
        [VS_VLLM, "serve", str(tiny_model_dir), "--vision-selector", str(path), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # vLLM logs to stdout
        text=True,
    )
    warnings, lines = [], []
    timer = threading.Timer(300, proc.kill)  # the loop below ends even if no line comes
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "selects nothing" in line:
                warnings.append(line)
            if "EngineCore" in line:
                break  # the engine process is up: every check before it has run
    finally:
        timer.cancel()
        proc.kill()
        proc.wait(timeout=60)
    assert any("EngineCore" in line for line in lines), "".join(lines[-20:])
    assert len(warnings) == 1, warnings
    assert "keep ratio 1.0 selects nothing" in warnings[0] and "--vision-keep-ratio" in warnings[0]


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
