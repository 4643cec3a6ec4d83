"""Timers the benchmark scripts share.

* :func:`time_call_ms`: one call of ``fn``, on CUDA between CUDA events recorded after a device
  synchronize (``time.perf_counter`` around the call on the CPU, where the work is
  synchronous); :func:`measure_ms`: the median of repeated calls after a warm-up;
* :func:`interleaved_samples`: several groups of regions timed in interleaved rounds, and
  :func:`spread` (median, min, max, interquartile range) of the samples;
* :func:`first_call_us`: the wall-clock time of one call, device work and anything compiled on
  the way included (on CUDA between two synchronizes).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def time_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of ``fn``: CUDA events around it after a device synchronize
    (``time.perf_counter`` on the CPU, where the work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> float:
    """Median milliseconds of ``repeat`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_call_ms(fn, device) for _ in range(repeat))


Region = tuple[str, Callable[[], object]]


def interleaved_samples(
    groups: Sequence[Sequence[Region]],
    device: torch.device,
    warmup: int,
    repeat: int,
    before_round: Callable[[int], object] | None = None,
) -> list[dict[str, list[float]]]:
    """Time every region of every group (one group per keep ratio) once per round.

    ``warmup`` untimed rounds first (every region of every group, in order), then ``repeat``
    timed rounds: round i starts at group ``i % len(groups)`` and goes round the groups, and
    runs each group's regions in order on even rounds, in reverse order on odd rounds. Each
    round starts with ``gc.collect()`` and ``before_round(i)``, outside the timed calls.
    Returns, per group, ``{region name: [ms of round 0, round 1, ...]}``."""
    for _ in range(warmup):
        for group in groups:
            for _, fn in group:
                fn()
    samples: list[dict[str, list[float]]] = [{name: [] for name, _ in g} for g in groups]
    for i in range(repeat):
        gc.collect()
        if before_round is not None:
            before_round(i)
        for j in range(len(groups)):
            g = (i + j) % len(groups)
            order = groups[g] if i % 2 == 0 else list(reversed(groups[g]))
            for name, fn in order:
                samples[g][name].append(time_call_ms(fn, device))
    return samples


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max of ``values`` and their interquartile range in % of the median
    (quartiles by linear interpolation, ``statistics.quantiles(method="inclusive")``)."""
    v = sorted(values)
    median = statistics.median(v)
    q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else (v[0],) * 3
    return {
        "median": median,
        "min": v[0],
        "max": v[-1],
        "iqr_pct": 100 * (q3 - q1) / median if median else 0.0,
    }


def first_call_us(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock microseconds of one call of ``fn`` (on CUDA between two synchronizes, so
    the device work and anything compiled on the way are counted)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e6
