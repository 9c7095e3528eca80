"""How the op fronts call the compiled ops (C++, CUDA, Triton): the layout the
kernels read, and the fake functions and autograd of the ops differentiable in
one input.

The kernels read contiguous ``(P, N)`` rows and contiguous ``(P,)`` per-position
tensors; the fronts accept any layout (transposed, strided, broadcast views) and
:func:`rows` / :func:`positions` copy only what is not already laid out so. The
reference backend gets contiguous inputs too, so that a layout never changes a
result (PyTorch's reductions round differently over strided rows).

An op differentiable in one input reads ``(family, evals, vecs, vecs_inv, data, *rest)`` and is
differentiable in ``data`` only; its twin ``<op>_backward(family, evals, vecs,
vecs_inv, grad, data, *rest)`` returns the gradient w.r.t. ``data`` by
recomputing the forward, so autograd saves the inputs and never the output.
(The matching loss, when the scores require grad, runs
``conditional_matching_loss_with_grad`` instead and keeps the gradient its
forward wrote: ops/conditional_matching_loss.py.)
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import reference
from ..backends import kernel_op, select_backend


def rows(tensor: torch.Tensor, num_states: int) -> torch.Tensor:
    """``(..., N)`` as contiguous ``(P, N)`` rows (a copy only when needed)."""
    return tensor.reshape(-1, num_states).contiguous()


def positions(tensor: torch.Tensor) -> torch.Tensor:
    """``(...)`` as a contiguous ``(P,)`` vector (a copy only when needed)."""
    return tensor.reshape(-1).contiguous()


def run_on_rows(op: str, backend: str, graph, data: torch.Tensor, *per_position: torch.Tensor, extra: tuple = ()):
    """Compiled ``op`` of ``backend`` on ``data``'s rows, then the per-position tensors
    (tokens, noise levels), then ``extra`` arguments as they are; returns its flat output."""
    kernel = kernel_op(op, backend)
    return kernel(*graph.descriptor(data.device), rows(data, graph.num_states), *map(positions, per_position), *extra)


def dispatch(op: str, backend: Optional[str], graph, data: torch.Tensor, *per_position: torch.Tensor,
             extra: tuple = ()):
    """``op`` of an ``(..., N) -> (..., N)`` op on the chosen backend: ``reference.<op>(graph,
    data, *per_position)``, or the compiled op on rows (:func:`run_on_rows`)."""
    chosen = select_backend(backend, data.device)
    if chosen == "reference":
        return getattr(reference, op)(graph, data.contiguous(), *(t.contiguous() for t in per_position))
    return run_on_rows(op, chosen, graph, data, *per_position, extra=extra).view(data.shape)


def register_recomputing_backward(prefix: str, op: str, fake_forward: Callable) -> None:
    """Register ``cdm_kernels::{prefix}{op}``'s fake function (``fake_forward``), its
    backward op's fake function (a tensor like ``data``) and its autograd formula."""
    name = f"cdm_kernels::{prefix}{op}"
    torch.library.register_fake(name)(fake_forward)

    @torch.library.register_fake(f"{name}_backward")
    def _(*args):
        return torch.empty_like(args[5])

    def setup_context(ctx, inputs, output):
        ctx.graph_args = inputs[:4]
        ctx.save_for_backward(*inputs[4:])

    def backward(ctx, grad):
        saved = ctx.saved_tensors
        grad_data = getattr(torch.ops.cdm_kernels, f"{prefix}{op}_backward")(*ctx.graph_args, grad.contiguous(), *saved)
        return (None, None, None, None, grad_data) + (None,) * (len(saved) - 1)

    torch.library.register_autograd(name, backward, setup_context=setup_context)
