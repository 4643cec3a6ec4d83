"""PyTorch reference of the scorer fold: per image ``w`` and ``c`` of ``s = x @ w + c``.

``xbar`` is the image's mean row, ``kbar = (W_k xbar + b_k) * scale``, ``w = W_q^T kbar`` and
``c = b_q . kbar`` (see :mod:`vs_vllm.scorer`). Everything is computed per image, on the
image's own rows, with ops whose shapes depend on that image alone: an image's fold is
bit-identical whatever else is in its batch (no batched GEMM whose algorithm follows the
batch size, no accumulating scatter). float32 throughout; the image sizes are host ints, so there
is no host-device sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def fold_reference(
    x: torch.Tensor,
    num_tokens: Sequence[int],
    wq: torch.Tensor,
    bq: torch.Tensor,
    wk: torch.Tensor,
    bk: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (sum N_i, S) packed rows (any float dtype, any row stride); ``wq``/``wk``
    (S/2, S), ``bq``/``bk`` (S/2,). Returns ``w`` (B, S) and ``c`` (B,), float32."""
    wq, bq, wk, bk = (t.to(torch.float32) for t in (wq, bq, wk, bk))
    num_images = len(num_tokens)
    w = torch.empty(num_images, x.shape[1], dtype=torch.float32, device=x.device)
    c = torch.empty(num_images, dtype=torch.float32, device=x.device)
    start = 0
    for b, n in enumerate(num_tokens):
        xbar = x[start : start + n].sum(dim=0, dtype=torch.float32) / n
        kbar = (wk @ xbar + bk) * scale
        w[b] = kbar @ wq
        c[b] = kbar @ bq
        start += n
    return w, c
