"""A packed batch of images' visual tokens: host-side sizes plus their device tensors.

The sizes (N_i tokens per image, k_i kept) are known on the host from prompt processing, so
nothing in the selection path has to read them back from the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from vs_vllm.keep_ratio import num_kept_tokens


def pack_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The (sum N_i, W) packed rows of per-item ``parts``: a view, without a copy, when the
    parts are consecutive row blocks of one buffer (how vLLM's models split the tower's packed
    output per item); ``torch.cat`` otherwise. Host-side checks only (no sync)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    width = first.shape[1] if first.dim() == 2 else -1
    expected = first.data_ptr()
    consecutive = True
    for part in parts:
        if (
            part.dim() != 2
            or part.shape[1] != width
            or part.dtype != first.dtype
            or part.device != first.device
            or part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or (part.shape[0] > 1 and part.stride(0) != first.stride(0))
            or (width > 1 and part.stride(1) != 1)
            or part.data_ptr() != expected
        ):
            consecutive = False
            break
        expected += part.shape[0] * first.stride(0) * first.element_size()
    if not consecutive:
        return torch.cat(list(parts))
    rows = sum(part.shape[0] for part in parts)
    return first.as_strided((rows, width), (first.stride(0), 1))


@dataclass(frozen=True)
class PackedImages:
    """Sizes of the images in a packed (sum N_i, D) token tensor and how many each keeps."""

    num_tokens: tuple[int, ...]
    num_kept: tuple[int, ...]
    device: torch.device | str

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        object.__setattr__(self, "num_tokens", tuple(self.num_tokens))
        object.__setattr__(self, "num_kept", tuple(self.num_kept))
        if len(self.num_tokens) != len(self.num_kept):
            raise ValueError(f"{len(self.num_tokens)} images but {len(self.num_kept)} keep counts")
        for i, (n, k) in enumerate(zip(self.num_tokens, self.num_kept, strict=True)):
            if n < 1 or not 1 <= k <= n:
                raise ValueError(f"image {i}: need 1 <= k <= N, got N={n}, k={k}")

    @classmethod
    def from_ratio(
        cls,
        num_tokens: Sequence[int],
        keep_ratio: float | Sequence[float],
        device: torch.device | str = "cpu",
    ) -> PackedImages:
        """k_i = max(1, int(N_i * r_i)); ``keep_ratio`` is one ratio or one per image."""
        ratios = (
            [keep_ratio] * len(num_tokens)
            if isinstance(keep_ratio, int | float)
            else list(keep_ratio)
        )
        if len(ratios) != len(num_tokens):
            raise ValueError(f"{len(num_tokens)} images but {len(ratios)} keep ratios")
        kept = tuple(num_kept_tokens(n, r) for n, r in zip(num_tokens, ratios, strict=True))
        return cls(tuple(num_tokens), kept, torch.device(device))

    @property
    def num_images(self) -> int:
        return len(self.num_tokens)

    @property
    def max_tokens(self) -> int:
        """Tokens of the largest image (0 for no image)."""
        return max(self.num_tokens, default=0)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @property
    def total_kept(self) -> int:
        return sum(self.num_kept)

    def _to_device(self, values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.int64)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """(B+1,) int64 token offsets of the images, on ``device``."""
        offsets = [0]
        for n in self.num_tokens:
            offsets.append(offsets[-1] + n)
        return self._to_device(offsets)

    @cached_property
    def keep_counts(self) -> torch.Tensor:
        """(B,) int64 keep counts, on ``device``."""
        return self._to_device(list(self.num_kept))

    @cached_property
    def segment_ids(self) -> torch.Tensor:
        """(sum N_i,) int64 image id of every token, on ``device``."""
        return self._to_device([i for i, n in enumerate(self.num_tokens) for _ in range(n)])

    @cached_property
    def kept_segment_ids(self) -> torch.Tensor:
        """(sum k_i,) int64 image id of every kept slot, on ``device``."""
        return self._to_device([i for i, k in enumerate(self.num_kept) for _ in range(k)])
