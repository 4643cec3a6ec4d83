"""GLM-4.1V positions of pruned prompts against transformers' own ``Glm4vModel.get_rope_index``.

A GLM prompt's image is one run of ``<|image|>`` between ``<|begin_of_image|>`` and
``<|end_of_image|>``; its video is, per temporal patch, the same kind of run followed by the
frame's timestamp text, all inside ``<|begin_of_video|>`` ... ``<|end_of_video|>``: frames and
images share one token id. Checked here, whole and in chunks of 1, 4 and 7 tokens:

* the adapter's ``placeholder_masks`` tell the frames from the image (by the video wrapper), so
  its ``hf_rope_index`` gives transformers' unpruned positions;
* the vLLM side (``media_runs`` from the video's own offset, ``initial_mrope_positions``, then
  ``fill_kept_mrope_positions`` per scheduled window with each media's kept positions) gives
  transformers' unpruned positions gathered at the kept tokens, and the same decode delta.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vs_vllm.models.glm4v import ADAPTER
from vs_vllm.positions import (
    MediaRun,
    fill_kept_mrope_positions,
    initial_mrope_positions,
    kept_media_positions,
    media_runs,
    reference_positions,
)

MERGE = 2
VOCAB = 128
IMAGE_ID, VIDEO_ID = 92, 93  # VIDEO_ID (<|video|>) never reaches a processed prompt
IMAGE_START, IMAGE_END, VIDEO_START, VIDEO_END = 94, 95, 96, 97
IMAGE_GRID = (1, 6, 4)  # 6 tokens
VIDEO_GRID = (3, 4, 6)  # 3 frame runs of 6 tokens


@pytest.fixture(scope="module")
def glm():
    """A tiny random ``Glm4vModel`` (only its config matters for ``get_rope_index``), as the
    adapter's ``hf_rope_index`` sees a model (``.model``, ``.config``)."""
    import transformers

    config = transformers.Glm4vConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 6, 6],
                "partial_rotary_factor": 0.5,
            },
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "spatial_merge_size": MERGE,
            "patch_size": 14,
        },
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        image_start_token_id=IMAGE_START,
        image_end_token_id=IMAGE_END,
        video_start_token_id=VIDEO_START,
        video_end_token_id=VIDEO_END,
    )
    torch.manual_seed(0)
    model = transformers.Glm4vModel(config).eval()
    return SimpleNamespace(model=model, config=config)


def tokens(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return t * h * w // (MERGE * MERGE)


def glm_prompt() -> list[int]:
    """Text, an image, text, a video (per frame: its run, then a timestamp), text."""
    ids = [5, 6, IMAGE_START, *[IMAGE_ID] * tokens(IMAGE_GRID), IMAGE_END, 7, VIDEO_START]
    per_frame = tokens((1, *VIDEO_GRID[1:]))
    for f in range(VIDEO_GRID[0]):
        ids += [IMAGE_START, *[IMAGE_ID] * per_frame, IMAGE_END, 40 + f]
    return [*ids, VIDEO_END, 8, 9]


def test_placeholder_masks_tell_frames_from_the_image(glm) -> None:
    ids = torch.tensor([glm_prompt()])
    is_image, is_video = ADAPTER.placeholder_masks(glm.config, ids)
    assert int(is_image.sum()) == tokens(IMAGE_GRID)
    assert int(is_video.sum()) == tokens(VIDEO_GRID)
    assert not bool((is_image & is_video).any())
    first_video = glm_prompt().index(VIDEO_START)
    assert not bool(is_image[0, first_video:].any()) and not bool(is_video[0, :first_video].any())
    assert ADAPTER.token_ids(glm.config).video == IMAGE_ID  # the frames' own token


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [None, 1, 4, 7], ids=["whole", "chunk1", "chunk4", "chunk7"])
def test_pruned_positions_equal_transformers_gathered(glm, seed: int, chunk: int | None) -> None:
    full = glm_prompt()
    media = {
        "image_grid_thw": torch.tensor([IMAGE_GRID]),
        "video_grid_thw": torch.tensor([VIDEO_GRID]),
    }
    ref = ADAPTER.hf_rope_index(glm, torch.tensor([full]), media)[:, 0]
    with torch.no_grad():
        is_image, is_video = ADAPTER.placeholder_masks(glm.config, torch.tensor([full]))
        types = is_image.long() + 2 * is_video.long()
        plain, _ = glm.model.get_rope_index(
            torch.tensor([full]),
            mm_token_type_ids=types,
            image_grid_thw=media["image_grid_thw"],
            video_grid_thw=media["video_grid_thw"],
        )
    assert torch.equal(ref, plain[:, 0])

    # Kept tokens: per run (the image, then each frame), a random non-empty subset.
    gen = torch.Generator().manual_seed(seed)
    per_frame = tokens((1, *VIDEO_GRID[1:]))
    sizes = [tokens(IMAGE_GRID), *[per_frame] * VIDEO_GRID[0]]
    kept = []
    for n in sizes:
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        kept.append(torch.randperm(n, generator=gen)[:k].sort().values)
    is_placeholder = torch.tensor(full) == IMAGE_ID
    want = reference_positions(ref, is_placeholder, kept)
    want_delta = int(ref.max()) + 1 - want.shape[1]

    # The pruned prompt, and where each media's kept rows go in it.
    run_starts = [i for i, t in enumerate(full) if t == IMAGE_ID and full[i - 1] != IMAGE_ID]
    keep = ~is_placeholder
    for start, idx in zip(run_starts, kept, strict=True):
        keep[start + idx] = True
    pruned = [t for t, k in zip(full, keep.tolist(), strict=True) if k]
    new_index = torch.cumsum(keep.long(), 0) - 1
    image_slots = (new_index[run_starts[0] + kept[0]]).tolist()
    video_slots = torch.cat(
        [new_index[s + idx] for s, idx in zip(run_starts[1:], kept[1:], strict=True)]
    ).tolist()

    # vLLM's side: the runs from each media's placeholder range, then one (4, k) tensor per
    # media (the video's frames at t = 0, each relative to its own run).
    image_offset, video_offset = image_slots[0], pruned.index(VIDEO_START)
    runs = [MediaRun(image_offset, IMAGE_GRID, len(kept[0]))]
    runs += media_runs(
        pruned,
        video_offset,
        VIDEO_GRID,
        MERGE,
        ADAPTER.token_ids(glm.config).video,
        split_frames=True,
        t_factor=0.0,
        k=[len(i) for i in kept[1:]],
    )
    positions, delta = initial_mrope_positions(pruned, runs, MERGE)
    assert delta == want_delta
    video_kept = torch.cat([f * per_frame + idx for f, idx in enumerate(kept[1:])])
    rows = [
        (image_slots, kept_media_positions(IMAGE_GRID, MERGE, kept[0]).T),
        (video_slots, kept_media_positions(VIDEO_GRID, MERGE, video_kept, 0.0).T),
    ]
    step = len(pruned) if chunk is None else chunk
    for start in range(0, len(pruned), step):
        # Per media overlapping the window, its rows whose tokens lie in it (is_embed slices).
        window = []
        for slots, pos in rows:
            cols = [j for j, s in enumerate(slots) if start <= s < start + step]
            if cols:
                window.append(pos[:, cols[0] : cols[-1] + 1])
        positions, delta = fill_kept_mrope_positions(
            pruned, window, positions, start, IMAGE_ID, ADAPTER.token_ids(glm.config).video
        )
    assert torch.equal(positions, want)
    assert delta == want_delta
