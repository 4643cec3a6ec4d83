"""Loading a model of any supported family with transformers, through its adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vs_vllm.models import adapter_for


def load_hf_model(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Any]:
    """The transformers model (eval mode) and ``AutoProcessor`` of a local model directory.

    The class comes from the family's adapter (``config.architectures``); an unsupported
    architecture raises ``UnsupportedModelError`` naming the supported ones."""
    from transformers import AutoConfig, AutoProcessor

    text = str(path)
    local = Path(text).expanduser()
    if local.is_absolute() or text.startswith(".") or local.exists():
        if not local.is_dir():
            raise FileNotFoundError(f"model folder not found: {local}")
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{local}: not a model folder (no config.json)")
    config = AutoConfig.from_pretrained(path)
    adapter = adapter_for(config, str(path))
    architecture = next(a for a in config.architectures if a in adapter.hf_model)
    model = adapter.hf_model_class(architecture).from_pretrained(path, dtype=dtype)
    return model.eval(), AutoProcessor.from_pretrained(path)
