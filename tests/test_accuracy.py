"""``benchmarks/accuracy.py``: lmms-eval 0.7.3 (``.venv-lmms``, made by
``scripts/setup-env-lmms.sh``) asking ``vs-vllm serve`` through its own OpenAI backend.

The slow test starts one server on the bundled demo model with the arguments accuracy.py gives
learned selection at keep 0.1, runs a small slice against it (``accuracy.py --url``: the first
:data:`LIMIT` held-out images of the local task ``vs_demo_ring``), then asks the same server the
same images through the repo's own client path (``vs_vllm.bundled_demo``'s request; greedy, so
deterministic) and checks that lmms-eval scored exactly those answers. It runs whenever
``.venv-lmms`` exists, and fails (naming the script that makes it) when it does not, unless
``VS_VLLM_SKIP_LMMS=1`` is set.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import accuracy
from vs_vllm import bundled_demo

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 6
RATIO = bundled_demo.DEMO_RATIO  # 0.1: the demo's own requests then set no ratio


def _lmms_venv_or_skip() -> None:
    if (accuracy.LMMS_VENV / "bin" / "python").exists():
        return
    if os.environ.get("VS_VLLM_SKIP_LMMS") == "1":
        pytest.skip(".venv-lmms is absent and VS_VLLM_SKIP_LMMS=1 (no lmms-eval run asked for)")
    pytest.fail(
        f"{accuracy.LMMS_VENV} is missing: run scripts/setup-env-lmms.sh "
        "(or set VS_VLLM_SKIP_LMMS=1 to skip the lmms-eval checks)"
    )


def test_configs_serve_keep_one_once_without_selection():
    plan = accuracy.configs(["learned", "random"], [1.0, 0.3, 0.1])
    assert [c.label for c in plan] == [
        "all tokens",
        "learned keep 0.3",
        "learned keep 0.1",
        "random keep 0.3",
        "random keep 0.1",
    ]
    assert accuracy.selection_args(plan[0], "S") == []
    assert accuracy.selection_args(plan[2], "S") == [
        "--vision-keep-ratio",
        "0.1",
        "--vision-selector-strategy",
        "learned",
        "--vision-selector",
        "S",
    ]
    assert "--vision-selector" not in accuracy.selection_args(plan[3], "S")


def test_rows_of_lmms_eval_results():
    results = {
        "results": {
            "mme": {
                "alias": "mme",
                "mme_perception_score,none": 1500.5,
                "mme_perception_score_stderr,none": "N/A",
                "mme_cognition_score,none": 300.0,
            },
            "vs_demo_ring": {"accuracy,none": 0.5, "accuracy_stderr,none": 0.22},
        },
        "n-samples": {"mme": {"effective": 20}, "vs_demo_ring": {"effective": 6}},
        "efficiency": {"by_task": {"vs_demo_ring": {"docs": 6, "total_input_tokens": 264}}},
    }
    rows = accuracy.rows_of(results, accuracy.Config("learned", 0.1))
    got = {(r["task"], r["metric"]): (r["value"], r["stderr"], r["n"]) for r in rows}
    assert got == {
        ("mme", "mme_perception_score"): (1500.5, "", 20),
        ("mme", "mme_cognition_score"): (300.0, "", 20),
        ("vs_demo_ring", "accuracy"): (0.5, 0.22, 6),
    }
    assert next(r for r in rows if r["task"] == "vs_demo_ring")["prompt_tokens"] == 44.0


def test_missing_lmms_venv_names_the_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/accuracy.py", "--lmms-venv", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "scripts/setup-env-lmms.sh" in proc.stderr, proc.stderr


def test_url_takes_one_configuration():
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/accuracy.py",
            "--url",
            "http://127.0.0.1:9",
            "--strategies",
            "learned",
            "--ratios",
            "0.3,0.1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [error] = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert error.startswith("accuracy.py: error: --url evaluates one running server"), error
    assert "learned keep 0.3, learned keep 0.1" in error, error
    assert proc.stdout == ""

    help_text = subprocess.run(
        [sys.executable, "benchmarks/accuracy.py", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    ).stdout
    assert "--url URL" in help_text


def _repo_answers(items: list[dict], url: str) -> list[str]:
    """The answers of the repo's own path: ``vs_vllm.bundled_demo``'s request, asked of the
    server at ``url``."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    name = client.models.list().data[0].id
    return [bundled_demo._ask(client, name, item, accuracy.DEMO, RATIO).answer for item in items]


def _text(response) -> str:
    return (response[0] if isinstance(response, list) else response).strip()


@pytest.mark.slow
def test_lmms_eval_slice_on_the_bundled_demo(tmp_path):
    _lmms_venv_or_skip()
    from vs_vllm.local_server import TINY_MODEL_SERVE_ARGS, served

    work, out = tmp_path / "work", tmp_path / "results"
    items = [json.loads(x) for x in (accuracy.DEMO / "questions.jsonl").read_text().splitlines()]
    items = items[:LIMIT]
    # one server, started with the arguments accuracy.py would give it, asked by both paths
    config = accuracy.Config("learned", RATIO)
    args = [*TINY_MODEL_SERVE_ARGS, *accuracy.selection_args(config, str(accuracy.DEMO / "scorer"))]
    log = tmp_path / "server.log"
    with served(accuracy.DEMO / "backbone", *args, log=log) as url:
        proc = subprocess.run(
            [
                sys.executable,
                "benchmarks/accuracy.py",
                "--url",
                url,
                "--strategies",
                "learned",
                "--ratios",
                str(RATIO),
                "--limit",
                str(LIMIT),
                "--out",
                str(out),
                "--work",
                str(work),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
        )
        assert proc.returncode == 0, (
            proc.stdout[-3000:] + proc.stderr[-5000:] + log.read_text()[-2000:]
        )
        expected = _repo_answers(items, url)  # the repo's own path, asking the same server
    assert f"evaluating the server at {url}" in proc.stdout
    assert "starting vs-vllm serve" not in proc.stdout  # accuracy.py started no server
    [csv_path] = out.glob("*/accuracy.csv")
    assert csv_path.with_suffix(".png").stat().st_size > 1000
    [row] = list(csv.DictReader(csv_path.open()))
    assert (row["strategy"], float(row["keep_ratio"]), row["task"], row["metric"]) == (
        "learned",
        RATIO,
        "vs_demo_ring",
        "accuracy",
    )
    assert int(row["n"]) == LIMIT
    assert row["command"].startswith("python benchmarks/accuracy.py") and row["date"]

    # lmms-eval's own record: LIMIT samples scored, one per image, in the task's order
    results, [samples_path] = accuracy.parse_results(work / f"lmms_learned_{RATIO:g}")
    assert results["n-samples"]["vs_demo_ring"]["effective"] == LIMIT
    samples = sorted(
        (json.loads(line) for line in samples_path.read_text().splitlines()),
        key=lambda s: s["doc_id"],
    )
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))
    assert [s["target"] for s in samples] == [item["answer"] for item in items]

    # the same images through the repo's own path give the same answers, so the same accuracy
    assert [_text(s["filtered_resps"]) for s in samples] == [a.strip() for a in expected]
    right = sum(
        bundled_demo.Answer(i["image"], i["question"], i["answer"], a, 0, 0.0).correct
        for a, i in zip(expected, items, strict=True)
    )
    assert float(row["value"]) == pytest.approx(right / LIMIT)
