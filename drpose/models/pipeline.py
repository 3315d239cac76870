"""A PSHuman-style multi-view pipeline folder, read by parts: the UNet and everything that conditions it.

PSHuman ships a diffusers ``StableUnCLIPImg2ImgPipeline``-style folder whose ``model_index.json`` names a
UNet module from PSHuman's own code, so ``DiffusionPipeline.from_pretrained`` cannot read it without that
code. :class:`MultiViewPipeline` reads each part on its own instead (never importing PSHuman):

    model_index.json
    unet/                      UNetMV2DConditionModel (drpose.models.pshuman_unet)
    vae/                       AutoencoderKL: condition latents, and decoding for pictures and evaluation
    scheduler/                 the noise schedule the UNet was trained with (read into a DDIMScheduler)
    image_encoder/             CLIPVisionModelWithProjection: the input image's CLIP embedding
    feature_extractor/         CLIPImageProcessor: preprocessing for image_encoder
    image_normalizer/          StableUnCLIPImageNormalizer: mean/std of unCLIP's embedding noise augmentation
    image_noising_scheduler/   the schedule of that noise augmentation
    tokenizer/ + text_encoder/ CLIP text model for the fixed per-(domain, view) prompts, or instead
    prompt_embeds/             normal_embeds.pt and clr_embeds.pt, each (views, 77, dim), as PSHuman ships them

What it provides (images are (B, 3, R, R) in [0, 1]):

* the condition latent of every view: ``vae.encode(2x - 1).latent_dist.mode() * scaling_factor`` of the
  input image for the body views and of the head crop (the top-centre third, upsampled 3x) for the face view;
* the unCLIP class labels: the CLIP image embedding, noise-augmented at ``noise_level`` (0 by default) by
  the unCLIP rule, concatenated with the sinusoidal embedding of the noise level;
* the per-(domain, view) prompt embeddings of "a rendering image of 3D human, {view} view, {color|normal} map.";
* for classifier-free guidance, the unconditional variant: condition latents and class labels zeroed,
  prompt embeddings unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

from .layout import DOMAINS, NUM_BODY_VIEWS, VIEW_NAMES, check_rows
from .pshuman_unet import UNetMV2DConditionModel, load_multiview_unet

MODEL_INDEX = "model_index.json"
PROMPT_EMBEDS = "prompt_embeds"
PROMPT_FILES = {"normal": "normal_embeds.pt", "color": "clr_embeds.pt"}
PROMPT_TEMPLATE = "a rendering image of 3D human, {view} view, {domain} map."

PARTS = {
    "unet": "the multi-view UNet (UNetMV2DConditionModel) that generates the views",
    "vae": "the AutoencoderKL that encodes the condition image into latents (and decodes generated views)",
    "scheduler": "the noise schedule (betas, timestep spacing, prediction type) the UNet was trained with",
    "image_encoder": "the CLIP vision model whose image embedding conditions the UNet (the unCLIP class labels)",
    "feature_extractor": "the CLIP image preprocessing (resize, crop, normalise) for image_encoder",
    "image_normalizer": "the mean/std used by unCLIP's noise augmentation of the image embedding",
    "image_noising_scheduler": "the noise schedule of unCLIP's augmentation of the image embedding",
}


def prompt_text(domain: str, view: str) -> str:
    return PROMPT_TEMPLATE.format(view=view, domain="color" if domain == "color" else "normal")


def face_crop(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, R, R) -> the head close-up of the face view: the top-centre third (rows [0, R/3), columns
    [R/3, 2R/3)) upsampled 3x back to R x R (bilinear)."""
    side = images.shape[-1]
    if images.shape[-2] != side or side % 3:
        raise ValueError(f"condition images must be square with a side divisible by 3 for the face crop, got "
                         f"{tuple(images.shape[-2:])}")
    third = side // 3
    crop = images[..., :third, third : 2 * third]
    return F.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False)


@dataclass
class Conditioning:
    """What the UNet is conditioned on, per object."""

    latents: torch.Tensor  # (B, V, c, S, S): the condition latent of every view (face view: the head crop)
    class_labels: torch.Tensor  # (B, E): noise-augmented CLIP image embedding + noise-level sinusoid

    def __len__(self) -> int:
        return self.latents.shape[0]

    def select(self, index) -> "Conditioning":
        return Conditioning(self.latents[index], self.class_labels[index])

    def to(self, *args, **kwargs) -> "Conditioning":
        return Conditioning(self.latents.to(*args, **kwargs), self.class_labels.to(*args, **kwargs))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        return Conditioning(torch.cat([p.latents for p in parts]), torch.cat([p.class_labels for p in parts]))


class MultiViewPipeline:
    """The parts of a PSHuman-style pipeline folder that sampling and training need."""

    def __init__(self, unet: UNetMV2DConditionModel, vae: AutoencoderKL, scheduler: DDIMScheduler,
                 image_encoder, feature_extractor, image_normalizer: StableUnCLIPImageNormalizer,
                 image_noising_scheduler: DDPMScheduler, prompt_embeds: torch.Tensor):
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor
        self.image_normalizer = image_normalizer
        self.image_noising_scheduler = image_noising_scheduler
        views = unet.num_views
        expected = (len(DOMAINS), views, None, unet.config.cross_attention_dim)
        if prompt_embeds.dim() != 4 or prompt_embeds.shape[:2] != expected[:2] or prompt_embeds.shape[3] != expected[3]:
            raise ValueError(f"prompt embeddings must be (2 domains, {views} views, tokens, "
                             f"{unet.config.cross_attention_dim}), got {tuple(prompt_embeds.shape)}")
        self.prompt_embeds = prompt_embeds  # (2, V, tokens, dim)
        label_dim = unet.config.projection_class_embeddings_input_dim
        embed_dim = image_encoder.config.projection_dim
        if unet.config.class_embed_type != "projection" or label_dim != 2 * embed_dim:
            raise ValueError(f"the UNet's class embedding must project the unCLIP class labels of 2 x {embed_dim} "
                             f"(CLIP image embedding + noise level); its config has class_embed_type="
                             f"{unet.config.class_embed_type!r}, projection_class_embeddings_input_dim={label_dim}")

    # ----------------------------------------------------------------------------------- properties

    @property
    def num_views(self) -> int:
        return self.unet.num_views

    @property
    def latent_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.out_channels)

    @property
    def vae_downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return self.latent_size * self.vae_downsample

    @property
    def embedding_dim(self) -> int:
        """Size of the CLIP image embedding (the unCLIP noise is drawn at this size)."""
        return int(self.image_encoder.config.projection_dim)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def modules(self) -> dict:
        return {"unet": self.unet, "vae": self.vae, "image_encoder": self.image_encoder,
                "image_normalizer": self.image_normalizer}

    def to(self, device=None, dtype=None) -> "MultiViewPipeline":
        for name, module in self.modules().items():
            if name == "image_normalizer":  # its own ``to`` takes (device, dtype) positionally
                module.to(device, dtype if dtype is not None else module.mean.dtype)
            else:
                module.to(device=device, dtype=dtype)
        self.prompt_embeds = self.prompt_embeds.to(device=device, dtype=dtype)
        return self

    # ---------------------------------------------------------------------------------- conditioning

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [0, 1] -> (B, c, R/d, R/d) scaled latents (the posterior mode)."""
        dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode((images * 2.0 - 1.0).to(dtype)).latent_dist
        return posterior.mode() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1]."""
        dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode((latents / self.vae.config.scaling_factor).to(dtype)).sample
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [0, 1] -> (B, projection_dim) CLIP image embeddings."""
        pixels = self.feature_extractor(images=list(images.float().cpu()), return_tensors="pt", do_rescale=False)
        param = next(self.image_encoder.parameters())
        return self.image_encoder(pixels.pixel_values.to(param.device, param.dtype)).image_embeds

    @torch.no_grad()
    def class_labels(self, image_embeds: torch.Tensor, noise_level: int = 0,
                     generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """unCLIP class labels: the embedding normalised, noised to ``noise_level`` by the noising schedule
        (with ``noise``, or noise drawn on the CPU from ``generator``), un-normalised, then concatenated with
        the sinusoidal embedding of the noise level."""
        levels = torch.full((image_embeds.shape[0],), noise_level, dtype=torch.long)
        if noise is None:
            noise = torch.randn(image_embeds.shape, generator=generator, dtype=torch.float32)
        noise = noise.to(image_embeds)
        scaled = self.image_normalizer.scale(image_embeds)
        noised = self.image_noising_scheduler.add_noise(scaled, noise, levels.to(image_embeds.device))
        embeds = self.image_normalizer.unscale(noised)
        sinusoid = get_timestep_embedding(levels, embeds.shape[-1], flip_sin_to_cos=True, downscale_freq_shift=0)
        return torch.cat([embeds, sinusoid.to(embeds)], dim=1)

    @torch.no_grad()
    def condition(self, images: torch.Tensor, noise_level: int = 0, generator: torch.Generator | None = None,
                  noise: torch.Tensor | None = None) -> Conditioning:
        """The conditioning of (B, 3, R, R) input images in [0, 1]; ``noise`` (B, embedding dim) or
        ``generator`` gives the unCLIP augmentation noise."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, R, R), got shape {tuple(images.shape)}")
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"images are {images.shape[-2]}x{images.shape[-1]}; this model takes "
                             f"{self.image_size}x{self.image_size} (latents {self.latent_size} x VAE factor "
                             f"{self.vae_downsample})")
        body = self.encode_images(images)
        face = self.encode_images(face_crop(images))
        per_view = [body] * NUM_BODY_VIEWS + [face] * (self.num_views - NUM_BODY_VIEWS)
        latents = torch.stack(per_view, dim=1)
        labels = self.class_labels(self.image_embeddings(images), noise_level, generator, noise)
        return Conditioning(latents, labels)

    def unet_inputs(self, noisy: torch.Tensor, cond: Conditioning, keep: torch.Tensor | None = None) -> dict:
        """UNet keyword inputs for rows ``noisy`` (2 * G * V, c, S, S) of the G groups of ``cond``.

        ``keep`` (G,) 0/1 drops a group's conditioning (zero condition latents and class labels: the
        unconditional half of classifier-free guidance); prompt embeddings stay either way."""
        views = self.num_views
        groups = check_rows(noisy.shape[0], views, "noisy latents")
        if len(cond) != groups:
            raise ValueError(f"noisy latents hold {groups} groups; the conditioning has {len(cond)}")
        latents, labels = cond.latents, cond.class_labels
        if keep is not None:
            if keep.shape != (groups,):
                raise ValueError(f"keep: expected shape ({groups},), got {tuple(keep.shape)}")
            latents = latents * keep.view(-1, 1, 1, 1, 1).to(latents)
            labels = labels * keep.view(-1, 1).to(labels)
        dtype = noisy.dtype
        cond_rows = latents.unsqueeze(0).expand(len(DOMAINS), *latents.shape).reshape(-1, *latents.shape[2:])
        prompts = self.prompt_embeds.unsqueeze(1).expand(len(DOMAINS), groups, *self.prompt_embeds.shape[1:])
        label_rows = labels[None, :, None].expand(len(DOMAINS), groups, views, labels.shape[-1])
        return {
            "sample": torch.cat([noisy, cond_rows.to(dtype)], dim=1),
            "encoder_hidden_states": prompts.reshape(-1, *self.prompt_embeds.shape[2:]).to(dtype),
            "class_labels": label_rows.reshape(-1, labels.shape[-1]).to(dtype),
        }

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                keep: torch.Tensor | None = None, unet=None) -> torch.Tensor:
        """The UNet's prediction for ``noisy`` rows at ``timesteps`` (0-dim or per row); ``unet`` replaces
        the pipeline's own (e.g. a DeepSpeed engine wrapping it)."""
        inputs = self.unet_inputs(noisy, cond, keep)
        model = self.unet if unet is None else unet
        return model(inputs["sample"], timesteps, encoder_hidden_states=inputs["encoder_hidden_states"],
                     class_labels=inputs["class_labels"], return_dict=False)[0]

    # -------------------------------------------------------------------------------------- folders

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
                        prompt_embeds: str | Path | None = None, variant: str | None = None) -> "MultiViewPipeline":
        """Read a PSHuman-style pipeline folder by parts. ``prompt_embeds`` names a folder (or either file)
        holding PSHuman's ``normal_embeds.pt`` and ``clr_embeds.pt``; without it the folder's own
        ``prompt_embeds/`` is used, else the embeddings are computed from ``tokenizer/`` + ``text_encoder/``."""
        from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no pipeline folder at {folder}")
        if not (folder / MODEL_INDEX).is_file():
            raise FileNotFoundError(f"{folder}: no {MODEL_INDEX}; expected a PSHuman-style pipeline folder with "
                                    f"{', '.join(p + '/' for p in PARTS)}")
        missing = [f"{name}/ ({what})" for name, what in PARTS.items() if not (folder / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder}: missing " + "; ".join(missing))
        unet = load_multiview_unet(folder / "unet", dtype=dtype, device=device, variant=variant)
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype).to(device)
        scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(folder / "scheduler"))
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder", dtype=dtype).to(device)
        # the PIL backend of CLIPImageProcessor: the same preprocessing without torchvision
        feature_extractor = CLIPImageProcessorPil.from_pretrained(folder / "feature_extractor")
        normalizer = StableUnCLIPImageNormalizer.from_pretrained(folder / "image_normalizer").to(device, dtype)
        noising = DDPMScheduler.from_config(DDPMScheduler.load_config(folder / "image_noising_scheduler"))
        embeds = load_prompt_embeds(folder, unet.num_views, prompt_embeds)
        pipeline = cls(unet, vae, scheduler, image_encoder, feature_extractor, normalizer, noising,
                       embeds.to(device=device, dtype=dtype))
        for module in pipeline.modules().values():
            module.eval().requires_grad_(False)
        return pipeline

    def save_pretrained(self, folder: str | Path, unet_module: str = "drpose.models.pshuman_unet") -> None:
        """Write the folder layout ``from_pretrained`` reads (the prompt embeddings as PSHuman's .pt files)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet")
        self.vae.save_pretrained(folder / "vae")
        self.scheduler.save_pretrained(folder / "scheduler")
        self.image_encoder.save_pretrained(folder / "image_encoder")
        self.feature_extractor.save_pretrained(folder / "feature_extractor")
        self.image_normalizer.save_pretrained(folder / "image_normalizer")
        self.image_noising_scheduler.save_pretrained(folder / "image_noising_scheduler")
        save_prompt_embeds(self.prompt_embeds, folder / PROMPT_EMBEDS)
        index = {
            "_class_name": "StableUnCLIPImg2ImgPipeline",
            "unet": [unet_module, "UNetMV2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "image_normalizer": ["diffusers", "StableUnCLIPImageNormalizer"],
            "image_noising_scheduler": ["diffusers", type(self.image_noising_scheduler).__name__],
        }
        (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def save_prompt_embeds(embeds: torch.Tensor, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, domain in enumerate(DOMAINS):
        torch.save(embeds[index].detach().cpu().contiguous().clone(), folder / PROMPT_FILES[domain])


def load_prompt_embeds(folder: Path, num_views: int, source: str | Path | None = None) -> torch.Tensor:
    """(2, V, tokens, dim) prompt embeddings: from ``source`` (a folder or one of PSHuman's two files), else
    the pipeline's ``prompt_embeds/``, else computed from its ``tokenizer/`` and ``text_encoder/``."""
    if source is not None:
        source = Path(source)
        embeds_folder = source.parent if source.is_file() else source
        if not all((embeds_folder / name).is_file() for name in PROMPT_FILES.values()):
            raise FileNotFoundError(f"prompt embeddings: {embeds_folder} must hold {' and '.join(PROMPT_FILES.values())} "
                                    f"(PSHuman's fixed_prompt_embeds_7view)")
        return read_prompt_embeds(embeds_folder, num_views)
    if (folder / PROMPT_EMBEDS).is_dir():
        return read_prompt_embeds(folder / PROMPT_EMBEDS, num_views)
    if (folder / "tokenizer").is_dir() and (folder / "text_encoder").is_dir():
        return compute_prompt_embeds(folder, num_views)
    raise FileNotFoundError(
        f"{folder}: no prompt embeddings (the fixed per-(domain, view) text conditioning of every row): provide "
        f"tokenizer/ + text_encoder/ (CLIP text model) or {PROMPT_EMBEDS}/ with {' and '.join(PROMPT_FILES.values())}, "
        f"or name PSHuman's fixed_prompt_embeds_7view folder")


def read_prompt_embeds(folder: Path, num_views: int) -> torch.Tensor:
    tensors = []
    for domain in DOMAINS:
        path = folder / PROMPT_FILES[domain]
        tensor = torch.load(path, map_location="cpu", weights_only=True)
        if not torch.is_tensor(tensor) or tensor.dim() != 3 or tensor.shape[0] != num_views:
            shape = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
            raise ValueError(f"{path}: expected a ({num_views} views, tokens, dim) tensor, got {shape}")
        tensors.append(tensor.float())
    if tensors[0].shape != tensors[1].shape:
        raise ValueError(f"{folder}: normal and color prompt embeddings differ in shape "
                         f"({tuple(tensors[0].shape)} vs {tuple(tensors[1].shape)})")
    return torch.stack(tensors)


@torch.no_grad()
def compute_prompt_embeds(folder: Path, num_views: int) -> torch.Tensor:
    """Encode the fixed prompts with the folder's CLIP tokenizer and text encoder (last hidden state)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    if num_views != len(VIEW_NAMES):
        raise ValueError(f"prompts are defined for the {len(VIEW_NAMES)} views {VIEW_NAMES}; this UNet has {num_views}")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    embeds = []
    for domain in DOMAINS:
        prompts = [prompt_text(domain, view) for view in VIEW_NAMES]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        embeds.append(text_encoder(ids)[0].float())
    return torch.stack(embeds)
