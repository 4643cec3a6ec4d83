"""``--name`` of the benchmark scripts accepts plain file stems only, before any work starts
(each script's own smoke test checks that it refuses a bad name)."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.results_name import file_stem


@pytest.mark.parametrize("name", ["quality", "prefill_latency_small", "run-2.b", "_x"])
def test_plain_stems_pass(name):
    assert file_stem(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "-flag", "two words"])
def test_other_names_are_refused(name):
    with pytest.raises(argparse.ArgumentTypeError, match="plain file stem"):
        file_stem(name)
