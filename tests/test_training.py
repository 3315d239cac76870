"""The DrPose trainer end to end, and runs that lose nothing.

Most runs use a small random PSHuman-format bundle (24x24 latents, 48 px images; ``tests/kill_resume.py``
writes it with a config whose paths are relative to the config file) for 2-3 steps of 2 denoising steps, and
go through the real entry point (``drpose/train.py`` in a subprocess): checkpoints (atomic, rotated, marked
good), the output folder's lock and refusals, resume (what comes from the checkpoint, a changed learning
rate applied, a non-finite stop naming a really good checkpoint), configuration, data and checkpoint errors
as one message, LoRA export and evaluation. Saving, rotation and locking are also tested in process,
crashes included.

Tests marked ``world`` train the shipped tiny world (``model.pipeline: null``); set ``DRPOSE_TEST_WORLD`` to a
world folder (with ``pipeline/`` and ``g_skel/``) to run them on another one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drpose.training import checkpoints
from drpose.training.config import ConfigError, check_files, load_config, read_deepspeed_config
from drpose.training.metrics_log import read_metrics
from drpose.training.rendezvous import free_port
from drpose.training.run_folder import LOCK, RunLock, claim, run_contents

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kill_resume  # noqa: E402
from kill_resume import ROOT, curve, environment, train  # noqa: E402

DEEPSPEED = Path(sys.executable).parent / "deepspeed"
WORLD = os.environ.get("DRPOSE_TEST_WORLD")


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> Path:
    """The bundle, 4 poses and ``configs/run.yaml`` (paths relative to it) in one folder."""
    return kill_resume.write_fixture(tmp_path_factory.mktemp("fixture"))


@pytest.fixture(scope="module")
def reference_run(fixture, tmp_path_factory) -> Path:
    """3 steps, a checkpoint after each (2 kept), run from an unrelated working folder: the config's relative
    paths are the config file's."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    out = fixture.parent.parent / "runs" / "reference"
    result = train(fixture, out, cwd=elsewhere)
    check(result)
    assert not list(elsewhere.iterdir()), "nothing is written into the working folder"
    return out


def check(result: subprocess.CompletedProcess, code: int = 0) -> None:
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / run.name
    shutil.copytree(run, out)
    return out


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr without the libraries' warnings and progress bars."""
    return [line for line in result.stderr.splitlines()
            if line.startswith(("drpose", "Traceback", "[rank")) or "Error" in line]


# --- a run: checkpoints, lock, paths, export, evaluation ---------------------------------------------------------


def test_run_writes_complete_good_checkpoints_and_releases_its_folder(reference_run, fixture):
    assert [r["step"] for r in read_metrics(reference_run)] == [1, 2, 3]
    assert [r["lr"] for r in read_metrics(reference_run)] == [2e-3] * 3, "the learning rate each step used"
    root = reference_run / "checkpoints"
    assert [s for s, _ in checkpoints.existing(root)] == [2, 3]
    assert (root / checkpoints.LATEST).read_text() == "checkpoint-3"
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "no temporary folder left"
    info2, info3 = checkpoints.read_info(root / "checkpoint-2"), checkpoints.read_info(root / "checkpoint-3")
    assert info2["weights_finite"] and info2["next_loss_finite"] is True, "step 3's loss was finite"
    assert info3["weights_finite"] and info3["next_loss_finite"] is None, "nothing ran after step 3"
    assert set(info3["files"]) >= {"config.yaml", "mp_rank_00_model_states.pt"}
    assert checkpoints.last_good(root) == root / "checkpoint-2"
    assert not (reference_run / LOCK).exists(), "the lock is released at the end"
    saved = load_config(reference_run / "config.yaml")
    assert saved.data.path == str(fixture.parent.parent / "data"), "relative to the config file, saved absolute"
    assert saved.run.deepspeed_config == str(fixture.parent / "ds.json")
    assert json.loads((reference_run / "summary.json").read_text())["steps"] == 3


def test_exported_lora_reproduces_the_checkpoint_with_diffusers_loader(reference_run):
    from drpose.models.bundle import ModelBundle
    from drpose.training.lora import add_lora, load_lora

    config = load_config(reference_run / "config.yaml")

    def unet():
        return ModelBundle.load(config.model.pipeline, config.model.g_skel).pipeline.unet

    state = torch.load(reference_run / "checkpoints" / "checkpoint-3" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["module"]
    finetuned = unet()
    add_lora(finetuned, config.lora)
    missing, unexpected = finetuned.load_state_dict(state, strict=False)
    assert not unexpected and all("lora_" not in k for k in missing), "the checkpoint holds every adapter"
    loaded, base = unet(), unet()
    load_lora(loaded, reference_run / "lora")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(14, 8, 24, 24, generator=gen)
    t = torch.tensor([700] * 14)
    hidden = torch.randn(14, 77, 24, generator=gen)
    labels = torch.randn(14, 16, generator=gen)
    with torch.no_grad():
        expected, actual = (m(x, t, hidden, class_labels=labels).sample for m in (finetuned, loaded))
        plain = base(x, t, hidden, class_labels=labels).sample
    assert (expected - plain).abs().max() > 1e-6, "fine-tuning changed the model"
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's adapters, or an exported LoRA's, under one naming (the exported one without ``unet.``,
    the checkpoint's without peft's adapter name)."""
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        return {k.removeprefix("unet."): v for k, v in load_file(folder / "pytorch_lora_weights.safetensors").items()}
    state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k.replace(".default", ""): v for k, v in state.items() if "lora_" in k}


@pytest.fixture(scope="module")
def ema_run(fixture, tmp_path_factory) -> Path:
    """``reference_run``'s settings with ``optim.ema_decay=0.2`` and every checkpoint kept."""
    out = tmp_path_factory.mktemp("ema") / "run"
    check(train(fixture, out, "optim.ema_decay=0.2", "run.keep_checkpoints=3"))
    return out


def test_ema_exports_the_average_of_the_steps_weights_and_leaves_training_as_it_was(ema_run, reference_run):
    """lora_last/ is the run without the average, bit for bit; lora/ is the average of the weights after steps
    1-3 (read from the checkpoints), by an independent float64 recurrence: w1, then decay min(0.2, s/(s+9))."""
    assert curve(ema_run) == curve(reference_run)
    last, plain = adapter_weights(ema_run / "lora_last"), adapter_weights(reference_run / "lora")
    assert last.keys() == plain.keys() and all(torch.equal(last[k], plain[k]) for k in plain)
    steps = [adapter_weights(ema_run / "checkpoints" / f"checkpoint-{s}") for s in (1, 2, 3)]
    assert steps[0].keys() == plain.keys()
    average = adapter_weights(ema_run / "lora")
    moved = 0
    for key in plain:
        expected = steps[0][key].double()
        for s in (2, 3):
            decay = min(0.2, s / (s + 9))
            expected = decay * expected + (1 - decay) * steps[s - 1][key].double()
        torch.testing.assert_close(average[key].double(), expected, rtol=1e-6, atol=1e-7)
        moved += not torch.equal(average[key], last[key])
    assert moved > len(plain) // 4, "the average differs from the last step's weights"
    summary = json.loads((ema_run / "summary.json").read_text())
    assert summary["lora_last"] == str(ema_run / "lora_last" / "pytorch_lora_weights.safetensors")
    info = checkpoints.read_info(ema_run / "checkpoints" / "checkpoint-2")
    assert info["files"]["ema.pt"] > 0, "the average is a recorded, checked file of the checkpoint"


def test_a_resumed_ema_run_continues_the_average_bit_identical(ema_run, reference_run, fixture, tmp_path):
    out = copy_run(ema_run, tmp_path)
    result = train(fixture, out, "--resume", "2", "optim.ema_decay=0.2", "run.keep_checkpoints=3")
    check(result)
    assert "holds no average" not in result.stdout and "the adapters' average (optim.ema_decay)" in result.stdout
    assert kill_resume.lora(out) == kill_resume.lora(ema_run) and curve(out) == curve(ema_run)
    # a run without the average, resumed with one: it starts from the checkpoint's weights (said so)
    plain = copy_run(reference_run, tmp_path / "plain")
    result = train(fixture, plain, "--resume", "2", "optim.ema_decay=0.5")
    check(result)
    assert "holds no average of the adapters" in result.stdout
    w2 = adapter_weights(ema_run / "checkpoints" / "checkpoint-2")
    w3 = adapter_weights(ema_run / "checkpoints" / "checkpoint-3")
    average = adapter_weights(plain / "lora")
    for key, value in average.items():
        expected = 3 / 12 * w2[key].double() + 9 / 12 * w3[key].double()
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)


def test_zero3_averages_each_ranks_partition_to_the_same_adapters(ema_run, fixture, tmp_path):
    out = tmp_path / "zero3"
    check(train(fixture, out, "optim.ema_decay=0.2", f"run.deepspeed_config={ROOT / 'configs' / 'ds_zero3.json'}"))
    assert (out / "checkpoints" / "checkpoint-3" / "ema_rank0.pt").is_file()
    average, expected = adapter_weights(out / "lora"), adapter_weights(ema_run / "lora")
    assert average.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(average[key], value, rtol=1e-5, atol=1e-6)


def test_evaluate_reads_the_run(reference_run, fixture, tmp_path):
    data = fixture.parent.parent / "data"
    result = subprocess.run([sys.executable, "-m", "drpose.evaluate", "--checkpoint", str(reference_run), "--data",
                             str(data), "--out", str(tmp_path), "--num", "2", "--steps", "2"], cwd=ROOT,
                            env=environment(), capture_output=True, text=True, timeout=600)
    check(result)
    metrics = json.loads((tmp_path / "metrics.json").read_text())["data"][str(reference_run)]
    assert metrics["samples"] == 2
    for key in ("pck@0.05", "pck@0.1", "mpjpe", "pose_score"):
        assert key in metrics and metrics[key] == metrics[key], key
    assert metrics["pose_score"] <= 0
    assert (tmp_path / "views.png").stat().st_size > 0


# --- the output folder belongs to one run -------------------------------------------------------------------------


def test_a_folder_holding_a_run_is_refused_without_resume_and_left_as_it_was(reference_run, fixture):
    before = {p: p.stat().st_mtime_ns for p in reference_run.rglob("*")}
    result = train(fixture, reference_run)
    check(result, 2)
    message = "\n".join(error_lines(result))
    assert f"{reference_run} holds a finished run (checkpoints at steps 2, 3; metrics.jsonl up to step 3" in message
    assert "--resume latest" in message and "--overwrite" in message
    assert "Traceback" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in reference_run.rglob("*")} == before


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(fixture, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    lock = RunLock(out)  # this test process holds it, as a first run would
    try:
        result = train(fixture, out)
    finally:
        lock.release()
    check(result, 2)
    assert f"is in use by another run (pid {os.getpid()} on host {socket.gethostname()}" in result.stderr
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()


def test_lock_names_its_holder_takes_over_stale_locks_and_refuses_foreign_ones(tmp_path):
    lock = RunLock(tmp_path)
    holder = json.loads((tmp_path / LOCK).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(ConfigError, match=f"in use by another run \\(pid {os.getpid()} on host"):
        RunLock(tmp_path)  # a second open file: flock refuses it as it refuses another process
    lock.release()
    assert not (tmp_path / LOCK).exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    taken = RunLock(tmp_path)  # its holder was SIGKILLed: no flock, but the file is still there
    assert taken.stale["pid"] == dead.pid and f"stale lock {tmp_path / LOCK} of pid {dead.pid}" in taken.note
    taken.release()

    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
    with pytest.raises(ConfigError, match=f"pid {os.getppid()} on host .*still running"):
        RunLock(tmp_path)  # a live process named in the file (a filesystem without flock): not stale
    (tmp_path / LOCK).write_text(json.dumps({"host": "gpu-node-7", "pid": 123}))
    with pytest.raises(ConfigError, match=f"locked by pid 123 on host gpu-node-7 .*if it does not, delete {tmp_path}"):
        RunLock(tmp_path)


def test_claim_refuses_started_runs_and_overwrite_deletes_only_the_runs_files(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n")
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    assert run_contents(tmp_path) == "a started run (checkpoints at steps 2; metrics.jsonl up to step 2)"
    with pytest.raises(ConfigError, match="holds a started run .*--resume latest.*--overwrite"):
        claim(tmp_path, resume=False, overwrite=False)
    assert not (tmp_path / LOCK).exists(), "a refused run leaves no lock"
    with pytest.raises(ConfigError, match="exclude each other"):
        claim(tmp_path, resume=True, overwrite=True)
    lock, contents = claim(tmp_path, resume=False, overwrite=True)
    assert contents.startswith("a started run") and "--overwrite: deleted a started run" in lock.note
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    lock, contents = claim(tmp_path / "new" / "run", resume=False, overwrite=False)
    assert contents is None
    lock.release()


# --- atomic checkpoints (in process; a crash mid-save is an exception in the fake engine) -------------------------


class FakeEngine:
    """Writes what DeepSpeed's save writes (two files per tag); ``crash`` stops it between the two."""

    def __init__(self):
        self.crash = False

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
        if self.crash:
            raise KeyboardInterrupt("killed during the save")
        (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 200)
        if save_latest:
            (Path(save_dir) / "latest").write_text(tag)


def fake_save(engine, config, step, finite=True):
    return checkpoints.save(engine, config, step, {"step": step}, finite, True, lambda: None)


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_and_latest(tmp_path):
    config = load_config(None, [f"run.output_dir={tmp_path}", "run.keep_checkpoints=1"])
    engine = FakeEngine()
    fake_save(engine, config, 1)
    engine.crash = True
    with pytest.raises(KeyboardInterrupt):
        fake_save(engine, config, 2)
    root = tmp_path / "checkpoints"
    assert [s for s, _ in checkpoints.existing(root)] == [1], "rotation waits for a successful save"
    assert (root / "latest").read_text() == "checkpoint-1"
    assert not (root / "checkpoint-2").exists() and (root / ".saving-checkpoint-2").is_dir()
    assert checkpoints.resolve_resume(config, "latest") == root / "checkpoint-1"
    engine.crash = False
    fake_save(engine, config, 2)
    assert sorted(p.name for p in root.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert (root / "latest").read_text() == "checkpoint-2"


def test_partial_and_damaged_checkpoints_are_named_with_the_one_to_use(tmp_path):
    config = load_config(None, [f"run.output_dir={tmp_path}", "run.keep_checkpoints=5"])
    engine = FakeEngine()
    for step in (1, 2, 3):
        fake_save(engine, config, step)
    root = tmp_path / "checkpoints"
    checkpoints.record_next_loss(root / "checkpoint-1", True)
    checkpoints.record_next_loss(root / "checkpoint-2", True)
    (root / "checkpoint-4").mkdir()  # e.g. copied by hand, or written by something else
    assert [s for s, _ in checkpoints.existing(root)] == [1, 2, 3], "a folder without its info is no checkpoint"
    with pytest.raises(ConfigError, match="checkpoint-4 is incomplete .*--resume 2"):
        checkpoints.resolve_resume(config, "4")
    with open(root / "checkpoint-3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "r+b") as f:
        f.truncate(50)
    with pytest.raises(ConfigError, match=r"checkpoint-3 is damaged \(zero_pp_rank_0_mp_rank_00_optim_states.pt: "
                                          r"50 bytes, written as 200\); resume from the last good checkpoint with "
                                          r"--resume 2"):
        checkpoints.resolve_resume(config, "latest")
    checkpoints.record_next_loss(root / "checkpoint-2", False)
    with pytest.raises(ConfigError, match="checkpoint-2 is not good: the step after it \\(step 3\\) had a non-finite "
                                          "loss; resume from the last good checkpoint with --resume 1"):
        checkpoints.resolve_resume(config, "2")


def test_rotation_keeps_the_newest_good_checkpoint(tmp_path):
    config = load_config(None, [f"run.output_dir={tmp_path}", "run.keep_checkpoints=1"])
    engine = FakeEngine()
    root = tmp_path / "checkpoints"
    fake_save(engine, config, 1)
    checkpoints.record_next_loss(root / "checkpoint-1", True)
    fake_save(engine, config, 2)
    fake_save(engine, config, 3, finite=False)
    assert [s for s, _ in checkpoints.existing(root)] == [1, 3], "1 is the newest good one, 3 the newest"
    with pytest.raises(ConfigError, match="checkpoint-3 holds non-finite weights; .*--resume 1"):
        checkpoints.resolve_resume(config, "latest")


def test_resume_latest_without_a_checkpoint_starts_a_started_run_again(tmp_path):
    config = load_config(None, [f"run.output_dir={tmp_path}"])
    assert checkpoints.resolve_resume(config, "latest", run_started=True) is None
    with pytest.raises(ConfigError, match="no run to resume"):
        checkpoints.resolve_resume(config, "latest", run_started=False)


# --- resume: what comes from where; a non-finite stop names a good checkpoint ----------------------------------------


def test_resume_with_a_ruinous_learning_rate_applies_it_and_stops_naming_a_really_good_checkpoint(reference_run,
                                                                                                    fixture, tmp_path):
    out = copy_run(reference_run, tmp_path)
    result = train(fixture, out, "--resume", "2", "optim.lr=1e10", "run.max_steps=5")
    check(result, 3)
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-2'} at step 2 of 5" in result.stdout
    assert "from the checkpoint: the LoRA weights, the optimizer moments and the step" in result.stdout
    changed = result.stdout.split("changed since the checkpoint, applied from step 3: ")[1].splitlines()[0]
    assert changed.split("; ") == ["run.max_steps 3 -> 5", "optim.lr 0.002 -> 10000000000.0"]
    assert "moved the checkpoints after step 2" in result.stdout and (out / "checkpoints" / "superseded" /
                                                                        "checkpoint-3").is_dir()
    rows = read_metrics(out)
    assert rows[1] == read_metrics(reference_run)[1] and rows[2]["lr"] == 1e10, "the new learning rate is applied"
    stop = [line for line in result.stderr.splitlines() if line.startswith("drpose: stopped:")]
    assert len(stop) == 1, result.stderr[-3000:]
    failed = rows[-1]["step"] + 1  # the step in the metrics' numbering
    assert f"non-finite loss at step {failed} " in stop[0]
    root = out / "checkpoints"
    bad = checkpoints.read_info(root / f"checkpoint-{failed - 1}")
    assert bad["weights_finite"] and bad["next_loss_finite"] is False, "finite but ruinous weights are marked"
    good = checkpoints.last_good(root)
    assert checkpoints.read_info(good)["step"] < failed - 1
    assert f"Last good checkpoint: {good}." in stop[0] and f"--resume {good.name.split('-')[1]}" in stop[0]
    again = train(fixture, out, "--resume", "latest", "optim.lr=1e10", "run.max_steps=5")
    check(again, 2)
    assert f"checkpoint-{failed - 1} is not good: the step after it (step {failed}) had a non-finite loss" \
        in again.stderr
    assert "Traceback" not in again.stderr


def test_a_restored_optimizer_takes_the_configs_learning_rate_warmup_and_weight_decay():
    from drpose.training.trainer import _lr_lambda

    def make(lr, warmup, decay):
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.AdamW([param], lr=lr, weight_decay=decay)
        return param, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup))

    param, optimizer, scheduler = make(2e-3, 10, 0.0)
    for _ in range(3):
        param.sum().backward()
        optimizer.step()
        scheduler.step()
    saved = optimizer.state_dict(), scheduler.state_dict()
    param, optimizer, scheduler = make(1e-4, 4, 0.1)  # the config the run resumes with
    optimizer.load_state_dict(saved[0])  # what DeepSpeed's load_checkpoint does
    scheduler.load_state_dict(saved[1])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * 4 / 10), "the checkpoint's, until applied"
    config = load_config(None, ["optim.lr=1e-4", "optim.warmup_steps=4", "optim.weight_decay=0.1"])
    checkpoints.apply_optimizer_settings(scheduler, config)
    group = optimizer.param_groups[0]
    assert group["lr"] == scheduler.get_last_lr()[0] == 1e-4 * 4 / 4 and group["weight_decay"] == 0.1
    assert len(optimizer.state_dict()["state"]) == 1, "the moments stay the checkpoint's"
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 1e-4, "the schedule continues from the config's settings"


def test_the_cosine_schedule_warms_up_then_falls_to_its_floor_at_the_last_step():
    import math

    from drpose.training.trainer import _lr_lambda

    constant = _lr_lambda(4, "constant", 20)
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = _lr_lambda(4, "cosine", 21, min_lr_ratio=0.1)
    assert [cosine(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0], "the same warm-up, then the peak"
    # steps 4..20 run the half cosine: step 20, the run's last, has the floor; midway, the mean of 1 and 0.1
    assert cosine(20) == pytest.approx(0.1) and cosine(12) == pytest.approx(0.55)
    assert cosine(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 16)))
    assert cosine(40) == pytest.approx(0.1), "past max_steps (a resumed, longer run) it stays at the floor"
    values = [cosine(s) for s in range(4, 21)]
    assert all(a > b for a, b in zip(values, values[1:]))
    no_warmup = _lr_lambda(0, "cosine", 11)
    assert no_warmup(0) == 1.0 and no_warmup(10) == pytest.approx(0.0) and no_warmup(5) == pytest.approx(0.5)


def test_a_restored_cosine_schedule_continues_as_if_uninterrupted():
    from drpose.training.trainer import _lr_lambda

    config = load_config(None, ["optim.lr=1e-2", "optim.warmup_steps=2", "optim.schedule=cosine", "run.max_steps=9"])
    optim = config.optim

    def make():
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.AdamW([param], lr=optim.lr)
        schedule = _lr_lambda(optim.warmup_steps, optim.schedule, config.run.max_steps, optim.min_lr_ratio)
        return param, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def steps(param, optimizer, scheduler, count):
        used = []
        for _ in range(count):
            used.append(optimizer.param_groups[0]["lr"])
            param.sum().backward()
            optimizer.step()
            scheduler.step()
        return used

    whole = steps(*make(), 9)
    param, optimizer, scheduler = make()
    first = steps(param, optimizer, scheduler, 4)
    saved = optimizer.state_dict(), scheduler.state_dict()
    param, optimizer, scheduler = make()
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    checkpoints.apply_optimizer_settings(scheduler, config)
    assert first + steps(param, optimizer, scheduler, 5) == pytest.approx(whole, rel=1e-12)
    assert whole[1] == pytest.approx(1e-2) and whole[-1] == pytest.approx(0.0, abs=1e-12)


def test_resume_below_max_steps_is_refused_before_any_work(reference_run, fixture, tmp_path):
    from drpose.training.trainer import claim_output

    out = copy_run(reference_run, tmp_path)
    ctx = type("Ctx", (), {"is_main": True, "any": lambda self, flag: flag, "share": lambda self, value: value})()
    below = f"run.max_steps=2 is below the step of {out / 'checkpoints' / 'checkpoint-3'} \\(3\\); raise run.max_steps"
    with pytest.raises(ConfigError, match=below):
        claim_output(load_config(fixture, [f"run.output_dir={out}", "run.max_steps=2"]), ctx, "latest", False)
    assert not (out / LOCK).exists() and (out / "summary.json").exists(), "refused: the folder is as it was"
    lock, folder, changes = claim_output(load_config(fixture, [f"run.output_dir={out}", "optim.lr=1e-3"]), ctx,
                                         "latest", False)
    lock.release()
    assert folder == out / "checkpoints" / "checkpoint-3" and changes == {"optim.lr": (2e-3, 1e-3)}
    assert not (out / "summary.json").exists(), "a resumed run is a started run again until it ends"


def test_resume_with_a_changed_setting_that_must_match_is_refused(reference_run, fixture, tmp_path):
    out = copy_run(reference_run, tmp_path)
    result = train(fixture, out, "--resume", "latest", "lora.rank=8")
    check(result, 2)
    assert "lora.rank: checkpoint 4, now 8" in result.stderr


def test_a_damaged_checkpoint_file_is_named_with_the_previous_checkpoint(reference_run, fixture, tmp_path):
    out = copy_run(reference_run, tmp_path)
    states = out / "checkpoints" / "checkpoint-3" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 4096] = bytes(4096)  # same size, bytes gone
    states.write_bytes(bytes(data))
    result = train(fixture, out, "--resume", "latest")
    check(result, 2)
    lines = error_lines(result)
    assert f"drpose: {out / 'checkpoints' / 'checkpoint-3'} is damaged (" in lines[0], lines
    assert "resume from the last good checkpoint with --resume 2" in lines[0]
    assert "Traceback" not in result.stderr


# --- bad settings, files and data: one message each, before any work ----------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("sampling.num_grad_steps=0", r"sampling.num_grad_steps \(K\) must be >= 1"),
    ("sampling.num_grad_steps=11", r"sampling.num_grad_steps \(K=11\) must be <= sampling.num_steps \(T=10\)"),
    ("sampling.policy=drtune sampling.early_stop_max=3 sampling.num_grad_steps=8",
     r"sampling.num_grad_steps \(K=8\) must be <= sampling.num_steps - sampling.early_stop_max \(T - m = 7\)"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.lr=.nan", "optim.lr must be a finite number"),
    ("reward.sigma=0", "reward.sigma must be > 0"),
    ("run.log_every=0", "run.log_every must be >= 1"),
    ("sampling.policy=none", "sampling.policy none carries no gradient .*nothing would train"),
    ("sampling.policy=drtun", "sampling.policy must be one of"),
    ("lora.alpha=0", "lora.alpha must be > 0"),
    ("lora.dropout=1", r"lora.dropout must be in \[0, 1\)"),
    ("optim.warmup_steps=-3", "optim.warmup_steps must be >= 0"),
    ("optim.schedule=linear", r"optim.schedule must be one of \('constant', 'cosine'\), got 'linear'"),
    ("optim.min_lr_ratio=1.5", r"optim.min_lr_ratio must be in \[0, 1\], got 1.5"),
    ("optim.ema_decay=1", r"optim.ema_decay must be in \(0, 1\) or null, got 1"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("data.synthesize_distribution=wide", "data.synthesize_distribution must be one of"),
    ("data.synthesize_breaking_share=1.5", r"data.synthesize_breaking_share must be in \[0, 1\] or null, got 1.5"),
    ("data.synthesize_breaking_share=0.5 data.synthesize_distribution=narrow",
     "data.synthesize_breaking_share: only `broad` has breaking moves, but data.synthesize_distribution is 'narrow'"),
    ("sampling.policy=[", "override 'sampling.policy=\\[': the value is not valid YAML \\(line 1, column 2"),
    ("sampling.polcy=draft", "did you mean 'sampling.policy'"),
])
def test_bad_settings_are_refused_by_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "tiny.yaml", override.split(" "))


def test_yaml_and_deepspeed_json_errors_name_the_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  max_steps: 3\n  seed: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML: line 4, column 1"):
        load_config(bad)
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match=f"run.deepspeed_config: {ds} is not valid JSON: line 1, column 35"):
        read_deepspeed_config(ds)
    for section in ("optimizer", "scheduler", "gradient_clipping", "train_batch_size", "torch_autocast"):
        ds.write_text(json.dumps({section: {"type": "AdamW", "params": {"lr": 1e-4}}}))
        with pytest.raises(ConfigError, match=f"{ds} has a '{section}' section; .* leave it out"):
            read_deepspeed_config(ds)
    ds.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="'bf16' is enabled; precision is set by run.precision"):
        read_deepspeed_config(ds)
    read_deepspeed_config(ROOT / "configs" / "ds_zero3_offload.json")


def test_the_engine_keeps_the_steps_autocast_in_bf16(monkeypatch):
    """DeepSpeed's engine switches an autocast that is active around its forward off inside it unless its own
    ``torch_autocast`` is enabled; it asks ``torch.is_autocast_enabled()``, which reads CUDA's state. Here
    that question reads the CPU's state, as it reads CUDA's on a GPU, so the step's autocast is seen as a GPU
    run's would be. With the trainer's DeepSpeed config the gradient-carrying calls through the engine keep
    bf16 autocast (without it they ran in plain bf16 on GPUs), no parameter is marked for bf16 gradient
    communication, and fp32 runs get no autocast section."""
    import deepspeed
    import torch.distributed as dist

    from drpose.training.trainer import deepspeed_config

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)
            self.seen = []

        def forward(self, x):
            self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return self.linear(x)

    config = load_config(ROOT / "configs" / "tiny.yaml")
    assert "torch_autocast" not in deepspeed_config(config, 1, torch.float32)
    ds = deepspeed_config(config, 1, torch.bfloat16)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    started_here = not dist.is_initialized()
    if started_here:
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    try:
        probe = Probe()
        engine, *_ = deepspeed.initialize(model=probe, model_parameters=list(probe.parameters()),
                                          optimizer=torch.optim.AdamW(probe.parameters(), lr=1e-3), config=ds,
                                          dist_init_required=False)
        real = torch.is_autocast_enabled
        monkeypatch.setattr(torch, "is_autocast_enabled",
                            lambda *args, **kwargs: real(*args, **kwargs) if args or kwargs else real("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            engine(torch.randn(2, 4))
        assert probe.seen == [(True, torch.bfloat16)]
        assert not any(hasattr(p, "comm_dtype") for p in probe.parameters())
    finally:
        if started_here:
            dist.destroy_process_group()


def test_paths_are_relative_to_the_config_file_and_the_command_line_to_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    file = tmp_path / "configs" / "run.yaml"
    file.write_text("run: {output_dir: ../runs/a, deepspeed_config: ds.json}\ndata: {path: ~/poses}\n")
    monkeypatch.chdir(tmp_path / "configs")
    monkeypatch.chdir("/")
    config = load_config(file, ["preserve.path=relative/pool"])
    assert config.run.output_dir == str(tmp_path / "runs" / "a")
    assert config.run.deepspeed_config == str(tmp_path / "configs" / "ds.json")
    assert config.data.path == str(Path("~/poses").expanduser())
    assert config.preserve.path == "/relative/pool"
    assert load_config(None).run.deepspeed_config == "/configs/ds_zero2.json", "defaults: the working folder"
    shipped = load_config(ROOT / "configs" / "tiny.yaml")
    assert shipped.run.deepspeed_config == str(ROOT / "configs" / "ds_zero2.json")
    assert shipped.data.path == str(ROOT / "data" / "tiny_broad_fps")


def test_cli_config_errors_are_one_message_before_any_work(fixture, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("run:\n  output_dir: x\n   seed: 1\n")
    result = train(bad_yaml, tmp_path / "out")
    check(result, 2)
    assert error_lines(result) == [f"drpose: config error: {bad_yaml}: not valid YAML: line 3, column 8: mapping "
                                   f"values are not allowed here"]
    # from another folder: a missing DeepSpeed JSON is found before data is synthesized anywhere
    config = tmp_path / "configs" / "run.yaml"
    config.parent.mkdir()
    config.write_text("run: {deepspeed_config: missing.json}\ndata: {path: ../data, synthesize_distribution: broad}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = train(config, tmp_path / "out", cwd=elsewhere)
    check(result, 2)
    assert error_lines(result) == [f"drpose: config error: run.deepspeed_config: {config.parent / 'missing.json'} does "
                                   f"not exist (see configs/ds_*.json)"]
    assert not list(elsewhere.iterdir()) and not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_dataset_errors_are_one_message_naming_the_record(fixture, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(fixture.parent.parent / "data", data)
    manifest = (data / "manifest.jsonl").read_text().splitlines()
    record = json.loads(manifest[1])
    (data / record["pose"]).unlink()
    result = train(fixture, tmp_path / "out", f"data.path={data}")
    check(result, 2)
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"drpose: data.path: {data}: {'manifest.jsonl'} line 2, record "
                                                   f"{record['id']!r}, file {record['pose']!r}"), lines
    assert "Traceback" not in result.stderr


def test_images_of_the_wrong_size_are_refused_before_the_model_runs(tmp_path):
    from drpose.data.synthesize import synthesize
    from drpose.training.trainer import prepare_data

    synthesize(tmp_path / "small", 1, "broad", 300, resolution=32, progress=False)
    config = load_config(None, [f"data.path={tmp_path / 'small'}"])
    ctx = type("Ctx", (), {"is_main": True, "barrier": lambda self: None})()
    with pytest.raises(ConfigError, match=f"data.path: {tmp_path / 'small'} holds 32px images; the model takes 48x48"):
        prepare_data(config, ctx, 48)


def test_a_stale_synthesized_dataset_is_refused_by_name(fixture):
    from drpose.data.dataset import DrPoseDataset
    from drpose.training.trainer import check_synthesized

    data = DrPoseDataset(fixture.parent.parent / "data")  # 4 broad poses, seed 300, no selection from a pool
    check_synthesized(data, "data.path", "broad", 4, 300, None)
    check_synthesized(data, "data.path", "broad", 4, 300, None, 0.25)  # the default share, named
    for changed in (("broad", 5, 300, None), ("broad", 4, 301, None), ("hard", 4, 300, None), ("broad", 4, 300, 64),
                    ("broad", 4, 300, None, 0.5)):
        with pytest.raises(ConfigError, match=r"data.path: .* holds 4 synthetic records "
                                              r"\(synthetic:broad:seed=300:\.\.\.\)"):
            check_synthesized(data, "data.path", *changed)


def test_check_files_names_missing_model_folders_and_datasets(tmp_path):
    with pytest.raises(ConfigError, match=f"model.g_skel: {tmp_path / 'nothing'} is not a folder"):
        check_files(load_config(None, [f"run.deepspeed_config={ROOT / 'configs' / 'ds_zero2.json'}",
                                       f"model.g_skel={tmp_path / 'nothing'}"]))
    with pytest.raises(ConfigError, match=f"data.path: no dataset at {tmp_path}"):
        check_files(load_config(None, [f"run.deepspeed_config={ROOT / 'configs' / 'ds_zero2.json'}",
                                       f"data.path={tmp_path}"]))


# --- slow: kill and resume, two processes ---------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_runs_resume_bit_identical_and_never_leave_a_partial_checkpoint(reference_run, fixture, tmp_path):
    """Two rounds of tests/kill_resume.py: one killed at a random moment, one right after a save began; the
    uninterrupted run to compare with is ``reference_run`` (the same config, 3 steps, run from another folder)."""
    import random

    expected_s = kill_resume.run_seconds(reference_run)
    rng = random.Random(0)
    for index, during_save in enumerate((False, True)):
        run = kill_resume.kill_round(fixture, tmp_path / f"round{index}", reference_run, rng, during_save, expected_s)
        assert run.resumed_identical, run
    assert len(curve(reference_run)) == 3


@pytest.mark.slow
def test_two_gloo_processes_in_bf16_match_one_process_at_the_same_global_batch(fixture, tmp_path):
    """bf16 autocast (frozen weights bf16, adapters fp32): 2 ranks x micro-batch 1 vs 1 rank x micro-batch 2, 2 steps.
    Stated tolerances (measured on CPU: 2e-5, 0.6%, 1e-5 and 7%): reward and loss within 1e-3 relative, grad norm
    within 2e-2, the LoRA A matrices within 1e-4 and the B matrices within 15% (relative Frobenius norm of the
    difference). B starts at zero and Adam's first updates are lr x sign(gradient): its elements whose gradient is
    near zero take either sign under bf16 rounding of different batch shapes and the ranks' all-reduce."""
    runs = {}
    for processes, batch in ((1, 2), (2, 1)):
        out = tmp_path / f"ranks{processes}"
        command = [str(DEEPSPEED), "--num_gpus", str(processes), "--master_port", str(free_port()),
                   str(ROOT / "drpose" / "train.py"), "--config", str(fixture), f"run.output_dir={out}",
                   "run.precision=bf16", f"data.batch_size={batch}", "run.max_steps=2"]
        result = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=900)
        check(result)
        runs[processes] = out
    one, two = read_metrics(runs[1]), read_metrics(runs[2])
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    assert all(r["grad_norm"] > 0 for r in one + two) and one[1]["kl"] > 0 and two[1]["kl"] > 0, "bf16 trains"
    for a, b in zip(one, two):
        for key, tolerance in (("reward", 1e-3), ("loss", 1e-3), ("grad_norm", 2e-2)):
            assert b[key] == pytest.approx(a[key], rel=tolerance), (key, a, b)
    a = load_file(str(runs[1] / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(runs[2] / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for part, tolerance in (("lora_A", 1e-4), ("lora_B", 0.15)):
        keys = [k for k in a if part in k]
        difference = torch.cat([(a[k] - b[k]).flatten() for k in keys]).norm()
        assert difference <= tolerance * torch.cat([a[k].flatten() for k in keys]).norm(), part


# --- the shipped tiny world (model.pipeline: null) ----------------------------------------------------------------


def world_args(out: Path, *extra: str) -> list[str]:
    bundle = [f"model.pipeline={WORLD}/pipeline", f"model.g_skel={WORLD}/g_skel"] if WORLD else []
    return [f"run.output_dir={out}", "run.max_steps=2", "run.checkpoint_every=1", "sampling.num_steps=3",
            "data.batch_size=2", "preserve.num=4", "data.synthesize_num=4",
            "data.synthesize_fps_pool=null",
            f"data.path={out.parent / 'world_data'}", f"preserve.path={out.parent / 'world_preserve'}", *bundle, *extra]


@pytest.fixture(scope="module")
def world_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "run"
    check(train(ROOT / "configs" / "tiny.yaml", out, *world_args(out)[1:]))
    return out


@pytest.mark.slow
@pytest.mark.world
def test_world_run_trains_with_preservation_and_reports(world_run, tmp_path):
    rows = read_metrics(world_run)
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["preserve_loss"] > 0
    result = subprocess.run([sys.executable, "-m", "drpose.report", "--run", str(world_run), "--out", str(tmp_path),
                             "--num", "2", "--steps", "2", "--reconstruction-num", "1"], cwd=ROOT, env=environment(),
                            capture_output=True, text=True, timeout=900)
    check(result)
    report = json.loads((tmp_path / "report.json").read_text())
    for set_name in ("hard", "narrow"):
        assert {"pck@0.1", "mpjpe", "pose_score"} <= set(report[set_name]["finetuned"])
        # one body per set carved into meshes, for both models and the oracle
        assert report[set_name]["base"]["reconstruction"]["samples"] == 1
        assert report["reconstruction"][set_name]["oracle"]["failures"] == 0
    for figure in ("reward_curve.png", "metrics.png", "hard_views.png", "narrow_views.png", "hard_meshes.png",
                   "narrow_meshes.png"):
        assert (tmp_path / figure).stat().st_size > 0, figure
    assert "| hard | oracle (true renders) |" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.world
@pytest.mark.parametrize("ds_config", ["ds_zero3.json", "ds_zero3_offload.json"])
def test_world_zero3_runs_and_exports_gathered_adapters(world_run, tmp_path, ds_config):
    out = tmp_path / ds_config
    args = world_args(out, f"run.deepspeed_config={ROOT / 'configs' / ds_config}", "data.batch_size=1")
    for key, folder in (("data.path", "world_data"), ("preserve.path", "world_preserve")):  # the world run's data
        args[next(i for i, a in enumerate(args) if a.startswith(key + "="))] = f"{key}={world_run.parent / folder}"
    command = [str(DEEPSPEED), "--num_gpus", "1", "--master_port", str(free_port()), str(ROOT / "drpose" / "train.py"),
               "--config", str(ROOT / "configs" / "tiny.yaml"), *args]
    check(subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=900))
    rows = read_metrics(out)
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)
    exported = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert exported and all(v.numel() > 0 for v in exported.values()), "ZeRO-3 adapters are gathered before export"


def test_the_trainer_synthesizes_its_set_with_the_configured_share_of_breaking_moves(tmp_path):
    from drpose.training.trainer import prepare_data

    path = tmp_path / "breaking"
    overrides = [f"data.path={path}", "data.synthesize_distribution=broad", "data.synthesize_num=3",
                 "data.synthesize_seed=7", "data.synthesize_breaking_share=1.0"]
    ctx = type("Ctx", (), {"is_main": True, "barrier": lambda self: None})()
    dataset = prepare_data(load_config(None, overrides), ctx, 16)
    assert [r.source for r in dataset.records] == [f"synthetic:broad:seed=7:breaking=1:index={i}" for i in range(3)]
    # the same folder asked for with the default share is another set: refused by name, not reused
    with pytest.raises(ConfigError, match=r"holds 3 synthetic records \(synthetic:broad:seed=7:breaking=1:\.\.\.\)"):
        prepare_data(load_config(None, overrides[:-1]), ctx, 16)
