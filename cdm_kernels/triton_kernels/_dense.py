"""Dense graphs: the eigenbasis ``Q = V diag(lam) V^-1`` in float64.

``K(tau) = V diag(e^{tau lam}) V^-1`` is never formed: a column ``K(tau)[:, x]``
is one pass over ``(k, a)`` per position (:func:`column`), and ``K^T v`` /
``K v`` are two matrix-vector passes with the decay between them
(:func:`apply`), O(N^2) per position, float64 throughout (the eigenbasis
inversion amplifies rounding by ``e^{tau |lam|}``). Between the two passes the
intermediate vector lives in a float64 workspace; a kernel boundary orders them
(no host synchronisation). Dense graphs are small-N objects (ordinal pixel
levels, a few hundred states), so these kernels favour simplicity over the
streaming of the closed-form families.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (dense_kernel, finish_scan, mass_total, online_update, program_rows, row_cache, row_kernel,
                      row_tile, scan_step, tile_load, to_store)


@triton.jit
def _column_kernel(x_ptr, tau_ptr, evals_ptr, vecs_ptr, vinv_ptr, out_ptr, P, N,
                   SIGN: tl.constexpr, RATE: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """``out[p, a] = max(sum_k V[a, k] f_k Vinv[k, x_p], 0)`` with ``f = e^{SIGN tau_p lam}``
    (``K(SIGN tau)[:, x]``) or, ``RATE``, ``f = lam`` (``Q[:, x]``, clamped: only its
    off-diagonal, non-negative part is ever used)."""
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    rmask = rows < P
    cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    cmask = cols < N
    x = tl.load(x_ptr + rows, mask=rmask, other=0)
    tau = tl.load(tau_ptr + rows, mask=rmask, other=0.0).to(tl.float64)
    acc = tl.zeros([BLOCK_P, BLOCK_J], tl.float64)
    for start in range(0, N, BLOCK_I):
        ks = start + tl.arange(0, BLOCK_I)
        kmask = ks < N
        lam = tl.load(evals_ptr + ks, mask=kmask, other=0.0)
        w = tl.load(vinv_ptr + ks[None, :] * N + x[:, None], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if RATE:
            w = w * lam[None, :]
        else:
            w = w * tl.exp(SIGN * tau[:, None] * lam[None, :])
        v = tl.load(vecs_ptr + cols[None, :] * N + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(w[:, :, None] * v[None, :, :], axis=1)
    acc = tl.maximum(acc, 0.0)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out_ptr + offs, to_store(acc, out_ptr), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _matvec_kernel(in_ptr, div_ptr, mat_ptr, evals_ptr, tau_ptr, x_ptr, mul_ptr, out_ptr, P, N, stride_i, stride_j,
                   SIGN: tl.constexpr, DECAY: tl.constexpr, IN_DIV: tl.constexpr, OUT_MUL: tl.constexpr,
                   ZERO_X: tl.constexpr, OUT_LOG: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """``y[p, j] = sum_i v[p, i] M[i stride_i + j stride_j]`` in float64, with
    optional prologue ``v = in / div`` (0 where ``div <= 0``) and epilogues
    ``y *= e^{SIGN tau_p lam_j}``, ``y *= mul`` (0 where ``mul == 0``), ``y[x_p] = 0``,
    ``y = log y`` (``-inf`` where ``y <= 0``)."""
    rows, rmask, base = program_rows(P, N, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    cmask = cols < N
    acc = tl.zeros([BLOCK_P, BLOCK_J], tl.float64)
    for start in range(0, N, BLOCK_I):
        ii = start + tl.arange(0, BLOCK_I)
        imask = ii < N
        vmask = rmask[:, None] & imask[None, :]
        v = tl.load(in_ptr + base[:, None] + ii[None, :], mask=vmask, other=0.0).to(tl.float64)
        if IN_DIV:
            d = tl.load(div_ptr + base[:, None] + ii[None, :], mask=vmask, other=0.0).to(tl.float64)
            v = tl.where(d > 0, v / d, 0.0)
        a = tl.load(mat_ptr + ii[:, None] * stride_i + cols[None, :] * stride_j,
                    mask=imask[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(v[:, :, None] * a[None, :, :], axis=1)
    omask = rmask[:, None] & cmask[None, :]
    offs = base[:, None] + cols[None, :]
    if DECAY:
        tau = tl.load(tau_ptr + rows, mask=rmask, other=0.0).to(tl.float64)
        lam = tl.load(evals_ptr + cols, mask=cmask, other=0.0)
        acc = acc * tl.exp(SIGN * tau[:, None] * lam[None, :])
    if OUT_MUL:
        w = tl.load(mul_ptr + offs, mask=omask, other=0.0).to(tl.float64)
        acc = tl.where(w != 0, acc * w, 0.0)
    if ZERO_X:
        x = tl.load(x_ptr + rows, mask=rmask, other=0)
        acc = tl.where(cols[None, :] == x[:, None], 0.0, acc)
    if OUT_LOG:
        acc = tl.where(acc > 0, tl.log(acc), float("-inf"))
    tl.store(out_ptr + offs, to_store(acc, out_ptr), mask=omask)


@triton.jit
def _ratios_kernel(ls_ptr, x_ptr, out_ptr, P, N, ONE_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """``r = exp(ls - M)`` with ``ls_x := 0`` and ``M = max(ls)``, float64 (two passes)."""
    rows, rmask, base = program_rows(P, N, BLOCK_P)
    x = tl.load(x_ptr + rows, mask=rmask, other=0)
    cache = row_cache(ls_ptr, base, rmask, N, ONE_BLOCK, BLOCK_N)
    M = tl.zeros([BLOCK_P], tl.float64)  # ls_x = 0 is in the row
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        v = tile_load(ls_ptr, offs, msk, float("-inf"), cache, ONE_BLOCK).to(tl.float64)
        M = tl.maximum(M, tl.max(tl.where(cols[None, :] == x[:, None], 0.0, v), axis=1))
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        v = tile_load(ls_ptr, offs, msk, 0.0, cache, ONE_BLOCK).to(tl.float64)
        r = tl.exp(tl.where(cols[None, :] == x[:, None], 0.0, v) - M[:, None])
        tl.store(out_ptr + offs, r, mask=msk)


@triton.jit
def _weights_kernel(lq_ptr, col_ptr, out_ptr, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """``u = exp(log q - max(log col, -1e30))`` where ``log q > -inf``, else 0 (float64)."""
    rows, rmask, base = program_rows(P, N, BLOCK_P)
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        lq = tl.load(lq_ptr + offs, mask=msk, other=float("-inf")).to(tl.float64)
        col = tl.load(col_ptr + offs, mask=msk, other=1.0)
        u = tl.where(lq > float("-inf"), tl.exp(lq - tl.maximum(tl.log(col), -1e30)), 0.0)
        tl.store(out_ptr + offs, u, mask=msk)


@triton.jit
def euler_logits(ls_ptr, rate_ptr, offs, msk, delta, caches, ONE_BLOCK: tl.constexpr):
    """``log(Delta Q[y, x]) + ls_y`` where the jump rate is positive, else ``-inf`` (float64)."""
    jump = delta[:, None] * tile_load(rate_ptr, offs, msk, 0.0, caches[1], ONE_BLOCK)
    v = tile_load(ls_ptr, offs, msk, 0.0, caches[0], ONE_BLOCK).to(tl.float64)
    return tl.where(jump > 0, tl.log(jump) + v, float("-inf"))


@triton.jit
def _euler_probs_kernel(ls_ptr, x_ptr, taut_ptr, taus_ptr, rate_ptr, lq_ptr, out_ptr, P, N, ONE_BLOCK: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The Euler step's unnormalised probabilities (float64): ``jump = Delta Q[y, x]^+``,
    logits ``log jump + ls`` where ``jump > 0``, ``scale = max(max logits, 0)``,
    ``P = exp(logits - scale)``, the rest ``max(e^-scale - sum, 0)`` on ``x``;
    ``exp(log q)`` where ``tau_s = 0``."""
    rows, rmask, base = program_rows(P, N, BLOCK_P)
    x = tl.load(x_ptr + rows, mask=rmask, other=0)
    tau_s = tl.load(taus_ptr + rows, mask=rmask, other=0.0)
    delta = tl.load(taut_ptr + rows, mask=rmask, other=0.0) - tau_s
    caches = (row_cache(ls_ptr, base, rmask, N, ONE_BLOCK, BLOCK_N), row_cache(rate_ptr, base, rmask, N, ONE_BLOCK,
                                                                                 BLOCK_N))
    m = tl.full([BLOCK_P], float("-inf"), tl.float64)
    s = tl.zeros([BLOCK_P], tl.float64)
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        logits = euler_logits(ls_ptr, rate_ptr, offs, msk, delta, caches, ONE_BLOCK)
        m, s = online_update(m, s, logits)
    scale = tl.maximum(m, 0.0)
    stay = tl.maximum(tl.exp(-scale) - s * tl.exp(m - scale), 0.0)
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        logits = euler_logits(ls_ptr, rate_ptr, offs, msk, delta, caches, ONE_BLOCK)
        p = tl.exp(logits - scale[:, None]) + tl.where(cols[None, :] == x[:, None], stay[:, None], 0.0)
        lq = tl.load(lq_ptr + offs, mask=msk, other=float("-inf"))
        p = tl.where((tau_s == 0)[:, None], tl.exp(lq), p)
        tl.store(out_ptr + offs, p, mask=msk)


@triton.jit(do_not_specialize=["seed", "offset"])
def _sample_kernel(probs_ptr, x_ptr, out_ptr, P, N, seed, offset, ONE_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Inverse-CDF draw from unnormalised float64 probabilities (negatives read as 0):
    pass 1 sums, pass 2 scans (``_common.scan_step``, the sampling rule of every
    backend). Position ``p`` uses ``tl.rand(seed, offset + p)``."""
    rows, rmask, base = program_rows(P, N, BLOCK_P)
    x = tl.load(x_ptr + rows, mask=rmask, other=0)
    cache = row_cache(probs_ptr, base, rmask, N, ONE_BLOCK, BLOCK_N)
    total = tl.zeros([BLOCK_P], tl.float64)
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        total = mass_total(total, tl.maximum(tile_load(probs_ptr, offs, msk, 0.0, cache, ONE_BLOCK), 0.0))
    target = tl.rand(seed, offset + rows.to(tl.int64)).to(tl.float64) * total
    carry = tl.zeros([BLOCK_P], tl.float64)
    found = tl.zeros([BLOCK_P], tl.int32)
    result = tl.zeros([BLOCK_P], tl.int32)
    lastpos = tl.full([BLOCK_P], -1, tl.int32)
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask & (found == 0), N, BLOCK_N)
        p = tl.maximum(tile_load(probs_ptr, offs, msk, 0.0, cache, ONE_BLOCK), 0.0)
        carry, found, result, lastpos = scan_step(p, cols[None, :], target, carry, found, result, lastpos)
    tl.store(out_ptr + rows, finish_scan(found, result, lastpos, x).to(tl.int64), mask=rmask)


column_kernel = dense_kernel(_column_kernel)
matvec_kernel = dense_kernel(_matvec_kernel)
ratios_kernel = row_kernel(_ratios_kernel)
weights_kernel = row_kernel(_weights_kernel)
euler_probs_kernel = row_kernel(_euler_probs_kernel)
sample_kernel = row_kernel(_sample_kernel)


# ----------------------------------------------------------------------------- host pipelines


def _workspace(like: torch.Tensor, n: int) -> torch.Tensor:
    return torch.empty((like.shape[0], n), dtype=torch.float64, device=like.device)


def column(x, tau, graph, n: int, out_dtype=torch.float64, sign: int = 1, rate: bool = False) -> torch.Tensor:
    """``K(sign tau)[:, x]`` (or ``Q[:, x]^+`` when ``rate``), ``(P, n)``."""
    evals, vecs, vinv = graph
    p = x.shape[0]
    out = torch.empty((p, n), dtype=out_dtype, device=x.device)
    column_kernel(p, x, tau, evals, vecs, vinv, out, p, n, grid_cols=n, SIGN=sign, RATE=rate)
    return out


def apply(v, tau, graph, transpose: bool, out_dtype=torch.float64, sign: int = 1,
          div: Optional[torch.Tensor] = None, mul: Optional[torch.Tensor] = None,
          x: Optional[torch.Tensor] = None, out_log: bool = False) -> torch.Tensor:
    """``K(sign tau)^T v`` (``transpose``) or ``K(sign tau) v``, with the optional
    prologue ``v / div`` and epilogues ``* mul``, ``[x] = 0``, ``log`` of :func:`_matvec_kernel`."""
    evals, vecs, vinv = graph
    p, n = v.shape
    # K^T v = V^-T (d * (V^T v));  K v = V (d * (V^-1 v));  M[i, j] at i * stride_i + j * stride_j
    first, second = ((vecs, n, 1), (vinv, n, 1)) if transpose else ((vinv, 1, n), (vecs, 1, n))
    mid = _workspace(v, n)
    matvec_kernel(p, v, v if div is None else div, first[0], evals, tau, tau, mid, mid, p, n, first[1], first[2],
                  grid_cols=n, SIGN=sign, DECAY=True, IN_DIV=div is not None, OUT_MUL=False, ZERO_X=False,
                  OUT_LOG=False)
    out = torch.empty((p, n), dtype=out_dtype, device=v.device)
    matvec_kernel(p, mid, mid, second[0], evals, tau, tau if x is None else x, mid if mul is None else mul, out, p, n,
                  second[1], second[2], grid_cols=n, SIGN=sign, DECAY=False, IN_DIV=False, OUT_MUL=mul is not None,
                  ZERO_X=x is not None, OUT_LOG=out_log)
    return out


def ratios(log_score, x) -> torch.Tensor:
    p, n = log_score.shape
    out = _workspace(log_score, n)
    ratios_kernel(p, log_score, x, out, p, n)
    return out


def weights(log_q, col) -> torch.Tensor:
    p, n = log_q.shape
    out = _workspace(log_q, n)
    weights_kernel(p, log_q, col, out, p, n)
    return out


def inversion_workspaces(log_score, x, tau, graph):
    """``r``, ``K(-tau)^T r`` (unclamped) and ``K(tau)[:, x]``, float64 ``(P, N)``."""
    n = log_score.shape[1]
    r = ratios(log_score, x)
    inv = apply(r, tau, graph, transpose=True, sign=-1)
    col = column(x, tau, graph, n)
    return r, inv, col


def euler_probs(log_score, x, tau_t, tau_s, rate, log_q) -> torch.Tensor:
    p, n = log_score.shape
    out = _workspace(log_score, n)
    euler_probs_kernel(p, log_score, x, tau_t, tau_s, rate, log_q, out, p, n)
    return out


def sample(probs, x, seed: int, offset: int) -> torch.Tensor:
    p, n = probs.shape
    out = torch.empty_like(x)
    sample_kernel(p, probs, x, out, p, n, seed, offset)
    return out
