"""Fused PoseScore op: Triton kernels, their launchers, the autograd Functions and the public functional
API with backend dispatch.

The kernels compute the target heatmap of every (row, channel) on the fly from its segment, so the only
O(N*C*H*W) traffic is reading the logits (forward), and reading them once more and writing their
gradient (backward). Math (see ``reference.py``): with ``k = 1 / (sqrt(2) sigma)``,
``e = k^2 d(p, [a, b])^2`` and ``T = exp(-e)``,

    D     = softplus(l) - l T - e T + (1 - T) log(1 - T)
    dD/dl = sigmoid(l) - T
    dD/de = T (e + log(1 - T) + l)          (gradient towards the segment and sigma, on request)

Each program owns a block of BLOCK_C channels of one row n and walks their maps in BLOCK_H x BLOCK_W
tiles, accumulating in fp32 registers: no atomics, deterministic results. Pixel coordinates come from the
tile's position (no integer division per pixel); offsets are 64-bit and the logits are read with their
own strides, so channel-sliced, transposed and channels-last logits are read in place (channels-last
tiles span 16 channels of a pixel row, so reads stay coalesced), and the gradient is written in the
logits' own layout.

A tile whose every pixel lies farther than ``sqrt(E_SKIP) / k`` (about 14.5 sigma) from the segments of
its channels takes the background path (per band of tile rows, the kernels work out the columns the
segments can reach): there ``T = exp(-e)`` rounds to exactly 0 in float32, so
``D = softplus(l)`` and ``dD/dl = sigmoid(l)`` with no target, exponent or entropy term, which is
exactly what the full path would compute.

``pose_score`` makes three launches for a forward and backward: the divergence kernel, a per-sample
weighting kernel that writes the scores (and the weight sums backward needs), and one backward kernel
that forms each row's coefficient ``-g_b w / sum(w)`` itself.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

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

TILE = 512  # elements (channels x pixels) per program step: 16 x 32 pixel tiles of one map
# Smaller tiles follow the keypoints' neighbourhoods more closely, so fewer pixels take the full path (at
# (24, 127, 192, 192) with sigma 2: 26% of the tiles instead of 30% with 32 x 32 tiles); each tile is one
# warp's work in the forward.
# Per kernel: elements per thread and step, and the programs a launch aims for (rows' maps are split into
# parts until it has about that many). The forward is bound by instruction issue: 16 elements per thread
# spread a tile's fixed costs (the tile test, addresses, the branch); where a band of rows is a single
# tile, 8 (16 would exceed MAX_REGISTERS there and spill). The backward is bound by memory: 8 per thread
# and short programs keep more loads in flight and the last wave small; 4 when it also computes segment
# and sigma gradients, which keep more values live per element.
FORWARD = {"elements_per_thread": 16, "target_programs": 4096, "single_tile_elements_per_thread": 8}
BACKWARD = {"elements_per_thread": 8, "target_programs": 16384}
BACKWARD_TARGET_GRAD = {**BACKWARD, "elements_per_thread": 4}
MAX_REGISTERS = 128
"""ptxas's register cap per thread for every kernel: at most 128 keeps 16 or more warps resident per SM
(25% occupancy) on sm_80 and sm_90, whatever the variant (``tests/test_kernel_compile.py`` checks that no
variant spills under it)."""
CHANNELS_LAST_BLOCK = 16  # channels per tile of channels-last logits: 32 contiguous bytes of bf16 per pixel
E_CUT = 104.0  # T = exp(-e) rounds to 0 in float32 for e >= E_CUT (exp(-104) < 2^-150)
E_SKIP = 105.0  # a tile takes the background path when e > E_SKIP at every pixel (margin for rounding)
E_MAX = 128.0  # e is clamped here (T is 0 either way), so that e * T never meets inf * 0
FLT_MAX = 3.4028234663852886e38
LOG2E = 1.4426950408889634
SQRT1_2 = 0.7071067811865476

LOG1P_OVER_Z = (
    0.9999999403953552, -0.4999944567680359, 0.3331812024116516, -0.2483539879322052, 0.19076880812644958,
    -0.13602247834205627, 0.0775160863995552, -0.029074065387248993, 0.005126102361828089,
)
"""Power-basis coefficients (float32) of g(z) = log1p(z) / z on [0, 1]: its Chebyshev interpolant at 9
nodes (degree 8). Max relative error of z g(z) against log1p(z): 9e-8 exactly, 2.4e-7 evaluated in
float32."""

LOG1P_OVER_F = (
    1.0, -0.49999934434890747, 0.33333271741867065, -0.25007930397987366, 0.20007233321666718,
    -0.16414520144462585, 0.140558123588562, -0.15394271910190582, 0.13748309016227722,
)
"""The same for log1p(f) / f on [-1/3, 1/3] (9 nodes, degree 8), the reduced argument of ``_log_unit``:
1.4e-7 relative error of the logarithm in float32 over the normal floats in (0, 1]."""
ONE_MINUS_EXP_OVER_E = (
    1.0, -0.4999998211860657, 0.16666242480278015, -0.04163007438182831, 0.008189613930881023,
    -0.0011234042467549443,
)
"""The same for (1 - exp(-e)) / e on [0, 0.5] (6 nodes, degree 5): 1.1e-7 relative error of 1 - exp(-e)
in float32."""
FLT_MIN = 1.1754943508222875e-38

COMPILED_KERNEL_STATS: dict[str, dict[str, int]] = {}
"""Registers and spills of the compiled kernels seen so far on CUDA, keyed by kernel and block sizes."""


if HAS_TRITON:
    # kernels read module constants only as constexprs
    _LOG2E, _SQRT1_2, _E_MAX, _FLT_MAX, _E_SKIP = (tl.constexpr(v) for v in (LOG2E, SQRT1_2, E_MAX, FLT_MAX, E_SKIP))
    _G0, _G1, _G2, _G3, _G4, _G5, _G6, _G7, _G8 = (tl.constexpr(v) for v in LOG1P_OVER_Z)
    _H0, _H1, _H2, _H3, _H4, _H5, _H6, _H7, _H8 = (tl.constexpr(v) for v in LOG1P_OVER_F)
    _P0, _P1, _P2, _P3, _P4, _P5 = (tl.constexpr(v) for v in ONE_MINUS_EXP_OVER_E)
    _LN2, _FLT_MIN = tl.constexpr(math.log(2.0)), tl.constexpr(FLT_MIN)

    @triton.jit
    def _softplus(l):
        """max(l, 0) + log1p(z), z = exp(-|l|) in (0, 1], with log1p(z) = z g(z): g(z) = log1p(z) / z is a
        degree-8 polynomial (``LOG1P_OVER_Z``), 2.4e-7 relative error in float32. One special function
        (the exp) per element instead of an exp, a log and a division."""
        b_z = tl.exp2(-tl.abs(l) * _LOG2E)
        b_g = _G8 * b_z + _G7
        b_g = b_g * b_z + _G6
        b_g = b_g * b_z + _G5
        b_g = b_g * b_z + _G4
        b_g = b_g * b_z + _G3
        b_g = b_g * b_z + _G2
        b_g = b_g * b_z + _G1
        b_g = b_g * b_z + _G0
        return tl.maximum(l, 0.0) + b_z * b_g

    @triton.jit
    def _sigmoid(l):
        """1 / (1 + z) as rsqrt(1 + z)^2 (one special function, 2.6e-7 relative error), z = exp(-|l|)."""
        b_z = tl.exp2(-tl.abs(l) * _LOG2E)
        b_r = tl.math.rsqrt(1.0 + b_z)
        b_r = b_r * b_r
        return tl.where(l >= 0.0, b_r, b_z * b_r)

    @triton.jit
    def _log_unit(u):
        """log(u) for u in (0, 1] (clamped to the smallest normal float): u = 2^i m with m in [2/3, 4/3) from
        the bits, log(u) = i log(2) + f h(f), f = m - 1, h the polynomial ``LOG1P_OVER_F``; no special
        cases to handle, unlike a general log."""
        b_bits = tl.maximum(u, _FLT_MIN).to(tl.int32, bitcast=True)
        b_exponent = (b_bits - 0x3F2AAAAB) >> 23
        b_f = (b_bits - (b_exponent << 23)).to(tl.float32, bitcast=True) - 1.0
        b_h = _H8 * b_f + _H7
        b_h = b_h * b_f + _H6
        b_h = b_h * b_f + _H5
        b_h = b_h * b_f + _H4
        b_h = b_h * b_f + _H3
        b_h = b_h * b_f + _H2
        b_h = b_h * b_f + _H1
        b_h = b_h * b_f + _H0
        return b_exponent.to(tl.float32) * _LN2 + b_f * b_h

    @triton.jit
    def _one_minus_exp_neg(e, b_target):
        """1 - exp(-e) without cancellation: e phi(e) where e < 0.5 (phi(e) = (1 - exp(-e)) / e, the
        polynomial ``ONE_MINUS_EXP_OVER_E``), 1 - T beyond (there T <= 0.61: the subtraction loses nothing)."""
        b_p = _P5 * e + _P4
        b_p = b_p * e + _P3
        b_p = b_p * e + _P2
        b_p = b_p * e + _P1
        b_p = b_p * e + _P0
        return tl.where(e < 0.5, b_p * e, 1.0 - b_target)

    @triton.jit
    def _channel_geometry(seg_ptr, sigma_ptr, o_n, o_c, m_c, stride_sn, stride_sc, stride_se, stride_sx, k_value,
                          HAS_SIGMA_TENSOR: tl.constexpr):
        """Per channel: start a, direction b - a, the projection factors (b - a) / |b - a|^2 (0 for a joint),
        k = 1 / (sqrt(2) sigma) clamped to the float32 range, and sigma."""
        o_s = o_n * stride_sn + o_c * stride_sc
        b_ax = tl.load(seg_ptr + o_s, mask=m_c, other=0.0)
        b_ay = tl.load(seg_ptr + o_s + stride_sx, mask=m_c, other=0.0)
        b_abx = tl.load(seg_ptr + o_s + stride_se, mask=m_c, other=0.0) - b_ax
        b_aby = tl.load(seg_ptr + o_s + stride_se + stride_sx, mask=m_c, other=0.0) - b_ay
        b_len2 = b_abx * b_abx + b_aby * b_aby
        b_inv_len2 = tl.where(b_len2 > 0.0, 1.0 / tl.where(b_len2 > 0.0, b_len2, 1.0), 0.0)
        if HAS_SIGMA_TENSOR:
            b_sigma = tl.load(sigma_ptr + o_c, mask=m_c, other=1.0)
            b_k = tl.minimum(_SQRT1_2 / b_sigma, _FLT_MAX)
        else:
            b_sigma = tl.full(b_ax.shape, 1.0, tl.float32)
            b_k = tl.full(b_ax.shape, 1.0, tl.float32) * k_value
        return b_ax, b_ay, b_abx, b_aby, b_abx * b_inv_len2, b_aby * b_inv_len2, b_k, b_sigma

    @triton.jit
    def _band_columns(y0, b_ax, b_ay, b_abx, b_aby, b_radius, m_c, BLOCK_H: tl.constexpr):
        """The columns [lo, hi] outside which no channel's target is non-zero in the band of pixel rows
        [y0, y0 + BLOCK_H - 1]: the x-range of the segment part within R of the band's rows, grown by R
        (R = sqrt(E_SKIP) / k, beyond which e > E_SKIP). Empty: lo > hi. NaN geometry spans everything."""
        b_ylo = y0 - b_radius - b_ay
        b_yhi = (y0 + (BLOCK_H - 1)) + b_radius - b_ay
        b_flat = b_aby == 0.0
        b_inv = 1.0 / tl.where(b_flat, 1.0, b_aby)
        b_t1 = b_ylo * b_inv
        b_t2 = b_yhi * b_inv
        b_inside = (b_ylo <= 0.0) & (b_yhi >= 0.0)  # a horizontal segment's row lies in the grown band
        b_tlo = tl.where(b_flat, tl.where(b_inside, 0.0, 1.0), tl.maximum(tl.minimum(b_t1, b_t2), 0.0))
        b_thi = tl.where(b_flat, tl.where(b_inside, 1.0, 0.0), tl.minimum(tl.maximum(b_t1, b_t2), 1.0))
        b_xa = b_ax + b_tlo * b_abx
        b_xb = b_ax + b_thi * b_abx
        b_empty = (b_tlo > b_thi) | (m_c == 0)
        b_lo = tl.where(b_empty, float("inf"), tl.minimum(b_xa, b_xb) - b_radius)
        b_hi = tl.where(b_empty, -float("inf"), tl.maximum(b_xa, b_xb) + b_radius)
        b_lo = tl.where(b_lo == b_lo, b_lo, -float("inf"))
        b_hi = tl.where(b_hi == b_hi, b_hi, float("inf"))
        return tl.min(b_lo, axis=0), tl.max(b_hi, axis=0)

    @triton.jit
    def _tile_targets(x0, y0, f_w, f_h, b_ax, b_ay, b_abx, b_aby, b_ux, b_uy, b_k):
        """For channels x the tile's pixels at (x0, y0) + (f_w, f_h): the clamped projection t onto the
        segment, p - q (q the closest point), e = k^2 |p - q|^2 (clamped to E_MAX) and T = exp(-e)."""
        b_px = f_w[None, None, :] + (x0 - b_ax)[:, None, None]
        b_py = f_h[None, :, None] + (y0 - b_ay)[:, None, None]
        b_t = b_px * b_ux[:, None, None] + b_py * b_uy[:, None, None]
        b_t = tl.minimum(tl.maximum(b_t, 0.0), 1.0)
        b_dx = b_px - b_t * b_abx[:, None, None]
        b_dy = b_py - b_t * b_aby[:, None, None]
        b_dxk = b_dx * b_k[:, None, None]
        b_dyk = b_dy * b_k[:, None, None]
        b_e = tl.minimum(b_dxk * b_dxk + b_dyk * b_dyk, _E_MAX, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN
        return b_t, b_dx, b_dy, b_e, tl.exp2(-b_e * _LOG2E)

    @triton.jit
    def _divergence_fwd_kernel(
        l_ptr, seg_ptr, sigma_ptr, out_ptr,
        n_channels, n_channel_blocks, n_parts, bands_per_part, height, width,
        stride_n, stride_c, stride_h, stride_w,
        stride_sn, stride_sc, stride_se, stride_sx,
        k_value, inv_n_pixels,
        HAS_SIGMA_TENSOR: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ):  # fmt: skip
        i_p = tl.program_id(0)
        i_part = i_p % n_parts
        i_rows = i_p // n_parts
        i_n = (i_rows // n_channel_blocks).to(tl.int64)
        o_c = (i_rows % n_channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        m_c = o_c < n_channels
        b_ax, b_ay, b_abx, b_aby, b_ux, b_uy, b_k, b_sigma = _channel_geometry(
            seg_ptr, sigma_ptr, i_n, o_c, m_c, stride_sn, stride_sc, stride_se, stride_sx, k_value, HAS_SIGMA_TENSOR)
        b_radius = tl.sqrt(_E_SKIP) / b_k
        f_h = tl.arange(0, BLOCK_H).to(tl.float32)
        f_w = tl.arange(0, BLOCK_W).to(tl.float32)
        o_base = i_n * stride_n + o_c.to(tl.int64) * stride_c
        b_acc = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], dtype=tl.float32)
        h_start = i_part * bands_per_part * BLOCK_H
        for h0 in range(h_start, tl.minimum(h_start + bands_per_part * BLOCK_H, height), BLOCK_H):
            o_h = h0 + tl.arange(0, BLOCK_H)
            m_h = o_h < height
            o_row = o_h.to(tl.int64) * stride_h
            lo, hi = _band_columns(h0 * 1.0, b_ax, b_ay, b_abx, b_aby, b_radius, m_c, BLOCK_H)
            for w0 in range(0, width, BLOCK_W):
                o_w = w0 + tl.arange(0, BLOCK_W)
                m = m_c[:, None, None] & m_h[None, :, None] & (o_w < width)[None, None, :]
                o_l = o_base[:, None, None] + o_row[None, :, None] + (o_w.to(tl.int64) * stride_w)[None, None, :]
                # masked pixels read -inf, whose softplus is 0: the background path needs no mask
                b_l = tl.load(l_ptr + o_l, mask=m, other=-float("inf")).to(tl.float32)
                if (w0 + (BLOCK_W - 1) >= lo) & (w0 <= hi):
                    b_t, b_dx, b_dy, b_e, b_target = _tile_targets(
                        w0 * 1.0, h0 * 1.0, f_w, f_h, b_ax, b_ay, b_abx, b_aby, b_ux, b_uy, b_k)
                    b_u = _one_minus_exp_neg(b_e, b_target)
                    b_d = _softplus(b_l) - b_target * (b_l + b_e) + b_u * _log_unit(b_u)
                    b_acc += tl.where(m, b_d, 0.0)
                else:
                    b_acc += _softplus(b_l)
        b_row = tl.sum(tl.sum(b_acc, axis=2), axis=1) * inv_n_pixels
        tl.store(out_ptr + (i_n * n_channels + o_c) * n_parts + i_part, b_row, mask=m_c)

    @triton.jit
    def _pose_score_kernel(
        div_ptr, w_ptr, score_ptr, wsum_ptr,
        n_views, n_channels, n_parts, stride_wn, stride_wc, eps,
        BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """S_b = -sum_{v,c} w div / max(sum w, eps) per sample; rows of weight exactly 0 add nothing (their
        divergence may be anything, NaN included)."""
        i_b = tl.program_id(0).to(tl.int64)
        b_wd = tl.zeros([BLOCK_V, BLOCK_C], dtype=tl.float32)
        b_w = tl.zeros([BLOCK_V, BLOCK_C], dtype=tl.float32)
        for v0 in range(0, n_views, BLOCK_V):
            o_n = i_b * n_views + v0 + tl.arange(0, BLOCK_V)
            m_v = (v0 + tl.arange(0, BLOCK_V)) < n_views
            for c0 in range(0, n_channels, BLOCK_C):
                o_c = c0 + tl.arange(0, BLOCK_C)
                m = m_v[:, None] & (o_c < n_channels)[None, :]
                b_wi = tl.load(w_ptr + o_n[:, None] * stride_wn + o_c[None, :] * stride_wc, mask=m, other=0.0)
                o_div = (o_n[:, None] * n_channels + o_c[None, :]) * n_parts
                b_di = tl.zeros([BLOCK_V, BLOCK_C], dtype=tl.float32)
                for i_part in range(0, n_parts):  # a row's divergence: the sum of its parts
                    b_di += tl.load(div_ptr + o_div + i_part, mask=m, other=0.0)
                b_w += b_wi
                b_wd += tl.where(b_wi == 0.0, 0.0, b_wi * b_di)
        wsum = tl.sum(tl.sum(b_w, axis=1), axis=0)
        tl.store(wsum_ptr + i_b, wsum)
        tl.store(score_ptr + i_b, -tl.sum(tl.sum(b_wd, axis=1), axis=0) / tl.maximum(wsum, eps))

    @triton.jit
    def _divergence_bwd_kernel(
        l_ptr, seg_ptr, sigma_ptr, g_ptr, w_ptr, wsum_ptr, dl_ptr, dseg_ptr, dsigma_ptr,
        n_channels, n_channel_blocks, n_parts, bands_per_part, height, width, n_views,
        stride_n, stride_c, stride_h, stride_w,
        stride_dn, stride_dc, stride_dh, stride_dw,
        stride_sn, stride_sc, stride_se, stride_sx,
        stride_gn, stride_gc, stride_wn, stride_wc,
        k_value, inv_n_pixels, eps,
        HAS_SIGMA_TENSOR: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
        NEEDS_LOGITS_GRAD: tl.constexpr, NEEDS_TARGET_GRAD: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ):  # fmt: skip
        """Gradients of sum_{n,c} coef[n, c] div[n, c]; coef = g[n, c] (the divergence's upstream
        gradient), or with weights -g[b] w[n, c] / max(sum_b w, eps) (``pose_score``'s)."""
        i_p = tl.program_id(0)
        i_part = i_p % n_parts
        i_rows = i_p // n_parts
        i_n = (i_rows // n_channel_blocks).to(tl.int64)
        o_c = (i_rows % n_channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        m_c = o_c < n_channels
        if HAS_WEIGHTS:
            i_b = i_n // n_views
            b_w = tl.load(w_ptr + i_n * stride_wn + o_c * stride_wc, mask=m_c, other=0.0)
            b_coef = -tl.load(g_ptr + i_b * stride_gn) * b_w / tl.maximum(tl.load(wsum_ptr + i_b), eps)
            m_c = m_c & (b_w != 0.0)  # a row of weight 0 has a zero gradient whatever its segment holds
        else:
            b_coef = tl.load(g_ptr + i_n * stride_gn + o_c * stride_gc, mask=m_c, other=0.0)
        b_coef = tl.where(m_c, b_coef * inv_n_pixels, 0.0)
        b_ax, b_ay, b_abx, b_aby, b_ux, b_uy, b_k, b_sigma = _channel_geometry(
            seg_ptr, sigma_ptr, i_n, o_c, m_c, stride_sn, stride_sc, stride_se, stride_sx, k_value, HAS_SIGMA_TENSOR)
        b_radius = tl.sqrt(_E_SKIP) / b_k
        f_h = tl.arange(0, BLOCK_H).to(tl.float32)
        f_w = tl.arange(0, BLOCK_W).to(tl.float32)
        o_base = i_n * stride_n + o_c.to(tl.int64) * stride_c
        o_grad_base = i_n * stride_dn + o_c.to(tl.int64) * stride_dc
        m_store = o_c < n_channels
        if NEEDS_TARGET_GRAD:  # per-channel sums, reduced tile by tile (per-pixel accumulators cost registers)
            b_acc_ax = tl.zeros([BLOCK_C], dtype=tl.float32)
            b_acc_ay = tl.zeros([BLOCK_C], dtype=tl.float32)
            b_acc_bx = tl.zeros([BLOCK_C], dtype=tl.float32)
            b_acc_by = tl.zeros([BLOCK_C], dtype=tl.float32)
            b_acc_e = tl.zeros([BLOCK_C], dtype=tl.float32)
        h_start = i_part * bands_per_part * BLOCK_H
        for h0 in range(h_start, tl.minimum(h_start + bands_per_part * BLOCK_H, height), BLOCK_H):
            o_h = h0 + tl.arange(0, BLOCK_H)
            m_h = o_h < height
            o_row = o_h.to(tl.int64) * stride_h
            lo, hi = _band_columns(h0 * 1.0, b_ax, b_ay, b_abx, b_aby, b_radius, m_c, BLOCK_H)
            o_grad_row = o_h.to(tl.int64) * stride_dh
            for w0 in range(0, width, BLOCK_W):
                o_w = w0 + tl.arange(0, BLOCK_W)
                m_p = m_h[None, :, None] & (o_w < width)[None, None, :]
                m = m_c[:, None, None] & m_p
                o_l = o_base[:, None, None] + o_row[None, :, None] + (o_w.to(tl.int64) * stride_w)[None, None, :]
                b_l = tl.load(l_ptr + o_l, mask=m, other=0.0).to(tl.float32)
                if (w0 + (BLOCK_W - 1) >= lo) & (w0 <= hi):
                    b_t, b_dx, b_dy, b_e, b_target = _tile_targets(
                        w0 * 1.0, h0 * 1.0, f_w, f_h, b_ax, b_ay, b_abx, b_aby, b_ux, b_uy, b_k)
                    if NEEDS_LOGITS_GRAD:
                        b_dl = b_coef[:, None, None] * (_sigmoid(b_l) - b_target)
                    if NEEDS_TARGET_GRAD:
                        b_u = _one_minus_exp_neg(b_e, b_target)
                        b_dd_de = b_target * (b_e + _log_unit(b_u) + b_l)
                        b_dd_de = tl.where(m, b_dd_de, 0.0)
                        b_acc_ax += tl.sum(tl.sum(b_dd_de * b_dx * (1.0 - b_t), axis=2), axis=1)
                        b_acc_ay += tl.sum(tl.sum(b_dd_de * b_dy * (1.0 - b_t), axis=2), axis=1)
                        b_acc_bx += tl.sum(tl.sum(b_dd_de * b_dx * b_t, axis=2), axis=1)
                        b_acc_by += tl.sum(tl.sum(b_dd_de * b_dy * b_t, axis=2), axis=1)
                        b_acc_e += tl.sum(tl.sum(b_dd_de * b_e, axis=2), axis=1)
                else:
                    if NEEDS_LOGITS_GRAD:
                        b_dl = b_coef[:, None, None] * _sigmoid(b_l)
                if NEEDS_LOGITS_GRAD:
                    o_dl = (o_grad_base[:, None, None] + o_grad_row[None, :, None]
                            + (o_w.to(tl.int64) * stride_dw)[None, None, :])
                    tl.store(dl_ptr + o_dl, b_dl.to(dl_ptr.dtype.element_ty), mask=m_store[:, None, None] & m_p)
        if NEEDS_TARGET_GRAD:
            # de/da = -2 k^2 (p - q)(1 - t), de/db = -2 k^2 (p - q) t, de/dsigma = -2 e / sigma
            b_scale = -2.0 * b_coef * b_k * b_k
            o_dseg = ((i_n * n_channels + o_c) * n_parts + i_part) * 4
            tl.store(dseg_ptr + o_dseg + 0, b_scale * b_acc_ax, mask=m_store)
            tl.store(dseg_ptr + o_dseg + 1, b_scale * b_acc_ay, mask=m_store)
            tl.store(dseg_ptr + o_dseg + 2, b_scale * b_acc_bx, mask=m_store)
            tl.store(dseg_ptr + o_dseg + 3, b_scale * b_acc_by, mask=m_store)
            if HAS_SIGMA_TENSOR:
                b_dsigma = -2.0 * b_coef / b_sigma * b_acc_e
                tl.store(dsigma_ptr + (i_n * n_channels + o_c) * n_parts + i_part, b_dsigma, mask=m_store)


# --------------------------------------------------------------------------------------------------
# Launch settings


def _block_side(size: int) -> int:
    """Tile side along a map's contiguous axis: 16 or 32, whichever pads ``size`` less (32 on a tie)."""
    if size <= 16:
        return triton.next_power_of_2(size)
    return min((32, 16), key=lambda side: triton.cdiv(size, side) * side)


def launch_config(channels: int, height: int, width: int, strides: tuple[int, int, int, int],
                  elements_per_thread: int) -> dict[str, int]:
    """Tile shape (channels x rows x columns) and warps from the map size and the logits' layout."""
    _, stride_c, stride_h, stride_w = strides
    pow2 = triton.next_power_of_2
    if stride_c == 1 and channels > 1 and stride_w != 1 and stride_h != 1:  # channels-last
        block_c = min(pow2(channels), CHANNELS_LAST_BLOCK)
        block_w = min(pow2(width), TILE // block_c)
        block_h = min(pow2(height), TILE // (block_c * block_w))
    else:
        if stride_h == 1 and stride_w != 1:  # transposed maps: tall tiles
            block_h = _block_side(height)
            block_w = min(pow2(width), TILE // block_h)
        else:
            block_w = _block_side(width)
            block_h = min(pow2(height), TILE // block_w)
        block_c = min(pow2(channels), max(1, TILE // (block_h * block_w)))
    elements = block_c * block_h * block_w
    num_warps = max(1, min(8, elements // (32 * elements_per_thread)))
    return {"BLOCK_C": block_c, "BLOCK_H": block_h, "BLOCK_W": block_w, "num_warps": num_warps}


def _k_value(sigma: float) -> float:
    """k = 1 / (sqrt(2) sigma), clamped to the float32 range (the kernels' scalar is float32)."""
    return min(SQRT1_2 / sigma, FLT_MAX)


def _new_output(shape, device, dtype) -> torch.Tensor:
    """Allocation of every kernel output (tests replace it with NaN-filled tensors to catch unwritten elements)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _new_gradient(logits: torch.Tensor) -> torch.Tensor:
    """The logits' gradient, in the logits' memory layout (channels-last stays channels-last)."""
    return _new_output(logits.shape, logits.device, logits.dtype).as_strided(
        logits.shape, torch.empty_like(logits, device="meta").stride())


def _record_stats(name: str, compiled, config: dict) -> None:
    n_regs = getattr(compiled, "n_regs", None)
    if n_regs is None:
        return
    key = f"{name}[" + ",".join(f"{k}={v}" for k, v in sorted(config.items()) if k.startswith(("BLOCK", "num"))) + "]"
    COMPILED_KERNEL_STATS[key] = {"n_regs": int(n_regs), "n_spills": int(getattr(compiled, "n_spills", -1))}


def _device_guard(t: torch.Tensor):
    """Launch on the tensor's own GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch as the launchers decide it: kernel, grid, arguments and compile-time settings.

    ``bytes`` is the launch's O(N*C*H*W) traffic (logits read, gradient written); ``elements`` the heatmap
    elements it covers; ``tile`` the elements one program handles per step of its tile loop (0: no loop
    over heatmap pixels) and ``loops`` the iterations of its nested loops per program (bands of tile rows,
    tiles per band).
    """

    name: str
    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict
    bytes: int
    elements: int
    tile: int
    loops: tuple = ()

    def run(self):
        with _device_guard(self.args[0]):
            compiled = self.kernel[self.grid](*self.args, **self.constexprs)
        _record_stats(self.name, compiled, self.constexprs)
        return compiled


@dataclass(frozen=True)
class Targets:
    """Canonical target inputs of the kernels: float32 segments (N, C, 2, 2) of any strides, and sigma as a
    (C,) float32 tensor or through ``k_value``."""

    segments: torch.Tensor
    sigma_tensor: torch.Tensor | None
    k_value: float

    @classmethod
    def from_checked(cls, checked: CheckedInputs) -> "Targets":
        segments = checked.segments if checked.segments.dtype == torch.float32 else checked.segments.float()
        if isinstance(checked.sigma, torch.Tensor):
            sigma = checked.sigma if checked.sigma.dtype == torch.float32 else checked.sigma.float()
            return cls(segments, sigma.contiguous(), 1.0)
        return cls(segments, None, _k_value(checked.sigma))

    def args(self) -> tuple:
        sigma = self.sigma_tensor if self.sigma_tensor is not None else self.segments
        return (self.segments, sigma)


@dataclass(frozen=True)
class Split:
    """How a launch divides the work: programs of BLOCK_C channels of one row, each over ``bands_per_part``
    bands of tile rows; a row's maps are split into ``parts`` when rows alone would give too few programs
    (the forward then writes one partial sum per part)."""

    channel_blocks: int
    bands: int
    parts: int
    bands_per_part: int
    tiles_per_band: int

    @classmethod
    def of(cls, logits_shape, config: dict, target_programs: int) -> "Split":
        n, c, h, w = logits_shape
        channel_blocks = triton.cdiv(c, config["BLOCK_C"])
        bands = triton.cdiv(h, config["BLOCK_H"])
        wanted = min(bands, max(1, triton.cdiv(target_programs, max(1, n * channel_blocks))))
        bands_per_part = triton.cdiv(bands, wanted)
        return cls(channel_blocks, bands, triton.cdiv(bands, bands_per_part), bands_per_part,
                   triton.cdiv(w, config["BLOCK_W"]))

    def grid(self, rows: int) -> tuple[int]:
        return (rows * self.channel_blocks * self.parts,)

    def args(self) -> tuple[int, int, int]:
        return (self.channel_blocks, self.parts, self.bands_per_part)

    @property
    def loops(self) -> tuple[int, int]:
        return (self.bands_per_part, self.tiles_per_band)


def kernel_split(logits: torch.Tensor, settings: dict) -> tuple[dict, Split]:
    """Launch configuration and work split of the forward (``FORWARD``) or backward (``BACKWARD``) kernel."""
    n, c, h, w = logits.shape
    config = launch_config(c, h, w, logits.stride(), settings["elements_per_thread"])
    split = Split.of(logits.shape, config, settings["target_programs"])
    if split.tiles_per_band == 1 and "single_tile_elements_per_thread" in settings:
        # one tile per band of rows: the tile loop runs once per band, and 16 elements per thread would
        # exceed MAX_REGISTERS and spill; the tile shape (and so the split) stays the same
        config = launch_config(c, h, w, logits.stride(), settings["single_tile_elements_per_thread"])
    return config, split


def forward_launch(logits: torch.Tensor, targets: Targets, partials: torch.Tensor) -> KernelLaunch:
    """The divergence kernel's launch, writing partial sums (N, C, parts) (reads no data: meta tensors work)."""
    n, c, h, w = logits.shape
    config, split = kernel_split(logits, FORWARD)
    args = (logits, *targets.args(), partials, c, *split.args(), h, w, *logits.stride(), *targets.segments.stride(),
            targets.k_value, 1.0 / (h * w))
    return KernelLaunch("forward", _divergence_fwd_kernel, split.grid(n), args,
                        dict(HAS_SIGMA_TENSOR=targets.sigma_tensor is not None, **config, maxnreg=MAX_REGISTERS),
                        bytes=logits.numel() * logits.element_size(), elements=logits.numel(),
                        tile=config["BLOCK_C"] * config["BLOCK_H"] * config["BLOCK_W"], loops=split.loops)


def score_launch(partials: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor, weight_sums: torch.Tensor,
                 num_views: int) -> KernelLaunch:
    """The per-sample weighting kernel's launch: divergence partials (N, C, parts) and weights (N, C) ->
    scores and weight sums (B,)."""
    n, c, parts = partials.shape
    block_v = min(triton.next_power_of_2(num_views), 8)
    block_c = min(triton.next_power_of_2(c), 128)
    args = (partials, weights, scores, weight_sums, num_views, c, parts, *weights.stride(), reference.WEIGHT_EPS)
    return KernelLaunch("score", _pose_score_kernel, (n // num_views,), args,
                        dict(BLOCK_V=block_v, BLOCK_C=block_c, num_warps=1, maxnreg=MAX_REGISTERS),
                        bytes=0, elements=0, tile=0)


def backward_launch(logits: torch.Tensor, targets: Targets, grad_out: torch.Tensor, weights, weight_sums, num_views,
                    grad_logits, grad_segments, grad_sigma_rows, needs_target_grad: bool) -> KernelLaunch:
    """The backward kernel's launch (reads no data: meta tensors work). With ``weights`` the upstream
    gradient is ``pose_score``'s (B,), otherwise the divergence's (N, C). Segment and sigma gradients
    are written per part: (N, C, parts, 4) and (N, C, parts)."""
    n, c, h, w = logits.shape
    config, split = kernel_split(logits, BACKWARD_TARGET_GRAD if needs_target_grad else BACKWARD)
    has_weights = weights is not None
    g_strides = (grad_out.stride(0), 0) if has_weights else grad_out.stride()
    w_strides = weights.stride() if has_weights else (0, 0)
    dl = grad_logits if grad_logits is not None else logits
    args = (logits, *targets.args(), grad_out, weights if has_weights else grad_out,
            weight_sums if has_weights else grad_out, dl,
            grad_segments if grad_segments is not None else grad_out,
            grad_sigma_rows if grad_sigma_rows is not None else grad_out,
            c, *split.args(), h, w, num_views, *logits.stride(), *dl.stride(), *targets.segments.stride(),
            *g_strides, *w_strides, targets.k_value, 1.0 / (h * w), reference.WEIGHT_EPS)
    constexprs = dict(HAS_SIGMA_TENSOR=targets.sigma_tensor is not None, HAS_WEIGHTS=has_weights,
                      NEEDS_LOGITS_GRAD=grad_logits is not None, NEEDS_TARGET_GRAD=needs_target_grad, **config,
                      maxnreg=MAX_REGISTERS)
    per_pass = logits.numel() * logits.element_size()
    return KernelLaunch("backward", _divergence_bwd_kernel, split.grid(n), args, constexprs,
                        bytes=per_pass * (2 if grad_logits is not None else 1), elements=logits.numel(),
                        tile=config["BLOCK_C"] * config["BLOCK_H"] * config["BLOCK_W"], loops=split.loops)


def near_tiles(segments: torch.Tensor, sigma, height: int, width: int, config: dict) -> torch.Tensor:
    """Which tiles the kernels take on the full path, (N, channel blocks, tiles down, tiles across) bool:
    the kernels' test (``_band_columns``) in PyTorch float32, for the static model and the tests."""
    seg = segments.detach().float().cpu()
    if seg.dim() == 3:
        seg = seg.unsqueeze(2).expand(-1, -1, 2, -1)
    n, c = seg.shape[:2]
    block_c, block_h, block_w = config["BLOCK_C"], config["BLOCK_H"], config["BLOCK_W"]
    if isinstance(sigma, torch.Tensor):
        k = (SQRT1_2 / sigma.detach().float().cpu()).clamp_max(FLT_MAX).expand(c)
    else:
        k = torch.full((c,), _k_value(float(sigma)), dtype=torch.float32)
    blocks = -(-c // block_c)
    pad = blocks * block_c - c
    ax, ay = seg[..., 0, 0], seg[..., 0, 1]
    abx, aby = seg[..., 1, 0] - ax, seg[..., 1, 1] - ay
    radius = torch.sqrt(torch.tensor(E_SKIP)) / k
    y0 = torch.arange(0, height, block_h, dtype=torch.float32)[:, None, None]  # (bands, N, C)
    ylo, yhi = y0 - radius - ay, (y0 + (block_h - 1)) + radius - ay
    flat = aby == 0
    inv = 1.0 / torch.where(flat, torch.ones_like(aby), aby)
    t1, t2 = ylo * inv, yhi * inv
    inside = (ylo <= 0) & (yhi >= 0)
    tlo = torch.where(flat, torch.where(inside, 0.0, 1.0), torch.minimum(t1, t2).clamp_min(0.0))
    thi = torch.where(flat, torch.where(inside, 1.0, 0.0), torch.maximum(t1, t2).clamp_max(1.0))
    xa, xb = ax + tlo * abx, ax + thi * abx
    empty = tlo > thi
    lo = torch.where(empty, math.inf, torch.minimum(xa, xb) - radius)
    hi = torch.where(empty, -math.inf, torch.maximum(xa, xb) + radius)
    lo = torch.nn.functional.pad(torch.nan_to_num(lo, nan=-math.inf, posinf=math.inf, neginf=-math.inf), (0, pad),
                                 value=math.inf)
    hi = torch.nn.functional.pad(torch.nan_to_num(hi, nan=math.inf, posinf=math.inf, neginf=-math.inf), (0, pad),
                                 value=-math.inf)
    lo = lo.view(len(y0), n, blocks, block_c).amin(-1)
    hi = hi.view(len(y0), n, blocks, block_c).amax(-1)
    x0 = torch.arange(0, width, block_w, dtype=torch.float32)
    near = (x0 + (block_w - 1) >= lo[..., None]) & (x0 <= hi[..., None])  # (bands, N, blocks, tiles across)
    return near.permute(1, 2, 0, 3)


def static_launches(logits, segments, sigma, weights=None, num_views: int = 1, needs_target_grad: bool = False
                    ) -> list[KernelLaunch]:
    """The kernel launches of one fused forward + backward (``pose_score`` when weights are given, else
    ``heatmap_divergence``) for these inputs, without running them: what a compiler for real targets needs."""
    checked = check_inputs(logits, segments, sigma)
    targets = Targets.from_checked(checked)
    n, c = logits.shape[:2]
    device = logits.device
    parts = kernel_split(logits, FORWARD)[1].parts
    partials = torch.empty((n, c, parts), device=device)
    backward_parts = kernel_split(logits, BACKWARD)[1].parts
    grad_segments = torch.empty((n, c, backward_parts, 4), device=device) if needs_target_grad else None
    has_sigma_grad = needs_target_grad and targets.sigma_tensor is not None
    grad_sigma_rows = torch.empty((n, c, backward_parts), device=device) if has_sigma_grad else None
    launches = [forward_launch(logits, targets, partials)]
    if weights is not None:
        weights = check_weights(weights, logits, num_views).reshape(n, c)
        sums = torch.empty((n // num_views,), device=device)
        launches.append(score_launch(partials, weights, sums, sums, num_views))
        upstream = sums
    else:
        upstream = partials[..., 0]
    launches.append(backward_launch(logits, targets, upstream, weights, sums if weights is not None else None,
                                    num_views, torch.empty_like(logits), grad_segments, grad_sigma_rows,
                                    needs_target_grad))
    return launches


# --------------------------------------------------------------------------------------------------
# Autograd


def _backward(ctx, logits, targets: Targets, grad_out, weights, weight_sums, num_views):
    """Gradients for logits, segments and a sigma tensor, as ``ctx.needs_input_grad`` asks: one launch
    (and a sum over row parts for segment and sigma gradients)."""
    needs_logits_grad = ctx.needs_input_grad[0]
    needs_target_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    n, c = logits.shape[:2]
    parts = kernel_split(logits, BACKWARD)[1].parts
    grad_logits = _new_gradient(logits) if needs_logits_grad else None
    grad_segments = _new_output((n, c, parts, 4), logits.device, torch.float32) if needs_target_grad else None
    has_sigma_grad = needs_target_grad and targets.sigma_tensor is not None
    grad_sigma_rows = _new_output((n, c, parts), logits.device, torch.float32) if has_sigma_grad else None
    if (needs_logits_grad or needs_target_grad) and n * c > 0:
        backward_launch(logits, targets, grad_out, weights, weight_sums, num_views, grad_logits, grad_segments,
                        grad_sigma_rows, needs_target_grad).run()
    if grad_segments is not None:
        grad_segments = grad_segments.sum(dim=2).view(n, c, 2, 2)
    grad_sigma = grad_sigma_rows.sum(dim=(0, 2)) if grad_sigma_rows is not None else None
    return (grad_logits, grad_segments if ctx.needs_input_grad[1] else None,
            grad_sigma if ctx.needs_input_grad[2] else None)


def _divergence_partials(logits: torch.Tensor, targets: Targets) -> torch.Tensor:
    """(N, C, parts) float32: each row's divergence as partial sums over parts of its maps."""
    n, c = logits.shape[:2]
    partials = _new_output((n, c, kernel_split(logits, FORWARD)[1].parts), logits.device, torch.float32)
    if n * c > 0:
        forward_launch(logits, targets, partials).run()
    return partials


class HeatmapDivergenceFunction(torch.autograd.Function):
    """The divergence (N, C) with its fused backward; saves only its inputs (no per-pixel intermediates)."""

    @staticmethod
    def forward(ctx, logits, segments, sigma_tensor, k_value):
        targets = Targets(segments, sigma_tensor, k_value)
        ctx.save_for_backward(logits, segments, sigma_tensor)
        ctx.k_value = k_value
        partials = _divergence_partials(logits, targets)
        return partials.sum(dim=2) if partials.shape[2] > 1 else partials.view(partials.shape[:2])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, segments, sigma_tensor = ctx.saved_tensors
        targets = Targets(segments, sigma_tensor, ctx.k_value)
        return (*_backward(ctx, logits, targets, grad_out, None, None, 1), None)


class PoseScoreFunction(torch.autograd.Function):
    """``pose_score`` in three launches: divergence, per-sample weighting, and one fused backward that
    forms each row's coefficient -g_b w / max(sum w, eps) itself. Saves its inputs and (B,) weight sums."""

    @staticmethod
    def forward(ctx, logits, segments, sigma_tensor, weights, k_value, num_views):
        targets = Targets(segments, sigma_tensor, k_value)
        partials = _divergence_partials(logits, targets)
        b = weights.shape[0] // num_views
        scores = _new_output((b,), logits.device, torch.float32)
        weight_sums = _new_output((b,), logits.device, torch.float32)
        if b > 0:
            score_launch(partials, weights, scores, weight_sums, num_views).run()
        ctx.save_for_backward(logits, segments, sigma_tensor, weights, weight_sums,
                              partials if ctx.needs_input_grad[3] else None)
        ctx.k_value, ctx.num_views = k_value, num_views
        return scores

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_scores):
        logits, segments, sigma_tensor, weights, weight_sums, partials = ctx.saved_tensors
        targets = Targets(segments, sigma_tensor, ctx.k_value)
        grads = _backward(ctx, logits, targets, grad_scores, weights, weight_sums, ctx.num_views)
        grad_weights = None
        if ctx.needs_input_grad[3]:
            grad_weights = reference.pose_score_weight_gradient(partials.sum(dim=2), weights, weight_sums,
                                                                grad_scores, ctx.num_views)
        return (*grads, grad_weights, None, None)


# --------------------------------------------------------------------------------------------------
# Public API


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
    if resolve_backend(backend, checked.logits) == "reference":
        return reference.divergence_from_checked(checked.logits, checked.segments, checked.sigma)
    targets = Targets.from_checked(checked)
    return HeatmapDivergenceFunction.apply(checked.logits, targets.segments, targets.sigma_tensor, targets.k_value)


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
        weights: (N, C) or (B, V, C), non-negative; 0 marks a keypoint that is out of frame or unknown
            (such a row adds nothing to the score or the gradients, whatever its segment holds).
        sigma: positive float or (C,) tensor.
        num_views: V, the views per sample.
        backend: see ``heatmap_divergence``.
        validate: also check values (adds non-negative, finite weights); one host sync on CUDA. A
            training loop checks its inputs once and passes False: the fused backend then makes three
            launches per forward + backward and never waits for the device.

    Returns:
        (B,) float32 rewards, <= 0; 0 is a perfect match, and a sample whose weights are all zero
        scores 0 with a zero gradient.
    """
    checked = check_inputs(logits, segments, sigma)
    weights = check_weights(weights, checked.logits, num_views)
    if validate:
        check_values(checked.segments, checked.sigma, weights)
    if resolve_backend(backend, checked.logits) == "reference":
        return reference.pose_score_from_checked(checked.logits, checked.segments, checked.sigma, weights)
    n, c = checked.logits.shape[:2]
    weights = weights.reshape(n, c)
    if weights.dtype != torch.float32:
        weights = weights.float()
    targets = Targets.from_checked(checked)
    return PoseScoreFunction.apply(checked.logits, targets.segments, targets.sigma_tensor, weights, targets.k_value,
                                   num_views)


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
