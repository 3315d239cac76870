"""Multi-view UNet: checkpoint compatibility, save/load, joint attention, configs."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from drpose.models.multiview_unet import (
    MultiViewConfig,
    MultiViewUNet,
    pshuman_unet_config,
    tiny_unet_config,
)


def sd_style_config(in_channels: int) -> dict:
    """A tiny Stable-Diffusion-style UNet config (no class embedding), as a checkpoint would carry."""
    return dict(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, cross_attention_dim=32, norm_num_groups=16,
    )  # fmt: skip


def small_multiview(seed: int = 0, **kwargs) -> MultiViewUNet:
    torch.manual_seed(seed)
    model = MultiViewUNet.from_config(sd_style_config(8) | {"class_embed_type": "identity"},
                                      MultiViewConfig(num_views=3, num_domains=2, condition_tokens=4, **kwargs))
    with torch.no_grad():  # non-zero view/domain tables so that they matter in the round trip
        model.view_domain_embedding.view.weight.normal_()
        model.view_domain_embedding.domain.weight.normal_()
    return model


@pytest.mark.parametrize("in_channels", [8, 4])
def test_sd_checkpoint_loads_without_missing_or_unexpected_keys(tmp_path, in_channels):
    torch.manual_seed(1)
    base = UNet2DConditionModel(**sd_style_config(in_channels))
    base.save_pretrained(tmp_path / "sd")
    model = MultiViewUNet.from_pretrained(tmp_path / "sd", MultiViewConfig(num_views=3, num_domains=2, condition_tokens=4))
    saved, loaded = base.state_dict(), model.unet.state_dict()
    assert set(saved) == set(loaded)
    for key, value in saved.items():
        if key == "conv_in.weight" and in_channels == 4:
            assert torch.equal(loaded[key][:, :4], value)
            assert torch.all(loaded[key][:, 4:] == 0), "extra input channels for the condition start at zero"
        else:
            assert torch.equal(loaded[key], value), key
    assert model.unet.config.in_channels == 8


def test_checkpoint_with_weighted_class_embedding_is_refused(tmp_path):
    UNet2DConditionModel(**sd_style_config(8), class_embed_type="timestep").save_pretrained(tmp_path / "sd")
    with pytest.raises(ValueError, match="class_embed_type 'timestep'"):
        MultiViewUNet.from_pretrained(tmp_path / "sd")


def test_missing_folder_names_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        MultiViewUNet.from_pretrained(tmp_path / "nothing")


def test_save_and_load_round_trip(tmp_path):
    model = small_multiview()
    model.save_pretrained(tmp_path / "mv")
    loaded = MultiViewUNet.from_pretrained(tmp_path / "mv")
    assert loaded.config == model.config
    x, cond = torch.randn(12, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([10, 700]), cond), loaded(x, torch.tensor([10, 700]), cond))


def test_attention_spans_the_views_of_a_sample_only_when_enabled():
    model = small_multiview()
    x, cond, t = torch.randn(12, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([400, 400])
    changed = x.clone()
    changed[2] += 1.0  # sample 0, domain 0, view 2
    with torch.no_grad():
        delta = (model(changed, t, cond) - model(x, t, cond)).abs().amax(dim=(1, 2, 3))
        assert torch.all(delta[:6] > 1e-4), "every image of the sample sees the change"
        assert torch.all(delta[6:] == 0), "the other sample does not"
        model.set_multiview_attention(False)
        delta = (model(changed, t, cond) - model(x, t, cond)).abs().amax(dim=(1, 2, 3))
    assert delta[2] > 1e-4
    assert torch.all(torch.cat([delta[:2], delta[3:]]) == 0), "without joint attention images are independent"


def test_views_and_domains_are_told_apart():
    model = small_multiview()
    x = torch.randn(1, 4, 8, 8).expand(6, -1, -1, -1).contiguous()  # the same latent in every slot
    with torch.no_grad():
        out = model(x, torch.tensor([300]), torch.randn(1, 4, 8, 8))
    distinct = {tuple(o.flatten()[:8].tolist()) for o in out}
    assert len(distinct) == 6


def test_batch_that_is_not_whole_samples_is_rejected():
    model = small_multiview()
    with pytest.raises(ValueError, match="2 samples x 6 images"):
        model(torch.randn(10, 4, 8, 8), torch.tensor(5), torch.randn(2, 4, 8, 8))


def test_condition_mask_drops_the_condition():
    model = small_multiview()
    x, t = torch.randn(6, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        a = model(x, t, torch.randn(1, 4, 8, 8), cond_mask=torch.zeros(1))
        b = model(x, t, torch.randn(1, 4, 8, 8), cond_mask=torch.zeros(1))
        c = model(x, t, torch.randn(1, 4, 8, 8), cond_mask=torch.ones(1))
    assert torch.allclose(a, b)
    assert not torch.allclose(a, c)


def test_tiny_config_shapes():
    model = MultiViewUNet.from_config(tiny_unet_config())
    with torch.no_grad():
        out = model(torch.randn(12, 4, 16, 16), torch.tensor([999]), torch.randn(1, 4, 16, 16))
    assert out.shape == (12, 4, 16, 16)
    assert model.config.images_per_sample == 12


def test_pshuman_config_builds_at_real_size():
    """The SD-2.1-unclip-shaped UNet (random weights) for real-size runs: built on the meta device."""
    with torch.device("meta"):
        model = MultiViewUNet.from_config(pshuman_unet_config())
    params = sum(p.numel() for p in model.unet.parameters())
    assert 860e6 < params < 880e6, params  # SD 2.1 UNet: ~866M parameters (+ the 4 extra input channels)
    assert model.unet.config.block_out_channels == (320, 640, 1280, 1280)
    assert model.view_domain_embedding.view.weight.shape == (6, 2048)
    x = torch.empty(12, 4, 96, 96, device="meta")
    out = model(x, torch.tensor([10], device="meta"), torch.empty(1, 4, 96, 96, device="meta"))
    assert out.shape == (12, 4, 96, 96)
