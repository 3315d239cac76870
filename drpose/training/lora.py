"""LoRA adapters on the multi-view UNet (peft through diffusers), and their export in diffusers' format.

Only the adapters train (fp32); the base weights stay frozen. The frozen model for the KL term is the
same UNet with its adapters switched off, so no second copy is held. ``export_lora`` writes
``pytorch_lora_weights.safetensors`` that diffusers' ``load_lora_weights`` reads; under ZeRO-3 the
adapter parameters are gathered first (partitioned parameters would otherwise export as empty
``torch.Size([0])`` tensors).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from drpose.models.pshuman_unet import UNetMV2DConditionModel

from .config import LoraSettings

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def add_lora(unet: UNetMV2DConditionModel, settings: LoraSettings) -> list[torch.nn.Parameter]:
    """Freeze ``unet`` and add trainable fp32 LoRA adapters to it; returns the adapter parameters."""
    unet.requires_grad_(False)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), init_lora_weights="gaussian")
    try:
        unet.add_adapter(config)
    except ValueError as error:
        raise ValueError(f"lora.target_modules {settings.target_modules} do not fit the UNet: {error}") from error
    params = [p for name, p in unet.named_parameters() if "lora_" in name]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


@contextlib.contextmanager
def adapters_disabled(unet: UNetMV2DConditionModel):
    """The frozen initial model: the same UNet with its LoRA adapters switched off."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def lora_state_dict(unet: UNetMV2DConditionModel) -> dict[str, torch.Tensor]:
    """Adapter weights keyed ``<module>.lora_A/B.weight`` (peft's names, which diffusers' loader reads).

    Not passed through ``convert_state_dict_to_diffusers``: that rewrites attention keys to the legacy
    ``lora.down/up`` names but leaves other modules (convolutions) in peft's, and the loader then
    drops the attention adapters of such a mixed file."""
    state = get_peft_model_state_dict(unet)
    return {k: v.detach().float().cpu().clone() for k, v in state.items()}


def local_tensor(param: torch.nn.Parameter) -> torch.Tensor:
    """What this rank holds of ``param``: its ZeRO-3 partition (``ds_tensor``), or the parameter itself."""
    return getattr(param, "ds_tensor", param)


def _gathered(params: list[torch.nn.Parameter]):
    """Gather ZeRO-3 partitioned parameters for reading; a no-op for ordinary parameters."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def export_lora(unet: UNetMV2DConditionModel, folder: str | Path, is_main_process: bool = True) -> Path:
    """Write the adapters in diffusers' LoRA format; call on every rank (gathering is collective)."""
    params = [p for name, p in unet.named_parameters() if "lora_" in name]
    with _gathered(params):
        state = lora_state_dict(unet)
    # rank and alpha travel with the weights, so the loader applies the same scale (alpha / rank)
    metadata = unet.peft_config["default"].to_dict()
    if isinstance(metadata.get("target_modules"), (list, set)):  # peft keeps a set: its order varies between runs
        metadata["target_modules"] = sorted(metadata["target_modules"])
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"LoRA export found empty tensors (partitioned and not gathered): {empty[:3]}")
    folder = Path(folder)
    if is_main_process:
        StableDiffusionLoraLoaderMixin.save_lora_weights(folder, unet_lora_layers=state, safe_serialization=True,
                                                         unet_lora_adapter_metadata=metadata)
    return folder / LORA_WEIGHTS


class UNetLoraHost(StableDiffusionLoraLoaderMixin):
    """The smallest object diffusers' ``load_lora_weights`` loads into: it holds a UNet and no text encoder."""

    unet_name = "unet"
    text_encoder_name = "text_encoder"

    hf_device_map = None  # no accelerate device map: nothing to undo before loading

    def __init__(self, unet):
        self.unet = unet
        self.text_encoder = None

    @property
    def components(self) -> dict:
        return {"unet": self.unet}


def load_lora(unet: UNetMV2DConditionModel, folder: str | Path, adapter_name: str = "drpose") -> None:
    """Load exported adapters into ``unet`` with diffusers' ``load_lora_weights``."""
    path = Path(folder)
    if not (path / LORA_WEIGHTS).exists():
        raise FileNotFoundError(f"no {LORA_WEIGHTS} in {path}; export one with the trainer (output_dir/lora)")
    UNetLoraHost(unet).load_lora_weights(str(path), adapter_name=adapter_name)
