"""The embedded tiny world: a model bundle in PSHuman's folder format plus the world's own files.

    tiny_world/
      manifest.json     settings (image size, rig), seeds, sizes, build time, quality figures
      pipeline/         a PSHuman-style pipeline folder (model_index.json, unet/ UNetMV2DConditionModel,
                        vae/, scheduler/, image_encoder/, feature_extractor/, image_normalizer/,
                        image_noising_scheduler/, prompt_embeds/{normal,clr}_embeds.pt)
      g_skel/           g_skel (its config: heatmap width, latent size, the rig of the views it reads)

``python -m drpose.world.build`` writes it; :func:`load_world` reads it (by default the copy shipped in
``drpose/assets/tiny_world``) through the same :class:`~drpose.models.bundle.ModelBundle` loader that
reads a downloaded PSHuman folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from drpose.models.bundle import TINY_WORLD, ModelBundle
from drpose.models.rig import ViewRig

DEFAULT_WORLD = TINY_WORLD
MANIFEST = "manifest.json"


@dataclass
class WorldSettings:
    resolution: int = 72  # rendered image side (pixels)
    latent_size: int = 18  # latent side = heatmap side
    latent_channels: int = 4
    sigma: float = 1.0  # PoseScore heatmap width in latent pixels
    prediction_type: str = "v_prediction"
    rig: dict = field(default_factory=lambda: ViewRig().to_dict())

    def view_rig(self) -> ViewRig:
        return ViewRig.from_dict(self.rig)


@dataclass
class World:
    bundle: ModelBundle
    settings: WorldSettings
    manifest: dict
    folder: Path

    @property
    def rig(self) -> ViewRig:
        return self.bundle.rig

    @property
    def pipeline(self):
        return self.bundle.pipeline


def load_world(folder: str | Path | None = None, device: str | torch.device = "cpu") -> World:
    folder = Path(folder) if folder is not None else DEFAULT_WORLD
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        hint = " (build it with `python -m drpose.world.build`)" if folder == DEFAULT_WORLD else ""
        raise FileNotFoundError(f"no tiny world at {folder}: {MANIFEST} is missing{hint}")
    manifest = json.loads(manifest_path.read_text())
    settings = WorldSettings(**manifest["settings"])
    bundle = ModelBundle.load(folder / "pipeline", folder / "g_skel", device=device)
    return World(bundle, settings, manifest, folder)


def write_manifest(folder: Path, manifest: dict, settings: WorldSettings) -> None:
    (folder / MANIFEST).write_text(json.dumps(dict(manifest, settings=asdict(settings)), indent=2) + "\n")
