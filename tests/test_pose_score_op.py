"""The fused PoseScore op against its PyTorch reference, its invariants, and its input errors.

On machines without CUDA the "triton" backend runs in Triton's interpreter (see conftest.py); every
kernel output is poisoned with NaN before launch, so an element the kernel forgets to write fails.
Note: the interpreter truncates fp32 -> bf16 on store where GPUs round to nearest, which the bf16
tolerance (1e-2, norm-wise) covers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import drpose_kernels as dk
from assertions import assert_rel_close
from drpose_kernels import pose_score_op as fused
from drpose_kernels import reference as ref

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# Segment/sigma gradients are sums of signed per-pixel terms that partly cancel; the reference and the
# kernel sum them in different orders, so their agreement is bounded by that cancellation.
TARGET_GRAD_TOL = 1e-4
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def nan_filled(shape, device, dtype):
        return torch.full(tuple(shape), float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(fused, "_new_output", nan_filled)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------------
# Random cases


@dataclass
class Case:
    n: int
    c: int
    h: int
    w: int
    dtype: torch.dtype
    placement: str
    zero_length_fraction: float
    as_joints: bool
    sigma_kind: str
    sigma_scale: float
    layout: str
    logit_scale: float
    seed: int


@st.composite
def cases(draw, dtypes=DTYPES, max_rows=4, sizes=(1, 2, 3, 5, 8, 13, 32, 41), widths=(1, 3, 7, 16, 33, 47)):
    return Case(
        n=draw(st.integers(1, max_rows)),
        c=draw(st.integers(1, 5)),
        h=draw(st.sampled_from(sizes)),
        w=draw(st.sampled_from(widths)),
        dtype=draw(st.sampled_from(dtypes)),
        placement=draw(st.sampled_from(["inside", "edge", "outside", "mixed"])),
        zero_length_fraction=draw(st.sampled_from([0.0, 0.5, 1.0])),
        as_joints=draw(st.booleans()),
        sigma_kind=draw(st.sampled_from(["float", "tensor"])),
        sigma_scale=draw(st.sampled_from([0.3, 1.0, 2.5, 8.0])),
        layout=draw(st.sampled_from(["contiguous", "channel_slice", "transposed", "batch_slice", "channels_last"])),
        logit_scale=draw(st.sampled_from([0.1, 3.0, 12.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_logits(case: Case, gen: torch.Generator) -> torch.Tensor:
    n, c, h, w = case.n, case.c, case.h, case.w

    def randn(*shape):
        return torch.randn(*shape, generator=gen) * case.logit_scale - 2.0

    if case.layout == "contiguous":
        base = randn(n, c, h, w)
    elif case.layout == "channel_slice":
        base = randn(n, 2 * c, h, w)[:, ::2]
    elif case.layout == "transposed":
        base = randn(n, c, w, h).transpose(-1, -2)
    elif case.layout == "batch_slice":
        base = randn(2 * n, c, h, w)[1::2]
    else:  # channels_last
        base = randn(n, h, w, c).permute(0, 3, 1, 2)
    return base.to(case.dtype).to(device())


def make_points(placement: str, shape, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """(..., 2) points (x, y) inside the map, on its edges, far outside, or a mix of the three."""
    size = torch.tensor([w, h], dtype=torch.float32)
    inside = torch.rand(*shape, 2, generator=gen) * (size - 1)
    edges = torch.tensor([-0.5, 0.0])
    edge_choice = torch.randint(0, 2, (*shape, 2), generator=gen)
    on_edge = torch.where(edge_choice == 0, edges[0].expand(*shape, 2), size - 0.5)
    along = torch.rand(*shape, 1, generator=gen) > 0.5
    edge = torch.where(torch.cat([along, ~along], -1), on_edge, inside)
    far = (torch.rand(*shape, 2, generator=gen) * 2 + 1) * 3 * size * torch.where(
        torch.rand(*shape, 2, generator=gen) > 0.5, 1.0, -1.0
    )
    options = {"inside": inside, "edge": edge, "outside": far}
    if placement in options:
        return options[placement]
    pick = torch.randint(0, 3, (*shape, 1), generator=gen)
    return torch.where(pick == 0, inside, torch.where(pick == 1, edge, far))


def make_segments(case: Case, gen: torch.Generator) -> torch.Tensor:
    a = make_points(case.placement, (case.n, case.c), case.h, case.w, gen)
    if case.as_joints:
        return a.to(device())
    b = make_points(case.placement, (case.n, case.c), case.h, case.w, gen)
    zero_length = torch.rand(case.n, case.c, 1, generator=gen) < case.zero_length_fraction
    b = torch.where(zero_length, a, b)
    return torch.stack((a, b), dim=2).to(device())


def make_sigma(case: Case, gen: torch.Generator):
    if case.sigma_kind == "float":
        return case.sigma_scale
    return ((torch.rand(case.c, generator=gen) + 0.5) * case.sigma_scale).to(device())


def values_and_grads(backend, logits, segments, sigma, upstream, wrt_targets: bool):
    logits = logits.detach().clone().requires_grad_(True)
    inputs = [logits]
    if wrt_targets:
        segments = segments.detach().clone().requires_grad_(True)
        inputs.append(segments)
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.detach().clone().requires_grad_(True)
            inputs.append(sigma)
    out = dk.heatmap_divergence(logits, segments, sigma, backend=backend)
    grads = torch.autograd.grad(out, inputs, upstream)
    return out.detach(), grads


# --------------------------------------------------------------------------------------------------
# Fused vs reference


@settings(max_examples=60)
@given(case=cases())
def test_fused_matches_reference_values_and_logit_gradients(case):
    gen = torch.Generator().manual_seed(case.seed)
    logits, segments, sigma = make_logits(case, gen), make_segments(case, gen), make_sigma(case, gen)
    upstream = torch.randn(case.n, case.c, generator=gen).to(device())

    out_fused, (grad_fused,) = values_and_grads("triton", logits, segments, sigma, upstream, wrt_targets=False)
    out_ref, (grad_ref,) = values_and_grads("reference", logits, segments, sigma, upstream, wrt_targets=False)

    assert out_fused.dtype == torch.float32 and out_fused.shape == (case.n, case.c)
    assert grad_fused.dtype == case.dtype and grad_fused.shape == logits.shape
    assert_rel_close(out_fused, out_ref, TOL[case.dtype], f"values {case}")
    assert_rel_close(grad_fused, grad_ref, TOL[case.dtype], f"logit gradients {case}")


@settings(max_examples=40)
@given(case=cases(dtypes=[torch.float32]))
def test_fused_matches_reference_segment_and_sigma_gradients(case):
    gen = torch.Generator().manual_seed(case.seed)
    logits, segments, sigma = make_logits(case, gen), make_segments(case, gen), make_sigma(case, gen)
    upstream = torch.randn(case.n, case.c, generator=gen).to(device())

    _, grads_fused = values_and_grads("triton", logits, segments, sigma, upstream, wrt_targets=True)
    _, grads_ref = values_and_grads("reference", logits, segments, sigma, upstream, wrt_targets=True)

    assert_rel_close(grads_fused[0], grads_ref[0], TOL[torch.float32], f"logit gradients {case}")
    assert_rel_close(grads_fused[1], grads_ref[1], TARGET_GRAD_TOL, f"segment gradients {case}")
    if len(grads_ref) == 3:
        assert_rel_close(grads_fused[2], grads_ref[2], TARGET_GRAD_TOL, f"sigma gradients {case}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 1, 37), (2, 2, 33, 47), (1, 2, 70, 64)])
def test_fused_matches_reference_on_fixed_shapes(shape, dtype):
    """Anchors independent of hypothesis: a 1x1 map, a single row, and maps of 2 and 5 pixel blocks."""
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(sum(shape))
    logits = (torch.randn(shape, generator=gen) * 4 - 3).to(dtype).to(device())
    segments = (torch.rand(n, c, 2, 2, generator=gen) * torch.tensor([w + 4.0, h + 4.0]) - 2).to(device())
    upstream = torch.randn(n, c, generator=gen).to(device())
    out_fused, (grad_fused,) = values_and_grads("triton", logits, segments, 1.5, upstream, wrt_targets=False)
    out_ref, (grad_ref,) = values_and_grads("reference", logits, segments, 1.5, upstream, wrt_targets=False)
    assert_rel_close(out_fused, out_ref, TOL[dtype], "values")
    assert_rel_close(grad_fused, grad_ref, TOL[dtype], "logit gradients")


@settings(max_examples=30)
@given(case=cases(max_rows=3), num_views=st.sampled_from([1, 2, 3]), zero_sample=st.booleans())
def test_fused_pose_score_matches_reference(case, num_views, zero_sample):
    case.n *= num_views
    gen = torch.Generator().manual_seed(case.seed)
    logits, segments, sigma = make_logits(case, gen), make_segments(case, gen), make_sigma(case, gen)
    weights = (torch.rand(case.n, case.c, generator=gen) * (torch.rand(case.n, case.c, generator=gen) > 0.3)).to(device())
    if zero_sample:
        weights[:num_views] = 0.0
    b = case.n // num_views
    upstream = torch.randn(b, generator=gen).to(device())
    results = {}
    for backend in ("triton", "reference"):
        x = logits.detach().clone().requires_grad_(True)
        score = dk.pose_score(x, segments, weights, sigma, num_views, backend=backend)
        (grad,) = torch.autograd.grad(score, x, upstream)
        results[backend] = (score.detach(), grad)
    assert results["triton"][0].shape == (b,)
    assert_rel_close(results["triton"][0], results["reference"][0], TOL[case.dtype], f"scores {case}")
    assert_rel_close(results["triton"][1], results["reference"][1], TOL[case.dtype], f"gradients {case}")
    if zero_sample:
        assert results["triton"][0][0].item() == 0.0
        assert torch.all(results["triton"][1][:num_views] == 0)


@pytest.mark.parametrize(
    "shape, strides",
    [
        ((2, 1, 4, 4), (2**31 + 7, 16, 4, 1)),  # rows 2**31 elements apart, flat maps
        ((2, 1, 4, 4), (2**31 + 7, 16, 1, 4)),  # the same with transposed (non-flat) maps
        ((1, 1, 4, 2), (64, 64, 2**30 + 1, 1)),  # pixel rows 2**30 apart: row * stride_h passes 2**31
    ],
)
def test_64bit_offsets(shape, strides):
    """Elements more than 2**31 apart are addressed correctly (offsets computed in int64).

    The logits are a view into a multi-GB storage of which only the few elements under the view are
    ever touched (pages are mapped lazily), so the test costs almost no memory. In Triton's interpreter
    offsets are numpy int64 anyway; on a GPU this exercises the kernels' int64 casts.
    """
    span = sum((size - 1) * stride for size, stride in zip(shape, strides)) + 1
    storage = torch.empty(span, dtype=torch.float16, device=device())
    logits = storage.as_strided(shape, strides)
    gen = torch.Generator().manual_seed(0)
    logits.copy_(torch.randn(shape, generator=gen).to(torch.float16))
    n, c, h, w = shape
    segments = (torch.rand(n, c, 2, 2, generator=gen) * torch.tensor([w, h])).to(device())
    upstream = torch.randn(n, c, generator=gen).to(device())
    out_fused, (grad_fused,) = values_and_grads("triton", logits, segments, 1.0, upstream, wrt_targets=False)
    dense = logits.contiguous()
    out_ref, (grad_ref,) = values_and_grads("reference", dense, segments, 1.0, upstream, wrt_targets=False)
    assert_rel_close(out_fused, out_ref, 1e-2, "values")
    assert_rel_close(grad_fused, grad_ref, 1e-2, "gradients")


def test_divergence_is_accurate_for_confident_background():
    """Very negative logits (a confident background) make softplus(l) ~ exp(l); the kernel's log1p must
    keep full relative precision there, or well-trained heatmaps get a biased divergence."""
    gen = torch.Generator().manual_seed(8)
    logits = torch.full((4, 3, 16, 16), -12.0, dtype=torch.float64) + torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64)
    segments = torch.full((4, 3, 2), 500.0)  # far outside: every target is 0
    exact = ref.heatmap_divergence(logits, segments.double(), 1.0)
    out = dk.heatmap_divergence(logits.float().to(device()), segments.to(device()), 1.0, backend="triton")
    assert_rel_close(out.double().cpu(), exact, 1e-6, "background divergence")


def test_autograd_saves_only_inputs():
    """No per-pixel intermediate is kept for backward: the saved tensors are the inputs themselves."""
    logits = torch.randn(2, 3, 8, 8, device=device(), requires_grad=True)
    segments = torch.rand(2, 3, 2, 2, device=device()) * 8
    sigma = torch.full((3,), 1.5, device=device())
    out = dk.heatmap_divergence(logits, segments, sigma, backend="triton")
    saved = out.grad_fn.saved_tensors
    assert any(t is logits or t.data_ptr() == logits.data_ptr() for t in saved)
    per_pixel = logits.numel()
    assert all(t.numel() <= per_pixel for t in saved)
    assert sum(t.numel() >= per_pixel for t in saved) == 1, "only the logits may be per-pixel sized"


def test_backward_does_not_write_into_inputs():
    logits = torch.randn(2, 2, 9, 9, device=device())
    before = logits.clone()
    x = logits.requires_grad_(True)
    out = dk.heatmap_divergence(x, torch.rand(2, 2, 2, device=device()) * 9, 2.0, backend="triton")
    out.sum().backward()
    assert torch.equal(logits.detach(), before)
    assert x.grad.data_ptr() != x.data_ptr()


# --------------------------------------------------------------------------------------------------
# Reference: gradcheck in float64


def test_reference_gradcheck_logits_segments_sigma():
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 3, 6, 5, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    segments = (torch.rand(2, 3, 2, 2, generator=gen, dtype=torch.float64) * 5).requires_grad_(True)
    sigma = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda l, s, g: ref.heatmap_divergence(l, s, g), (logits, segments, sigma))


def test_reference_gradcheck_joints_and_pose_score():
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(4, 2, 5, 7, generator=gen, dtype=torch.float64)).requires_grad_(True)
    joints = (torch.rand(4, 2, 2, generator=gen, dtype=torch.float64) * 6).requires_grad_(True)
    weights = torch.rand(2, 2, 2, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda l, j: ref.pose_score(l, j, weights, 1.3, 2), (logits, joints))


def test_reference_gradient_is_finite_with_keypoints_on_pixel_centres():
    """A keypoint exactly on a pixel centre puts T = 1 there; gradients must stay finite."""
    logits = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    segments = torch.tensor([[[[2.0, 2.0], [2.0, 2.0]], [[1.0, 1.0], [3.0, 3.0]]]], dtype=torch.float64, requires_grad=True)
    out = ref.heatmap_divergence(logits, segments, 1.0)
    grads = torch.autograd.grad(out.sum(), (logits, segments))
    assert all(torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------------------------------
# Invariants


@pytest.mark.parametrize("backend", ["triton", "reference"])
@settings(max_examples=20)
@given(case=cases(dtypes=[torch.float32]))
def test_divergence_is_non_negative(backend, case):
    gen = torch.Generator().manual_seed(case.seed)
    logits, segments, sigma = make_logits(case, gen), make_segments(case, gen), make_sigma(case, gen)
    out = dk.heatmap_divergence(logits, segments, sigma, backend=backend)
    assert (out >= -1e-6).all(), f"negative divergence {out.min().item()}"


def target_logits(segments, sigma, h, w) -> torch.Tensor:
    """logit(T) computed stably from the exponent, clipped where T rounds to 1."""
    e = ref.segment_exponent(segments, sigma, h, w, torch.float64)
    return (-e - torch.log(-torch.expm1(-e)).clamp_min(-30.0)).clamp(-60.0, 60.0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_divergence_vanishes_at_target_logits(backend):
    gen = torch.Generator().manual_seed(5)
    segments = torch.rand(3, 4, 2, 2, generator=gen) * torch.tensor([20.0, 15.0])
    segments[:, 0, 1] = segments[:, 0, 0]  # a joint
    sigma = torch.tensor([0.7, 1.0, 2.0, 3.5])
    perfect = target_logits(segments, sigma, 15, 20).float()
    at_target = dk.heatmap_divergence(perfect.to(device()), segments.to(device()), sigma.to(device()), backend=backend)
    off_target = dk.heatmap_divergence((perfect + 1.0).to(device()), segments.to(device()), sigma.to(device()), backend=backend)
    assert at_target.abs().max().item() < 1e-6
    assert off_target.min().item() > 1e-3


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_divergence_is_translation_invariant(backend):
    """Shifting keypoints and logits together by whole pixels leaves the divergence unchanged."""
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 48, 40, generator=gen) * 2 - 3
    segments = 16 + torch.rand(2, 3, 2, 2, generator=gen) * 8  # central: targets vanish at the borders
    shift_x, shift_y = 5, -3
    moved_segments = segments + torch.tensor([float(shift_x), float(shift_y)])
    moved_logits = torch.roll(logits, shifts=(shift_y, shift_x), dims=(-2, -1))
    base = dk.heatmap_divergence(logits.to(device()), segments.to(device()), 1.2, backend=backend)
    moved = dk.heatmap_divergence(moved_logits.to(device()), moved_segments.to(device()), 1.2, backend=backend)
    assert_rel_close(moved, base, 1e-5, "translated divergence")
    nudged = dk.heatmap_divergence(logits.to(device()), moved_segments.to(device()), 1.2, backend=backend)
    assert (nudged - base).abs().max().item() > 1e-3, "moving only the keypoints must change the divergence"


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_zero_weight_sample_scores_zero_with_zero_gradient(backend):
    logits = torch.randn(4, 3, 6, 6, device=device(), requires_grad=True)
    segments = torch.rand(4, 3, 2, 2, device=device()) * 6
    weights = torch.rand(2, 2, 3, device=device())
    weights[1] = 0.0
    score = dk.pose_score(logits, segments, weights, 1.0, num_views=2, backend=backend)
    score.sum().backward()
    assert score[1].item() == 0.0
    assert score[0].item() < 0.0
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[2:] == 0)
    assert logits.grad[:2].abs().sum() > 0


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_pose_score_is_the_weighted_mean_divergence(backend):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 4, 8, 9, generator=gen).to(device())
    joints = (torch.rand(6, 4, 2, generator=gen) * 8).to(device())
    weights = torch.rand(6, 4, generator=gen).to(device())
    div = dk.heatmap_divergence(logits, joints, 2.0, backend=backend).view(2, 3, 4)
    w = weights.view(2, 3, 4)
    expected = -(w * div).sum((1, 2)) / w.sum((1, 2))
    by_rows = dk.pose_score(logits, joints, weights, 2.0, num_views=3, backend=backend)
    by_views = dk.pose_score(logits, joints, w, 2.0, num_views=3, backend=backend)
    assert_rel_close(by_rows, expected, 1e-6, "score from (N, C) weights")
    assert torch.equal(by_rows, by_views)


def test_module_wrapper_matches_function():
    logits = torch.randn(4, 2, 5, 5, device=device())
    joints = torch.rand(4, 2, 2, device=device()) * 5
    weights = torch.ones(4, 2, device=device())
    sigma = torch.tensor([1.0, 2.0], device=device())
    module = dk.PoseScore(sigma, num_views=2, backend="triton")
    assert torch.equal(module(logits, joints, weights), dk.pose_score(logits, joints, weights, sigma, 2, backend="triton"))
    assert "num_views=2" in repr(module)


def test_auto_backend_uses_reference_on_cpu_and_fused_on_cuda():
    cpu_logits = torch.zeros(1, 1, 2, 2)
    assert fused.resolve_backend("auto", cpu_logits) == "reference"
    assert fused.resolve_backend("auto", cpu_logits.double()) == "reference"
    if torch.cuda.is_available():
        assert fused.resolve_backend("auto", cpu_logits.cuda()) == "triton"


# --------------------------------------------------------------------------------------------------
# Bad inputs


def good_inputs():
    return {
        "logits": torch.zeros(4, 3, 5, 5),
        "segments": torch.zeros(4, 3, 2, 2),
        "weights": torch.ones(4, 3),
        "sigma": 1.0,
        "num_views": 2,
    }


BAD_INPUTS = [
    ("logits", torch.zeros(4, 3, 5), ValueError, "logits must have shape (N, C, H, W)"),
    ("logits", torch.zeros(4, 3, 5, 5, dtype=torch.int64), TypeError, "logits must be float32"),
    ("logits", torch.zeros(4, 3, 5, 5, dtype=torch.bool), TypeError, "logits must be float32"),
    ("logits", [[0.0]], TypeError, "logits must be a torch.Tensor"),
    ("logits", torch.zeros(4, 3, 0, 5), ValueError, "non-empty heatmaps"),
    ("segments", torch.zeros(4, 3, 3), ValueError, "segments must have shape"),
    ("segments", torch.zeros(4, 3, 2, 2, 1), ValueError, "segments must have shape"),
    ("segments", torch.zeros(5, 3, 2, 2), ValueError, "segments has N=5 rows but logits has N=4"),
    ("segments", torch.zeros(4, 2, 2, 2), ValueError, "segments has C=2 channels but logits has C=3"),
    ("segments", torch.zeros(4, 3, 2, 2, dtype=torch.int32), TypeError, "segments must be a floating-point"),
    ("segments", torch.full((4, 3, 2, 2), float("nan")), ValueError, "segments must be finite"),
    ("sigma", 0.0, ValueError, "sigma must be positive"),
    ("sigma", -2.0, ValueError, "sigma must be positive"),
    ("sigma", float("nan"), ValueError, "sigma must be positive"),
    ("sigma", torch.tensor([1.0, 0.0, 1.0]), ValueError, "sigma must be positive and finite in every channel"),
    ("sigma", torch.ones(4), ValueError, "sigma must be a float or a tensor of shape (C,)=(3,)"),
    ("sigma", "1.0", TypeError, "sigma must be a positive float"),
    ("weights", torch.ones(4, 3).neg(), ValueError, "weights must be non-negative"),
    ("weights", torch.full((4, 3), float("nan")), ValueError, "weights contain NaN"),
    ("weights", torch.full((4, 3), float("inf")), ValueError, "weights must be finite"),
    ("weights", torch.ones(4, 2), ValueError, "weights must have shape (N, C)=(4, 3)"),
    ("weights", torch.ones(3, 2, 3), ValueError, "weights must have shape (N, C)=(4, 3) or (B, V, C)=(2, 2, 3)"),
    ("weights", torch.ones(4, 3, dtype=torch.int64), TypeError, "weights must be a floating-point"),
    ("num_views", 3, ValueError, "num_views=3 does not divide N=4"),
    ("num_views", 0, ValueError, "num_views must be a positive int"),
]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("argument, value, error, message", BAD_INPUTS, ids=[f"{a}-{m[:30]}" for a, _, _, m in BAD_INPUTS])
def test_bad_input_raises_named_error(backend, argument, value, error, message):
    inputs = good_inputs()
    inputs[argument] = value
    with pytest.raises(error) as info:
        dk.pose_score(**inputs, backend=backend)
    assert message in str(info.value)
    assert argument.split("_")[0] in str(info.value)
    if argument != "weights" and argument != "num_views":
        with pytest.raises(error, match=argument.split("_")[0]):
            dk.heatmap_divergence(inputs["logits"], inputs["segments"], inputs["sigma"], backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed devices need a CUDA device")
@pytest.mark.parametrize("argument", ["segments", "weights", "sigma"])
def test_mixed_devices_raise(argument):
    inputs = good_inputs()
    inputs["logits"] = inputs["logits"].cuda()
    for name in ("segments", "weights"):
        if name != argument:
            inputs[name] = inputs[name].cuda()
    if argument == "sigma":
        inputs["sigma"] = torch.ones(3)
    with pytest.raises(ValueError, match=f"{argument} .*on cpu but logits are on cuda"):
        dk.pose_score(**inputs)


def test_mixed_devices_raise_on_cpu_via_meta_device():
    """Without a GPU, the meta device stands in for a second device."""
    inputs = good_inputs()
    inputs["segments"] = inputs["segments"].to("meta")
    with pytest.raises(ValueError, match="segments are on meta but logits are on cpu"):
        dk.pose_score(**inputs)


def test_unknown_backend_and_float64_on_triton_raise():
    inputs = good_inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        dk.pose_score(**inputs, backend="cuda")
    inputs["logits"] = inputs["logits"].double()
    with pytest.raises(TypeError, match="float64 runs on backend='reference'"):
        dk.pose_score(**inputs, backend="triton")
    assert math.isfinite(dk.pose_score(**inputs, backend="reference").sum().item())


# --------------------------------------------------------------------------------------------------
# Edge cases: empty batches, degenerate sigma, far and non-finite keypoints (both backends alike)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_empty_batch_gives_empty_results_and_gradients(backend):
    logits = torch.zeros(0, 3, 5, 5, device=device(), requires_grad=True)
    segments = torch.zeros(0, 3, 2, 2, device=device())
    score = dk.pose_score(logits, segments, torch.zeros(0, 2, 3, device=device()), 1.0, num_views=2, backend=backend)
    assert score.shape == (0,) and score.dtype == torch.float32
    score.sum().backward()
    assert logits.grad.shape == (0, 3, 5, 5)
    divergence = dk.heatmap_divergence(logits.detach(), segments, 1.0, backend=backend)
    assert divergence.shape == (0, 3) and divergence.dtype == torch.float32


@pytest.mark.parametrize("sigma_kind", ["float", "tensor"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_vanishing_sigma_is_the_indicator_of_the_segment(backend, sigma_kind):
    """sigma = 1e-30: T is 1 on the segment's pixel centres and 0 elsewhere, so D = softplus(l) - l T."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 3, 6, 7, generator=gen) * 3
    joints = torch.tensor([[[2.0, 3.0], [0.0, 0.0], [6.0, 5.0]], [[4.0, 1.0], [1.5, 2.5], [-3.0, 2.0]]])
    target = torch.zeros_like(logits)
    for n, c in ((0, 0), (0, 1), (0, 2), (1, 0)):  # joints on pixel centres; (1, 1) between, (1, 2) outside
        x, y = joints[n, c].long().tolist()
        target[n, c, y, x] = 1.0
    expected = (torch.nn.functional.softplus(logits) - logits * target).mean(dim=(-2, -1))
    sigma = 1e-30 if sigma_kind == "float" else torch.full((3,), 1e-30)
    sigma = sigma.to(device()) if isinstance(sigma, torch.Tensor) else sigma
    out = dk.heatmap_divergence(logits.to(device()), joints.to(device()), sigma, backend=backend)
    assert_rel_close(out.cpu(), expected, 1e-6, "divergence at sigma = 1e-30")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_huge_sigma_makes_every_target_one(backend):
    """sigma = 1e200 (beyond float32): T = 1 everywhere, D = softplus(-l); no overflow on either backend."""
    logits = torch.randn(2, 2, 5, 4, generator=torch.Generator().manual_seed(12)) * 3
    segments = torch.rand(2, 2, 2, 2, generator=torch.Generator().manual_seed(13)) * 4
    out = dk.heatmap_divergence(logits.to(device()), segments.to(device()), 1e200, backend=backend)
    expected = torch.nn.functional.softplus(-logits).mean(dim=(-2, -1))
    assert_rel_close(out.cpu(), expected, 1e-6, "divergence at sigma = 1e200")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_keypoint_at_1e20_pixels(backend):
    """A joint 1e20 px away has T = 0 everywhere (D = softplus(l)), with or without weight; with weight
    0 it adds nothing to the score and its row gets a zero gradient."""
    gen = torch.Generator().manual_seed(14)
    logits = (torch.randn(4, 3, 6, 6, generator=gen) * 2).to(device())
    joints = (torch.rand(4, 3, 2, generator=gen) * 6).to(device())
    joints[1, 2] = torch.tensor([1e20, -1e20])
    divergence = dk.heatmap_divergence(logits, joints, 1.5, backend=backend)
    assert torch.isfinite(divergence).all()
    assert_rel_close(divergence[1, 2].cpu(), torch.nn.functional.softplus(logits[1, 2]).mean().cpu(), 1e-6, "far joint")
    weights = torch.rand(4, 3, generator=gen).to(device()) + 0.1
    weights[1, 2] = 0.0
    x = logits.clone().requires_grad_(True)
    score = dk.pose_score(x, joints, weights, 1.5, num_views=2, backend=backend)
    score.sum().backward()
    assert torch.isfinite(score).all() and torch.isfinite(x.grad).all()
    assert torch.all(x.grad[1, 2] == 0)
    kept = divergence.detach().clone()
    expected = -(weights * kept).view(2, 2, 3).sum((1, 2)) / weights.view(2, 2, 3).sum((1, 2))
    assert_rel_close(score.detach().cpu(), expected.cpu(), 1e-5, "score without the far joint's row")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_unchecked_nan_segment_of_weight_zero_adds_nothing(backend):
    """validate=False skips the value checks: a NaN segment whose weight is 0 still adds nothing, and one
    whose weight is not 0 makes its sample's score NaN (never a silently wrong number)."""
    gen = torch.Generator().manual_seed(15)
    logits = (torch.randn(4, 3, 6, 6, generator=gen) * 2).to(device())
    segments = (torch.rand(4, 3, 2, 2, generator=gen) * 6).to(device())
    weights = (torch.rand(4, 3, generator=gen) + 0.1).to(device())
    clean = dk.pose_score(logits, segments, weights, 1.5, num_views=2, backend=backend)
    segments[3, 1] = float("nan")
    weights[3, 1] = 0.0
    x = logits.clone().requires_grad_(True)
    score = dk.pose_score(x, segments, weights, 1.5, num_views=2, backend=backend, validate=False)
    score.sum().backward()
    reference_clean = dk.pose_score(logits, segments.nan_to_num(0.0), weights, 1.5, num_views=2, backend=backend)
    assert_rel_close(score.detach(), reference_clean, 1e-6, "score with an unused NaN segment")
    assert score[0].item() == clean[0].item()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[3, 1] == 0)
    weights[3, 1] = 1.0
    poisoned = dk.pose_score(logits, segments, weights, 1.5, num_views=2, backend=backend, validate=False)
    assert torch.isnan(poisoned[1]) and torch.isfinite(poisoned[0])


# --------------------------------------------------------------------------------------------------
# The kernels' arithmetic: exact rewrites of softplus, sigmoid, 1 - exp(-e) and log, and the tile test


if fused.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _elementwise_kernel(x_ptr, out_ptr, n, WHICH: tl.constexpr, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        x = tl.load(x_ptr + o, mask=m, other=1.0)
        if WHICH == 0:
            y = fused._softplus(x)
        elif WHICH == 1:
            y = fused._sigmoid(x)
        elif WHICH == 2:
            y = fused._one_minus_exp_neg(x, tl.exp(-x))
        else:
            y = fused._log_unit(x)
        tl.store(out_ptr + o, y, mask=m)


ELEMENTWISE = {
    # name: (kernel switch, inputs, float64 truth, relative error allowed: a few ulp, plus for exp(-|x|) the
    # rounding of its float32 argument x log2(e), 6e-8 |x| relative, which every exp2-based exp shares)
    "softplus": (0, torch.linspace(-30, 30, 4001), lambda x: torch.nn.functional.softplus(x),
                 lambda x: 4e-7 + 6e-8 * x.abs()),
    "sigmoid": (1, torch.linspace(-30, 30, 4001), torch.sigmoid, lambda x: 4e-7 + 6e-8 * x.abs()),
    "1 - exp(-e)": (2, torch.cat([torch.logspace(-30, 0, 2001), torch.linspace(0.4, 60, 2001)]),
                    lambda e: -torch.expm1(-e), lambda e: 3e-7 + 6e-8 * e),
    "log": (3, torch.cat([torch.logspace(-37.9, 0, 3001), 1 - torch.logspace(-7, -0.2, 1001)]), torch.log,
            lambda u: torch.full_like(u, 3e-7)),
}


@pytest.mark.skipif(not fused.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_kernel_arithmetic_keeps_float32_precision(name):
    """The polynomials that replace log1p, the division of the sigmoid, expm1 and log hold float32
    precision (a few ulp) over their whole range, the confident-background tail included."""
    which, x, truth, tolerance = ELEMENTWISE[name]
    x32 = x.float().to(device())
    out = torch.full_like(x32, float("nan"))
    _elementwise_kernel[(triton.cdiv(x32.numel(), 1024),)](x32, out, x32.numel(), WHICH=which, BLOCK=1024)
    exact = truth(x32.double().cpu())
    relative = (out.double().cpu() - exact).abs() / exact.abs().clamp_min(1e-300)
    worst = (relative / tolerance(x32.double().cpu())).argmax()
    assert relative[worst] <= tolerance(x32.double().cpu())[worst], (
        f"{name}: relative error {relative[worst].item():.3g} at {x32[worst].item():.6g}")


def test_tiles_on_the_background_path_have_targets_exactly_zero():
    """Wherever the kernels' tile test sends a tile to the background path, the reference's float32
    target is exactly 0 at every pixel: skipping the exp and the entropy there is exact."""
    gen = torch.Generator().manual_seed(16)
    n, c, h, w = 4, 20, 100, 130
    segments = torch.rand(n, c, 2, 2, generator=gen) * torch.tensor([w * 1.4, h * 1.4]) - torch.tensor([w * 0.2, h * 0.2])
    segments[:, :8, 1] = segments[:, :8, 0]  # joints
    segments[:, 8, 1, 1] = segments[:, 8, 0, 1]  # horizontal and vertical bones
    segments[:, 9, 1, 0] = segments[:, 9, 0, 0]
    sigma = torch.rand(c, generator=gen) * 1.2 + 0.2
    for layout, strides in [("contiguous", (c * h * w, h * w, w, 1)), ("channels_last", (c * h * w, 1, w * c, c))]:
        config = fused.launch_config(c, h, w, strides, 16)
        near = fused.near_tiles(segments, sigma, h, w, config)  # (N, channel blocks, tiles down, across)
        targets = ref.heatmap_targets(segments, sigma, h, w)
        bc, bh, bw = config["BLOCK_C"], config["BLOCK_H"], config["BLOCK_W"]
        pad = (0, -w % bw, 0, -h % bh, 0, -c % bc)
        tiles = torch.nn.functional.pad(targets, pad).view(n, -1, bc, near.shape[2], bh, near.shape[3], bw)
        tile_max = tiles.amax(dim=(2, 4, 6))
        assert torch.all(tile_max[~near] == 0), f"{layout}: a tile with a non-zero target took the background path"
        if layout == "contiguous":  # one channel per tile: the test is worth its cost
            assert (~near).float().mean() > 0.4, "the test should send most of these tiles to the background"
            needless = (near & (tile_max == 0)).float().sum() / near.float().sum()
            assert needless < 0.4, f"{needless:.2f} of the full-path tiles have no non-zero target"


# --------------------------------------------------------------------------------------------------
# Layout, weight gradients and the host path


def test_gradient_is_written_in_the_logits_layout():
    gen = torch.Generator().manual_seed(17)
    logits = (torch.randn(2, 5, 6, 7, generator=gen)).to(device()).contiguous(memory_format=torch.channels_last)
    x = logits.clone().requires_grad_(True)
    score = dk.pose_score(x, torch.rand(2, 5, 2, device=device()) * 6, torch.ones(2, 5, device=device()), 1.0, 1,
                          backend="triton")
    (grad,) = torch.autograd.grad(score.sum(), x)
    assert grad.stride() == logits.stride()


def test_fused_weight_gradients_match_reference():
    gen = torch.Generator().manual_seed(18)
    logits = torch.randn(6, 4, 9, 8, generator=gen).to(device())
    joints = (torch.rand(6, 4, 2, generator=gen) * 8).to(device())
    weights = (torch.rand(3, 2, 4, generator=gen) * (torch.rand(3, 2, 4, generator=gen) > 0.3)).to(device())
    weights[2] = 0.0
    upstream = torch.randn(3, generator=gen).to(device())
    grads = {}
    for backend in ("triton", "reference"):
        w = weights.clone().requires_grad_(True)
        score = dk.pose_score(logits, joints, w, 1.3, num_views=2, backend=backend)
        (grads[backend],) = torch.autograd.grad(score, w, upstream)
    assert_rel_close(grads["triton"], grads["reference"], 1e-5, "weight gradients")


def test_pose_score_makes_three_launches_and_never_waits_for_the_device(monkeypatch):
    """A training step's reward (validate=False, as PoseReward passes after its first call): forward and
    backward together launch the divergence kernel, the weighting kernel and the backward kernel, and
    nothing reads a device value on the host."""
    from launch_counter import LaunchCounter

    monkeypatch.setattr(fused, "_new_output", lambda shape, device, dtype: torch.empty(shape, device=device, dtype=dtype))
    gen = torch.Generator().manual_seed(19)
    b, v, c = 2, 6, 43
    logits = torch.randn(b * v, c, 12, 12, generator=gen).to(device()).requires_grad_(True)
    segments = (torch.rand(b * v, c, 2, 2, generator=gen) * 12).to(device())
    weights = (torch.rand(b, v, c, generator=gen) > 0.2).float().to(device())
    upstream = torch.ones(b, device=device())
    with LaunchCounter() as counter:
        score = dk.pose_score(logits, segments, weights, 1.0, num_views=v, backend="triton", validate=False)
        torch.autograd.grad(score, logits, upstream)
    assert dict(counter.launches) == {"triton:forward": 1, "triton:score": 1, "triton:backward": 1}
    assert counter.host_reads == 0
    with LaunchCounter() as checked:
        dk.pose_score(logits, segments, weights, 1.0, num_views=v, backend="triton")
    assert checked.host_reads == 1, "validate=True checks values with one host read"
