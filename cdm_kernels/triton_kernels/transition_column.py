"""``triton_transition_column``: ``out[p, a] = K(tau_p)[a, x_p]``.

Uniform / absorbing: one pass that only writes (closed forms, coefficients in
float64 per position). Dense: the eigenbasis column kernel of ``_dense.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _dense
from ._common import DENSE, decay_coefficients, prepare, program_rows, row_kernel, row_tile, schema

SCHEMA = schema("Tensor x, Tensor tau, int num_states, bool out_float64")


@triton.jit
def _transition_column_kernel(x_ptr, tau_ptr, out_ptr, P, N, FAMILY: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    CT: tl.constexpr = out_ptr.dtype.element_ty
    rows, rmask, base = program_rows(P, N, BLOCK_P)
    x = tl.load(x_ptr + rows, mask=rmask, other=0)
    alpha, oma = decay_coefficients(tl.load(tau_ptr + rows, mask=rmask, other=0.0))
    alpha = alpha.to(CT)
    oma = oma.to(CT)
    if FAMILY == 0:  # alpha e_x + (1 - alpha) / N
        off = oma / N
        on = alpha + off
    else:  # absorbing: x the mask: 1 - alpha off the mask, 1 on it; else alpha e_x
        is_mask = x == N - 1
        off = tl.where(is_mask, oma, 0.0)
        on = tl.where(is_mask, 1.0, alpha)
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        out = tl.where(cols[None, :] == x[:, None], on[:, None], off[:, None])
        tl.store(out_ptr + offs, out.to(CT), mask=msk)


transition_column_kernel = row_kernel(_transition_column_kernel)


@torch.library.custom_op("cdm_kernels::triton_transition_column", mutates_args=(), schema=SCHEMA)
def transition_column(family: int, evals: Optional[torch.Tensor], vecs: Optional[torch.Tensor],
                      vecs_inv: Optional[torch.Tensor], x: torch.Tensor, tau: torch.Tensor, num_states: int,
                      out_float64: bool) -> torch.Tensor:
    n = int(num_states)
    graph, x, tau = prepare(family, evals, vecs, vecs_inv, n, x, tau)
    dtype = torch.float64 if out_float64 else torch.float32
    p = x.shape[0]
    if family == DENSE:
        return _dense.column(x, tau, graph, n, out_dtype=dtype)
    out = torch.empty((p, n), dtype=dtype, device=x.device)
    transition_column_kernel(p, x, tau, out, p, n, FAMILY=family)
    return out
