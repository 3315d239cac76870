"""The tiny world's image and text conditioning parts, made as PSHuman's are used (small, seeded).

* ``image_encoder``: a small CLIPVisionModelWithProjection with seeded random weights. Its embedding is a
  fixed random feature of the input image; the base model learns whatever use it has for it through the
  UNet's unCLIP class embedding, exactly where PSHuman's CLIP embedding enters.
* ``feature_extractor``: CLIP preprocessing at its input size; ``image_normalizer``: the mean and std of
  the embeddings of the pretraining pool (what unCLIP's normalizer holds); ``image_noising_scheduler``:
  SD-2.1-unclip's squared-cosine schedule.
* prompt embeddings: a small CLIP text model (character-level tokenizer, seeded weights) encodes PSHuman's
  14 fixed prompts; the base model's pretraining then trains these embeddings with it, so each (domain,
  view) row carries a clear signal of what it is, and the pipeline ships them as PSHuman ships its own:
  ``prompt_embeds/{normal,clr}_embeds.pt``.
"""

from __future__ import annotations

import string

import torch
from diffusers import DDPMScheduler
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
from transformers import (CLIPImageProcessorPil, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)

from drpose.models.layout import DOMAINS, VIEW_NAMES
from drpose.models.pipeline import prompt_text

CLIP_IMAGE_SIZE = 32
EMBED_DIM = 16  # CLIP image embedding; the UNet's class labels are twice that
TEXT_TOKENS = 77


def image_conditioning(seed: int) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessorPil]:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=CLIP_IMAGE_SIZE, patch_size=8, projection_dim=EMBED_DIM)
    extractor = CLIPImageProcessorPil(size={"shortest_edge": CLIP_IMAGE_SIZE},
                                      crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE})
    return CLIPVisionModelWithProjection(config).eval().requires_grad_(False), extractor


@torch.no_grad()
def fit_normalizer(image_encoder, extractor, images: torch.Tensor, chunk: int = 256) -> StableUnCLIPImageNormalizer:
    """The normalizer of the embeddings of ``images`` (N, 3, R, R) in [0, 1]: their mean and std per dimension."""
    embeds = []
    for start in range(0, images.shape[0], chunk):
        pixels = extractor(images=list(images[start : start + chunk].float()), return_tensors="pt", do_rescale=False)
        embeds.append(image_encoder(pixels.pixel_values).image_embeds)
    embeds = torch.cat(embeds)
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=embeds.shape[-1])
    normalizer.mean.data.copy_(embeds.mean(0, keepdim=True))
    normalizer.std.data.copy_(embeds.std(0, keepdim=True).clamp_min(1e-6))
    return normalizer.requires_grad_(False)


def noising_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def character_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer without merges over lower-case letters, digits and punctuation: every prompt
    tokenizes, character by character, without downloads."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + ",.-_!":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_TOKENS)


@torch.no_grad()
def initial_prompt_embeds(dim: int, seed: int) -> torch.Tensor:
    """(2, 7, 77, dim) embeddings of PSHuman's fixed prompts by a small seeded CLIP text model."""
    tokenizer = character_tokenizer()
    torch.manual_seed(seed)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=2 * dim,
                                           num_hidden_layers=2, num_attention_heads=2,
                                           max_position_embeddings=TEXT_TOKENS)).eval()
    embeds = []
    for domain in DOMAINS:
        ids = tokenizer([prompt_text(domain, view) for view in VIEW_NAMES], padding="max_length",
                        max_length=TEXT_TOKENS, truncation=True, return_tensors="pt").input_ids
        embeds.append(encoder(ids).last_hidden_state)
    return torch.stack(embeds)
