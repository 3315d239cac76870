"""The benchmark entry point runs and writes results in its schema (so the suite cannot rot)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_kernel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "kernel", "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out, result.stdout


def test_quick_kernel_benchmark_writes_json_and_markdown(quick_kernel_run):
    out, stdout = quick_kernel_run
    payload = json.loads((out / "kernel_cpu_quick.json").read_text())
    meta, rows = payload["meta"], payload["rows"]
    assert meta["device"]["gpu"] == "no GPU"
    assert meta["copy_bandwidth_gbps"] > 0
    assert {"torch", "triton"} <= set(meta["versions"])
    measured = [r for r in rows if r["provider"] == "reference"]
    assert {r["mode"] for r in measured} == {"forward", "backward", "full"}
    for row in measured:
        assert row["median_ms"] > 0 and row["gbps"] > 0 and row["repeats"] >= 3
        n, c, h, w = (row["params"][k] for k in "NCHW")
        assert row["bytes"] == {"forward": 1, "backward": 2, "full": 3}[row["mode"]] * n * c * h * w * 4
    assert row["peak_memory_kind"] in ("cpu_peak_rss", "cpu_peak_rss_approx", "unavailable")


def test_cpu_run_says_fused_figures_need_a_gpu(quick_kernel_run):
    out, stdout = quick_kernel_run
    rows = json.loads((out / "kernel_cpu_quick.json").read_text())["rows"]
    fused = [r for r in rows if r["provider"] == "fused"]
    assert fused and all(r["median_ms"] is None and "need a GPU" in r["error"] for r in fused)
    markdown = (out / "kernel_cpu_quick.md").read_text()
    assert "fused-kernel figures need a GPU" in markdown
    assert "| (6, 23, 32, 32) | fp32 | full | reference |" in markdown


@pytest.mark.slow
def test_quick_trainer_benchmark_measures_the_trainers_step_and_memory(tmp_path):
    from pshuman_fixtures import write_bundle

    pipeline, g_skel = write_bundle(tmp_path / "bundle", latent_size=12)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "trainer", "--quick", "--repeats", "1", "--device", "cpu",
         "--out", str(tmp_path),
         "--set", f"model.pipeline={pipeline}", "--set", f"model.g_skel={g_skel}", "--set", "preserve.weight=0.3"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    payload = json.loads((tmp_path / "trainer_cpu_quick.json").read_text())
    assert payload["meta"]["cpu_peak_exact"] is True, "run.py re-executes itself for exact CPU peak memory"
    assert "drpose.training.step.train_step" in payload["meta"]["step"]
    assert str(pipeline) in payload["meta"]["model"] and "12x12 latents" in payload["meta"]["model"]
    rows = payload["rows"]
    assert {(r["params"]["K"], r["params"]["checkpointing"]) for r in rows} == {(1, "off"), (2, "off"), (1, "call"), (2, "call")}
    for row in rows:
        assert row["median_ms"] > 0 and row["peak_memory_bytes"] > 0 and row["params"]["latent"] == 12
        assert 0 < row["extra"]["reward_share"] < 1 and row["params"]["preserve_weight"] == 0.3
    assert (tmp_path / "trainer_cpu_quick.md").exists() and (tmp_path / "trainer_cpu_quick_growth.png").exists()
    markdown = (tmp_path / "trainer_cpu_quick.md").read_text()
    assert "checkpointing call: peak memory at K=2 is" in markdown and "adapters: rank" in markdown


def _suite():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kernel_suite

    return kernel_suite


def test_graph_rows_are_set_against_the_compiled_graph_and_the_eager_reference():
    suite = _suite()
    from common import Row

    def row(provider, ms):
        return Row(suite="kernel", name="s", provider=provider, mode="full", dtype="bf16", params={}, bytes=1,
                   median_ms=ms)

    rows = [row("reference", 8.0), row("reference_compiled", 4.0), row("fused", 2.0),
            row("reference_compiled@graph", 1.0), row("fused@graph", 0.25)]
    suite.add_speedups(rows)
    by = {r.provider: r.extra for r in rows}
    assert by["fused"] == {"speedup_vs_reference": 4.0, "speedup_vs_reference_compiled": 2.0}
    assert by["fused@graph"] == {"speedup_vs_reference": 32.0, "speedup_vs_reference_compiled": 4.0}
    assert by["reference_compiled@graph"] == {"speedup_vs_reference": 8.0}


@pytest.mark.gpu
def test_graph_replay_recomputes_the_fused_gradient_in_place():
    suite = _suite()
    import torch

    device = torch.device("cuda")
    logits, segments, upstream = suite.make_inputs((4, 23, 32, 32), torch.bfloat16, device)
    settings = suite.Settings(device=device, shapes=[], dtypes=["bf16"], compile=False, warmup=1, repeats=3,
                              size_sweep=[])
    fused = suite.providers(settings, segments, with_compile=False)["fused"]
    call = suite.mode_call("full", fused, logits, upstream)
    expected = call()[0].clone()
    results = []
    replay = suite.graphed(lambda: results.append(call()), device)
    output = results[-1][0]  # the captured call's output buffer, rewritten by every replay
    output.zero_()
    replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(output, expected)
