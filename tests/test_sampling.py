"""DDIM sampling with gradient policies: where gradients flow, and what checkpointing costs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from drpose.memory import exact_cpu_env
from drpose.models.diffusion import make_scheduler
from drpose.models.pipeline import Conditioning
from drpose.models.sampling import DDIMSampler, GradientPolicy, SamplingPlan, make_plan
from pshuman_fixtures import tiny_pipeline

VIEWS = 7


def conditioning(objects: int, side: int = 4, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(objects, VIEWS, 4, side, side, generator=g), torch.randn(objects, 16, generator=g))


class ScaledDenoiser(torch.nn.Module):
    """eps = p * x: its Jacobian w.r.t. the input is p, so chaining through it is visible in gradients."""

    def __init__(self, value: float = 0.3):
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor(value))
        self.calls = []

    def forward(self, x, t, cond, keep):
        self.calls.append({"grad_enabled": torch.is_grad_enabled(), "input_requires_grad": x.requires_grad,
                           "x": x.detach().clone()})
        return self.p * x


def rollout(policy_plan, model, steps=6, checkpointing=False, offload=False, seed=0, guidance=1.0):
    sampler = DDIMSampler(make_scheduler(), steps, VIEWS, guidance_scale=guidance, checkpointing=checkpointing,
                          offload_activations=offload)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(2 * VIEWS, 4, 4, 4, generator=gen)
    return sampler, sampler.sample(model, conditioning(1), noise, policy_plan)


# ------------------------------------------------------------------------------------------------ plans


@pytest.mark.parametrize("seed", range(5))
def test_drtune_plan_stops_early_and_spreads_k_steps(seed):
    gen = torch.Generator().manual_seed(seed)
    plan = make_plan(GradientPolicy("drtune", num_grad_steps=2, early_stop_max=8), 20, gen)
    assert 12 <= plan.num_steps_run <= 20
    assert len(plan.grad_steps) == 2 and plan.detach_inputs
    assert all(0 <= s < plan.num_steps_run for s in plan.grad_steps)
    assert plan.grad_steps[1] - plan.grad_steps[0] == plan.num_steps_run // 2


def test_plans_are_reproducible_by_generator_seed_and_vary_across_seeds():
    policy = GradientPolicy("drtune", 2, 8)
    draw = lambda seed: [make_plan(policy, 20, torch.Generator().manual_seed(seed)) for _ in range(1)]
    assert draw(3) == draw(3)
    assert len({make_plan(policy, 20, torch.Generator().manual_seed(s)) for s in range(20)}) > 5


def test_draft_and_alignprop_plans_take_the_last_steps():
    assert make_plan(GradientPolicy("draft", 3), 10) == SamplingPlan(10, (7, 8, 9), False)
    gen = torch.Generator().manual_seed(0)
    lengths = {len(make_plan(GradientPolicy("alignprop", 4), 10, gen).grad_steps) for _ in range(60)}
    assert lengths == {1, 2, 3, 4}
    assert make_plan(GradientPolicy("none"), 10) == SamplingPlan(10, (), False)


def test_bad_policies_are_rejected():
    with pytest.raises(ValueError, match="gradient policy must be one of"):
        GradientPolicy("reinforce")
    with pytest.raises(ValueError, match="num_grad_steps"):
        GradientPolicy("drtune", num_grad_steps=0)


# ------------------------------------------------------------------------------------ gradient placement


@pytest.mark.parametrize("policy, detached", [("drtune", True), ("draft", False)])
def test_only_planned_steps_carry_gradients(policy, detached):
    plan = SamplingPlan(5, (1, 3) if policy == "drtune" else (3, 4), detached)
    model = ScaledDenoiser()
    _, result = rollout(plan, model)
    grad_calls = [i for i, call in enumerate(model.calls) if call["grad_enabled"]]
    assert grad_calls == list(plan.grad_steps)
    assert [s.carries_grad for s in result.trace] == [i in plan.grad_steps for i in range(5)]
    if detached:
        assert not any(call["input_requires_grad"] for call in model.calls)
    else:  # DRaFT: the second gradient step's input depends on the first step's output
        assert model.calls[4]["input_requires_grad"] and not model.calls[3]["input_requires_grad"]


def linear_chain_gradient(sampler, plan, inputs) -> float:
    """d sum(x0) / dp for eps = p * x when gradients flow only through the DDIM updates' linear terms:
    x_{i+1} = A_i x_i + B_i eps_i, x0 = (x_S - sqrt(1 - a_S) eps_S) / sqrt(a_S), with d eps_j / dp = x_j."""
    a = [float(sampler.scheduler.alphas_cumprod[t]) for t in sampler.timesteps]
    last = plan.num_steps_run - 1
    total = 0.0
    for j in plan.grad_steps:
        if j == last:
            coef = -math.sqrt(1 - a[j]) / math.sqrt(a[j])
        else:
            coef = math.sqrt(1 - a[j + 1]) - math.sqrt(a[j + 1]) * math.sqrt(1 - a[j]) / math.sqrt(a[j])
            for k in range(j + 1, last):
                coef *= math.sqrt(a[k + 1]) / math.sqrt(a[k])
            coef /= math.sqrt(a[last])
        total += coef * inputs[j].sum().item()
    return total


def test_drtune_gradient_does_not_chain_through_unet_jacobians():
    plan = SamplingPlan(5, (1, 3), True)
    model = ScaledDenoiser()
    sampler, result = rollout(plan, model)
    (grad,) = torch.autograd.grad(result.x0.sum(), model.p)
    expected = linear_chain_gradient(sampler, plan, [c["x"] for c in model.calls])
    assert grad.item() == pytest.approx(expected, rel=1e-5)

    chained = ScaledDenoiser()
    _, result = rollout(SamplingPlan(5, (1, 3), False), chained)
    (full,) = torch.autograd.grad(result.x0.sum(), chained.p)
    assert abs(full.item() - expected) > 1e-2 * abs(expected), "full backprop differs: the stop-gradient matters"


@pytest.fixture(scope="module")
def pipeline():
    return tiny_pipeline(latent_size=6, seed=1)


def sampled_gradients(pipeline, plan, objects, guidance, settings):
    """x0 and the UNet's gradient of mean(x0^2) for each (checkpointing, offload, groups_per_call) setting."""
    unet = pipeline.unet.train().requires_grad_(True)
    cond = conditioning(objects, side=6, seed=1)
    samples, grads = [], []
    for checkpointing, offload, groups in settings:
        unet.zero_grad(set_to_none=True)
        sampler = DDIMSampler(make_scheduler(), 4, VIEWS, guidance_scale=guidance, checkpointing=checkpointing,
                              offload_activations=offload, groups_per_call=groups)
        noise = torch.randn(2 * objects * VIEWS, 4, 6, 6, generator=torch.Generator().manual_seed(0))
        result = sampler.sample(pipeline.predict, cond, noise, plan)
        result.x0.square().mean().backward()
        samples.append(result.x0.detach())
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None]))
    unet.eval().requires_grad_(False)
    assert grads[0].abs().sum() > 0
    for other, sample in zip(grads[1:], samples[1:]):  # float32 sums in another order: relative to the largest
        assert (sample - samples[0]).abs().max() <= 1e-5 * samples[0].abs().max()
        assert (other - grads[0]).abs().max() <= 1e-4 * grads[0].abs().max()


def test_bf16_sampling_keeps_the_gradient_of_low_noise_steps():
    """PSHuman's schedule ends at t = 1, where alpha_bar = 0.998 is 1 in bf16: the DDIM update must not drop the
    last prediction (nor its gradient). bf16 values and gradients follow fp32's within bf16 rounding."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    noise = torch.randn(2 * VIEWS, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = ScaledDenoiser(0.3).to(dtype)
        sampler = DDIMSampler(scheduler, 4, VIEWS)
        assert sampler.timesteps.tolist()[-1] == 1
        x0 = sampler.sample(model, conditioning(1), noise.to(dtype), SamplingPlan(4, (3,), True)).x0
        assert x0.dtype == dtype
        x0.float().sum().backward()
        results[dtype] = x0.float(), model.p.grad.float()
    (x32, g32), (x16, g16) = results[torch.float32], results[torch.bfloat16]
    assert g32.abs() > 1
    torch.testing.assert_close(g16, g32, rtol=2e-2, atol=0)
    torch.testing.assert_close(x16, x32, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("plan", [SamplingPlan(4, (1, 3), True), SamplingPlan(4, (2, 3), False)], ids=["drtune", "draft"])
def test_checkpointed_and_offloaded_sampling_give_identical_gradients(pipeline, plan):
    sampled_gradients(pipeline, plan, 1, 1.0, [(False, False, 0), (True, False, 0), (True, True, 0)])


def test_calls_chunked_by_group_give_identical_gradients(pipeline):
    """With guidance, 2 objects are 4 groups; one group per checkpointed call changes nothing but memory."""
    sampled_gradients(pipeline, SamplingPlan(3, (1, 2), True), 2, 2.5, [(True, False, 0), (True, False, 1)])


def test_group_chunks_cover_every_object_and_guidance_half():
    sampler = DDIMSampler(make_scheduler(), 2, VIEWS, guidance_scale=3.0, groups_per_call=3)
    calls = sampler.calls(objects=2)
    assert calls == [([0, 1, 0], [0, 0, 1]), ([1], [1])]
    assert DDIMSampler(make_scheduler(), 2, VIEWS).calls(objects=2) == [([0, 1], [1, 1])]


def test_kl_term_is_zero_against_itself_and_positive_against_another_model():
    plan = SamplingPlan(4, (1, 3), True)
    model = ScaledDenoiser(0.3)
    sampler = DDIMSampler(make_scheduler(), 4, VIEWS)
    noise = torch.randn(2 * VIEWS, 4, 4, 4)
    same = sampler.sample(model, conditioning(1), noise, plan, frozen_model=model)
    assert len(same.frozen_predictions) == 2 and same.kl().item() == 0.0
    other = sampler.sample(model, conditioning(1), noise, plan, frozen_model=ScaledDenoiser(0.5))
    kl = other.kl()
    assert kl.item() > 0 and kl.requires_grad and not other.frozen_predictions[0].requires_grad


def test_classifier_free_guidance_extrapolates_from_the_unconditional_prediction():
    class KeepEcho(torch.nn.Module):
        """Predicts, for every row, its group's keep flag plus its object's index."""

        def forward(self, x, t, cond, keep):
            grid = x.reshape(2, len(cond), VIEWS, *x.shape[1:])
            value = keep.float() + cond.class_labels[:, 0]
            return (grid * 0 + value.view(1, -1, 1, 1, 1, 1)).reshape(x.shape)

    cond = Conditioning(torch.zeros(2, VIEWS, 1, 2, 2), torch.tensor([[10.0], [20.0]]))
    for groups in (0, 1, 3):
        sampler = DDIMSampler(make_scheduler(), 2, VIEWS, guidance_scale=3.0, groups_per_call=groups)
        guided = sampler.predict(KeepEcho(), torch.zeros(2 * 2 * VIEWS, 1, 2, 2), torch.tensor(5), cond)
        grid = guided.reshape(2, 2, VIEWS, 1, 2, 2)
        assert torch.all(grid[:, 0] == 13.0) and torch.all(grid[:, 1] == 23.0)  # u + 3 * (c - u), c = u + 1


# ------------------------------------------------------------------------------------------------ memory

MEMORY_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, "tests")
from drpose.memory import peak_memory
from drpose.models.diffusion import make_scheduler
from drpose.models.pipeline import Conditioning
from drpose.models.sampling import DDIMSampler, SamplingPlan
from drpose.models.pshuman_unet import UNetMV2DConditionModel
from drpose.world.build import tiny_unet_config
from pshuman_fixtures import tiny_pipeline
torch.manual_seed(0)
pipeline = tiny_pipeline(latent_size=18)
pipeline.unet = UNetMV2DConditionModel(**tiny_unet_config(18))
pipeline.prompt_embeds = torch.randn(2, 7, 77, 64)
noise = torch.randn(28, 4, 18, 18)
cond = Conditioning(torch.randn(2, 7, 4, 18, 18), torch.randn(2, 32))
figures = {}
for checkpointing in (True, False):
    sampler = DDIMSampler(make_scheduler(), 5, 7, checkpointing=checkpointing)
    for k in (1, 4):
        plan = SamplingPlan(5, tuple(range(5 - k, 5)), False)
        def step():
            sampler.sample(pipeline.predict, cond, noise, plan).x0.square().mean().backward()
            pipeline.unet.zero_grad(set_to_none=True)
        step()
        figures[f"checkpointing={checkpointing} K={k}"] = peak_memory(step, "cpu")[0]
print(json.dumps(figures))
"""


@pytest.mark.slow
def test_peak_memory_of_a_training_backward_is_flat_in_k_with_checkpointing():
    """Peak RSS of sample-with-gradients + backward (2 objects x 14 images, the tiny world's UNet), K = 1 and 4."""
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True,
                         env=exact_cpu_env(), timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    mib = {k: v / 2**20 for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    print("peak extra memory (MiB):", {k: round(v, 1) for k, v in mib.items()})
    flat = [mib[f"checkpointing=True K={k}"] for k in (1, 4)]
    plain = [mib[f"checkpointing=False K={k}"] for k in (1, 4)]
    assert flat[1] <= 1.15 * flat[0], f"checkpointed peak grows with K: {flat}"
    assert plain[1] >= 2.5 * plain[0], f"without checkpointing the peak should grow with K: {plain}"
