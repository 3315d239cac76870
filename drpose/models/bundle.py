"""A model bundle: everything a DrPose run needs to sample and score, loaded from folders.

    bundle = ModelBundle.load(pipeline="/ckpt/PSHuman_Unclip_768_6views", g_skel="/ckpt/g_skel_96",
                              prompt_embeds="/src/PSHuman/mvdiffusion/data/fixed_prompt_embeds_7view")

* ``pipeline``: a PSHuman-style pipeline folder (:class:`~drpose.models.pipeline.MultiViewPipeline`): the
  UNet, VAE, unCLIP image conditioning, prompt embeddings and the noise schedule (latent size, views,
  domains and prediction type all come from here);
* ``g_skel``: a g_skel folder (:mod:`drpose.models.g_skel`) whose config holds the heatmap width it was
  trained with and the camera rig of the views it reads (:class:`~drpose.models.rig.ViewRig`, PSHuman's
  when absent);
* ``unet`` (optional): a UNet folder replacing the pipeline's (e.g. a converted Stable Diffusion UNet).

The embedded tiny world ships one bundle (``drpose/assets/tiny_world``: ``pipeline/`` + ``g_skel/``); a
downloaded PSHuman folder plus a g_skel trained for its 96x96 latents is another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .g_skel import GSkel
from .pipeline import MultiViewPipeline
from .pshuman_unet import load_multiview_unet
from .rig import ViewRig

TINY_WORLD = Path(__file__).resolve().parents[1] / "assets" / "tiny_world"


@dataclass
class ModelBundle:
    pipeline: MultiViewPipeline
    g_skel: GSkel
    rig: ViewRig

    @property
    def sigma(self) -> float:
        return float(self.g_skel.config.sigma)

    @property
    def num_views(self) -> int:
        return self.pipeline.num_views

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.pipeline.latent_channels, self.pipeline.latent_size, self.pipeline.latent_size)

    @property
    def image_size(self) -> int:
        return self.pipeline.image_size

    @classmethod
    def load(cls, pipeline: str | Path | None = None, g_skel: str | Path | None = None,
             prompt_embeds: str | Path | None = None, unet: str | Path | None = None,
             dtype: torch.dtype = torch.float32, device="cpu") -> "ModelBundle":
        """Read a bundle; ``None`` for ``pipeline`` / ``g_skel`` means the tiny world's."""
        pipeline_dir = Path(pipeline) if pipeline is not None else TINY_WORLD / "pipeline"
        g_skel_dir = Path(g_skel) if g_skel is not None else TINY_WORLD / "g_skel"
        if pipeline is None and not (pipeline_dir / "model_index.json").is_file():
            raise FileNotFoundError(f"the tiny world's pipeline is missing at {pipeline_dir}; rebuild it with "
                                    f"`python -m drpose.world.build`")
        loaded = MultiViewPipeline.from_pretrained(pipeline_dir, dtype=dtype, device=device, prompt_embeds=prompt_embeds)
        if unet is not None:
            loaded.unet = load_multiview_unet(unet, dtype=dtype, device=device).requires_grad_(False)
        skeleton = GSkel.from_pretrained(g_skel_dir).to(device=device, dtype=dtype).eval().requires_grad_(False)
        rig = ViewRig.from_dict(skeleton.config.rig) if skeleton.config.rig else ViewRig()
        bundle = cls(loaded, skeleton, rig)
        bundle.check()
        return bundle

    def check(self) -> None:
        """The parts must fit together: g_skel reads the body views' normal + RGB latents at the UNet's size."""
        config = self.g_skel.config
        expected = 2 * self.pipeline.latent_channels
        if config.in_channels != expected:
            raise ValueError(f"g_skel takes {config.in_channels} input channels; this pipeline's views give "
                             f"{expected} (normal + RGB latents of {self.pipeline.latent_channels} channels)")
        if config.latent_size is not None and config.latent_size != self.pipeline.latent_size:
            raise ValueError(f"g_skel was trained on {config.latent_size}x{config.latent_size} latents; this "
                             f"pipeline's UNet makes {self.pipeline.latent_size}x{self.pipeline.latent_size} "
                             f"(train one for it with `python -m drpose.g_skel_train`)")
        if self.pipeline.num_views != self.rig.num_views + 1:
            raise ValueError(f"the UNet generates {self.pipeline.num_views} views; the rig has "
                             f"{self.rig.num_views} body views + the face view")
