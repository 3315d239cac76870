"""Small PSHuman-format models and pipeline folders for tests (random weights, built offline)."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
from transformers import (CLIPImageProcessorPil, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)

from drpose.models.pipeline import MultiViewPipeline, compute_prompt_embeds
from drpose.models.pshuman_unet import CLASS_NAME, UNetMV2DConditionModel

CROSS_DIM = 24
EMBED_DIM = 8  # CLIP image embedding; class labels are twice that


def tiny_unet_config(latent_size: int = 12, levels: int = 2) -> dict:
    """A two- or three-level UNetMV2DConditionModel (every attention level's side a multiple of 3)."""
    down = ["CrossAttnDownBlockMV2D"] * (levels - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlockMV2D"] * (levels - 1)
    return dict(
        _class_name=CLASS_NAME, sample_size=latent_size, in_channels=8, out_channels=4,
        down_block_types=down, mid_block_type="UNetMidBlockMV2DCrossAttn", up_block_types=up,
        block_out_channels=[16, 32, 32][:levels], layers_per_block=1, attention_head_dim=[2, 4, 4][:levels],
        cross_attention_dim=CROSS_DIM, norm_num_groups=8, use_linear_projection=True, upcast_attention=True,
        class_embed_type="projection", projection_class_embeddings_input_dim=2 * EMBED_DIM, num_views=7,
        selfattn_block="self_rowwise", mvcd_attention=True, multiview_attention=True, cd_attention_mid=False,
        cd_attention_last=False, regress_elevation=False, use_dino=False, decay=0.9999,
    )  # fmt: skip


def tiny_unet(latent_size: int = 12, seed: int = 0, levels: int = 2, dtype=torch.float32) -> UNetMV2DConditionModel:
    torch.manual_seed(seed)
    unet = UNetMV2DConditionModel(**tiny_unet_config(latent_size, levels))
    with torch.no_grad():  # PSHuman zero-initialises attn_mv.to_out; make it count in tests
        for name, param in unet.named_parameters():
            if ".attn_mv.to_out.0." in name:
                param.normal_(0.0, 0.2)
    return unet.to(dtype).eval()


def tiny_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges): every prompt tokenizes without downloads."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + ",.-_!":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_text_encoder(vocab_size: int, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=CROSS_DIM, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=CROSS_DIM)
    return CLIPTextModel(config).eval()


def tiny_pipeline(latent_size: int = 12, seed: int = 0, levels: int = 2) -> MultiViewPipeline:
    unet = tiny_unet(latent_size, seed, levels)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=latent_size * 2, scaling_factor=0.5).eval()
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
        patch_size=8, projection_dim=EMBED_DIM)).eval()  # fmt: skip
    extractor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=EMBED_DIM)
    with torch.no_grad():
        normalizer.mean.normal_(0.0, 0.1)
        normalizer.std.uniform_(0.5, 1.5)
    noising = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    tokenizer = tiny_tokenizer()
    text_encoder = tiny_text_encoder(len(tokenizer), seed + 2)
    pipeline = MultiViewPipeline(unet, vae, scheduler, vision, extractor, normalizer, noising,
                                 torch.zeros(2, 7, 77, CROSS_DIM))
    pipeline.tokenizer, pipeline.text_encoder = tokenizer, text_encoder
    return pipeline


def write_pipeline_folder(folder: Path, pipeline: MultiViewPipeline | None = None, text_encoder: bool = True,
                          **kwargs) -> Path:
    """A PSHuman-style pipeline folder; with ``text_encoder`` its prompts come from tokenizer/ + text_encoder/
    (as in PSHuman's download), else from prompt_embeds/."""
    pipeline = pipeline or tiny_pipeline(**kwargs)
    pipeline.tokenizer.save_pretrained(folder / "tokenizer")
    pipeline.text_encoder.save_pretrained(folder / "text_encoder")
    pipeline.prompt_embeds = compute_prompt_embeds(folder, pipeline.num_views)
    pipeline.save_pretrained(folder)
    if text_encoder:
        for name in ("normal_embeds.pt", "clr_embeds.pt"):
            (folder / "prompt_embeds" / name).unlink()
        (folder / "prompt_embeds").rmdir()
    else:
        for sub in ("tokenizer", "text_encoder"):
            for path in sorted((folder / sub).iterdir()):
                path.unlink()
            (folder / sub).rmdir()
    return folder


def write_bundle(folder: Path, latent_size: int = 24, seed: int = 0) -> tuple[Path, Path]:
    """A small PSHuman-format pipeline folder (VAE factor 2: images of 2 x latent_size pixels) and a g_skel
    folder for it (random weights, PSHuman's rig): a bundle unlike the tiny world's (18x18, 72 px)."""
    from drpose.models.g_skel import GSkel, GSkelConfig
    from drpose.models.rig import ViewRig

    pipeline = tiny_pipeline(latent_size=latent_size, seed=seed)
    write_pipeline_folder(folder / "pipeline", pipeline, text_encoder=False)
    torch.manual_seed(seed)
    g_skel = GSkel(GSkelConfig(in_channels=8, out_channels=43, widths=(16, 32), sigma=1.0, latent_size=latent_size,
                               rig=ViewRig().to_dict()))
    torch.nn.init.normal_(g_skel.head.weight, std=0.1)  # a zero head (the training init) would pass no gradient
    g_skel.save_pretrained(folder / "g_skel")
    return folder / "pipeline", folder / "g_skel"
