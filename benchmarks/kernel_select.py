"""The selection step serving runs, and the score + top-k + gather kernel against its peers,
against the bandwidth floors.

Implementations (each keeps per image its top-k rows, indices ascending):

* ``serving_step``: the whole selection step as the serving model's ``embed_multimodal`` runs
  it, :func:`vs_vllm.media_selection.select_media` with the ``learned`` strategy on the Triton
  backend: the scorer fold (per-image mean in chunk sums + a fixed-order reduce, the two
  projections of the :class:`~vs_vllm.scorer.VisionSelectorScorer`, float32 on the device, as
  the server keeps it), score, select, the gather of the kept rows straight into one
  ``(sum k, W + 8)`` buffer and their 8 M-RoPE position channels. Images are
  ``MediaItem(grid=(1, H, W), segments=((N, k),))`` with merge size 2 (the most square merged
  grid of N tokens: N = 1024 is a (1, 64, 64) patch grid). The scorer has random weights
  (normal, std 0.02), so the scores are not all equal.
* ``serving_torch``: the same step on the torch backend (``strategy.backend = "torch"``: the
  reference fold per image, ``score_select_reference``): what the server runs off CUDA, or
  after a failed start-up self-check.
* ``fused_triton``: the select kernel alone,
  :func:`vs_vllm.kernels.score_select_triton.score_select_triton`, on a given ``w`` / ``c``
  (no fold, no position channels): three launches for the whole batch (scores over the packed
  rows, a per-image radix select, a gather over the kept rows), as called from Python.
* ``fused_graph``: the same three launches captured once in a CUDA graph for the point's fixed
  layout and replayed (what the kernel costs without Python's launch overhead; CUDA only).
* ``eager``: the torch chain a plain implementation runs per image: matvec
  (``x.float() @ w_b + c_b``, the reference's float32 numerics), ``torch.topk``, ``torch.sort``
  of the kept indices, ``index_select`` of the rows.
* ``compiled``: the same per-image chain through ``torch.compile(dynamic=True)`` (the cast is
  fused into the matvec; ``topk`` / ``sort`` stay library calls), still one call per image.
* ``torch_batched``: images of equal N only: one batched matvec for all images (``bmm`` in the
  input dtype with a float32 output where torch supports ``out_dtype`` on the device, else
  ``x.float()``), one ``torch.topk`` over (B, N), ``sort``, one ``index_select``.
* ``flashinfer``: ``torch_batched`` with FlashInfer's radix ``top_k`` instead of
  ``torch.topk``; only when ``flashinfer`` is importable (CUDA), otherwise skipped with a note.

The kernel rows (``fused_*``, ``eager``, ``compiled``, ``torch_batched``, ``flashinfer``) take
the folded ``w`` / ``c`` as given; only the ``serving_*`` rows run the fold and write the
position channels, so only they time what serving runs.

Checks, before any timing. The kernel rows are checked against the PyTorch reference
(``score_select_reference``) on data whose scores are exact in float32 and distinct within each
image (two columns of X carry a per-image permutation, ``w = (256, 1, 0, ...)``), so the kept
indices and rows must be *equal*. The serving rows run on the same data with a scorer whose
fold is ``w = kappa (256, 1, 0, ...)``, ``c = 0`` with ``kappa > 0`` (:func:`exact_scorer`):
their scores keep the same strict order, so their kept indices (read back from the position
channels), rows and channels must equal the reference's. ``serving_step``'s fold is also
compared with the torch fold on the random data (float32 rounding only). A failing
implementation is reported and not timed. On the random timing data (where different
summation orders may swap near-threshold tokens) the share of kept tokens that agree with the
reference (the torch fold's scores for the serving rows) is reported as ``overlap``.

Timing: on CUDA ``triton.testing.do_bench`` (L2 flushed before each run; median, 20th and 80th
percentile). Bandwidth counts the bytes of X read once plus the kept rows written,
``(sum N_i + sum k_i) * D * itemsize``, over the median time, and its share of the device's peak
memory bandwidth (:data:`PEAK_GBPS` by device name, ``--peak-gbps`` to override; blank when
unknown).

First call (``first_call_us``): per point, before anything else runs on its batch layout, the
wall-clock time of each implementation's very first call on that never-seen layout (on CUDA
between two ``torch.cuda.synchronize``), after a warm-up of other shapes: per hidden size, what
the server's start-up runs (``kernels.startup.warm_up``: every reachable kernel variant) and
one call of every implementation on one and on two images of a size not in the sweep. Next to
the steady median it shows what a request with a new batch shape pays: a compile on the
request path would show as a first call of hundreds of milliseconds (the kernels have bounded
variants, ``kernels.score_select_triton.reachable_plans``, and size arguments that are not
specialized, so none is expected).

The floors: the same run first measures the device-to-device copy rate (``dst.copy_(src)`` of
``--copy-mib`` MiB, counting read + write, timed like the kernels).

* ``floor_us`` (issue 16): X read once and the kept rows written, ``(sum N + sum k) * D *
  itemsize``, at that rate; ``x_floor`` = median / floor.
* ``serving_floor_us``: the bytes the serving step's design must move
  (:func:`serving_floor_bytes`), at that rate; ``x_serving_floor`` = median / that floor. The
  fold reads ``x[:, :S]`` once (chunk sums), writes and reads its float32 scratch of
  ``(cdiv(sum N, 256) + B) x S``, and each image's programs read the scorer's two (S/2, S)
  float32 matrices; the score pass reads ``x[:, :S]`` again and writes float32 scores, which
  the select reads five times; the gather reads and writes the kept rows (``k x W``); the
  channels write ``k x 8`` values. At S = W = D that is about twice the issue-16 floor, plus
  ``B x S^2 x 4`` bytes of weights.

The targets of issue 16 (H100/H200, bf16, D=3584, keep 0.2) are columns of every fused row
(``fused_triton``, ``fused_graph``, ``serving_step``): ``target`` (at most 25 us for one image
of 1024 tokens; at most 2.5x the floor for batches of 8192 to 32767 tokens and 1.5x from
32768; the kernel rows against ``floor_us``, ``serving_step`` against its own floor
``serving_floor_us``), ``meets_target``, and ``faster_than_peers`` (no slower than
``torch_batched`` and ``eager`` at that point). A summary table of the fused rows ends the
printout.

On a machine without CUDA, ``--allow-cpu`` times the torch paths (``serving_torch`` included)
with ``time.perf_counter`` only; the Triton rows are not timed there (they would run in the
Triton interpreter, which says nothing about their speed), but ``fused_triton`` and
``serving_step`` are still checked for correctness when ``TRITON_INTERPRET=1`` is set.
``$VS_VLLM_SELECT_BACKEND`` would force both serving rows onto one backend: unset it.

    python benchmarks/kernel_select.py                       # on a GPU: the full sweep
    python benchmarks/kernel_select.py --tokens 1024,16384 --hidden 3584 --images 1,32
    python benchmarks/kernel_select.py --allow-cpu --tokens 64,100 --hidden 40 --images 1,3

Writes ``benchmarks/results/<device>/kernel_select.csv`` and ``kernel_select.png``
(``--out`` changes the results folder).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.device_name import device_label, device_slug
from benchmarks.timing import first_call_us, time_call_ms
from benchmarks.torch_threads import torch_threads
from vs_vllm.batch import PackedImages
from vs_vllm.kernels.backend import BACKEND_ENV
from vs_vllm.kernels.score_select_reference import score_select_reference
from vs_vllm.media_selection import MediaItem, select_media
from vs_vllm.position_channels import NUM_CHANNELS, decode_positions, encode_positions
from vs_vllm.positions import kept_media_positions
from vs_vllm.scorer import VisionSelectorScorer
from vs_vllm.strategies import build_strategy

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = (
    "serving_step",
    "serving_torch",
    "fused_triton",
    "fused_graph",
    "eager",
    "compiled",
    "torch_batched",
    "flashinfer",
)
#: Rows judged against the issue-16 targets.
FUSED = ("fused_triton", "fused_graph", "serving_step")
PEERS = ("torch_batched", "eager")
#: The serving rows and the select backend each runs the step on.
SERVING = {"serving_step": "triton", "serving_torch": "torch"}
#: Triton rows: never timed on the CPU, checked there under ``TRITON_INTERPRET=1``.
INTERPRETED = ("serving_step", "fused_triton")
#: The floor ratio each judged row is held to (the kernel rows: the issue-16 floor).
FLOOR_OF = {"serving_step": "x_serving_floor"}

#: Spatial merge size of the serving model's images (Qwen2.5-VL's).
MERGE = 2
#: Rows per chunk of the fold's chunk sums (``kernels.fold_triton.GPU_FOLD_PLAN.chunk``).
FOLD_CHUNK = 256
#: Passes of the select over an image's float32 scores (four radix digits + the compaction).
SELECT_PASSES = 5
#: Standard deviation of the random scorer weights of the timing data.
SCORER_STD = 0.02

#: Peak memory bandwidth in GB/s by device name: (substrings that must all appear, GB/s).
#: First match wins; an unknown device gets no peak (``--peak-gbps`` sets one).
PEAK_GBPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 4800.0),
    (("H100", "PCIE"), 2000.0),
    (("H100", "HBM3"), 3350.0),  # H100 SXM5 reports as "NVIDIA H100 80GB HBM3"
    (("H100", "SXM"), 3350.0),
    (("A100", "80GB"), 2000.0),
)

Impl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def peak_gbps(name: str) -> float | None:
    """Known peak memory bandwidth (GB/s) of a device by its name, or ``None``."""
    upper = name.upper()
    for needles, gbps in PEAK_GBPS:
        if all(n in upper for n in needles):
            return gbps
    return None


# -- floors ------------------------------------------------------------------------------------


def issue16_floor_bytes(
    num_tokens: Sequence[int], num_kept: Sequence[int], width: int, itemsize: int
) -> int:
    """X read once, the kept rows written once: ``(sum N + sum k) * D * itemsize``."""
    return (sum(num_tokens) + sum(num_kept)) * width * itemsize


def serving_floor_bytes(
    num_tokens: Sequence[int],
    num_kept: Sequence[int],
    width: int,
    score_dim: int,
    itemsize: int,
) -> int:
    """The bytes the serving step's design moves at the least (every pass streams its operands
    from memory once; nothing is assumed to stay in L2):

    * fold: ``x[:, :S]`` read once (the chunk sums); the float32 scratch of
      ``(cdiv(sum N, 256) + B) x S`` written and read; each image's programs read the scorer's
      two (S/2, S) float32 matrices: ``B x 2 x (S/2 x S) x 4``;
    * score: ``x[:, :S]`` read again, the float32 scores written (4 bytes a token);
    * select: the scores read five times (four radix passes, the compaction);
    * gather: the kept rows read and written, ``sum k x W`` each;
    * channels: ``sum k x 8`` values written in the rows' dtype.

    Not counted: the per-image ``xbar`` / ``kbar`` / ``w`` vectors and the int64 index
    traffic of the select (a few tens of bytes per kept token)."""
    n, k, b, s = sum(num_tokens), sum(num_kept), len(num_tokens), score_dim
    fold = n * s * itemsize
    fold += 2 * (-(-n // FOLD_CHUNK) + b) * s * 4
    fold += b * 2 * (s // 2) * s * 4
    score = n * s * itemsize + n * 4
    select = SELECT_PASSES * n * 4
    gather = 2 * k * width * itemsize
    channels = k * NUM_CHANNELS * itemsize
    return fold + score + select + gather + channels


# -- implementations ---------------------------------------------------------------------------


def _one_image(seg: torch.Tensor, w: torch.Tensor, c: torch.Tensor, k: int):
    s = seg.float() @ w + c
    kept = torch.sort(torch.topk(s, k).indices).values
    return seg.index_select(0, kept), kept


def per_image_chain(one: Callable, images: PackedImages, x, w, c):
    """The chain image by image (``one`` = eager or compiled), outputs concatenated."""
    rows, idx = [], []
    start = 0
    for b, (n, k) in enumerate(zip(images.num_tokens, images.num_kept, strict=True)):
        r, i = one(x[start : start + n], w[b], c[b], k)
        rows.append(r)
        idx.append(i)
        start += n
    return torch.cat(rows), torch.cat(idx)


def _mm_out_dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    if dtype == torch.float32:
        return False
    try:
        a = torch.ones(1, 2, 2, dtype=dtype, device=device)
        torch.bmm(a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def batched_chain(topk: Callable, images: PackedImages, out_dtype: bool, x, w, c):
    """All images at once (equal N and k): bmm scores, one top-k over (B, N), sort, gather."""
    b, n, k = images.num_images, images.num_tokens[0], images.num_kept[0]
    x3 = x.view(b, n, x.shape[1])
    if out_dtype:
        s = torch.bmm(x3, w.to(x.dtype).unsqueeze(-1), out_dtype=torch.float32)
    else:
        s = torch.bmm(x3.float(), w.unsqueeze(-1))
    s = s.squeeze(-1) + c.unsqueeze(-1)
    kept = torch.sort(topk(s, k), dim=1).values
    flat = (kept + torch.arange(b, device=x.device).unsqueeze(-1) * n).flatten()
    return x.index_select(0, flat), kept.flatten()


def _torch_topk(s: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(s, k, dim=1).indices


def _flashinfer_topk(s: torch.Tensor, k: int) -> torch.Tensor:
    import flashinfer

    return flashinfer.top_k(s, k)[1]


def _fused(images: PackedImages, x, w, c):
    from vs_vllm.kernels.score_select_triton import score_select_triton

    out = score_select_triton(x, images.cu_seqlens, images.keep_counts, images.total_kept, w, c)
    return out.rows, out.indices


class GraphedFused:
    """``fused_triton`` captured in a CUDA graph, once per (x, w, c) buffers, then replayed.

    The graph reads the buffers it was captured with, so the exact check (which rewrites two
    columns of ``x`` in place and uses its own ``w`` / ``c``) gets its own graph."""

    def __init__(self, images: PackedImages) -> None:
        self.images = images
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}

    def _run(self, x, w, c, out) -> None:
        from vs_vllm.kernels.score_select_triton import score_select_triton

        im = self.images
        score_select_triton(x, im.cu_seqlens, im.keep_counts, im.total_kept, w, c, out=out)

    def __call__(self, x, w, c):
        from vs_vllm.kernels.select_io import allocate_outputs

        key = (x.data_ptr(), w.data_ptr(), c.data_ptr())
        if key not in self.graphs:
            out = allocate_outputs(x, self.images.total_kept)
            self._run(x, w, c, out)  # compiles the kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._run(x, w, c, out)
            self.graphs[key] = (graph, out)
        graph, out = self.graphs[key]
        graph.replay()
        return out[0], out[1]


def kernel_impls(images: PackedImages, out_dtype: bool, compiled_one: Callable | None):
    """The kernel rows for one batch layout: ``fn(x, w, c) -> (rows, indices)``."""
    impls: dict[str, Impl] = {
        "fused_triton": partial(_fused, images),
        "fused_graph": GraphedFused(images),
        "eager": partial(per_image_chain, _one_image, images),
        "torch_batched": partial(batched_chain, _torch_topk, images, out_dtype),
        "flashinfer": partial(batched_chain, _flashinfer_topk, images, out_dtype),
    }
    if compiled_one is not None:
        impls["compiled"] = partial(per_image_chain, compiled_one, images)
    return impls


# -- the serving step --------------------------------------------------------------------------


def media_grid(num_tokens: int, merge: int = MERGE) -> tuple[int, int, int]:
    """The (1, H, W) patch grid of one image of ``num_tokens`` merged tokens: the most square
    merged grid ``h x w = num_tokens`` (h <= w), times ``merge``. 1024 -> (1, 64, 64)."""
    h = max(d for d in range(1, math.isqrt(num_tokens) + 1) if num_tokens % d == 0)
    return (1, merge * h, merge * (num_tokens // h))


def media_items(images: PackedImages) -> tuple[MediaItem, ...]:
    """One single-segment image item per image of the batch."""
    return tuple(
        MediaItem(grid=media_grid(n), segments=((n, k),))
        for n, k in zip(images.num_tokens, images.num_kept, strict=True)
    )


def random_scorer(hidden: int, device: torch.device, seed: int) -> VisionSelectorScorer:
    """A scorer with every weight and bias drawn from N(0, SCORER_STD^2), float32 on
    ``device`` (as the server keeps it: ``scorer.float().to(device)``)."""
    gen = torch.Generator().manual_seed(seed)
    scorer = VisionSelectorScorer(hidden)
    with torch.no_grad():
        for p in scorer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * SCORER_STD)
    return scorer.requires_grad_(False).float().to(device)


def exact_scorer(hidden: int, device: torch.device, seed: int) -> VisionSelectorScorer:
    """A scorer whose fold is ``w = kappa * (256, 1, 0, ...)``, ``c = 0`` for every image,
    with ``kappa = scale > 0``: W_k's first row is zero and ``b_k = (1, 0, ...)`` (so
    ``kbar_0 = scale`` whatever the image's mean; W_k's other rows stay random, so the fold
    still reduces real means), W_q is ``(256, 1, 0, ...)`` in its first row and zero below,
    ``b_q = 0``. On :func:`exact_case` data a score is ``kappa * (256 hi + lo)`` up to float32
    rounding (under ``kappa / 2``), so the order is the reference's strict order, on every
    backend: the kept indices must be equal."""
    scorer = random_scorer(hidden, torch.device("cpu"), seed)
    with torch.no_grad():
        scorer.k_proj.weight[0].zero_()
        scorer.k_proj.bias.zero_()
        scorer.k_proj.bias[0] = 1.0
        scorer.q_proj.weight.zero_()
        scorer.q_proj.weight[0, 0] = 256.0
        scorer.q_proj.weight[0, 1] = 1.0
        scorer.q_proj.bias.zero_()
    return scorer.to(device)


class ServingStep:
    """The serving model's selection step for one batch layout: ``select_media`` with the
    ``learned`` strategy of ``scorer`` on select backend ``backend``. ``step(x)`` returns the
    per-image ``(k, W + 8)`` outputs (views of one buffer)."""

    def __init__(
        self, images: PackedImages, scorer: VisionSelectorScorer, backend: str, hidden: int
    ) -> None:
        self.items = media_items(images)
        self.strategy = build_strategy("learned", scorer)
        self.strategy.backend = backend
        self.score_dim = hidden

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return select_media(
            x, self.items, self.strategy, merge_size=MERGE, score_dim=self.score_dim
        )

    @torch.no_grad()
    def fold(self, x: torch.Tensor, images: PackedImages):
        return self.strategy.fold(x, images, self.score_dim)


def serving_kept(
    outs: Sequence[torch.Tensor], items: Sequence[MediaItem], width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, per-image indices read back from the position channels, channels) of the
    serving step's outputs."""
    rows = torch.cat([o[:, :width] for o in outs])
    channels = torch.cat([o[:, width:] for o in outs])
    pos = decode_positions(channels)
    counts = torch.tensor([o.shape[0] for o in outs], device=pos.device)
    gw = torch.tensor([item.grid[2] // MERGE for item in items], device=pos.device)
    gh = torch.tensor([item.grid[1] // MERGE for item in items], device=pos.device)
    gw, gh = gw.repeat_interleave(counts), gh.repeat_interleave(counts)
    idx = pos[:, 0] * gh * gw + pos[:, 1] * gw + pos[:, 2]
    return rows, idx, channels


def check_serving(step: ServingStep, x: torch.Tensor, images: PackedImages, ref) -> str | None:
    """``None`` when the serving step keeps exactly the reference's indices (read back from
    the position channels) and rows, with the channels ``encode_positions`` gives those
    indices, bit for bit; else why not."""
    try:
        outs = step(x)
    except Exception as exc:
        return f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    width = x.shape[1]
    shapes = [tuple(o.shape) for o in outs]
    if shapes != [(k, width + NUM_CHANNELS) for k in images.num_kept]:
        return f"output shapes {shapes} differ from (k, W + {NUM_CHANNELS}) per image"
    rows, idx, channels = serving_kept(outs, step.items, width)
    if not torch.equal(idx.cpu(), ref.indices.cpu()):
        return "kept indices (from the position channels) differ from the reference"
    if not torch.equal(rows.cpu(), ref.rows.cpu()):
        return "kept rows differ from the reference"
    per_image = ref.indices.split(list(images.num_kept))
    expected = encode_positions(
        torch.cat(
            [
                kept_media_positions(item.grid, MERGE, kept)
                for item, kept in zip(step.items, per_image, strict=True)
            ]
        ),
        x.dtype,
    )
    if not torch.equal(channels.cpu(), expected.cpu()):
        return "position channels differ from the kept tokens' positions"
    return None


def check_fold(step: ServingStep, torch_step: ServingStep, x, images: PackedImages) -> str | None:
    """``None`` when ``step``'s scorer fold matches the torch backend's up to float32 rounding
    (a different but fixed summation order: within 1e-4 of the fold's largest magnitude, ``w``
    and ``c`` alike, since a ``c`` near zero has no scale of its own), else why not."""
    try:
        w, c = step.fold(x, images)
    except Exception as exc:
        return f"fold raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    w_r, c_r = torch_step.fold(x, images)
    scale = max(float(w_r.abs().max()), float(c_r.abs().max()))
    for name, got, want in (("w", w, w_r), ("c", c, c_r)):
        tol = 1e-4 * scale + 1e-30
        if got.shape != want.shape or float((got - want).abs().max()) > tol:
            return f"fold {name} differs from the torch fold beyond float32 rounding"
    return None


def availability(device: torch.device) -> dict[str, str | None]:
    """Per implementation: ``None`` when it can be timed here, else why not."""
    notes: dict[str, str | None] = dict.fromkeys(IMPLS)
    if device.type != "cuda":
        notes["serving_step"] = (
            "not timed on the CPU: the Triton kernels would run in the interpreter"
        )
        notes["fused_triton"] = (
            "not timed on the CPU: the Triton kernel would run in the interpreter"
        )
        notes["fused_graph"] = "not timed on the CPU: CUDA graphs need CUDA"
        notes["flashinfer"] = "skipped: FlashInfer runs on CUDA only"
    else:
        try:
            import flashinfer  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install raising anything
            notes["flashinfer"] = f"skipped: flashinfer not importable ({type(exc).__name__})"
    return notes


# -- checks ------------------------------------------------------------------------------------


def exact_case(x: torch.Tensor, images: PackedImages, seed: int):
    """Write per-image distinct, float32-exact scores into columns 0-1 of ``x`` (in place).

    Returns (w, c, saved columns). Score of token i in an image = its value in a random
    permutation of 0..N-1, encoded as ``256 * hi + lo`` (both < 256, exact in bf16)."""
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n, generator=gen) for n in images.num_tokens]
    perm = torch.cat(perms).to(x.device)
    saved = x[:, :2].clone()
    x[:, 0] = (perm // 256).to(x.dtype)
    x[:, 1] = (perm % 256).to(x.dtype)
    w = torch.zeros(images.num_images, x.shape[1], device=x.device)
    w[:, 0], w[:, 1] = 256.0, 1.0
    c = torch.zeros(images.num_images, device=x.device)
    return w, c, saved


def check_exact(impl: Impl, x, w, c, images: PackedImages) -> str | None:
    """``None`` when ``impl`` keeps exactly the reference's indices and rows, else why not."""
    ref = score_select_reference(x, images.cu_seqlens, images.keep_counts, images.total_kept, w, c)
    try:
        rows, idx = impl(x, w, c)
    except Exception as exc:
        return f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if idx.shape != ref.indices.shape or not torch.equal(idx.cpu(), ref.indices.cpu()):
        return "kept indices differ from the reference"
    if not torch.equal(rows.cpu(), ref.rows.cpu()):
        return "kept rows differ from the reference"
    return None


def kept_mask(idx: torch.Tensor, images: PackedImages) -> torch.Tensor:
    offsets = images.cu_seqlens[:-1].index_select(0, images.kept_segment_ids)
    mask = torch.zeros(images.total_tokens, dtype=torch.bool, device=idx.device)
    mask[idx + offsets] = True
    return mask


def reference_mask(x: torch.Tensor, images: PackedImages, w, c) -> torch.Tensor:
    """The packed tokens the reference keeps for scores ``x @ w_b + c_b``."""
    ref = score_select_reference(x, images.cu_seqlens, images.keep_counts, images.total_kept, w, c)
    return kept_mask(ref.indices, images)


# -- timing ------------------------------------------------------------------------------------


def time_us(fn: Callable[[], object], device: torch.device, args) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) microseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(
            fn, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=[0.5, 0.2, 0.8]
        )
        return med * 1e3, p20 * 1e3, p80 * 1e3
    for _ in range(2):
        fn()
    times = [time_call_ms(fn, device) * 1e3 for _ in range(args.repeat)]
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=5, method="inclusive")
    return statistics.median(times), q[0], q[3]


def copy_gbps(device: torch.device, mib: int, args) -> float:
    """Device-to-device copy rate in GB/s, counting the bytes read and the bytes written."""
    n = mib * 2**20 // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    med, _, _ = time_us(lambda: dst.copy_(src), device, args)
    return 2 * n * src.element_size() / (med * 1e-6) / 1e9


def warmup_tokens(tokens: Sequence[int]) -> int:
    """An image size that is not in the sweep (the smallest from 16): the warm-up's batch
    layouts are never a point's."""
    n = 16
    while n in tokens:
        n += 1
    return n


def warm_up_other_shapes(
    device: torch.device,
    dtype: torch.dtype,
    hidden: int,
    tokens: Sequence[int],
    keep_ratio: float,
    todo: Sequence[str],
    out_dtype: bool,
    compiled_one: Callable | None,
    scorer: VisionSelectorScorer | None,
) -> None:
    """What runs before the first point of a hidden size, so that each point's first call
    meets only a new batch layout: on CUDA, when a Triton row is timed, the server's start-up
    warm-up (``kernels.startup.warm_up``: every reachable kernel variant for rows of
    ``hidden`` scored on ``hidden``), then one call of every timed implementation on one and
    on two images of :func:`warmup_tokens` tokens. Errors are left to the points' checks."""
    if device.type == "cuda" and any(i in todo for i in FUSED):
        from vs_vllm.kernels.startup import warm_up

        try:
            warm_up(device, dtype, hidden, hidden)
        except Exception as exc:
            print(f"note: D={hidden}: the start-up warm-up raised {type(exc).__name__}")
    n = warmup_tokens(tokens)
    for b in (1, 2):
        images = PackedImages.from_ratio([n] * b, keep_ratio, device)
        x = torch.randn(images.total_tokens, hidden, device=device, dtype=dtype)
        w = torch.randn(b, hidden, device=device) / hidden**0.5
        c = torch.randn(b, device=device)
        impls = kernel_impls(images, out_dtype, compiled_one)
        for impl in todo:
            try:
                if impl in SERVING:
                    assert scorer is not None
                    ServingStep(images, scorer, SERVING[impl], hidden)(x)
                else:
                    impls[impl](x, w, c)
            except Exception:
                pass  # the point's checks report it
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- targets -----------------------------------------------------------------------------------


def target_of(images: int, tokens_per_image: int) -> tuple[str, float] | None:
    """The issue-16 target of a point: ("us", 25) for one image of 1024 tokens, ("x_floor",
    2.5) for 8192 to 32767 tokens in the batch, ("x_floor", 1.5) from 32768; else None.
    A floor ratio is held against the row's own floor (:data:`FLOOR_OF`)."""
    total = images * tokens_per_image
    if images == 1 and tokens_per_image == 1024:
        return ("us", 25.0)
    if total >= 32768:
        return ("x_floor", 1.5)
    if total >= 8192:
        return ("x_floor", 2.5)
    return None


def judge(point: list[dict]) -> None:
    """Fill ``target`` / ``meets_target`` / ``faster_than_peers`` of the fused rows in place:
    the kernel rows against the issue-16 floor (``x_floor``), ``serving_step`` against the
    serving step's floor (``x_serving_floor``)."""
    peers = [r["median_us"] for r in point if r["impl"] in PEERS]
    for r in point:
        if r["impl"] not in FUSED:
            continue
        if peers:
            r["faster_than_peers"] = "yes" if r["median_us"] <= min(peers) else "no"
        target = target_of(r["images"], r["tokens_per_image"])
        if target is None:
            continue
        kind, limit = target
        if kind == "us":
            r["target"] = f"<={limit:g}us"
            r["meets_target"] = "yes" if r["median_us"] <= limit else "no"
        else:
            ratio = FLOOR_OF.get(r["impl"], "x_floor")
            floor = "serving floor" if ratio == "x_serving_floor" else "floor"
            r["target"] = f"<={limit:g}x {floor}"
            r["meets_target"] = "yes" if r[ratio] <= limit else "no"


# -- main --------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tokens",
        default="256,512,1024,1296,2048,4096,8192,16384",
        help="visual tokens per image (comma list)",
    )
    p.add_argument("--hidden", default="2048,3584", help="hidden sizes D (comma list)")
    p.add_argument("--images", default="1,8,32", help="images per batch (comma list)")
    p.add_argument("--keep-ratio", type=float, default=0.2)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up (CUDA)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time (CUDA)")
    p.add_argument("--repeat", type=int, default=10, help="timed runs per point on the CPU")
    p.add_argument(
        "--copy-mib",
        type=int,
        default=None,
        help="size of the copy that measures the bandwidth floor (default 1024 on CUDA, 64 else)",
    )
    p.add_argument(
        "--peak-gbps",
        type=float,
        default=None,
        help="peak memory bandwidth of the device in GB/s (default: by name)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--allow-cpu", action="store_true", help="time the torch paths on the CPU")
    args = p.parse_args(argv)
    args.impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(args.impls) - set(IMPLS))
    if unknown:
        p.error(f"unknown --impls {unknown}; choose from {list(IMPLS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def _fmt(v) -> str:
    return "-" if v in ("", None) else f"{v:.1f}"


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.allow_cpu:
        print(
            "no CUDA device: pass --allow-cpu to time the torch paths on the CPU", file=sys.stderr
        )
        return 2
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 would time the Triton interpreter: unset it", file=sys.stderr)
        return 2
    if os.environ.get(BACKEND_ENV) and any(i in SERVING for i in args.impls):
        print(
            f"{BACKEND_ENV} would force both serving rows onto one select backend: unset it",
            file=sys.stderr,
        )
        return 2
    label = device_label(device)
    peak = args.peak_gbps if args.peak_gbps is not None else peak_gbps(label)
    dtype = DTYPES[args.dtype]
    notes = availability(device)
    interpret_check = device.type != "cuda" and os.environ.get("TRITON_INTERPRET") == "1"
    out_dtype = _mm_out_dtype_works(device, dtype)
    compiled_one = None
    if "compiled" in args.impls:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        compiled_one = torch.compile(_one_image, dynamic=True)

    print(f"device: {label}  dtype: {args.dtype}  keep ratio: {args.keep_ratio}")
    print(f"peak memory bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown (--peak-gbps)'}")
    print(f"timer: {'triton.testing.do_bench' if device.type == 'cuda' else 'time.perf_counter'}")
    copy_mib = args.copy_mib or (1024 if device.type == "cuda" else 64)
    copy_rate = copy_gbps(device, copy_mib, args)
    print(f"copy rate (floor): {copy_rate:.0f} GB/s, read + write, {copy_mib} MiB copy")
    for impl in args.impls:
        if notes[impl]:
            extra = (
                " (checked for correctness in the interpreter)"
                if (impl in INTERPRETED and interpret_check)
                else ""
            )
            print(f"note: {impl}: {notes[impl]}{extra}")
    tokens = _ints(args.tokens)
    print(
        f"first call: per point, on a batch layout never seen before, after a warm-up of "
        f"{warmup_tokens(tokens)}-token images (wall clock"
        f"{', torch.cuda.synchronize' if device.type == 'cuda' else ''})"
    )
    header = (
        f"{'D':>5} {'imgs':>4} {'N/img':>6} {'impl':>13} {'median us':>10} {'first us':>10} "
        f"{'GB/s':>8} {'%peak':>6} {'floor us':>9} {'x floor':>8} {'srv fl us':>9} "
        f"{'x srv':>6} {'overlap':>7}"
    )
    print(header)

    rows: list[dict] = []
    failures: list[str] = []
    tally: dict[str, list[int]] = {}  # impl -> [exact checks passed, run]
    serving_asked = [i for i in args.impls if i in SERVING]
    for hidden in _ints(args.hidden):
        scorer = exact = None
        if serving_asked and hidden % 2:
            print(f"note: D={hidden}: no serving rows (the scorer needs an even hidden size)")
        elif serving_asked:
            scorer = random_scorer(hidden, device, args.seed + hidden)
            exact = exact_scorer(hidden, device, args.seed + hidden + 1)
        runnable = [i for i in args.impls if i not in SERVING or scorer is not None]
        todo = [i for i in runnable if notes[i] is None]
        todo_check = list(todo)
        if interpret_check:
            todo_check += [i for i in INTERPRETED if i in runnable and i not in todo]
        warm_up_other_shapes(
            device, dtype, hidden, tokens, args.keep_ratio, todo, out_dtype, compiled_one, scorer
        )
        for b in _ints(args.images):
            for n in tokens:
                images = PackedImages.from_ratio([n] * b, args.keep_ratio, device)
                gen_seed = args.seed + 1000003 * hidden + 1009 * b + n
                torch.manual_seed(gen_seed)
                x = torch.randn(images.total_tokens, hidden, device=device, dtype=dtype)
                w = torch.randn(b, hidden, device=device) / hidden**0.5
                c = torch.randn(b, device=device)
                impls = kernel_impls(images, out_dtype, compiled_one)
                steps, exact_steps = {}, {}
                if scorer is not None:
                    steps = {
                        i: ServingStep(images, scorer, be, hidden) for i, be in SERVING.items()
                    }
                    exact_steps = {
                        i: ServingStep(images, exact, be, hidden) for i, be in SERVING.items()
                    }
                calls = {
                    i: partial(steps[i], x) if i in SERVING else partial(impls[i], x, w, c)
                    for i in todo
                }

                # 0. the first call of each timed implementation on this new batch layout.
                first: dict[str, float | None] = {}
                for impl in todo:
                    try:
                        first[impl] = first_call_us(calls[impl], device)
                    except Exception:  # reported by the checks below
                        first[impl] = None

                # 1. checks: the serving fold on the random data, then the exact case
                #    (distinct float32-exact scores): indices and rows must be equal.
                failed: dict[str, str] = {}
                if "serving_step" in todo_check:
                    why = check_fold(steps["serving_step"], steps["serving_torch"], x, images)
                    if why:
                        failed["serving_step"] = why
                checked = n <= 65536 and hidden >= 2
                if checked:
                    wx, cx, saved = exact_case(x, images, gen_seed)
                    ref_x = score_select_reference(
                        x, images.cu_seqlens, images.keep_counts, images.total_kept, wx, cx
                    )
                    for impl in todo_check:
                        if impl in failed:
                            continue
                        if impl in SERVING:
                            why = check_serving(exact_steps[impl], x, images, ref_x)
                        else:
                            why = check_exact(impls[impl], x, wx, cx, images)
                        count = tally.setdefault(impl, [0, 0])
                        count[0] += why is None
                        count[1] += 1
                        if why:
                            failed[impl] = why
                    x[:, :2] = saved
                    del ref_x
                else:
                    print(f"note: D={hidden} B={b} N={n}: too large for the exact check")
                for impl, why in failed.items():
                    failures.append(f"D={hidden} B={b} N={n} {impl}: {why}")
                    print(f"FAILED {failures[-1]}")

                # 2. timing on random data (+ agreement with the reference there: the given
                #    w / c for the kernel rows, the torch fold of the scorer for the serving rows).
                ref_mask = reference_mask(x, images, w, c)
                srv_mask = None
                if steps:
                    srv_mask = reference_mask(x, images, *steps["serving_torch"].fold(x, images))
                itemsize = x.element_size()
                nbytes = issue16_floor_bytes(images.num_tokens, images.num_kept, hidden, itemsize)
                floor_us = nbytes / (copy_rate * 1e9) * 1e6
                srv_bytes = serving_floor_bytes(
                    images.num_tokens, images.num_kept, hidden, hidden, itemsize
                )
                srv_floor_us = srv_bytes / (copy_rate * 1e9) * 1e6
                point: list[dict] = []
                for impl in todo:
                    if impl in failed:
                        continue
                    fn = calls[impl]
                    if impl in SERVING:
                        kept, mask = serving_kept(fn(), steps[impl].items, hidden)[1], srv_mask
                    else:
                        kept, mask = fn()[1], ref_mask
                    overlap = (kept_mask(kept, images) & mask).sum() / images.total_kept
                    med, p20, p80 = time_us(fn, device, args)
                    gbps = nbytes / (med * 1e-6) / 1e9
                    fc = first[impl]
                    point.append(
                        {
                            "device": label,
                            "dtype": args.dtype,
                            "hidden": hidden,
                            "images": b,
                            "tokens_per_image": n,
                            "keep_ratio": args.keep_ratio,
                            "kept_per_image": images.num_kept[0],
                            "impl": impl,
                            "verified": checked,
                            "overlap": round(float(overlap), 5),
                            "median_us": round(med, 2),
                            "p20_us": round(p20, 2),
                            "p80_us": round(p80, 2),
                            "first_call_us": "" if fc is None else round(fc, 2),
                            "gbps": float(f"{gbps:.4g}"),
                            "peak_gbps": peak if peak else "",
                            "pct_peak": float(f"{100 * gbps / peak:.3g}") if peak else "",
                            "copy_gbps": round(copy_rate, 1),
                            "floor_us": float(f"{floor_us:.4g}"),
                            "x_floor": float(f"{med / floor_us:.4g}"),
                            "serving_floor_us": float(f"{srv_floor_us:.4g}"),
                            "x_serving_floor": float(f"{med / srv_floor_us:.4g}"),
                            "target": "",
                            "meets_target": "",
                            "faster_than_peers": "",
                            "fused_speedup": "",
                            "timer": "do_bench" if device.type == "cuda" else "perf_counter",
                            "torch": torch.__version__,
                        }
                    )
                fused = next((r for r in point if r["impl"] == "fused_triton"), None)
                judge(point)
                for r in point:
                    if fused is not None:
                        r["fused_speedup"] = round(r["median_us"] / fused["median_us"], 2)
                    print(
                        f"{hidden:>5} {b:>4} {n:>6} {r['impl']:>13} {r['median_us']:>10.1f} "
                        f"{_fmt(r['first_call_us']):>10} {r['gbps']:>8.1f} "
                        f"{r['pct_peak']!s:>6} {r['floor_us']:>9.1f} {r['x_floor']:>8.2f} "
                        f"{r['serving_floor_us']:>9.1f} {r['x_serving_floor']:>6.2f} "
                        f"{r['overlap']:>7.4f}"
                    )
                rows.extend(point)
                # free the device memory before the next point
                del x, ref_mask, srv_mask, impls, steps, exact_steps, calls
                fn = None

    if tally:
        print(
            "exact checks passed: "
            + ", ".join(f"{impl} {ok}/{ran}" for impl, (ok, ran) in tally.items())
        )
    out_dir = args.out / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not rows:
        print("nothing was timed", file=sys.stderr)
        return 1
    csv_path = out_dir / "kernel_select.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {csv_path}")
    print_targets(rows)
    _plot(rows, peak, out_dir / "kernel_select.png")
    if failures:
        print(f"{len(failures)} correctness failure(s); those implementations were not timed")
        return 1
    return 0


def print_targets(rows: list[dict]) -> None:
    """One line per fused row: time, first call, floor ratios, the target and whether it
    holds."""
    fused = [r for r in rows if r["impl"] in FUSED]
    if not fused:
        print("targets: no fused row was timed here (they are judged on a GPU)")
        return
    print("targets (issue 16; serving_step against its own floor):")
    print(
        f"{'D':>5} {'imgs':>4} {'N/img':>6} {'impl':>12} {'median us':>10} {'first us':>10} "
        f"{'x floor':>8} {'x srv':>6} {'target':>21} {'meets':>6} {'<= peers':>8}"
    )
    for r in fused:
        print(
            f"{r['hidden']:>5} {r['images']:>4} {r['tokens_per_image']:>6} {r['impl']:>12} "
            f"{r['median_us']:>10.1f} {_fmt(r['first_call_us']):>10} {r['x_floor']:>8.2f} "
            f"{r['x_serving_floor']:>6.2f} {r['target'] or '-':>21} "
            f"{r['meets_target'] or '-':>6} {r['faster_than_peers'] or '-':>8}"
        )
    missed = [r for r in fused if r["meets_target"] == "no" or r["faster_than_peers"] == "no"]
    print(f"{len(missed)} of {len(fused)} fused rows miss a target")


def _plot(rows: list[dict], peak: float | None, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    hiddens = sorted({r["hidden"] for r in rows})
    batches = sorted({r["images"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(
        2 * len(hiddens),
        len(batches),
        figsize=(4.5 * len(batches), 3.6 * 2 * len(hiddens)),
        squeeze=False,
    )
    for hi, d in enumerate(hiddens):
        for bi, b in enumerate(batches):
            ax_t, ax_b = axes[2 * hi][bi], axes[2 * hi + 1][bi]
            for impl in impls:
                pts = sorted(
                    (r["tokens_per_image"], r["median_us"], r["gbps"])
                    for r in rows
                    if r["hidden"] == d and r["images"] == b and r["impl"] == impl
                )
                if not pts:
                    continue
                ns, us, gb = zip(*pts, strict=True)
                ax_t.plot(ns, us, marker="o", label=impl)
                ax_b.plot(ns, gb, marker="o", label=impl)
            floor = sorted(
                {
                    (r["tokens_per_image"], r["floor_us"])
                    for r in rows
                    if r["hidden"] == d and r["images"] == b
                }
            )
            if floor:
                ns, us = zip(*floor, strict=True)
                ax_t.plot(ns, us, color="k", linestyle=":", label="floor (copy rate)")
            serving_floor = sorted(
                {
                    (r["tokens_per_image"], r["serving_floor_us"])
                    for r in rows
                    if r["hidden"] == d and r["images"] == b
                }
            )
            if serving_floor:
                ns, us = zip(*serving_floor, strict=True)
                ax_t.plot(ns, us, color="k", linestyle="-.", label="serving floor (copy rate)")
            ax_b.axhline(
                rows[0]["copy_gbps"], color="k", linestyle=":", linewidth=1, label="copy rate"
            )
            if peak:
                ax_b.axhline(peak, color="k", linestyle="--", linewidth=1, label="peak")
            ax_t.set(
                xscale="log",
                yscale="log",
                xlabel="tokens per image",
                ylabel="median us",
                title=f"D={d}, {b} image(s)",
            )
            ax_b.set(
                xscale="log",
                xlabel="tokens per image",
                ylabel="GB/s (X read + kept written)",
                title=f"D={d}, {b} image(s)",
            )
            ax_t.legend(fontsize=7)
            ax_b.legend(fontsize=7)
    fig.suptitle(
        f"selection step and score + top-k + gather, {rows[0]['dtype']}, "
        f"keep {rows[0]['keep_ratio']}, {rows[0]['device']}"
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
