"""``conditional_matching_loss``: cross-entropy of a target against the student's
inverted conditional, forward and backward fused.

When the scores require grad (and grad mode is on) the compiled backends run
``conditional_matching_loss_with_grad``: the loss and its gradient w.r.t. the scores
for an upstream gradient of 1 per position, from one read of the scores and the
target; autograd keeps that gradient (the scores' size and dtype, in place of the
scores and target the recomputing backward would keep) and the backward only scales
its rows by the upstream gradient, in place (docs/ARCHITECTURE.md, "Autograd and
compilation"). Without grad, no gradient buffer is allocated."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..backends import select_backend
from ._compiled import register_recomputing_backward, rows, run_on_rows
from ._validation import (check_graph, check_invertible, check_scores, check_tau, check_tokens, kernel_checks,
                          value_checks_enabled)

REDUCTIONS = ("mean", "sum", "none")


def conditional_matching_loss(
    graph,
    student_log_score: torch.Tensor,
    x_t: torch.Tensor,
    tau_t,
    target: torch.Tensor,
    reduction: str = "mean",
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``CE(target, p^student_0|t(. | x_t))`` per position, the student's conditional
    coming from its log-scores through the inversion (MATH.md sections 2, 4).

    Args:
        student_log_score: ``(..., N)``, the only differentiable input.
        x_t: ``(...)`` noisy tokens; ``tau_t``: total noise, broadcastable to ``x_t``.
        target: ``(..., N)`` probabilities (e.g. the teacher's conditional at s),
            non-negative, rows summing to 1; treated as a constant.
        reduction: ``"mean"`` over positions, ``"sum"``, or ``"none"`` (``(...)``).

    Returns float32. ``0 log 0 = 0``; a target with mass on a structural zero of
    the student's conditional gives ``inf``. With grad, the compiled backends write the
    gradient in the forward pass and keep it (one ``student_log_score``-sized tensor)
    until backward; no double backward (``create_graph=True`` raises), and one backward
    per graph (the first scales the kept gradient in place).
    """
    check_graph(graph)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    in_kernel = kernel_checks("conditional_matching_loss", graph, backend, student_log_score)
    log_score = check_scores(student_log_score, graph, "student_log_score", scan=not in_kernel)
    x_t = check_tokens(x_t, log_score.shape[:-1], graph.num_states, log_score.device, "x_t", scan=in_kernel != "all")
    tau_t = check_tau(tau_t, x_t.shape, x_t.device, "tau_t", scan=in_kernel != "all")
    check_invertible(graph, tau_t, "tau_t")
    target = check_scores(target, graph, "target", scan=not in_kernel)
    if target.shape != log_score.shape:
        raise ValueError(f"target must have the shape of student_log_score {tuple(log_score.shape)}, got {tuple(target.shape)}")
    if target.requires_grad:
        raise ValueError("target must not require grad: it is a fixed teacher target (detach it)")
    if not in_kernel and value_checks_enabled():
        if (target < 0).any():
            raise ValueError("target must be probabilities (non-negative)")
        if ((target.float().sum(-1) - 1).abs() > 1e-2).any():
            raise ValueError("target rows must sum to 1 (probabilities, not logits)")
    chosen = select_backend(backend, log_score.device)
    if chosen == "reference":
        per_position = reference.conditional_matching_loss(
            graph, log_score.contiguous(), x_t.contiguous(), tau_t, target.contiguous()).float()
    else:
        extra = (rows(target, graph.num_states),)
        if torch.is_grad_enabled() and log_score.requires_grad:
            per_position = run_on_rows("conditional_matching_loss_with_grad", chosen, graph, log_score, x_t, tau_t,
                                       extra=extra)[0]
        else:
            per_position = run_on_rows("conditional_matching_loss", chosen, graph, log_score, x_t, tau_t, extra=extra)
        per_position = per_position.view(x_t.shape)
    if reduction == "mean":
        return per_position.mean()
    if reduction == "sum":
        return per_position.sum()
    return per_position


def register(prefix: str) -> None:
    def fake(family, evals, vecs, vecs_inv, log_score, x, tau, target):
        return log_score.new_empty(log_score.shape[:1], dtype=torch.float32)

    register_recomputing_backward(prefix, "conditional_matching_loss", fake)
    name = f"cdm_kernels::{prefix}conditional_matching_loss_with_grad"

    @torch.library.register_fake(name)
    def _(family, evals, vecs, vecs_inv, log_score, x, tau, target):
        return fake(family, evals, vecs, vecs_inv, log_score, x, tau, target), torch.empty_like(log_score)

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no (P, N) zeros for the gradient output's own gradient
        ctx.save_for_backward(output[1])

    def backward(ctx, grad_loss, _):
        if torch.is_grad_enabled():
            raise RuntimeError("conditional_matching_loss has no double backward (create_graph=True): its gradient "
                               "is written by the forward kernel; use backend='reference' for higher derivatives")
        if grad_loss is None:
            return (None,) * 8
        if getattr(ctx, "scaled", False):
            raise RuntimeError("conditional_matching_loss: a second backward through the same graph "
                               "(retain_graph=True) is not supported: the first scaled the gradient that the forward "
                               "kept in place; compute the loss again")
        (gradient,) = ctx.saved_tensors
        scale = grad_loss.unsqueeze(-1)
        if type(gradient) is not torch.Tensor:  # traced (fake, functional): the compiler plans the memory
            grad_data = (gradient * scale).to(gradient.dtype)
        else:  # eager: in place (multiplied in float32, rounded once), no second (P, N) buffer
            ctx.scaled = True
            grad_data = gradient.mul_(scale)
        return (None, None, None, None, grad_data, None, None, None)

    torch.library.register_autograd(name, backward, setup_context=setup_context)

