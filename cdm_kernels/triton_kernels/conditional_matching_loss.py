"""``triton_conditional_matching_loss``: per-position ``-sum_{t > 0} t log q`` (float32),
``q`` the student's inverted conditional, never materialised.

Uniform / dense: ``loss = log Z sum t - sum_{t > 0} t (log col + log u)``, two
passes (``_inversion._loss_kernel``). Absorbing: one pass (online log-sum-exp
over the real tokens plus ``sum t ls`` and ``sum t``); a target with mass on a
structural zero (the mask, or any state but ``x`` when ``x`` is not the mask)
gives ``inf``, as ``0 log 0 = 0`` but ``t log 0 = -inf`` in the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _dense
from ._common import (ABSORBING, DENSE, compute_f64, online_update, prepare, program_rows, row_kernel, row_tile,
                      schema, to_store)
from ._inversion import loss_kernel
from .scores_to_posterior_backward import posterior_backward

SCHEMA = schema("Tensor log_score, Tensor x, Tensor tau, Tensor target")
SCHEMA_WITH_GRAD = schema("Tensor log_score, Tensor x, Tensor tau, Tensor target", returns="(Tensor, Tensor)")


@triton.jit
def _absorbing_loss_kernel(ls_ptr, x_ptr, t_ptr, out_ptr, P, N, F64: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    rows, rmask, base = program_rows(P, N, BLOCK_P)
    x = tl.load(x_ptr + rows, mask=rmask, other=0)
    masked = rmask & (x == N - 1)
    m = tl.full([BLOCK_P], float("-inf"), CT)
    s = tl.zeros([BLOCK_P], CT)
    tls = tl.zeros([BLOCK_P], CT)  # sum t ls over the real tokens (masked rows)
    tsum = tl.zeros([BLOCK_P], CT)  # sum t over the real tokens
    bad = tl.zeros([BLOCK_P], tl.int32)  # mass on a structural zero
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        real = cols[None, :] < N - 1
        t = tl.load(t_ptr + offs, mask=msk, other=0.0).to(CT)
        v = tl.load(ls_ptr + offs, mask=msk & real & masked[:, None], other=float("-inf")).to(CT)
        m, s = online_update(m, s, v)
        live = (t > 0) & real & masked[:, None]
        tls += tl.sum(tl.where(live, t * v, 0.0), axis=1)
        tsum += tl.sum(tl.where(live, t, 0.0), axis=1)
        zero = tl.where(masked[:, None], cols[None, :] == N - 1, cols[None, :] != x[:, None])
        bad = tl.maximum(bad, tl.max(tl.where((t > 0) & zero, 1, 0), axis=1))
    lse = m + tl.log(s)
    loss = tl.where(masked, tsum * lse - tls, 0.0)
    loss = tl.where(bad != 0, float("inf"), loss)
    tl.store(out_ptr + rows, to_store(loss, out_ptr), mask=rmask)


absorbing_loss_kernel = row_kernel(_absorbing_loss_kernel)


@torch.library.custom_op("cdm_kernels::triton_conditional_matching_loss", mutates_args=(), schema=SCHEMA)
def conditional_matching_loss(family: int, evals: Optional[torch.Tensor], vecs: Optional[torch.Tensor],
                              vecs_inv: Optional[torch.Tensor], log_score: torch.Tensor, x: torch.Tensor,
                              tau: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p, n = log_score.shape
    graph, x, tau, log_score, target = prepare(family, evals, vecs, vecs_inv, n, x, tau, log_score, target)
    out = torch.empty((p,), dtype=torch.float32, device=log_score.device)
    f64 = compute_f64(log_score, target)
    if family == ABSORBING:
        absorbing_loss_kernel(p, log_score, x, target, out, p, n, F64=f64)
    elif family == DENSE:
        _, inv, col = _dense.inversion_workspaces(log_score, x, tau, graph)
        loss_kernel(p, log_score, x, tau, target, inv, col, out, p, n, FAMILY=DENSE, F64=True)
    else:
        loss_kernel(p, log_score, x, tau, target, log_score, log_score, out, p, n, FAMILY=family, F64=f64)
    return out


@torch.library.custom_op("cdm_kernels::triton_conditional_matching_loss_with_grad", mutates_args=(),
                         schema=SCHEMA_WITH_GRAD)
def conditional_matching_loss_with_grad(family: int, evals: Optional[torch.Tensor], vecs: Optional[torch.Tensor],
                                        vecs_inv: Optional[torch.Tensor], log_score: torch.Tensor, x: torch.Tensor,
                                        tau: torch.Tensor, target: torch.Tensor) -> tuple:
    """The loss and its gradient w.r.t. ``log_score`` for ``grad_loss = 1``: the
    backward's kernels with the loss summed in their passes (a row that fits one
    block is read once for both)."""
    p, n = log_score.shape
    graph, x, tau, log_score, target = prepare(family, evals, vecs, vecs_inv, n, x, tau, log_score, target)
    loss = torch.empty((p,), dtype=torch.float32, device=log_score.device)
    grad = posterior_backward(family, graph, target, None, log_score, x, tau, loss=loss)
    return loss, grad
