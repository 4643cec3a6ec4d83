"""Prompt processing: each image reserves k_i = max(1, int(N_i * r_i)) placeholder tokens.

Because the prompt holds k_i tokens, everything vLLM derives from it (KV blocks, the
scheduler's token budget, placeholder ranges, the encoder cache entry) follows k, not N. The
resolved ratio of each item and its (N, k) selection segments, computed here once
(:mod:`vs_vllm.media_segments`), travel to the model as per-item fields (``vision_keep_ratio``
and ``vision_kept_segments``; ``video_keep_ratio`` and ``video_kept_segments``), kept on the
CPU: the model selects and places exactly the k the prompt reserved, with no host-device sync.
Each item's hash carries what decides its rows (the resolved ratio, strategy and scorer:
:mod:`vs_vllm.vllm_plugin.cache_key`), so two requests or two instances with the same image at
different settings never share a processor-cache, encoder-cache, EC-store or prefix-cache
entry.

These are mixins: :mod:`vs_vllm.vllm_plugin.classes` puts them in front of each family's own
vLLM processing-info and processor classes (named by the family's adapter). The private vLLM
methods they override are listed in :mod:`vs_vllm.vllm_plugin.private_surface`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate, PromptUpdateDetails

from vs_vllm.keep_ratio import num_kept_tokens
from vs_vllm.media_segments import (
    IMAGE_SEGMENTS,
    VIDEO_SEGMENTS,
    carried_segments,
    kept_count,
    media_segments,
    run_counts,
    segments_tensor,
)
from vs_vllm.models import ModelAdapter
from vs_vllm.vllm_plugin.cache_key import scorer_identity, selection_tag
from vs_vllm.vllm_plugin.settings import REQUEST_KWARG, REQUEST_VIDEO_KWARG, SelectorSettings


class SelectingProcessingInfo:
    """Mixin over a family's ``*ProcessingInfo``: budgets follow k."""

    vs_adapter: ModelAdapter

    @property
    def selector_settings(self) -> SelectorSettings | None:
        return SelectorSettings.from_hf_config(self.get_hf_config())  # type: ignore[attr-defined]

    def get_mm_max_tokens_per_item(
        self, seq_len: int, mm_counts: Mapping[str, int]
    ) -> Mapping[str, int]:
        """Budgets follow the largest k an image may get (the full N when requests may ask
        for more than the server's ratio)."""
        stock = super().get_mm_max_tokens_per_item(seq_len, mm_counts)  # type: ignore[misc]
        if stock is None:  # vLLM sizes them from dummy inputs (SelectingProcessor: budget ratio)
            return None
        out = dict(stock)
        settings = self.selector_settings
        if settings is not None and "image" in out:
            out["image"] = num_kept_tokens(out["image"], settings.budget_ratio)
        if (
            settings is not None
            and "video" in out
            and settings.video_budget_ratio < 1.0
            and settings.video_selection == "per-video"
        ):
            # k grows with N, so the largest video keeps the most. (Per frame, k can exceed
            # N * r by up to one token per frame: the budget stays at the full N.)
            out["video"] = num_kept_tokens(out["video"], settings.video_budget_ratio)
        return out


class SelectingProcessor:
    """Mixin over a family's multimodal processor: k placeholders per image."""

    vs_adapter: ModelAdapter
    info: Any

    def _settings(self) -> SelectorSettings | None:
        return SelectorSettings.from_hf_config(self.info.get_hf_config())

    def get_dummy_mm_inputs(self, *args: Any, **kwargs: Any) -> Any:
        """vLLM's profiling inputs, processed at the largest ratio a request may get (the
        budget ratio): for a family whose processing info gives no per-item maximum, vLLM
        sizes the encoder budget and cache from these."""
        self.vs_profiling = True
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.vs_profiling = False

    def _item_ratios(
        self, settings: SelectorSettings, hf_kwargs: Mapping[str, object]
    ) -> tuple[float, float | None]:
        """The request's image ratio and video ratio (None: videos keep every token): its own
        (``mm_processor_kwargs``) or the server's; the budget ratios for vLLM's dummy inputs."""
        if getattr(self, "vs_profiling", False):
            video = settings.video_budget_ratio if settings.selects_videos else None
            return settings.budget_ratio, video
        merged = self.info.ctx.get_merged_mm_kwargs(hf_kwargs)
        return settings.resolve_request_ratio(merged), settings.resolve_request_video_ratio(merged)

    def _get_mm_hashes(self, inputs: Any) -> Mapping[str, list[str]]:
        """vLLM's per-item hashes, each with the item's selection (:mod:`cache_key`) hashed
        into it on a selecting instance, so no cache or EC store hands one setting's rows to
        another; stock hashes without selection."""
        hashes = super()._get_mm_hashes(inputs)  # type: ignore[misc]
        settings = self._settings()
        if settings is None:
            return hashes
        from vllm.multimodal.hasher import MultiModalHasher

        hf_config = self.info.get_hf_config()
        ratios = dict(
            zip(
                ("image", "video"),
                self._item_ratios(settings, inputs.hf_processor_mm_kwargs),
                strict=True,
            )
        )
        scorer = scorer_identity(settings, self.vs_adapter.score_width(hf_config))
        algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
        out: dict[str, list[str]] = {}
        for modality, items in hashes.items():
            tag = selection_tag(
                settings,
                modality,
                ratios.get(modality),
                scorer=scorer,
                positions=self.vs_adapter.uses_mrope,
            )
            out[modality] = [
                MultiModalHasher.hash_kwargs(algorithm, mm_hash=h, vs_vllm=tag) for h in items
            ]
        return out

    def _apply_hf_processor_main(
        self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]
    ):
        settings = self._settings()
        if settings is None:
            return super()._apply_hf_processor_main(mm_items, hf_kwargs)  # type: ignore[misc]
        if (
            mm_items.get_count("video", strict=False)
            and not getattr(self, "vs_profiling", False)  # vLLM's dummy video: as served
            and self.vs_adapter.video_fields is None
            and self.vs_adapter.uses_mrope
        ):
            raise ValueError(
                f"vs-vllm: {self.vs_adapter.family} videos are not served with vision token "
                "selection (its adapter declares no video fields); send images, or serve "
                "without --vision-keep-ratio"
            )
        ratio, video_ratio = self._item_ratios(settings, hf_kwargs)
        ours = (REQUEST_KWARG, REQUEST_VIDEO_KWARG)
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k not in ours}
        processed = super()._apply_hf_processor_main(mm_items, hf_kwargs)  # type: ignore[misc]
        hf_config = self.info.get_hf_config()
        per_frame = settings.video_selection == "per-frame"
        # Each item's (N, k) segments, computed here once and carried with the item: the
        # placeholders below, the model's selection and its positions all read them.
        for modality, key, item_ratio, ratio_key in (
            ("image", IMAGE_SEGMENTS, ratio, REQUEST_KWARG),
            ("video", VIDEO_SEGMENTS, video_ratio, REQUEST_VIDEO_KWARG),
        ):
            grids = self.vs_adapter.item_grids(hf_config, processed, modality)
            if not grids or item_ratio is None:
                continue
            processed[ratio_key] = torch.full((len(grids),), item_ratio, dtype=torch.float64)
            processed[key] = [
                segments_tensor(
                    media_segments(
                        self.vs_adapter, hf_config, modality, g, item_ratio, per_frame=per_frame
                    )
                )
                for g in grids
            ]
        return processed

    def _get_mm_fields_config(
        self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))  # type: ignore[misc]
        if REQUEST_KWARG in hf_inputs:
            fields[REQUEST_KWARG] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        if REQUEST_VIDEO_KWARG in hf_inputs:
            fields[REQUEST_VIDEO_KWARG] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
        for key, modality in ((IMAGE_SEGMENTS, "image"), (VIDEO_SEGMENTS, "video")):
            if key in hf_inputs:
                fields[key] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(  # type: ignore[misc]
            mm_items, hf_processor_mm_kwargs, out_mm_kwargs
        )
        settings = self._settings()
        if settings is None:
            return updates
        hf_config = self.info.get_hf_config()
        ids = self.vs_adapter.token_ids(hf_config)
        image_token = ids.image

        def image_run_counts(item_idx: int) -> list[int]:
            item = out_mm_kwargs["image"][item_idx]
            return [kept_count(carried_segments(item[IMAGE_SEGMENTS]))]

        def video_run_counts(item_idx: int) -> list[int]:
            """Kept placeholders of each run of the video: one run, or one per frame."""
            segments = carried_segments(out_mm_kwargs["video"][item_idx][VIDEO_SEGMENTS])
            return run_counts(self.vs_adapter, segments)

        def kept(stock: Any, token: int, run_counts: Any) -> Any:
            """The family's own replacement with each run of ``token`` placeholders cut to its
            kept count (wrapper tokens, timestamps, vision start/end stay as they are)."""

            def replacement(item_idx: int) -> Any:
                full = stock(item_idx) if callable(stock) else stock
                tokens = list(getattr(full, "full", full))
                counts = iter(run_counts(item_idx))
                out, i = [], 0
                while i < len(tokens):
                    if tokens[i] != token:
                        out.append(tokens[i])
                        i += 1
                        continue
                    while i < len(tokens) and tokens[i] == token:
                        i += 1
                    out.extend([token] * next(counts))
                return PromptUpdateDetails.select_token_id(out, token)

            return replacement

        out: list[PromptUpdate] = []
        for update in updates:
            if update.modality == "image":
                update = PromptReplacement(
                    modality="image",
                    target=update.target,
                    replacement=kept(update.replacement, image_token, image_run_counts),
                )
            elif update.modality == "video" and settings.selects_videos:
                update = PromptReplacement(
                    modality="video",
                    target=update.target,
                    replacement=kept(update.replacement, ids.video, video_run_counts),
                )
            out.append(update)
        return out
