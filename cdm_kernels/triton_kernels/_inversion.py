"""The conditional-ratio inversion shared by scores_to_posterior (forward and
backward), the matching loss (forward and backward) and the analytic step, for
the uniform and dense families (the absorbing family has its own closed form
in each op file).

Per position, with ``r_y = exp(ls_y - M)`` (``ls_x := 0``, ``M = max_y ls_y >= 0``)
and ``S = sum_y r_y``:

* uniform: ``inv = r - beta S`` (``K(tau)^-T r`` up to the positive factor
  ``1/alpha``, which the normalisation cancels), ``col = alpha e_x + beta``;
* dense: ``inv`` and ``col`` come precomputed (float64 workspaces written by
  the eigenbasis kernels in ``_dense.py``);

then ``u = max(inv, POSTERIOR_FLOOR e^-M)``, ``q = col u / Z``, ``Z = sum col u``,
so ``log q = log col + log u - log Z``: the normaliser needs no exp (``Z`` is a
plain sum of ``col u``). Pass 1 streams the online max / sum-exp over ``y != x``
(gives ``M`` and ``S``), pass 2 sums ``Z``, pass 3 writes: one exp per element
per pass (plus one log in the pass that writes ``log u``). A row that fits one
block (``ONE_BLOCK``) is read once: passes 2 and 3 work on the registers that
pass 1 loaded (``caches``: the scores, and the dense workspaces).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (FLOOR_INV, SMALLEST_FLOOR, decay_coefficients, online_update, program_rows, row_cache,
                      row_kernel, row_sum, row_tile, tile_load, to_store, upstream_scale)


@triton.jit
def excluded_max_sumexp(ls_ptr, x, base, rmask, N, cache, CT: tl.constexpr, ONE_BLOCK: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pass 1: the online max ``m`` and ``s = sum_{y != x} exp(ls_y - m)`` per row
    (rows outside ``rmask`` read nothing and keep ``m = -inf``, ``s = 0``)."""
    m = tl.full([BLOCK_P], float("-inf"), CT)
    s = tl.zeros([BLOCK_P], CT)
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        v = tile_load(ls_ptr, offs, msk, float("-inf"), cache, ONE_BLOCK).to(CT)
        m, s = online_update(m, s, tl.where(cols[None, :] == x[:, None], float("-inf"), v))
    return m, s


@triton.jit
def inversion_scalars(m, s, tau, N, FAMILY: tl.constexpr, CT: tl.constexpr):
    """Per-row constants after pass 1 (``m``, ``s``: max and sum-exp over ``y != x``):
    ``(M, S, thr, beta, col_x, log col_x, log beta)``."""
    M = tl.maximum(m, 0.0)
    S = s * tl.exp(m - M) + tl.exp(-M)
    alpha, oma = decay_coefficients(tau)
    thr = tl.exp(-M) / FLOOR_INV
    if FAMILY == 0:  # the uniform inversion leaves out 1/alpha: scale the floor alike
        thr = thr * alpha.to(CT)
    thr = tl.maximum(thr, SMALLEST_FLOOR)
    beta = (oma / N).to(CT)
    colx = (alpha + oma / N).to(CT)
    return M, S, thr, beta, colx, tl.log(colx), tl.log(beta)


@triton.jit
def inversion_setup(ls_ptr, x_ptr, tau_ptr, inv_ptr, col_ptr, P, N, FAMILY: tl.constexpr, CT: tl.constexpr,
                    ONE_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's positions (``rows``, ``rmask``, ``base``), their tokens, the
    row caches (scores; dense: also ``inv`` and ``col``) and, after pass 1, the
    inversion's per-row constants."""
    rows, rmask, base = program_rows(P, N, BLOCK_P)
    x = tl.load(x_ptr + rows, mask=rmask, other=0)
    ls_cache = row_cache(ls_ptr, base, rmask, N, ONE_BLOCK, BLOCK_N)
    if FAMILY == 0:
        caches = (ls_cache, ls_cache, ls_cache)
    else:
        caches = (ls_cache, row_cache(inv_ptr, base, rmask, N, ONE_BLOCK, BLOCK_N),
                  row_cache(col_ptr, base, rmask, N, ONE_BLOCK, BLOCK_N))
    m, s = excluded_max_sumexp(ls_ptr, x, base, rmask, N, ls_cache, CT, ONE_BLOCK, BLOCK_P, BLOCK_N)
    coef = inversion_scalars(m, s, tl.load(tau_ptr + rows, mask=rmask, other=0.0), N, FAMILY, CT)
    return rows, rmask, base, x, caches, coef


@triton.jit
def inversion_block(ls_ptr, inv_ptr, col_ptr, offs, msk, is_x, coef, caches, FAMILY: tl.constexpr, CT: tl.constexpr,
                    ONE_BLOCK: tl.constexpr):
    """``r`` (uniform only), ``inv``, clamped ``u``, ``col`` and ``log col`` of one block;
    ``coef`` is :func:`inversion_scalars`. Padding lanes hold finite values; callers
    mask them out of every sum."""
    M, S, thr, beta, colx, lcolx, lcolo = coef
    if FAMILY == 0:
        v = tile_load(ls_ptr, offs, msk, 0.0, caches[0], ONE_BLOCK).to(CT)
        r = tl.exp(tl.where(is_x, 0.0, v) - M[:, None])
        inv = r - (beta * S)[:, None]
        col = tl.where(is_x, colx[:, None], beta[:, None])
        lcol = tl.where(is_x, lcolx[:, None], lcolo[:, None])
    else:
        inv = tile_load(inv_ptr, offs, msk, 1.0, caches[1], ONE_BLOCK)
        r = inv
        col = tile_load(col_ptr, offs, msk, 0.0, caches[2], ONE_BLOCK)
        lcol = tl.log(col)
    u = tl.maximum(inv, thr[:, None])
    return r, inv, u, col, lcol


@triton.jit
def inversion_tile(ls_ptr, inv_ptr, col_ptr, start, base, rmask, x, N, coef, caches, FAMILY: tl.constexpr,
                   CT: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """The vocabulary block at ``start``: its mask, offsets and ``is_x``, then
    :func:`inversion_block`'s ``r, inv, u, col, log col``."""
    cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
    is_x = cols[None, :] == x[:, None]
    r, inv, u, col, lcol = inversion_block(ls_ptr, inv_ptr, col_ptr, offs, msk, is_x, coef, caches, FAMILY, CT,
                                           ONE_BLOCK)
    return msk, offs, is_x, r, inv, u, col, lcol


@triton.jit
def _posterior_kernel(ls_ptr, x_ptr, tau_ptr, inv_ptr, col_ptr, out_ptr, P, N,
                      FAMILY: tl.constexpr, F64: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """``log q`` (uniform or dense), written in ``out_ptr``'s dtype. Three passes (one read when ``ONE_BLOCK``)."""
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    rows, rmask, base, x, caches, coef = inversion_setup(ls_ptr, x_ptr, tau_ptr, inv_ptr, col_ptr, P, N, FAMILY, CT,
                                                         ONE_BLOCK, BLOCK_P, BLOCK_N)
    Z = tl.zeros([BLOCK_P], CT)
    for start in range(0, N, BLOCK_N):
        msk, offs, is_x, r, inv, u, col, lcol = inversion_tile(ls_ptr, inv_ptr, col_ptr, start, base, rmask, x, N, coef,
                                                               caches, FAMILY, CT, ONE_BLOCK, BLOCK_N)
        Z += tl.sum(tl.where(msk, col * u, 0.0), axis=1)
    log_z = tl.log(Z)
    for start in range(0, N, BLOCK_N):
        msk, offs, is_x, r, inv, u, col, lcol = inversion_tile(ls_ptr, inv_ptr, col_ptr, start, base, rmask, x, N, coef,
                                                               caches, FAMILY, CT, ONE_BLOCK, BLOCK_N)
        out = lcol + tl.log(u) - log_z[:, None]
        tl.store(out_ptr + offs, to_store(out, out_ptr), mask=msk)


@triton.jit
def _posterior_backward_kernel(g_ptr, gl_ptr, ls_ptr, x_ptr, tau_ptr, inv_ptr, col_ptr, out_ptr, loss_ptr, P, N,
                               FAMILY: tl.constexpr, F64: tl.constexpr, FROM_TARGET: tl.constexpr,
                               LOSS: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                               BLOCK_N: tl.constexpr):
    """Gradient through the inversion, recomputing the forward (no saved ``q``).

    ``g`` is the gradient w.r.t. ``log q`` (``FROM_TARGET``: ``g = -grad_loss * target``,
    the matching loss; ``LOSS``: ``g = -target``, and the pass that sums ``Z`` also
    sums the loss ``sum_{g != 0} g (log col + log u) - G log Z`` into ``loss_ptr``: the
    loss and its gradient from one read of the row). With ``G = sum g`` (over every entry, as autograd of the
    normalisation does), ``d log q / d u`` gives ``g_u = (g - q G) / u`` where ``u``
    is not clamped (``q / u = col / Z``), 0 where it is. Uniform: ``g_r = g_u - beta
    T`` with ``T = sum g_u = sum_unclamped g / u - G C / Z`` (``C`` = sum of ``col``
    over unclamped entries), so the gradient ``r g_r`` (0 at ``x``) is written after
    three passes. Dense: ``g_u`` is written (float64) and ``_dense.py`` applies
    ``K(-tau)`` and the ``r`` factor.
    """
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    rows, rmask, base, x, caches, coef = inversion_setup(ls_ptr, x_ptr, tau_ptr, inv_ptr, col_ptr, P, N, FAMILY, CT,
                                                         ONE_BLOCK, BLOCK_P, BLOCK_N)
    gscale = upstream_scale(gl_ptr, rows, rmask, FROM_TARGET, LOSS, CT, BLOCK_P)
    g_cache = row_cache(g_ptr, base, rmask, N, ONE_BLOCK, BLOCK_N)
    G = row_sum(g_ptr, base, rmask, N, g_cache, CT, ONE_BLOCK, BLOCK_P, BLOCK_N) * gscale
    thr = coef[2]
    Z = tl.zeros([BLOCK_P], CT)
    T1 = tl.zeros([BLOCK_P], CT)
    C = tl.zeros([BLOCK_P], CT)
    A = tl.zeros([BLOCK_P], CT)
    for start in range(0, N, BLOCK_N):
        msk, offs, is_x, r, inv, u, col, lcol = inversion_tile(ls_ptr, inv_ptr, col_ptr, start, base, rmask, x, N, coef,
                                                               caches, FAMILY, CT, ONE_BLOCK, BLOCK_N)
        g = tile_load(g_ptr, offs, msk, 0.0, g_cache, ONE_BLOCK).to(CT) * gscale[:, None]
        free = msk & (inv > thr[:, None])
        Z += tl.sum(tl.where(msk, col * u, 0.0), axis=1)
        T1 += tl.sum(tl.where(free, g / u, 0.0), axis=1)
        C += tl.sum(tl.where(free, col, 0.0), axis=1)
        if LOSS:
            A += tl.sum(tl.where(g < 0, g * (lcol + tl.log(u)), 0.0), axis=1)
    if LOSS:
        tl.store(loss_ptr + rows, to_store(A - G * tl.log(Z), loss_ptr), mask=rmask)
    gz = G / Z
    T = T1 - gz * C
    for start in range(0, N, BLOCK_N):
        msk, offs, is_x, r, inv, u, col, lcol = inversion_tile(ls_ptr, inv_ptr, col_ptr, start, base, rmask, x, N, coef,
                                                               caches, FAMILY, CT, ONE_BLOCK, BLOCK_N)
        g = tile_load(g_ptr, offs, msk, 0.0, g_cache, ONE_BLOCK).to(CT) * gscale[:, None]
        gu = tl.where(inv > thr[:, None], g / u - col * gz[:, None], 0.0)
        if FAMILY == 0:
            out = tl.where(is_x, 0.0, r * (gu - (coef[3] * T)[:, None]))
        else:
            out = gu
        tl.store(out_ptr + offs, to_store(out, out_ptr), mask=msk)


@triton.jit
def _loss_kernel(ls_ptr, x_ptr, tau_ptr, t_ptr, inv_ptr, col_ptr, out_ptr, P, N,
                 FAMILY: tl.constexpr, F64: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Per-position ``-sum_{t > 0} t log q = log Z sum t - sum_{t > 0} t (log col + log u)``.
    Two passes (one read when ``ONE_BLOCK``)."""
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    rows, rmask, base, x, caches, coef = inversion_setup(ls_ptr, x_ptr, tau_ptr, inv_ptr, col_ptr, P, N, FAMILY, CT,
                                                         ONE_BLOCK, BLOCK_P, BLOCK_N)
    Z = tl.zeros([BLOCK_P], CT)
    A = tl.zeros([BLOCK_P], CT)
    Tt = tl.zeros([BLOCK_P], CT)
    for start in range(0, N, BLOCK_N):
        msk, offs, is_x, r, inv, u, col, lcol = inversion_tile(ls_ptr, inv_ptr, col_ptr, start, base, rmask, x, N, coef,
                                                               caches, FAMILY, CT, ONE_BLOCK, BLOCK_N)
        t = tl.load(t_ptr + offs, mask=msk, other=0.0).to(CT)
        Z += tl.sum(tl.where(msk, col * u, 0.0), axis=1)
        A += tl.sum(tl.where(t > 0, t * (lcol + tl.log(u)), 0.0), axis=1)
        Tt += tl.sum(tl.where(msk, t, 0.0), axis=1)
    loss = Tt * tl.log(Z) - A
    tl.store(out_ptr + rows, to_store(loss, out_ptr), mask=rmask)


posterior_kernel = row_kernel(_posterior_kernel)
posterior_backward_kernel = row_kernel(_posterior_backward_kernel)
loss_kernel = row_kernel(_loss_kernel)
