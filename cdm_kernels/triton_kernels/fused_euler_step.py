"""``triton_fused_euler_step``: one reverse step, fused: kernel evaluation, inversion
and inverse-CDF sampling in one kernel per block of positions.

Position ``p`` draws one uniform ``tl.rand(seed, offset + p)`` (Philox, the
C++ backend's generator too) and follows the sampling rule every backend shares
(``_common.scan_step``): the masses ``P(y)`` in the compute dtype, their float64
sum as the total, and the first state whose float64 running CDF exceeds
``uniform * total`` and whose own mass is positive; when rounding walks past the
end it takes the last state with mass. The row is cut into vocabulary blocks;
each block's float64 mass is known before the scan, so the scan finds the block
the draw falls in and reads only that block again. Passes (one exp per element):

* (1) online max / sum-exp over ``y != x``, keeping each block's running max
  and sum (absorbing: only positions on the mask read their scores; the others
  keep ``x``). Where ``P(y)`` is ``e_y = exp(ls_y - max)`` times a per-row
  factor (Euler jumps ``Delta Q[y, x] r_y`` with the overflow-safe stay mass on
  ``x``; the absorbing softmax scaled by ``(1 - alpha_Delta) alpha_s`` with
  ``1 - alpha_s`` on the mask) the blocks' masses follow from these sums;
* (2) uniform only, where ``P`` needs the clamp of ``u`` against ``beta S``
  (the analytic step, and ``p_0|t`` where ``tau_s = 0``): each block's float64
  mass, and ``U = sum u`` for ``P(y) = K(Delta)[y, x] (alpha_s u_y + beta_s U)``
  (``w = u / Z`` up to the normaliser, which cancels);
* (3) the drawn block, scanned state by state.

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
from ._common import (DENSE, FLOOR_INV, SMALLEST_FLOOR, compute_f64, decay_coefficients, finish_scan, online_step,
                      prepare, program_rows, row_cache, row_kernel, row_tile, scan_step, schema, stream_chunks,
                      tile_load)
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
                             CHUNKS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
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
    chunk = tl.arange(0, CHUNKS)
    x_chunk = chunk[None, :] == (x // BLOCK_N)[:, None]

    # pass 1: online max / sum-exp over y != x, keeping each block's running max and sum
    m = tl.full([BLOCK_P], float("-inf"), CT)
    s = tl.zeros([BLOCK_P], CT)
    chunk_max = tl.zeros([BLOCK_P, CHUNKS], CT)
    chunk_sum = tl.zeros([BLOCK_P, CHUNKS], tl.float64)
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, active, N, BLOCK_N)
        v = tile_load(ls_ptr, offs, msk, float("-inf"), cache, ONE_BLOCK).to(CT)
        m, s, m_safe, e = online_step(m, s, tl.where(cols[None, :] == x[:, None], float("-inf"), v))
        here = chunk[None, :] == start // BLOCK_N
        chunk_max = tl.where(here, m_safe[:, None], chunk_max)
        chunk_sum = tl.where(here, tl.sum(e.to(tl.float64), axis=1)[:, None], chunk_sum)
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
    a_s, b_s = alpha_s.to(CT), (oma_s / N).to(CT)
    a_d, b_d = alpha_d.to(CT), (oma_d / N).to(CT)

    # each block's float64 mass: where P(y) is e_y times a per-row factor, from pass 1
    # (its sums rescaled to the row's max); the uniform masses need S (the clamp):
    # pass 2 sums them (analytic: also U = sum u, and P's two terms apart)
    if METHOD == 0:
        factor, x_mass = c_real, c_mask
    else:
        factor, x_mass = tl.where(ts0, 1.0, fj), tl.where(ts0, 0.0, stay)
    masses = chunk_sum * tl.exp(chunk_max - m_safe[:, None]).to(tl.float64) * factor.to(tl.float64)[:, None]
    masses += tl.where(x_chunk, x_mass.to(tl.float64)[:, None], 0.0)
    U = tl.zeros([BLOCK_P], CT)
    if FAMILY == 0:
        exact = active & ((METHOD == 0) | ts0)
        for start in range(0, N, BLOCK_N):
            cols, msk, offs = row_tile(start, base, exact, N, BLOCK_N)
            is_x = cols[None, :] == x[:, None]
            e, r = step_block(ls_ptr, offs, msk, is_x, m_safe, k, ex, cache, CT, ONE_BLOCK)
            u = tl.where(msk, tl.maximum(r - (beta_t * S)[:, None], thr[:, None]), 0.0)
            if METHOD == 0:  # P = col_Delta (alpha_s u + beta_s U): the u term here, the U term below
                U += tl.sum(u, axis=1)
                p = tl.where(is_x, a_d[:, None] + b_d[:, None], b_d[:, None]) * u
            else:
                p = tl.where(is_x, colx[:, None], beta_t[:, None]) * u
            here = exact[:, None] & (chunk[None, :] == start // BLOCK_N)
            masses = tl.where(here, tl.sum(p.to(tl.float64), axis=1)[:, None], masses)
        if METHOD == 0:
            width = tl.maximum(tl.minimum(N - chunk * BLOCK_N, BLOCK_N), 0).to(tl.float64)  # states per block
            col_sum = b_d.to(tl.float64)[:, None] * width[None, :] + tl.where(x_chunk, a_d.to(tl.float64)[:, None], 0.0)
            masses = a_s.to(tl.float64)[:, None] * masses + (b_s * U).to(tl.float64)[:, None] * col_sum
    coef = (m_safe, k, ex, beta_t, S, thr, colx, a_s, b_s, U, a_d, b_d, stay, fj, ts0, c_mask, c_real)

    # the sampling rule: target = u * (float64 total); the first block whose running
    # sum passes it (none: the last block with mass), then the scan of that block only
    target = tl.rand(seed, offset + rows.to(tl.int64)).to(tl.float64) * tl.sum(masses, axis=1)
    cum = tl.cumsum(masses, axis=1)
    passed = tl.min(tl.where((cum > target[:, None]) & (masses > 0), chunk[None, :], CHUNKS), axis=1)
    last = tl.max(tl.where(masses > 0, chunk[None, :], -1), axis=1)
    pick_chunk = tl.where(passed < CHUNKS, passed, last)
    carry = tl.sum(tl.where(chunk[None, :] == pick_chunk[:, None], cum - masses, 0.0), axis=1)
    cols = pick_chunk[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    lmask = (active & (pick_chunk >= 0))[:, None] & (cols < N)
    p = step_masses(ls_ptr, base[:, None] + cols, lmask, cols == x[:, None], cache, coef, FAMILY, METHOD, CT, ONE_BLOCK)
    found = tl.zeros([BLOCK_P], tl.int32)
    result = tl.zeros([BLOCK_P], tl.int32)
    carry, found, result, lastpos = scan_step(p, cols, target, carry, found, result, tl.full([BLOCK_P], -1, tl.int32))
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
                            F64=compute_f64(log_score), CHUNKS=stream_chunks(n))
    return out
