"""``triton_fused_euler_step``: one reverse step, fused: kernel evaluation, inversion
and inverse-CDF sampling in one kernel per block of positions.

Position ``p`` draws one uniform ``tl.rand(seed, offset + p)`` (Philox, the
C++ backend's generator too) and follows the sampling rule every backend shares
(``_common.scan_step``): the masses ``P(y)`` in the compute dtype, their float64
sum as the total, and the first state whose float64 running CDF exceeds
``uniform * total`` and whose own mass is positive; when rounding walks past the
end it takes the last state with mass. Passes (one exp per element each):

* (1) online max / sum-exp over ``y != x`` (absorbing: only positions on the
  mask read their scores; the others keep ``x``);
* (2) uniform, analytic only: ``U = sum u`` of the clamped inverted ratios, as
  ``P(y) = K(Delta)[y, x] (alpha_s u_y + beta_s U)`` needs it (``w = u / Z`` up
  to the normaliser, which cancels);
* (3) the float64 total of the masses: uniform euler ``Delta Q[y, x] r_y`` with
  the overflow-safe stay mass on ``x`` (``p_0|t`` where ``tau_s = 0``); absorbing
  the softmax scaled by ``(1 - alpha_Delta) alpha_s`` with ``1 - alpha_s`` on the
  mask (euler: the same jumps with the stay mass on the mask);
* (4) the scan, each row stopping at its pick.

A row that fits one block (``ONE_BLOCK``) is read once, in pass 1: the other
passes work on the registers it loaded.

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
from ._common import (DENSE, FLOOR_INV, SMALLEST_FLOOR, compute_f64, decay_coefficients, finish_scan, mass_total,
                      prepare, program_rows, row_cache, row_kernel, row_tile, scan_step, schema, tile_load)
from ._inversion import excluded_max_sumexp
from .scores_to_posterior import posterior

SCHEMA = schema("Tensor log_score, Tensor x, Tensor tau_t, Tensor tau_s, int method, Tensor seed_offset")


@triton.jit
def step_block(ls_ptr, offs, lmask, is_x, m_safe, k, ex, cache, CT: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """``e_y = exp(ls_y - m)`` (0 at ``x`` and outside ``lmask``) and the inversion's
    ratios ``r_y = e_y e^{m - M}``, ``r_x = e^-M``: one exp per element."""
    v = tile_load(ls_ptr, offs, lmask, float("-inf"), cache, ONE_BLOCK).to(CT)
    e = tl.exp(tl.where(is_x, float("-inf"), v) - m_safe[:, None])
    r = tl.where(is_x, ex[:, None], e * k[:, None])
    return e, r


@triton.jit
def step_masses(ls_ptr, offs, lmask, is_x, cache, coef, FAMILY: tl.constexpr, METHOD: tl.constexpr,
                CT: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """The unnormalised step probabilities ``P(y)`` of one tile (0 outside ``lmask``);
    ``coef`` holds the per-row constants of the kernel."""
    m_safe, k, ex, beta_t, S, thr, colx, a_s, b_s, U, a_d, b_d, stay, fj, ts0, c_mask, c_real = coef
    e, r = step_block(ls_ptr, offs, lmask, is_x, m_safe, k, ex, cache, CT, ONE_BLOCK)
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
    return tl.where(lmask, p, 0.0)


@triton.jit(do_not_specialize=["seed", "offset"])
def _fused_euler_step_kernel(ls_ptr, x_ptr, taut_ptr, taus_ptr, out_ptr, P, N, seed, offset,
                             FAMILY: tl.constexpr, METHOD: tl.constexpr, F64: tl.constexpr, ONE_BLOCK: tl.constexpr,
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
    cache = row_cache(ls_ptr, base, active, N, ONE_BLOCK, BLOCK_N)

    # pass 1: online max / sum-exp over y != x
    m, s = excluded_max_sumexp(ls_ptr, x, base, active, N, cache, CT, ONE_BLOCK, BLOCK_P, BLOCK_N)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    M = tl.maximum(m, 0.0)  # the inversion's shift (ls_x = 0 is in the row)
    k = tl.exp(m - M)
    ex = tl.exp(-M)
    S = s * k + ex
    thr = tl.maximum(ex * alpha_t.to(CT) / FLOOR_INV, SMALLEST_FLOOR)  # the uniform floor (see _inversion.py)
    beta_t = (oma_t / N).to(CT)
    colx = (alpha_t + oma_t / N).to(CT)
    # Euler: jumps Delta Q[y, x] e^{ls_y} with Q[y, x] = 1/N (uniform) or 1 into the mask
    if FAMILY == 0:
        jump = (delta / N).to(CT)
    else:
        jump = delta.to(CT)
    ljump = tl.log(jump)
    scale = tl.maximum(ljump + m, 0.0)  # the reference's max(max logits, 0)
    fj = tl.exp(ljump + m - scale)  # jumps_y = e_y * fj
    stay = tl.maximum(tl.exp(-scale) - s * fj, 0.0)
    # absorbing, analytic: the softmax scaled by (1 - alpha_Delta) alpha_s, the mask keeps 1 - alpha_s
    c_real = (oma_d * alpha_s).to(CT) / tl.where(s > 0, s, 1.0)
    c_mask = oma_s.to(CT)

    # pass 2, uniform analytic: U = sum u
    U = tl.zeros([BLOCK_P], CT)
    if FAMILY == 0:
        if METHOD == 0:
            for start in range(0, N, BLOCK_N):
                cols, msk, offs = row_tile(start, base, active, N, BLOCK_N)
                e, r = step_block(ls_ptr, offs, msk, cols[None, :] == x[:, None], m_safe, k, ex, cache, CT, ONE_BLOCK)
                U += tl.sum(tl.where(msk, tl.maximum(r - (beta_t * S)[:, None], thr[:, None]), 0.0), axis=1)
    coef = (m_safe, k, ex, beta_t, S, thr, colx, alpha_s.to(CT), (oma_s / N).to(CT), U, alpha_d.to(CT),
            (oma_d / N).to(CT), stay, fj, ts0, c_mask, c_real)

    # pass 3: the float64 sum of the masses (the sampling rule's total)
    total = tl.zeros([BLOCK_P], tl.float64)
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, active, N, BLOCK_N)
        total = mass_total(total, step_masses(ls_ptr, offs, msk, cols[None, :] == x[:, None], cache, coef, FAMILY,
                                              METHOD, CT, ONE_BLOCK))

    # pass 4: the inverse-CDF scan, stopping at each row's pick
    target = tl.rand(seed, offset + rows.to(tl.int64)).to(tl.float64) * total
    carry = tl.zeros([BLOCK_P], tl.float64)
    found = tl.zeros([BLOCK_P], tl.int32)
    result = tl.zeros([BLOCK_P], tl.int32)
    lastpos = tl.full([BLOCK_P], -1, tl.int32)
    for start in range(0, N, BLOCK_N):
        cols, lmask, offs = row_tile(start, base, active & (found == 0), N, BLOCK_N)
        p = step_masses(ls_ptr, offs, lmask, cols[None, :] == x[:, None], cache, coef, FAMILY, METHOD, CT, ONE_BLOCK)
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
