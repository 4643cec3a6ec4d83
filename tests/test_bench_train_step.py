"""CPU smoke tests of benchmarks/train_step.py (tiny geometry) and of its 3B geometry (meta)."""

from __future__ import annotations

import csv

import pytest
import torch

from benchmarks import train_step


def test_train_step_cpu_smoke(tmp_path, capsys):
    argv = [
        "--geometry",
        "tiny",
        "--allow-cpu",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--image-size",
        "56,112",
        "--batch",
        "1,2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert train_step.main(argv) == 0
    (path,) = tmp_path.glob("*/train_step_tiny.csv")
    assert path.with_suffix(".png").stat().st_size > 0
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((int(r["image_px"]), int(r["batch"])) for r in rows) == [
        (56, 1),
        (56, 2),
        (112, 1),
        (112, 2),
    ]
    for r in rows:
        assert r["status"] == "ok"
        assert r["command"].startswith("python benchmarks/train_step.py --geometry tiny")
        assert "--allow-cpu" in r["command"]
        assert r["geometry"] == "tiny" and r["dtype"] == "float32" and r["torch"]
        assert int(r["visual_tokens"]) == (int(r["image_px"]) // 28) ** 2
        assert 1 <= int(r["kept_soft"]) < int(r["visual_tokens"])
        assert int(r["scorer_params"]) == 2 * (64 * 32 + 32)
        for key in ("ms_per_step", "steps_per_s", "samples_per_s", "weights_gib"):
            assert float(r[key]) > 0, key
        ms, steps, samples = (float(r[k]) for k in ("ms_per_step", "steps_per_s", "samples_per_s"))
        assert steps == pytest.approx(1e3 / ms, rel=1e-3)
        assert samples == pytest.approx(steps * int(r["batch"]), rel=1e-3)
        assert r["peak_gib"] == ""  # CUDA only
    out = capsys.readouterr().out
    assert "ms/step" in out and "steps/s" in out and "samples/s" in out


def test_refuses_cpu_without_allow_cpu(tmp_path, capsys):
    argv = ["--geometry", "tiny", "--device", "cpu", "--out", str(tmp_path)]
    assert train_step.main(argv) == 2
    assert "--allow-cpu" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["--image-size", "100"], ["--batch", "0"], ["--steps", "0"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit) as exc:
        train_step.parse_args(argv)
    assert exc.value.code == 2


def test_gradient_check_catches_a_trainable_backbone():
    geometry = train_step.geometry_for("tiny")
    model = train_step.build_backbone(geometry, torch.device("cpu"), torch.float32, seed=0)
    batch = train_step.make_batch(geometry, 56, 1, seed=0)
    hidden = model.config.vision_config.out_hidden_size
    step = train_step.TrainStep(model, hidden, batch, 0.2, total_steps=2, seed=0)
    step()  # frozen backbone: passes, and the scorer moved
    assert step.step == 1 and step.check_next is False
    model.lm_head.weight.requires_grad_(True)
    step.check_next = True
    with pytest.raises(RuntimeError, match="backbone parameters got gradients"):
        step()


def test_3b_geometry_on_meta():
    """The published Qwen2.5-VL-3B: 3.75B parameters with tied embeddings, D = 2048."""
    model = train_step.build_backbone(
        train_step.geometry_for("3b"), torch.device("meta"), torch.bfloat16, seed=0
    )
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.config.vision_config.out_hidden_size == 2048
    assert sum(p.numel() for p in model.parameters()) == 3_754_622_976
    assert all(not p.requires_grad for p in model.parameters())
