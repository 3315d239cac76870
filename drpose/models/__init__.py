"""Models: PSHuman's multi-view UNet and pipeline folder, g_skel, the noise schedule and sampling.

The names below load on first use, so that importing a light submodule (``drpose.models.rig``: the camera rig the
reconstruction and the renderer read) does not import diffusers: the reconstruction's worker processes start in
a third of the time."""

import importlib

_EXPORTS = {"Conditioning": "pipeline", "MultiViewPipeline": "pipeline", "UNetMV2DConditionModel": "pshuman_unet",
            "convert_sd_unet": "pshuman_unet", "load_multiview_unet": "pshuman_unet",
            "pshuman_unet_config": "pshuman_unet"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
