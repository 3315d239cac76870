"""Fused PoseScore op: Triton forward/backward kernels, their launchers, the autograd.Function and the
public functional API with backend dispatch.

The kernels compute the target heatmap of every (row, channel) on the fly from its segment, so the only
O(N*C*H*W) traffic is reading the logits (forward), and reading them once more and writing their
gradient (backward). Each program owns BLOCK_R whole rows and loops over their pixels in BLOCK_P
chunks, reducing in registers: no atomics, deterministic results, fp32 accumulation whatever the logits
dtype. Offsets are 64-bit. Math (DESIGN.md section 4 and ``reference.py``): with
``e = d(p, [a, b])^2 / (2 sigma^2)`` and ``T = exp(-e)``,

    D     = softplus(l) - l T - e T + (1 - T) log(1 - T)
    dD/dl = sigmoid(l) - T
    dD/de = T (e + log(1 - T) + l)          (gradient towards the segment and sigma, on request)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from . import reference
from ._validation import CheckedInputs, check_inputs, check_values, check_weights

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the reference backend keeps working without triton
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
"""Triton's interpreter runs the kernels on CPU tensors; it must be chosen before this module imports."""

BACKENDS = ("auto", "triton", "reference")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

MAX_BLOCK_P = 1024  # pixels per loop step of one row; larger maps loop
TILE = 1024  # elements (rows x pixels) per program step: small maps pack several rows per program

COMPILED_KERNEL_STATS: dict[str, dict[str, int]] = {}
"""Registers and spills of the compiled kernels seen so far on CUDA, keyed by kernel and block sizes."""


if HAS_TRITON:

    @triton.jit
    def _softplus(l):
        """max(l, 0) + log1p(exp(-|l|)), with log1p exact for tiny arguments (the Goldberg form)."""
        z = tl.exp(-tl.abs(l))
        u = 1.0 + z
        denom = tl.where(u == 1.0, 1.0, u - 1.0)
        log1p_z = tl.where(u == 1.0, z, tl.log(u) * (z / denom))
        return tl.maximum(l, 0.0) + log1p_z

    @triton.jit
    def _row_geometry(seg_ptr, sigma_ptr, o_r, m_r, n_channels, sigma_value, HAS_SIGMA_TENSOR: tl.constexpr):
        """Per-row segment start a, direction b - a, 1/|b - a|^2 (0 for joints) and 1/sigma^2."""
        b_ax = tl.load(seg_ptr + o_r * 4 + 0, mask=m_r, other=0.0)
        b_ay = tl.load(seg_ptr + o_r * 4 + 1, mask=m_r, other=0.0)
        b_abx = tl.load(seg_ptr + o_r * 4 + 2, mask=m_r, other=0.0) - b_ax
        b_aby = tl.load(seg_ptr + o_r * 4 + 3, mask=m_r, other=0.0) - b_ay
        b_len2 = b_abx * b_abx + b_aby * b_aby
        b_inv_len2 = tl.where(b_len2 > 0.0, 1.0 / tl.where(b_len2 > 0.0, b_len2, 1.0), 0.0)
        if HAS_SIGMA_TENSOR:
            b_sigma = tl.load(sigma_ptr + o_r % n_channels, mask=m_r, other=1.0)
        else:
            b_sigma = tl.zeros_like(b_ax) + sigma_value
        b_inv_sigma2 = 1.0 / (b_sigma * b_sigma)
        return b_ax, b_ay, b_abx, b_aby, b_inv_len2, b_sigma, b_inv_sigma2

    @triton.jit
    def _pixel_offsets(o_base, o_p, width, stride_h, stride_w, IS_FLAT: tl.constexpr):
        """Element offsets of pixels o_p (flattened row-major) for rows starting at o_base."""
        if IS_FLAT:
            return o_base[:, None] + o_p[None, :]
        i_h = (o_p // width).to(tl.int64)
        i_w = (o_p % width).to(tl.int64)
        return o_base[:, None] + (i_h * stride_h + i_w * stride_w)[None, :]

    @triton.jit
    def _segment_targets(o_p, width, b_ax, b_ay, b_abx, b_aby, b_inv_len2, b_half_inv_sigma2):
        """For rows x pixels o_p: the clamped projection t onto the segment, p - q (q the closest point),
        e = |p - q|^2 / (2 sigma^2) and the target T = exp(-e)."""
        b_px = (o_p % width).to(tl.float32)[None, :] - b_ax[:, None]
        b_py = (o_p // width).to(tl.float32)[None, :] - b_ay[:, None]
        b_t = (b_px * b_abx[:, None] + b_py * b_aby[:, None]) * b_inv_len2[:, None]
        b_t = tl.minimum(tl.maximum(b_t, 0.0), 1.0)
        b_dx = b_px - b_t * b_abx[:, None]
        b_dy = b_py - b_t * b_aby[:, None]
        b_e = (b_dx * b_dx + b_dy * b_dy) * b_half_inv_sigma2[:, None]
        return b_t, b_dx, b_dy, b_e, tl.exp(-b_e)

    @triton.jit
    def _heatmap_divergence_fwd_kernel(
        l_ptr, seg_ptr, sigma_ptr, out_ptr,
        n_rows, n_channels, width, n_pixels,
        stride_n, stride_c, stride_h, stride_w,
        sigma_value, inv_n_pixels,
        HAS_SIGMA_TENSOR: tl.constexpr, IS_FLAT: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    ):  # fmt: skip
        i_r = tl.program_id(0).to(tl.int64)
        o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
        m_r = o_r < n_rows
        b_ax, b_ay, b_abx, b_aby, b_inv_len2, b_sigma, b_inv_sigma2 = _row_geometry(
            seg_ptr, sigma_ptr, o_r, m_r, n_channels, sigma_value, HAS_SIGMA_TENSOR
        )
        b_half_inv_sigma2 = 0.5 * b_inv_sigma2
        o_base = (o_r // n_channels) * stride_n + (o_r % n_channels) * stride_c
        b_acc = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
        for p_start in range(0, n_pixels, BLOCK_P):
            o_p = p_start + tl.arange(0, BLOCK_P)
            m = m_r[:, None] & (o_p < n_pixels)[None, :]
            b_l = tl.load(l_ptr + _pixel_offsets(o_base, o_p, width, stride_h, stride_w, IS_FLAT), mask=m, other=0.0)
            b_l = b_l.to(tl.float32)
            b_t, b_dx, b_dy, b_e, b_target = _segment_targets(o_p, width, b_ax, b_ay, b_abx, b_aby, b_inv_len2,
                                                              b_half_inv_sigma2)
            b_u = 1.0 - b_target
            b_ulogu = tl.where(b_u > 0.0, b_u * tl.log(tl.maximum(b_u, 1e-38)), 0.0)
            b_d = _softplus(b_l) - b_l * b_target - b_e * b_target + b_ulogu
            b_acc += tl.where(m, b_d, 0.0)
        tl.store(out_ptr + o_r, tl.sum(b_acc, axis=1) * inv_n_pixels, mask=m_r)

    @triton.jit
    def _heatmap_divergence_bwd_kernel(
        l_ptr, seg_ptr, sigma_ptr, g_ptr, dl_ptr, dseg_ptr, dsigma_ptr,
        n_rows, n_channels, width, n_pixels,
        stride_n, stride_c, stride_h, stride_w,
        sigma_value, inv_n_pixels,
        HAS_SIGMA_TENSOR: tl.constexpr, IS_FLAT: tl.constexpr,
        NEEDS_LOGITS_GRAD: tl.constexpr, NEEDS_TARGET_GRAD: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    ):  # fmt: skip
        i_r = tl.program_id(0).to(tl.int64)
        o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
        m_r = o_r < n_rows
        b_ax, b_ay, b_abx, b_aby, b_inv_len2, b_sigma, b_inv_sigma2 = _row_geometry(
            seg_ptr, sigma_ptr, o_r, m_r, n_channels, sigma_value, HAS_SIGMA_TENSOR
        )
        b_half_inv_sigma2 = 0.5 * b_inv_sigma2
        b_g = tl.load(g_ptr + o_r, mask=m_r, other=0.0) * inv_n_pixels
        o_base = (o_r // n_channels) * stride_n + (o_r % n_channels) * stride_c
        o_grad_base = o_r * n_pixels
        if NEEDS_TARGET_GRAD:
            b_acc_ax = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
            b_acc_ay = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
            b_acc_bx = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
            b_acc_by = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
            b_acc_e = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
        for p_start in range(0, n_pixels, BLOCK_P):
            o_p = p_start + tl.arange(0, BLOCK_P)
            m = m_r[:, None] & (o_p < n_pixels)[None, :]
            b_l = tl.load(l_ptr + _pixel_offsets(o_base, o_p, width, stride_h, stride_w, IS_FLAT), mask=m, other=0.0)
            b_l = b_l.to(tl.float32)
            b_t, b_dx, b_dy, b_e, b_target = _segment_targets(o_p, width, b_ax, b_ay, b_abx, b_aby, b_inv_len2,
                                                              b_half_inv_sigma2)
            if NEEDS_LOGITS_GRAD:
                b_sigmoid = 1.0 / (1.0 + tl.exp(-b_l))
                b_dl = b_g[:, None] * (b_sigmoid - b_target)
                tl.store(dl_ptr + o_grad_base[:, None] + o_p[None, :], b_dl.to(dl_ptr.dtype.element_ty), mask=m)
            if NEEDS_TARGET_GRAD:
                b_u = 1.0 - b_target
                b_dd_de = tl.where(b_u > 0.0, b_target * (b_e + tl.log(tl.maximum(b_u, 1e-38)) + b_l), 0.0)
                b_dd_de = tl.where(m, b_dd_de, 0.0)
                b_acc_ax += b_dd_de * b_dx * (1.0 - b_t)
                b_acc_ay += b_dd_de * b_dy * (1.0 - b_t)
                b_acc_bx += b_dd_de * b_dx * b_t
                b_acc_by += b_dd_de * b_dy * b_t
                b_acc_e += b_dd_de * b_e
        if NEEDS_TARGET_GRAD:
            # de/da = -(p - q)(1 - t) / sigma^2, de/db = -(p - q) t / sigma^2, de/dsigma = -2 e / sigma
            b_scale = -b_g * b_inv_sigma2
            tl.store(dseg_ptr + o_r * 4 + 0, b_scale * tl.sum(b_acc_ax, axis=1), mask=m_r)
            tl.store(dseg_ptr + o_r * 4 + 1, b_scale * tl.sum(b_acc_ay, axis=1), mask=m_r)
            tl.store(dseg_ptr + o_r * 4 + 2, b_scale * tl.sum(b_acc_bx, axis=1), mask=m_r)
            tl.store(dseg_ptr + o_r * 4 + 3, b_scale * tl.sum(b_acc_by, axis=1), mask=m_r)
            if HAS_SIGMA_TENSOR:
                tl.store(dsigma_ptr + o_r, -2.0 * b_g / b_sigma * tl.sum(b_acc_e, axis=1), mask=m_r)


def launch_config(n_rows: int, n_pixels: int) -> dict[str, int]:
    """Block sizes and warps from the problem size: whole rows per program, pixel loop beyond MAX_BLOCK_P."""
    block_p = min(triton.next_power_of_2(n_pixels), MAX_BLOCK_P)
    block_r = min(triton.next_power_of_2(n_rows), max(1, TILE // block_p))
    elements = block_r * block_p
    num_warps = 4 if elements >= 512 else (2 if elements >= 128 else 1)
    return {"BLOCK_R": block_r, "BLOCK_P": block_p, "num_warps": num_warps}


def _is_flat(logits: torch.Tensor) -> bool:
    """Whether each (H, W) map is one contiguous run, so pixels can be addressed by a flat offset.

    The kernels take all four strides, so nothing is ever copied: channel- or batch-sliced views and
    permuted layouts are read in place, and an overlapping layout (a zero stride from ``expand``)
    works too, since the kernels only read the logits.
    """
    h, w = logits.shape[-2:]
    stride_h, stride_w = logits.stride(-2), logits.stride(-1)
    return (stride_w == 1 or w == 1) and (stride_h == w or h == 1)


def _new_output(shape, device, dtype) -> torch.Tensor:
    """Allocation of every kernel output (tests replace it with NaN-filled tensors to catch unwritten elements)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _record_stats(name: str, compiled, config: dict[str, int]) -> None:
    n_regs = getattr(compiled, "n_regs", None)
    if n_regs is None:
        return
    key = f"{name}[BLOCK_R={config['BLOCK_R']},BLOCK_P={config['BLOCK_P']},num_warps={config['num_warps']}]"
    COMPILED_KERNEL_STATS[key] = {"n_regs": int(n_regs), "n_spills": int(getattr(compiled, "n_spills", -1))}


def _device_guard(t: torch.Tensor):
    """Launch on the tensor's own GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch as the launchers decide it: kernel, grid, arguments and compile-time settings.

    ``bytes`` is the launch's O(N*C*H*W) traffic (logits read, gradient written); ``elements`` the heatmap
    elements it covers; ``tile`` the elements one program handles per step of its pixel loop.
    """

    name: str
    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict
    bytes: int
    elements: int
    tile: int

    def run(self):
        return self.kernel[self.grid](*self.args, **self.constexprs)


def forward_launch(logits, segments, sigma_tensor, sigma_value, out) -> KernelLaunch:
    """The forward kernel's launch for canonical inputs (no data is read: meta tensors work)."""
    n, c, h, w = logits.shape
    n_rows, n_pixels = n * c, h * w
    config = launch_config(max(n_rows, 1), n_pixels)
    grid = (triton.cdiv(n_rows, config["BLOCK_R"]),)
    args = (logits, segments, sigma_tensor if sigma_tensor is not None else segments, out,
            n_rows, c, w, n_pixels, *logits.stride(), sigma_value, 1.0 / n_pixels)
    constexprs = dict(HAS_SIGMA_TENSOR=sigma_tensor is not None, IS_FLAT=_is_flat(logits), **config)
    return KernelLaunch("forward", _heatmap_divergence_fwd_kernel, grid, args, constexprs,
                        bytes=logits.numel() * logits.element_size(), elements=logits.numel(),
                        tile=config["BLOCK_R"] * config["BLOCK_P"])


def backward_launch(grad_out, logits, segments, sigma_tensor, sigma_value, grad_logits, grad_segments,
                    grad_sigma_rows, needs_logits_grad, needs_target_grad) -> KernelLaunch:
    """The backward kernel's launch for canonical inputs (no data is read: meta tensors work)."""
    n, c, h, w = logits.shape
    n_rows, n_pixels = n * c, h * w
    config = launch_config(max(n_rows, 1), n_pixels)
    grid = (triton.cdiv(n_rows, config["BLOCK_R"]),)
    args = (logits, segments, sigma_tensor if sigma_tensor is not None else segments, grad_out,
            grad_logits if grad_logits is not None else grad_out,
            grad_segments if grad_segments is not None else grad_out,
            grad_sigma_rows if grad_sigma_rows is not None else grad_out,
            n_rows, c, w, n_pixels, *logits.stride(), sigma_value, 1.0 / n_pixels)
    constexprs = dict(HAS_SIGMA_TENSOR=sigma_tensor is not None, IS_FLAT=_is_flat(logits),
                      NEEDS_LOGITS_GRAD=needs_logits_grad, NEEDS_TARGET_GRAD=needs_target_grad, **config)
    per_pass = logits.numel() * logits.element_size()
    return KernelLaunch("backward", _heatmap_divergence_bwd_kernel, grid, args, constexprs,
                        bytes=per_pass * (2 if needs_logits_grad else 1), elements=logits.numel(),
                        tile=config["BLOCK_R"] * config["BLOCK_P"])


def heatmap_divergence_fwd(logits, segments, sigma_tensor, sigma_value):
    """Launch the forward kernel: (N, C) float32 row divergences."""
    n, c = logits.shape[:2]
    out = _new_output((n, c), logits.device, torch.float32)
    if n * c == 0:
        return out
    launch = forward_launch(logits, segments, sigma_tensor, sigma_value, out)
    with _device_guard(logits):
        compiled = launch.run()
    _record_stats("heatmap_divergence_fwd", compiled, launch.constexprs)
    return out


def heatmap_divergence_bwd(grad_out, logits, segments, sigma_tensor, sigma_value, needs_logits_grad, needs_target_grad):
    """Launch the backward kernel: gradients for logits (logits' dtype), segments and a sigma tensor."""
    n, c, h, w = logits.shape
    grad_out = grad_out.to(torch.float32).contiguous()
    grad_logits = _new_output((n, c, h, w), logits.device, logits.dtype) if needs_logits_grad else None
    grad_segments = _new_output(segments.shape, logits.device, torch.float32) if needs_target_grad else None
    has_sigma_grad = needs_target_grad and sigma_tensor is not None
    grad_sigma_rows = _new_output((n, c), logits.device, torch.float32) if has_sigma_grad else None
    if n * c > 0:
        launch = backward_launch(grad_out, logits, segments, sigma_tensor, sigma_value, grad_logits, grad_segments,
                                 grad_sigma_rows, needs_logits_grad, needs_target_grad)
        with _device_guard(logits):
            compiled = launch.run()
        _record_stats("heatmap_divergence_bwd", compiled, launch.constexprs)
    grad_sigma = grad_sigma_rows.sum(dim=0) if grad_sigma_rows is not None else None
    return grad_logits, grad_segments, grad_sigma


def static_launches(logits, segments, sigma, weights=None, num_views: int = 1, needs_target_grad: bool = False
                    ) -> list[KernelLaunch]:
    """The kernel launches of one fused forward + backward (``pose_score`` when weights are given, else
    ``heatmap_divergence``) for these inputs, without running them: what a compiler for real targets needs."""
    checked = check_inputs(logits, segments, sigma)
    segments = checked.segments.to(torch.float32)
    if isinstance(checked.sigma, torch.Tensor):
        sigma_tensor, sigma_value = checked.sigma.to(torch.float32), 1.0
    else:
        sigma_tensor, sigma_value = None, checked.sigma
    n, c = logits.shape[:2]
    device = logits.device
    out = torch.empty((n, c), device=device, dtype=torch.float32)
    grad_logits = torch.empty(logits.shape, device=device, dtype=logits.dtype)
    grad_segments = torch.empty(segments.shape, device=device) if needs_target_grad else None
    grad_sigma_rows = out if needs_target_grad and sigma_tensor is not None else None
    return [
        forward_launch(logits, segments, sigma_tensor, sigma_value, out),
        backward_launch(out, logits, segments, sigma_tensor, sigma_value, grad_logits, grad_segments,
                        grad_sigma_rows, True, needs_target_grad),
    ]


class HeatmapDivergenceFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernels; saves only its inputs (no per-pixel intermediates)."""

    @staticmethod
    def forward(ctx, logits, segments, sigma_tensor, sigma_value):
        ctx.save_for_backward(logits, segments, sigma_tensor)
        ctx.sigma_value = sigma_value
        return heatmap_divergence_fwd(logits, segments, sigma_tensor, sigma_value)

    @staticmethod
    def backward(ctx, grad_out):
        logits, segments, sigma_tensor = ctx.saved_tensors
        needs_logits_grad = ctx.needs_input_grad[0]
        needs_target_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        grad_logits, grad_segments, grad_sigma = heatmap_divergence_bwd(
            grad_out, logits, segments, sigma_tensor, ctx.sigma_value, needs_logits_grad, needs_target_grad
        )
        return (
            grad_logits,
            grad_segments if ctx.needs_input_grad[1] else None,
            grad_sigma if ctx.needs_input_grad[2] else None,
            None,
        )


def resolve_backend(backend: str, logits: torch.Tensor) -> str:
    """Pick the concrete backend before any autograd.Function is applied."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        fused_ok = HAS_TRITON and logits.is_cuda and logits.dtype in FUSED_DTYPES
        return "triton" if fused_ok else "reference"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package; install it or use backend='reference'")
        if logits.dtype not in FUSED_DTYPES:
            raise TypeError(f"backend='triton' takes float32, float16 or bfloat16 logits, got {logits.dtype}; "
                            "float64 runs on backend='reference'")
        if not logits.is_cuda and not INTERPRET:
            raise ValueError("backend='triton' needs CUDA tensors; to run the kernels on CPU, set "
                             "TRITON_INTERPRET=1 before importing drpose_kernels")
    return backend


def _divergence(checked: CheckedInputs, backend: str) -> torch.Tensor:
    if backend == "reference":
        return reference.divergence_from_checked(checked.logits, checked.segments, checked.sigma)
    segments = checked.segments.to(torch.float32).contiguous()
    if isinstance(checked.sigma, torch.Tensor):
        sigma_tensor, sigma_value = checked.sigma.to(torch.float32).contiguous(), 1.0
    else:
        sigma_tensor, sigma_value = None, checked.sigma
    return HeatmapDivergenceFunction.apply(checked.logits, segments, sigma_tensor, sigma_value)


def heatmap_divergence(
    logits: torch.Tensor, segments: torch.Tensor, sigma, *, backend: str = "auto", validate: bool = True
) -> torch.Tensor:
    """Mean per-pixel Bernoulli KL divergence between segment target heatmaps and sigmoid(logits).

    Args:
        logits: (N, C, H, W) float32/float16/bfloat16 heatmap logits, any strides.
        segments: (N, C, 2, 2) segments [a, b] as (x, y) pixel coordinates (pixel (i, j) has its centre
            at (x, y) = (j, i)), or (N, C, 2) joints.
        sigma: Gaussian width in pixels, a positive float or a (C,) tensor.
        backend: "auto" (fused on CUDA, else reference), "triton" or "reference".
        validate: run the value checks (finite segments, sigma > 0), which cost one host sync on
            CUDA; shapes, dtypes and devices are always checked.

    Returns:
        (N, C) float32 divergences, >= 0 and 0 where sigmoid(logits) equals the targets.
    """
    checked = check_inputs(logits, segments, sigma)
    if validate:
        check_values(checked.segments, checked.sigma)
    return _divergence(checked, resolve_backend(backend, checked.logits))


def pose_score(
    logits: torch.Tensor,
    segments: torch.Tensor,
    weights: torch.Tensor,
    sigma,
    num_views: int,
    *,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """PoseScore per sample: minus the weighted mean divergence over views and channels.

    Args:
        logits: (N, C, H, W) with N = B * num_views, rows ordered sample-major (b, v).
        segments: (N, C, 2, 2) or (N, C, 2), see ``heatmap_divergence``.
        weights: (N, C) or (B, V, C), non-negative; 0 marks a keypoint that is out of frame or unknown.
        sigma: positive float or (C,) tensor.
        num_views: V, the views per sample.
        backend: see ``heatmap_divergence``.
        validate: also check values (adds non-negative, finite weights); one host sync on CUDA.

    Returns:
        (B,) float32 rewards, <= 0; 0 is a perfect match, and a sample whose weights are all zero
        scores 0 with a zero gradient.
    """
    checked = check_inputs(logits, segments, sigma)
    weights = check_weights(weights, checked.logits, num_views)
    if validate:
        check_values(checked.segments, checked.sigma, weights)
    divergence = _divergence(checked, resolve_backend(backend, checked.logits))
    return reference.reduce_pose_score(divergence, weights)


class PoseScore(torch.nn.Module):
    """Module form of ``pose_score`` for training code: holds sigma, the view count and the backend."""

    def __init__(self, sigma, num_views: int, backend: str = "auto", validate: bool = True):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(sigma, torch.Tensor):
            self.register_buffer("sigma", sigma.detach().to(torch.float32).clone())
        else:
            self.sigma = sigma
        self.num_views = num_views
        self.backend = backend
        self.validate = validate

    def forward(self, logits: torch.Tensor, segments: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return pose_score(
            logits, segments, weights, self.sigma, self.num_views, backend=self.backend, validate=self.validate
        )

    def extra_repr(self) -> str:
        sigma = "per-channel" if isinstance(self.sigma, torch.Tensor) else self.sigma
        return f"sigma={sigma}, num_views={self.num_views}, backend={self.backend!r}"
