"""M-RoPE (t, h, w) positions for pruned prompts (families whose adapter sets ``uses_mrope``).

Reference semantics (VisionSelector): positions are computed by transformers'
``get_rope_index`` on the *unpruned* prompt (N placeholder tokens per image) and then
gathered at the kept tokens. Every kept visual token keeps its own (t, h, w) position,
text tokens keep the positions they had without pruning (with gaps), and decoding
continues at (max position of the unpruned prompt) + 1.

In vLLM the prompt holds only k_i placeholders for image i, so the positions are built in
two steps:

1. :func:`initial_mrope_positions` (prompt-processing time, host): a ``(3, L)`` array for
   the *pruned* prompt whose text positions already equal the reference and whose visual
   positions are placeholders, plus the decode delta.
2. The model appends :func:`kept_media_positions` (``[t, h, w, c]`` relative to the media
   start) to each image's kept embeddings; at prefill time the runner hands these to the
   model's ``recompute_mrope_positions``, which should call
   :func:`fill_kept_mrope_positions`: it writes ``base + [t, h, w]`` at the kept tokens
   (``base`` = position of the token before the media + 1). vLLM's own
   ``vllm.multimodal.video_prune.evs.recompute_mrope_positions`` misplaces media with
   several images and small k even in a single call, and at many chunked-prefill
   boundaries (details in :func:`fill_kept_mrope_positions`).

The channel ``c`` is ``max(int((T - 1) * t_factor), H' - 1, W' - 1) + 1`` for a merged grid
(T, H', W'): the text after the media continues at ``base + c``. For an image (T = 1) that is
``max(H', W')``; vLLM's stock ``compute_mrope_for_media`` uses ``W'``, which is wrong
whenever the merged grid is taller than wide.

Videos: positions follow vLLM's ``get_mrope_input_positions`` convention (temporal index
scaled by ``t_factor`` and truncated; text after the video continues at the maximum
position + 1). transformers 5.x ``get_rope_index`` advances by ``max(H', W')`` only, which
differs when ``int((T - 1) * t_factor) >= max(H', W')``; only images are checked against
transformers.

A *media run* is one run of consecutive placeholder tokens laid out as a grid: an image, a
video laid out as one run (the adapter's ``video_layout="one_run"``), or one frame of a video
laid out as frame runs (``video_layout="frame_runs"``: its frames are separated by timestamp
text; :func:`media_runs` splits such a video). Everything here works run by run, so the
families differ only in how their media split into runs (their adapter's ``video_layout``).

Everything here is torch only (no vLLM import).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "MediaRun",
    "fill_kept_mrope_positions",
    "initial_mrope_positions",
    "kept_media_positions",
    "media_extent",
    "media_runs",
    "merged_grid",
    "reference_positions",
    "token_runs",
]

GridTHW = tuple[int, int, int]


class MediaRun(NamedTuple):
    """One run of placeholders: first token ``offset`` in the (pruned) prompt, patch grid,
    ``k`` placeholders (kept tokens), temporal scale (1.0 for images)."""

    offset: int
    grid_thw: GridTHW
    k: int
    t_factor: float = 1.0


def merged_grid(grid_thw: Sequence[int], merge_size: int) -> GridTHW:
    """The LLM-side grid (T, H // merge, W // merge) of a patch grid (T, H, W)."""
    if len(grid_thw) != 3:
        raise ValueError(f"grid_thw must be (t, h, w), got {grid_thw!r}")
    t, h, w = (int(x) for x in grid_thw)
    if merge_size < 1:
        raise ValueError(f"merge_size must be >= 1, got {merge_size}")
    if t < 1 or h < 1 or w < 1 or h % merge_size or w % merge_size:
        raise ValueError(f"grid_thw {grid_thw!r} is not a positive grid divisible by {merge_size}")
    return t, h // merge_size, w // merge_size


def media_extent(grid_thw: Sequence[int], merge_size: int, t_factor: float = 1.0) -> int:
    """``c``: the unpruned media's largest relative position + 1.

    Text after the media starts at ``base + c`` (``base`` = position of the first media
    token), exactly as ``get_rope_index`` / vLLM's ``get_mrope_input_positions`` continue
    at ``max(media positions) + 1``. For an image this is ``max(H', W')``.
    """
    t, gh, gw = merged_grid(grid_thw, merge_size)
    t_last = int((t - 1) * t_factor) if t_factor != 1.0 else t - 1
    return max(t_last, gh - 1, gw - 1) + 1


def kept_media_positions(
    grid_thw: tuple[int, int, int],
    merge_size: int,
    kept: torch.Tensor,
    t_factor: float = 1.0,
) -> torch.Tensor:
    """``(k, 4)`` int64 ``[t, h, w, c]`` for the kept tokens of one image or video.

    Args:
        grid_thw: patch grid (T, H, W) of the media (host ints); merged grid is
            (T, H // merge_size, W // merge_size).
        merge_size: spatial merge size (the adapter's ``merge_size``, e.g. 2).
        kept: 1-D tensor of kept local token indices in raster order (ascending, on any
            device, any integer dtype). Not range-checked (that would need a host sync).
        t_factor: temporal scale (``second_per_grid_t * tokens_per_second`` for videos);
            1.0 for images.

    Returns:
        ``(k, 4)`` int64 tensor on ``kept.device``: the (t, h, w) position of each kept
        token relative to the media start, and ``c`` = :func:`media_extent` repeated, such
        that the text after the media continues at ``base + c`` as for the unpruned media.
        Pure device arithmetic; no host-device synchronisation.
    """
    if kept.dim() != 1:
        raise ValueError(f"kept must be 1-D, got shape {tuple(kept.shape)}")
    _, gh, gw = merged_grid(grid_thw, merge_size)
    extent = media_extent(grid_thw, merge_size, t_factor)
    idx = kept.to(torch.int64)
    hw = gh * gw
    t_idx = torch.div(idx, hw, rounding_mode="floor")
    rem = idx - t_idx * hw
    h_idx = torch.div(rem, gw, rounding_mode="floor")
    w_idx = rem - h_idx * gw
    if t_factor != 1.0:
        t_idx = (t_idx.to(torch.float64) * t_factor).to(torch.int64)
    c = torch.full_like(idx, extent)
    return torch.stack([t_idx, h_idx, w_idx, c], dim=1)


def media_runs(
    input_tokens: Sequence[int],
    offset: int,
    grid_thw: Sequence[int],
    merge_size: int,
    token_id: int,
    *,
    split_frames: bool,
    t_factor: float = 1.0,
    k: int | Sequence[int] | None = None,
) -> list[MediaRun]:
    """The runs of one unpruned media whose placeholder range starts at ``offset``.

    ``split_frames=False``: the media is one run of all its tokens at ``offset``
    (an image, or a video of ``video_layout="one_run"``), of ``k`` placeholders when the media
    is pruned (default: all its tokens).
    ``True``: each of its T frames is a run of ``token_id`` tokens (``k[f]`` of them when
    pruned per frame) with grid (1, H, W), found in ``input_tokens`` from ``offset`` on
    (a video of ``video_layout="frame_runs"``: frames are separated by their timestamp text),
    each laid out like an image.
    """
    t, h, w = merged_grid(grid_thw, merge_size)
    patch_grid = tuple(int(v) for v in grid_thw)
    if not split_frames:
        if k is not None and not isinstance(k, int):
            raise ValueError("a media laid out as one run takes one k")
        count = t * h * w if k is None else k
        return [MediaRun(offset, patch_grid, count, t_factor)]  # type: ignore[arg-type]
    if k is None:
        counts = [h * w] * t
    elif isinstance(k, int) or len(k) != t:
        raise ValueError(f"a video of {t} frame runs needs {t} per-frame counts, got {k!r}")
    else:
        counts = [int(c) for c in k]
    runs: list[MediaRun] = []
    i, total = offset, len(input_tokens)
    for want in counts:
        while i < total and input_tokens[i] != token_id:
            i += 1
        start = i
        while i < total and input_tokens[i] == token_id and i - start < want:
            i += 1
        if i - start != want:
            raise ValueError(
                f"a video of {t} frames at {offset}: frame {len(runs)} has {i - start} "
                f"placeholder tokens, expected {want}"
            )
        runs.append(MediaRun(start, (1, *patch_grid[1:]), want, 1.0))  # type: ignore[arg-type]
    return runs


def initial_mrope_positions(
    input_tokens: Sequence[int] | torch.Tensor,
    media: Sequence[MediaRun | tuple],
    merge_size: int,
    t_factors: Sequence[float] | None = None,
) -> tuple[torch.Tensor, int]:
    """Positions for a *pruned* prompt before the kept indices are known.

    Args:
        input_tokens: the pruned prompt (only its length is used), length L.
        media: ``[(offset, grid_thw, k)]`` sorted by offset: ``offset`` is the index of the
            media's first placeholder token in the pruned prompt, ``grid_thw`` the patch
            grid, ``k`` the number of placeholders (kept tokens), 1 <= k <= N.
        merge_size: spatial merge size.
        t_factors: optional temporal scale per media (videos); 1.0 when omitted.

    Returns:
        ``((3, L) int64, delta)``. Text positions equal the reference (unpruned positions,
        gaps included); the k visual positions of each media are placeholders (its first k
        raster positions), to be overwritten by the recompute step. ``delta`` =
        (max position of the unpruned prompt) + 1 - L, so the first generated token gets
        position L + delta.
    """
    total = len(input_tokens)
    runs = [MediaRun(*m) for m in media]
    if t_factors is None:
        t_factors = [run.t_factor for run in runs]
    if len(t_factors) != len(runs):
        raise ValueError("t_factors must have one entry per media")
    pieces: list[torch.Tensor] = []
    st = 0  # next token index in the pruned prompt
    cur = 0  # next free position (reference `current_pos`)
    for (offset, grid_thw, k, _), t_factor in zip(runs, t_factors, strict=True):
        t, gh, gw = merged_grid(grid_thw, merge_size)
        n = t * gh * gw
        if offset < st:
            raise ValueError(f"media offsets must be sorted and non-overlapping, got {offset}")
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}] for grid {grid_thw!r}, got {k}")
        if offset + k > total:
            raise ValueError(f"media at {offset} with k={k} runs past the prompt (L={total})")
        text_len = offset - st
        pieces.append(torch.arange(text_len, dtype=torch.int64).expand(3, -1) + cur)
        cur += text_len
        placeholder = kept_media_positions(
            grid_thw, merge_size, torch.arange(k, dtype=torch.int64), t_factor
        )
        pieces.append(placeholder[:, :3].T + cur)
        cur += media_extent(grid_thw, merge_size, t_factor)
        st = offset + k
    pieces.append(torch.arange(total - st, dtype=torch.int64).expand(3, -1) + cur)
    cur += total - st
    positions = torch.cat(pieces, dim=1).contiguous()
    # `cur` is the unpruned maximum + 1: text advances by 1 per token and a media by c.
    return positions, cur - total


def token_runs(mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """Starts and ends ([start, end)) of the runs of True in a 1-D bool tensor (copied to the
    host): the placeholder runs of a prompt. The one run finder of vs-vllm."""
    mask = mask.to(torch.bool).cpu()  # ok-sync: host tensor on every caller's path
    pad = torch.zeros(1, dtype=torch.bool)
    first = mask & ~torch.cat([pad, mask[:-1]])
    last = mask & ~torch.cat([mask[1:], pad])
    starts = torch.nonzero(first).flatten().tolist()  # ok-sync: host tensor
    ends = (torch.nonzero(last).flatten() + 1).tolist()  # ok-sync: host tensor
    return starts, ends


def reference_positions(
    unpruned_positions: torch.Tensor,
    unpruned_is_image: torch.Tensor,
    kept_per_image: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Gather unpruned positions ``(3, L_unpruned)`` at the tokens a pruned prompt keeps.

    Text tokens are all kept; the i-th run of consecutive image tokens in
    ``unpruned_is_image`` keeps only the local indices ``kept_per_image[i]``. Images must be
    separated by at least one non-image token (the media end and start tokens of the chat
    template always are). Returns ``(3, L_pruned)``.
    """
    if unpruned_positions.dim() != 2 or unpruned_positions.shape[0] != 3:
        raise ValueError(f"expected (3, L) positions, got {tuple(unpruned_positions.shape)}")
    is_img = unpruned_is_image.to(torch.bool).cpu()  # ok-sync: test / HF reference helper
    if is_img.shape != (unpruned_positions.shape[1],):
        raise ValueError("unpruned_is_image must have one entry per token")
    starts, ends = token_runs(is_img)
    if len(starts) != len(kept_per_image):
        raise ValueError(f"{len(starts)} image runs but {len(kept_per_image)} kept index sets")
    keep = ~is_img
    for start, end, kept in zip(starts, ends, kept_per_image, strict=True):
        kept_cpu = kept.to(torch.int64).cpu()  # ok-sync: test / HF reference helper
        if kept_cpu.numel() and (kept_cpu.min() < 0 or kept_cpu.max() >= end - start):
            raise ValueError(f"kept indices out of range for an image of {end - start} tokens")
        keep[start + kept_cpu] = True
    return unpruned_positions[:, keep.to(unpruned_positions.device)]


def fill_kept_mrope_positions(
    input_ids: Sequence[int] | torch.Tensor,
    multimodal_positions: Sequence[torch.Tensor],
    mrope_positions: torch.Tensor,
    num_computed_tokens: int,
    image_token_id: int,
    video_token_id: int,
) -> tuple[torch.Tensor, int]:
    """Chunk-safe replacement for vLLM's ``recompute_mrope_positions`` (4-channel form).

    Same call contract as vLLM's runner uses: ``multimodal_positions`` holds, in prompt
    order, one ``(4, n)`` ``[t, h, w, c]`` tensor (rows 0-2 used, ``c`` ignored) for every
    media overlapping the scheduled window that starts at ``num_computed_tokens`` (the
    first may be the tail of a media begun in an earlier chunk, the last may be cut at the
    window end). Media are found from the runs of image/video tokens in ``input_ids``
    (consecutive media must be separated by a text token, as media end/start tokens are).

    Requires ``mrope_positions`` to come from :func:`initial_mrope_positions` (with the right
    ``t_factors`` for videos), whose text positions are already final: only the visual
    positions handed in are written, ``base + [t, h, w]`` with ``base`` = position of the
    token before the media + 1. So the result does not depend on what earlier chunks did
    (chunk boundaries anywhere, prefix-cache hits, several media per chunk).

    vLLM's ``evs.recompute_mrope_positions`` instead locates each media from
    ``num_computed_tokens`` plus the kept counts of the media before it and rewrites all
    text after it; it puts media at the wrong start when more than one media is present
    and few tokens are kept, when a chunk boundary falls right after a media start token or
    between two media, and raises ``IndexError`` when it looks past the last media start token.

    Returns ``(positions (3, L) clone, delta)`` with delta = max + 1 - L (requires a text
    token after the last media, which the media end token always is).
    """
    positions = mrope_positions.clone()
    total = positions.shape[1]
    if len(multimodal_positions):
        # The prompt is a host list in vLLM's V1 runner (a device tensor in V2: one copy).
        ids = torch.as_tensor(input_ids).cpu()  # ok-sync: prompt ids, see above
        starts, ends = token_runs((ids == image_token_id) | (ids == video_token_id))
        cursor = num_computed_tokens
        run = 0
        for mm_pos in multimodal_positions:
            # A media covers one run, or several (a video of the adapter's
            # video_layout="frame_runs": one run per frame, each frame's positions relative to
            # its own run).
            done = 0
            while done < mm_pos.shape[1]:
                while run < len(ends) and ends[run] <= cursor:
                    run += 1
                if run == len(ends):
                    raise ValueError("media positions run past the last media run of the prompt")
                start = max(cursor, starts[run])
                take = min(mm_pos.shape[1] - done, ends[run] - start)
                base = positions[0, starts[run] - 1] + 1 if starts[run] > 0 else 0
                piece = mm_pos[:3, done : done + take].to(positions.device, torch.int64)
                positions[:, start : start + take] = piece + base
                cursor = start + take
                done += take
    # Host tensor in the V1 runner; in V2 (device positions) this max is one more sync.
    delta = int(positions.max()) + 1 - total if total else 0  # ok-sync: see above
    return positions, delta
