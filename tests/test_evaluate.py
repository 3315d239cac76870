"""The evaluation command on the built-in held-out set, and the metrics it reports."""

import json
import subprocess
import sys

import pytest
import torch

from drpose.evaluation.metrics_run import EvaluationOutputs, summarize


def outputs_with_errors(pixel_error: float, joint_error_m: float) -> EvaluationOutputs:
    gen = torch.Generator().manual_seed(0)
    truth2d = torch.rand(4, 6, 22, 2, generator=gen) * 60
    truth3d = torch.randn(4, 22, 3, generator=gen) * 0.3
    direction = torch.nn.functional.normalize(torch.randn(4, 6, 22, 2, generator=gen), dim=-1)
    offset3d = torch.nn.functional.normalize(torch.randn(4, 22, 3, generator=gen), dim=-1) * joint_error_m
    offset3d[:, 0] = 0  # the root stays put, so root-aligned MPJPE equals the offset size
    return EvaluationOutputs(torch.zeros(4, 6, 3, 64, 64), truth2d + pixel_error * direction, truth2d,
                             torch.ones(4, 6, 22, dtype=torch.bool), truth3d + offset3d, truth3d, torch.full((4,), -0.1))


def test_summary_metrics_are_exact_on_known_errors():
    names = ("front", "front_right", "right", "back", "left", "front_left")
    perfect = summarize(outputs_with_errors(0.0, 0.0), 64, names)
    assert perfect["pck@0.05"] == 1.0 and perfect["pck@0.1"] == 1.0
    assert perfect["mean_px_error"] == 0.0 and perfect["mpjpe"] == pytest.approx(0.0, abs=1e-9)
    off = summarize(outputs_with_errors(5.0, 0.05), 64, names)  # 5 px: beyond 3.2 (0.05), within 6.4 (0.1)
    assert off["pck@0.05"] == 0.0 and off["pck@0.1"] == 1.0
    assert off["mean_px_error"] == pytest.approx(5.0, rel=1e-5)
    assert off["mpjpe"] == pytest.approx(50.0 * 21 / 22, rel=1e-4)
    assert off["pose_score"] == pytest.approx(-0.1)


def test_family_breakdown_splits_the_metrics_by_kind_of_pose():
    from drpose.report import family_breakdown, family_table

    names = ("front", "front_right", "right", "back", "left", "front_left")
    exact, off = outputs_with_errors(0.0, 0.0), outputs_with_errors(5.0, 0.05)
    # The fine-tuned model: samples 0 and 2 ("split") exact, 1 and 3 ("tumble") 5 px / 5 cm off.
    exact_split = torch.tensor([True, False, True, False])
    mixed = EvaluationOutputs(*(None if getattr(exact, f) is None else
                                torch.where(exact_split.view(-1, *[1] * (getattr(exact, f).ndim - 1)),
                                            getattr(exact, f), getattr(off, f)) for f in EvaluationOutputs.__dataclass_fields__))
    breakdown = family_breakdown({"base": off, "finetuned": mixed}, ["split", "tumble", "split", "tumble"], 64, names)
    assert list(breakdown) == ["split", "tumble"]
    assert breakdown["split"]["finetuned"] == pytest.approx({"pck@0.1": 1.0, "mpjpe": 0.0, "pose_score": -0.1, "samples": 2},
                                                            abs=1e-6)
    assert breakdown["tumble"]["finetuned"]["mpjpe"] == pytest.approx(50.0 * 21 / 22, rel=1e-4)
    assert breakdown["split"]["base"]["mpjpe"] == pytest.approx(50.0 * 21 / 22, rel=1e-4)
    table = "\n".join(family_table("hard", breakdown))
    assert "| split | 2 | 1.000 | 1.000 | 47.7 | 0.0 |" in table and "| tumble | 2 |" in table


@pytest.mark.slow
def test_evaluate_command_on_the_builtin_hard_set(tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, "-m", "drpose.evaluate", "--checkpoint", "base", "--data", "builtin:hard",
                             "--num", "2", "--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())["hard"]["base"]
    for key in ("pck@0.05", "pck@0.1", "mean_px_error", "mpjpe", "pa_mpjpe", "pose_score"):
        assert metrics[key] == metrics[key], key
    assert metrics["samples"] == 2
    assert (out / "views.png").stat().st_size > 0 and (out / "metrics.png").stat().st_size > 0


def test_unknown_builtin_set_is_named(tmp_path):
    result = subprocess.run([sys.executable, "-m", "drpose.evaluate", "--checkpoint", "base", "--data", "builtin:easy",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "builtin:easy" in result.stderr
