"""Pure-PyTorch definitions of every op: the specification, in code.

Each function here defines what the fused backends must compute (MATH.md
sections 1-3); the backends are tested against these and these are tested
against float64 enumeration. They favour clarity over speed, run in the
dtype they are given (so "the eager reference in bf16" is literally this code
on bf16 tensors), except that dense graphs always work in float64: their
eigenbasis inversion amplifies rounding by ``e^{tau |lambda|}``.

Shapes: scores / probabilities / vectors are ``(..., N)``; tokens ``x`` and
``tau`` are ``(...)`` with identical leading shapes (the public ops broadcast
and validate before calling in here).

Clamping (MATH.md section 2, "Numerics"): the inversion ``u = K(tau)^-T r`` of
imperfect scores can go negative. Entries are clamped from below at
``POSTERIOR_FLOOR`` times ``r_x`` (= 1 by definition; never below the dtype's
smallest normal number), then the conditional is renormalised, so ``q`` is a distribution and ``log q`` stays finite away from
structural zeros (which are ``-inf``: e.g. the absorbing mask, or every state
but ``x`` when ``x`` is not the mask).
"""

from __future__ import annotations

from typing import Optional

import torch

from .graphs import ABSORBING, DENSE, UNIFORM, Graph

#: lower clamp of the inverted ratios ``u = K^-T r``, relative to ``r_x = 1``
POSTERIOR_FLOOR = 1e-10

METHODS = ("analytic", "euler")


def _safe_log(p: torch.Tensor) -> torch.Tensor:
    """``log p`` with ``log 0 = -inf`` and a zero (not NaN) gradient there."""
    positive = p > 0
    return torch.where(positive, torch.where(positive, p, 1.0).log(), float("-inf"))


def _coefficients(tau: torch.Tensor, num_states: int, dtype: torch.dtype):
    """``alpha = e^-tau`` and ``1 - e^-tau`` (float64 math, then ``dtype``), shaped ``(..., 1)``."""
    tau = tau.to(torch.float64).unsqueeze(-1)
    return torch.exp(-tau).to(dtype), (-torch.expm1(-tau)).to(dtype)


def _one_hot(x: torch.Tensor, num_states: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.nn.functional.one_hot(x.long(), num_states).to(dtype)


# ----------------------------------------------------------------------------- forward kernel


def transition_column(graph: Graph, x: torch.Tensor, tau: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``out[..., a] = K(tau)[a, x]``: the probability of reaching ``x`` from every ``a``."""
    n = graph.num_states
    if graph.family_id == DENSE:
        evals, vecs, vecs_inv = graph.spectral(x.device)
        decay = torch.exp(tau.to(torch.float64).unsqueeze(-1) * evals)
        # K[a, x] = sum_k V[a, k] e^{tau lambda_k} V^-1[k, x]; rounding can leave -1e-17 for a true 0
        return ((vecs_inv.T[x.long()] * decay) @ vecs.T).clamp_min(0).to(dtype)
    alpha, one_minus_alpha = _coefficients(tau, n, dtype)
    onehot = _one_hot(x, n, dtype)
    if graph.family_id == UNIFORM:
        return alpha * onehot + one_minus_alpha / n
    # absorbing: column x != mask is alpha e_x; the mask column is 1 - alpha off the mask, 1 on it
    is_mask = (x == n - 1).unsqueeze(-1)
    mask_column = torch.where(_one_hot(torch.full_like(x, n - 1), n, torch.bool), 1.0, one_minus_alpha).to(dtype)
    return torch.where(is_mask, mask_column, alpha * onehot)


def apply_kernel(graph: Graph, v: torch.Tensor, tau: torch.Tensor, transpose: bool = True) -> torch.Tensor:
    """``K(tau)^T v`` (``transpose=True``) or ``K(tau) v`` along the last dim.
    A negative ``tau`` applies the inverse, ``K(-tau) = K(tau)^-1``."""
    n = graph.num_states
    if graph.family_id == DENSE:
        evals, vecs, vecs_inv = graph.spectral(v.device)
        decay = torch.exp(tau.to(torch.float64).unsqueeze(-1) * evals)
        v64 = v.to(torch.float64)
        if transpose:  # K^T v = V^-T diag(e^{tau lambda}) V^T v
            return (((v64 @ vecs) * decay) @ vecs_inv).to(v.dtype)
        return (((v64 @ vecs_inv.T) * decay) @ vecs.T).to(v.dtype)
    alpha, one_minus_alpha = _coefficients(tau, n, v.dtype)
    if graph.family_id == UNIFORM:  # symmetric: alpha v + beta (sum v) 1
        return alpha * v + one_minus_alpha / n * v.sum(-1, keepdim=True)
    real, mask = v[..., :-1], v[..., -1:]
    if transpose:  # everything not absorbed stays; the mask collects the rest
        return torch.cat([alpha * real, mask + one_minus_alpha * real.sum(-1, keepdim=True)], dim=-1)
    return torch.cat([alpha * real + one_minus_alpha * mask, mask], dim=-1)


def rate_column(graph: Graph, x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``out[..., y] = Q[y, x]``: the forward rate into ``x`` from every ``y``."""
    n = graph.num_states
    if graph.family_id == DENSE:
        return graph.rate_matrix().to(x.device).T[x.long()].to(dtype)
    onehot = _one_hot(x, n, dtype)
    if graph.family_id == UNIFORM:
        return 1.0 / n - onehot
    # absorbing: only the mask is entered, at rate 1 from every other state
    is_mask = (x == n - 1).unsqueeze(-1).to(dtype)
    return is_mask * (1.0 - _one_hot(torch.full_like(x, n - 1), n, dtype)) - onehot * (1.0 - is_mask)


# ----------------------------------------------------------------------------- inversion


def _shifted_ratios(log_score: torch.Tensor, x: torch.Tensor):
    """Ratios ``r = exp(log_score)`` with ``r_x := 1`` (its definition; the input's
    entry at ``x`` is ignored), scaled by ``e^-M`` so nothing overflows.
    Every map below is homogeneous of degree 1 in ``r`` and normalised at the
    end, so the scale cancels (and ``M`` needs no gradient)."""
    log_score = log_score.scatter(-1, x.long().unsqueeze(-1), 0.0)
    shift = log_score.detach().amax(-1, keepdim=True)
    return torch.exp(log_score - shift), shift


def scores_to_posterior(graph: Graph, log_score: torch.Tensor, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``log p_0|t(a | x)`` for every ``a``: the conditional-ratio inversion.

    ``q(a) = K(tau)[a, x] u(a)`` with ``u = K(tau)^-T r``, ``u`` clamped at
    ``POSTERIOR_FLOOR`` and ``q`` renormalised. Absorbing graphs use the closed
    form: ``e_x`` for an unmasked ``x``; for the mask, the softmax of the
    log-scores over the real tokens (``q(mask) = 0``).
    """
    n = graph.num_states
    if graph.family_id == ABSORBING:
        is_real = ~_one_hot(torch.full_like(x, n - 1), n, torch.bool)
        masked_row = torch.log_softmax(log_score.masked_fill(~is_real, float("-inf")), dim=-1)
        unmasked_row = _safe_log(_one_hot(x, n, log_score.dtype))
        return torch.where((x == n - 1).unsqueeze(-1), masked_row, unmasked_row)

    work_dtype = torch.float64 if graph.family_id == DENSE else log_score.dtype
    ratios, shift = _shifted_ratios(log_score.to(work_dtype), x)
    floor = POSTERIOR_FLOOR * torch.exp(-shift)  # relative to r_x = 1, on the shifted scale
    if graph.family_id == UNIFORM:
        # K(-tau)^T r = (r - beta S) / alpha; the positive factor 1/alpha cancels in the
        # normalisation, so it is left out (it overflows past tau ~ 87), and the floor
        # is scaled by alpha to clamp the same entries
        tau64 = tau.to(torch.float64).unsqueeze(-1)
        beta = (-torch.expm1(-tau64) / n).to(work_dtype)
        inverted = ratios - beta * ratios.sum(-1, keepdim=True)
        floor = floor * torch.exp(-tau64).to(work_dtype)
    else:
        inverted = apply_kernel(graph, ratios, -tau)
    # never exactly 0, so that the normaliser cannot vanish whatever the scores
    inverted = torch.maximum(inverted, floor.clamp_min(torch.finfo(work_dtype).tiny))
    log_q = _safe_log(transition_column(graph, x, tau, work_dtype)) + inverted.log()
    return (log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)).to(log_score.dtype)


def _weights(graph: Graph, log_q: torch.Tensor, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``u(a) = q(a) / K(tau)[a, x]``, 0 where ``q = 0`` (in ``log_q``'s dtype); a
    positive ``q`` on a structural zero of the column gives ``inf``."""
    log_column = _safe_log(transition_column(graph, x, tau, log_q.dtype))
    return torch.where(log_q > float("-inf"), torch.exp(log_q - log_column.clamp_min(-1e30)), 0.0)


def posterior_to_scores(graph: Graph, log_p0: torch.Tensor, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The forward map: ``log r`` from ``log p_0|t``: ``r = K(tau)^T u``,
    ``u(a) = q(a) / K(tau)[a, x]`` (``u = 0`` where ``q = 0``). ``r_x = sum q = 1``."""
    work_dtype = torch.float64 if graph.family_id == DENSE else log_p0.dtype
    inverted = _weights(graph, log_p0.to(work_dtype), x, tau)
    return _safe_log(apply_kernel(graph, inverted, tau)).to(log_p0.dtype)


# ----------------------------------------------------------------------------- reverse step


def step_probabilities(
    graph: Graph,
    log_score: torch.Tensor,
    x: torch.Tensor,
    tau_t: torch.Tensor,
    tau_s: torch.Tensor,
    method: str = "analytic",
) -> torch.Tensor:
    """``P(x_s = y | x_t = x)`` for one reverse step from total noise ``tau_t`` to ``tau_s``.

    ``"analytic"``: the exact per-token bridge from the (clamped) conditional,
    ``P(y) = K(Delta)[y, x] sum_a q(a) K(tau_s)[a, y] / K(tau_t)[a, x]``; it is a
    distribution for any scores. ``"euler"``: ``P(y) = Delta Q[y, x] r_y`` for
    ``y != x``, the rest on ``x``, clamped at 0 and renormalised. Where
    ``tau_s = 0`` both return ``p_0|t`` (never the absorbing mask).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    dtype = torch.float64 if graph.family_id == DENSE else log_score.dtype
    log_q = scores_to_posterior(graph, log_score, x, tau_t).to(dtype)
    delta = (tau_t - tau_s).to(torch.float64)
    if method == "analytic":
        # P = K(Delta)[:, x] * (K(tau_s)^T w)
        probs = transition_column(graph, x, delta, dtype) * apply_kernel(graph, _weights(graph, log_q, x, tau_t), tau_s)
    else:
        jump = delta.unsqueeze(-1).to(dtype) * rate_column(graph, x, dtype).clamp_min(0)
        logits = torch.where(jump > 0, _safe_log(jump) + log_score.to(dtype), float("-inf"))
        scale = logits.amax(-1, keepdim=True).clamp_min(0)  # exp(logits - scale) cannot overflow
        jumps = torch.exp(logits - scale)
        stay = (torch.exp(-scale) - jumps.sum(-1, keepdim=True)).clamp_min(0)
        probs = jumps + stay * _one_hot(x, graph.num_states, dtype)
        probs = torch.where((tau_s == 0).unsqueeze(-1), log_q.exp(), probs)
    probs = probs.clamp_min(0)
    return (probs / probs.sum(-1, keepdim=True)).to(log_score.dtype)


def sample_categorical(probs: torch.Tensor, generator: Optional[torch.Generator] = None,
                       uniforms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse-CDF draw of one index per row of ``probs`` (``(..., N)``, rows of any
    positive sum); ``uniforms`` (``probs.shape[:-1]``, in [0, 1)) are the draws' uniforms
    where the caller couples them, else they are drawn from ``generator``."""
    cdf = probs.to(torch.float64).cumsum(-1)
    if uniforms is None:
        # draw where the generator lives (a CPU generator may drive CUDA inputs)
        draw_device = generator.device if generator is not None else probs.device
        draw = torch.rand(probs.shape[:-1], generator=generator, dtype=torch.float64, device=draw_device).to(probs.device)
    else:
        draw = uniforms.to(device=probs.device, dtype=torch.float64)
    index = torch.searchsorted(cdf, (draw * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    # rounding can push the draw past the last cell: take the last state with mass
    last_positive = probs.shape[-1] - 1 - torch.argmax((probs.flip(-1) > 0).to(torch.int8), dim=-1)
    return torch.minimum(index, last_positive)


def fused_euler_step(graph: Graph, log_score: torch.Tensor, x: torch.Tensor, tau_t: torch.Tensor, tau_s: torch.Tensor,
                     method: str = "analytic", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One reverse step: ``x_s ~ step_probabilities(...)``, int64 of ``x``'s shape."""
    return sample_categorical(step_probabilities(graph, log_score, x, tau_t, tau_s, method), generator)


# ----------------------------------------------------------------------------- loss


def conditional_matching_loss(
    graph: Graph, student_log_score: torch.Tensor, x_t: torch.Tensor, tau_t: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Per-position cross-entropy ``-sum_a target(a) log q_student(a)`` (``(...)``),
    with ``0 log 0 = 0``; the student's conditional comes from the inversion."""
    log_q = scores_to_posterior(graph, student_log_score, x_t, tau_t)
    target = target.to(log_q.dtype)
    return -torch.where(target > 0, target * log_q, 0.0).sum(-1)
