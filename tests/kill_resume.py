"""Kill test: runs SIGKILLed at random moments (some of them during a checkpoint save) and resumed with
``--resume latest`` end bit-identical to an uninterrupted run, and no checkpoint folder is ever partial.

    python tests/kill_resume.py --rounds 20 [--out DIR] [--seed 0] [--steps 4]

Every round starts a run with ``checkpoint_every=1`` in a fresh folder, kills it (a random moment between
the run's start and its expected end, or, in every other round, right after a checkpoint save begins),
checks every ``checkpoint-<step>`` folder left behind (complete: every file at its recorded size; ``latest``
names one of them), resumes it to the end and compares its metrics and LoRA, bit for bit, with an
uninterrupted run's. The runs use a small random PSHuman-format bundle (24x24 latents) and a few
synthesized poses. ``tests/test_training.py`` runs two rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DETERMINISTIC = ("reward", "kl", "loss", "grad_norm", "lr")
"""Keys of a metrics row that a resumed run must reproduce exactly (timings and memory vary)."""


def environment() -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("TRITON_INTERPRET", None)
    paths = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def write_fixture(folder: Path, records: int = 4) -> Path:
    """A random 24x24-latent PSHuman-format bundle, ``records`` synthesized poses at its 48 px, a DeepSpeed JSON
    and a run config ``folder/configs/run.yaml`` whose paths are relative to it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pshuman_fixtures import write_bundle

    from drpose.data.synthesize import synthesize

    if not (folder / "bundle" / "g_skel").is_dir():
        write_bundle(folder / "bundle", latent_size=24)
    if not (folder / "data" / "manifest.jsonl").is_file():
        synthesize(folder / "data", records, "broad", 300, resolution=48, progress=False)
    configs = folder / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / "ds.json").write_text((ROOT / "configs" / "ds_zero2.json").read_text())
    (configs / "run.yaml").write_text(FIXTURE_CONFIG)
    return configs / "run.yaml"


FIXTURE_CONFIG = """\
# A few-second DrPose run on the random fixture bundle (paths relative to this file)
run: {output_dir: ../runs/default, max_steps: 3, log_every: 1, checkpoint_every: 1, keep_checkpoints: 2,
      deepspeed_config: ds.json, precision: fp32}
model: {pipeline: ../bundle/pipeline, g_skel: ../bundle/g_skel}
lora: {rank: 4, alpha: 4.0, target_modules: [to_q, to_k, to_v, to_out.0]}
sampling: {num_steps: 2, early_stop_max: 0, num_grad_steps: 1, policy: drtune}
data: {path: ../data, batch_size: 1, synthesize_distribution: null}
preserve: {weight: 0.0, path: ../preserve}
optim: {lr: 2.0e-3, warmup_steps: 0}
"""


def train_command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "drpose" / "train.py"), "--config", str(config), f"run.output_dir={out}", *extra]


def train(config: Path, out: Path, *extra: str, cwd: Path | None = None, timeout: int = 900):
    return subprocess.run(train_command(config, out, *extra), cwd=cwd or ROOT, env=environment(), capture_output=True,
                          text=True, timeout=timeout)


def curve(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: row.get(k) for k in ("step", *DETERMINISTIC)} for row in rows]


def lora(out: Path) -> tuple[dict, dict]:
    """The exported LoRA's tensors as raw bytes and its metadata (the file's bytes themselves vary: safetensors
    writes the metadata in hash order)."""
    from safetensors import safe_open

    with safe_open(str(out / "lora" / "pytorch_lora_weights.safetensors"), "pt") as exported:
        tensors = {key: exported.get_tensor(key).numpy().tobytes() for key in exported.keys()}
        return tensors, exported.metadata()


def check_checkpoints(out: Path) -> list[int]:
    """Every checkpoint-<step> folder is complete and ``latest`` names one; returns their steps."""
    from drpose.training import checkpoints

    root = out / "checkpoints"
    if not root.is_dir():
        return []
    steps = []
    for folder in sorted(root.glob(f"{checkpoints.PREFIX}*")):
        checkpoints.verify(folder)  # raises on a partial or damaged folder
        steps.append(int(folder.name.split("-")[1]))
    assert [s for s, _ in checkpoints.existing(root)] == sorted(steps), "a checkpoint folder without its info file"
    if (root / checkpoints.LATEST).exists():
        latest = (root / checkpoints.LATEST).read_text().strip()
        assert (root / latest).is_dir(), f"latest names {latest}, which is not there"
    return sorted(steps)


@dataclass
class Round:
    moment: str  # what the kill aimed at
    killed_at_s: float
    killed: bool  # False: the run had ended before the kill
    checkpoints_left: list[int]
    resumed_identical: bool


def timed_run(config: Path, out: Path, *extra: str) -> float:
    """Run to the end; the seconds from the run's start (its config.yaml written) to its end."""
    process = subprocess.Popen(train_command(config, out, *extra), cwd=ROOT, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not (out / "config.yaml").exists():
        time.sleep(0.02)
    started = time.monotonic()
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    return time.monotonic() - started


def run_seconds(out: Path) -> float:
    """The seconds a finished run took from its start (its config.yaml written) to its end (summary.json)."""
    return (out / "summary.json").stat().st_mtime - (out / "config.yaml").stat().st_mtime


def kill_round(config: Path, out: Path, reference: Path, rng: random.Random, during_save: bool,
               expected_s: float, *extra: str) -> Round:
    """One run killed (SIGKILL) at a random moment after it started (its config.yaml written), or right after a
    checkpoint save begins, then resumed with ``--resume latest`` and compared with ``reference``."""
    process = subprocess.Popen(train_command(config, out, *extra), cwd=ROOT, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while process.poll() is None and not (out / "config.yaml").exists():
        time.sleep(0.01)
    started = time.monotonic()
    delay = rng.uniform(0.0, 1.0) * expected_s
    moment = "a checkpoint save" if during_save else f"{delay:.1f} s"
    while process.poll() is None:
        saving = during_save and any((out / "checkpoints").glob(".saving-*"))
        if saving or (not during_save and time.monotonic() - started >= delay):
            if saving:
                time.sleep(rng.uniform(0.0, 0.02))
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.002 if during_save else 0.02)
    process.wait()
    killed = process.returncode == -signal.SIGKILL
    left = check_checkpoints(out)
    resumed = train(config, out, "--resume", "latest", *extra)
    assert resumed.returncode == 0, f"resume failed ({resumed.returncode}):\n{resumed.stderr[-3000:]}"
    check_checkpoints(out)
    identical = curve(out) == curve(reference) and lora(out) == lora(reference)
    return Round(moment, time.monotonic() - started, killed, left, identical)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "kill_resume")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4, help="run.max_steps of every run")
    args = parser.parse_args(argv)
    config = write_fixture(args.out)
    reference = args.out / "runs" / "reference"
    steps = f"run.max_steps={args.steps}"
    expected_s = timed_run(config, reference, "--overwrite", steps)
    rng = random.Random(args.seed)
    rounds = []
    for index in range(args.rounds):
        out = args.out / "runs" / f"round_{index:02d}"
        if out.exists():
            shutil.rmtree(out)
        run = kill_round(config, out, reference, rng, index % 2 == 1, expected_s, steps)
        rounds.append(run)
        print(f"round {index + 1}/{args.rounds}: killed at {run.moment} ({'killed' if run.killed else 'had ended'}), "
              f"checkpoints left {run.checkpoints_left}, resumed bit-identical: {run.resumed_identical}", flush=True)
    identical = sum(r.resumed_identical for r in rounds)
    killed = sum(r.killed for r in rounds)
    print(f"{identical}/{len(rounds)} resumed runs bit-identical to the uninterrupted one ({killed} killed mid-run, "
          f"{sum(r.moment == 'a checkpoint save' and r.killed for r in rounds)} during a save); no partial checkpoint "
          f"folder seen")
    return 0 if identical == len(rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
