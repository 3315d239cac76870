"""The dry run (benchmarks/dryrun.py): its memory tracker against hand counts and against the same step on
real CPU tensors, the FLOP formulas it adds, the charging of repeated calls, the ZeRO model, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import dryrun  # noqa: E402
from drpose.training.config import load_config  # noqa: E402

# The smallest step that has every part: conditioning, sampling with one gradient-carrying step and two
# steps without (the second repeats the first's shapes, so the dry run charges it without running it), the
# KL term, PoseScore, backward through a checkpointed UNet call and the optimizer step.
SMALL = dryrun.StepSettings(batch_size=1, num_steps=3, num_grad_steps=1, guidance_scale=1.0, groups_per_call=0,
                            checkpointing=True, unet_checkpointing=False, lora_rank=4, lora_alpha=4.0)
TOLERANCE = 0.05  # fake-tensor peak vs the same tracker on real CPU tensors


@pytest.fixture(scope="module")
def arch():
    return dryrun.tiny_architecture(latent_size=6)


@pytest.fixture(scope="module")
def fake_and_real(arch):
    fake = dryrun.measure_step(arch, SMALL, fake=True, exact=True)
    real = dryrun.measure_step(arch, SMALL, fake=False, exact=True)
    return fake, real


def test_tracker_matches_a_hand_count_with_frozen_and_trainable_weights():
    mode = FakeTensorMode()
    with mode:
        frozen = torch.nn.Linear(256, 512, bias=False).requires_grad_(False)  # 512 KiB
        adapter = torch.nn.Linear(512, 128, bias=False)  # 256 KiB, trainable
        x = torch.empty(64, 256)  # 64 KiB
    tracker = dryrun.StepMemoryTracker()
    tracker.track_external(frozen, adapter, x)
    with mode, tracker:
        hidden = frozen(x)  # 128 KiB, saved by adapter's backward
        out = adapter(hidden)  # 32 KiB
        out.sum().backward()  # gradient of adapter.weight: 256 KiB
    kib = 1024
    peak, snapshot = tracker.peak()
    at_peak, now = dryrun._by_category(snapshot), dryrun._by_category(tracker.current())
    assert at_peak["parameters"] == now["parameters"] == (512 + 256) * kib
    assert at_peak["inputs"] == 64 * kib
    assert now["gradients"] == 256 * kib and adapter.weight.grad is not None and frozen.weight.grad is None
    # the peak: weights, x, hidden (saved for the adapter's backward), out and the weight gradient being
    # written; the gradient flowing into out is the sum's scalar gradient broadcast (no new storage)
    assert 0 <= peak - (768 + 64 + 128 + 32 + 256) * kib < 64
    # FLOPs: two matmuls forward (2 * 64 * 256 * 512, 2 * 64 * 512 * 128), the weight gradient backward
    assert tracker.cost.flops == 2 * 64 * 256 * 512 + 2 * 64 * 512 * 128 * 2


def test_cpu_attention_flops_are_counted_as_two_matmuls_forward_and_five_backward():
    dryrun.register_cpu_attention_flops()
    b, h, n, d = 2, 4, 64, 16
    matmul = 2 * b * h * n * n * d
    q = torch.randn(b, h, n, d, requires_grad=True)
    tracker = dryrun.StepMemoryTracker()
    with tracker:
        out = F.scaled_dot_product_attention(q, q.detach(), q.detach())
        forward = tracker.cost.flops
        out.sum().backward()
    assert forward == 2 * matmul  # QK^T and PV
    assert tracker.cost.flops - forward == 5 * matmul  # QK^T again, dV, dP, dQ, dK


def test_fake_peak_matches_the_real_cpu_run(arch, fake_and_real):
    fake, real = fake_and_real
    assert fake["baseline_bytes"] == real["baseline_bytes"]
    assert abs(fake["peak_memory_bytes"] / real["peak_memory_bytes"] - 1) < TOLERANCE
    growth_fake = fake["peak_memory_bytes"] - fake["baseline_bytes"]
    growth_real = real["peak_memory_bytes"] - real["baseline_bytes"]
    assert abs(growth_fake / growth_real - 1) < 2 * TOLERANCE
    assert fake["flops"] == real["flops"] > 0
    for name in ("parameters", "gradients", "optimizer_state", "inputs"):
        assert fake["categories_bytes"][name] == real["categories_bytes"][name], name


def test_weights_and_optimizer_state_are_counted_exactly(arch, fake_and_real):
    fake, _ = fake_and_real
    built = dryrun.build_step(arch, SMALL)  # real tensors, counted here by hand
    storages = {}
    for module in built.modules.values():
        for t in (*module.parameters(), *module.buffers()):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    lora = sum(p.numel() * 4 for p in built.lora_params)
    assert lora == fake["lora_parameters"] * 4 == fake["parameter_bytes"]["lora"] > 0
    assert all(p.dtype == torch.float32 for p in built.lora_params)
    assert next(built.modules["unet"].conv_in.parameters()).dtype == torch.bfloat16
    assert fake["categories_bytes"]["parameters"] == sum(storages.values())
    assert fake["categories_bytes"]["optimizer_state"] == 2 * lora + 4 * len(built.lora_params)  # moments + steps


def test_charging_repeated_no_grad_calls_gives_the_peak_of_running_them(arch, fake_and_real):
    exact, _ = fake_and_real
    memo = dryrun.measure_step(arch, SMALL, fake=True, exact=False)
    assert memo["unet_calls"] == {"executed": 2, "charged": 1}
    assert memo["flops"] == exact["flops"] and memo["ops"] == exact["ops"]
    # a charged call adds its measured extra to the live set of the moment, which can differ from the set when
    # it would have run by a few tensors (small at this size, nothing at real size)
    assert abs(memo["peak_memory_bytes"] / exact["peak_memory_bytes"] - 1) < 0.01


def test_checkpointing_inside_the_unet_lowers_the_activations_at_the_peak(arch, fake_and_real):
    # with one gradient-carrying call, checkpointing it as a whole recomputes all its activations at once in
    # the backward; checkpointing block by block inside the UNet keeps one block's at a time
    per_call, _ = fake_and_real
    inside = dryrun.measure_step(arch, replace(SMALL, unet_checkpointing=True), fake=True)
    assert inside["categories_bytes"]["activations"] < 0.8 * per_call["categories_bytes"]["activations"]
    assert inside["peak_memory_bytes"] < per_call["peak_memory_bytes"]
    assert inside["flops"] > per_call["flops"], "checkpointing inside the UNet recomputes each block's forward again"


def test_zero_model_splits_optimizer_state_and_gradients_over_ranks():
    lora = 40 * 2**20
    figures = {"peak_memory_bytes": 10 * 2**30, "host_peak_bytes": 0,
               "categories_bytes": {"optimizer_state": 2 * lora, "gradients": lora},
               "parameter_bytes": {"lora": lora, "unet": 2 * 2**30}}
    stage2 = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000, "overlap_comm": False}}
    one, eight = dryrun.zero_per_rank(figures, stage2, 1), dryrun.zero_per_rank(figures, stage2, 8)
    assert one["peak_memory_bytes"] == 10 * 2**30 + lora + 4000  # + master copy + one fp32 bucket
    assert one["peak_memory_bytes"] - eight["peak_memory_bytes"] == (4 * lora) * 7 // 8
    offload = dryrun.zero_per_rank(figures, {"zero_optimization": {**stage2["zero_optimization"],
                                                                   "offload_optimizer": {"device": "cpu"}}}, 1)
    assert offload["host_bytes"] == 3 * lora and offload["parts_bytes"]["optimizer_state_and_master"] == 0
    stage3 = dryrun.zero_per_rank(figures, {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 0}}, 4)
    assert stage3["parts_bytes"]["unet_partition"] == (2 * 2**30 + lora) // 4
    averaged = {**figures, "settings": {"ema": True}}
    assert dryrun.zero_per_rank(averaged, stage2, 8)["peak_memory_bytes"] - eight["peak_memory_bytes"] == lora
    stage3 = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 0}}
    stage3_ema = dryrun.zero_per_rank(averaged, stage3, 4)
    assert stage3_ema["parts_bytes"]["adapter_average"] == lora // 4
    offload = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    offloaded = dryrun.zero_per_rank(averaged, offload, 4)
    assert offloaded["parts_bytes"]["adapter_average"] == 0
    assert offloaded["host_bytes"] == (2 * 2**30 + lora) // 4 + lora // 4, "the average lives with the partitions"
    config = load_config(ROOT / "configs" / "pshuman.yaml", ["optim.ema_decay=0.999"])
    assert dryrun.StepSettings.from_config(config).ema


def test_cli_writes_a_labelled_dry_run_at_tiny_size(tmp_path):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    overrides = ["sampling.num_steps=2", "sampling.early_stop_max=1", "sampling.num_grad_steps=1", "data.batch_size=1",
                 "sampling.guidance_scale=1.0", "sampling.groups_per_call=0", "lora.rank=4"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "dryrun", "--tiny", "--no-validate", "--out", str(tmp_path),
         *[a for o in overrides for a in ("--set", o)]],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    payload = json.loads((tmp_path / "dryrun_pshuman_tiny.json").read_text())
    assert payload["meta"]["device"] == "dry run (no GPU), modelled H100/H200"
    row = payload["rows"][0]
    assert row["name"] == "config" and row["settings"]["num_steps"] == 2 and row["fake"]
    assert row["settings"]["lora_rank"] == 4
    assert row["peak_memory_bytes"] > row["baseline_bytes"] > 0 and row["flops"] > 0
    assert set(row["modelled_device_s"]) == {"H100", "H200"} and row["modelled_device_s"]["H100"] > 0
    assert {z["stage"] for z in payload["zero"]} == {2, 3}
    markdown = (tmp_path / "dryrun_pshuman_tiny.md").read_text()
    assert "Dry-run / model figures, not measurements on a GPU" in markdown and "989 TFLOP/s" in markdown
    assert (tmp_path / "dryrun_pshuman_tiny_memory.png").stat().st_size > 0


def test_config_sweep_measures_guidance_off_and_activation_offload(arch, fake_and_real):
    base = replace(SMALL, guidance_scale=3.0)
    rows = dict(dryrun.sweep_settings(base, "config"))
    assert rows["config, guidance 1 (no CFG)"] == SMALL
    assert rows["config, activation offload on"] == replace(base, offload_activations=True)
    one_branch, _ = fake_and_real
    with_cfg = dryrun.measure_step(arch, base, fake=True)
    # guidance runs the conditional and the unconditional branch: about twice the UNet work
    assert one_branch["flops"] < 0.75 * with_cfg["flops"]
    assert one_branch["peak_memory_bytes"] < with_cfg["peak_memory_bytes"]
    # the offload sends the saved activations to the host: counted there, not on the device
    moved = dryrun.measure_step(arch, replace(SMALL, offload_activations=True), fake=True)
    assert one_branch["offload_bytes"] == 0 and moved["offload_bytes"] > 0
    assert moved["categories_bytes"]["activations"] < one_branch["categories_bytes"]["activations"]
    assert moved["flops"] == one_branch["flops"]


def test_figures_do_not_depend_on_when_the_cycle_collector_runs(arch):
    """A reference cycle inside the step (torch's own helpers make some) used to be freed whenever the
    collector happened to run, so the same step measured 12 KiB more or less depending on the process's
    history (it failed once under a parallel test worker). Collecting after every allocation vs never must
    give the same figures."""
    import gc

    thresholds = gc.get_threshold()
    figures = []
    try:
        for threshold in (1, 10**9):
            gc.set_threshold(threshold)
            moved = dryrun.measure_step(arch, replace(SMALL, offload_activations=True), fake=True)
            figures.append((moved["peak_memory_bytes"], moved["categories_bytes"]))
    finally:
        gc.set_threshold(*thresholds)
    assert figures[0] == figures[1]


def test_measured_step_runs_the_same_step_and_finds_the_committed_dry_run_row(arch):
    """benchmarks/run.py step: the dry run's step for real (warm-up + timed steps), and the lookup of the dry
    run's row for the same settings, which the GPU comparison depends on."""
    import step_suite
    from drpose.training.config import load_config

    config_path = ROOT / "configs" / "pshuman.yaml"
    settings = dryrun.StepSettings.from_config(load_config(config_path))
    committed = json.loads((ROOT / "benchmarks" / "results" / "dryrun_pshuman.json").read_text())["rows"]
    config_row = next(r for r in committed if r["name"] == "config")
    found = step_suite.modelled_row(config_path, "pshuman", settings)
    assert found is not None and found["peak_memory_bytes"] == config_row["peak_memory_bytes"]
    assert step_suite.modelled_row(config_path, "pshuman", replace(settings, num_grad_steps=3)) is None
    assert step_suite.modelled_row(config_path, "tiny", settings) is None

    measured = step_suite.measure(arch, SMALL, torch.device("cpu"), repeats=2, progress=lambda message: None)
    assert [s["warmup"] for s in measured["steps"]] == [True, False, False]
    assert measured["median_s"] > 0 and measured["plan"]["steps_run"] == SMALL.num_steps
    assert measured["lora_parameters"] > 0 and measured["peak_extra_bytes"] >= 0

    gpu_like = {**measured, "median_s": 2.0, "peak_allocated_bytes": 3 * 2**30}
    modelled = {"peak_memory_bytes": 2 * 2**30, "flops": 4e12, "modelled_device_s": {"H200": 4.0}}
    comparison = step_suite.compare(gpu_like, modelled, "H200")
    assert comparison["peak_ratio"] == pytest.approx(1.5) and comparison["time_ratio"] == pytest.approx(0.5)
    assert comparison["achieved_tflops"] == pytest.approx(2.0)
    assert step_suite.device_model_key({"name": "NVIDIA H200"}) == "H200"
    assert step_suite.device_model_key({"name": "NVIDIA A100-SXM4-80GB"}) is None
