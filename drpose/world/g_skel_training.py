"""Training g_skel on latents of renders with known joints, with the PoseScore divergence as its loss.

    python -m drpose.world.g_skel_training --world drpose/assets/tiny_world --out DIR [--steps N]

trains a fresh g_skel against the world's codec and reports its keypoint accuracy (PCK at 0.05 and 0.1
of the image size, mean pixel error) on fresh ``narrow`` and ``hard`` samples never seen in training.
``drpose.world.build`` runs the same training as one stage of building the tiny world.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from drpose.cameras import CameraRig, rescale_pixels
from drpose.metrics import keypoint_metrics
from drpose.models.g_skel import GSkel, GSkelConfig, heatmap_keypoints
from drpose.skeleton import NUM_BODY_JOINTS
from drpose_kernels import pose_score

from .latents import LatentBatch, g_skel_inputs, heatmap_targets


@dataclass
class GSkelTraining:
    steps: int = 3000
    batch_views: int = 96
    lr: float = 2e-3
    weight_decay: float = 1e-4
    sigma: float = 1.0  # heatmap Gaussian width in latent pixels
    seed: int = 0


def pose_loss(g_skel: GSkel, inputs: torch.Tensor, segments: torch.Tensor, weights: torch.Tensor, sigma: float) -> torch.Tensor:
    """Mean over views of the weighted heatmap divergence: minus PoseScore with one view per sample."""
    return -pose_score(g_skel(inputs), segments, weights, sigma, num_views=1).mean()


def train_g_skel(pool: LatentBatch, rig: CameraRig, settings: GSkelTraining, show_progress: bool = True
                 ) -> tuple[GSkel, list[float]]:
    """Train a fresh g_skel on every view of ``pool``; returns it and the loss curve."""
    torch.manual_seed(settings.seed)
    _, domains, views, channels, size, _ = pool.latents.shape
    inputs = g_skel_inputs(pool.latents)
    segments, weights = heatmap_targets(rig, pool.joints, pool.framing, size)
    model = GSkel(GSkelConfig(in_channels=domains * channels, out_channels=segments.shape[1]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / settings.steps, 1.0))))
    generator = torch.Generator().manual_seed(settings.seed)
    losses = []
    bar = tqdm(range(settings.steps), desc="g_skel", disable=not show_progress, mininterval=2)
    for _ in bar:
        index = torch.randint(0, inputs.shape[0], (settings.batch_views,), generator=generator)
        loss = pose_loss(model, inputs[index], segments[index], weights[index], settings.sigma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return model.eval(), losses


@torch.no_grad()
def predicted_keypoints(g_skel: GSkel, latents: torch.Tensor, image_size: int) -> torch.Tensor:
    """Joint keypoints (B, V, 22, 2) in image pixels read by g_skel from latents (B, D, V, c, h, w)."""
    b, _, v, _, size, _ = latents.shape
    logits = torch.cat([g_skel(chunk) for chunk in g_skel_inputs(latents).split(256)])
    points, _ = heatmap_keypoints(logits[:, :NUM_BODY_JOINTS])
    return rescale_pixels(points, size, image_size).reshape(b, v, NUM_BODY_JOINTS, 2)


def keypoint_accuracy(g_skel: GSkel, batch: LatentBatch, rig: CameraRig, image_size: int) -> dict:
    """g_skel's 2D joint accuracy on ``batch`` against the true projections, over joints in frame."""
    pred = predicted_keypoints(g_skel, batch.latents, image_size)
    truth, depth = rig.project(batch.joints, image_size, batch.framing)
    return keypoint_metrics(pred, truth, rig.visible_in_frame(truth, depth, image_size), image_size)


def main(argv=None) -> int:
    from .assets import load_world, sample_latents

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, default=None, help="tiny-world folder (default: the built-in one)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the trained g_skel")
    parser.add_argument("--steps", type=int, default=GSkelTraining.steps)
    parser.add_argument("--poses-per-distribution", type=int, default=600)
    parser.add_argument("--eval-poses", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    world = load_world(args.world)
    pool = sample_latents(world, ["narrow", "broad", "hard"], args.poses_per_distribution, seed=1000 + args.seed)
    model, losses = train_g_skel(pool, world.rig, GSkelTraining(steps=args.steps, seed=args.seed,
                                                                 sigma=world.settings.sigma))
    model.save_pretrained(args.out)
    report = {dist: keypoint_accuracy(model, sample_latents(world, [dist], args.eval_poses, seed=9000 + args.seed),
                                      world.rig, world.settings.resolution) for dist in ("narrow", "hard")}
    report["final_loss"] = sum(losses[-50:]) / len(losses[-50:])
    (args.out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
