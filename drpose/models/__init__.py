"""Models: PSHuman's multi-view UNet and pipeline folder, g_skel, the noise schedule and sampling."""

from .pipeline import Conditioning, MultiViewPipeline
from .pshuman_unet import UNetMV2DConditionModel, convert_sd_unet, load_multiview_unet, pshuman_unet_config

__all__ = ["Conditioning", "MultiViewPipeline", "UNetMV2DConditionModel", "convert_sd_unet",
           "load_multiview_unet", "pshuman_unet_config"]
