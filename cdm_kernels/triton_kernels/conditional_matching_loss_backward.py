"""``triton_conditional_matching_loss_backward``: the gradient w.r.t. ``log_score``
given ``grad_loss`` (P,), recomputing the conditional (no saved ``q``).

The upstream gradient w.r.t. ``log q`` is ``-grad_loss * target``, built on the
fly inside the inversion backward kernels of
``scores_to_posterior_backward`` (``FROM_TARGET``), so this is the same
three-pass (two for absorbing) kernel reading the target instead of a gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._common import prepare, schema
from .scores_to_posterior_backward import posterior_backward

SCHEMA = schema("Tensor grad_loss, Tensor log_score, Tensor x, Tensor tau, Tensor target")


@torch.library.custom_op("cdm_kernels::triton_conditional_matching_loss_backward", mutates_args=(), schema=SCHEMA)
def conditional_matching_loss_backward(family: int, evals: Optional[torch.Tensor], vecs: Optional[torch.Tensor],
                                       vecs_inv: Optional[torch.Tensor], grad_loss: torch.Tensor,
                                       log_score: torch.Tensor, x: torch.Tensor, tau: torch.Tensor,
                                       target: torch.Tensor) -> torch.Tensor:
    graph, x, tau, log_score, target = prepare(family, evals, vecs, vecs_inv, log_score.shape[1], x, tau, log_score,
                                               target)
    return posterior_backward(family, graph, target, grad_loss.contiguous(), log_score, x, tau)
