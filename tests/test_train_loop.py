"""The scorer training loop on the tiny local Qwen2.5-VL: it trains, only the scorer moves,
it resumes exactly, and it writes a scorer that the serving path loads."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch

from vs_vllm.checkpoint import load_scorer, read_scorer_metadata
from vs_vllm.cli import main
from vs_vllm.scorer import VisionSelectorScorer
from vs_vllm.train.objective import soft_selection_losses
from vs_vllm.train.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def dataset(tiny_training_set):
    return tiny_training_set


def _config(tiny_model_dir, dataset, out, **kw):
    base = dict(
        model=str(tiny_model_dir),
        data=str(dataset),
        image_root=str(dataset.parent),
        out=str(out),
        keep_ratio=0.3,
        max_steps=4,
        global_batch=4,
        micro_batch=2,
        lr=1e-2,
        save_every=2,
        progress=False,
        max_pixels=28 * 28 * 16,
    )
    return TrainConfig(**{**base, **kw})


def test_only_the_scorer_trains(tiny_model_dir, dataset):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from vs_vllm.train.data import JsonlDataset, SampleEncoder, read_samples

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    model.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    data = JsonlDataset(read_samples(dataset, dataset.parent), SampleEncoder(processor))
    scorer = VisionSelectorScorer(64)
    start = {k: v.clone() for k, v in scorer.state_dict().items()}
    opt = torch.optim.AdamW(scorer.parameters(), lr=1e-2)
    for step in range(3):
        batch = data.collate([data[i] for i in (step, step + 1, step + 2)])
        losses = soft_selection_losses(model, scorer, batch, 0.3, 1.0)
        assert torch.isfinite(losses.total) and losses.bce > 0
        losses.total.backward()
        assert all(p.grad is None for p in model.parameters())
        opt.step()
        opt.zero_grad()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the backbone is bit-identical
    assert any(not torch.equal(v, start[k]) for k, v in scorer.state_dict().items())


def test_train_writes_scorer_curves_and_checkpoints(tiny_model_dir, dataset, tmp_path):
    result = train(_config(tiny_model_dir, dataset, tmp_path / "out"))
    assert result.steps == 4
    scorer = load_scorer(result.scorer_path, 64)  # what `vllm serve --vision-selector` loads
    assert scorer.hidden_size == 64
    meta = read_scorer_metadata(result.scorer_path)
    prov = meta["provenance"]
    assert prov["base_model"] == str(tiny_model_dir) and prov["keep_ratio"] == 0.3
    assert (
        prov["steps"] == 4 and len(prov["data_hash"]) == 64 and prov["schedule"]["bce_end"] == 2.0
    )
    rows = list(csv.DictReader((tmp_path / "out" / "train_curves.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    weights = [float(r["bce_weight"]) for r in rows]
    assert weights[0] == pytest.approx(0.1) and weights == sorted(weights)  # annealed upwards
    assert (tmp_path / "out" / "train_curves.png").is_file()
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
    ]


def test_resume_continues_exactly(tiny_model_dir, dataset, tmp_path):
    straight = train(_config(tiny_model_dir, dataset, tmp_path / "a"))
    # Interrupted after step 2: drop what steps 3-4 wrote, then resume.
    train(_config(tiny_model_dir, dataset, tmp_path / "b"))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000004")
    (tmp_path / "b" / "vision_selector.safetensors").unlink()
    resumed = train(_config(tiny_model_dir, dataset, tmp_path / "b", resume=True))
    a, b = load_scorer(straight.scorer_path), load_scorer(resumed.scorer_path)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    assert [r["loss"] for r in straight.curves] == [r["loss"] for r in resumed.curves]


def test_cli(tiny_model_dir, dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    main(
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(dataset),
            "--image-root",
            str(dataset.parent),
            "--out",
            str(out),
            "--max-steps",
            "1",
            "--global-batch",
            "2",
            "--micro-batch",
            "2",
            "--keep-ratio",
            "0.2",
            "--no-progress",
        ]
    )
    text = capsys.readouterr().out
    assert "vision_selector.safetensors after 1 steps" in text and "--vision-selector" in text
    with pytest.raises(SystemExit, match="multiple of --micro-batch"):
        main(
            [
                "train",
                "--model",
                "m",
                "--data",
                "d",
                "--out",
                str(out),
                "--global-batch",
                "5",
                "--micro-batch",
                "2",
            ]
        )


def test_scorer_is_written_without_matplotlib(
    tiny_model_dir, dataset, tmp_path, monkeypatch, capsys
):
    """matplotlib is optional: without it the scorer, its JSON and the curves CSV are written,
    and one line says the plot was not drawn."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # ``import matplotlib`` fails
    out = tmp_path / "no-mpl"
    result = train(_config(tiny_model_dir, dataset, out, max_steps=1, global_batch=2))
    assert result.scorer_path.is_file() and read_scorer_metadata(result.scorer_path) is not None
    assert (out / "train_curves.csv").is_file() and not (out / "train_curves.png").exists()
    assert "note: matplotlib is not installed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("bad_json", "{data}:2: invalid JSON"),
        ("missing_model", "vs-vllm: error: model folder not found: "),
        ("bad_ratio", "vs-vllm: error: --keep-ratio"),
    ],
)
def test_cli_errors_are_one_line(tiny_model_dir, dataset, tmp_path, case, expected):
    """Bad data, a missing model folder and bad arguments: ``vs-vllm: error: ...`` on stderr,
    exit status 1, no traceback (like ``vs-vllm serve``)."""
    import subprocess

    from vs_vllm.local_server import VS_VLLM

    data = tmp_path / "bad.jsonl"
    good = dataset.read_text().splitlines()[0]
    data.write_text(good + "\n{not json\n")
    args = {
        "--model": str(tiny_model_dir),
        "--data": str(data if case == "bad_json" else dataset),
        "--image-root": str(dataset.parent),
        "--out": str(tmp_path / "out"),
        "--max-steps": "1",
        "--keep-ratio": "1.5" if case == "bad_ratio" else "0.2",
    }
    if case == "missing_model":
        args["--model"] = str(tmp_path / "no-such-model")
    cmd = [VS_VLLM, "train", *[x for kv in args.items() for x in kv], "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vs-vllm: error: ")
    assert expected.format(data=data) in proc.stderr
