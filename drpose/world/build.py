"""Build the embedded tiny world from scratch with fixed seeds: a miniature PSHuman.

    python -m drpose.world.build [--out drpose/assets/tiny_world] [--work runs/world_build] [--resume] [--quick]

Stages, each saved as soon as it is done (``--resume`` skips the finished ones):

1. render a pool of ``narrow``, ``broad`` and ``hard`` poses in PSHuman's 7 views x 2 domains and train the
   VAE on it (``vae/``);
2. the image conditioning (a small seeded CLIP vision model, its preprocessing, the normalizer fitted to
   the pool's embeddings, unCLIP's noising schedule) and the initial prompt embeddings;
3. g_skel: the pool is written as DrPose15K-format folders with renders and g_skel is trained on them by
   ``drpose.g_skel_train`` (the command researchers use for real models);
4. pretrain the base model (UNetMV2DConditionModel and the prompt embeddings) on ``narrow`` poses;
5. measure quality (VAE reconstruction error, the independent evaluator on VAE round trips, g_skel on
   true latents, the base model's generated views read by g_skel on ``narrow`` vs ``hard``: the gap DrPose
   closes) and write ``manifest.json`` with seeds, sizes, build time (wall and CPU) and the figures.

Weights are stored in float16. ``--quick`` builds a toy world in about a minute (for tests of this command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler

from drpose.body import joints_from_params
from drpose.data.synthesize import synthesize
from drpose.g_skel_train import GSkelTraining, ViewLatents, keypoint_accuracy, load_views
from drpose.g_skel_train import train as train_g_skel
from drpose.g_skel_train import view_latents
from drpose.models.diffusion import make_scheduler
from drpose.models.g_skel import GSkel
from drpose.models.pipeline import MultiViewPipeline
from drpose.models.pshuman_unet import CLASS_NAME, MULTIVIEW_FLAGS, UNetMV2DConditionModel
from drpose.models.sampling import DDIMSampler
from drpose.poses import sample_poses

from .assets import DEFAULT_WORLD, WorldSettings, write_manifest
from .codec_training import CodecTraining, reconstruction_error, train_codec
from .conditioning import EMBED_DIM, fit_normalizer, image_conditioning, initial_prompt_embeds, noising_scheduler
from .latents import concat_latent_batches, encode_views
from .pretraining import Pretraining, pretrain_base
from .quality import codec_keypoint_ceiling, generated_pose_accuracy
from .views import render_views, sample_views

SEEDS = {"pool": 100, "base_pool": 200, "quality_eval": 900, "conditioning": 7, "training": 0}
EVAL_SAMPLING_STEPS = 20
POOL_BREAKING_SHARE = 0.0
"""``broad`` poses of the VAE and g_skel pools stay upright (inverted bodies are in the pools' ``hard`` third)."""
CROSS_ATTENTION_DIM = 64
STAGES = ("vae", "conditioning", "g_skel", "base_model")


def tiny_unet_config(latent_size: int = 18) -> dict:
    """A small UNetMV2DConditionModel: multi-view blocks at the 9x9 level and the mid block, a plain level at
    18x18 (every attention level's side a multiple of 3, as the face blend needs)."""
    return {
        "_class_name": CLASS_NAME, "sample_size": latent_size, "in_channels": 8, "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlockMV2D"], "mid_block_type": "UNetMidBlockMV2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlockMV2D", "UpBlock2D"], "block_out_channels": [32, 64],
        "layers_per_block": 1, "attention_head_dim": [1, 2], "cross_attention_dim": CROSS_ATTENTION_DIM,
        "norm_num_groups": 16, "use_linear_projection": True, "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": 2 * EMBED_DIM, "num_views": 7, **MULTIVIEW_FLAGS,
    }  # fmt: skip


def render_image_pool(rig, resolution: int, distributions, num_each: int, seed: int) -> torch.Tensor:
    """All images (N * 2 * 7, 3, R, R) uint8 of fresh poses in the model's views, for VAE training."""
    images = []
    for d_index, distribution in enumerate(distributions):
        joints = joints_from_params(sample_poses(distribution, num_each, seed + d_index,
                                                 breaking_share=POOL_BREAKING_SHARE))
        for start in range(0, num_each, 64):
            views = render_views(joints[start : start + 64], rig, resolution)
            images.append((views.images.reshape(-1, 3, resolution, resolution) * 255).round().to(torch.uint8))
    return torch.cat(images)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class Clock:
    """Wall and CPU seconds per stage (CPU seconds / cores is the wall time on an otherwise idle machine)."""

    def __init__(self, log: dict):
        self.log = log
        self.started = time.perf_counter()

    def stage(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                print(f"[build] {name} ({time.perf_counter() - clock.started:.0f}s so far)", flush=True)
                self.wall, self.cpu = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                if exc[0] is None:
                    clock.log[name] = {"wall_s": round(time.perf_counter() - self.wall, 1),
                                       "cpu_s": round(time.process_time() - self.cpu, 1)}

        return _Stage()


def half_copy(pipeline: MultiViewPipeline, folder: Path) -> None:
    """Write ``pipeline`` with float16 weights (it stays float32 in memory)."""
    modules = [pipeline.unet, pipeline.vae, pipeline.image_encoder]
    for module in modules:
        module.half()
    embeds = pipeline.prompt_embeds
    pipeline.prompt_embeds = embeds.half()
    try:
        pipeline.save_pretrained(folder)
    finally:
        for module in modules:
            module.float()
        pipeline.prompt_embeds = embeds


def build(out: Path, work: Path, quick: bool = False, resume: bool = False, steps: dict | None = None) -> dict:
    settings = WorldSettings()
    rig = settings.view_rig()
    resolution = settings.resolution
    pool_size, base_pool, eval_size = (12, 16, 4) if quick else (600, 3000, 64)
    steps = steps or {}
    codec_cfg = CodecTraining(steps=steps.get("vae") or (20 if quick else 2400), seed=SEEDS["training"])
    g_skel_cfg = GSkelTraining(steps=steps.get("g_skel") or (20 if quick else 2400), sigma=settings.sigma,
                               seed=SEEDS["training"], checkpoint_every=500)
    base_cfg = Pretraining(steps=steps.get("base_model") or (10 if quick else 3500), seed=SEEDS["training"])
    state_file = work / "build_state.json"
    state = json.loads(state_file.read_text()) if resume and state_file.is_file() else {"done": [], "timings": {},
                                                                                          "training": {}}
    if not resume and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    pipeline_dir = work / "pipeline"
    clock = Clock(state["timings"])

    def finish(stage: str) -> None:
        state["done"].append(stage)
        state_file.write_text(json.dumps(state, indent=2) + "\n")

    # 1. VAE -------------------------------------------------------------------------------------------
    if "vae" in state["done"]:
        vae = AutoencoderKL.from_pretrained(work / "vae").float().eval()
    else:
        with clock.stage("render VAE pool"):
            images = render_image_pool(rig, resolution, ("narrow", "broad", "hard"), pool_size, SEEDS["pool"])
        with clock.stage("train VAE"):
            vae, losses = train_codec(images, codec_cfg, settings.latent_channels)
        state["training"]["vae"] = asdict(codec_cfg) | {"pool_images": int(images.shape[0]),
                                                        "final_l1": sum(losses[-50:]) / len(losses[-50:])}
        vae.save_pretrained(work / "vae")
        del images
        finish("vae")
    vae.requires_grad_(False)

    # 2. conditioning parts and the initial pipeline --------------------------------------------------------
    base_joints = joints_from_params(sample_poses("narrow", base_pool, SEEDS["base_pool"]))
    if "conditioning" in state["done"]:
        pipeline = MultiViewPipeline.from_pretrained(pipeline_dir)
    else:
        with clock.stage("conditioning"):
            encoder, extractor = image_conditioning(SEEDS["conditioning"])
            conditions = torch.cat([render_views(part, rig, resolution).condition for part in base_joints.split(250)])
            normalizer = fit_normalizer(encoder, extractor, conditions)
            torch.manual_seed(SEEDS["training"])
            unet = UNetMV2DConditionModel(**tiny_unet_config(settings.latent_size))
            pipeline = MultiViewPipeline(unet, vae, make_scheduler(settings.prediction_type), encoder, extractor,
                                         normalizer, noising_scheduler(),
                                         initial_prompt_embeds(CROSS_ATTENTION_DIM, SEEDS["conditioning"]))
            pipeline.save_pretrained(pipeline_dir)
        finish("conditioning")
    for module in pipeline.modules().values():
        module.float().eval().requires_grad_(False)

    # 3. g_skel, through the g_skel training command's functions on DrPose15K-format folders --------------
    eval_views = {d: sample_views(d, eval_size, SEEDS["quality_eval"] + i * 10, rig, resolution)
                  for i, d in enumerate(("narrow", "hard"))}
    eval_latents = {d: ViewLatents(encode_views(pipeline, v, seed=SEEDS["quality_eval"]).latents[:, :, :6], v.joints,
                                   v.framing) for d, v in eval_views.items()}
    if "g_skel" in state["done"]:
        g_skel = GSkel.from_pretrained(work / "g_skel").float().eval()
    else:
        with clock.stage("g_skel data"):
            folders = []
            for i, distribution in enumerate(("narrow", "broad", "hard")):
                folder = work / "g_skel_data" / distribution
                if not (folder / "manifest.jsonl").is_file():
                    shutil.rmtree(folder, ignore_errors=True)
                    synthesize(folder, pool_size, distribution, SEEDS["pool"] + i, resolution, rig.cameras,
                               progress=True, breaking_share=POOL_BREAKING_SHARE)
                folders.append(folder)
            images, joints, data_rig = load_views(folders)
            pool = view_latents(pipeline.vae, images, joints, data_rig, pipeline.image_size)
        with clock.stage("train g_skel"):
            g_skel, losses = train_g_skel(pool, data_rig, g_skel_cfg, out=work / "g_skel_progress", resume=resume)
        state["training"]["g_skel"] = asdict(g_skel_cfg) | {"pool_views": int(len(pool) * 6),
                                                            "final_loss": sum(losses[-50:]) / len(losses[-50:])}
        g_skel.save_pretrained(work / "g_skel")
        finish("g_skel")
    g_skel.requires_grad_(False)
    g_skel_quality = {d: keypoint_accuracy(g_skel, v, rig, resolution) for d, v in eval_latents.items()}
    print(f"[build] g_skel on true latents: {json.dumps(g_skel_quality)}", flush=True)

    # 4. the base model ----------------------------------------------------------------------------------
    if "base_model" not in state["done"]:
        with clock.stage("encode base pool"):
            parts = [encode_views(pipeline, render_views(part, rig, resolution), seed=SEEDS["base_pool"] + i)
                     for i, part in enumerate(base_joints.split(250))]
            narrow_pool = concat_latent_batches(parts)
        with clock.stage("pretrain base model"):
            losses = pretrain_base(narrow_pool, pipeline, base_cfg)
        state["training"]["base_model"] = asdict(base_cfg) | {
            "pool_samples": len(narrow_pool), "distribution": "narrow",
            "final_loss": sum(losses[-50:]) / len(losses[-50:])}
        pipeline.save_pretrained(pipeline_dir)
        finish("base_model")
    pipeline.unet.float().eval().requires_grad_(False)

    # 5. quality and the folder ------------------------------------------------------------------------------
    with clock.stage("measure"):
        held_out_images = render_image_pool(rig, resolution, ("narrow", "hard"), eval_size, SEEDS["quality_eval"])
        vae_l1 = reconstruction_error(pipeline, held_out_images)
        ceiling = {d: codec_keypoint_ceiling(pipeline, sample_views(d, eval_size, SEEDS["quality_eval"] + 50 + i, rig,
                                                                    resolution), rig)
                   for i, d in enumerate(("narrow", "hard"))}
        sampler = DDIMSampler(pipeline.scheduler, EVAL_SAMPLING_STEPS, pipeline.num_views)
        base_quality = {}
        for d, views in eval_views.items():
            batch = encode_views(pipeline, views, seed=SEEDS["quality_eval"])
            base_quality[d] = generated_pose_accuracy(pipeline, sampler, g_skel, batch, rig, resolution,
                                                      seed=SEEDS["quality_eval"])
    print(f"[build] evaluator on VAE round trips: {json.dumps(ceiling)}", flush=True)
    print(f"[build] base model's views read by g_skel: {json.dumps(base_quality)}", flush=True)

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    half_copy(pipeline, out / "pipeline")
    g_skel.half()
    g_skel.save_pretrained(out / "g_skel")
    g_skel.float()
    timings = state["timings"]
    manifest = {
        "name": "DrPose tiny world (a miniature PSHuman)",
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "seeds": SEEDS,
        "training": state["training"],
        "quality": {
            "eval_poses_per_distribution": eval_size,
            "vae_l1_held_out": vae_l1,
            "evaluator_on_vae_round_trips": ceiling,
            "g_skel_on_true_latents": g_skel_quality,
            "base_model_generated": base_quality,
            "base_model_sampling_steps": EVAL_SAMPLING_STEPS,
        },
        "parameters": {"unet": sum(p.numel() for p in pipeline.unet.parameters()),
                       "vae": sum(p.numel() for p in pipeline.vae.parameters()),
                       "image_encoder": sum(p.numel() for p in pipeline.image_encoder.parameters()),
                       "g_skel": sum(p.numel() for p in g_skel.parameters())},
        "build_seconds": dict(timings, total={"wall_s": round(sum(t["wall_s"] for t in timings.values()), 1),
                                              "cpu_s": round(sum(t["cpu_s"] for t in timings.values()), 1)}),
        "bytes": {"pipeline": folder_bytes(out / "pipeline"), "g_skel": folder_bytes(out / "g_skel")},
    }
    write_manifest(out, manifest, settings)
    print(f"[build] wrote {out}; {sum(manifest['bytes'].values()) / 2**20:.1f} MiB; "
          f"{manifest['build_seconds']['total']}", flush=True)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_WORLD)
    parser.add_argument("--work", type=Path, default=Path("runs/world_build"), help="stage outputs and data")
    parser.add_argument("--resume", action="store_true", help="skip the stages --work already holds")
    parser.add_argument("--quick", action="store_true", help="a toy world in about a minute (for tests)")
    parser.add_argument("--vae-steps", type=int)
    parser.add_argument("--g-skel-steps", type=int)
    parser.add_argument("--base-steps", type=int)
    args = parser.parse_args(argv)
    steps = {"vae": args.vae_steps, "g_skel": args.g_skel_steps, "base_model": args.base_steps}
    build(args.out, args.work, args.quick, args.resume, steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
