"""Every patch of vLLM internals applies to the installed vLLM, and fails loudly when an
upgrade moves what it patches. Real vLLM, no mocks."""

from __future__ import annotations

import argparse
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser

from vs_vllm.models import adapter_for, supported_architectures
from vs_vllm.vllm_plugin import register
from vs_vllm.vllm_plugin.classes import class_path
from vs_vllm.vllm_plugin.patches import cli_args, engine_config, pruning_path, text_only_ratio


@pytest.fixture(scope="module", autouse=True)
def plugin_registered():
    register()
    register()  # idempotent


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "vs_vllm"]
    assert ep.value == "vs_vllm.vllm_plugin:register"


def test_vllm_loads_the_plugin_in_a_fresh_process():
    """Every supported architecture resolves to the selecting class, through vLLM's own lazy
    registry import (the class is built on first access in that process)."""
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins(); "
        "from vllm.model_executor.models.registry import ModelRegistry as R\n"
        f"for a in {list(supported_architectures())!r}:\n"
        "    m = R.models[a]; c = R._try_load_model_cls(a)\n"
        "    print(a, m.module_name + ':' + m.class_name, c.__mro__[2].__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = [line.split() for line in out.stdout.splitlines() if line.count(" ") == 2]
    assert {a for a, _, _ in lines} == set(supported_architectures())
    for arch, path, vllm_base in lines:
        assert path == class_path(arch)
        # the selecting class extends the vLLM class the family's adapter names (vLLM's own
        # class of that name; InternVL's HF architecture is served by InternS1's class)
        assert vllm_base == adapter_for([arch]).vllm[arch].model.split(":")[1]


def test_cli_patch_adds_flags_to_the_real_serve_parser():
    assert cli_args.is_applied()
    parser = cli_args.serve_parser(FlexibleArgumentParser())
    args = parser.parse_args(
        [
            "--model",
            "m",
            "--vision-keep-ratio",
            "0.3",
            "--vision-selector-strategy",
            "norm",
            "--trust-request-mm-kwargs",
        ]
    )
    assert args.vision_selector_strategy == "norm"
    settings = cli_args.settings_from_args(args)
    assert settings is not None and settings.request_ratios and settings.keep_ratio == 0.3


@pytest.mark.parametrize(
    ("flag", "bad", "says"),
    [
        ("--vision-keep-ratio", "0", "must be in (0, 1], got 0.0"),
        ("--vision-keep-ratio", "1.5", "must be in (0, 1], got 1.5"),
        ("--vision-keep-ratio", "nan", "must be in (0, 1], got nan"),
        ("--vision-keep-ratio", "x", "must be a number in (0, 1], got 'x'"),
        ("--video-keep-ratio", "-1", "must be in (0, 1], got -1.0"),
        ("--vision-selector-strategy", "best", "must be one of learned"),
        ("--video-selection", "per-second", "must be one of per-video, per-frame"),
    ],
)
def test_cli_rejects_bad_values_in_one_line(flag, bad, says, capsys):
    """Bad flag values stop ``from_cli_args`` (before any engine) with exit 2 and one
    ``vs-vllm: error:`` line naming the flag: no argparse usage dump."""
    parser = cli_args.serve_parser(FlexibleArgumentParser())
    args = parser.parse_args(["--model", "m", flag, bad])  # argparse takes any text
    with pytest.raises(SystemExit) as exit_info:
        AsyncEngineArgs.from_cli_args(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"vs-vllm: error: {flag} ") and says in err[0], err


def test_from_cli_args_translates_flags_to_hf_overrides(tmp_path):
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(
        [
            "--model",
            str(tmp_path / "nonexistent"),
            "--vision-keep-ratio",
            "0.2",
            "--vision-selector-strategy",
            "uniform",
            "--hf-overrides",
            '{"foo": 1}',
        ]
    )
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.hf_overrides == {
        "foo": 1,
        "vision_selector": {
            "keep_ratio": 0.2,
            "strategy": "uniform",
            "checkpoint": None,
            "request_ratios": False,
            "video_keep_ratio": None,  # videos untouched
            "video_selection": "per-video",
        },
    }
    plain = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m"]))
    assert not plain.hf_overrides  # no flag: stock vLLM


def test_merge_hf_overrides_keeps_user_callable():
    from types import SimpleNamespace

    settings = cli_args.settings_from_args(
        argparse.Namespace(
            vision_keep_ratio="0.5", vision_selector=None, vision_selector_strategy="norm"
        )
    )
    fn = cli_args.merge_hf_overrides(lambda c: (setattr(c, "x", 1), c)[1], settings)
    cfg = fn(SimpleNamespace())
    assert cfg.x == 1 and cfg.vision_selector["strategy"] == "norm"


def test_pruning_path_patch_is_applied():
    targets = pruning_path.applied_targets()
    assert targets and all(targets.values()), targets


def test_patch_targets_still_exist_in_this_vllm():
    """If this fails after a vLLM upgrade, re-read the patches' "Why" notes."""
    from vllm.config import ModelConfig
    from vllm.config.multimodal import MultiModalConfig

    assert isinstance(vars(EngineArgs)["add_cli_args"], staticmethod)
    assert isinstance(vars(EngineArgs)["from_cli_args"], classmethod)
    assert callable(vars(EngineArgs)["create_engine_config"])
    renderer = importlib.import_module(text_only_ratio.RENDERER[0]).BaseRenderer
    for name in text_only_ratio.METHODS:  # where vLLM skips the processor for text prompts
        assert name in vars(renderer), name
        source = inspect.getsource(vars(renderer)[name])
        assert 'prompt.get("multi_modal_data")' in source and "mm_processor_kwargs" in source
    assert text_only_ratio.is_applied()
    assert "__post_init__" in vars(ModelConfig)
    assert "is_multimodal_pruning_enabled" in vars(MultiModalConfig)
    for module_name, class_name in pruning_path.RUNNERS:
        runner = getattr(importlib.import_module(module_name), class_name)
        assert "load_model" in vars(runner), class_name
    gpu_src = Path(importlib.import_module(pruning_path.V1_GPU_RUNNER[0]).__file__).read_text()
    assert "mm_config.is_multimodal_pruning_enabled()" in gpu_src
    assert "recompute_mrope_positions" in gpu_src
    v2_src = Path(importlib.import_module(pruning_path.V2_PRUNER[0]).__file__).read_text()
    assert "is_multimodal_pruning_enabled()" in v2_src and "recompute_mrope_positions" in v2_src
    from vllm.multimodal.video_prune.evs import recompute_mrope_positions  # noqa: F401


def test_cli_patch_video_flags():
    parser = cli_args.serve_parser(FlexibleArgumentParser())
    args = parser.parse_args(
        ["--model", "m", "--video-keep-ratio", "0.2", "--video-selection", "per-frame"]
    )
    settings = cli_args.settings_from_args(args)
    assert settings is not None and settings.video_keep_ratio == 0.2
    assert settings.video_selection == "per-frame" and settings.keep_ratio == 1.0
    for bad in (["--video-keep-ratio", "0"], ["--video-selection", "per-second"]):
        with pytest.raises(cli_args.FlagError, match=bad[0]):
            cli_args.settings_from_args(parser.parse_args(["--model", "m", *bad]))


def _llama_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,'
        ' "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 64,'
        ' "vocab_size": 100}'
    )
    return tmp_path


def test_engine_config_patch_refuses_selection_it_cannot_apply(tiny_model_dir, tmp_path):
    """``hf_overrides={"vision_selector": ...}`` (the Python form of the serve flags) is checked
    when vLLM builds the engine config: an unsupported model, an unknown setting or a learned
    strategy without scorer weights raise one clear ``ValueError``; good settings and models
    without the key build as before."""
    assert engine_config.is_applied()

    def build(model: Path, overrides: dict | None):
        extra = {} if overrides is None else {"hf_overrides": overrides}
        args = EngineArgs(model=str(model), skip_tokenizer_init=True, **extra)
        return args.create_engine_config()

    norm = {"vision_selector": {"keep_ratio": 0.3, "strategy": "norm"}}
    with pytest.raises(ValueError, match="LlamaForCausalLM") as err:
        build(_llama_dir(tmp_path), norm)
    assert str(err.value).startswith("vs-vllm: hf_overrides['vision_selector']: ")
    for architecture in supported_architectures():
        assert architecture in str(err.value)
    build(tmp_path, None)  # stock vLLM: untouched
    with pytest.raises(ValueError, match="unknown vision_selector setting"):
        build(tiny_model_dir, {"vision_selector": {"keep_ratio": 0.3, "keep": 1}})
    with pytest.raises(ValueError, match="'learned' strategy needs scorer weights"):
        build(tiny_model_dir, {"vision_selector": {"keep_ratio": 0.3}})
    config = build(tiny_model_dir, norm)
    assert config.model_config.hf_config.vision_selector["strategy"] == "norm"
    evs = EngineArgs(
        model=str(tiny_model_dir),
        skip_tokenizer_init=True,
        hf_overrides=norm,
        video_pruning_rate=0.5,
    )
    with pytest.raises(ValueError, match=r"--video-pruning-rate \(vLLM's EVS\) and vision"):
        evs.create_engine_config()


def test_keep_everything_warns_once_per_settings():
    from vs_vllm.vllm_plugin.settings import SelectorSettings
    from vs_vllm.vllm_plugin.validation import warn_if_keeps_everything

    warn_if_keeps_everything.cache_clear()
    everything = SelectorSettings(strategy="norm")
    assert warn_if_keeps_everything(everything)
    assert warn_if_keeps_everything(everything)  # cached: the line was logged once
    assert warn_if_keeps_everything.cache_info().misses == 1
    assert not warn_if_keeps_everything(SelectorSettings(keep_ratio=0.3, strategy="norm"))
    assert not warn_if_keeps_everything(SelectorSettings(video_keep_ratio=0.3, strategy="norm"))


def test_llm_refuses_selection_on_an_unsupported_model(tmp_path):
    """``LLM(<non-Qwen model>, hf_overrides={"vision_selector": ...})`` in a fresh process:
    ``ValueError`` naming the model's architecture before any engine starts."""
    code = (
        "from vllm import LLM\n"
        "try:\n"
        f"    LLM({str(_llama_dir(tmp_path))!r}, skip_tokenizer_init=True,\n"
        "        hf_overrides={'vision_selector': {'keep_ratio': 0.3, 'strategy': 'norm'}})\n"
        "except ValueError as err:\n"
        "    print('REFUSED', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    line = next(x for x in out.stdout.splitlines() if x.startswith("REFUSED"))
    assert "LlamaForCausalLM" in line and "Qwen2_5_VLForConditionalGeneration" in line


def test_the_serve_path_checks_the_model_once(tiny_model_dir, tmp_path, monkeypatch):
    """``vllm serve`` builds its engine args from the flags (checked there, before any engine)
    and then the engine config: the model is read and checked once on that path. A model
    whose config is not local yet (a hub id) is checked when the engine config is built."""
    from vs_vllm.vllm_plugin import validation
    from vs_vllm.vllm_plugin.settings import MODEL_CHECKED

    calls = []
    real = validation.check_model
    monkeypatch.setattr(validation, "check_model", lambda *a: (calls.append(a[0]), real(*a)))
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    flags = ["--vision-keep-ratio", "0.3", "--vision-selector-strategy", "norm"]
    engine_args = AsyncEngineArgs.from_cli_args(
        parser.parse_args(["--model", str(tiny_model_dir), "--skip-tokenizer-init", *flags])
    )
    assert getattr(engine_args, MODEL_CHECKED) is True and len(calls) == 1
    engine_args.create_engine_config()
    assert len(calls) == 1  # not again
    remote = AsyncEngineArgs.from_cli_args(
        parser.parse_args(["--model", str(tmp_path / "not-local-yet"), *flags])
    )
    assert not getattr(remote, MODEL_CHECKED, False) and len(calls) == 1
    plain = EngineArgs(
        model=str(tiny_model_dir),
        skip_tokenizer_init=True,
        hf_overrides={"vision_selector": {"keep_ratio": 0.3, "strategy": "norm"}},
    )
    plain.create_engine_config()  # the Python path: checked here, once
    assert len(calls) == 2
