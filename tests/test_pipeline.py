"""The PSHuman-style pipeline folder: read by parts, conditioning against plain references, refusals."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from drpose.models.layout import VIEW_NAMES, body_views, expand_per_group, grid_to_rows, rows_to_grid
from drpose.models.pipeline import Conditioning, MultiViewPipeline, face_crop, prompt_text
from pshuman_fixtures import CROSS_DIM, EMBED_DIM, write_pipeline_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_pipeline_folder(tmp_path_factory.mktemp("pipe") / "pshuman", text_encoder=True, seed=4)


@pytest.fixture(scope="module")
def pipeline(folder):
    return MultiViewPipeline.from_pretrained(folder)


def images(count=2, side=24, seed=0):
    return torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_folder_round_trip_gives_identical_outputs(folder, pipeline, tmp_path):
    pipeline.save_pretrained(tmp_path / "copy")  # prompts now from prompt_embeds/ (.pt files)
    assert json.loads((tmp_path / "copy" / "model_index.json").read_text())["unet"][1] == "UNetMV2DConditionModel"
    copy = MultiViewPipeline.from_pretrained(tmp_path / "copy")
    assert torch.equal(copy.prompt_embeds, pipeline.prompt_embeds)
    x = images()
    a, b = (p.condition(x, generator=torch.Generator().manual_seed(1)) for p in (pipeline, copy))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.class_labels, b.class_labels)
    noisy = torch.randn(2 * 2 * 7, 4, 12, 12)
    assert torch.equal(pipeline.predict(noisy, torch.tensor(7), a), copy.predict(noisy, torch.tensor(7), b))


def test_prompt_embeddings_are_the_text_encoder_on_the_fixed_prompts(folder, pipeline):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    prompt = "a rendering image of 3D human, back view, color map."
    assert prompt_text("color", "back") == prompt
    ids = tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = encoder(ids).last_hidden_state[0]
    torch.testing.assert_close(pipeline.prompt_embeds[1, VIEW_NAMES.index("back")], expected)
    assert pipeline.prompt_embeds.shape == (2, 7, 77, CROSS_DIM)
    flat = pipeline.prompt_embeds.reshape(14, -1)
    assert torch.cdist(flat, flat).add(torch.eye(14)).min() > 0  # 14 different prompts


def test_pshuman_prompt_files_are_read_where_named(folder, tmp_path):
    embeds = torch.randn(2, 7, 77, CROSS_DIM)
    store = tmp_path / "fixed_prompt_embeds_7view"
    store.mkdir()
    torch.save(embeds[0], store / "normal_embeds.pt")
    torch.save(embeds[1], store / "clr_embeds.pt")
    loaded = MultiViewPipeline.from_pretrained(folder, prompt_embeds=store)
    assert torch.equal(loaded.prompt_embeds, embeds)
    torch.save(embeds[1, :6], store / "clr_embeds.pt")
    with pytest.raises(ValueError, match=r"clr_embeds.pt: expected a \(7 views"):
        MultiViewPipeline.from_pretrained(folder, prompt_embeds=store)


def test_class_labels_follow_the_unclip_rule(pipeline):
    embeds = torch.randn(3, EMBED_DIM)
    level = 20
    got = pipeline.class_labels(embeds, level, torch.Generator().manual_seed(5))
    noise = torch.randn(3, EMBED_DIM, generator=torch.Generator().manual_seed(5))
    mean, std = pipeline.image_normalizer.mean, pipeline.image_normalizer.std
    alpha = pipeline.image_noising_scheduler.alphas_cumprod[level]
    noised = (math.sqrt(alpha) * (embeds - mean) / std + math.sqrt(1 - alpha) * noise) * std + mean
    half = EMBED_DIM // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    sinusoid = torch.cat([torch.cos(level * freqs), torch.sin(level * freqs)])  # flip_sin_to_cos: cos first
    torch.testing.assert_close(got[:, :EMBED_DIM], noised)
    torch.testing.assert_close(got[:, EMBED_DIM:], sinusoid.expand(3, -1))


def test_condition_latents_and_the_face_crop(pipeline):
    x = images(side=24)
    crop = face_crop(x)
    manual = torch.nn.functional.interpolate(x[:, :, 0:8, 8:16], scale_factor=3, mode="bilinear")
    torch.testing.assert_close(crop, manual)
    cond = pipeline.condition(x)
    vae = pipeline.vae
    with torch.no_grad():
        body = vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        face = vae.encode(crop * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    assert cond.latents.shape == (2, 7, 4, 12, 12)
    for view in range(6):
        torch.testing.assert_close(cond.latents[:, view], body)
    torch.testing.assert_close(cond.latents[:, 6], face)
    with pytest.raises(ValueError, match="this model takes 24x24"):
        pipeline.condition(images(side=27))


def test_unet_inputs_follow_the_batch_layout(pipeline):
    cond = pipeline.condition(images(count=2))
    noisy = torch.randn(2 * 4 * 7, 4, 12, 12)
    doubled = Conditioning.cat([cond, cond])
    inputs = pipeline.unet_inputs(noisy, doubled, keep=torch.tensor([0, 0, 1, 1]))
    sample = rows_to_grid(inputs["sample"], 7)  # (2, G=4, 7, 8, 12, 12): [uncond 0, uncond 1, cond 0, cond 1]
    prompts, labels = rows_to_grid(inputs["encoder_hidden_states"], 7), rows_to_grid(inputs["class_labels"], 7)
    assert torch.equal(grid_to_rows(sample[:, :, :, :4]), noisy)
    for d in range(2):
        for g in range(4):
            obj, conditional = g % 2, g >= 2
            for v in range(7):
                expected = cond.latents[obj, v] if conditional else torch.zeros_like(cond.latents[obj, v])
                assert torch.equal(sample[d, g, v, 4:], expected)
                assert torch.equal(prompts[d, g, v], pipeline.prompt_embeds[d, v])
                assert torch.equal(labels[d, g, v], cond.class_labels[obj] if conditional else labels[d, g, v] * 0)
    with pytest.raises(ValueError, match="hold 4 groups; the conditioning has 2"):
        pipeline.unet_inputs(noisy, cond)


def test_layout_helpers():
    rows = torch.arange(2 * 3 * 7).float().view(-1, 1, 1, 1)
    grid = rows_to_grid(rows, 7)
    assert grid[1, 2, 5].item() == 7 * 3 * 1 + 7 * 2 + 5
    assert torch.equal(grid_to_rows(grid), rows)
    views = body_views(rows.expand(-1, 4, 1, 1), 7)  # (G, 6, 2 * c, 1, 1)
    assert views.shape == (3, 6, 8, 1, 1)
    assert views[2, 4, 0].item() == 7 * 2 + 4 and views[2, 4, 4].item() == 21 + 7 * 2 + 4
    assert torch.equal(rows_to_grid(expand_per_group(torch.tensor([5.0, 6.0, 7.0]), 7), 7)[1, 2], torch.full((7,), 7.0))
    with pytest.raises(ValueError, match="multiple of 14"):
        rows_to_grid(torch.zeros(13), 7)


@pytest.mark.parametrize("part", ["unet", "vae", "scheduler", "image_encoder", "feature_extractor",
                                  "image_normalizer", "image_noising_scheduler"])
def test_a_missing_part_is_named_with_its_role(folder, tmp_path, part):
    copy = tmp_path / "pipe"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / part)
    with pytest.raises(FileNotFoundError, match=f"missing {part}/ \\(the "):
        MultiViewPipeline.from_pretrained(copy)


def test_missing_index_and_prompts_are_named(folder, tmp_path):
    copy = tmp_path / "pipe"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "text_encoder")
    with pytest.raises(FileNotFoundError, match="no prompt embeddings"):
        MultiViewPipeline.from_pretrained(copy)
    (copy / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        MultiViewPipeline.from_pretrained(copy)
