"""The selecting model: a mixin put in front of a family's own vLLM model class.

The vision tower runs as usual, then each image keeps its top-k tokens before they reach the
LLM. :mod:`vs_vllm.vllm_plugin.classes` builds one class per supported architecture, registered
under vLLM's own architecture name, so it serves plain checkpoints and merged VisionSelector
checkpoints alike. Without ``hf_config.vision_selector`` the class is stock vLLM: every method
falls through to the family's class.

With selection configured, per batch of images:
vision tower -> packed (sum N_i, W) rows -> strategy on the first D = ``score_width`` columns
(learned: scorer folded into the fused Triton select kernel) -> (sum k_i, W) whole kept rows
+ kept indices -> each image's kept rows with 8 position channels (see ``position_channels``)
-> vLLM's runner calls ``recompute_mrope_positions``, which strips the channels and fixes the
M-RoPE positions. Everything family-specific comes from ``self.vs_adapter``.

With encoder CUDA graphs (``compilation_config.cudagraph_mm_encoder``) the graph covers the
tower alone; vLLM's graph manager hands its output to ``postprocess_encoder_output``, which
selects through the same helpers as ``embed_multimodal``.

The private vLLM names this mixin calls or reads are listed, with why and when they can go, in
:mod:`vs_vllm.vllm_plugin.private_surface`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from vs_vllm.batch import pack_rows
from vs_vllm.checkpoint import (
    SCORER_KEYS,
    is_merged_scorer_key,
    load_scorer_state,
    merged_state_from_tensors,
)
from vs_vllm.kernels.startup import prepare_select_backend
from vs_vllm.media_segments import (
    IMAGE_SEGMENTS,
    VIDEO_SEGMENTS,
    Segments,
    batch_segments,
    carried_segments,
    kept_count,
    media_segments,
)
from vs_vllm.media_selection import MediaItem, select_media
from vs_vllm.models import ModelAdapter
from vs_vllm.position_channels import NUM_CHANNELS, decode_positions
from vs_vllm.positions import (
    MediaRun,
    fill_kept_mrope_positions,
    initial_mrope_positions,
    media_runs,
)
from vs_vllm.scorer import VisionSelectorScorer
from vs_vllm.strategies import SelectionStrategy, build_strategy, strategy_class
from vs_vllm.vllm_plugin.patches.pruning_path import check_runner
from vs_vllm.vllm_plugin.settings import SelectorSettings
from vs_vllm.vllm_plugin.validation import check_evs, check_video_selection

logger = init_logger("vllm.vs_vllm.model")  # under "vllm." so vLLM's log config shows it

SCORER_MODULE = "vision_selector_scorer"


def _items(grids: Sequence[tuple[int, int, int]], segments: Sequence[Segments]) -> list[MediaItem]:
    return [MediaItem(g, s) for g, s in zip(grids, segments, strict=True)]


class SelectingModel:
    """Mixin over a family's vLLM model class (``vs_adapter`` is set on the built class)."""

    vs_adapter: ModelAdapter

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self.vs_settings = SelectorSettings.from_hf_config(self.config)
        self.vs_strategy: SelectionStrategy | None = None
        self.vs_backend_ready = False
        self.vs_dtype = vllm_config.model_config.dtype
        if self.vs_settings is None:
            return
        # vLLM's pruning path (kept embeddings carry position channels, the runner recomputes
        # M-RoPE positions) is switched on by the pruning_path patch, for every runner;
        # check_runner refuses a runner it does not cover, so nothing fails later at the first
        # request. The tower keeps its encoder CUDA graph (get_encoder_cudagraph_config).
        mm_config = vllm_config.model_config.multimodal_config
        check_evs(None if mm_config is None else mm_config.video_pruning_rate)
        check_video_selection(self.vs_settings, self.vs_adapter)
        # 1-D families need no pruning path: the prompt's k placeholders take the next
        # positions, and the rows go to the LLM as they are.
        self.vs_runner = check_runner(vllm_config) if self.vs_adapter.uses_mrope else None
        self.vs_hidden_size = self.vs_adapter.score_width(self.config)
        self.vs_row_width = self.vs_adapter.row_width(self.config)
        # What the encoder CUDA-graph manager calls use_dp (see get_encoder_cudagraph_config).
        self.vs_encoder_dp = (
            mm_config is not None
            and mm_config.mm_encoder_tp_mode == "data"
            and vllm_config.parallel_config.tensor_parallel_size > 1
        )
        if strategy_class(self.vs_settings.strategy).needs_checkpoint:
            setattr(self, SCORER_MODULE, VisionSelectorScorer(self.vs_hidden_size))
        else:
            self.vs_strategy = build_strategy(self.vs_settings.strategy)
        logger.info(
            "VisionSelector (%s): keep ratio %s, strategy %s%s",
            self.vs_adapter.family,
            self.vs_settings.keep_ratio,
            self.vs_settings.strategy,
            " (per-request ratios allowed)" if self.vs_settings.request_ratios else "",
        )

    # -- weights ----------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        merged: dict[str, torch.Tensor] = {}

        def backbone() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if is_merged_scorer_key(name):
                    merged[name] = tensor
                else:
                    yield name, tensor

        loaded = set(super().load_weights(backbone()))  # type: ignore[misc]
        if self.vs_settings is None:
            return loaded
        if self.vs_strategy is None:
            self._load_scorer(merged)
            loaded |= {f"{SCORER_MODULE}.{k}" for k in SCORER_KEYS}
        self._prepare_select_backend()
        return loaded

    def _prepare_select_backend(self) -> None:
        """Once, at load (``load_model`` calls ``load_weights``), on the model's device: compile
        every select-kernel variant serving can reach and check Triton against torch
        (``kernels.startup``); the strategy selects with the backend that passed."""
        assert self.vs_strategy is not None
        device = next(self.parameters()).device  # type: ignore[attr-defined]
        self.vs_strategy.backend = prepare_select_backend(
            device,
            self.vs_dtype,
            self.vs_row_width,
            self.vs_hidden_size,
            log=logger.info,
            warn=logger.warning,
        )
        self.vs_backend_ready = True

    def _load_scorer(self, merged: dict[str, torch.Tensor]) -> None:
        assert self.vs_settings is not None
        scorer: VisionSelectorScorer = getattr(self, SCORER_MODULE)
        if self.vs_settings.checkpoint is not None:
            state, source = load_scorer_state(self.vs_settings.checkpoint, self.vs_hidden_size)
            where = f"{source.kind} checkpoint {source.path}"
        elif merged:
            where = "the model checkpoint (merged VisionSelector weights)"
            state = merged_state_from_tensors(merged, where, self.vs_hidden_size)
        else:
            raise ValueError(
                "the 'learned' vision selector strategy needs scorer weights: pass "
                "--vision-selector PATH, or serve a merged VisionSelector checkpoint "
                "(keys ending in importance_scorer.q_proj.weight, ...)"
            )
        # vLLM builds the model under its serving dtype (bf16 on GPUs): keep the tiny scorer in
        # float32 *before* copying, so its weights are not rounded through bf16.
        scorer.float()
        for key, tensor in state.items():
            param = scorer.get_parameter(key)
            if param.shape != tensor.shape:
                raise ValueError(
                    f"scorer weight {key} has shape {tuple(tensor.shape)}, expected "
                    f"{tuple(param.shape)} for hidden size {self.vs_hidden_size}"
                )
            with torch.no_grad():
                param.copy_(tensor.to(param.dtype))
        self.vs_strategy = build_strategy("learned", scorer)
        logger.info("VisionSelector: scorer loaded from %s", where)

    # -- encoder output ---------------------------------------------------------------------

    def embed_multimodal(self, **kwargs: object):
        if self.vs_settings is None:
            return super().embed_multimodal(**kwargs)  # type: ignore[misc]
        adapter = self.vs_adapter
        embeddings: tuple[torch.Tensor, ...] = ()
        for modality, media_input in adapter.vllm_media_inputs(self, kwargs).items():
            if modality not in ("image", "video"):
                raise RuntimeError(f"vs-vllm: no selection for the {modality} modality")
            rows = adapter.vllm_tower_rows(self, modality, media_input)
            embeddings += self._select_modality(modality, rows, media_input, kwargs)
        return embeddings

    def _select_modality(
        self, modality: str, rows: object, fields: Mapping, carried: Mapping
    ) -> tuple[torch.Tensor, ...]:
        """One modality's tower rows (per item, or packed) -> per item its kept rows (with
        position channels under M-RoPE). ``fields`` holds the items' grids (and a video's
        time scale), ``carried`` their kept counts (the processor's segments fields)."""
        if modality == "video" and self.vs_adapter.video_fields is None:
            return tuple(rows)  # a family without video selection (1-D positions): as served
        if modality == "image":
            grids = self.vs_adapter.item_grids(self.config, fields, "image")
            segments = batch_segments(carried.get(IMAGE_SEGMENTS), len(grids))
            return self._select_media(pack_rows(rows), _items(grids, segments))
        return self._select_videos(rows, fields, carried.get(VIDEO_SEGMENTS))

    def _select_media(
        self, x: torch.Tensor, items: Sequence[MediaItem]
    ) -> tuple[torch.Tensor, ...]:
        if not self.vs_backend_ready:  # weights not loaded through load_weights (dummy format)
            self._prepare_select_backend()
        if x.shape[1] != self.vs_row_width:
            raise RuntimeError(
                f"vs-vllm: the {self.vs_adapter.family} vision tower returned rows of width "
                f"{x.shape[1]}, the adapter expects {self.vs_row_width}"
            )
        return select_media(
            x,
            items,
            self.vs_strategy,
            merge_size=self.vs_adapter.merge_size(self.config),
            score_dim=self.vs_hidden_size,
            with_positions=self.vs_adapter.uses_mrope,
        )

    def _select_videos(self, videos, fields: Mapping, carried: object) -> tuple[torch.Tensor, ...]:
        """Each video keeps the k of its carried segments (over the whole video, or k_f per
        frame), with the position channels of the kept tokens; a video that is not selected
        (no carried segments) keeps every token, with the channels the runner expects once
        pruning is on."""
        adapter = self.vs_adapter
        grids = adapter.item_grids(self.config, fields, "video")
        if self.vs_settings is not None and self.vs_settings.selects_videos:
            segments = batch_segments(carried, len(grids))
        else:
            segments = [media_segments(adapter, self.config, "video", g, None) for g in grids]
        t_factors = adapter.video_t_factors(self.config, fields, len(grids))
        items = [
            MediaItem(grid, segs, t)
            for grid, segs, t in zip(grids, segments, t_factors, strict=True)
        ]
        return self._select_media(pack_rows(videos), items)

    # -- encoder CUDA graphs (vLLM's EncoderCudaGraphManager) -------------------------------

    def get_encoder_cudagraph_config(self):
        """The family's own encoder CUDA-graph config, its modalities listed again.

        vLLM's own M-RoPE classes capture no modality once pruning is on: their pruned
        ``embed_multimodal`` appends positions that a replayed tower skips. Here the graph
        covers the tower alone and ``postprocess_encoder_output`` selects after each replay,
        so the family is asked for the config it gives without pruning."""
        if self.vs_settings is None:
            return super().get_encoder_cudagraph_config()  # type: ignore[misc]
        if self.vs_encoder_dp:
            logger.info_once(
                "VisionSelector: encoder CUDA graphs stay off: with --mm-encoder-tp-mode data "
                "the graph manager all-gathers N tower rows per item across ranks, selection "
                "returns k rows with position channels"
            )
            return super().get_encoder_cudagraph_config()  # type: ignore[misc]
        pruning = self.is_multimodal_pruning_enabled  # type: ignore[has-type]
        self.is_multimodal_pruning_enabled = False  # the one flag the family's config reads
        try:
            config = super().get_encoder_cudagraph_config()  # type: ignore[misc]
        finally:
            self.is_multimodal_pruning_enabled = pruning
        if not config.modalities:
            logger.info_once(
                "VisionSelector: encoder CUDA graphs stay off: vLLM's %s model lists no "
                "modality for them",
                self.vs_adapter.family,
            )
        return config

    def select_encoder_cudagraph_items(self, mm_kwargs: dict, indices: list[int]) -> dict:
        """The family's item selection, plus the per-item fields selection reads (the kept
        counts, a video's seconds per grid), which the family's drops."""
        selected = super().select_encoder_cudagraph_items(mm_kwargs, indices)  # type: ignore[misc]
        if self.vs_settings is None:
            return selected
        video_fields = self.vs_adapter.video_fields
        for key in (
            IMAGE_SEGMENTS,
            VIDEO_SEGMENTS,
            *(video_fields.per_item if video_fields else ()),
        ):
            value = mm_kwargs.get(key)
            if value is not None and key not in selected:
                if isinstance(value, torch.Tensor):
                    selected[key] = value[indices]
                else:
                    selected[key] = [value[i] for i in indices]
        return selected

    def postprocess_encoder_output(
        self,
        outputs: dict[str, torch.Tensor],
        indices: list[int],
        per_item_out_tokens: list[int],
        dest,
        clone: bool = False,
        batch_mm_kwargs: dict | None = None,
    ) -> None:
        """After the tower (a graph replay or the manager's eager fallback): the family's own
        postprocess, then the selection and position channels of ``embed_multimodal``.

        ``indices`` are the batch's items (in the manager's packing order), ``batch_mm_kwargs``
        their inputs (``select_encoder_cudagraph_items``). The kept rows are written to a new
        buffer, so nothing in ``dest`` aliases the graph's output buffer (``clone``)."""
        if self.vs_settings is None:
            return super().postprocess_encoder_output(  # type: ignore[misc]
                outputs, indices, per_item_out_tokens, dest, clone, batch_mm_kwargs
            )
        if batch_mm_kwargs is None:
            raise RuntimeError(
                "vs-vllm: postprocess_encoder_output needs the batch's inputs (grids, counts)"
            )
        tower: dict[int, torch.Tensor] = {}
        # Views of the tower's output (no copy): the selection reads them once.
        super().postprocess_encoder_output(  # type: ignore[misc]
            outputs, indices, per_item_out_tokens, tower, False, batch_mm_kwargs
        )
        parts = [tower[i] for i in indices]
        modality = self.get_input_modality(batch_mm_kwargs)  # type: ignore[attr-defined]
        kept = self._select_modality(modality, parts, batch_mm_kwargs, batch_mm_kwargs)
        for i, rows in zip(indices, kept, strict=True):
            dest[i] = rows

    # -- positions --------------------------------------------------------------------------

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features
    ) -> tuple[torch.Tensor, int]:
        if self.vs_settings is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)  # type: ignore[misc]
        adapter = self.vs_adapter
        merge = adapter.merge_size(self.config)
        ids = adapter.token_ids(self.config)
        runs: list[MediaRun] = []
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            data = feature.data
            (grid,) = adapter.item_grids(self.config, data, feature.modality)
            if feature.modality == "image":
                k = kept_count(carried_segments(data[IMAGE_SEGMENTS]))
                runs.append(MediaRun(feature.mm_position.offset, grid, k))
                continue
            (t_factor,) = adapter.video_t_factors(self.config, data, 1)
            k: int | list[int] | None = None
            if self.vs_settings.selects_videos:
                segments = carried_segments(data[VIDEO_SEGMENTS])
                k = [kf for _, kf in segments]
                if adapter.video_layout == "one_run":
                    k = sum(k)
            runs.extend(
                media_runs(
                    input_tokens,
                    feature.mm_position.offset,
                    grid,
                    merge,
                    ids.video,
                    split_frames=adapter.video_layout == "frame_runs",
                    t_factor=t_factor,
                    k=k,
                )
            )
        return initial_mrope_positions(input_tokens, runs, merge)

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        if self.vs_settings is None:
            return super().recompute_mrope_positions(  # type: ignore[misc]
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )
        # Not vLLM's evs.recompute_mrope_positions: it misplaces media when a request has
        # several images or a chunk starts between media (see vs_vllm.positions).
        embeds = [mm[:, :-NUM_CHANNELS] for mm in multimodal_embeddings]
        media_pos = [decode_positions(mm[:, -NUM_CHANNELS:]).t() for mm in multimodal_embeddings]
        ids = self.vs_adapter.token_ids(self.config)
        with gpu_sync_allowed():  # the V2 runner passes device ids: one copy of the prompt
            positions, delta = fill_kept_mrope_positions(
                input_ids, media_pos, mrope_positions, num_computed_tokens, ids.image, ids.video
            )
        return embeds, positions, delta
