"""M-RoPE positions for pruned prompts (vs_vllm.positions) against transformers and vLLM.

The reference is transformers' ``get_rope_index`` on the unpruned prompt, gathered at the
kept tokens. The serving path is ``initial_mrope_positions``, then a recompute fed with
``kept_media_positions``, called once or chunk by chunk exactly as
``GPUModelRunner._gather_mm_embeddings`` does. ``fill_kept_mrope_positions`` must give the
reference everywhere; vLLM's own ``evs.recompute_mrope_positions`` gives it only where
``vllm_locates_media`` says so (elsewhere the case is an expected failure).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from vs_vllm.positions import (
    fill_kept_mrope_positions,
    initial_mrope_positions,
    kept_media_positions,
    media_extent,
    reference_positions,
)

MERGE = 2
PAD_ID = 0
VISION_START_ID = 90
VISION_END_ID = 91
IMAGE_ID = 92
VIDEO_ID = 93
VOCAB = 128

# Text runs (ints) and images (patch grids). One image; a tall and a wide image back to
# back; image-text-image; a tall image then two small ones; a prompt that ends with
# <|vision_end|>; an image right after the first token (<|vision_start|>).
PROMPTS: dict[str, list[int | tuple[int, int, int]]] = {
    "one_image": [4, (1, 6, 8), 5],
    "tall_and_wide": [3, (1, 8, 4), (1, 4, 10), 4],
    "image_text_image": [2, (1, 4, 4), 7, (1, 10, 2), 3],
    "tall_then_text": [1, (1, 12, 2), 6, (1, 2, 2), 1, (1, 2, 6), 2],
    "ends_with_image": [5, (1, 6, 4), 0],
    "starts_with_image": [0, (1, 8, 6), 3],
}


@dataclass
class Prompt:
    """An unpruned prompt and its pruned counterpart for one choice of kept indices."""

    unpruned: list[int]
    grids: list[tuple[int, int, int]]
    kept: list[torch.Tensor]
    pruned: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        it = iter(zip(self.grids, self.kept, strict=True))
        i = 0
        while i < len(self.unpruned):
            if self.unpruned[i] != IMAGE_ID:
                self.pruned.append(self.unpruned[i])
                i += 1
                continue
            grid, kept = next(it)
            self.offsets.append(len(self.pruned))
            self.pruned.extend([IMAGE_ID] * kept.numel())
            i += num_tokens(grid)

    @property
    def media(self) -> list[tuple[int, tuple[int, int, int], int]]:
        return [
            (o, g, k.numel()) for o, g, k in zip(self.offsets, self.grids, self.kept, strict=True)
        ]

    def mm_positions(self) -> list[torch.Tensor]:
        """Per image (4, k): what the model appends to its kept embeddings (transposed)."""
        return [
            kept_media_positions(g, MERGE, k).T for g, k in zip(self.grids, self.kept, strict=True)
        ]


def num_tokens(grid: tuple[int, int, int]) -> int:
    return grid[0] * (grid[1] // MERGE) * (grid[2] // MERGE)


def build_unpruned(
    spec: list[int | tuple[int, int, int]], gen: torch.Generator
) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Text runs (ints) and images (grids) -> token ids; images get vision start/end."""
    ids: list[int] = []
    grids: list[tuple[int, int, int]] = []
    for item in spec:
        if isinstance(item, int):
            ids.extend(torch.randint(1, VISION_START_ID, (item,), generator=gen).tolist())
        else:
            grids.append(item)
            ids.append(VISION_START_ID)
            ids.extend([IMAGE_ID] * num_tokens(item))
            ids.append(VISION_END_ID)
    return ids, grids


def random_kept(n: int, gen: torch.Generator, mode: str) -> torch.Tensor:
    if mode == "all":
        return torch.arange(n)
    if mode == "one":
        return torch.randint(0, n, (1,), generator=gen)
    k = int(torch.randint(1, n + 1, (1,), generator=gen))
    return torch.randperm(n, generator=gen)[:k].sort().values


def make_prompt(spec: list[int | tuple[int, int, int]], seed: int, mode: str) -> Prompt:
    gen = torch.Generator().manual_seed(seed)
    ids, grids = build_unpruned(spec, gen)
    kept = [random_kept(num_tokens(g), gen, mode) for g in grids]
    return Prompt(ids, grids, kept)


def make_hf_model():
    """A tiny random Qwen2_5_VLModel (only its config matters for get_rope_index)."""
    import transformers

    config = transformers.Qwen2_5_VLConfig(
        text_config={
            "vocab_size": VOCAB,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 6, 6],
            },
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "spatial_merge_size": MERGE,
            "fullatt_block_indexes": [0],
        },
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLModel(config).eval()


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model()


def hf_positions(model, prompts: list[list[int]], grids: list[tuple[int, int, int]]):
    """get_rope_index on a left-padded batch -> per-prompt (3, L_i) positions, deltas."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    mm_types = (ids == IMAGE_ID).int() + 2 * (ids == VIDEO_ID).int()
    with torch.no_grad():
        pos, deltas = model.get_rope_index(
            input_ids=ids,
            mm_token_type_ids=mm_types,
            image_grid_thw=torch.tensor(grids, dtype=torch.long) if grids else None,
            attention_mask=mask,
        )
    out = [pos[:, b, width - len(p) :] for b, p in enumerate(prompts)]
    return out, [int(d) for d in deltas.flatten()]


def reference_for(model, prompt: Prompt) -> tuple[torch.Tensor, int]:
    """Reference (3, L_pruned) positions and the decode delta for the pruned prompt."""
    (pos,), (delta_unpruned,) = hf_positions(model, [prompt.unpruned], prompt.grids)
    is_img = torch.tensor(prompt.unpruned) == IMAGE_ID
    ref = reference_positions(pos, is_img, prompt.kept)
    # First generated token: unpruned max + 1 = len(unpruned) + delta_unpruned.
    return ref, len(prompt.unpruned) + delta_unpruned - len(prompt.pruned)


Recompute = Callable[..., tuple[torch.Tensor, int]]


def vllm_recompute() -> Recompute:
    from vllm.multimodal.video_prune import evs

    return partial(
        evs.recompute_mrope_positions,
        vision_start_token_id=VISION_START_ID,
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
    )


def ours_recompute() -> Recompute:
    return partial(fill_kept_mrope_positions, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID)


def windows(total: int, chunk: int | None) -> list[tuple[int, int]]:
    """Scheduled windows (start, num_tokens) of a prefill in chunks of ``chunk`` tokens."""
    step = total if chunk is None else chunk
    return [(start, min(step, total - start)) for start in range(0, total, step)]


def run_prefill(
    prompt: Prompt, recompute: Recompute, chunk: int | None
) -> tuple[torch.Tensor, int]:
    """Initial positions, then recompute once (chunk=None) or per scheduled chunk.

    Mirrors GPUModelRunner._gather_mm_embeddings: for the window [start, start + n) it
    passes, per media overlapping the window (placeholder range [offset, offset + k)), the
    rows [max(start - offset, 0), min(start - offset + n, k)) of that media's positions,
    with num_computed_tokens = start, and writes the result back into the request state.
    """
    positions, delta = initial_mrope_positions(prompt.pruned, prompt.media, MERGE)
    input_ids = torch.tensor(prompt.pruned, dtype=torch.long)
    mm_pos = prompt.mm_positions()
    total = len(prompt.pruned)
    for start, n in windows(total, chunk):
        window = []
        for offset, pos in zip(prompt.offsets, mm_pos, strict=True):
            k = pos.shape[1]
            if offset + k <= start or offset >= start + n:
                continue
            window.append(pos[:, max(start - offset, 0) : min(start - offset + n, k)])
        new_positions, delta = recompute(input_ids, window, positions, start)
        positions.copy_(new_positions)
    # A decode step: the runner calls it again with no media once prefill is done.
    _, delta = recompute(input_ids, [], positions, total)
    return positions, delta


MODES = ["all", "one", "random", "random", "random"]
CASES = [(name, seed, mode) for name in PROMPTS for seed, mode in enumerate(MODES)]


def case_id(case: tuple[str, int, str]) -> str:
    return f"{case[0]}-{case[2]}{case[1]}"


# ----------------------------------------------------------------------------------------
# kept_media_positions / media_extent


@pytest.mark.parametrize("grid", [(1, 8, 4), (1, 4, 10), (1, 6, 6), (3, 4, 6), (1, 2, 2)])
def test_kept_media_positions_match_full_grid(grid: tuple[int, int, int]) -> None:
    t, h, w = grid[0], grid[1] // MERGE, grid[2] // MERGE
    full = torch.stack(
        torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    ).reshape(3, -1)
    kept = torch.tensor([0, t * h * w - 1, (t * h * w) // 2]).unique()
    out = kept_media_positions(grid, MERGE, kept.to(torch.int32))
    assert out.dtype == torch.int64 and out.shape == (kept.numel(), 4)
    assert torch.equal(out[:, :3].T, full[:, kept])
    assert torch.equal(out[:, 3], torch.full_like(kept, max(t, h, w)))


def test_media_extent_is_max_of_merged_grid() -> None:
    assert media_extent((1, 8, 4), MERGE) == 4  # tall: H' = 4 > W' = 2
    assert media_extent((1, 4, 10), MERGE) == 5  # wide
    assert media_extent((1, 28, 28), 2) == 14
    assert media_extent((5, 4, 4), MERGE) == 5  # video with t_factor 1: T dominates
    assert media_extent((5, 4, 4), MERGE, t_factor=2.0) == 9  # last t index 8


def test_kept_media_positions_t_factor() -> None:
    out = kept_media_positions((3, 4, 4), MERGE, torch.arange(12), t_factor=1.5)
    assert out[:, 0].tolist() == [0] * 4 + [1] * 4 + [3] * 4
    assert out[0, 3].item() == 4


def test_kept_media_positions_stays_on_device_without_sync() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kept = torch.tensor([1, 5, 7], device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = kept_media_positions((1, 8, 4), MERGE, kept)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device == kept.device
    assert out.cpu().tolist() == [[0, 0, 1, 4], [0, 2, 1, 4], [0, 3, 1, 4]]


# ----------------------------------------------------------------------------------------
# initial positions and the reference


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_initial_positions_text_and_delta(hf_model, case: tuple[str, int, str]) -> None:
    prompt = make_prompt(PROMPTS[case[0]], case[1], case[2])
    ref, ref_delta = reference_for(hf_model, prompt)
    positions, delta = initial_mrope_positions(prompt.pruned, prompt.media, MERGE)
    assert positions.shape == (3, len(prompt.pruned)) and positions.dtype == torch.int64
    is_text = torch.tensor(prompt.pruned) != IMAGE_ID
    assert torch.equal(positions[:, is_text], ref[:, is_text])
    assert delta == ref_delta
    assert positions.max().item() + 1 - len(prompt.pruned) <= delta


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("chunk", [None, 1, 3, 5], ids=["whole", "chunk1", "chunk3", "chunk5"])
def test_fill_kept_positions_gives_reference(
    hf_model, case: tuple[str, int, str], chunk: int | None
) -> None:
    prompt = make_prompt(PROMPTS[case[0]], case[1], case[2])
    ref, ref_delta = reference_for(hf_model, prompt)
    positions, delta = run_prefill(prompt, ours_recompute(), chunk)
    assert torch.equal(positions, ref)
    assert delta == ref_delta


@pytest.mark.parametrize("name", ["tall_and_wide", "tall_then_text"])
def test_fill_kept_positions_after_prefix_cache_hit(hf_model, name: str) -> None:
    """Prefill that starts at any num_computed_tokens (earlier tokens never recomputed)."""
    prompt = make_prompt(PROMPTS[name], seed=7, mode="random")
    ref, ref_delta = reference_for(hf_model, prompt)
    input_ids = torch.tensor(prompt.pruned)
    mm_pos = prompt.mm_positions()
    for start in range(len(prompt.pruned)):
        positions, _ = initial_mrope_positions(prompt.pruned, prompt.media, MERGE)
        window = [
            pos[:, max(start - offset, 0) :]
            for offset, pos in zip(prompt.offsets, mm_pos, strict=True)
            if offset + pos.shape[1] > start
        ]
        positions, delta = fill_kept_mrope_positions(
            input_ids, window, positions, start, IMAGE_ID, VIDEO_ID
        )
        assert torch.equal(positions[:, start:], ref[:, start:])
        assert delta == ref_delta


def vllm_locates_media(prompt: Prompt, chunk: int | None) -> bool:
    """Whether vLLM's recompute_mrope_positions finds the right media for every call.

    For each (4, n) block it is handed, vLLM looks for the media's <|vision_start|> using
    ``nc`` = num_computed_tokens + the lengths of the blocks before it in the same call
    (kept tokens only, not the text between media) and the media tokens seen before the
    window (not updated inside the call). Derived from its code, it gets media j right iff

    * media j began before the window (the tail of a split media, first block): always;
    * else, for j = 0: ``nc <= vision_start_0`` (the window holds the first vision_start);
    * else: ``vision_start_{j-1} < nc <= vision_start_j`` and media j-1 also begins inside
      this window (otherwise it treats media j as the continuation of media j-1).
    """
    starts = [o - 1 for o in prompt.offsets]  # vision_start indices in the pruned prompt
    sizes = [k.numel() for k in prompt.kept]
    for start, n in windows(len(prompt.pruned), chunk):
        nc = start
        for j, (offset, k) in enumerate(zip(prompt.offsets, sizes, strict=True)):
            if offset + k <= start or offset >= start + n:
                continue
            if offset >= start:
                if j == 0:
                    ok = nc <= starts[0]
                else:
                    ok = starts[j - 1] < nc <= starts[j] and prompt.offsets[j - 1] >= start
                if not ok:
                    return False
            nc += min(start + n, offset + k) - max(start, offset)
    return True


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("chunk", [None, 3, 5], ids=["whole", "chunk3", "chunk5"])
def test_vllm_path_gives_reference(hf_model, case: tuple[str, int, str], chunk: int | None) -> None:
    prompt = make_prompt(PROMPTS[case[0]], case[1], case[2])
    ref, ref_delta = reference_for(hf_model, prompt)
    try:
        positions, delta = run_prefill(prompt, vllm_recompute(), chunk)
        ok = torch.equal(positions, ref)
    except IndexError:  # "next vision_start" lookup past the last one
        ok = False
    if not vllm_locates_media(prompt, chunk):
        assert not ok, "vLLM got a case right that vllm_locates_media says it gets wrong"
        pytest.xfail("vLLM's recompute_mrope_positions places a media at the wrong start")
    assert ok
    assert delta == ref_delta


def test_vllm_recompute_known_failure_chunk_after_vision_start(hf_model) -> None:
    """A chunk that ends right at <|vision_start|>: vLLM looks for the *next* vision_start."""
    gen = torch.Generator().manual_seed(0)
    ids, grids = build_unpruned([3, (1, 4, 4), 6, (1, 4, 4), 2], gen)
    prompt = Prompt(ids, grids, [torch.tensor([1, 3]), torch.tensor([2])])
    vllm = vllm_recompute()
    ref, _ = reference_for(hf_model, prompt)
    positions, _ = initial_mrope_positions(prompt.pruned, prompt.media, MERGE)
    input_ids = torch.tensor(prompt.pruned)
    first, second = prompt.mm_positions()
    cut = prompt.offsets[0]  # chunk 1 = [0, cut) ends with the first vision_start
    positions, _ = vllm(input_ids, [], positions, 0)
    positions, _ = vllm(input_ids, [first, second], positions, cut)
    assert not torch.equal(positions, ref)
    ours = ours_recompute()
    fixed, _ = initial_mrope_positions(prompt.pruned, prompt.media, MERGE)
    fixed, _ = ours(input_ids, [], fixed, 0)
    fixed, _ = ours(input_ids, [first, second], fixed, cut)
    assert torch.equal(fixed, ref)


def test_vllm_recompute_known_failure_small_k_whole_prompt(hf_model) -> None:
    """One call with all media: vLLM finds media j's vision_start from the sum of the kept
    counts before it, so with few kept tokens and text before the first image it places
    the second image right after the *first* <|vision_start|>."""
    gen = torch.Generator().manual_seed(0)
    ids, grids = build_unpruned([8, (1, 4, 4), 3, (1, 4, 6), 2], gen)
    prompt = Prompt(ids, grids, [torch.tensor([2]), torch.tensor([0, 4])])
    assert not vllm_locates_media(prompt, None)
    ref, ref_delta = reference_for(hf_model, prompt)
    positions, delta = run_prefill(prompt, vllm_recompute(), None)
    assert not torch.equal(positions, ref)
    positions, delta = run_prefill(prompt, ours_recompute(), None)
    assert torch.equal(positions, ref) and delta == ref_delta


def test_vllm_recompute_whole_prompt_with_stock_channel_fails_for_tall_image(hf_model) -> None:
    """Stock c = W' puts the text after a tall image too early (overlapping the image)."""
    prompt = make_prompt([2, (1, 8, 4), 3], seed=0, mode="all")
    ref, _ = reference_for(hf_model, prompt)
    positions, _ = initial_mrope_positions(prompt.pruned, prompt.media, MERGE)
    (mm,) = prompt.mm_positions()
    stock = mm.clone()
    stock[3] = 4 // MERGE  # W' = 2, as compute_mrope_for_media does
    out, _ = vllm_recompute()(torch.tensor(prompt.pruned), [stock], positions, 0)
    assert not torch.equal(out, ref)
    out, _ = vllm_recompute()(torch.tensor(prompt.pruned), [mm], positions, 0)
    assert torch.equal(out, ref)


def test_batch_of_two_prompts(hf_model) -> None:
    """Left-padded batch through get_rope_index (attention_mask) gives the same reference."""
    a = make_prompt(PROMPTS["tall_and_wide"], seed=11, mode="random")
    b = make_prompt(PROMPTS["one_image"], seed=12, mode="one")
    (pa, pb), (da, db) = hf_positions(hf_model, [a.unpruned, b.unpruned], a.grids + b.grids)
    for prompt, pos, d in ((a, pa, da), (b, pb, db)):
        is_img = torch.tensor(prompt.unpruned) == IMAGE_ID
        ref = reference_positions(pos, is_img, prompt.kept)
        single, single_delta = reference_for(hf_model, prompt)
        assert torch.equal(ref, single)
        assert len(prompt.unpruned) + d - len(prompt.pruned) == single_delta
        recomputes = [ours_recompute()]
        if vllm_locates_media(prompt, None):
            recomputes.append(vllm_recompute())
        for recompute in recomputes:
            positions, delta = run_prefill(prompt, recompute, None)
            assert torch.equal(positions, ref)
            assert delta == single_delta


# ----------------------------------------------------------------------------------------
# k = N: identical to stock vLLM


def stock_vllm_positions(
    tokens: list[int], features: list[tuple[str, int, tuple[int, int, int], float]], config
) -> tuple[torch.Tensor, int]:
    """vLLM's Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions, called unbound
    with a stand-in ``self``; ``features`` = [(modality, offset, grid_thw, second_per_grid)].
    """
    from vllm.model_executor.models import qwen2_5_vl as qwen

    cls = qwen.Qwen2_5_VLForConditionalGeneration
    stand_in = SimpleNamespace(config=config)
    stand_in.iter_mm_grid_thw = partial(cls.iter_mm_grid_thw, stand_in)
    specs = []
    for modality, offset, grid, seconds in features:
        data = {f"{modality}_grid_thw": SimpleNamespace(data=torch.tensor(grid))}
        if modality == "video":
            data["second_per_grid_ts"] = SimpleNamespace(data=torch.tensor(seconds))
        specs.append(
            SimpleNamespace(
                modality=modality,
                mm_position=SimpleNamespace(offset=offset, length=num_tokens(grid)),
                data=data,
            )
        )
    positions, delta = cls.get_mrope_input_positions(stand_in, tokens, specs)
    return positions.long(), delta


@pytest.mark.parametrize("name", list(PROMPTS))
def test_full_keep_equals_stock_vllm(hf_model, name: str) -> None:
    prompt = make_prompt(PROMPTS[name], seed=3, mode="all")
    assert prompt.pruned == prompt.unpruned
    features = [("image", o, g, 1.0) for o, g in zip(prompt.offsets, prompt.grids, strict=True)]
    stock, stock_delta = stock_vllm_positions(prompt.pruned, features, hf_model.config)
    ref, ref_delta = reference_for(hf_model, prompt)
    assert torch.equal(stock, ref) and stock_delta == ref_delta
    initial, delta = initial_mrope_positions(prompt.pruned, prompt.media, MERGE)
    assert torch.equal(initial, stock) and delta == stock_delta
    for chunk in (None, 3, 5):
        positions, delta = run_prefill(prompt, ours_recompute(), chunk)
        assert torch.equal(positions, stock) and delta == stock_delta


@pytest.mark.parametrize("seconds", [0.5, 0.25, 0.3])
def test_video_follows_stock_vllm(hf_model, seconds: float) -> None:
    """Videos (t > 1, t_factor = second_per_grid * tokens_per_second) at k = N equal stock
    vLLM, and pruned videos equal its positions gathered at the kept tokens."""
    tps = hf_model.config.vision_config.tokens_per_second
    t_factor = seconds * tps
    video, image = (3, 4, 6), (1, 8, 4)
    n_video, n_image = num_tokens(video), num_tokens(image)
    ids = [5, 6, 7, VISION_START_ID] + [VIDEO_ID] * n_video + [VISION_END_ID, 8]
    ids += [VISION_START_ID] + [IMAGE_ID] * n_image + [VISION_END_ID, 9]
    offsets = [4, 4 + n_video + 3]
    features = [("video", offsets[0], video, seconds), ("image", offsets[1], image, 1.0)]
    stock, stock_delta = stock_vllm_positions(ids, features, hf_model.config)
    media = [(offsets[0], video, n_video), (offsets[1], image, n_image)]
    initial, delta = initial_mrope_positions(ids, media, MERGE, t_factors=[t_factor, 1.0])
    assert torch.equal(initial, stock) and delta == stock_delta

    kept = [torch.tensor([0, 5, 6, 13, 17]), torch.tensor([3, 4])]
    pruned = ids[:4] + [VIDEO_ID] * 5 + ids[4 + n_video : offsets[1]] + [IMAGE_ID] * 2 + ids[-2:]
    media = [(4, video, 5), (4 + 5 + 3, image, 2)]
    positions, delta = initial_mrope_positions(pruned, media, MERGE, t_factors=[t_factor, 1.0])
    assert delta == stock_delta + len(ids) - len(pruned)
    mm_pos = [
        kept_media_positions(video, MERGE, kept[0], t_factor).T,
        kept_media_positions(image, MERGE, kept[1]).T,
    ]
    positions, delta = fill_kept_mrope_positions(pruned, mm_pos, positions, 0, IMAGE_ID, VIDEO_ID)
    is_media = (torch.tensor(ids) == IMAGE_ID) | (torch.tensor(ids) == VIDEO_ID)
    assert torch.equal(positions, reference_positions(stock, is_media, kept))
    assert delta == stock_delta + len(ids) - len(pruned)


# ----------------------------------------------------------------------------------------
# validation


def test_reference_positions_rejects_mismatch() -> None:
    pos = torch.arange(6).expand(3, -1)
    is_img = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool)
    with pytest.raises(ValueError):
        reference_positions(pos, is_img, [torch.tensor([0])])
    with pytest.raises(ValueError):
        reference_positions(pos, is_img, [torch.tensor([2]), torch.tensor([0])])
    out = reference_positions(pos, is_img, [torch.tensor([1]), torch.tensor([0])])
    assert out[0].tolist() == [0, 2, 3, 4, 5]


def test_initial_positions_validation() -> None:
    with pytest.raises(ValueError):
        initial_mrope_positions([0] * 10, [(1, (1, 4, 4), 5)], MERGE)  # k > N
    with pytest.raises(ValueError):
        initial_mrope_positions([0] * 10, [(1, (1, 4, 4), 0)], MERGE)  # k = 0
    with pytest.raises(ValueError):
        initial_mrope_positions([0] * 10, [(8, (1, 4, 4), 3)], MERGE)  # past the end
    with pytest.raises(ValueError):
        initial_mrope_positions([0] * 10, [(1, (1, 3, 4), 1)], MERGE)  # not divisible
    with pytest.raises(ValueError):
        initial_mrope_positions([0] * 10, [(4, (1, 4, 4), 2), (2, (1, 4, 4), 1)], MERGE)
    positions, delta = initial_mrope_positions([0] * 4, [], MERGE)
    assert positions[0].tolist() == [0, 1, 2, 3] and delta == 0


# ----------------------------------------------------------------------------------------
# Qwen3-VL: the same image layout (against transformers' own Qwen3-VL get_rope_index), and
# videos as one run per frame separated by timestamp text.


def make_qwen3_vl_model():
    """A tiny random Qwen3VLModel (only its config matters for get_rope_index)."""
    import transformers

    config = transformers.Qwen3VLConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 6, 6],
                "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "spatial_merge_size": MERGE,
            "patch_size": 16,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 1],
        },
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    torch.manual_seed(0)
    return transformers.Qwen3VLModel(config).eval()


@pytest.fixture(scope="module")
def qwen3_vl_model():
    return make_qwen3_vl_model()


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("chunk", [None, 1, 5], ids=["whole", "chunk1", "chunk5"])
def test_qwen3_vl_fill_kept_positions_gives_reference(
    qwen3_vl_model, case: tuple[str, int, str], chunk: int | None
) -> None:
    """Kept images keep transformers' Qwen3-VL unpruned positions; text continues from the
    unpruned timeline (one image, two sizes, image-text-image, chunked prefill)."""
    prompt = make_prompt(PROMPTS[case[0]], case[1], case[2])
    ref, ref_delta = reference_for(qwen3_vl_model, prompt)
    positions, delta = run_prefill(prompt, ours_recompute(), chunk)
    assert torch.equal(positions, ref)
    assert delta == ref_delta


def qwen3_video_prompt(
    grid: tuple[int, int, int], frames_kept: int | None = None
) -> tuple[list[int], list[int]]:
    """Text, then a Qwen3-VL video (per frame: timestamp text, vision start, the frame's
    tokens, vision end), then an image and text. Returns ids and the video's offset."""
    per_frame = (grid[1] // MERGE) * (grid[2] // MERGE)
    ids = [5, 6, 7]
    offset = len(ids)
    for f in range(grid[0]):
        ids += [40 + f, 41, VISION_START_ID] + [VIDEO_ID] * per_frame + [VISION_END_ID]
    ids += [8, VISION_START_ID] + [IMAGE_ID] * num_tokens((1, 4, 6)) + [VISION_END_ID, 9]
    return ids, [offset]


@pytest.mark.parametrize("chunk", [None, 1, 4, 7])
def test_qwen3_vl_video_frames_follow_transformers(qwen3_vl_model, chunk: int | None) -> None:
    """A Qwen3-VL video is split into one run per frame (``media_runs``); with every token
    kept the initial positions equal transformers' get_rope_index, and the frame-run
    recompute (frames at t = 0, one run after another) keeps them, chunk by chunk."""
    from vs_vllm.positions import media_runs

    video, image = (3, 4, 4), (1, 4, 6)
    ids, (offset,) = qwen3_video_prompt(video)
    t = torch.tensor([ids])
    mm_types = (t == IMAGE_ID).int() + 2 * (t == VIDEO_ID).int()
    with torch.no_grad():
        ref, ref_delta = qwen3_vl_model.get_rope_index(
            input_ids=t,
            mm_token_type_ids=mm_types,
            image_grid_thw=torch.tensor([image]),
            video_grid_thw=torch.tensor([video]),
        )
    ref = ref[:, 0]
    runs = media_runs(ids, offset, video, MERGE, VIDEO_ID, split_frames=True)
    assert [r.k for r in runs] == [4, 4, 4] and all(r.grid_thw == (1, 4, 4) for r in runs)
    image_offset = ids.index(IMAGE_ID)
    runs.append((image_offset, image, num_tokens(image)))
    positions, delta = initial_mrope_positions(ids, runs, MERGE)
    assert torch.equal(positions, ref) and delta == int(ref_delta)

    # The model hands back one (4, N) tensor per video (t_factor 0: every frame at t = 0).
    video_pos = kept_media_positions(video, MERGE, torch.arange(num_tokens(video)), 0.0).T
    image_pos = kept_media_positions(image, MERGE, torch.arange(num_tokens(image))).T
    media = [(offset, video_pos), (image_offset, image_pos)]
    is_media = (torch.tensor(ids) == IMAGE_ID) | (torch.tensor(ids) == VIDEO_ID)
    media_index = torch.cumsum(is_media.long(), 0) - 1  # running count of media tokens
    video_tokens = num_tokens(video)
    total = len(ids)
    for start, n in windows(total, chunk):
        window = []
        # Media tokens of the window, split by media, as the runner's is_embed slices do.
        in_window = is_media[start : start + n]
        if in_window.any():
            first = int(media_index[start : start + n][in_window][0])
            last = int(media_index[start : start + n][in_window][-1]) + 1
            for lo, hi, (_, pos) in ((0, video_tokens, media[0]), (video_tokens, None, media[1])):
                hi = pos.shape[1] + lo if hi is None else hi
                a, b = max(first, lo), min(last, hi)
                if a < b:
                    window.append(pos[:, a - lo : b - lo])
        positions, delta = fill_kept_mrope_positions(
            ids, window, positions, start, IMAGE_ID, VIDEO_ID
        )
    assert torch.equal(positions, ref) and delta == int(ref_delta)


def test_media_runs_refuses_a_short_frame() -> None:
    from vs_vllm.positions import media_runs

    ids, (offset,) = qwen3_video_prompt((2, 4, 4))
    ids = ids[: ids.index(VIDEO_ID) + 2] + ids[ids.index(VIDEO_ID) + 4 :]  # frame 0: 2 tokens
    with pytest.raises(ValueError, match="frame 0"):
        media_runs(ids, offset, (2, 4, 4), MERGE, VIDEO_ID, split_frames=True)


# ----------------------------------------------------------------------------------------
# Pruned videos (Qwen2.5-VL layout: one run, temporal index scaled) against transformers


def hf_video_reference(model, ids: list[int], images, videos, seconds, kept_per_media):
    """transformers' get_rope_index on the unpruned prompt, gathered at the kept tokens."""
    t = torch.tensor([ids])
    mm_types = (t == IMAGE_ID).int() + 2 * (t == VIDEO_ID).int()
    with torch.no_grad():
        pos, delta = model.get_rope_index(
            input_ids=t,
            mm_token_type_ids=mm_types,
            image_grid_thw=torch.tensor(images) if images else None,
            video_grid_thw=torch.tensor(videos),
            second_per_grid_ts=torch.tensor(seconds, dtype=torch.float),
        )
    is_media = (t[0] == IMAGE_ID) | (t[0] == VIDEO_ID)
    return reference_positions(pos[:, 0], is_media, kept_per_media), int(delta)


# (layout, seconds per grid step): one video; an image then a video; two videos of different
# lengths. Grids keep int((T - 1) * t_factor) < max(H', W'), where transformers 5.x and vLLM
# agree on where the text after a video continues (see the module docstring of positions.py).
VIDEO_CASES = {
    "one_video": ([3, ("video", (4, 8, 12)), 4], [0.25]),
    "image_then_video": ([2, ("image", (1, 6, 8)), 3, ("video", (2, 8, 8)), 2], [0.5]),
    "two_videos": ([2, ("video", (6, 8, 12)), 3, ("video", (2, 12, 8)), 2], [0.25, 1.0]),
}


@pytest.mark.parametrize("chunk", [None, 3, 7], ids=["whole", "chunk3", "chunk7"])
@pytest.mark.parametrize("name", list(VIDEO_CASES))
def test_pruned_video_positions_equal_transformers(hf_model, name: str, chunk: int | None):
    from vs_vllm.positions import MediaRun

    spec, seconds = VIDEO_CASES[name]
    tps = hf_model.config.vision_config.tokens_per_second
    gen = torch.Generator().manual_seed(len(name))
    unpruned, pruned, runs, kept, mm_pos = [], [], [], [], []
    images, videos = [], []
    v = 0
    for item in spec:
        if isinstance(item, int):
            text = torch.randint(1, VISION_START_ID, (item,), generator=gen).tolist()
            unpruned += text
            pruned += text
            continue
        kind, grid = item
        n = num_tokens(grid)
        k = max(1, n // 4)
        idx = torch.randperm(n, generator=gen)[:k].sort().values
        token = IMAGE_ID if kind == "image" else VIDEO_ID
        t_factor = 1.0 if kind == "image" else seconds[v] * tps
        (images if kind == "image" else videos).append(grid)
        v += kind == "video"
        for ids in (unpruned, pruned):
            ids.append(VISION_START_ID)
        unpruned += [token] * n
        runs.append(MediaRun(len(pruned), grid, k, t_factor))
        pruned += [token] * k
        for ids in (unpruned, pruned):
            ids.append(VISION_END_ID)
        kept.append(idx)
        mm_pos.append(kept_media_positions(grid, MERGE, idx, t_factor).T)
    ref, ref_delta = hf_video_reference(hf_model, unpruned, images, videos, seconds, kept)
    positions, delta = initial_mrope_positions(pruned, runs, MERGE)
    total = len(pruned)
    for start, n in windows(total, chunk):
        window = []
        for run, pos in zip(runs, mm_pos, strict=True):
            if run.offset + run.k <= start or run.offset >= start + n:
                continue
            window.append(pos[:, max(start - run.offset, 0) : min(start - run.offset + n, run.k)])
        positions, delta = fill_kept_mrope_positions(
            pruned, window, positions, start, IMAGE_ID, VIDEO_ID
        )
    assert torch.equal(positions, ref), f"{name} chunk {chunk}"
    assert total + delta == len(unpruned) + ref_delta
