"""A small version of the soak (benchmarks/soak.py) on the real server: mixed ratios, 1-3
images with repeats, bad requests mixed in; every count right, every bad request a 400, a
clean log, flat memory."""

from __future__ import annotations

import csv

import pytest

from benchmarks.soak import main

pytestmark = pytest.mark.slow


def test_small_soak(tmp_path):
    assert (
        main(
            ["--requests", "80", "--concurrency", "8", "--bad-share", "0.1", "--out", str(tmp_path)]
        )
        == 0
    )
    (path,) = tmp_path.glob("*/soak.csv")
    (row,) = list(csv.DictReader(path.open()))
    assert row["ok"] == "True" and int(row["requests"]) == 80
    assert int(row["good_wrong"]) == 0 and int(row["bad_not_400"]) == 0
    assert int(row["bad"]) > 0 and int(row["log_errors"]) == 0
    assert float(row["rss_growth"]) <= 0.10
