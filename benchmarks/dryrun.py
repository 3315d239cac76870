"""Dry run: one DrPose training step at the model's real size, without a GPU and without weights.

    python benchmarks/run.py dryrun --config configs/pshuman.yaml [--sweep config] [--g-skel] [--out DIR]

The configured model (PSHuman's UNetMV2DConditionModel, the SD-2.1 VAE, the CLIP ViT-H image encoder,
g_skel at the latent size; shapes from the pipeline folder's configs when it exists, else PSHuman's
released ones) is built on the meta device with LoRA adapters and turned into fake tensors
(``torch._subclasses.fake_tensor.FakeTensorMode``): tensors with shapes, dtypes and strides but no data.
Then :func:`drpose.training.step.train_step`, the function the trainer runs, computes one micro-batch
(condition -> sample with the gradient policy -> PoseScore -> KL -> backward) and the optimizer steps,
in bf16 autocast, under

* :class:`StepMemoryTracker` (``torch.distributed._tools.mem_tracker.MemTracker``): live tensor bytes by
  category (parameters, gradients, optimizer state, activations, temporaries) and their peak; with
  ``offload_activations`` the tensors saved to host memory are counted apart, as host memory;
* the FLOP formulas of ``torch.utils.flop_counter`` (``FlopCounterMode``'s registry), applied per op by the
  same tracker (attention included, see :func:`register_cpu_attention_flops`). ``FlopCounterMode`` itself
  is not entered: its module tracking keeps the activations of checkpointed regions alive, which would
  inflate the measured peak (about 3x on PSHuman's UNet);
* a per-op roofline: every op takes ``max(FLOPs / (peak FLOP/s x efficiency), bytes / (bandwidth x
  efficiency))`` on the modelled device (:data:`DEVICES`; the efficiencies are stated with the results).

Fake tensors live on the CPU (fake CUDA tensors abort the CPU build of torch), so the figures stand for
a GPU running the same ops: memory is exact for the tensors the step allocates (the caching allocator's
rounding and fragmentation, CUDA context and workspaces come on top); time is a model, not a measurement.

Sampling at real size dispatches about a hundred UNet calls; a no-grad call (a sampling step without
gradients, or the frozen model's prediction for the KL term) that repeats an earlier one with the same
shapes is not executed again: its output is allocated, and its FLOPs, modelled time and the memory it
would add at its own peak (measured the first time) are charged where it happens, so the peak comes out
as if it had run (``exact=True`` runs every call; the tests check both agree).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, register_flop_formula

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# ----------------------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Device:
    """A GPU's stated peak figures: dense tensor-core FLOP/s in bf16 and TF32 (fp32 convolutions: cuDNN allows
    TF32 by default), plain fp32 FLOP/s (fp32 matmuls: PyTorch's default keeps TF32 off for them), HBM
    bandwidth and memory."""

    name: str
    bf16_tflops: float
    tf32_tflops: float
    fp32_tflops: float
    bandwidth_tbs: float
    memory_gb: float

    def tflops(self, dtype: torch.dtype | None, convolution: bool) -> float:
        if dtype in (torch.bfloat16, torch.float16) or dtype is None:
            return self.bf16_tflops
        return self.tf32_tflops if convolution else self.fp32_tflops


DEVICES = {
    "H100": Device("H100 SXM", 989.0, 494.7, 66.9, 3.35, 80.0),
    "H200": Device("H200 SXM", 989.0, 494.7, 66.9, 4.8, 141.0),
}
COMPUTE_EFFICIENCY = 0.4  # share of the peak FLOP/s that matmuls, convolutions and attention reach
BANDWIDTH_EFFICIENCY = 0.7  # share of the peak bandwidth that memory-bound ops reach
HOST_OVERHEAD_US = 5.0  # host-side dispatch per executed (non-view) op in eager PyTorch

# ------------------------------------------------------------------------------------ architectures

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Architecture:
    """The shapes of everything a training step runs (no weights)."""

    name: str
    unet: dict  # UNetMV2DConditionModel config
    vae: dict  # AutoencoderKL config
    image_encoder: dict  # CLIPVisionConfig fields
    g_skel: dict  # GSkelConfig fields
    scheduler: dict = field(default_factory=lambda: dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon"))
    prompt_tokens: int = 77
    source: str = "built-in"

    @property
    def latent_size(self) -> int:
        return int(self.unet["sample_size"])

    @property
    def num_views(self) -> int:
        return int(self.unet.get("num_views", 7))

    @property
    def image_size(self) -> int:
        return self.latent_size * 2 ** (len(self.vae["block_out_channels"]) - 1)


def pshuman_architecture() -> Architecture:
    """PSHuman's released model: UNetMV2DConditionModel (SD-2.1-unclip + multi-view blocks, 96x96 latents,
    7 views), the SD-2.x VAE, the OpenCLIP ViT-H/14 image encoder, and a g_skel for 96x96 latents."""
    from drpose.models.pshuman_unet import pshuman_unet_config

    return Architecture(
        name="pshuman",
        unet=pshuman_unet_config(),
        vae=dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                 layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=768,
                 scaling_factor=0.18215),
        image_encoder=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu"),
        g_skel=dict(in_channels=8, out_channels=43, latent_size=96),
    )


def tiny_architecture(latent_size: int = 24) -> Architecture:
    """A small model of the same structure, for checking the dry run against real CPU runs."""
    from drpose.models.pshuman_unet import CLASS_NAME, MULTIVIEW_FLAGS

    return Architecture(
        name="tiny",
        unet=dict(_class_name=CLASS_NAME, sample_size=latent_size, in_channels=8, out_channels=4,
                  down_block_types=["CrossAttnDownBlockMV2D", "DownBlock2D"], mid_block_type="UNetMidBlockMV2DCrossAttn",
                  up_block_types=["UpBlock2D", "CrossAttnUpBlockMV2D"], block_out_channels=[32, 64],
                  layers_per_block=1, attention_head_dim=[2, 4], cross_attention_dim=32, norm_num_groups=8,
                  use_linear_projection=True, upcast_attention=True, class_embed_type="projection",
                  projection_class_embeddings_input_dim=32, num_views=7, **MULTIVIEW_FLAGS),
        vae=dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                 latent_channels=4, norm_num_groups=8, sample_size=2 * latent_size, scaling_factor=0.5),
        image_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16),
        g_skel=dict(in_channels=8, out_channels=43, widths=(16, 32), latent_size=latent_size),
        prompt_tokens=16,
    )


def tiny_world_architecture() -> Architecture:
    """The embedded tiny world's model (18x18 latents, 72 px), shapes from its build (``drpose.world``)."""
    from drpose.world.build import tiny_unet_config
    from drpose.world.codec_training import tiny_vae_config
    from drpose.world.conditioning import CLIP_IMAGE_SIZE, EMBED_DIM

    unet = tiny_unet_config()
    return Architecture(
        name="tiny_world", unet=unet, vae={k: list(v) if isinstance(v, tuple) else v for k, v in tiny_vae_config().items()},
        image_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=CLIP_IMAGE_SIZE, patch_size=8, projection_dim=EMBED_DIM),
        g_skel=dict(in_channels=8, out_channels=43, latent_size=unet["sample_size"]),
        scheduler=dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing", prediction_type="epsilon"),
    )


def architecture_from_folder(pipeline: Path, base: Architecture) -> Architecture:
    """``base`` with the shapes a pipeline folder's configs give (unet/, vae/, image_encoder/, scheduler/)."""
    parts = {"unet": "unet/config.json", "vae": "vae/config.json", "image_encoder": "image_encoder/config.json",
             "scheduler": "scheduler/scheduler_config.json"}
    found = {}
    for key, name in parts.items():
        path = pipeline / name
        if path.is_file():
            config = json.loads(path.read_text())
            if key == "image_encoder":
                config = {k: v for k, v in config.items() if k in base.image_encoder or k == "hidden_act"}
            elif key != "unet":
                config = {k: v for k, v in config.items() if not k.startswith("_")}
            found[key] = config
    if not found:
        return base
    arch = replace(base, **found, source=f"{pipeline} ({', '.join(sorted(found))})")
    arch.g_skel = dict(base.g_skel, latent_size=arch.latent_size)
    return arch


# ------------------------------------------------------------------------------------------ settings


@dataclass
class StepSettings:
    """What one training step does: the config's sampling, LoRA, batch, reward and precision settings."""

    batch_size: int = 2
    num_steps: int = 20  # T
    num_grad_steps: int = 2  # K
    guidance_scale: float = 3.0
    policy: str = "drtune"
    checkpointing: bool = True
    unet_checkpointing: bool = True
    offload_activations: bool = False
    groups_per_call: int = 1
    lora_rank: int = 32
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    kl_weight: float = 0.01
    sigma: float = 1.0
    lr: float = 1e-4
    dtype: str = "bf16"
    grad_accum: int = 2
    max_steps: int = 18000
    early_stop_max: int = 8  # m
    ema: bool = False  # optim.ema_decay set: an fp32 moving average of the LoRA weights beside them

    @classmethod
    def from_config(cls, config) -> "StepSettings":
        s, lora = config.sampling, config.lora
        dtype = config.run.precision if config.run.precision != "auto" else "bf16"
        return cls(batch_size=config.data.batch_size, num_steps=s.num_steps, num_grad_steps=s.num_grad_steps,
                   guidance_scale=s.guidance_scale, policy=s.policy, checkpointing=s.checkpointing,
                   unet_checkpointing=s.unet_checkpointing, offload_activations=s.offload_activations,
                   groups_per_call=s.groups_per_call, lora_rank=lora.rank, lora_alpha=lora.alpha,
                   lora_targets=tuple(lora.target_modules), kl_weight=config.reward.kl_weight,
                   sigma=config.reward.sigma or 1.0, lr=config.optim.lr, dtype=dtype,
                   grad_accum=config.data.grad_accum, max_steps=config.run.max_steps,
                   early_stop_max=s.early_stop_max, ema=config.optim.ema_decay is not None)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]

    def label(self) -> str:
        ckpt = ("off" if not self.checkpointing else "call+unet" if self.unet_checkpointing else "call")
        return (f"K={self.num_grad_steps} g={self.guidance_scale:g} ckpt={ckpt} gpc={self.groups_per_call} "
                f"offload={'on' if self.offload_activations else 'off'} B={self.batch_size}")


def longest_plan(settings: StepSettings):
    """The plan of the longest step the policy makes: every step runs (DRTune's early stop skips none) and
    the first gradient-carrying step comes first, so its saved state lives through the whole rollout."""
    from drpose.models.sampling import GradientPolicy, SamplingPlan

    policy = GradientPolicy(settings.policy, settings.num_grad_steps, settings.early_stop_max)
    steps, k = settings.num_steps, min(settings.num_grad_steps, settings.num_steps)
    if policy.name == "drtune":
        interval = steps // k
        return SamplingPlan(steps, tuple(j * interval for j in range(k)), True)
    return SamplingPlan(steps, tuple(range(steps - k, steps)), False)


# ---------------------------------------------------------------------------------- building a model


class TensorCLIPImageProcessor:
    """CLIPImageProcessor's preprocessing (bicubic resize of the short side, centre crop, normalise) in
    torch ops, so that conditioning runs on fake tensors; the pipeline calls it like the real one."""

    def __init__(self, size: int, mean=CLIP_MEAN, std=CLIP_STD):
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, images, return_tensors="pt", do_rescale=False):
        x = torch.stack(list(images)).float()
        height, width = x.shape[-2:]
        scale = self.size / min(height, width)
        x = F.interpolate(x, size=(round(height * scale), round(width * scale)), mode="bicubic", align_corners=False)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)

        class Pixels:
            pixel_values = (x - mean) / std

        return Pixels()


def fakify(modules: list[nn.Module], mode) -> None:
    """Replace the (meta) parameters and buffers of ``modules`` by fake CPU tensors of the same shape, dtype
    and ``requires_grad``; a tensor shared by several modules stays shared."""
    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    cpu = torch.device("cpu")

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:  # keep ``t`` alive so that its id cannot be reused
            memo[id(t)] = (t, mode.fake_tensor_converter.from_meta_and_device(mode, t.detach(), cpu))
        return memo[id(t)][1]

    for root in modules:
        for module in root.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[name] = nn.Parameter(fake(param), requires_grad=param.requires_grad)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = fake(buffer)


@dataclass
class BuiltStep:
    model: object  # StepModel
    batch: object  # StepBatch
    plan: object  # SamplingPlan
    optimizer: torch.optim.Optimizer
    lora_params: list[torch.nn.Parameter]
    modules: dict[str, nn.Module]
    parameter_bytes: dict[str, int]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_step(arch: Architecture, settings: StepSettings, mode=None, seed: int = 0,
               device: str | torch.device = "cpu") -> BuiltStep:
    """The model, batch, plan and optimizer of one training step: fake tensors under ``mode`` (built on the
    meta device, then faked), else real tensors on ``device`` with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from drpose.body import joints_from_params
    from drpose.models.g_skel import GSkel, GSkelConfig
    from drpose.models.pipeline import MultiViewPipeline
    from drpose.models.pshuman_unet import UNetMV2DConditionModel
    from drpose.models.rig import ViewRig
    from drpose.models.sampling import DDIMSampler
    from drpose.poses import sample_poses
    from drpose.reward import PoseReward
    from drpose.training.config import LoraSettings
    from drpose.training.data import sample_noise
    from drpose.training.lora import add_lora
    from drpose.training.step import StepBatch, StepModel

    dtype = settings.torch_dtype
    torch.manual_seed(seed)
    device = torch.device(device)
    with torch.device("meta" if mode is not None else device), default_dtype(dtype):
        unet = UNetMV2DConditionModel(**arch.unet)
        vae = AutoencoderKL(**arch.vae)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**arch.image_encoder))
        normalizer = StableUnCLIPImageNormalizer(embedding_dim=arch.image_encoder["projection_dim"])
        g_skel = GSkel(GSkelConfig(**arch.g_skel))
    for module in (unet, vae, image_encoder, normalizer, g_skel):
        module.eval().requires_grad_(False)
    lora_params = add_lora(unet, LoraSettings(rank=settings.lora_rank, alpha=settings.lora_alpha,
                                              target_modules=list(settings.lora_targets)))
    if settings.unet_checkpointing:
        unet.enable_gradient_checkpointing()
    modules = {"unet": unet, "vae": vae, "image_encoder": image_encoder, "image_normalizer": normalizer,
               "g_skel": g_skel}
    if mode is not None:
        fakify(list(modules.values()), mode)
        lora_params = [p for name, p in unet.named_parameters() if "lora_" in name]
    parameter_bytes = {name: sum(p.numel() * p.element_size() for p in m.parameters() if not p.requires_grad)
                       for name, m in modules.items()}
    parameter_bytes["lora"] = sum(p.numel() * p.element_size() for p in lora_params)

    # host-side pieces (schedules, sampler) hold real tensors; the step's tensors are fake under ``mode``
    scheduler = DDIMScheduler(**arch.scheduler)
    noising = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    sampler = DDIMSampler(scheduler, settings.num_steps, arch.num_views, settings.guidance_scale,
                          settings.checkpointing, settings.offload_activations, settings.groups_per_call)
    cross_dim = arch.unet["cross_attention_dim"]
    generator = torch.Generator().manual_seed(seed)
    size, batch = arch.image_size, settings.batch_size
    real = {
        "prompt_embeds": torch.randn(2, arch.num_views, arch.prompt_tokens, cross_dim, generator=generator).to(dtype),
        "images": torch.rand(batch, 3, size, size, generator=generator).to(dtype),
        "joints": joints_from_params(sample_poses("broad", batch, seed)).float(),
        "noise": sample_noise((2, arch.num_views, 4, arch.latent_size, arch.latent_size), seed, 0,
                              list(range(batch))).to(dtype),
    }
    tensors = ({k: mode.from_tensor(v) for k, v in real.items()} if mode is not None
               else {k: v.to(device) for k, v in real.items()})
    pipeline = MultiViewPipeline(unet, vae, scheduler, image_encoder,
                                 TensorCLIPImageProcessor(arch.image_encoder["image_size"]), normalizer, noising,
                                 tensors["prompt_embeds"])
    reward = PoseReward(g_skel, ViewRig(), arch.num_views, settings.sigma, backend="auto")
    model = StepModel(pipeline, unet, unet, reward, sampler, settings.kl_weight, seed, dtype=dtype)
    step_batch = StepBatch(tensors["images"], tensors["joints"], tensors["noise"], list(range(batch)), 0)
    # DeepSpeed runs the optimizer in the trainer; AdamW holds the same state (two fp32 moments per weight)
    optimizer = torch.optim.AdamW(lora_params, lr=settings.lr, foreach=True)
    return BuiltStep(model, step_batch, longest_plan(settings), optimizer, lora_params, modules, parameter_bytes)


# ------------------------------------------------------------------------------------ measuring a step

HOST = torch.device("meta")  # offloaded activations are counted on this device: host memory
CATEGORIES = {  # MemTracker's reference types -> the categories reported
    _MemRefType.PARAM: "parameters", _MemRefType.BUFFER: "parameters", _MemRefType.GRAD: "gradients",
    _MemRefType.OPT: "optimizer_state", _MemRefType.ACT: "activations", _MemRefType.TEMP: "temporaries",
    _MemRefType.OTH: "inputs",
}
REPORTED = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "inputs")
_FREE_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
             "lift_fresh", "_local_scalar_dense", "_to_copy_meta"}


def register_cpu_attention_flops() -> None:
    """FLOP formulas for the CPU flash-attention op and its backward (torch's registry lacks them, so
    attention would count as zero on CPU tensors): the same counts as the CUDA flash kernels'."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    forward, backward = (aten._scaled_dot_product_flash_attention_for_cpu,
                         aten._scaled_dot_product_flash_attention_for_cpu_backward)
    if forward not in flop_registry:
        @register_flop_formula(forward)
        def _cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)
    if backward not in flop_registry:
        @register_flop_formula(backward)
        def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes an op reads or writes for ``t``: its elements, or its storage when it is broadcast (stride 0)."""
    size = t.numel() * t.element_size()
    try:
        return min(size, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return size


@dataclass
class Cost:
    """Executed ops, their FLOPs and bytes, and their modelled time on each device (roofline per op)."""

    ops: int = 0
    flops: int = 0
    bytes: int = 0
    offload_bytes: int = 0
    seconds: dict = field(default_factory=lambda: {name: 0.0 for name in DEVICES})
    flops_by_op: Counter = field(default_factory=Counter)
    # H100 seconds of the ops that the FLOP/s limit bounds and of those the bandwidth limit bounds
    bound_s: dict = field(default_factory=lambda: {"compute": 0.0, "bandwidth": 0.0})

    def minus(self, other: "Cost") -> "Cost":
        return Cost(self.ops - other.ops, self.flops - other.flops, self.bytes - other.bytes,
                    self.offload_bytes - other.offload_bytes,
                    {k: self.seconds[k] - other.seconds[k] for k in self.seconds}, self.flops_by_op - other.flops_by_op,
                    {k: self.bound_s[k] - other.bound_s[k] for k in self.bound_s})

    def add(self, other: "Cost") -> None:
        self.ops += other.ops
        self.flops += other.flops
        self.bytes += other.bytes
        self.offload_bytes += other.offload_bytes
        for k in self.seconds:
            self.seconds[k] += other.seconds[k]
        self.flops_by_op.update(other.flops_by_op)
        for k in self.bound_s:
            self.bound_s[k] += other.bound_s[k]

    def copy(self) -> "Cost":
        return Cost(self.ops, self.flops, self.bytes, self.offload_bytes, dict(self.seconds), Counter(self.flops_by_op),
                    dict(self.bound_s))


class StepMemoryTracker(MemTracker):
    """MemTracker for a whole training step: the live tensor bytes of ``device`` by category and their peak,
    plus a per-op roofline cost (:class:`Cost`).

    MemTracker's module hooks are made lean: a module may run many times per step (a UNet call per
    denoising step), gradient hooks go on trainable parameters only (frozen ones cannot take hooks), and
    no per-module snapshots are kept; recomputation inside backward (activation checkpointing) still
    counts as activations. ``mark``/``charge`` let a repeated no-grad call be charged without running it.
    """

    def __init__(self, device: torch.device = torch.device("cpu"), efficiency: tuple[float, float] = (
            COMPUTE_EFFICIENCY, BANDWIDTH_EFFICIENCY)):
        super().__init__()
        self.device = device
        self.efficiency = efficiency
        self.cost = Cost()
        self.host_peak = 0
        self._seen_modules: set[int] = set()
        self._local_peak = 0
        self._local_snap: dict = {}

    # -- module hooks
    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        def grad_hook(grad: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        param_memory = buffer_memory = 0
        for param in module.parameters():
            winfos = self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
            param_memory += sum(w.mem_consumed for w in winfos)
            if param.grad is not None:
                self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
            if install_grad_hooks and param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(grad_hook),
                    param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)))
        for buffer in module.buffers():
            winfos = self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
            buffer_memory += sum(w.mem_consumed for w in winfos)
        return param_memory, buffer_memory

    def _pre_fw_hook(self, module: nn.Module, inputs) -> None:
        if id(module) not in self._seen_modules:
            self._seen_modules.add(id(module))
            self._track_module_params_and_buffers(module, install_grad_hooks=True)
        if self._mod_tracker.is_bw and self._ac_mod is None:  # recomputation of a checkpointed region
            import weakref

            self._ac_mod = weakref.ref(module)
            self._in_ac = True

    def _post_fw_hook(self, module: nn.Module, inputs, outputs) -> None:
        if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
            self._ac_mod = None
            self._in_ac = False

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        pass

    # -- peaks
    def current(self, device: torch.device | None = None) -> dict:
        snap = self._curr_mem_snap.get(device or self.device)
        return dict(snap) if snap else {}

    def total(self, device: torch.device | None = None) -> int:
        return self.current(device).get("Total", 0)

    def _update_peak_stats(self, peak_state) -> None:
        snap = self._curr_mem_snap.get(self.device)
        if snap is not None:
            total = snap["Total"]
            if total > self._peak_mem.get(self.device, 0):
                self._peak_mem[self.device] = total
                self._peak_mem_snap[self.device] = dict(snap)
            if total > self._local_peak:
                self._local_peak = total
                self._local_snap = dict(snap)
        host = self._curr_mem_snap.get(HOST)
        if host is not None:
            self.host_peak = max(self.host_peak, host["Total"])

    def peak(self) -> tuple[int, dict]:
        snap = self._peak_mem_snap.get(self.device, {})
        return snap.get("Total", 0), snap

    def mark(self) -> dict:
        """Start a local peak; returns the current snapshot."""
        now = self.current()
        self._local_peak, self._local_snap = now.get("Total", 0), dict(now)
        return now

    def local_extra(self, start: dict) -> dict:
        """Bytes by reference type at the local peak since ``mark``, above ``start``."""
        return {k: v - start.get(k, 0) for k, v in self._local_snap.items()}

    def charge(self, extra: dict) -> None:
        """Raise the peak as a call that adds ``extra`` at its own peak would, from the current live set."""
        now = self.current()
        candidate = {k: now.get(k, 0) + extra.get(k, 0) for k in set(now) | set(extra)}
        if candidate.get("Total", 0) > self._peak_mem.get(self.device, 0):
            self._peak_mem[self.device] = candidate["Total"]
            self._peak_mem_snap[self.device] = candidate

    # -- ops
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self._account(func, args, kwargs or {}, out)
        return out

    def _account(self, func, args, kwargs, out) -> None:
        packet = func._overloadpacket
        if func.is_view or packet.__name__ in _FREE_OPS:
            return
        flops = 0
        if packet in flop_registry:
            flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
        moved = 0
        for tensors in (args, kwargs.values(), out if isinstance(out, (tuple, list)) else (out,)):
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.device.type != HOST.type:
                    moved += _tensor_bytes(t)
                elif isinstance(t, (tuple, list)):
                    moved += sum(_tensor_bytes(x) for x in t if isinstance(x, torch.Tensor))
        self.cost.ops += 1
        self.cost.flops += flops
        if flops:
            self.cost.flops_by_op[packet.__name__] += flops
        self.cost.bytes += moved
        compute, bandwidth = self.efficiency
        dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        convolution = packet.__name__.startswith("convolution")
        for name, device in DEVICES.items():
            compute_s = flops / (device.tflops(dtype, convolution) * 1e12 * compute)
            bandwidth_s = moved / (device.bandwidth_tbs * 1e12 * bandwidth)
            self.cost.seconds[name] += max(compute_s, bandwidth_s)
            if name == "H100":
                self.cost.bound_s["compute" if compute_s >= bandwidth_s else "bandwidth"] += max(compute_s, bandwidth_s)


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """``torch.autograd.graph.save_on_cpu`` for fake tensors: the saved tensors of a gradient-carrying call
    go to the host device (:data:`HOST`), where the tracker counts them apart; the bytes moved each way are
    added to the cost."""

    def __init__(self, tracker: StepMemoryTracker | None, pin_memory: bool = False, device_type: str = "cuda"):
        def pack(t: torch.Tensor):
            if tracker is not None:
                tracker.cost.offload_bytes += _tensor_bytes(t)
            return t.device, torch.empty(t.size(), dtype=t.dtype, device=HOST)

        def unpack(packed):
            device, t = packed
            if tracker is not None:
                tracker.cost.offload_bytes += _tensor_bytes(t)
            return torch.empty(t.size(), dtype=t.dtype, device=device)

        super().__init__(pack, unpack)


@contextlib.contextmanager
def offload_to_host(tracker: StepMemoryTracker | None):
    """While active, the sampler's activation offload (``save_on_cpu``) goes to :data:`HOST`."""
    graph = torch.autograd.graph
    original = graph.save_on_cpu
    graph.save_on_cpu = lambda pin_memory=False, device_type="cuda": HostOffload(tracker, pin_memory, device_type)
    try:
        yield
    finally:
        graph.save_on_cpu = original


_CUDA_FP32_OPS = ("layer_norm", "group_norm", "softmax.int", "log_softmax.int")


@contextlib.contextmanager
def cuda_autocast_policy(dtype: torch.dtype = torch.bfloat16):
    """CPU autocast as CUDA's: while active, normalisation layers and softmax run in fp32 under autocast
    (CUDA autocasts them to fp32; CPU autocast leaves them in their input's dtype), so the tensors they
    save for backward have the size they have on a GPU. Matmuls, convolutions and attention run in
    ``dtype`` on both."""
    from torch._C import DispatchKey, DispatchKeySet, _ExcludeDispatchKeyGuard

    library = torch.library.Library("aten", "IMPL")
    excluded = DispatchKeySet(DispatchKey.AutocastCPU)

    def fp32(name: str):
        op = getattr(torch.ops.aten, name.split(".")[0])
        overload = getattr(op, name.split(".")[1] if "." in name else "default")

        def kernel(*args, **kwargs):
            cast = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                      for k, v in kwargs.items()}
            if name.startswith(("softmax", "log_softmax")) and len(cast) > 2:
                cast[2] = None  # the output dtype: fp32, as CUDA's autocast makes it
            with _ExcludeDispatchKeyGuard(excluded):
                return overload(*cast, **kwargs)

        return kernel

    for name in _CUDA_FP32_OPS:
        library.impl(name, fp32(name), "AutocastCPU")
    try:
        yield
    finally:
        library._destroy()


@dataclass
class _MemoEntry:
    out_shape: tuple
    out_dtype: torch.dtype
    extra: dict
    cost: Cost


class NoGradMemo(nn.Module):
    """The predictor of a dry run: the UNet, except that a no-grad call repeating an earlier one (same input
    shapes, adapters on or off, autocast) is charged, not executed (see the module docstring)."""

    def __init__(self, unet: nn.Module, tracker: StepMemoryTracker):
        super().__init__()
        self.unet = unet
        self.tracker = tracker
        self.entries: dict[tuple, _MemoEntry] = {}
        self.executed = 0
        self.skipped = 0
        self.skipped_cost = Cost()

    def forward(self, sample, timestep, encoder_hidden_states=None, class_labels=None, return_dict=True, **kwargs):
        def call():
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, class_labels=class_labels,
                             return_dict=return_dict, **kwargs)

        if torch.is_grad_enabled():
            return call()
        adapters_on = not any(getattr(m, "disable_adapters", False) for m in self._lora_layers())
        key = (tuple(sample.shape), sample.dtype, tuple(encoder_hidden_states.shape), adapters_on,
               torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        entry = self.entries.get(key)
        if entry is None:
            start, cost = self.tracker.mark(), self.tracker.cost.copy()
            out = call()
            tensor = out[0] if isinstance(out, tuple) else out.sample
            self.entries[key] = _MemoEntry(tuple(tensor.shape), tensor.dtype, self.tracker.local_extra(start),
                                           self.tracker.cost.minus(cost))
            self.executed += 1
            return out
        self.skipped += 1
        self.tracker.charge(entry.extra)
        self.skipped_cost.add(entry.cost)
        tensor = torch.empty(entry.out_shape, dtype=entry.out_dtype, device=sample.device)
        return (tensor,) if not return_dict else type("Output", (), {"sample": tensor})()

    def no_grad_seconds(self, rows: int) -> dict | None:
        """Modelled seconds of one no-grad call (adapters on) on ``rows`` rows, if one was measured."""
        for key, entry in self.entries.items():
            if key[0][0] == rows and key[3]:
                return entry.cost.seconds
        return None

    def _lora_layers(self):
        if not hasattr(self, "_lora_cache"):
            self._lora_cache = [m for m in self.unet.modules() if hasattr(m, "lora_A")][:1]
        return self._lora_cache


def _by_category(snapshot: dict) -> dict:
    out = dict.fromkeys(REPORTED, 0)
    for key, value in snapshot.items():
        if key in CATEGORIES:
            out[CATEGORIES[key]] += value
    return out


def warm_up_optimizer(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """Create the optimizer's state (as after the first step of a run), so that it is live during the
    measured step as it is in every step but the first."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _cycle_collector_paused():
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def measure_step(arch: Architecture, settings: StepSettings, fake: bool = True, exact: bool = False,
                 autocast: str = "cuda", seed: int = 0) -> dict:
    """One training step (``train_step`` + the optimizer step) of ``arch`` under the memory tracker (which
    also counts FLOPs and models time), on fake tensors (``fake``) or on real CPU tensors, with CUDA's autocast policy
    (``autocast="cuda"``, :func:`cuda_autocast_policy`) or CPU's. Returns the figures as a dict."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from drpose.training.step import train_step

    if autocast not in ("cuda", "cpu"):
        raise ValueError(f"autocast must be 'cuda' or 'cpu', got {autocast!r}")
    register_cpu_attention_flops()
    started = time.perf_counter()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    built = build_step(arch, settings, mode, seed)
    with mode if mode is not None else contextlib.nullcontext():
        warm_up_optimizer(built.optimizer, built.lora_params)
    build_s = time.perf_counter() - started
    tracker = StepMemoryTracker()
    tracker.track_external(*built.modules.values(), built.optimizer, built.model.pipeline.prompt_embeds,
                           built.batch.images, built.batch.joints, built.batch.noise)
    memo = None
    if fake and not exact:
        memo = NoGradMemo(built.modules["unet"], tracker)
        built.model.predictor = memo
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # Python's cycle collector runs when the interpreter's allocation counts say so, which depends on
        # everything the process did before: a cycle holding a tensor would then be freed at a different op
        # from run to run and move the peak. Collect first and hold it off during the step so the figures
        # depend on the step alone (tensors are still freed the moment their last reference goes).
        stack.enter_context(_cycle_collector_paused())
        if mode is not None:
            stack.enter_context(mode)
        if autocast == "cuda" and settings.torch_dtype != torch.float32:
            stack.enter_context(cuda_autocast_policy(settings.torch_dtype))
        stack.enter_context(offload_to_host(tracker) if fake else contextlib.nullcontext())
        stack.enter_context(tracker)
        baseline = tracker.total()
        result = train_step(built.model, built.batch, built.plan, backward=torch.Tensor.backward)
        del result
        built.optimizer.step()
        built.optimizer.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - started
    peak, snapshot = tracker.peak()
    cost = tracker.cost.copy()
    if memo is not None:
        cost.add(memo.skipped_cost)
    figures = {
        "label": settings.label(),
        "settings": asdict(settings),
        "architecture": arch.name,
        "fake": fake,
        "autocast": autocast,
        "peak_memory_bytes": peak,
        "peak_memory_gb": peak / GIB,
        "baseline_bytes": baseline,
        "categories_bytes": _by_category(snapshot),
        "host_peak_bytes": tracker.host_peak,
        "parameter_bytes": built.parameter_bytes,
        "lora_parameters": sum(p.numel() for p in built.lora_params),
        "flops": cost.flops,
        "flops_by_op": dict(cost.flops_by_op.most_common(12)),
        "bytes_moved": cost.bytes,
        "offload_bytes": cost.offload_bytes,
        "ops": cost.ops,
        "modelled_device_s": dict(cost.seconds),
        "h100_bound_s": dict(cost.bound_s),
        "unet_calls": {"executed": memo.executed, "charged": memo.skipped} if memo else None,
        "plan": {"steps_run": built.plan.num_steps_run, "grad_steps": list(built.plan.grad_steps)},
        "build_s": build_s,
        "wall_s": step_s,
    }
    figures["expected_device_s"] = expected_seconds(figures, built, memo, settings)
    return figures


def expected_seconds(figures: dict, built: BuiltStep, memo: NoGradMemo | None, settings: StepSettings) -> dict | None:
    """The mean step's modelled time: DRTune's early stop skips a uniform number of final steps in [0, m],
    each a no-grad sampling step, so the mean step runs min(m, T - 1) / 2 fewer of them than the longest."""
    if memo is None or settings.policy != "drtune":
        return None
    sampler, views = built.model.sampler, built.model.sampler.num_views
    per_step = dict.fromkeys(DEVICES, 0.0)
    for chunk, _ in sampler.calls(settings.batch_size):
        seconds = memo.no_grad_seconds(2 * len(chunk) * views)
        if seconds is None:
            return None
        for k in per_step:
            per_step[k] += seconds[k]
    skipped = min(settings.early_stop_max, settings.num_steps - 1) / 2
    return {k: figures["modelled_device_s"][k] - skipped * per_step[k] for k in per_step}



# ------------------------------------------------------------------------------------------- g_skel

DRPOSE15K_SAMPLES = 15_000  # DrPose15K: 1.5K poses x 10 frames
BODY_VIEWS = 6


def measure_g_skel(arch: Architecture, samples: int = DRPOSE15K_SAMPLES, batch_views: int = 96,
                   encode_chunk: int = 128, sigma: float = 1.0) -> dict:
    """g_skel training at ``arch``'s latent size on fake tensors, as ``drpose.g_skel_train`` runs it (fp32):
    memory and modelled time of one step (``pose_loss`` + AdamW) and of an epoch over ``samples`` x 6 body
    views, and of encoding the views (``samples`` x 2 domains x 6 views) with the VAE by
    ``g_skel_train.encode`` in chunks of ``encode_chunk`` images."""
    from diffusers import AutoencoderKL
    from torch._subclasses.fake_tensor import FakeTensorMode

    from drpose.g_skel_train import encode, pose_loss
    from drpose.models.g_skel import GSkel, GSkelConfig

    register_cpu_attention_flops()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    size, config = arch.latent_size, GSkelConfig(**arch.g_skel)
    with torch.device("meta"):
        g_skel = GSkel(config)
        vae = AutoencoderKL(**arch.vae).eval().requires_grad_(False)
    fakify([g_skel, vae], mode)
    optimizer = torch.optim.AdamW(g_skel.parameters(), lr=2e-3, weight_decay=1e-4, foreach=True)
    out = {"latent_size": size, "batch_views": batch_views, "samples": samples, "views_per_epoch": samples * BODY_VIEWS,
           "g_skel_parameters": sum(p.numel() for p in g_skel.parameters())}
    with mode:
        warm_up_optimizer(optimizer, list(g_skel.parameters()))
        inputs = torch.empty(batch_views, config.in_channels, size, size)
        segments = torch.empty(batch_views, config.out_channels, 2, 2)
        weights = torch.empty(batch_views, config.out_channels)
        tracker = StepMemoryTracker()
        tracker.track_external(g_skel, optimizer, inputs, segments, weights)
        with tracker:
            loss = pose_loss(g_skel, inputs, segments, weights, sigma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        peak, snapshot = tracker.peak()
        steps = math.ceil(samples * BODY_VIEWS / batch_views)
        out["train_step"] = {"peak_memory_bytes": peak, "categories_bytes": _by_category(snapshot),
                             "flops": tracker.cost.flops, "bytes_moved": tracker.cost.bytes,
                             "modelled_s": dict(tracker.cost.seconds)}
        out["steps_per_epoch"] = steps
        out["epoch_modelled_s"] = {k: v * steps for k, v in tracker.cost.seconds.items()}

        images = arch.image_size
        groups = max(1, math.ceil(encode_chunk / (2 * BODY_VIEWS)))  # whole samples, at least one chunk's worth
        views = torch.empty(groups, 2, BODY_VIEWS, 3, images, images, dtype=torch.uint8)
        tracker = StepMemoryTracker()
        tracker.track_external(vae, views)
        with tracker:
            latents = encode(vae, views, images, chunk=encode_chunk)
        del latents
        peak, snapshot = tracker.peak()
        encoded = groups * 2 * BODY_VIEWS
        per_image = {k: v / encoded for k, v in tracker.cost.seconds.items()}
        total_images = samples * 2 * BODY_VIEWS
        out["encode"] = {"chunk": encode_chunk, "image_size": images, "dtype": "fp32",
                         "peak_memory_bytes": peak, "categories_bytes": _by_category(snapshot),
                         "vae_parameter_bytes": sum(p.numel() * p.element_size() for p in vae.parameters()),
                         "flops_per_image": tracker.cost.flops / encoded, "images": total_images,
                         "modelled_s": {k: v * total_images for k, v in per_image.items()}}
    return out


# ------------------------------------------------------------------------------------------ DeepSpeed


def zero_per_rank(figures: dict, ds_config: dict, world_size: int) -> dict:
    """Modelled peak memory per GPU under the DeepSpeed JSON's ZeRO settings on ``world_size`` GPUs, from
    the tracked one-process step (frozen weights whole, LoRA weights fp32, AdamW's two fp32 moments and the
    fp32 gradients of every LoRA weight):

    * stages 1-2 keep an fp32 master copy, the moments and the reduced gradients of this rank's 1/N of the
      LoRA weights (moments and master copy on the host with ``offload_optimizer``), plus the gradient
      reduction bucket (``reduce_bucket_size`` fp32 elements, two with ``overlap_comm``);
    * stage 3 also splits the UNet's weights (frozen ones included) and the LoRA weights 1/N per rank and
      gathers a layer's worth at a time (modelled as ``stage3_prefetch_bucket_size`` bf16 elements; none on
      the GPU with ``offload_param``); the VAE, image encoder and g_skel stay whole;
    * with ``optim.ema_decay`` the adapters' fp32 moving average: whole below stage 3, 1/N per rank at stage 3
      (each rank averages its partition, on the host with ``offload_param``).
    """
    zero = ds_config.get("zero_optimization", {})
    stage, n = int(zero.get("stage", 0)), world_size
    cats, params = figures["categories_bytes"], figures["parameter_bytes"]
    lora = params["lora"]
    device = figures["peak_memory_bytes"] - cats["optimizer_state"] - cats["gradients"]
    host = figures.get("host_peak_bytes", 0)
    parts = {}
    if stage == 0:
        parts.update(optimizer_state=cats["optimizer_state"], gradients=cats["gradients"])
    else:
        offload_optimizer = zero.get("offload_optimizer", {}).get("device") == "cpu"
        moments_and_master = 3 * lora // n
        parts["gradient_partition"] = lora // n
        parts["optimizer_state_and_master"] = 0 if offload_optimizer else moments_and_master
        host += moments_and_master if offload_optimizer else 0
        buckets = 2 if zero.get("overlap_comm", False) else 1
        parts["reduce_buckets"] = int(zero.get("reduce_bucket_size", 5e8)) * 4 * buckets if stage <= 2 else 0
        if stage == 3:
            unet = params["unet"]
            offload_param = zero.get("offload_param", {}).get("device") == "cpu"
            device -= unet + lora
            parts["unet_partition"] = 0 if offload_param else (unet + lora) // n
            parts["gathered_layers"] = int(zero.get("stage3_prefetch_bucket_size", 5e7)) * 2
            host += (unet + lora) // n if offload_param else 0
    if figures.get("settings", {}).get("ema"):  # kept where the weights it averages live
        on_host = stage == 3 and zero.get("offload_param", {}).get("device") == "cpu"
        parts["adapter_average"] = 0 if on_host else lora // n if stage == 3 else lora
        host += lora // n if on_host else 0
    total = device + sum(parts.values())
    return {"stage": stage, "world_size": n, "peak_memory_bytes": total, "peak_memory_gb": total / GIB,
            "parts_bytes": parts, "host_bytes": host}


# ----------------------------------------------------------------------------------------- validation


def rss_growth(arch: Architecture, settings: StepSettings, autocast: str = "cuda", seed: int = 0) -> tuple[int | None, str]:
    """Resident-set growth of the same step on real CPU tensors, untracked (``drpose.memory``)."""
    from drpose.memory import peak_memory
    from drpose.training.step import train_step

    built = build_step(arch, settings, None, seed)
    warm_up_optimizer(built.optimizer, built.lora_params)

    def step():
        with cuda_autocast_policy(settings.torch_dtype) if autocast == "cuda" else contextlib.nullcontext():
            train_step(built.model, built.batch, built.plan, backward=torch.Tensor.backward)
            built.optimizer.step()
            built.optimizer.zero_grad(set_to_none=True)

    return peak_memory(step, "cpu")


def validate(arch: Architecture, settings: StepSettings, rss: bool = True) -> dict:
    """The tracker on fake tensors against the same tracker on real CPU tensors (same step, same seed), and
    against the process's measured resident-set growth."""
    fake = measure_step(arch, settings, fake=True, exact=True)
    real = measure_step(arch, settings, fake=False, exact=True)
    out = {"settings": asdict(settings), "architecture": arch.name,
           "fake": {k: fake[k] for k in ("peak_memory_bytes", "baseline_bytes", "categories_bytes", "flops")},
           "real": {k: real[k] for k in ("peak_memory_bytes", "baseline_bytes", "categories_bytes", "flops")},
           "fake_s": fake["wall_s"], "real_s": real["wall_s"]}
    out["peak_ratio"] = fake["peak_memory_bytes"] / real["peak_memory_bytes"]
    out["growth_fake_bytes"] = fake["peak_memory_bytes"] - fake["baseline_bytes"]
    out["growth_real_bytes"] = real["peak_memory_bytes"] - real["baseline_bytes"]
    if rss:
        growth, kind = rss_growth(arch, settings)
        out["rss_growth_bytes"], out["rss_kind"] = growth, kind
        if growth:
            out["rss_ratio"] = out["growth_fake_bytes"] / growth
    return out


# ---------------------------------------------------------------------------------------------- sweep


def sweep_settings(base: StepSettings, sweep: str) -> list[tuple[str, StepSettings]]:
    """The configurations a dry run measures: the config alone, or (``sweep="config"``) the config and
    one change at a time: checkpointing off / per UNet call / per call + inside the UNet, groups per
    call, K, classifier-free guidance on / off (guidance scale 1 runs one branch) and activation offload
    on / off (any other setting goes through ``--set``, e.g. ``--set sampling.num_steps=50``)."""
    rows = [("config", base)]
    if sweep == "none":
        return rows
    if sweep != "config":
        raise ValueError(f"--sweep must be 'none' or 'config', got {sweep!r}")
    change = lambda **kw: replace(base, **kw)  # noqa: E731
    rows += [
        ("no checkpointing", change(checkpointing=False, unet_checkpointing=False, groups_per_call=0)),
        ("checkpoint per call", change(checkpointing=True, unet_checkpointing=False, groups_per_call=0)),
        ("per call, 1 group per call", change(checkpointing=True, unet_checkpointing=False, groups_per_call=1)),
        ("per call + inside UNet, all groups", change(checkpointing=True, unet_checkpointing=True, groups_per_call=0)),
    ]
    rows += [(f"config, K={k}", change(num_grad_steps=k)) for k in (1, 4, 8) if k != base.num_grad_steps]
    if base.guidance_scale != 1.0:
        rows.append(("config, guidance 1 (no CFG)", change(guidance_scale=1.0)))
    rows.append((f"config, activation offload {'off' if base.offload_activations else 'on'}",
                 change(offload_activations=not base.offload_activations)))
    return rows


# --------------------------------------------------------------------------------------------- report


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def markdown(payload: dict) -> str:
    meta, rows = payload["meta"], payload["rows"]
    devices = meta["devices"]
    lines = [f"# Dry run of `{meta['config']}`: one training step at real size, no GPU", "",
             "**Dry-run / model figures, not measurements on a GPU.** The step is "
             "`drpose.training.step.train_step` + the optimizer step on fake tensors (shapes only, no data); "
             "memory is the live tensor bytes by category (`MemTracker`), FLOPs from `FlopCounterMode`'s "
             "formulas, time a per-op roofline on the stated device peaks.", "",
             f"- architecture: {meta['architecture']['name']} ({meta['architecture']['source']}); latents "
             f"{meta['architecture']['latent_size']}x{meta['architecture']['latent_size']}, "
             f"{meta['architecture']['num_views']} views x 2 domains, images {meta['architecture']['image_size']} px",
             "- weights (bytes): " + ", ".join(f"{k} {_gib(v)} GiB" for k, v in meta["parameter_bytes"].items())
             + f" ({meta['lora_parameters']:,} LoRA parameters, fp32)",
             "- assumed devices: " + "; ".join(
                 f"{d['name']}: {d['bf16_tflops']:g} TFLOP/s dense bf16 ({d['tf32_tflops']:g} TF32, "
                 f"{d['fp32_tflops']:g} fp32), {d['bandwidth_tbs']:g} TB/s, {d['memory_gb']:g} GB"
                 for d in devices.values()),
             f"- efficiency assumed: {100 * meta['compute_efficiency']:.0f}% of peak FLOP/s, "
             f"{100 * meta['bandwidth_efficiency']:.0f}% of peak bandwidth; each op takes the longer of the two",
             f"- precision: {meta['precision']}; autocast: {meta['autocast']}",
             f"- plan: the longest step (T steps run, no early stop; the first of the K gradient-carrying steps "
             f"first); the mean DRTune step (early stop) is shown as 'mean'",
             f"- not counted: CUDA context and library workspaces (about 0.5-1 GiB), allocator rounding and "
             f"fragmentation, communication buffers; fake tensors run on the CPU, so kernels that allocate "
             f"internally on the GPU (cuDNN, flash attention workspaces) are not seen", ""]
    config = next((r for r in rows if r["name"] == "config"), None)
    if config is not None:
        s = config["settings"]
        h100, h200 = config["modelled_device_s"]["H100"], config["modelled_device_s"]["H200"]
        mean = config.get("expected_device_s") or {}
        accum, steps = s["grad_accum"], s["max_steps"]
        lines += ["## The config", "",
                  f"{config['label']}, T={s['num_steps']}, LoRA rank {s['lora_rank']}:", "",
                  f"- **peak memory per GPU: {config['peak_memory_bytes'] / GIB:.2f} GiB** (one process, "
                  f"AdamW state live; the ZeRO table below gives DeepSpeed's figures per rank)",
                  "- at the peak: " + ", ".join(f"{k.replace('_', ' ')} {_gib(v)} GiB"
                                                for k, v in config["categories_bytes"].items()),
                  f"- FLOPs per micro-step: {config['flops'] / 1e12:.1f} TFLOP "
                  f"({config['ops']:,} ops executed or charged, {config['bytes_moved'] / 1e12:.2f} TB moved)",
                  f"- modelled micro-step: H100 {h100:.1f} s, H200 {h200:.1f} s (longest)"
                  + (f"; mean {mean['H100']:.1f} s / {mean['H200']:.1f} s" if mean else ""),
                  f"- per optimizer step ({accum} micro-steps): H100 {accum * (mean or config['modelled_device_s'])['H100']:.1f} s, "
                  f"H200 {accum * (mean or config['modelled_device_s'])['H200']:.1f} s; {steps:,} steps: "
                  f"H100 {steps * accum * (mean or config['modelled_device_s'])['H100'] / 3600:.0f} h, "
                  f"H200 {steps * accum * (mean or config['modelled_device_s'])['H200'] / 3600:.0f} h on one GPU",
                  f"- of the H100 time, ops bound by FLOP/s take {config['h100_bound_s']['compute']:.1f} s and ops bound "
                  f"by memory bandwidth {config['h100_bound_s']['bandwidth']:.1f} s (eager PyTorch: every op reads and "
                  f"writes its tensors; fusing the normalisation and elementwise ops would cut the second)",
                  f"- host-side dispatch at {meta['host_overhead_us']:g} us per op: "
                  f"{config['ops'] * meta['host_overhead_us'] / 1e6:.1f} s per micro-step (overlaps GPU work when "
                  f"below it)", ""]
    lines += ["## Configurations", "",
              "| configuration | peak GiB | parameters | gradients | optimizer | activations | temporaries | "
              "host GiB | TFLOP | H100 s | H200 s | H100 mean s | fits |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c = r["categories_bytes"]
        peak = r["peak_memory_bytes"] / GIB
        fits = ", ".join(f"{g} GB" for g in (16, 40, 80, 141) if r["peak_memory_bytes"] <= g * 1e9) or "none"
        mean = r.get("expected_device_s") or {}
        lines.append(
            f"| {r['name']}: {r['label']} | **{peak:.2f}** | {_gib(c['parameters'])} | {_gib(c['gradients'])} | "
            f"{_gib(c['optimizer_state'])} | {_gib(c['activations'])} | {_gib(c['temporaries'])} | "
            f"{_gib(r['host_peak_bytes'])} | {r['flops'] / 1e12:.1f} | {r['modelled_device_s']['H100']:.1f} | "
            f"{r['modelled_device_s']['H200']:.1f} | {mean.get('H100', float('nan')):.1f} | {fits} |")
    if payload.get("not_measured"):
        lines += ["", "Not measured in this run (the sweep was stopped for time; `--resume` measures them): "
                  + "; ".join(payload["not_measured"])]
    if payload.get("zero"):
        lines += ["", "## DeepSpeed ZeRO per rank (the config, modelled from the JSON)", "",
                  "| DeepSpeed JSON | stage | GPUs | peak GiB per GPU | host GiB | parts |", "| --- | --- | --- | --- | --- | --- |"]
        for z in payload["zero"]:
            parts = ", ".join(f"{k} {_gib(v)}" for k, v in z["parts_bytes"].items())
            lines.append(f"| {z['json']} | {z['stage']} | {z['world_size']} | {z['peak_memory_gb']:.2f} | "
                         f"{_gib(z['host_bytes'])} | {parts} |")
    if payload.get("validation"):
        v = payload["validation"]
        lines += ["", "## Validation at tiny size (real CPU tensors)", "",
                  f"The same step of a small model of the same structure ({v['label']}), tracked on fake and on "
                  f"real CPU tensors:", "",
                  f"- peak: fake {v['fake']['peak_memory_bytes'] / 2**20:.1f} MiB, real "
                  f"{v['real']['peak_memory_bytes'] / 2**20:.1f} MiB (ratio {v['peak_ratio']:.3f})",
                  f"- growth above the weights and inputs: fake {v['growth_fake_bytes'] / 2**20:.1f} MiB, real "
                  f"{v['growth_real_bytes'] / 2**20:.1f} MiB"
                  + (f"; measured resident-set growth of the untracked step {v['rss_growth_bytes'] / 2**20:.1f} MiB "
                     f"({v['rss_kind']}; tracker / RSS {v['rss_ratio']:.2f})" if v.get("rss_growth_bytes") else ""),
                  f"- FLOPs: fake {v['fake']['flops']:,}, real {v['real']['flops']:,}"]
    if payload.get("g_skel"):
        g = payload["g_skel"]
        t, e = g["train_step"], g["encode"]
        lines += ["", f"## g_skel training at {g['latent_size']}x{g['latent_size']} (`drpose.g_skel_train`, fp32)", "",
                  f"- one step ({g['batch_views']} views, PoseScore reference op + AdamW): peak "
                  f"{t['peak_memory_bytes'] / GIB:.2f} GiB (activations {_gib(t['categories_bytes']['activations'])} "
                  f"GiB), {t['flops'] / 1e12:.2f} TFLOP, modelled H100 {1e3 * t['modelled_s']['H100']:.0f} ms, "
                  f"H200 {1e3 * t['modelled_s']['H200']:.0f} ms",
                  f"- one epoch over a DrPose15K-sized view set ({g['samples']:,} samples x 6 body views = "
                  f"{g['views_per_epoch']:,} views, {g['steps_per_epoch']} steps): H100 "
                  f"{g['epoch_modelled_s']['H100']:.0f} s, H200 {g['epoch_modelled_s']['H200']:.0f} s",
                  f"- VAE encoding of its {e['images']:,} views ({e['image_size']} px, {e['dtype']}, chunks of "
                  f"{e['chunk']}): peak {e['peak_memory_bytes'] / GIB:.1f} GiB per chunk "
                  f"({e['peak_memory_bytes'] / GIB / e['chunk']:.2f} GiB per image), "
                  f"{e['flops_per_image'] / 1e12:.2f} TFLOP per image, modelled H100 {e['modelled_s']['H100'] / 60:.0f} min, "
                  f"H200 {e['modelled_s']['H200'] / 60:.0f} min"]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> Path | None:
    """Peak memory by category for every configuration (stacked bars), and against K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    if not rows:
        return None
    colors = {"parameters": "#4c72b0", "gradients": "#dd8452", "optimizer_state": "#55a868",
              "activations": "#c44e52", "temporaries": "#8172b3", "inputs": "#937860"}
    by_k = sorted((r for r in rows if r["name"] == "config" or r["name"].startswith("config, K=")),
                  key=lambda r: r["settings"]["num_grad_steps"])
    figure, axes = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 1.2]})
    for ax, series, labels in ((axes[0], rows, [r["name"] for r in rows]),
                               (axes[1], by_k, [f"K={r['settings']['num_grad_steps']}" for r in by_k])):
        bottom = [0.0] * len(series)
        for category, color in colors.items():
            values = [r["categories_bytes"][category] / GIB for r in series]
            ax.bar(range(len(series)), values, bottom=bottom, color=color, label=category.replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, values)]
        for gb, style in ((16, ":"), (40, "--"), (80, "-")):
            ax.axhline(gb * 1e9 / GIB, color="#555", linestyle=style, linewidth=0.8)
            ax.text(len(series) - 0.5, gb * 1e9 / GIB, f" {gb} GB", va="bottom", ha="right", fontsize=7)
        ax.set_xticks(range(len(series)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("peak memory per GPU (GiB)")
        ax.set_yscale("symlog", linthresh=20)
    axes[0].set_title("dry run: memory at the peak by category (model figures, no GPU)", fontsize=9)
    axes[1].set_title("the config against K", fontsize=9)
    axes[0].legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# -------------------------------------------------------------------------------------------- command

ZERO_JSONS = ("ds_zero2.json", "ds_zero2_offload.json", "ds_zero3.json", "ds_zero3_offload.json")
VALIDATION_SETTINGS = dict(num_steps=3, lora_rank=4, lora_alpha=4.0)  # the config's step, shortened, at tiny size


def tiny_settings(base: StepSettings) -> StepSettings:
    return replace(base, **VALIDATION_SETTINGS)


def run(config_path: Path, out: Path, sweep: str = "none", g_skel: bool = False, tiny: bool = False,
        exact: bool = False, validation: bool = True, resume: bool = False, measured_only: bool = False,
        overrides: list[str] = (), progress: Callable[[str], None] = print,
        meta_extra: dict | None = None) -> list[Path]:
    """The ``dryrun`` command of ``benchmarks/run.py``: measure, then write JSON, Markdown and a PNG.
    ``resume`` reuses the configurations already in ``out``; ``measured_only`` also measures no new ones
    (the report lists those left out)."""
    from drpose.training.config import load_config

    config = load_config(config_path, list(overrides))
    settings = StepSettings.from_config(config)
    if tiny:
        arch = tiny_architecture()
    else:
        arch = pshuman_architecture()
        if config.model.pipeline and Path(config.model.pipeline).is_dir():
            arch = architecture_from_folder(Path(config.model.pipeline), arch)
    stem = f"dryrun_{config_path.stem}" + ("_tiny" if tiny else "")
    json_path = out / f"{stem}.json"
    previous = {}
    if (resume or measured_only) and json_path.is_file():
        old = json.loads(json_path.read_text())
        previous = {json.dumps(r["settings"], sort_keys=True): r for r in old.get("rows", [])
                    if r.get("architecture") == arch.name and r.get("exact") == exact}
    rows, not_measured = [], []
    for name, row_settings in sweep_settings(settings, sweep):
        key = json.dumps(asdict(row_settings), sort_keys=True)
        if key not in previous and measured_only:
            not_measured.append(f"{name}: {row_settings.label()}")
            continue
        if key in previous:
            progress(f"dryrun {name}: reused from {json_path.name}")
            figures = previous[key]
        else:
            progress(f"dryrun {name}: {row_settings.label()}")
            figures = measure_step(arch, row_settings, fake=True, exact=exact)
            figures["exact"] = exact
            progress(f"dryrun {name}: peak {figures['peak_memory_bytes'] / GIB:.2f} GiB, "
                     f"{figures['flops'] / 1e12:.1f} TFLOP, H100 {figures['modelled_device_s']['H100']:.1f} s "
                     f"({figures['wall_s']:.0f} s here)")
        figures["name"] = name
        rows.append(figures)
        _write_partial(json_path, rows)
    if not rows or rows[0]["name"] != "config":
        raise SystemExit(f"{json_path}: the config's own row was not measured yet; run without --measured-only")
    config_row = rows[0]
    zero = []
    for name in ZERO_JSONS:
        path = ROOT / "configs" / name
        if path.is_file():
            ds = json.loads(path.read_text())
            for world in (1, 2, 8):
                zero.append({"json": name, **zero_per_rank(config_row, ds, world)})
    payload = {"meta": {
        "device": "dry run (no GPU), modelled H100/H200",
        "kind": "dry run: fake tensors on the CPU; memory tracked, FLOPs counted, time modelled (no GPU)",
        "config": _shown(config_path), "overrides": list(overrides),
        "architecture": {"name": arch.name, "source": arch.source, "latent_size": arch.latent_size,
                         "num_views": arch.num_views, "image_size": arch.image_size},
        "parameter_bytes": config_row["parameter_bytes"], "lora_parameters": config_row["lora_parameters"],
        "devices": {k: asdict(v) for k, v in DEVICES.items()}, "compute_efficiency": COMPUTE_EFFICIENCY,
        "bandwidth_efficiency": BANDWIDTH_EFFICIENCY, "host_overhead_us": HOST_OVERHEAD_US,
        "precision": settings.dtype,
        "autocast": "bf16 with CUDA's policy (normalisation layers and softmax in fp32)",
        "exact": exact, **(meta_extra or {})},
        "rows": rows, "not_measured": not_measured, "zero": zero}
    if validation:
        tiny_arch = tiny_architecture()
        v_settings = tiny_settings(settings)
        progress(f"dryrun validation at tiny size: {v_settings.label()}")
        payload["validation"] = {"label": v_settings.label(), **validate(tiny_arch, v_settings)}
    if g_skel:
        progress(f"dryrun g_skel at {arch.latent_size}x{arch.latent_size}")
        payload["g_skel"] = measure_g_skel(arch)
    out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path = out / f"{stem}.md"
    md_path.write_text(markdown(payload))
    written = [json_path, md_path]
    png = plot(payload, out / f"{stem}_memory.png")
    return written + ([png] if png else [])


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _write_partial(path: Path, rows: list[dict]) -> None:
    """Keep finished rows on disk while a long sweep runs (``--resume`` reuses them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.is_file() else {}
    done = {json.dumps(r["settings"], sort_keys=True) for r in rows}
    kept = [r for r in existing.get("rows", []) if json.dumps(r["settings"], sort_keys=True) not in done]
    existing["rows"] = rows + kept
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(existing, indent=2, default=str) + "\n")
    tmp.replace(path)
