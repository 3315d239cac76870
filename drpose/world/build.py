"""Build the embedded tiny world from scratch with fixed seeds.

    python -m drpose.world.build [--out drpose/assets/tiny_world] [--quick]

Stages: render pose pools -> train the codec -> train g_skel on latents -> pretrain the base multi-view
model on ``narrow`` poses -> measure quality (codec reconstruction error, g_skel keypoint accuracy on
fresh ``narrow`` and ``hard`` poses, the base model's generated-pose accuracy on both: the gap DrPose
closes) -> write the weights (float16) and ``manifest.json`` (settings, seeds, sizes, build time,
quality figures). ``--quick`` builds a toy world in about a minute (for tests of this command).
Each stage's weights are written as soon as they are trained; ``--reuse codec,g_skel --from DIR`` takes
those stages from an existing world instead of training them again (their figures are re-measured).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from drpose.models.codec import LatentCodec
from drpose.models.diffusion import make_scheduler
from drpose.models.g_skel import GSkel
from drpose.models.multiview_unet import MultiViewConfig, MultiViewUNet, tiny_unet_config
from drpose.models.sampling import DDIMSampler

from .assets import DEFAULT_WORLD, World, WorldSettings, encode_pose_pool
from .codec_training import CodecTraining, reconstruction_error, train_codec
from .g_skel_training import GSkelTraining, keypoint_accuracy, train_g_skel
from .pretraining import Pretraining, pretrain_base
from .quality import codec_keypoint_ceiling, generated_pose_accuracy
from .views import render_views, sample_views
from drpose.body import joints_from_params
from drpose.poses import sample_poses

SEEDS = {"codec_and_g_skel_pool": 100, "base_pool": 200, "quality_eval": 900, "training": 0}
EVAL_SAMPLING_STEPS = 20
POOL_BREAKING_SHARE = 0.0
"""``broad`` poses of the codec and g_skel pools stay upright (the pools the shipped weights were built from;
inverted bodies are in the pools' ``hard`` third)."""


def render_image_pool(rig, resolution: int, distributions, num_each: int, seed: int) -> torch.Tensor:
    """All images (N * D * V, 3, R, R) uint8 of fresh poses, for codec training."""
    images = []
    for d_index, distribution in enumerate(distributions):
        params = sample_poses(distribution, num_each, seed + d_index, breaking_share=POOL_BREAKING_SHARE)
        joints = joints_from_params(params)
        for start in range(0, num_each, 64):
            views = render_views(joints[start : start + 64], rig, resolution)
            images.append((views.images.reshape(-1, 3, resolution, resolution) * 255).round().to(torch.uint8))
    return torch.cat(images)


def save_half(module, folder: Path) -> None:
    """Write one stage's weights as float16 right after it is trained (the module stays float32)."""
    module.half()
    try:
        module.save_pretrained(folder)
    finally:
        module.float()


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


REUSABLE = ("codec", "g_skel")


def build(out: Path, quick: bool = False, codec_steps=None, g_skel_steps=None, base_steps=None,
          reuse: tuple[str, ...] = (), reuse_from: Path | None = None) -> dict:
    settings = WorldSettings()
    rig = settings.camera_rig()
    pool_size, base_pool, eval_size = (16, 16, 4) if quick else (600, 3000, 64)
    codec_cfg = CodecTraining(steps=codec_steps or (20 if quick else CodecTraining.steps), seed=SEEDS["training"])
    g_skel_cfg = GSkelTraining(steps=g_skel_steps or (20 if quick else GSkelTraining.steps), sigma=settings.sigma,
                               seed=SEEDS["training"])
    base_cfg = Pretraining(steps=base_steps or (10 if quick else Pretraining.steps), seed=SEEDS["training"])
    timings, started = {}, time.perf_counter()

    def stage(name: str):
        print(f"[build] {name} ({time.perf_counter() - started:.0f}s so far)", flush=True)
        timings[name] = time.perf_counter()

    def done(name: str):
        timings[name] = round(time.perf_counter() - timings[name], 1)

    unknown = set(reuse) - set(REUSABLE)
    if unknown or (reuse and reuse_from is None):
        raise ValueError(f"--reuse takes {REUSABLE} together with --from DIR, got {sorted(reuse)}")
    previous = json.loads((reuse_from / "manifest.json").read_text()) if reuse else {}
    out.mkdir(parents=True, exist_ok=True)
    training_log = {}

    if "codec" in reuse:
        codec = LatentCodec.from_pretrained(reuse_from / "codec", torch_dtype=torch.float32).eval()
        training_log["codec"] = previous["training"]["codec"] | {"reused_from": str(reuse_from)}
    else:
        stage("render codec pool")
        images = render_image_pool(rig, settings.resolution, ("narrow", "broad", "hard"), pool_size,
                                   SEEDS["codec_and_g_skel_pool"])
        done("render codec pool")
        stage("train codec")
        codec, codec_losses = train_codec(images, codec_cfg, settings.latent_channels)
        done("train codec")
        training_log["codec"] = asdict(codec_cfg) | {"pool_images": int(images.shape[0]),
                                                     "final_l1": sum(codec_losses[-50:]) / len(codec_losses[-50:])}
        save_half(codec, out / "codec")
    held_out = render_image_pool(rig, settings.resolution, ("narrow", "hard"), eval_size, SEEDS["quality_eval"])
    codec_l1 = reconstruction_error(codec, held_out)
    evaluator_ceiling = {
        d: codec_keypoint_ceiling(codec, sample_views(d, eval_size, SEEDS["quality_eval"] + 50 + i, rig, settings.resolution), rig)
        for i, d in enumerate(("narrow", "hard"))
    }
    print(f"[build] evaluator on codec round trips: {json.dumps(evaluator_ceiling)}", flush=True)
    codec.requires_grad_(False)

    if "g_skel" in reuse:
        g_skel = GSkel.from_pretrained(reuse_from / "g_skel").float().eval()
        training_log["g_skel"] = previous["training"]["g_skel"] | {"reused_from": str(reuse_from)}
    else:
        stage("train g_skel")
        g_skel_pool = encode_pose_pool(codec, rig, settings.resolution, ["narrow", "broad", "hard"], pool_size,
                                       SEEDS["codec_and_g_skel_pool"], breaking_share=POOL_BREAKING_SHARE)
        g_skel, g_skel_losses = train_g_skel(g_skel_pool, rig, g_skel_cfg)
        done("train g_skel")
        training_log["g_skel"] = asdict(g_skel_cfg) | {"pool_views": int(len(g_skel_pool) * rig.num_views),
                                                       "final_loss": sum(g_skel_losses[-50:]) / len(g_skel_losses[-50:])}
        save_half(g_skel, out / "g_skel")
    g_skel.requires_grad_(False)
    eval_sets = {d: encode_pose_pool(codec, rig, settings.resolution, [d], eval_size, SEEDS["quality_eval"] + i * 10)
                 for i, d in enumerate(("narrow", "hard"))}
    g_skel_quality = {d: keypoint_accuracy(g_skel, batch, rig, settings.resolution) for d, batch in eval_sets.items()}
    print(f"[build] g_skel accuracy: {json.dumps(g_skel_quality)}", flush=True)

    stage("pretrain base model")
    torch.manual_seed(SEEDS["training"])
    unet = MultiViewUNet.from_config(tiny_unet_config(settings.latent_channels, settings.latent_size), MultiViewConfig())
    scheduler = make_scheduler(settings.prediction_type)
    narrow_pool = encode_pose_pool(codec, rig, settings.resolution, ["narrow"], base_pool, SEEDS["base_pool"])
    base, base_losses = pretrain_base(narrow_pool, unet, scheduler, base_cfg)
    done("pretrain base model")
    training_log["base_model"] = asdict(base_cfg) | {"pool_samples": len(narrow_pool), "distribution": "narrow",
                                                     "final_loss": sum(base_losses[-50:]) / len(base_losses[-50:])}
    save_half(base, out / "base_model")

    stage("measure base model")
    sampler = DDIMSampler(scheduler, EVAL_SAMPLING_STEPS)
    base_quality = {d: generated_pose_accuracy(base, sampler, g_skel, batch, rig, settings.resolution, seed=SEEDS["quality_eval"])
                    for d, batch in eval_sets.items()}
    print(f"[build] base model accuracy (read by g_skel): {json.dumps(base_quality)}", flush=True)
    done("measure base model")

    world = World(codec, base, g_skel, scheduler, settings, manifest={})
    manifest = {
        "name": "DrPose tiny world",
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "seeds": SEEDS,
        "training": training_log,
        "quality": {
            "eval_poses_per_distribution": eval_size,
            "codec_l1_held_out": codec_l1,
            "evaluator_on_codec_round_trips": evaluator_ceiling,
            "g_skel_on_renders": g_skel_quality,
            "base_model_generated": base_quality,
            "base_model_sampling_steps": EVAL_SAMPLING_STEPS,
        },
        "parameters": {"codec": sum(p.numel() for p in codec.parameters()),
                       "base_model": sum(p.numel() for p in base.parameters()),
                       "g_skel": sum(p.numel() for p in g_skel.parameters())},
    }
    timings["total"] = round(time.perf_counter() - started, 1)
    manifest["build_seconds"] = timings
    world.save(out, manifest)
    manifest["bytes"] = {part: folder_bytes(out / part) for part in ("codec", "base_model", "g_skel", "scheduler")}
    world.save(out, manifest)
    print(f"[build] wrote {out} in {timings['total']:.0f}s; {sum(manifest['bytes'].values()) / 2**20:.1f} MiB")
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_WORLD)
    parser.add_argument("--quick", action="store_true", help="a toy world in about a minute (for tests)")
    parser.add_argument("--codec-steps", type=int)
    parser.add_argument("--g-skel-steps", type=int)
    parser.add_argument("--base-steps", type=int)
    parser.add_argument("--reuse", default="", help=f"comma-separated stages to take from --from: {', '.join(REUSABLE)}")
    parser.add_argument("--from", dest="reuse_from", type=Path, default=None, help="world folder to reuse stages from")
    args = parser.parse_args(argv)
    reuse = tuple(part for part in args.reuse.split(",") if part)
    build(args.out, args.quick, args.codec_steps, args.g_skel_steps, args.base_steps, reuse, args.reuse_from)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
