"""The DrPose trainer end to end on the tiny world: the deepspeed launcher with 1 and 2 gloo processes,
kill-and-resume, LoRA export, ZeRO-2/3, a diverging run, and configuration errors.

Runs are short (4 steps, 4 denoising steps) but go through the real entry point and every code path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drpose.data.synthesize import synthesize
from drpose.training.config import ConfigError, load_config
from drpose.training.lora import add_lora, load_lora
from drpose.training.metrics_log import read_metrics
from drpose.training.rendezvous import free_port
from drpose.world.assets import load_world

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
STEPS = 4
# Keys of a metrics row that must be reproduced exactly (timings and memory are not).
DETERMINISTIC = ("reward", "kl", "preserve_loss", "loss", "grad_norm", "lr")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "broad"
    synthesize(path, num=12, distribution="broad", seed=300, progress=False)
    return path


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs" / "tiny.yaml"),
        f"data.path={data}", "data.synthesize_distribution=null", f"run.output_dir={out}",
        f"run.max_steps={STEPS}", "run.checkpoint_every=2",
        "sampling.num_steps=4", "sampling.early_stop_max=2", "preserve.num=16",
        f"run.deepspeed_config={ROOT / 'configs' / 'ds_zero2.json'}",
        *extra,
    ]


def environment() -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env.pop("TRITON_INTERPRET", None)
    return env


def launch(args: list[str], processes: int | None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Through the deepspeed launcher (``processes`` ranks) or as a plain script (None)."""
    script = str(ROOT / "drpose" / "train.py")
    # a free rendezvous port: the launcher's default (29500) may be held by another job on the machine
    launcher = [str(DEEPSPEED), "--num_gpus", str(processes), "--master_port", str(free_port()), script]
    command = (launcher if processes else [sys.executable, script]) + args
    return subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def curve(out: Path) -> list[dict]:
    return [{k: row[k] for k in ("step", *DETERMINISTIC)} for row in read_metrics(out)]


@pytest.fixture(scope="module")
def reference_run(dataset, tmp_path_factory) -> Path:
    """One process through the deepspeed launcher, micro-batch 2."""
    out = tmp_path_factory.mktemp("runs") / "one_process"
    check(launch(run_args(dataset, out, "data.batch_size=2"), processes=1))
    return out


def test_reference_run_logs_checkpoints_and_exports(reference_run):
    rows = read_metrics(reference_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        assert row["reward"] < 0 and row["kl"] >= 0
        for key in ("grad_norm", "step_time_s", "samples_per_s", "peak_memory_mb", "lr"):
            assert key in row and row[key] == row[key], key
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 0, "adapters start as identity and then move"
    assert rows[0]["preserve_loss"] == 0.0 and rows[-1]["preserve_loss"] > 0, "so does the KL on narrow poses"
    checkpoints = sorted(p.name for p in (reference_run / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    assert (reference_run / "checkpoints" / "checkpoint-4" / "config.yaml").exists()
    assert list((reference_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (reference_run / "lora" / "pytorch_lora_weights.safetensors").stat().st_size > 0


def test_two_gloo_processes_reproduce_one_process_at_the_same_global_batch(reference_run, dataset, tmp_path):
    out = tmp_path / "two_processes"
    check(launch(run_args(dataset, out, "data.batch_size=1"), processes=2))
    one, two = curve(reference_run), curve(out)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two):  # stated tolerance: 1e-4 relative (float reduction order across ranks)
        for key in ("reward", "kl", "preserve_loss", "loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-9), (key, a, b)
    a = load_file(str(reference_run / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_killed_run_resumes_to_the_same_weights_and_metrics(reference_run, dataset, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "drpose" / "train.py"), *run_args(dataset, out, "data.batch_size=2")]
    process = subprocess.Popen(command, cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if any(r["step"] == 3 for r in read_metrics(out)):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run should have been killed after step 3"
    assert not (out / "lora").exists()
    resumed = launch(run_args(dataset, out, "data.batch_size=2") + ["--resume", "latest"], processes=None)
    check(resumed)
    assert "resumed from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    assert curve(out) == curve(reference_run)
    a = load_file(str(reference_run / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exported_lora_loads_with_diffusers_and_reproduces_the_finetuned_outputs(reference_run):
    world = load_world()
    state = torch.load(reference_run / "checkpoints" / "checkpoint-4" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["module"]
    finetuned = load_world().unet
    add_lora(finetuned, load_config(reference_run / "config.yaml").lora)
    missing, unexpected = finetuned.load_state_dict(state, strict=False)
    assert not unexpected and all("lora_" not in k for k in missing), "the checkpoint holds every adapter"
    loaded = world.unet
    load_lora(loaded, reference_run / "lora")
    gen = torch.Generator().manual_seed(0)
    x, cond = torch.randn(24, 4, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)
    with torch.no_grad():
        expected, actual = finetuned(x, torch.tensor([700, 100]), cond), loaded(x, torch.tensor([700, 100]), cond)
        base = load_world().unet(x, torch.tensor([700, 100]), cond)
    assert (expected - base).abs().max() > 1e-4, "fine-tuning changed the model"
    assert torch.allclose(actual, expected, atol=1e-5)


@pytest.mark.parametrize("ds_config", ["ds_zero3.json", "ds_zero3_offload.json"])
def test_zero3_runs(dataset, tmp_path, ds_config):
    out = tmp_path / ds_config
    args = run_args(dataset, out, "data.batch_size=1", "run.max_steps=2", f"run.deepspeed_config={ROOT / 'configs' / ds_config}")
    check(launch(args, processes=1))
    rows = read_metrics(out)
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)
    exported = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert exported and all(v.numel() > 0 for v in exported.values()), "ZeRO-3 adapters are gathered before export"


def test_diverging_run_stops_with_the_step_and_last_good_checkpoint(dataset, tmp_path):
    out = tmp_path / "diverging"
    result = launch(run_args(dataset, out, "data.batch_size=1", "optim.lr=1.0e30", "optim.warmup_steps=0",
                             "run.checkpoint_every=1"), processes=None)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "non-finite loss at step" in result.stderr
    assert "Last good checkpoint:" in result.stderr and "checkpoint-" in result.stderr
    assert "--resume latest" in result.stderr


def test_resume_with_changed_settings_says_what_differs(reference_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    args = run_args(Path("unused"), out, "lora.rank=4") + ["--resume", "latest"]
    args[args.index(next(a for a in args if a.startswith("data.path=")))] = f"data.path={load_config(reference_run / 'config.yaml').data.path}"
    result = launch(args, processes=None)
    assert result.returncode == 2
    assert "lora.rank: checkpoint 8, now 4" in result.stderr


def test_bad_configuration_is_refused_by_name(tmp_path):
    result = launch(["--config", str(ROOT / "configs" / "tiny.yaml"), "sampling.polcy=draft"], processes=None)
    assert result.returncode == 2 and "did you mean 'sampling.policy'" in result.stderr
    with pytest.raises(ConfigError, match="run.deepspeed_config"):
        from drpose.training.trainer import deepspeed_config

        deepspeed_config(load_config(None, ["run.deepspeed_config=missing.json"]), 1)
    with pytest.raises(ConfigError, match="reward.kl_weight must be >= 0"):
        load_config(None, ["reward.kl_weight=-1"])
    with pytest.raises(ConfigError, match=r"data.synthesize_fps_pool must be >= data.synthesize_num \(256\)"):
        load_config(None, ["data.synthesize_fps_pool=100"])
    assert load_config(None, ["data.synthesize_fps_pool=300"]).data.synthesize_fps_pool == 300


def test_a_stale_synthesized_dataset_is_refused_by_name(dataset):
    from drpose.data.dataset import DrPoseDataset
    from drpose.training.trainer import check_synthesized

    data = DrPoseDataset(dataset)  # 12 broad poses, seed 300, no selection from a pool
    check_synthesized(data, load_config(None, ["data.synthesize_distribution=broad", "data.synthesize_num=12"]))
    for changed in (["data.synthesize_num=16"], ["data.synthesize_seed=301"], ["data.synthesize_distribution=hard"],
                    ["data.synthesize_fps_pool=64"]):
        config = load_config(None, ["data.synthesize_distribution=broad", "data.synthesize_num=12", *changed])
        with pytest.raises(ConfigError, match=r"data.path: .* holds 12 synthetic records \(synthetic:broad:seed=300:\.\.\.\)"):
            check_synthesized(data, config)


def test_report_compares_base_and_finetuned_on_held_out_sets(reference_run, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "drpose.report", "--run", str(reference_run), "--out", str(out),
                             "--num", "2", "--steps", "2", "--reconstruction-num", "1"], cwd=ROOT, env=environment(),
                            capture_output=True, text=True, timeout=600)
    check(result)
    report = json.loads((out / "report.json").read_text())
    for set_name in ("hard", "narrow"):
        for model in ("base", "finetuned"):
            metrics = report[set_name][model]
            assert {"pck@0.05", "pck@0.1", "mpjpe", "pa_mpjpe", "pose_score"} <= set(metrics)
    assert report["hard"]["base"]["pose_score"] != report["hard"]["finetuned"]["pose_score"]
    for set_name in ("hard", "narrow"):  # one body per set carved into meshes, for both models and the oracle
        assert report[set_name]["base"]["reconstruction"]["samples"] == 1
        assert report["reconstruction"][set_name]["oracle"]["failures"] == 0
    for figure in ("reward_curve.png", "metrics.png", "hard_views.png", "narrow_views.png", "hard_meshes.png",
                   "narrow_meshes.png"):
        assert (out / figure).stat().st_size > 0, figure
    text = (out / "report.md").read_text()
    assert "PCK@0.1" in text and "| hard | oracle (true renders) |" in text
