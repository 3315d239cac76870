"""Multi-view UNet: a diffusers ``UNet2DConditionModel`` whose self-attention spans all images of a sample.

A sample is ``num_domains x num_views`` images (normal maps and RGB images of 6 body views), laid out
domain-major in the batch: image index ``domain * num_views + view``, samples contiguous. Three things
turn a single-image Stable-Diffusion UNet into the multi-view model without adding attention weights, so
any Stable-Diffusion-family checkpoint in diffusers format loads into it unchanged:

* self-attention (``attn1`` of every transformer block) attends over the tokens of all images of the
  sample at once (``MultiViewAttnProcessor``); cross-attention stays per image;
* view and domain enter as ``class_labels``: learned tables (``ViewDomainEmbedding``) added to the
  timestep embedding through diffusers' weight-free ``class_embed_type="identity"`` (or, for
  unCLIP-style configs with a ``"projection"`` class embedding, added to its input vector);
* the condition image's latent is concatenated to every image's noisy latent (``in_channels`` =
  2 x latent channels; a 4-channel checkpoint gets zero-initialised extra input channels), and its
  tokens (``ConditionTokenizer``) feed cross-attention in place of CLIP image features.

``save_pretrained`` writes the diffusers UNet to ``unet/`` and the multi-view parts next to it;
``from_pretrained`` reads such a folder, or a plain diffusers UNet folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

MULTIVIEW_CONFIG = "multiview_config.json"
MULTIVIEW_WEIGHTS = "multiview_parts.safetensors"

try:
    import xformers.ops as xops

    HAS_XFORMERS = True
except ImportError:
    HAS_XFORMERS = False


def tiny_unet_config(latent_channels: int = 4, latent_size: int = 16) -> dict:
    """The embedded world's UNet: 3 levels (32/64/64 channels), attention at the two coarser levels."""
    return dict(
        sample_size=latent_size,
        in_channels=2 * latent_channels,
        out_channels=latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=64,
        norm_num_groups=16,
        class_embed_type="identity",
    )


def pshuman_unet_config() -> dict:
    """The PSHuman / Stable Diffusion 2.1-unclip UNet shape (for real-size runs and benchmarks).

    768 px images -> 96x96 latents; the input image's latent is concatenated (in_channels 8); the unCLIP
    class embedding projects a 2048-d vector (noise-augmented CLIP image embedding) into the timestep
    embedding.
    """
    return dict(
        sample_size=96,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=2048,
    )


@dataclass
class MultiViewConfig:
    num_views: int = 6
    num_domains: int = 2
    multiview_attention: bool = True
    condition_tokens: int = 16  # tokens the condition latent is summarised into for cross-attention

    @property
    def images_per_sample(self) -> int:
        return self.num_views * self.num_domains


class MultiViewAttnProcessor:
    """Self-attention over all ``images_per_sample`` images of a sample; cross-attention per image.

    Tokens of the images of one sample are concatenated into one sequence before attention, which is
    exact joint attention (the q/k/v projections act per token, so no weights change). SDPA by default;
    xformers' memory-efficient attention for CUDA tensors when it is installed.
    """

    def __init__(self, images_per_sample: int, enabled: bool = True):
        self.images_per_sample = images_per_sample
        self.enabled = enabled

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attn.spatial_norm is not None or hidden_states.ndim != 3 or attention_mask is not None:
            raise NotImplementedError("MultiViewAttnProcessor handles the token-sequence attention of SD-style UNets")
        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        is_self = encoder_hidden_states is None
        rows, length, channels = hidden_states.shape
        joint = is_self and self.enabled and self.images_per_sample > 1
        if joint:
            if rows % self.images_per_sample:
                raise ValueError(f"batch of {rows} images is not a whole number of samples of "
                                 f"{self.images_per_sample} images (num_domains x num_views)")
            hidden_states = hidden_states.reshape(rows // self.images_per_sample, self.images_per_sample * length, channels)
        context = hidden_states if is_self else encoder_hidden_states
        if not is_self and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        out = _attention(query, key, value, attn.heads)
        out = attn.to_out[1](attn.to_out[0](out))
        if joint:
            out = out.reshape(rows, length, -1)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _attention(query, key, value, heads: int) -> torch.Tensor:
    batch, q_len, inner = query.shape
    head_dim = inner // heads
    if HAS_XFORMERS and query.is_cuda:
        q, k, v = (t.reshape(batch, -1, heads, head_dim) for t in (query, key, value))
        return xops.memory_efficient_attention(q, k, v).reshape(batch, q_len, inner)
    q, k, v = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, q_len, inner)


class ViewDomainEmbedding(nn.Module):
    """Learned per-view and per-domain vectors, zero at initialisation so a loaded base model is unchanged."""

    def __init__(self, num_views: int, num_domains: int, dim: int):
        super().__init__()
        self.view = nn.Embedding(num_views, dim)
        self.domain = nn.Embedding(num_domains, dim)
        nn.init.zeros_(self.view.weight)
        nn.init.zeros_(self.domain.weight)

    def forward(self, view_ids: torch.Tensor, domain_ids: torch.Tensor) -> torch.Tensor:
        return self.view(view_ids) + self.domain(domain_ids)


class ConditionTokenizer(nn.Module):
    """Condition latent (B, c, h, w) -> (B, tokens, dim) for cross-attention: strided convs, then a grid
    of tokens with learned position vectors. Stands in for the CLIP image encoder of the real models."""

    def __init__(self, latent_channels: int, dim: int, tokens: int):
        super().__init__()
        side = int(round(tokens**0.5))
        if side * side != tokens:
            raise ValueError(f"condition_tokens must be a square number, got {tokens}")
        self.side = side
        hidden = max(32, dim // 2)
        self.net = nn.Sequential(
            nn.Conv2d(latent_channels, hidden, 3, padding=1), nn.SiLU(),
            nn.Conv2d(hidden, dim, 3, padding=1), nn.SiLU(),
        )  # fmt: skip
        self.position = nn.Parameter(torch.zeros(1, tokens, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, cond_latents: torch.Tensor) -> torch.Tensor:
        features = F.adaptive_avg_pool2d(self.net(cond_latents), self.side)
        return self.norm(features.flatten(2).transpose(1, 2) + self.position)


class MultiViewUNet(nn.Module):
    """Predicts noise (or v) for all images of each sample jointly, conditioned on a front-view latent."""

    def __init__(self, unet: UNet2DConditionModel, config: MultiViewConfig):
        super().__init__()
        class_type = unet.config.class_embed_type
        if class_type not in ("identity", "projection"):
            raise ValueError(f"the UNet needs class_embed_type 'identity' or 'projection' for view/domain "
                             f"conditioning, got {class_type!r}; load it through MultiViewUNet.from_pretrained")
        self.unet = unet
        self.config = config
        self.latent_channels = unet.config.out_channels
        if unet.config.in_channels != 2 * self.latent_channels:
            raise ValueError(f"in_channels must be 2 x latent channels ({2 * self.latent_channels}) to take the "
                             f"condition latent, got {unet.config.in_channels}")
        label_dim = (unet.config.projection_class_embeddings_input_dim if class_type == "projection"
                     else unet.config.block_out_channels[0] * 4)
        self.view_domain_embedding = ViewDomainEmbedding(config.num_views, config.num_domains, label_dim)
        self.condition_tokenizer = ConditionTokenizer(self.latent_channels, unet.config.cross_attention_dim,
                                                      config.condition_tokens)
        self.set_multiview_attention(config.multiview_attention)

    # ------------------------------------------------------------------------------------------ setup

    def set_multiview_attention(self, enabled: bool) -> None:
        """Joint attention across the images of a sample (True) or independent images (False)."""
        self.config.multiview_attention = enabled
        self.unet.set_attn_processor(MultiViewAttnProcessor(self.config.images_per_sample, enabled))

    @classmethod
    def from_config(cls, unet_config: dict, config: MultiViewConfig | None = None) -> "MultiViewUNet":
        return cls(UNet2DConditionModel(**unet_config), config or MultiViewConfig())

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet")
        parts = {f"view_domain_embedding.{k}": v for k, v in self.view_domain_embedding.state_dict().items()}
        parts.update({f"condition_tokenizer.{k}": v for k, v in self.condition_tokenizer.state_dict().items()})
        save_file({k: v.detach().contiguous().cpu() for k, v in parts.items()}, str(folder / MULTIVIEW_WEIGHTS))
        (folder / MULTIVIEW_CONFIG).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, config: MultiViewConfig | None = None, **unet_kwargs) -> "MultiViewUNet":
        """Load a folder written by ``save_pretrained``, or a plain diffusers UNet folder (or one with a
        ``unet/`` subfolder). A plain UNet gets weight-free view/domain conditioning
        (``class_embed_type="identity"`` unless it has a projection class embedding), zero-initialised
        extra input channels when it takes only the noisy latent, and fresh multi-view parts."""
        folder = Path(folder)
        unet_folder = folder / "unet" if (folder / "unet" / "config.json").exists() else folder
        if not (unet_folder / "config.json").exists():
            raise FileNotFoundError(f"no diffusers UNet in {folder}: expected {folder}/unet/config.json or "
                                    f"{folder}/config.json")
        saved_config = folder / MULTIVIEW_CONFIG
        if config is None:
            config = MultiViewConfig(**json.loads(saved_config.read_text())) if saved_config.exists() else MultiViewConfig()
        raw = UNet2DConditionModel.load_config(unet_folder)
        overrides = {}
        if raw.get("class_embed_type") not in ("identity", "projection"):
            if raw.get("class_embed_type") is not None:
                raise ValueError(f"{unet_folder}: class_embed_type {raw['class_embed_type']!r} has weights that "
                                 "the view/domain conditioning cannot reuse")
            overrides["class_embed_type"] = "identity"
        unet, info = UNet2DConditionModel.from_pretrained(unet_folder, output_loading_info=True,
                                                          **overrides, **unet_kwargs)
        problems = {k: v for k, v in info.items() if v}
        if problems:
            raise ValueError(f"{unet_folder}: checkpoint does not match the UNet config: {problems}")
        if unet.config.in_channels == unet.config.out_channels:
            unet = expand_input_channels(unet)
        model = cls(unet, config)
        parts_file = folder / MULTIVIEW_WEIGHTS
        if parts_file.exists():
            model.load_multiview_parts(load_file(str(parts_file)), parts_file)
        return model

    def load_multiview_parts(self, state: dict, source) -> None:
        own = {f"view_domain_embedding.{k}" for k in self.view_domain_embedding.state_dict()}
        own |= {f"condition_tokenizer.{k}" for k in self.condition_tokenizer.state_dict()}
        missing, unexpected = own - set(state), set(state) - own
        if missing or unexpected:
            raise ValueError(f"{source}: multi-view parts do not match: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        self.view_domain_embedding.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                                                    if k.startswith("view_domain_embedding.")})
        self.condition_tokenizer.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                                                  if k.startswith("condition_tokenizer.")})

    # ---------------------------------------------------------------------------------------- forward

    def image_ids(self, num_samples: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """View and domain index of every row of a batch of ``num_samples`` samples."""
        per_sample = torch.arange(self.config.images_per_sample, device=device)
        views = (per_sample % self.config.num_views).repeat(num_samples)
        domains = (per_sample // self.config.num_views).repeat(num_samples)
        return views, domains

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond_latents: torch.Tensor,
                cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            noisy_latents: (B * I, c, h, w) with I = num_domains * num_views, domain-major per sample.
            timesteps: scalar, (B,) or (B * I,) diffusion timesteps.
            cond_latents: (B, c, h, w) latent of each sample's condition (front-view) image.
            cond_mask: optional (B,) 0/1 weights; 0 drops the condition (classifier-free guidance).
        Returns:
            (B * I, c, h, w) model prediction.
        """
        per_sample = self.config.images_per_sample
        rows = noisy_latents.shape[0]
        if rows != cond_latents.shape[0] * per_sample:
            raise ValueError(f"noisy_latents has {rows} rows; expected {cond_latents.shape[0]} samples x "
                             f"{per_sample} images")
        if cond_mask is not None:
            cond_latents = cond_latents * cond_mask.view(-1, 1, 1, 1).to(cond_latents.dtype)
        tokens = self.condition_tokenizer(cond_latents)
        if cond_mask is not None:
            tokens = tokens * cond_mask.view(-1, 1, 1).to(tokens.dtype)
        samples = cond_latents.shape[0]
        cond_per_image = cond_latents.repeat_interleave(per_sample, dim=0)
        tokens = tokens.repeat_interleave(per_sample, dim=0)
        timesteps = torch.as_tensor(timesteps, device=noisy_latents.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(rows)
        elif timesteps.shape[0] == samples and samples != rows:
            timesteps = timesteps.repeat_interleave(per_sample)
        views, domains = self.image_ids(samples, noisy_latents.device)
        labels = self.view_domain_embedding(views, domains).to(noisy_latents.dtype)
        sample = torch.cat([noisy_latents, cond_per_image.to(noisy_latents.dtype)], dim=1)
        return self.unet(sample, timesteps, encoder_hidden_states=tokens.to(noisy_latents.dtype),
                         class_labels=labels, return_dict=False)[0]


def expand_input_channels(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Double ``conv_in``'s input channels for the condition latent; the new weights start at zero, so
    the model's output is unchanged until they are trained."""
    old = unet.conv_in
    new = nn.Conv2d(2 * old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new.to(old.weight.device, old.weight.dtype)
    unet.register_to_config(in_channels=new.in_channels)
    return unet
