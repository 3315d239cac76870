"""Train g_skel, the reward's latent keypoint reader, for a model bundle's VAE and views.

    python -m drpose.g_skel_train --bundle PIPELINE_DIR --data DIR [--data DIR ...] --out DIR
                                  [--held-out DIR | --held-out-share 0.1] [--steps 3000] [--sigma 1.0] [--resume]
                                  [--limb-cuts 0.5 [--limb-cut-radius 0.08]]

``--data``: DrPose15K-format folders whose records carry multi-view renders (``renders``: RGB, normal
maps, masks of the record camera's 6 body views) with their poses; they are turned into the views as the
model generates them (back/left mirrored, normals in the input camera's frame), encoded with the bundle's
VAE at its latent size, and g_skel learns to read joint and bone heatmaps from each view's normal + RGB
latents, with the PoseScore divergence as its loss. The result is a g_skel folder whose config records
the heatmap width, latent size and rig, which the reward then uses. Progress is saved every
``--checkpoint-every`` steps (``--resume`` continues bit for bit); the held-out set's PCK is reported in
``accuracy.json``. The tiny world's build runs this same training.

``--limb-cuts SHARE`` adds hard negatives: that share of the training samples again, with one limb per view
drawn in pieces (a stretch of it erased to the background) and that bone's target covering only its drawn
part, so that the reward tells a limb in pieces from a whole one (:func:`cut_limbs`). Off by default: on the
tiny world it did not raise the fine-tuned gain (docs/tuning.md section 8).

A researcher with PSHuman trains one for its 96x96 latents on renders of THuman2.1 / CustomHumans-style
scans; ``python benchmarks/run.py dryrun --g-skel`` states its memory and time per epoch at that size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from drpose.cameras import Framing, rescale_pixels
from drpose.metrics import keypoint_metrics
from drpose.models.g_skel import GSkel, GSkelConfig, heatmap_keypoints
from drpose.models.rig import ViewRig
from drpose.skeleton import BODY22_BONES, NUM_BODY_JOINTS
from drpose.training.schedule import half_cosine
from drpose_kernels import pose_score
from drpose_kernels.reference import segment_exponent

STATE_FILE = "training_state.pt"


@dataclass
class GSkelTraining:
    steps: int = 3000
    batch_views: int = 96
    lr: float = 2e-3
    weight_decay: float = 1e-4
    sigma: float = 1.0  # heatmap Gaussian width in latent pixels
    seed: int = 0
    checkpoint_every: int = 500
    limb_cut_share: float = 0.0  # share of the samples added again with limbs drawn in pieces (cut_limbs)
    limb_cut_radius: float = 0.08  # metres of foreground erased around the cut stretch of a limb


@dataclass
class ViewLatents:
    """Encoded body views with their poses: what g_skel trains and is measured on. ``cuts`` (N, 6, 3), when
    given, says which bone of each view was cut and which part of it is still drawn (:func:`cut_limbs`)."""

    latents: torch.Tensor  # (N, 2, 6, c, h, w)
    joints: torch.Tensor  # (N, 22, 3)
    framing: Framing
    cuts: torch.Tensor | None = None  # (N, 6, 3): bone channel (-1: none), kept from, kept to (bone fractions)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def select(self, index) -> "ViewLatents":
        return ViewLatents(self.latents[index], self.joints[index],
                           Framing(self.framing.centre[index], self.framing.half_extent[index]),
                           None if self.cuts is None else self.cuts[index])

    def inputs(self) -> torch.Tensor:
        """(N * 6, 2 * c, h, w): each body view's normal and RGB latents on channels."""
        n, d, v, c, h, w = self.latents.shape
        return self.latents.permute(0, 2, 1, 3, 4, 5).reshape(n * v, d * c, h, w)


def load_views(folders: list[Path], rig: ViewRig | None = None) -> tuple[torch.Tensor, torch.Tensor, ViewRig]:
    """Body views (N, 2, 6, 3, R, R) uint8 as the model generates them, joints (N, 22, 3), and the rig, from
    dataset folders with renders (every record's camera must be the same)."""
    from drpose.data.dataset import DrPoseDataset

    images, joints = [], []
    for folder in folders:
        dataset = DrPoseDataset(folder, load_renders=True)
        cameras = {json.dumps(r.camera.to_dict(), sort_keys=True) for r in dataset.records}
        if len(cameras) != 1:
            raise ValueError(f"{folder}: records were rendered with {len(cameras)} different cameras; g_skel reads "
                             f"one rig")
        camera = dataset.records[0].camera
        if rig is None:
            rig = ViewRig(cameras=camera)
        elif rig.cameras != camera:
            raise ValueError(f"{folder}: its camera {camera.to_dict()} differs from the other folders' "
                             f"{rig.cameras.to_dict()}")
        for index in tqdm(range(len(dataset)), desc=f"reading {folder.name}", mininterval=2):
            item = dataset[index]
            renders = item["renders"]
            views = rig.body_views(renders["rgb"][None], renders["normal"][None], renders["mask"][None])[0]
            images.append((views * 255).round().to(torch.uint8))
            joints.append(item["joints"])
    return torch.stack(images), torch.stack(joints), rig


@torch.no_grad()
def encode(vae, images: torch.Tensor, image_size: int, chunk: int = 128) -> torch.Tensor:
    """Body views (N, 2, 6, 3, R, R) uint8 -> scaled VAE latents (N, 2, 6, c, h, w) at ``image_size`` input."""
    flat = images.reshape(-1, *images.shape[-3:])
    param = next(vae.parameters())
    out = []
    for start in tqdm(range(0, flat.shape[0], chunk), desc="encoding", mininterval=2):
        x = flat[start : start + chunk].float() / 255.0
        if x.shape[-1] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        posterior = vae.encode((x * 2 - 1).to(param.device, param.dtype)).latent_dist
        out.append((posterior.mode() * vae.config.scaling_factor).float().cpu())
    latents = torch.cat(out)
    return latents.reshape(*images.shape[:3], *latents.shape[1:])


LIMB_BONE_CHILDREN = (4, 5, 7, 8, 18, 19, 20, 21)
"""body22 children of the limb bones a cut may break: knees, ankles, elbows, wrists (thighs, shins, upper arms,
forearms)."""


def apply_cuts(segments: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """Segments (N, 6, C, 2, 2) -> the same with each cut bone shortened to its drawn part."""
    segments = segments.clone()
    n, v = torch.nonzero(cuts[..., 0] >= 0, as_tuple=True)
    if n.numel():
        channel = cuts[n, v, 0].long()
        a, b = segments[n, v, channel, 0], segments[n, v, channel, 1]
        start, end = cuts[n, v, 1:2], cuts[n, v, 2:3]
        segments[n, v, channel] = torch.stack([a + start * (b - a), a + end * (b - a)], 1)
    return segments


def targets(views: ViewLatents, rig: ViewRig) -> tuple[torch.Tensor, torch.Tensor]:
    """Segments (N * 6, C, 2, 2) and weights (N * 6, C) at the latent side, as generated (cut bones shortened
    to what is drawn of them)."""
    size = views.latents.shape[-1]
    segments, weights = rig.segments_and_weights(views.joints, size, include_bones=True, framing=views.framing)
    if views.cuts is not None:
        segments = apply_cuts(segments, views.cuts)
    return segments.flatten(0, 1), weights.flatten(0, 1)


def cut_limbs(images: torch.Tensor, joints: torch.Tensor, rig: ViewRig, share: float, radius: float, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard negatives for g_skel: copies of a ``share`` of the samples with, in each body view, one limb drawn in
    pieces, as a generator that breaks limbs draws them.

    ``images`` (N, 2, 6, 3, R, R) uint8 body views as generated, ``joints`` (N, 22, 3). In every view of a copied
    sample one limb bone (thigh, shin, upper arm or forearm) long enough on screen loses the foreground pixels
    within ``radius`` metres of a stretch of it, filled with the view's background colour (its corner pixel),
    in both domains; the drawn part keeps the parent or the child end (at random) and 15-60% of the bone. The
    pixels per metre are the sample's largest on-screen bone length over its length in 3D (exact for an
    orthographic rig, whose scale is shared by all views). Returns the copies (M, 2, 6, 3, R, R), their joints
    (M, 22, 3) and cuts (M, 6, 3): bone channel (-1 where no bone was long enough), then the drawn part's
    start and end as fractions of the bone from parent to child, for :func:`targets`.
    """
    if not 0 <= share <= 1:
        raise ValueError(f"limb cut share: expected a number in [0, 1], got {share}")
    if radius <= 0:
        raise ValueError(f"limb cut radius: expected a positive length in metres, got {radius}")
    generator = torch.Generator().manual_seed(seed)
    count = int(round(share * images.shape[0]))
    chosen = torch.randperm(images.shape[0], generator=generator)[:count]
    images, joints = images[chosen], joints[chosen]
    size = images.shape[-1]
    segments, weights = rig.segments_and_weights(joints, size, include_bones=True, framing=rig.frame(joints))
    bones = segments[:, :, NUM_BODY_JOINTS:]  # (M, 6, 21, 2, 2)
    screen = (bones[..., 1, :] - bones[..., 0, :]).norm(dim=-1)  # (M, 6, 21)
    parents = torch.tensor([p for p, _ in BODY22_BONES])
    children = torch.tensor([c for _, c in BODY22_BONES])
    length3d = (joints[:, children] - joints[:, parents]).norm(dim=-1).clamp_min(1e-6)  # (M, 21)
    scale = (screen / length3d[:, None]).amax(dim=(1, 2))  # pixels per metre, (M,)
    limb = torch.tensor([c - 1 for c in LIMB_BONE_CHILDREN])
    radius_px = radius * scale  # (M,)
    cuts = torch.full((count, 6, 3), -1.0)
    gaps = torch.zeros(count, 6, 2, 2)  # the erased stretch of each view's cut bone, pixels
    for m in range(count):
        r = float(radius_px[m])
        for v in range(6):
            eligible = limb[(screen[m, v, limb] >= 3 * r) & (weights[m, v, NUM_BODY_JOINTS + limb] > 0)]
            if eligible.numel() == 0:
                continue
            bone = int(eligible[torch.randint(0, eligible.numel(), (1,), generator=generator)])
            a, b = bones[m, v, bone, 0], bones[m, v, bone, 1]
            kept = float(torch.empty(1).uniform_(0.15, 0.6, generator=generator))
            margin = min(0.3, r / float(screen[m, v, bone]))  # leave the next bone's end whole
            if torch.rand(1, generator=generator) < 0.5:  # the parent end stays
                gone, drawn = (kept, 1 - margin), (0.0, kept)
            else:
                gone, drawn = (margin, 1 - kept), (1 - kept, 1.0)
            gaps[m, v] = torch.stack([a + gone[0] * (b - a), a + gone[1] * (b - a)])
            cuts[m, v] = torch.tensor([NUM_BODY_JOINTS + bone, drawn[0], drawn[1]])
    # squared pixel distance to the gap / 2 (the heatmap exponent at sigma 1), (M, 6, R, R)
    near = segment_exponent(gaps, 1.0, size, size, torch.float32) <= (radius_px**2 / 2)[:, None, None, None]
    near &= (cuts[..., 0] >= 0)[..., None, None]
    background = images[..., :1, :1]  # each view's corner pixel, (M, 2, 6, 3, 1, 1)
    erase = near[:, None, :, None] & (images != background).any(3, keepdim=True)
    images = torch.where(erase, background.expand_as(images), images)
    return images, joints, cuts


def with_limb_cuts(images: torch.Tensor, joints: torch.Tensor, rig: ViewRig, settings: GSkelTraining
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The training views plus their :func:`cut_limbs` copies (``settings.limb_cut_share`` of them): images,
    joints and cuts (-1 for the whole views), or the views unchanged and no cuts when the share is 0."""
    if settings.limb_cut_share == 0:
        return images, joints, None
    cut_images, cut_joints, cuts = cut_limbs(images, joints, rig, settings.limb_cut_share,
                                             settings.limb_cut_radius, settings.seed)
    whole = torch.full((images.shape[0], 6, 3), -1.0)
    return torch.cat([images, cut_images]), torch.cat([joints, cut_joints]), torch.cat([whole, cuts])


def pose_loss(g_skel: GSkel, inputs: torch.Tensor, segments: torch.Tensor, weights: torch.Tensor, sigma: float) -> torch.Tensor:
    """Mean over views of the weighted heatmap divergence: minus PoseScore with one view per sample."""
    return -pose_score(g_skel(inputs), segments, weights, sigma, num_views=1).mean()


def _save_state(out: Path, state: dict) -> None:
    tmp = out / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / STATE_FILE)


def train(views: ViewLatents, rig: ViewRig, settings: GSkelTraining, out: Path | None = None, resume: bool = False,
          show_progress: bool = True) -> tuple[GSkel, list[float]]:
    """Train a fresh g_skel on every body view of ``views``; with ``out`` its progress is saved there every
    ``checkpoint_every`` steps and ``resume`` continues from it."""
    torch.manual_seed(settings.seed)
    inputs = views.inputs()
    segments, weights = targets(views, rig)
    config = GSkelConfig(in_channels=inputs.shape[1], out_channels=segments.shape[1], sigma=settings.sigma,
                         latent_size=views.latents.shape[-1], rig=rig.to_dict())
    model = GSkel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: half_cosine(step / settings.steps))
    generator = torch.Generator().manual_seed(settings.seed)
    losses, start = [], 0
    if resume and out is not None and (out / STATE_FILE).is_file():
        state = torch.load(out / STATE_FILE, weights_only=False)
        if state["settings"] != asdict(settings) or state["num_views"] != inputs.shape[0]:
            raise ValueError(f"{out / STATE_FILE} was saved with other settings or data ({state['settings']}, "
                             f"{state['num_views']} views); start without --resume or use another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        losses, start = state["losses"], state["step"]
    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps, desc="g_skel",
               disable=not show_progress, mininterval=2)
    for step in bar:
        index = torch.randint(0, inputs.shape[0], (settings.batch_views,), generator=generator)
        loss = pose_loss(model, inputs[index], segments[index], weights[index], settings.sigma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if out is not None and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps):
            out.mkdir(parents=True, exist_ok=True)
            _save_state(out, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "schedule": schedule.state_dict(), "generator": generator.get_state(),
                              "losses": losses, "step": step + 1, "settings": asdict(settings),
                              "num_views": inputs.shape[0]})
    return model.eval(), losses


@torch.no_grad()
def predicted_keypoints(g_skel: GSkel, latents: torch.Tensor, image_size: int) -> torch.Tensor:
    """Joint keypoints (N, 6, 22, 2) in image pixels read by g_skel from latents (N, 2, 6, c, h, w)."""
    views = ViewLatents(latents, torch.empty(0), Framing(torch.empty(0), torch.empty(0)))
    size = latents.shape[-1]
    dtype = next(g_skel.parameters()).dtype
    logits = torch.cat([g_skel(chunk.to(dtype)) for chunk in views.inputs().split(256)])
    points, _ = heatmap_keypoints(logits[:, :NUM_BODY_JOINTS])
    return rescale_pixels(points, size, image_size).reshape(latents.shape[0], 6, NUM_BODY_JOINTS, 2)


def keypoint_accuracy(g_skel: GSkel, views: ViewLatents, rig: ViewRig, image_size: int) -> dict:
    """g_skel's 2D joint accuracy on ``views`` against the true projections (as generated), joints in frame."""
    pred = predicted_keypoints(g_skel, views.latents, image_size)
    truth, visible = rig.true_keypoints(views.joints, image_size, views.framing)
    return keypoint_metrics(pred, truth, visible, image_size)


def view_latents(vae, images: torch.Tensor, joints: torch.Tensor, rig: ViewRig, image_size: int,
                 cuts: torch.Tensor | None = None) -> ViewLatents:
    return ViewLatents(encode(vae, images, image_size), joints, rig.frame(joints), cuts)


def run(bundle: Path, data: list[Path], out: Path, held_out: Path | None = None, held_out_share: float = 0.1,
        settings: GSkelTraining | None = None, resume: bool = False, show_progress: bool = True) -> dict:
    """The command: read, encode, train, measure, write ``out`` (g_skel folder + accuracy.json)."""
    from diffusers import AutoencoderKL

    settings = settings or GSkelTraining()
    unet_config = json.loads((bundle / "unet" / "config.json").read_text())
    vae = AutoencoderKL.from_pretrained(bundle / "vae").eval().requires_grad_(False)
    image_size = int(unet_config["sample_size"]) * 2 ** (len(vae.config.block_out_channels) - 1)
    images, joints, rig = load_views(data)
    if held_out is not None:
        test_images, test_joints, rig = load_views([held_out], rig)
    else:
        if not 0 < held_out_share < 1:
            raise ValueError(f"--held-out-share must be in (0, 1), got {held_out_share}")
        cut = len(images) - max(1, int(round(held_out_share * len(images))))
        images, test_images, joints, test_joints = images[:cut], images[cut:], joints[:cut], joints[cut:]
    whole = len(images)
    images, joints, cuts = with_limb_cuts(images, joints, rig, settings)
    train_views = view_latents(vae, images, joints, rig, image_size, cuts)
    test_views = view_latents(vae, test_images, test_joints, rig, image_size)
    model, losses = train(train_views, rig, settings, out, resume, show_progress)
    model.save_pretrained(out)
    report = {
        "held_out": keypoint_accuracy(model, test_views, rig, image_size),
        "train": keypoint_accuracy(model, train_views.select(slice(0, min(256, whole))), rig, image_size),
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "settings": asdict(settings), "samples": {"train": len(train_views), "held_out": len(test_views)},
        "latent_size": train_views.latents.shape[-1], "image_size": image_size,
    }
    (out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="pipeline folder (its vae/ and unet/config.json)")
    parser.add_argument("--data", type=Path, action="append", required=True, help="dataset folder with renders")
    parser.add_argument("--out", type=Path, required=True, help="g_skel folder to write")
    parser.add_argument("--held-out", type=Path, default=None, help="dataset folder to measure on")
    parser.add_argument("--held-out-share", type=float, default=0.1, help="share of --data held out otherwise")
    parser.add_argument("--steps", type=int, default=GSkelTraining.steps)
    parser.add_argument("--batch-views", type=int, default=GSkelTraining.batch_views)
    parser.add_argument("--lr", type=float, default=GSkelTraining.lr)
    parser.add_argument("--sigma", type=float, default=GSkelTraining.sigma, help="heatmap width in latent pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=GSkelTraining.checkpoint_every)
    parser.add_argument("--limb-cuts", type=float, default=GSkelTraining.limb_cut_share,
                        help="share of the training samples added again with one limb per view drawn in pieces "
                             "(hard negatives: the bone's target covers only its drawn part)")
    parser.add_argument("--limb-cut-radius", type=float, default=GSkelTraining.limb_cut_radius,
                        help="metres of foreground erased around a cut limb")
    parser.add_argument("--resume", action="store_true", help="continue from --out's saved progress")
    args = parser.parse_args(argv)
    for folder in [args.bundle, *args.data, *([args.held_out] if args.held_out else [])]:
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder")
    settings = GSkelTraining(steps=args.steps, batch_views=args.batch_views, lr=args.lr, sigma=args.sigma,
                             seed=args.seed, checkpoint_every=args.checkpoint_every,
                             limb_cut_share=args.limb_cuts, limb_cut_radius=args.limb_cut_radius)
    report = run(args.bundle, args.data, args.out, args.held_out, args.held_out_share, settings, args.resume)
    print(json.dumps({k: report[k] for k in ("held_out", "final_loss", "samples")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
