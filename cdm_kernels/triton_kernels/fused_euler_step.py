"""``triton_fused_euler_step``: one reverse step, fused: kernel evaluation, inversion
and inverse-CDF sampling in one kernel per block of positions.

Position ``p`` draws one uniform ``tl.rand(seed, offset + p)`` (Philox, the
C++ backend's generator too) and picks the first state whose running CDF
exceeds ``uniform * total`` and whose own mass is positive; when rounding walks
past the end it takes the last state with mass. The total is known before the
scan, so the passes are (one exp per element each):

* uniform, analytic: (1) online max / sum-exp over ``y != x``; (2) ``U = sum u``
  of the clamped inverted ratios; (3) scan ``P(y) = K(Delta)[y, x] (alpha_s u_y +
  beta_s U)`` (``w = u / Z`` up to the normaliser, which cancels), total in
  closed form;
* uniform, euler: (1) as above, which gives ``sum_y Delta Q[y, x] r_y`` and the
  overflow-safe stay mass at once; (2) only for positions with ``tau_s = 0``
  (they sample ``p_0|t``): ``Z = sum col u``; (3) scan;
* absorbing: only positions on the mask read their scores: (1) online max /
  sum-exp over the real tokens; (2) scan (``P`` is the softmax scaled by
  ``(1 - alpha_Delta) alpha_s``, the mask keeps ``1 - alpha_s``; euler: the same
  jumps with the stay mass on the mask). Other positions keep ``x``.

Dense graphs go through float64 workspaces (``_dense.py``): the conditional,
``K(tau_s)^T w`` times ``K(Delta)[:, x]`` (analytic) or the Euler rates, then the
same scan.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _dense
from ._common import (DENSE, FLOOR_INV, SMALLEST_FLOOR, compute_f64, decay_coefficients, finish_scan, prepare,
                      program_rows, row_kernel, row_tile, scan_step, schema)
from ._inversion import excluded_max_sumexp
from .scores_to_posterior import posterior

SCHEMA = schema("Tensor log_score, Tensor x, Tensor tau_t, Tensor tau_s, int method, Tensor seed_offset")


@triton.jit
def step_block(ls_ptr, offs, lmask, is_x, m_safe, k, ex, CT: tl.constexpr):
    """``e_y = exp(ls_y - m)`` (0 at ``x`` and outside ``lmask``) and the inversion's
    ratios ``r_y = e_y e^{m - M}``, ``r_x = e^-M``: one exp per element."""
    v = tl.load(ls_ptr + offs, mask=lmask, other=float("-inf")).to(CT)
    e = tl.exp(tl.where(is_x, float("-inf"), v) - m_safe[:, None])
    r = tl.where(is_x, ex[:, None], e * k[:, None])
    return e, r


@triton.jit(do_not_specialize=["seed", "offset"])
def _fused_euler_step_kernel(ls_ptr, x_ptr, taut_ptr, taus_ptr, out_ptr, P, N, seed, offset,
                       FAMILY: tl.constexpr, METHOD: tl.constexpr, F64: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    rows, rmask, base = program_rows(P, N, BLOCK_P)
    x = tl.load(x_ptr + rows, mask=rmask, other=0)
    tau_t = tl.load(taut_ptr + rows, mask=rmask, other=1.0)
    tau_s = tl.load(taus_ptr + rows, mask=rmask, other=0.0)
    delta = tau_t - tau_s
    ts0 = tau_s == 0
    alpha_t, oma_t = decay_coefficients(tau_t)
    alpha_s, oma_s = decay_coefficients(tau_s)
    alpha_d, oma_d = decay_coefficients(delta)
    if FAMILY == 0:
        active = rmask
    else:
        active = rmask & (x == N - 1)  # an unmasked token never moves

    # pass 1: online max / sum-exp over y != x
    m, s = excluded_max_sumexp(ls_ptr, x, base, active, N, CT, BLOCK_P, BLOCK_N)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    M = tl.maximum(m, 0.0)  # the inversion's shift (ls_x = 0 is in the row)
    k = tl.exp(m - M)
    ex = tl.exp(-M)
    S = s * k + ex
    thr = tl.maximum(ex * alpha_t.to(CT) / FLOOR_INV, SMALLEST_FLOOR)  # the uniform floor (see _inversion.py)
    beta_t = (oma_t / N).to(CT)
    if METHOD == 1:
        # Euler: jumps Delta Q[y, x] e^{ls_y} with Q[y, x] = 1/N (uniform) or 1 into the mask
        if FAMILY == 0:
            jump = (delta / N).to(CT)
        else:
            jump = delta.to(CT)
        ljump = tl.log(jump)
        scale = tl.maximum(ljump + m, 0.0)  # the reference's max(max logits, 0)
        fj = tl.exp(ljump + m - scale)  # jumps_y = e_y * fj
        stay = tl.maximum(tl.exp(-scale) - s * fj, 0.0)

    # pass 2 and the total mass
    if FAMILY == 0:
        if METHOD == 0:
            need = active
        else:
            need = active & ts0
        acc = tl.zeros([BLOCK_P], CT)
        colx = (alpha_t + oma_t / N).to(CT)
        for start in range(0, N, BLOCK_N):
            cols, msk, offs = row_tile(start, base, need, N, BLOCK_N)
            is_x = cols[None, :] == x[:, None]
            e, r = step_block(ls_ptr, offs, msk, is_x, m_safe, k, ex, CT)
            u = tl.maximum(r - (beta_t * S)[:, None], thr[:, None])
            if METHOD == 0:
                acc += tl.sum(tl.where(msk, u, 0.0), axis=1)
            else:
                acc += tl.sum(tl.where(msk, tl.where(is_x, colx[:, None], beta_t[:, None]) * u, 0.0), axis=1)
        if METHOD == 0:
            U = acc
            u_x = tl.maximum(ex - beta_t * S, thr)
            a_s = alpha_s.to(CT)
            b_s = (oma_s / N).to(CT)
            a_d = alpha_d.to(CT)
            b_d = (oma_d / N).to(CT)
            total = a_s * (b_d * U + a_d * u_x) + b_s * U * (a_d + N * b_d)
        else:
            total = tl.where(ts0, acc, s * fj + stay)
    else:
        if METHOD == 0:
            c_real = (oma_d * alpha_s).to(CT) / s
            c_mask = oma_s.to(CT)
            total = (oma_d * alpha_s + oma_s).to(CT)
        else:
            total = tl.where(ts0, s, s * fj + stay)

    # pass 3: the inverse-CDF scan
    target = tl.rand(seed, offset + rows.to(tl.int64)).to(CT) * total
    carry = tl.zeros([BLOCK_P], CT)
    found = tl.zeros([BLOCK_P], tl.int32)
    result = tl.zeros([BLOCK_P], tl.int32)
    lastpos = tl.full([BLOCK_P], -1, tl.int32)
    for start in range(0, N, BLOCK_N):
        cols, lmask, offs = row_tile(start, base, active & (found == 0), N, BLOCK_N)
        is_x = cols[None, :] == x[:, None]
        e, r = step_block(ls_ptr, offs, lmask, is_x, m_safe, k, ex, CT)
        if FAMILY == 0:
            u = tl.maximum(r - (beta_t * S)[:, None], thr[:, None])
            if METHOD == 0:
                col_d = tl.where(is_x, a_d[:, None] + b_d[:, None], b_d[:, None])
                p = col_d * (a_s[:, None] * u + (b_s * U)[:, None])
            else:
                p_q = tl.where(is_x, colx[:, None], beta_t[:, None]) * u
                p_e = tl.where(is_x, stay[:, None], e * fj[:, None])
                p = tl.where(ts0[:, None], p_q, p_e)
        else:
            if METHOD == 0:
                p = tl.where(is_x, c_mask[:, None], e * c_real[:, None])
            else:
                p = tl.where(is_x, tl.where(ts0, 0.0, stay)[:, None], e * tl.where(ts0, 1.0, fj)[:, None])
        p = tl.where(lmask, p, 0.0)
        carry, found, result, lastpos = scan_step(p, cols, target, carry, found, result, lastpos)
    pick = finish_scan(found, result, lastpos, x)
    if FAMILY == 1:
        pick = tl.where(active, pick, x)
    tl.store(out_ptr + rows, pick.to(tl.int64), mask=rmask)


fused_euler_step_kernel = row_kernel(_fused_euler_step_kernel)


@torch.library.custom_op("cdm_kernels::triton_fused_euler_step", mutates_args=(), schema=SCHEMA)
def fused_euler_step(family: int, evals: Optional[torch.Tensor], vecs: Optional[torch.Tensor],
               vecs_inv: Optional[torch.Tensor], log_score: torch.Tensor, x: torch.Tensor, tau_t: torch.Tensor,
               tau_s: torch.Tensor, method: int, seed_offset: torch.Tensor) -> torch.Tensor:
    p, n = log_score.shape
    graph, x, tau_t, log_score = prepare(family, evals, vecs, vecs_inv, n, x, tau_t, log_score)
    if method not in (0, 1):
        raise ValueError(f"method must be 0 (analytic) or 1 (euler), got {method}")
    if seed_offset.numel() != 2:
        raise ValueError("seed_offset must hold [seed, offset]")
    # a CPU tensor: reading it is not a device synchronisation
    seed, offset = (int(v) for v in seed_offset.to("cpu", torch.int64).tolist())
    tau_s = tau_s.to(torch.float64).contiguous()
    if family == DENSE:
        log_q = posterior(DENSE, graph, log_score, x, tau_t, torch.float64)
        if method == 0:
            # P = K(Delta)[:, x] * K(tau_s)^T w,  w = q / K(tau_t)[:, x]
            w = _dense.weights(log_q, _dense.column(x, tau_t, graph, n))
            col_delta = _dense.column(x, tau_t - tau_s, graph, n)
            probs = _dense.apply(w, tau_s, graph, transpose=True, mul=col_delta)
        else:
            probs = _dense.euler_probs(log_score, x, tau_t, tau_s, _dense.column(x, tau_t, graph, n, rate=True), log_q)
        return _dense.sample(probs, x, seed, offset)
    out = torch.empty_like(x)
    fused_euler_step_kernel(p, log_score, x, tau_t, tau_s, out, p, n, seed, offset, FAMILY=family, METHOD=int(method),
                      F64=compute_f64(log_score))
    return out
