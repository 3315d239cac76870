"""PSHuman's multi-view UNet: every attention step against a plain reference, the state-dict layout at real
size, folders, the converter and every refusal."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from drpose.models import inspect as inspect_cli
from drpose.models.pshuman_unet import (MultiViewTransformerBlock, UNetMV2DConditionModel, build_on_meta,
                                        convert_sd_unet, load_multiview_unet, pshuman_unet_config, split_config)
from pshuman_fixtures import CROSS_DIM, EMBED_DIM, tiny_unet, tiny_unet_config

VIEWS = 7


def row(domain: int, group: int, view: int, groups: int) -> int:
    return VIEWS * groups * domain + VIEWS * group + view


def dense_attention(attn, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v head by head for one sequence (L, C), through the module's projections."""
    q, k, v = attn.to_q(tokens), attn.to_k(context), attn.to_v(context)
    heads = attn.heads
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[:, part] @ k[:, part].T / math.sqrt(d), dim=-1)
        outs.append(weights @ v[:, part])
    return attn.to_out[0](torch.cat(outs, dim=-1))


@torch.no_grad()
def reference_block(block: MultiViewTransformerBlock, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """PSHuman's transformer block written plainly, one sequence at a time."""
    rows, length, channels = x.shape
    groups, side = rows // (2 * VIEWS), math.isqrt(length)
    s = side // 3
    h = block.norm1(x)
    a = torch.zeros_like(x)
    for g in range(groups):
        for v in range(VIEWS):
            rn, rc = row(0, g, v, groups), row(1, g, v, groups)
            out = dense_attention(block.attn1, torch.cat([h[rn], h[rc]]), torch.cat([h[rn], h[rc]]))
            a[rn], a[rc] = out[:length], out[length:]
    for d in range(2):
        for g in range(groups):
            front = a[row(d, g, 0, groups)].view(side, side, channels)
            face = a[row(d, g, 6, groups)].view(side, side, channels)
            # bilinear resize by exactly 1/3 (align_corners false) samples the centre pixel of each 3x3 cell
            small = face[1::3, 1::3][:s, :s]
            front[:s, s : side - s] = 0.5 * front[:s, s : side - s] + 0.5 * small
    x = x + a
    hm = block.norm_mv(x)
    out = x.clone()
    for d in range(2):
        for g in range(groups):
            for y in range(side):
                seq = torch.cat([hm[row(d, g, v, groups)].view(side, side, channels)[y] for v in range(6)])
                mv = dense_attention(block.attn_mv, seq, seq)
                for v in range(6):
                    out[row(d, g, v, groups)].view(side, side, channels)[y] += mv[v * side : (v + 1) * side]
    x = out
    h2 = block.norm2(x)
    x = x + torch.stack([dense_attention(block.attn2, h2[n], context[n]) for n in range(rows)])
    return x + block.ff(block.norm3(x))


def first_block(unet) -> MultiViewTransformerBlock:
    return unet.down_blocks[0].attentions[0].transformer_blocks[0]


@pytest.fixture(scope="module")
def unet64():
    return tiny_unet(seed=3, dtype=torch.float64)


def unet_inputs(groups: int, side: int = 12, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = 2 * groups * VIEWS
    return dict(sample=torch.randn(n, 8, side, side, generator=g, dtype=dtype),
                encoder_hidden_states=torch.randn(n, 5, CROSS_DIM, generator=g, dtype=dtype),
                class_labels=torch.randn(n, 2 * EMBED_DIM, generator=g, dtype=dtype))


def run(unet, inputs, timestep=torch.tensor(321)):
    with torch.no_grad():
        return unet(inputs["sample"], timestep, encoder_hidden_states=inputs["encoder_hidden_states"],
                    class_labels=inputs["class_labels"], return_dict=False)[0]


# ------------------------------------------------------------------------------------------ block semantics


@pytest.mark.parametrize("side", [6, 12])
def test_block_matches_plain_reference(unet64, side):
    block = first_block(unet64)
    g = torch.Generator().manual_seed(side)
    x = torch.randn(2 * 2 * VIEWS, side * side, 16, generator=g, dtype=torch.float64)
    context = torch.randn(x.shape[0], 5, CROSS_DIM, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = block(x, encoder_hidden_states=context)
    torch.testing.assert_close(got, reference_block(block, x, context), rtol=1e-10, atol=1e-10)


def test_attn1_joins_the_normal_and_rgb_tokens_of_one_view_only(unet64):
    block, groups, side = first_block(unet64), 2, 6
    x = torch.randn(2 * groups * VIEWS, side * side, 16, dtype=torch.float64)
    changed = x.clone()
    changed[row(0, 1, 2, groups)] += 1.0  # the normal map of group 1, view 2
    with torch.no_grad():
        diff = (block.cross_domain_attention(changed, groups, side) - block.cross_domain_attention(x, groups, side))
    moved = {n for n in range(x.shape[0]) if diff[n].abs().max() > 0}
    assert moved == {row(0, 1, 2, groups), row(1, 1, 2, groups)}


def test_face_blend_region_and_weights():
    side, s, channels = 12, 4, 3
    out = torch.randn(2, 2, VIEWS, side, side, channels, dtype=torch.float64)
    blended = MultiViewTransformerBlock.face_blend(out)
    expected = out.clone()
    expected[:, :, 0, :s, s : side - s] = 0.5 * out[:, :, 0, :s, s : side - s] + 0.5 * out[:, :, 6, 1::3, 1::3]
    torch.testing.assert_close(blended, expected, rtol=0, atol=1e-12)
    region = torch.zeros(side, side, dtype=torch.bool)
    region[:s, s : side - s] = True
    assert torch.equal(blended[:, :, 0][:, :, ~region], out[:, :, 0][:, :, ~region])
    assert torch.equal(blended[:, :, 1:], out[:, :, 1:])


def test_face_blend_passes_no_gradient_to_the_face_view():
    out = torch.randn(2, 1, VIEWS, 9, 9, 4, dtype=torch.float64, requires_grad=True)
    MultiViewTransformerBlock.face_blend(out)[:, :, 0].sum().backward()
    assert torch.all(out.grad[:, :, 6] == 0)
    region = out.grad[:, :, 0, :3, 3:6]
    assert torch.all(region == 0.5) and torch.all(out.grad[:, :, 0, 3:] == 1)


def test_attn_mv_is_row_local_over_the_body_views_and_skips_the_face(unet64):
    block, groups, side = first_block(unet64), 2, 6
    x = torch.randn(2 * groups * VIEWS, side * side, 16, dtype=torch.float64)
    changed = x.clone()
    view_rows = changed[row(1, 0, 2, groups)].view(side, side, 16)
    view_rows[4] += torch.randn(side, 16, dtype=torch.float64)  # latent row y=4 of the RGB image of group 0, view 2
    with torch.no_grad():
        base, moved = block.multiview_attention(x, groups, side), block.multiview_attention(changed, groups, side)
    diff = (moved - base - (changed - x)).view(2, groups, VIEWS, side, side, 16).abs().amax(dim=-1)
    assert torch.all(diff[:, :, :, [0, 1, 2, 3, 5]] == 0)  # no other latent row moves
    assert torch.all(diff[1, 0, :6, 4] > 0)  # row 4 of every body view of that (domain, group) does
    assert torch.all(diff[0] == 0) and torch.all(diff[1, 1] == 0)  # other domain, other group: untouched
    faces = [row(d, g, 6, groups) for d in range(2) for g in range(groups)]
    assert torch.equal(base[faces], x[faces])  # the face view skips attn_mv


def test_zero_attn_mv_output_projection_is_the_identity(unet64):
    block, groups, side = first_block(unet64), 1, 6
    x = torch.randn(2 * groups * VIEWS, side * side, 16, dtype=torch.float64)
    original = {k: v.clone() for k, v in block.attn_mv.to_out[0].state_dict().items()}
    try:
        with torch.no_grad():
            block.attn_mv.to_out[0].weight.zero_()
            block.attn_mv.to_out[0].bias.zero_()
            assert torch.equal(block.multiview_attention(x, groups, side), x)
    finally:
        block.attn_mv.to_out[0].load_state_dict(original)


# ------------------------------------------------------------------------------------------- whole model


def test_unet_forward_matches_reference_blocks(unet64, monkeypatch):
    inputs = unet_inputs(groups=1)
    got = run(unet64, inputs)
    for module in unet64.modules():
        if isinstance(module, MultiViewTransformerBlock):
            monkeypatch.setattr(module, "forward", lambda x, *a, _b=module, encoder_hidden_states=None, **k:
                                reference_block(_b, x, encoder_hidden_states))
    torch.testing.assert_close(got, run(unet64, inputs), rtol=1e-9, atol=1e-9)


def test_timestep_scalar_or_per_row_and_float32_against_float64(unet64):
    inputs = unet_inputs(groups=1)
    scalar = run(unet64, inputs, torch.tensor(321))
    per_row = run(unet64, inputs, torch.full((inputs["sample"].shape[0],), 321))
    torch.testing.assert_close(scalar, per_row, rtol=0, atol=1e-12)
    unet32 = tiny_unet(seed=3)
    got32 = run(unet32, {k: v.float() for k, v in inputs.items()})
    torch.testing.assert_close(got32.double(), scalar, rtol=1e-4, atol=1e-5)


def test_groups_never_influence_each_other(unet64):
    inputs = unet_inputs(groups=2)
    changed = {k: v.clone() for k, v in inputs.items()}
    group1 = [row(d, 1, v, 2) for d in range(2) for v in range(VIEWS)]
    for key in changed:
        changed[key][group1] += 1.0
    base, moved = run(unet64, inputs), run(unet64, changed)
    group0 = [row(d, 0, v, 2) for d in range(2) for v in range(VIEWS)]
    torch.testing.assert_close(moved[group0], base[group0], rtol=0, atol=1e-12)
    assert (moved[group1] - base[group1]).abs().max() > 1e-3


def test_real_size_state_dict_keys_and_parameter_count():
    config = pshuman_unet_config()
    model = build_on_meta(config)
    state = model.state_dict()
    unet_kwargs, _, _ = split_config(config)
    with torch.device("meta"):
        plain = UNet2DConditionModel(**unet_kwargs)
    plain_keys = set(plain.state_dict())
    extra = set(state) - plain_keys
    prefixes = ([f"down_blocks.{b}.attentions.{a}" for b in range(3) for a in range(2)] + ["mid_block.attentions.0"]
                + [f"up_blocks.{b}.attentions.{a}" for b in (1, 2, 3) for a in range(3)])
    suffixes = ["norm_mv.weight", "norm_mv.bias", "attn_mv.to_q.weight", "attn_mv.to_k.weight", "attn_mv.to_v.weight",
                "attn_mv.to_out.0.weight", "attn_mv.to_out.0.bias"]
    assert plain_keys <= set(state)
    assert extra == {f"{p}.transformer_blocks.0.{s}" for p in prefixes for s in suffixes}
    assert len(extra) == 112
    assert state["conv_in.weight"].shape == (320, 8, 3, 3)
    assert sum(v.numel() for v in state.values()) == 919_783_684
    assert sum(state[k].numel() for k in extra) == 49_599_040


def test_inspect_command_prints_the_real_size(capsys):
    assert inspect_cli.main(["--config", "pshuman", "--keys"]) == 0
    out = capsys.readouterr().out
    assert "919,783,684" in out and "49,599,040" in out and "112" in out
    assert "mid_block.attentions.0.transformer_blocks.0.attn_mv.to_out.0.bias" in out


# ------------------------------------------------------------------------------------------------ folders


def test_folder_round_trip(tmp_path):
    unet = tiny_unet(seed=5)
    unet.save_pretrained(tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNetMV2DConditionModel"
    assert config["down_block_types"][0] == "CrossAttnDownBlockMV2D"
    assert config["mid_block_type"] == "UNetMidBlockMV2DCrossAttn"
    assert config["regress_elevation"] is False and config["decay"] == 0.9999  # inert keys kept
    loaded = load_multiview_unet(tmp_path)  # a pipeline folder's unet/ is found too
    inputs = {k: v.float() for k, v in unet_inputs(groups=1).items()}
    assert torch.equal(run(unet, inputs), run(loaded, inputs))
    assert torch.equal(run(unet, inputs), run(UNetMV2DConditionModel.from_pretrained(tmp_path / "unet"), inputs))
    half = load_multiview_unet(tmp_path / "unet", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def _write(tmp_path, config=None, state=None):
    folder = tmp_path / "unet"
    folder.mkdir(exist_ok=True)
    unet = tiny_unet()
    (folder / "config.json").write_text(json.dumps(config or tiny_unet_config()))
    save_file(state if state is not None else unet.state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(_class_name="UNet2DConditionModel"), "convert it"),
    (lambda c: c.update(_class_name="Something"), "_class_name is 'Something'"),
    (lambda c: c.update(cd_attention_mid=True), "cd_attention_mid=True"),
    (lambda c: c.update(selfattn_block="custom"), "selfattn_block='custom'"),
    (lambda c: c.update(frobnicate=3), "unknown UNet config keys ['frobnicate']"),
    (lambda c: c.update(down_block_types=["CrossAttnDownBlockXYZ", "DownBlock2D"]), "CrossAttnDownBlockXYZ"),
])  # fmt: skip
def test_config_refusals_name_the_key(tmp_path, change, message):
    config = tiny_unet_config()
    change(config)
    _write(tmp_path, config, state={})
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_multiview_unet(tmp_path / "unet")


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("down_blocks.0.attentions.0.transformer_blocks.0.attn_mv.to_q.weight"),
     "missing keys: down_blocks.0.attentions.0.transformer_blocks.0.attn_mv.to_q.weight"),
    (lambda s: s.update({"extra.weight": torch.zeros(2)}), "unexpected keys: extra.weight"),
    (lambda s: s.update({"conv_in.weight": torch.zeros(16, 4, 3, 3)}), r"conv_in.weight: checkpoint \(16, 4, 3, 3\)"),
])  # fmt: skip
def test_weight_refusals_name_the_key(tmp_path, damage, message):
    state = tiny_unet().state_dict()
    damage(state)
    _write(tmp_path, state=state)
    with pytest.raises(ValueError, match=message):
        load_multiview_unet(tmp_path / "unet")


def test_missing_folder_and_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no UNet at"):
        load_multiview_unet(tmp_path)
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_unet_config()))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_multiview_unet(folder)


@pytest.mark.parametrize("shape, message", [
    ((28, 8, 12, 9), "square latents"),
    ((21, 8, 12, 12), "2 domains x G groups x 7 views"),
    ((0, 8, 12, 12), "2 domains x G groups x 7 views"),
])  # fmt: skip
def test_bad_batches_are_refused(shape, message):
    unet = tiny_unet()
    with pytest.raises(ValueError, match=message):
        unet(torch.zeros(shape), torch.tensor(1), encoder_hidden_states=torch.zeros(shape[0], 5, CROSS_DIM),
             class_labels=torch.zeros(shape[0], 2 * EMBED_DIM))


@pytest.mark.parametrize("side, message", [(2, "face blend empty"), (4, "multiple of 3"), (8, "multiple of 3")])
def test_levels_the_face_blend_cannot_use_are_refused(side, message):
    block = first_block(tiny_unet())
    with pytest.raises(ValueError, match=message):
        block(torch.zeros(14, side * side, 16), encoder_hidden_states=torch.zeros(14, 5, CROSS_DIM))


# ---------------------------------------------------------------------------------------------- converter


def test_converter_keeps_the_sd_weights_and_adds_nothing_to_the_output(tmp_path):
    torch.manual_seed(0)
    plain_config = {k: v for k, v in tiny_unet_config().items()
                    if k not in ("num_views", "selfattn_block", "mvcd_attention", "multiview_attention",
                                 "cd_attention_mid", "cd_attention_last", "regress_elevation", "use_dino", "decay",
                                 "_class_name", "class_embed_type", "projection_class_embeddings_input_dim")}
    plain_config.update(in_channels=4, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], mid_block_type="UNetMidBlock2DCrossAttn")
    plain = UNet2DConditionModel(**plain_config)
    plain.save_pretrained(tmp_path / "sd")
    converted = convert_sd_unet(tmp_path / "sd", class_embed_input_dim=2 * EMBED_DIM).double()
    source = load_file(str(tmp_path / "sd" / "diffusion_pytorch_model.safetensors"))
    state = converted.state_dict()
    for key, value in source.items():
        if key == "conv_in.weight":
            assert torch.equal(state[key][:, :4].float(), value) and torch.all(state[key][:, 4:] == 0)
        else:
            assert torch.equal(state[key].float(), value), key
    inputs = unet_inputs(groups=1)
    base = run(converted, inputs)
    no_cond = dict(inputs, sample=torch.cat([inputs["sample"][:, :4], torch.zeros_like(inputs["sample"][:, 4:])], 1),
                   class_labels=torch.zeros_like(inputs["class_labels"]))
    assert torch.equal(base, run(converted, no_cond))  # new input channels and class embedding add nothing
    for module in converted.modules():
        if isinstance(module, MultiViewTransformerBlock):
            assert torch.all(module.attn_mv.to_out[0].weight == 0) and torch.all(module.attn_mv.to_out[0].bias == 0)
    converted.save_pretrained(tmp_path / "mv")
    assert torch.equal(run(load_multiview_unet(tmp_path / "mv", dtype=torch.float64), inputs), base)
    with pytest.raises(ValueError, match="expected a plain"):
        convert_sd_unet(tmp_path / "mv")
