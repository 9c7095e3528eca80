"""``transition_column``: the forward-kernel evaluation ``K(tau)[:, x]``."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..backends import kernel_op, select_backend
from ._compiled import positions
from ._validation import check_graph, check_tau, check_tokens


def transition_column(graph, x: torch.Tensor, tau, *, backend: Optional[str] = None) -> torch.Tensor:
    """``P(x_t = x | x_0 = a)`` for every ``a``: ``(..., N)``, the column ``K(tau)[:, x]``.

    Closed forms for uniform and absorbing graphs (O(N) per position), the
    eigenbasis for dense ones (O(N^2)); never a matrix exponential per call.
    float32, or float64 when ``tau`` is a float64 tensor. Not differentiable.
    """
    check_graph(graph)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of token ids, got {type(x).__name__}")
    x = check_tokens(x, x.shape, graph.num_states, x.device)
    out_float64 = isinstance(tau, torch.Tensor) and tau.dtype == torch.float64
    tau = check_tau(tau, x.shape, x.device)
    chosen = select_backend(backend, x.device)
    if chosen == "reference":
        return reference.transition_column(graph, x, tau, torch.float64 if out_float64 else torch.float32)
    op = kernel_op("transition_column", chosen)
    out = op(*graph.descriptor(x.device), positions(x), positions(tau), graph.num_states, out_float64)
    return out.view(*x.shape, graph.num_states)


def register(prefix: str) -> None:
    @torch.library.register_fake(f"cdm_kernels::{prefix}transition_column")
    def _(family, evals, vecs, vecs_inv, x, tau, num_states, out_float64):
        return x.new_empty((x.shape[0], num_states), dtype=torch.float64 if out_float64 else torch.float32)
