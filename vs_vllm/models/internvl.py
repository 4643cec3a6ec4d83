"""InternVL in HF format (``InternVLForConditionalGeneration``: InternVL3 / 3.5 ``-HF``
checkpoints), which vLLM serves with ``InternS1ForConditionalGeneration``.

* **An image is tiles.** The image processor cuts an image into up to ``max_patches`` tiles of
  ``image_size`` pixels plus, when there are several, a thumbnail tile at the end. The tower
  turns each tile into ``(image_size / patch_size)^2`` patches and the pixel shuffle merges
  them by ``1 / downsample_ratio`` per side: an image's tokens are its tiles' tokens in tile
  order, thumbnail last. Here an image's "grid" is ``(tiles, S, S)`` with ``S = image_size /
  patch_size`` and merge size ``1 / downsample_ratio``, so ``tokens_per_item`` is ``tiles * S²
  / merge²``.
* **k is one top-k over all of an image's tokens** (every tile and the thumbnail together):
  ``k = num_kept_tokens(tiles * tokens_per_tile, r)``. Tiles do not get a k each: a tile of
  background may give all its tokens to a tile with text.
* **The prompt** is ``<img>`` + the image's context tokens (``<IMG_CONTEXT>``) + ``</img>``;
  only the context tokens are placeholders (selected), the wrapper tokens stay.
* **Positions are 1-D** (the text model is Qwen2 / Qwen3 with plain RoPE). The pruned prompt
  holds k context tokens and every token takes the next position, so the kept tokens sit at
  contiguous positions. This is what the HF path gives when the dropped tokens are removed
  before the LLM (``position_rule="contiguous"``): no position channels, no M-RoPE.
* **Videos** are not selected: vLLM's model serves them as usual (every frame's tokens).
* **The vLLM side**: the batch's inputs parse into ``"images"`` / ``"videos"`` (the model's
  ``_parse_and_validate_multimodal_inputs``), and ``_process_vision_input`` runs the tower,
  pixel shuffle and projector, returning one ``(tiles * tokens_per_tile, hidden)`` tensor per
  image. The per-item tile count is the field ``image_num_patches`` (``num_patches`` once
  parsed). transformers' processor does not return a tile count: the HF path reads it from
  the prompt (each image's run of context tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vs_vllm.models.adapter import (
    MediaFields,
    MediaTokenIds,
    Modality,
    ModelAdapter,
    VllmClasses,
    field_scalars,
)

_VLLM = "vllm.model_executor.models.interns1"
_TILES = "image_num_patches"  # per item: its tiles (thumbnail included)
_PARSED_TILES = "num_patches"  # the same, once vLLM's model has parsed the batch
_PARSED_MODALITIES = {"images": "image", "videos": "video"}


def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, list | tuple) else value)


def _tiles_from_prompt(input_ids: torch.Tensor, token: int, per_tile: int) -> list[int]:
    """Tiles per image from a processor's prompt: each image is one run of context tokens
    (``<img>`` and ``</img>`` around it), of ``tiles * tokens_per_tile`` tokens."""
    is_image = (input_ids == token).to(torch.int8)
    tiles = []
    for row in is_image.reshape(-1, is_image.shape[-1]):
        edges = torch.diff(row, prepend=row.new_zeros(1), append=row.new_zeros(1))
        starts = torch.nonzero(edges == 1).flatten().tolist()  # ok-sync: HF path
        ends = torch.nonzero(edges == -1).flatten().tolist()  # ok-sync: HF path
        for start, end in zip(starts, ends, strict=True):
            if (end - start) % per_tile:
                raise ValueError(
                    f"an image run of {end - start} context tokens is not a whole number "
                    f"of {per_tile}-token tiles"
                )
            tiles.append((end - start) // per_tile)
    return tiles


@dataclass(frozen=True)
class InternVLAdapter(ModelAdapter):
    def token_ids(self, hf_config: Any) -> MediaTokenIds:
        image = int(hf_config.image_token_id)
        # No video selection and no separate start/end ids are read (1-D positions).
        return MediaTokenIds(image=image, video=-1, vision_start=-1, vision_end=-1)

    def merge_size(self, hf_config: Any) -> int:
        return round(1 / float(hf_config.downsample_ratio))

    def patch_size(self, hf_config: Any) -> int:
        return _side(hf_config.vision_config.patch_size)

    def tile_side(self, hf_config: Any) -> int:
        """S: patches per tile side."""
        return _side(hf_config.vision_config.image_size) // self.patch_size(hf_config)

    def tokens_per_tile(self, hf_config: Any) -> int:
        return self.tokens_per_item(
            (1, *(self.tile_side(hf_config),) * 2), self.merge_size(hf_config)
        )

    def score_width(self, hf_config: Any) -> int:
        return int(hf_config.text_config.hidden_size)

    def item_grids(
        self, hf_config: Any, data: Mapping[str, Any], modality: Modality
    ) -> list[tuple[int, int, int]]:
        if modality != "image":
            return []
        side = self.tile_side(hf_config)
        value = data.get(_TILES)
        if value is None:
            value = data.get(_PARSED_TILES)
        if value is not None:
            return [(int(t), side, side) for t in field_scalars(value)]
        if data.get(self.image_fields.pixels) is None or data.get("input_ids") is None:
            return []
        tiles = _tiles_from_prompt(
            data["input_ids"], self.token_ids(hf_config).image, self.tokens_per_tile(hf_config)
        )
        return [(t, side, side) for t in tiles]

    def hf_item_fields(self, processor: Any, out: Mapping[str, Any]) -> dict[str, Any]:
        """transformers' processor returns no tile count: read it from the prompt it wrote."""
        if _TILES in out or out.get(self.image_fields.pixels) is None:
            return {}
        token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        tiles = _tiles_from_prompt(out["input_ids"], token, int(processor.image_seq_length))
        return {_TILES: torch.tensor(tiles, dtype=torch.long)}

    # -- vLLM ------------------------------------------------------------------------------

    def vllm_media_inputs(self, model: Any, kwargs: Mapping[str, object]) -> Mapping[str, Any]:
        parsed = model._parse_and_validate_multimodal_inputs(**kwargs)
        return {_PARSED_MODALITIES.get(key, key): value for key, value in parsed.items()}

    def vllm_tower_rows(self, model: Any, modality: Modality, media_input: Any) -> Any:
        return model._process_vision_input(media_input)

    # -- HF ----------------------------------------------------------------------------------

    def hf_visual_rows(self, model: torch.nn.Module, media: Mapping[str, Any]) -> torch.Tensor:
        config = model.config
        pixels = media[self.image_fields.pixels].to(model.dtype)
        out = model.model.get_image_features(
            pixels,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        )
        return out.pooler_output.reshape(-1, out.pooler_output.shape[-1])

    def hf_images_kwargs(self, min_pixels: int, max_pixels: int) -> dict[str, Any]:
        """The image processor tiles images at a fixed tile size; pixel bounds do not apply."""
        return {}


ADAPTER = InternVLAdapter(
    family="internvl",
    vllm={
        "InternVLForConditionalGeneration": VllmClasses(
            model=f"{_VLLM}:InternS1ForConditionalGeneration",
            processing_info=f"{_VLLM}:InternS1ProcessingInfo",
            processor=f"{_VLLM}:InternS1MultiModalProcessor",
            dummy_inputs=f"{_VLLM}:InternS1DummyInputsBuilder",
        ),
    },
    hf_model={
        "InternVLForConditionalGeneration": "transformers:InternVLForConditionalGeneration",
    },
    hf_processors=("InternVLProcessor",),
    position_rule="contiguous",
    image_fields=MediaFields("pixel_values", _TILES),
    video_fields=None,
    vllm_private_methods=("_parse_and_validate_multimodal_inputs", "_process_vision_input"),
)
