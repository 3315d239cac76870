"""The fused kernels compiled for real GPUs (sm_80 and sm_90) with Triton's bundled ptxas, no GPU needed.

Every kernel variant the launchers can choose at DrPose's shape (each logits dtype and layout, float or
per-channel sigma, with and without segment/sigma gradients, ``pose_score`` and ``heatmap_divergence``)
must compile, must not spill (no stack, no local memory, no spill instructions) and must use few enough
registers to keep ``MIN_WARPS_PER_SM`` warps resident per SM. The kernels of a covering set of variants are
compiled every time; the others are taken from ``benchmarks/results/kernel_static.json`` when it holds
their exact specialisation (kernel source, argument specialisation, constexprs, options, target, Triton
version) and compiled otherwise, so the test stays short while the committed figures are current and
still checks everything when the kernels change. Compiling runs in a subprocess: the test session runs
Triton in its interpreter, whose kernels cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drpose_kernels import HAS_TRITON

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "kernel_static.json"

SCRIPT = """
import json, sys
sys.path.insert(0, {benchmarks!r})
import kernel_static as ks
recorded = {{}}
try:
    with open({results!r}) as f:
        recorded = {{row["specialisation"]: row for row in json.load(f)["rows"] if row.get("specialisation")}}
except FileNotFoundError:
    pass
entries = ks.verify_compiles(ks.SHAPE_DRPOSE, tuple(ks.TARGETS), recorded, ks.representative_variants())
print("RESULT " + json.dumps({{"entries": entries, "floor": ks.MIN_WARPS_PER_SM, "targets": list(ks.TARGETS)}}))
"""


@pytest.fixture(scope="module")
def compiled_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = SCRIPT.format(benchmarks=str(ROOT / "benchmarks"), results=str(RESULTS))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_every_kernel_variant_compiles_for_sm80_and_sm90_without_spills(compiled_kernels):
    entries, floor = compiled_kernels["entries"], compiled_kernels["floor"]
    assert {e["target"] for e in entries} == set(compiled_kernels["targets"]) == {"sm_80", "sm_90"}
    assert {e["launch"] for e in entries} == {"forward", "score", "backward"}
    assert any(e["source"] == "compiled" for e in entries), "the covering set must compile every time"
    problems = []
    for e in entries:
        where = f"{e['target']} {e['launch']} kernel of {e['use']} ({e['source']})"
        if e["stack_bytes"] or e["local_bytes"] or e["spill_instructions"]:
            problems.append(f"{where} spills: stack {e['stack_bytes']} B, local {e['local_bytes']} B, "
                            f"{e['spill_instructions']} spill instructions")
        if e["warps_allowed_by_registers"] < floor:
            problems.append(f"{where}: {e['registers']} registers allow {e['warps_allowed_by_registers']} "
                            f"warps per SM, below the floor of {floor}")
        if "recorded_registers" in e and e["recorded_registers"] != e["registers"]:
            problems.append(f"{where}: compiled to {e['registers']} registers, but kernel_static.json records "
                            f"{e['recorded_registers']} under the same specialisation")
    assert not problems, "\n".join(problems)


def test_occupancy_floor_arithmetic():
    """Registers are allocated per warp in units of 256: 128 registers x 32 threads fit 16 warps in 64K."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kernel_static as ks

    assert ks.warps_allowed_by_registers(128, 4) == 16
    assert ks.warps_allowed_by_registers(129, 4) == 12  # 136 after rounding: 3 blocks of 4 warps
    assert ks.warps_allowed_by_registers(32, 4) == 64
    assert ks.warps_allowed_by_registers(168, 1) == 12
