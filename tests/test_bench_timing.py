"""``benchmarks/timing.py``, the timers the benchmark scripts share (CPU: ``perf_counter``)."""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks import timing


def test_interleaved_rounds_rotate_the_ratios_and_alternate_the_order():
    calls: list[tuple[str, str]] = []

    def region(group, name):
        return name, lambda: calls.append((group, name))

    groups = [[region(g, "whole"), region(g, "llm")] for g in ("r0", "r1", "r2")]
    rounds: list[int] = []
    samples = timing.interleaved_samples(
        groups, torch.device("cpu"), warmup=2, repeat=4, before_round=rounds.append
    )
    assert rounds == [0, 1, 2, 3]
    every = [(g, n) for g in ("r0", "r1", "r2") for n in ("whole", "llm")]
    assert calls[:12] == every * 2  # warm-up: every region of every ratio, untimed
    timed = calls[12:]
    assert timed == [
        *[("r0", "whole"), ("r0", "llm"), ("r1", "whole"), ("r1", "llm")],
        *[("r2", "whole"), ("r2", "llm")],
        *[("r1", "llm"), ("r1", "whole"), ("r2", "llm"), ("r2", "whole")],
        *[("r0", "llm"), ("r0", "whole")],
        *[("r2", "whole"), ("r2", "llm"), ("r0", "whole"), ("r0", "llm")],
        *[("r1", "whole"), ("r1", "llm")],
        *[("r0", "llm"), ("r0", "whole"), ("r1", "llm"), ("r1", "whole")],
        *[("r2", "llm"), ("r2", "whole")],
    ]
    assert [sorted(s) for s in samples] == [["llm", "whole"]] * 3
    assert all(len(v) == 4 and min(v) >= 0 for s in samples for v in s.values())


def test_time_call_and_spread():
    ms = timing.time_call_ms(lambda: time.sleep(0.02), torch.device("cpu"))
    assert 19.5 <= ms < 1000
    s = timing.spread([4.0, 1.0, 100.0, 3.0, 2.0])
    assert (s["median"], s["min"], s["max"]) == (3.0, 1.0, 100.0)
    assert s["iqr_pct"] == pytest.approx(100 * (4.0 - 2.0) / 3.0)  # quartiles 2 and 4
    assert timing.spread([5.0]) == {"median": 5.0, "min": 5.0, "max": 5.0, "iqr_pct": 0.0}


def test_first_call_is_wall_clock():
    us = timing.first_call_us(lambda: time.sleep(0.01), torch.device("cpu"))
    assert 9_500 <= us < 1_000_000


def test_measure_is_the_median_after_the_warmup():
    calls = []

    def fn():
        calls.append(None)
        time.sleep(0.002 if len(calls) > 2 else 0.05)  # the two warm-up calls are slow

    ms = timing.measure_ms(fn, torch.device("cpu"), warmup=2, repeat=3)
    assert len(calls) == 5 and 1.9 <= ms < 45
