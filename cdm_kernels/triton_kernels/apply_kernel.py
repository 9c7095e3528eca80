"""``triton_apply_kernel``: ``K(tau)^T v`` (``transpose``) or ``K(tau) v`` along the last dim.

Uniform (symmetric): ``alpha v + beta (sum v)``; absorbing: transpose
``[alpha v_real, v_mask + (1 - alpha) sum v_real]``, else
``[alpha v_real + (1 - alpha) v_mask, v_mask]``. Two passes (sum, write), float32
accumulation (float64 for float64 ``v``); a negative ``tau`` applies the
inverse. Dense: two float64 eigenbasis matrix-vector passes (``_dense.apply``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _dense
from ._common import DENSE, check_family, compute_f64, decay_coefficients, row_kernel, to_store

SCHEMA = (
    "(int family, Tensor? evals, Tensor? vecs, Tensor? vecs_inv, "
    "Tensor v, Tensor tau, bool transpose) -> Tensor"
)


@triton.jit
def _apply_kernel_kernel(v_ptr, tau_ptr, out_ptr, P, N, FAMILY: tl.constexpr, TRANSPOSE: tl.constexpr,
                         F64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    rmask = rows < P
    base = rows.to(tl.int64) * N
    alpha, oma = decay_coefficients(tl.load(tau_ptr + rows, mask=rmask, other=0.0))
    alpha = alpha.to(CT)
    oma = oma.to(CT)
    # pass 1: the sum the family needs (uniform: all of v; absorbing: the real tokens, or v_mask)
    total = tl.zeros([BLOCK_P], CT)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        msk = rmask[:, None] & (cols[None, :] < N)
        v = tl.load(v_ptr + base[:, None] + cols[None, :], mask=msk, other=0.0).to(CT)
        if FAMILY == 0:
            keep = msk
        elif TRANSPOSE:
            keep = msk & (cols[None, :] < N - 1)
        else:
            keep = msk & (cols[None, :] == N - 1)
        total += tl.sum(tl.where(keep, v, 0.0), axis=1)
    if FAMILY == 0:
        add = oma / N * total
    else:
        add = oma * total
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        msk = rmask[:, None] & (cols[None, :] < N)
        v = tl.load(v_ptr + base[:, None] + cols[None, :], mask=msk, other=0.0).to(CT)
        if FAMILY == 0:
            out = alpha[:, None] * v + add[:, None]
        else:
            is_mask = cols[None, :] == N - 1
            if TRANSPOSE:
                out = tl.where(is_mask, v + add[:, None], alpha[:, None] * v)
            else:
                out = tl.where(is_mask, v, alpha[:, None] * v + add[:, None])
        tl.store(out_ptr + base[:, None] + cols[None, :], to_store(out, out_ptr), mask=msk)


apply_kernel_kernel = row_kernel(_apply_kernel_kernel)


@torch.library.custom_op("cdm_kernels::triton_apply_kernel", mutates_args=(), schema=SCHEMA)
def apply_kernel(family: int, evals: Optional[torch.Tensor], vecs: Optional[torch.Tensor],
                 vecs_inv: Optional[torch.Tensor], v: torch.Tensor, tau: torch.Tensor, transpose: bool) -> torch.Tensor:
    p, n = v.shape
    graph = check_family(family, evals, vecs, vecs_inv, n, v.device)
    v = v.contiguous()
    tau = tau.to(torch.float64).contiguous()
    if family == DENSE:
        return _dense.apply(v, tau, graph, bool(transpose), out_dtype=v.dtype)
    out = torch.empty_like(v)
    apply_kernel_kernel(p, v, tau, out, p, n, FAMILY=family, TRANSPOSE=bool(transpose), F64=compute_f64(v))
    return out
