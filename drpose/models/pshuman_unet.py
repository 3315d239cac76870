"""PSHuman's multi-view UNet (``UNetMV2DConditionModel``), state-dict compatible with its checkpoints.

The model is a Stable-Diffusion-2.1-unclip UNet (diffusers' ``UNet2DConditionModel`` blocks, resnets and
embeddings) whose transformer blocks are multi-view blocks. A batch holds ``2 domains x G groups x 7 views``
rows (:mod:`drpose.models.layout`), and every transformer block does, each step pre-LayerNorm with a
residual add:

1. ``norm1``/``attn1``: cross-domain self-attention. The normal-map and RGB tokens of one (group, view)
   form one sequence; then the *face blend*: per (domain, group) the face view's attention output,
   detached and resized to ``s x s`` (``s = side // 3``), is averaged into the front view's region rows
   ``[0, s)``, columns ``[s, side - s)``;
2. ``norm_mv``/``attn_mv``: row-wise multi-view attention. Latent row ``y`` of the 6 body views of one
   (domain, group) forms one sequence of ``6 * W`` tokens; the face view skips this step;
3. ``norm2``/``attn2``: cross-attention to the per-row prompt embeddings;
4. ``norm3``/``ff``: the GEGLU feed-forward.

All attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (flash or
memory-efficient kernels on GPU), or xformers' memory-efficient attention for CUDA tensors when xformers
is installed; no score matrix is ever built by hand. Unlike PSHuman's code, the multi-view behaviour does
not depend on xformers being installed.

``load_multiview_unet`` reads a PSHuman-format UNet folder; ``save_pretrained`` writes one;
``convert_sd_unet`` turns a plain Stable Diffusion 2.x (or 2.1-unclip) UNet folder into one.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from safetensors.torch import load_file

from .layout import DOMAINS, FACE_VIEW, NUM_BODY_VIEWS

try:
    import xformers.ops as xops

    HAS_XFORMERS = True
except ImportError:
    HAS_XFORMERS = False

CLASS_NAME = "UNetMV2DConditionModel"
CONFIG_FILE = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model"

# PSHuman's block names -> the diffusers blocks they are built from (their transformer blocks become
# MultiViewTransformerBlock).
MV_BLOCK_TYPES = {
    "CrossAttnDownBlockMV2D": "CrossAttnDownBlock2D",
    "UNetMidBlockMV2DCrossAttn": "UNetMidBlock2DCrossAttn",
    "CrossAttnUpBlockMV2D": "CrossAttnUpBlock2D",
}
PLAIN_BLOCK_TYPES = {"DownBlock2D", "UpBlock2D"}
# The multi-view variant this implementation runs; a config that asks for another is refused by name.
MULTIVIEW_FLAGS = {
    "selfattn_block": "self_rowwise",
    "mvcd_attention": True,
    "multiview_attention": True,
    "cd_attention_mid": False,
    "cd_attention_last": False,
}
# Keys of PSHuman's config (and of its EMA wrapper) that do not shape this model: kept, not used.
INERT_KEYS = (
    "sparse_mv_attention", "regress_elevation", "regress_focal_length", "num_regress_blocks",
    "addition_downsample", "addition_channels", "use_dino", "projection_camera_embeddings_input_dim",
    "camera_embedding_type", "decay", "inv_gamma", "min_decay", "optimization_step", "power",
    "update_after_step", "use_ema_warmup",
)  # fmt: skip
_UNET_KEYS = frozenset(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}


def pshuman_unet_config() -> dict:
    """PSHuman's released UNet config (768 px -> 96x96 latents, 7 views), the model's real size."""
    return {
        "_class_name": CLASS_NAME,
        "sample_size": 96,
        "in_channels": 8,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlockMV2D"] * 3 + ["DownBlock2D"],
        "mid_block_type": "UNetMidBlockMV2DCrossAttn",
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlockMV2D"] * 3,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "attention_head_dim": [5, 10, 20, 20],  # the number of heads per level (head size 64)
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "upcast_attention": True,
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": 2048,
        "num_views": 7,
        **MULTIVIEW_FLAGS,
    }


def split_config(config: dict) -> tuple[dict, dict, dict]:
    """A PSHuman UNet config -> (diffusers UNet2DConditionModel kwargs, multi-view settings, kept keys).

    Raises ValueError naming the key for a class other than UNetMV2DConditionModel, a multi-view variant
    this implementation does not run, an unknown key or an unknown block type."""
    config = dict(config)
    class_name = config.pop("_class_name", CLASS_NAME)
    if class_name != CLASS_NAME:
        hint = (" (a plain Stable Diffusion UNet: convert it with `python -m drpose.models.convert`)"
                if class_name == "UNet2DConditionModel" else "")
        raise ValueError(f"_class_name is {class_name!r}, expected {CLASS_NAME!r}{hint}")
    kept = {k: config.pop(k) for k in list(config) if k.startswith("_") or k in INERT_KEYS}
    multiview = {"num_views": config.pop("num_views", 7)}
    for key, value in MULTIVIEW_FLAGS.items():
        given = config.pop(key, value)
        if given != value:
            raise ValueError(f"{key}={given!r}: this implementation runs PSHuman's {key}={value!r} variant only")
        multiview[key] = value
    if not isinstance(multiview["num_views"], int) or multiview["num_views"] <= FACE_VIEW:
        raise ValueError(f"num_views={multiview['num_views']!r}: expected {FACE_VIEW + 1} "
                         f"(6 body views and the face view)")
    unknown = sorted(set(config) - _UNET_KEYS)
    if unknown:
        raise ValueError(f"unknown UNet config keys {unknown}: neither diffusers' UNet2DConditionModel nor "
                         f"PSHuman's UNetMV2DConditionModel takes them")

    def plain(name: str, where: str) -> str:
        if name in MV_BLOCK_TYPES:
            return MV_BLOCK_TYPES[name]
        if name in PLAIN_BLOCK_TYPES:
            return name
        raise ValueError(f"{where}: block type {name!r} is not one of {sorted(MV_BLOCK_TYPES) + sorted(PLAIN_BLOCK_TYPES)}")

    unet = dict(config)
    for key in ("down_block_types", "up_block_types"):
        if key in unet:
            unet[key] = tuple(plain(name, key) for name in unet[key])
    if "mid_block_type" in unet and unet["mid_block_type"] is not None:
        unet["mid_block_type"] = plain(unet["mid_block_type"], "mid_block_type")
    return unet, multiview, kept


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head for (batch, tokens, heads * d) tensors, with a fused kernel."""
    batch, q_len, inner = query.shape
    head_dim = inner // heads
    if HAS_XFORMERS and query.is_cuda:
        q, k, v = (t.reshape(batch, -1, heads, head_dim) for t in (query, key, value))
        return xops.memory_efficient_attention(q, k, v).reshape(batch, q_len, inner)
    q, k, v = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, q_len, inner)


def attend(attn: Attention, tokens: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """One diffusers ``Attention`` module's projections around a fused attention: self-attention over
    ``tokens`` (batch, L, C), or cross-attention to ``context``."""
    context = tokens if context is None else context
    out = _sdpa(attn.to_q(tokens), attn.to_k(context), attn.to_v(context), attn.heads)
    return attn.to_out[1](attn.to_out[0](out))


def check_tokens(hidden_states: torch.Tensor, num_views: int) -> tuple[int, int]:
    """(groups, side) of a block's (2 * G * V, side * side, C) input, or a ValueError that says why not."""
    rows, tokens, _ = hidden_states.shape
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"{tokens} tokens per image is not a square: the multi-view blocks need square latents")
    per_group = len(DOMAINS) * num_views
    if rows % per_group:
        raise ValueError(f"{rows} rows is not 2 domains x G groups x {num_views} views (a multiple of {per_group})")
    face_side = side // 3
    if face_side == 0:
        raise ValueError(f"a {side}x{side} level leaves the face blend empty (side // 3 = 0); "
                         f"the latents are too small for this UNet's depth")
    if side - 2 * face_side != face_side:
        raise ValueError(f"a {side}x{side} level: the face blend region (rows [0, {face_side}), columns "
                         f"[{face_side}, {side - face_side})) is not square; every attention level's side must be "
                         f"a multiple of 3 (e.g. 96x96 latents: 96, 48, 24, 12)")
    return rows // per_group, side


class MultiViewTransformerBlock(nn.Module):
    """PSHuman's multi-view transformer block, made from a diffusers ``BasicTransformerBlock`` (whose
    ``norm1/attn1/norm2/attn2/norm3/ff`` it keeps, so the state-dict keys stay SD's) plus ``norm_mv`` and
    ``attn_mv``."""

    def __init__(self, block: BasicTransformerBlock, num_views: int):
        super().__init__()
        if block.norm_type != "layer_norm" or block.only_cross_attention or block.attn2 is None or \
                block.pos_embed is not None:
            raise ValueError("multi-view blocks are built from SD-style transformer blocks (layer norm, self- and "
                             "cross-attention, no positional embedding)")
        self.num_views = num_views
        self.norm1, self.attn1 = block.norm1, block.attn1
        self.norm2, self.attn2 = block.norm2, block.attn2
        self.norm3, self.ff = block.norm3, block.ff
        dim = block.norm1.normalized_shape[0]
        heads = block.attn1.heads
        self.norm_mv = nn.LayerNorm(dim, eps=block.norm1.eps)
        self.attn_mv = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False, out_bias=True)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
                added_cond_kwargs=None) -> torch.Tensor:
        if attention_mask is not None or encoder_attention_mask is not None:
            raise ValueError("PSHuman's multi-view blocks take no attention masks")
        if encoder_hidden_states is None:
            raise ValueError("encoder_hidden_states (the per-row prompt embeddings) are required")
        groups, side = check_tokens(hidden_states, self.num_views)
        x = hidden_states + self.cross_domain_attention(self.norm1(hidden_states), groups, side)
        x = self.multiview_attention(x, groups, side)
        x = x + attend(self.attn2, self.norm2(x), encoder_hidden_states)
        return x + self.ff(self.norm3(x))

    def cross_domain_attention(self, tokens: torch.Tensor, groups: int, side: int) -> torch.Tensor:
        """attn1 over the joined normal + RGB tokens of each (group, view), then the face blend."""
        views, length, channels = self.num_views, side * side, tokens.shape[-1]
        per_view = tokens.reshape(len(DOMAINS), groups * views, length, channels)
        joined = per_view.permute(1, 0, 2, 3).reshape(groups * views, len(DOMAINS) * length, channels)
        out = attend(self.attn1, joined)
        out = out.reshape(groups * views, len(DOMAINS), length, channels).permute(1, 0, 2, 3)
        out = out.reshape(len(DOMAINS), groups, views, side, side, channels)
        return self.face_blend(out).reshape(-1, length, channels)

    @staticmethod
    def face_blend(out: torch.Tensor) -> torch.Tensor:
        """(2, G, V, side, side, C): the front view's region rows [0, s), columns [s, side - s) becomes
        0.5 * itself + 0.5 * the face view's output resized to s x s (bilinear, no antialias). The face
        output is detached: no gradient reaches the face view through the blend."""
        domains, groups, _, side, _, channels = out.shape
        s = side // 3
        face = out[:, :, FACE_VIEW].detach().reshape(domains * groups, side, side, channels).permute(0, 3, 1, 2)
        face = F.interpolate(face, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
        face = face.permute(0, 2, 3, 1).reshape(domains, groups, s, s, channels)
        front = out[:, :, 0].clone()
        front[:, :, :s, s : side - s] = 0.5 * front[:, :, :s, s : side - s] + 0.5 * face
        return torch.cat([front.unsqueeze(2), out[:, :, 1:]], dim=2)

    def multiview_attention(self, x: torch.Tensor, groups: int, side: int) -> torch.Tensor:
        """x + attn_mv(norm_mv(x)) for the 6 body views, row by row; the face view passes unchanged."""
        channels = x.shape[-1]
        grid = x.reshape(len(DOMAINS), groups, self.num_views, side, side, channels)
        body, rest = grid[:, :, :NUM_BODY_VIEWS], grid[:, :, NUM_BODY_VIEWS:]
        rows = self.norm_mv(body).permute(0, 1, 3, 2, 4, 5)  # (2, G, y, view, x, C)
        rows = rows.reshape(len(DOMAINS) * groups * side, NUM_BODY_VIEWS * side, channels)
        out = attend(self.attn_mv, rows).reshape(len(DOMAINS), groups, side, NUM_BODY_VIEWS, side, channels)
        body = body + out.permute(0, 1, 3, 2, 4, 5)
        return torch.cat([body, rest], dim=2).reshape(x.shape)


class UNetMV2DConditionModel(UNet2DConditionModel):
    """PSHuman's multi-view UNet. Construct from a PSHuman config dict (``UNetMV2DConditionModel(**config)``)
    or read a folder with :func:`load_multiview_unet`; the forward is diffusers' UNet2DConditionModel's:
    ``unet(sample, timestep, encoder_hidden_states=..., class_labels=..., return_dict=False)[0]`` with
    ``sample`` (2 * G * 7, in_channels, S, S) = cat(noisy latents, condition latents)."""

    def __init__(self, **config):
        unet_kwargs, multiview, kept = split_config(config)
        UNet2DConditionModel.__init__(self, **unet_kwargs)
        original = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in config.items()
                    if k in ("down_block_types", "up_block_types", "mid_block_type")}
        self.register_to_config(**original, **multiview, **{k: v for k, v in kept.items() if not k.startswith("_")})
        self.num_views = multiview["num_views"]
        self.multiview_blocks = 0
        for module in self.modules():
            blocks = getattr(module, "transformer_blocks", None)
            if blocks is None:
                continue
            for index, block in enumerate(blocks):
                if isinstance(block, BasicTransformerBlock):
                    blocks[index] = MultiViewTransformerBlock(block, self.num_views)
                    self.multiview_blocks += 1

    @classmethod
    def from_config(cls, config=None, **kwargs):
        return cls(**dict(config or {}, **kwargs))

    @classmethod
    def from_pretrained(cls, folder, **kwargs):
        return load_multiview_unet(folder, **kwargs)

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, return_dict: bool = True, **kwargs):
        check_rows_and_side(sample, self.num_views)
        return super().forward(sample, timestep, encoder_hidden_states, class_labels=class_labels,
                               return_dict=return_dict, **kwargs)


def check_rows_and_side(sample: torch.Tensor, num_views: int) -> None:
    if sample.dim() != 4:
        raise ValueError(f"sample must be (2 * G * {num_views}, channels, S, S), got shape {tuple(sample.shape)}")
    rows, _, height, width = sample.shape
    if height != width:
        raise ValueError(f"sample is {height}x{width}: PSHuman's multi-view UNet needs square latents")
    per_group = len(DOMAINS) * num_views
    if rows == 0 or rows % per_group:
        raise ValueError(f"sample has {rows} rows; expected 2 domains x G groups x {num_views} views "
                         f"(a positive multiple of {per_group})")


# ------------------------------------------------------------------------------------------- folders


def unet_folder(folder: str | Path) -> Path:
    """The UNet folder itself, given it or a pipeline folder with a ``unet/`` subfolder."""
    folder = Path(folder)
    for candidate in (folder, folder / "unet"):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"no UNet at {folder}: expected {folder}/{CONFIG_FILE} or {folder}/unet/{CONFIG_FILE}")


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}): {error.msg}") from None


def read_weights(folder: Path, variant: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a diffusers model folder: ``diffusion_pytorch_model[.variant].safetensors``, a sharded
    safetensors index, or ``.bin``."""
    stem = WEIGHTS_NAME if variant is None else f"{WEIGHTS_NAME}.{variant}"
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    pickled = folder / f"{stem}.bin"
    if pickled.is_file():
        return torch.load(pickled, map_location="cpu", weights_only=True)
    variants = sorted(p.name for p in folder.glob(f"{WEIGHTS_NAME}*"))
    hint = f"; found {variants} (pass variant=...)" if variants else ""
    raise FileNotFoundError(f"{folder}: no {stem}.safetensors (or a sharded index, or .bin){hint}")


def check_state_dict(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], source) -> None:
    """Refuse missing and unexpected keys and shape mismatches, naming them."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k])}"
                        for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{source}: the weights do not match the UNet config: " + "; ".join(problems))


def build_on_meta(config: dict) -> UNetMV2DConditionModel:
    """The model of ``config`` with parameters on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        return UNetMV2DConditionModel(**config)


def load_multiview_unet(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        variant: str | None = None) -> UNetMV2DConditionModel:
    """Read a PSHuman-format UNet folder (or a pipeline folder's ``unet/``) into a UNetMV2DConditionModel.

    The config must name ``_class_name: UNetMV2DConditionModel``; the weights must match it exactly (no
    missing or unexpected keys, no shape mismatch), else a ValueError names what is wrong."""
    folder = unet_folder(folder)
    config = read_config(folder)
    try:
        model = build_on_meta(config)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{folder / CONFIG_FILE}: {error}") from None
    state = read_weights(folder, variant)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state, folder)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    leftovers = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise ValueError(f"{folder}: tensors not set by the checkpoint: {leftovers[:8]}")
    return model.eval()


# ------------------------------------------------------------------------------------------ converter


def convert_sd_unet(source: str | Path, num_views: int = 7, class_embed_input_dim: int = 2048,
                    seed: int = 0) -> UNetMV2DConditionModel:
    """A plain Stable Diffusion 2.x / 2.1-unclip UNet folder -> a UNetMV2DConditionModel that computes exactly
    what the source does until trained:

    * the new ``attn_mv`` blocks get default-initialised projections and a zero ``to_out.0`` (weight, as
      PSHuman initialises it, and bias), so they add nothing; ``norm_mv`` starts as the identity affine;
    * ``conv_in`` is widened to twice the latent channels for the condition latent, the new input weights
      zero;
    * a UNet without a class embedding (plain SD 2.x) gets unCLIP's ``projection`` class embedding of a
      ``class_embed_input_dim`` vector with a zero output layer.
    """
    folder = unet_folder(source)
    config = read_config(folder)
    if config.get("_class_name") != "UNet2DConditionModel":
        raise ValueError(f"{folder / CONFIG_FILE}: _class_name is {config.get('_class_name')!r}, expected a plain "
                         f"'UNet2DConditionModel' to convert")
    state = read_weights(folder)
    plain_names = {v: k for k, v in MV_BLOCK_TYPES.items()}
    new = {k: v for k, v in config.items() if not k.startswith("_")}
    new["_class_name"] = CLASS_NAME
    new["down_block_types"] = [plain_names.get(n, n) for n in config["down_block_types"]]
    new["up_block_types"] = [plain_names.get(n, n) for n in config["up_block_types"]]
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    new["mid_block_type"] = plain_names.get(mid, mid)
    latent = config.get("out_channels", 4)
    new["in_channels"] = 2 * latent
    added_class_embedding = config.get("class_embed_type") is None
    if added_class_embedding:
        new.update(class_embed_type="projection", projection_class_embeddings_input_dim=class_embed_input_dim)
    new.update(num_views=num_views, **MULTIVIEW_FLAGS)
    torch.manual_seed(seed)
    model = UNetMV2DConditionModel(**new)
    own = model.state_dict()
    conv_in = state["conv_in.weight"]
    if conv_in.shape[1] == latent:
        widened = torch.zeros(conv_in.shape[0], 2 * latent, *conv_in.shape[2:], dtype=conv_in.dtype)
        widened[:, :latent] = conv_in
        state["conv_in.weight"] = widened
    for name, tensor in own.items():
        if ".attn_mv.to_out.0." in name or (added_class_embedding and name.startswith("class_embedding.linear_2.")):
            state[name] = torch.zeros_like(tensor)
        elif (".attn_mv." in name or ".norm_mv." in name or name.startswith("class_embedding.")) and name not in state:
            state[name] = tensor
    check_state_dict({k: v.shape for k, v in own.items()}, state, folder)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()
