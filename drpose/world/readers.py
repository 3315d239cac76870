"""How the world's two readers agree on views the base model re-draws from true ones.

    python -m drpose.world.readers [--num 48] [--t 0 249 449] [--out runs/readers] [--lora RUN/lora] [--g-skel DIR]

g_skel (the reward's reader, on latents) and the independent estimator (the evaluation's, on decoded part
colours) both read true views well. The question for reward fine-tuning is how they read views a model has
drawn: where g_skel reads a pose the estimator does not find, the reward cannot see what the evaluation
penalises. The probe renders ``--num`` poses of a distribution (by default the first of the evaluation's
held-out ``hard`` set, ``python -m drpose.evaluate --data builtin:hard``), encodes their true multi-view latents, noises them to each ``--t``,
lets the model re-draw them with the DDIM steps of the 10-step schedule below ``t`` (an SDEdit: sharp
samples whose pose starts from the truth), and reads the body views with both readers against the true
joints. ``t = 0`` reads the true latents themselves (both readers' ceilings). Writes ``readers.json`` and,
per ``t``, ``views_t{t}.png`` (the first four samples' RGB body views in camera orientation).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from drpose.data.dataset import DrPoseDataset
from drpose.data.synthesize import synthesize
from drpose.evaluation.metrics_run import read_views, summarize
from drpose.models.bundle import ModelBundle
from drpose.models.diffusion import add_noise, alphas_at, prediction_to_x0_eps
from drpose.models.layout import grid_to_rows, rows_to_grid
from drpose.models.sampling import DDIMSampler
from drpose.reward import PoseReward

SCHEDULE_STEPS = 10  # the evaluation's DDIM schedule; a re-draw from t runs its steps below t


def redraw(bundle: ModelBundle, latents: torch.Tensor, cond, t: int, seed: int, unet=None, chunk: int = 8
           ) -> torch.Tensor:
    """``latents`` (N, 2, V, c, h, w) noised to ``t`` and re-drawn by the model down to t = 0: the same shape."""
    if t == 0:
        return latents
    pipeline = bundle.pipeline
    scheduler, views = pipeline.scheduler, latents.shape[2]
    steps = [s for s in DDIMSampler(scheduler, SCHEDULE_STEPS, views).timestep_values if s < t]
    out = []
    for start in range(0, latents.shape[0], chunk):
        part = latents[start : start + chunk]
        c = cond.select(list(range(start, start + part.shape[0])))
        rows = grid_to_rows(part.transpose(0, 1))
        noise = torch.randn(rows.shape, generator=torch.Generator().manual_seed(seed + start)).to(rows)
        x = add_noise(scheduler, rows, noise, torch.full((rows.shape[0],), t))
        x0 = eps = None
        for index, step in enumerate([t, *steps]):
            alpha = alphas_at(scheduler, torch.full((rows.shape[0],), step), x)
            if index > 0:  # the DDIM update to this step from the previous prediction
                x = alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps
            prediction = pipeline.predict(x, torch.tensor(step), c, unet=unet)
            x0, eps = prediction_to_x0_eps(scheduler, prediction.float(), x, alpha)
        out.append(rows_to_grid(x0, views).transpose(0, 1))
    return torch.cat(out)


def read_both(bundle: ModelBundle, latents: torch.Tensor, joints: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Metrics of both readers on the body views of ``latents`` (N, 2, V, c, h, w) against ``joints``, and the
    decoded RGB body views (N, 6, 3, R, R) in camera orientation."""
    outputs = read_views(bundle, latents, joints, PoseReward.from_bundle(bundle, backend="auto"),
                         ("estimator", "g_skel"))
    names = tuple(bundle.rig.view_names)
    size = bundle.pipeline.image_size
    return ({reader: summarize(output, size, names) for reader, output in outputs.items()},
            outputs["estimator"].generated_rgb)


def save_views(rgb: torch.Tensor, path: Path, count: int = 4, scale: int = 3) -> None:
    from PIL import Image

    rgb = rgb[:count].clamp(0, 1)
    n, v, _, size, _ = rgb.shape
    sheet = rgb.permute(0, 3, 1, 4, 2).reshape(n * size, v * size, 3).numpy()
    image = Image.fromarray((sheet * 255).round().astype(np.uint8))
    image.resize((v * size * scale, n * size * scale), Image.NEAREST).save(path)


@torch.no_grad()
def probe(num: int, timesteps: list[int], out: Path, distribution: str = "hard", seed: int | None = None,
          lora: str | None = None, bundle: ModelBundle | None = None, g_skel: str | None = None) -> dict:
    from drpose.evaluate import HELD_OUT_SEEDS
    from drpose.training.preserve import PreservationSet

    seed = HELD_OUT_SEEDS.get(distribution, 0) if seed is None else seed  # default: the held-out set's poses
    bundle = ModelBundle.load(g_skel=g_skel) if bundle is None else bundle
    if lora is not None:
        from drpose.training.lora import load_lora
        load_lora(bundle.pipeline.unet, lora)  # the pipeline's UNet now re-draws with the adapters
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "poses"
        synthesize(data, num, distribution, seed, bundle.pipeline.image_size, rig=bundle.rig.cameras, progress=False)
        pool = PreservationSet.from_folder(data, bundle.pipeline, bundle.rig, seed=0, device=torch.device("cpu"),
                                           dtype=torch.float32, cache=False)
        dataset = DrPoseDataset(data)
        joints = torch.stack([dataset[i]["joints"] for i in range(len(dataset))]).float()
    results = {}
    for t in timesteps:
        metrics, rgb = read_both(bundle, redraw(bundle, pool.latents, pool.cond, t, seed), joints)
        results[str(t)] = metrics
        save_views(rgb, out / f"views_t{t}.png")
        print(f"t={t:4d}  PCK@0.1 estimator {metrics['estimator']['pck@0.1']:.3f}  g_skel "
              f"{metrics['g_skel']['pck@0.1']:.3f}  |  MPJPE estimator {metrics['estimator']['mpjpe']:.0f} mm  g_skel "
              f"{metrics['g_skel']['mpjpe']:.0f} mm  |  PoseScore {metrics['g_skel']['pose_score']:.4f}", flush=True)
    report = {"num": num, "distribution": distribution, "seed": seed, "lora": lora, "g_skel": g_skel or "the world's",
              "schedule_steps": SCHEDULE_STEPS,
              "timesteps": results}
    (out / "readers.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m drpose.world.readers", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=48, help="poses to probe")
    parser.add_argument("--t", type=int, nargs="+", default=[0, 249, 449], help="noise levels (0: the true latents)")
    parser.add_argument("--distribution", default="hard", choices=("narrow", "broad", "hard"))
    parser.add_argument("--seed", type=int, default=None, help="pose seed (default: the held-out set's)")
    parser.add_argument("--lora", default=None, help="a run's lora/ folder: re-draw with the fine-tuned model")
    parser.add_argument("--g-skel", default=None, help="a g_skel folder to read with (default: the world's)")
    parser.add_argument("--out", type=Path, default=Path("runs/readers"))
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f"--num must be at least 1, got {args.num}")
    bad = [t for t in args.t if not 0 <= t < 1000]
    if bad:
        parser.error(f"--t must be in [0, 1000), got {bad}")
    probe(args.num, args.t, args.out, args.distribution, args.seed, args.lora, g_skel=args.g_skel)


if __name__ == "__main__":
    main()
