"""Run vLLM's own worker wrapper as Ray actors and report what each one sees.

    python tests/engine/ray_probe.py MODEL_DIR OUT.json

Connects to the Ray cluster named by ``RAY_ADDRESS`` (the test starts a local head), builds the
``VllmConfig`` of a selecting instance (``hf_overrides`` with ``vision_selector``, TP=2) in this
process (the driver, as vLLM's engine core does), and creates one Ray actor per rank from
``WorkerWrapperBase``, the class vLLM's Ray executor wraps its workers in: Ray ships the
pickled config to each actor, and ``init_worker`` (vLLM's code) loads the general plugins and
builds the CPU worker. Each actor then reports its process id, the class vLLM's model registry
resolves for the architecture, the selector settings read from its own copy of the config, and
the selecting model class the plugin builds there. Runs in its own process so the test process
never joins a Ray cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import ray
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    model_dir, out_path = sys.argv[1], sys.argv[2]
    settings = {"keep_ratio": 0.3, "strategy": "norm", "request_ratios": True}
    config = EngineArgs(
        model=model_dir,
        dtype="float32",
        max_model_len=512,
        tensor_parallel_size=2,
        hf_overrides={"vision_selector": settings},
    ).create_engine_config()

    class Probe(WorkerWrapperBase):
        def registered(self) -> str:
            """The class vLLM's registry holds for the architecture in this process now."""
            from vllm.model_executor.models.registry import ModelRegistry

            entry = ModelRegistry.models[config.model_config.hf_config.architectures[0]]
            return f"{entry.module_name}:{entry.class_name}"

        def report(self) -> dict:
            from vllm.model_executor.models.registry import ModelRegistry

            from vs_vllm.vllm_plugin.classes import model_class
            from vs_vllm.vllm_plugin.settings import SelectorSettings

            hf_config = self.vllm_config.model_config.hf_config
            arch = hf_config.architectures[0]
            entry = ModelRegistry.models[arch]
            ours = SelectorSettings.from_hf_config(hf_config)
            return {
                "pid": os.getpid(),
                "rank": self.rpc_rank,
                "worker": type(self.worker).__name__,
                "registered": f"{entry.module_name}:{entry.class_name}",
                "settings": None if ours is None else dataclasses.asdict(ours),
                "model_class": model_class(arch).__name__,
            }

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    # What vLLM's Ray executor forwards to its actors: the VLLM_* settings of this process.
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    remote = ray.remote(num_cpus=1)(Probe).options(runtime_env={"env_vars": env})
    actors = [remote.remote(rpc_rank=rank) for rank in range(2)]
    kwargs = [
        {
            "vllm_config": config,
            "local_rank": rank,
            "rank": rank,
            "distributed_init_method": "tcp://127.0.0.1:29555",
            "is_driver_worker": rank == 0,
        }
        for rank in range(2)
    ]
    before = ray.get([a.registered.remote() for a in actors])  # a fresh Ray worker process
    ray.get([a.init_worker.remote(kwargs) for a in actors])  # vLLM's: loads the plugins
    reports = ray.get([a.report.remote() for a in actors])
    for report, registered in zip(reports, before, strict=True):
        report["registered_before_init_worker"] = registered
    Path(out_path).write_text(
        json.dumps({"driver_pid": os.getpid(), "settings": settings, "workers": reports})
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
