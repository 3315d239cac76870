"""The embedded tiny world's weights: one folder with a codec, a base multi-view model, g_skel, the
noise schedule, the camera rig and the settings that tie them together, plus a manifest.

    tiny_world/
      manifest.json     settings, seeds, sizes, build time, quality figures
      codec/            diffusers AutoencoderKL
      base_model/       MultiViewUNet.save_pretrained (diffusers UNet in unet/ + multi-view parts)
      g_skel/           GSkel.save_pretrained
      scheduler/        diffusers DDIMScheduler config

``python -m drpose.world.build`` writes it; ``load_world`` reads it (by default the copy shipped in
``drpose/assets/tiny_world``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from drpose.body import joints_from_params
from drpose.cameras import CameraRig
from drpose.models.codec import LatentCodec
from drpose.models.g_skel import GSkel
from drpose.models.multiview_unet import MultiViewUNet
from drpose.poses import sample_poses

from .latents import LatentBatch, concat_latent_batches, encode_views
from .views import render_views

DEFAULT_WORLD = Path(__file__).resolve().parents[1] / "assets" / "tiny_world"
MANIFEST = "manifest.json"


@dataclass
class WorldSettings:
    resolution: int = 64  # rendered image side (pixels)
    latent_size: int = 16  # latent side = heatmap side
    latent_channels: int = 4
    sigma: float = 1.0  # PoseScore heatmap width in latent pixels
    prediction_type: str = "v_prediction"
    rig: dict = field(default_factory=lambda: CameraRig().to_dict())

    def camera_rig(self) -> CameraRig:
        return CameraRig.from_dict(self.rig)


@dataclass
class World:
    codec: LatentCodec
    unet: MultiViewUNet
    g_skel: GSkel
    scheduler: DDIMScheduler
    settings: WorldSettings
    manifest: dict
    folder: Path | None = None

    @property
    def rig(self) -> CameraRig:
        return self.settings.camera_rig()

    def save(self, folder: str | Path, manifest: dict | None = None, half: bool = True) -> None:
        """Write the world; ``half`` stores weights as float16 (they load back as float32)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, module, save in (("codec", self.codec, self.codec.save_pretrained),
                                   ("base_model", self.unet, self.unet.save_pretrained),
                                   ("g_skel", self.g_skel, self.g_skel.save_pretrained)):
            if half:
                module.half()
            try:
                save(folder / name)
            finally:
                module.float()
        self.scheduler.save_pretrained(folder / "scheduler")
        self.manifest = dict(manifest or self.manifest, settings=asdict(self.settings))
        (folder / MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n")
        self.folder = folder


def load_world(folder: str | Path | None = None, device: str | torch.device = "cpu") -> World:
    folder = Path(folder) if folder is not None else DEFAULT_WORLD
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        hint = " (build it with `python -m drpose.world.build`)" if folder == DEFAULT_WORLD else ""
        raise FileNotFoundError(f"no tiny world at {folder}: {MANIFEST} is missing{hint}")
    manifest = json.loads(manifest_path.read_text())
    settings = WorldSettings(**manifest["settings"])
    for part in ("codec", "base_model", "g_skel", "scheduler"):
        if not (folder / part).is_dir():
            raise FileNotFoundError(f"tiny world {folder} lacks its {part}/ folder")
    codec = LatentCodec.from_pretrained(folder / "codec", torch_dtype=torch.float32)
    unet = MultiViewUNet.from_pretrained(folder / "base_model", torch_dtype=torch.float32)
    g_skel = GSkel.from_pretrained(folder / "g_skel").float()
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    for module in (codec, unet, g_skel):
        module.to(device).eval().requires_grad_(False)
    return World(codec, unet, g_skel, scheduler, settings, manifest, folder)


def sample_latents(world: World, distributions: list[str], num_each: int, seed: int, chunk: int = 64) -> LatentBatch:
    """Render and encode ``num_each`` fresh poses of every distribution (deterministic by seed)."""
    return encode_pose_pool(world.codec, world.rig, world.settings.resolution, distributions, num_each, seed, chunk)


def encode_pose_pool(codec: LatentCodec, rig: CameraRig, resolution: int, distributions: list[str], num_each: int,
                     seed: int, chunk: int = 64, breaking_share: float | None = None) -> LatentBatch:
    """Poses of each distribution drawn in one seeded call (seed + its index), rendered and encoded in chunks.

    ``breaking_share`` goes to :func:`~drpose.poses.sample_poses` (None: the default share of ``broad``)."""
    batches = []
    for d_index, distribution in enumerate(distributions):
        params = sample_poses(distribution, num_each, seed + d_index, breaking_share=breaking_share)
        joints = joints_from_params(params)
        for start in range(0, num_each, chunk):
            batches.append(encode_views(codec, render_views(joints[start : start + chunk], rig, resolution)))
    return concat_latent_batches(batches)
