"""One training step (drpose.training.step.train_step) in fp32 and bf16, on bundles of two latent sizes."""

from __future__ import annotations

import pytest
import torch

from drpose.models.bundle import ModelBundle
from drpose.models.sampling import DDIMSampler, SamplingPlan
from drpose.reward import PoseReward
from drpose.training.config import LoraSettings
from drpose.training.data import sample_noise
from drpose.training.lora import add_lora
from drpose.training.step import StepBatch, StepModel, train_step
from pshuman_fixtures import write_bundle


@pytest.fixture(scope="module")
def bundle_24(tmp_path_factory):
    return write_bundle(tmp_path_factory.mktemp("bundle24"), latent_size=24)


def step_once(bundle: ModelBundle, dtype: torch.dtype, guidance: float = 1.0, groups_per_call: int = 0):
    unet = bundle.pipeline.unet
    params = add_lora(unet, LoraSettings(rank=4, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    sampler = DDIMSampler(bundle.pipeline.scheduler, 3, bundle.num_views, guidance, groups_per_call=groups_per_call)
    model = StepModel(bundle.pipeline, unet, unet, PoseReward.from_bundle(bundle), sampler, kl_weight=0.01, seed=0,
                      dtype=dtype)
    size = bundle.image_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    joints = torch.randn(2, 22, 3, generator=torch.Generator().manual_seed(1)) * 0.3
    noise = sample_noise((2, bundle.num_views, *bundle.latent_shape), 0, 0, [0, 1]).to(dtype)
    result = train_step(model, StepBatch(images, joints, noise, [0, 1], 0), SamplingPlan(3, (1, 2), True),
                        backward=torch.Tensor.backward)
    return result, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_step_on_a_24x24_bundle_trains_the_adapters_in_fp32(bundle_24, dtype):
    bundle = ModelBundle.load(*bundle_24, dtype=dtype)
    assert bundle.latent_shape == (4, 24, 24) and bundle.image_size == 48
    assert all(p.dtype == dtype for p in bundle.pipeline.unet.parameters())
    result, params = step_once(bundle, dtype, guidance=2.0, groups_per_call=1)
    assert torch.isfinite(result.loss) and result.reward.shape == (2,)
    assert all(p.dtype == torch.float32 for p in params), "LoRA weights stay fp32"
    assert sum(p.grad.abs().sum().item() for p in params if p.grad is not None) > 0


def test_bf16_step_of_the_tiny_world():
    result, params = step_once(ModelBundle.load(dtype=torch.bfloat16), torch.bfloat16)
    assert torch.isfinite(result.loss) and (result.reward <= 0).all()
    assert sum(p.grad.abs().sum().item() for p in params if p.grad is not None) > 0


def test_a_bundle_whose_parts_do_not_fit_is_refused(bundle_24):
    from drpose.models.g_skel import GSkel, GSkelConfig

    pipeline_dir, g_skel_dir = bundle_24
    bundle = ModelBundle.load(pipeline_dir, g_skel_dir)
    bundle.g_skel = GSkel(GSkelConfig(in_channels=8, latent_size=96))
    with pytest.raises(ValueError, match="trained on 96x96 latents; this pipeline's UNet makes 24x24"):
        bundle.check()
    bundle.g_skel = GSkel(GSkelConfig(in_channels=16))
    with pytest.raises(ValueError, match="takes 16 input channels"):
        bundle.check()
    assert bundle.pipeline.prediction_type == "epsilon"  # read from the folder's scheduler
