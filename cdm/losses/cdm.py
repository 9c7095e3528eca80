"""Exact conditional distribution matching (CDM): distilling a many-step teacher
into a k-step student (seed 001; docs/MATH.md section 4).

Both forms rest on the Markov decomposition through an intermediate time s < t,

    p_0|t(x_0 | x_t) = sum_{x_s} p_0|s(x_0 | x_s) p_s|t(x_s | x_t),

and on cross-entropy being linear in its target: one draw of x_s gives an
unbiased gradient of the cross-entropy against the mixture.

Per-token CDM (:func:`per_token_cdm_loss`), as seed 001 describes it: draw t on
the student's k-step grid and ``s = t - Delta t``; noise clean data to x_t;
draw x_s with a reverse step (``fused_euler_step``) of a chosen network; the
target is the teacher's per-token conditional at s (``scores_to_posterior``,
detached); the loss is ``conditional_matching_loss`` of the student's
conditional at t. Its optimum (with x_s from the exact ``p_s|t``) is the
per-token marginal of ``p_0|t``, so a factorised student built from it is the
teacher's own factorised sampler: at k = 1 the product of the data marginals
(the exact study in MATH.md and tests/test_cdm_exact.py).

Joint CDM (:func:`joint_cdm_loss`): a mixture student
``p(x_0 | x_t) = E_lambda prod_i p(x_0^i | x_t, lambda)`` is fitted by the
mixture NLL ``-log (1/M) sum_m prod_i p(x_0^i | x_t, lambda_m)`` of x_0 drawn
from the teacher's *joint* conditional: teacher steps from t down to a small
s (the Markov decomposition, so correlations between tokens survive), then
x_0 from the teacher's per-token conditional at s. This is the form that
beats the teacher's factorised few-step sampler.

Every hot path goes through the public ``cdm_kernels`` ops. The teacher is
evaluated under ``torch.no_grad``; gradients reach the student only.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

import cdm_kernels as ck
from cdm_kernels import reference

from ..data.markov import enumerate_sequences, sequence_index
from ..models.dit import component_index
from ..models.student import model_device
from ..sampling import (EXACT_SUPPORT, METHODS, add_noise, call_model, draw_latents, exact_chain_matrix,
                        inversion_dtype, latent_dim, mixture_log_weights, prior_sample, rate_column,
                        shared_block_count, step_log_scores, tau_of_time, time_grid, unwrap)

__all__ = [
    "sample_times",
    "teacher_chain",
    "student_rollout",
    "per_token_cdm_loss",
    "step_log_likelihood",
    "ExactTargets",
    "joint_cdm_loss",
]

SAMPLERS = ("student", "teacher")
T_DISTS = ("grid", "uniform")
WEIGHTINGS = ("none", "rate")
REDUCTIONS = ("mean", "none")
JOINT_TARGETS = ("clean", "step", "exact")
COUPLINGS = ("independent", "stratified")


# ----------------------------------------------------------------------------- shared pieces


def _check_one_of(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _uniform(n: int, generator, device) -> torch.Tensor:
    draw_device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, dtype=torch.float64, device=draw_device).to(device)


def sample_times(steps: int, batch: int, *, t_dist: str = "grid", grid_weights: Optional[Sequence[float]] = None,
                 generator: Optional[torch.Generator] = None, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Training times of a k-step student: ``(t, t_next)``, float64 (B,) each.

    ``"grid"``: ``t = 1 - j/k`` with ``j ~ U{0..k-1}``, ``t_next = t - 1/k`` (the
    times the k-step sampler visits); ``grid_weights`` (k values >= 0, any
    positive sum) draws ``j`` with those relative frequencies instead, e.g. to
    train more where ``cdm eval --handover`` finds a student's steps worst (what
    that gained: docs/RESULTS.md).
    ``"uniform"``: ``t ~ U(1/k, 1]`` and ``t_next = t - 1/k`` (a student for any
    grid of step 1/k).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    _check_one_of("t_dist", t_dist, T_DISTS)
    if grid_weights is not None:
        grid_weights = _check_grid_weights(grid_weights, steps, t_dist)
    u = _uniform(batch, generator, device)
    if t_dist == "grid":
        if grid_weights is None:
            j = torch.floor(u * steps).clamp_(max=steps - 1)
        else:  # inverse CDF of the categorical over the grid
            cdf = torch.tensor(grid_weights, dtype=torch.float64, device=device).cumsum(0)
            j = torch.searchsorted(cdf / cdf[-1], u, right=True).clamp_(max=steps - 1).to(torch.float64)
        t = 1.0 - j / steps
    else:
        t = 1.0 - u * (1.0 - 1.0 / steps)
    return t, (t - 1.0 / steps).clamp_min(0.0)


def _check_grid_weights(grid_weights, steps: int, t_dist: str) -> list[float]:
    if t_dist != "grid":
        raise ValueError(f"grid_weights needs t_dist='grid', got t_dist={t_dist!r}")
    try:
        if isinstance(grid_weights, str):
            raise TypeError
        weights = [float(w) for w in grid_weights]
    except (TypeError, ValueError):
        raise ValueError(f"grid_weights must be {steps} numbers, got {grid_weights!r}") from None
    if len(weights) != steps or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"grid_weights must be {steps} finite numbers >= 0 (one per grid time of the {steps}-step "
                         f"student) with a positive sum, got {grid_weights!r}")
    return weights


def _scores(model, x, tau, lam=None, graph=None) -> torch.Tensor:
    log_score = call_model(model, x, tau, lam)
    return log_score.to(inversion_dtype(graph, log_score.dtype)) if graph is not None else log_score


@torch.no_grad()
def teacher_chain(model, graph: ck.Graph, noise, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, steps: int,
                  *, method: str = "analytic", generator: Optional[torch.Generator] = None,
                  batch_size: Optional[int] = None, strata: int = 1) -> torch.Tensor:
    """``x_s`` from ``steps`` reverse steps of ``model`` from time t to time s
    (per sequence, (B,) each, ``s < t``), equally spaced in time; ``s = 0``
    ends at tau = 0 (clean tokens). Every step is one ``fused_euler_step``.
    ``batch_size``: sequences per network call (default all B): the chain's
    (B, L, N) scores, a few copies of which a step holds, shrink to batch_size rows
    (with ``strata``, to whole groups).

    ``strata = R > 1`` (B a multiple of R): each consecutive group of R chains is
    coupled by Latin-hypercube uniforms (:func:`_stratified_draw`, MATH.md section 6):
    every chain keeps the step's law, so each row is a draw of the same chain as with
    ``strata = 1``, but the group's draws spread more evenly than independent ones."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(strata, bool) or not isinstance(strata, int) or strata < 1 or len(x_t) % strata:
        raise ValueError(f"strata must be a positive int that divides the batch ({len(x_t)}), got {strata!r}")
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        size = max(strata, batch_size - batch_size % strata)
        return torch.cat([teacher_chain(model, graph, noise, x_t[i:i + size], t[i:i + size], s[i:i + size], steps,
                                        method=method, generator=generator, strata=strata)
                          for i in range(0, len(x_t), size)])
    x = x_t
    for m in range(steps):
        t_from = t + (s - t) * (m / steps)
        t_to = t + (s - t) * ((m + 1) / steps)
        tau_from, tau_to = (tau_of_time(noise, time)[:, None].expand(x.shape) for time in (t_from, t_to))
        log_score = _scores(model, x, tau_from[:, 0], graph=graph)
        if strata == 1:
            x = ck.fused_euler_step(graph, log_score, x, tau_from, tau_to, method=method, generator=generator)
        else:
            x = _stratified_draw(_step_weights(graph, log_score, x, tau_from, tau_to, method), strata, generator)
    return x


def _stratified_draw(weights: torch.Tensor, strata: int, generator) -> torch.Tensor:
    """One state per row and position of ``weights`` (B, L, N), by inverse CDF, where in
    each consecutive group of ``strata`` = R rows the R uniforms of a position are one
    from each stratum ``[j/R, (j+1)/R)`` in a random order (a Latin hypercube across the
    group): each row's uniform is U(0, 1) and independent across positions and calls,
    so each row is an exact draw of its law."""
    rows, seq_len, _ = weights.shape
    shape = (rows // strata, strata, seq_len)
    order = _uniform(rows * seq_len, generator, weights.device).view(shape).argsort(1)
    u = (order + _uniform(rows * seq_len, generator, weights.device).view(shape)) / strata
    return reference.sample_categorical(weights, uniforms=u.view(rows, seq_len))


@torch.no_grad()
def _teacher_target(teacher, graph: ck.Graph, x_s: torch.Tensor, tau_s: torch.Tensor) -> torch.Tensor:
    """The teacher's per-token conditional ``p_0|s(. | x_s)`` (B, L, N) as float32 probabilities;
    at ``tau_s = 0`` it is the one-hot of ``x_s`` (no network call)."""
    target = nn.functional.one_hot(x_s.long(), graph.num_states).to(torch.float32)
    noisy = tau_s > 0
    if bool(noisy.any()):
        xs, taus = x_s[noisy], tau_s[noisy]
        log_q = ck.scores_to_posterior(graph, _scores(teacher, xs, taus, graph=graph), xs, taus[:, None].expand(xs.shape))
        target[noisy] = log_q.exp().to(torch.float32)
    return target


def _weights(weighting, noise, t: torch.Tensor) -> torch.Tensor:
    if callable(weighting):
        return torch.as_tensor(weighting(t), dtype=torch.float64, device=t.device)
    if weighting == "none":
        return torch.ones_like(t)
    if weighting == "rate":
        return noise.rate(t.clamp(0.0, 1.0))
    raise ValueError(f"weighting must be one of {WEIGHTINGS} or a callable of t, got {weighting!r}")


def _reduce(per_sequence: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sequence.mean()
    return per_sequence


# ----------------------------------------------------------------------------- per-token CDM


def per_token_cdm_loss(student, teacher, graph: ck.Graph, noise, x0: torch.Tensor, *, steps: int = 1,
                       sampler: str = "student", sampler_steps: int = 1, delta: Union[str, float] = "uniform",
                       t_dist: str = "grid", grid_weights: Optional[Sequence[float]] = None,
                       weighting: Union[str, Callable] = "none", method: str = "analytic",
                       generator: Optional[torch.Generator] = None, reduction: str = "mean") -> torch.Tensor:
    """Per-token CDM loss on clean data ``x0`` (B, L) for a ``steps``-step student.

    Options (those seed 001 leaves open):
      sampler: which network draws ``x_s`` from ``x_t``: ``"student"`` (the seed's
        choice) or ``"teacher"``; ``sampler_steps`` reverse steps from t to s
        (several teacher steps approach the exact joint ``p_s|t``).
      delta: ``Delta t`` as a fraction of the student's step ``1/k``: a float in
        (0, 1] (1.0: s is the next grid time) or ``"uniform"``: ``U(0, 1]``.
      t_dist: ``"grid"`` (the k-step grid) or ``"uniform"`` (see :func:`sample_times`);
        ``grid_weights``: relative frequencies of the k grid times (default equal).
      weighting: per-sequence weight ``w(t)``: ``"none"``, ``"rate"`` (the
        schedule's ``d tau / dt``) or a callable of t.
      method: the reverse step, ``"analytic"`` or ``"euler"``.
    Returns the mean over the batch of ``w(t) * mean_i CE_i`` (``reduction="none"``: (B,)).
    """
    _check_one_of("sampler", sampler, SAMPLERS)
    _check_one_of("reduction", reduction, REDUCTIONS)
    if x0.ndim != 2:
        raise ValueError(f"x0 must have shape (B, L), got {tuple(x0.shape)}")
    device, batch = x0.device, x0.shape[0]
    t, t_next = sample_times(steps, batch, t_dist=t_dist, grid_weights=grid_weights, generator=generator,
                             device=device)
    if delta == "uniform":
        fraction = (1.0 - _uniform(batch, generator, device)).clamp_min(1e-6)  # (0, 1]: s < t
    elif isinstance(delta, (int, float)) and 0.0 < float(delta) <= 1.0:
        fraction = torch.full_like(t, float(delta))
    else:
        raise ValueError(f"delta must be 'uniform' or a float in (0, 1], got {delta!r}")
    s = (t - fraction * (t - t_next)).clamp_min(0.0)
    tau_t, tau_s = tau_of_time(noise, t), tau_of_time(noise, s)

    x_t = add_noise(graph, x0, tau_t[:, None], generator)
    x_s = teacher_chain(student if sampler == "student" else teacher, graph, noise, x_t, t, s, sampler_steps,
                        method=method, generator=generator)
    target = _teacher_target(teacher, graph, x_s, tau_s)

    log_score = _scores(student, x_t, tau_t, graph=graph)
    per_position = ck.conditional_matching_loss(graph, log_score, x_t, tau_t[:, None].expand(x_t.shape),
                                                target, reduction="none")
    per_sequence = _weights(weighting, noise, t).to(per_position.dtype) * per_position.mean(-1)
    return _reduce(per_sequence, reduction)


# ----------------------------------------------------------------------------- joint CDM


def step_log_likelihood(graph: ck.Graph, log_score: torch.Tensor, x_t: torch.Tensor, tau_t: torch.Tensor,
                        tau_s: torch.Tensor, x_s: torch.Tensor, method: str = "analytic") -> torch.Tensor:
    """``log P(x_s | x_t)`` per position (B, L): the law ``fused_euler_step`` samples
    from (``cdm_kernels.reference.step_probabilities``) at the given ``x_s``,
    differentiable in ``log_score``. ``tau_t``, ``tau_s``: (B, L).

    ``"analytic"``: ``P(y) = K(Delta)[y, x] sum_a q(a) K(tau_s)[a, y] / K(tau_t)[a, x]``
    with q from ``scores_to_posterior`` and the sum by ``apply_kernel`` (at
    ``tau_s = 0`` it is ``q(y)``); ``"euler"``: jumps ``Delta Q[y, x] r_y``, the rest
    on ``x``. Both renormalised, as the step itself is."""
    probs = _step_weights(graph, log_score, x_t, tau_t, tau_s, method)
    return probs.gather(-1, x_s.long()[..., None]).squeeze(-1).log() - probs.sum(-1).log()


def _step_weights(graph: ck.Graph, log_score: torch.Tensor, x_t: torch.Tensor, tau_t: torch.Tensor,
                  tau_s: torch.Tensor, method: str) -> torch.Tensor:
    """The reverse step's law of :func:`step_log_likelihood` (B, L, N), not yet normalised."""
    if method == "analytic":
        log_q = ck.scores_to_posterior(graph, log_score, x_t, tau_t)
        column = ck.transition_column(graph, x_t, tau_t).to(log_q.dtype)
        reachable = column > 0  # a structural zero of K(tau_t)[:, x] is one of q too: no 0/0
        weights = torch.where(reachable, log_q.exp() / torch.where(reachable, column, 1.0), 0.0)
        bridge = ck.transition_column(graph, x_t, tau_t - tau_s).to(log_q.dtype)
        probs = (bridge * ck.apply_kernel(graph, weights, tau_s)).clamp_min(0)
    elif method == "euler":
        rates = (tau_t - tau_s)[..., None].to(log_score.dtype) * rate_column(graph, x_t, log_score.dtype)
        logits = torch.where(rates > 0, rates.log() + log_score, float("-inf"))
        scale = logits.amax(-1, keepdim=True).clamp_min(0).detach()  # exp cannot overflow; cancels below
        jumps = (logits - scale).exp()
        stay = ((-scale).exp() - jumps.sum(-1, keepdim=True)).clamp_min(0)
        probs = jumps + stay * nn.functional.one_hot(x_t.long(), graph.num_states).to(jumps.dtype)
        clean = (tau_s == 0)[..., None]
        if bool(clean.any()):
            probs = torch.where(clean, ck.scores_to_posterior(graph, log_score, x_t, tau_t).exp().to(probs.dtype), probs)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return probs


@torch.no_grad()
def student_rollout(student, graph: ck.Graph, noise, t: torch.Tensor, steps: int, seq_len: int, *,
                    method: str = "analytic", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``x_t`` where the student's own ``steps``-step sampler is at time t (per sequence,
    (B,), on its grid ``1 - j/steps``): from the prior, one ``fused_euler_step`` per grid
    step, a fresh latent per step and sequence (as :func:`cdm.sampling.sample`)."""
    model = unwrap(student)  # no backward follows: past DDP's hooks
    x = prior_sample(graph, (len(t), seq_len), generator, t.device)
    for j in range(steps):
        t_from, t_to = 1.0 - j / steps, 1.0 - (j + 1) / steps
        moving = t < t_from - 0.5 / steps  # sequences whose t lies further down the grid
        if not bool(moving.any()):
            break
        xs = x[moving]
        tau_from, tau_to = (tau_of_time(noise, torch.full((len(xs),), v, dtype=torch.float64, device=t.device))
                            for v in (t_from, t_to))
        log_score = step_log_scores(model, xs, tau_from, generator)
        log_score = log_score.to(inversion_dtype(graph, log_score.dtype))
        x[moving] = ck.fused_euler_step(graph, log_score, xs, tau_from[:, None].expand(xs.shape),
                                        tau_to[:, None].expand(xs.shape), method=method, generator=generator)
    return x


class ExactTargets:
    """Joint CDM's clean targets in closed form, on an enumerable state space.

    The sampled targets of :func:`joint_cdm_loss` are draws of the teacher's
    ``teacher_steps``-step chain from t to 0 (the uniform grid on [0, t]); here the
    chain's whole law ``P(x_0 | x_t)`` is computed for every x_t of the full product
    space and every grid time ``t = 1 - j/steps`` of the student
    (:func:`cdm.sampling.exact_chain_matrix`: ``steps * teacher_steps`` S^3 matrix
    products into ``steps`` (S, S) float32 tables, built once before training; their
    cost: docs/RESULTS.md), and
    ``target="exact"`` takes the expectation over x_0 in place of ``num_targets``
    draws: the R -> infinity limit of the sampled loss, with no teacher call while
    training. ``max_support`` bounds S (each table holds S^2 floats).
    """

    def __init__(self, teacher, graph: ck.Graph, noise, seq_len: int, steps: int, teacher_steps: int,
                 method: str = "analytic", max_support: int = EXACT_SUPPORT):
        if not isinstance(steps, int) or steps < 1 or not isinstance(teacher_steps, int) or teacher_steps < 1:
            raise ValueError(f"steps and teacher_steps must be positive ints, got {steps!r} and {teacher_steps!r}")
        self.num_states, self.steps, self.teacher_steps = graph.num_states, steps, teacher_steps
        device = model_device(teacher)
        support = enumerate_sequences(graph.num_states, seq_len, max_support=max_support).to(device)
        self.tables = [exact_chain_matrix(teacher, graph, support,
                                          tau_of_time(noise, time_grid(teacher_steps, 1.0 - j / steps, 0.0, device)),
                                          method=method)
                       for j in range(steps)]

    def probabilities(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``P(x_0 = support[b] | x_t)`` (B, S) float32 for x_t (B, L) at grid times t (B,)."""
        j = torch.round((1.0 - t) * self.steps).long()
        if bool((j < 0).any() or (j >= self.steps).any()) or not torch.allclose(t, 1.0 - j.to(t.dtype) / self.steps):
            raise ValueError(f"t must lie on the {self.steps}-step grid 1 - j/{self.steps} of these targets")
        rows = sequence_index(x_t.long(), self.num_states)
        out = torch.empty(len(x_t), self.tables[0].shape[1], dtype=torch.float32, device=x_t.device)
        for g, table in enumerate(self.tables):
            at = j == g
            out[at] = table[rows[at]].to(x_t.device)
        return out


def _joint_log_likelihoods(graph: ck.Graph, log_score: torch.Tensor, x_t: torch.Tensor,
                           tau_t: torch.Tensor) -> torch.Tensor:
    """``log prod_i p(y^i | x_t)`` of a factorised conditional for every sequence y of the
    full product space in lexicographic order: (B, N^L) float32, from log-scores (B, L, N)."""
    log_q = ck.scores_to_posterior(graph, log_score, x_t, tau_t).to(torch.float32)
    rows = log_q[:, 0]
    for i in range(1, log_q.shape[1]):
        rows = (rows[:, :, None] + log_q[:, i, None, :]).reshape(len(rows), -1)
    return rows


def _check_joint_options(x0, *, steps, num_latents, num_targets, teacher_steps, target, s, t_dist, rollout, method,
                         exact_targets, reduction, chunk, coupling) -> None:
    _check_one_of("reduction", reduction, REDUCTIONS)
    _check_one_of("coupling", coupling, COUPLINGS)
    if not isinstance(num_latents, int) or num_latents < 1:
        raise ValueError(f"num_latents must be a positive int, got {num_latents!r}")
    if not isinstance(num_targets, int) or num_targets < 1:
        raise ValueError(f"num_targets must be a positive int, got {num_targets!r}")
    if not isinstance(teacher_steps, int) or teacher_steps < 1:
        raise ValueError(f"teacher_steps must be a positive int, got {teacher_steps!r}")
    if not 0.0 <= rollout <= 1.0 or (rollout and t_dist != "grid"):
        raise ValueError(f"rollout must be in [0, 1] (and needs t_dist='grid'), got {rollout!r}")
    _check_one_of("target", target, JOINT_TARGETS)
    if target != "clean" and s is not None:
        raise ValueError("s (the time of the teacher's last per-token conditional) applies to target='clean' only")
    if chunk is not None and target == "exact":
        raise ValueError("chunk does not go with target='exact' (its likelihoods need whole conditionals)")
    if coupling != "independent" and target == "exact":
        raise ValueError("coupling couples the teacher's draws: target='exact' draws none")
    if target == "exact":
        if not isinstance(exact_targets, ExactTargets):
            raise ValueError("target='exact' needs exact_targets=ExactTargets(teacher, graph, noise, seq_len, "
                             "steps, teacher_steps)")
        if (exact_targets.steps, exact_targets.teacher_steps) != (steps, teacher_steps):
            raise ValueError(f"exact_targets were built for steps={exact_targets.steps}, "
                             f"teacher_steps={exact_targets.teacher_steps}; the loss has steps={steps}, "
                             f"teacher_steps={teacher_steps}")
        if t_dist != "grid":
            raise ValueError(f"target='exact' needs t_dist='grid' (its tables hold the grid times), got {t_dist!r}")
    elif exact_targets is not None:
        raise ValueError(f"exact_targets are used by target='exact' only, got target={target!r}")
    _check_one_of("method", method, METHODS)
    if x0.ndim != 2:
        raise ValueError(f"x0 must have shape (B, L), got {tuple(x0.shape)}")


@torch.no_grad()
def _teacher_draws(teacher, graph: ck.Graph, noise, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                   draws: int, *, target: str, s: Optional[float], teacher_steps: int, method: str,
                   generator, batch_size: Optional[int] = None, coupling: str = "independent") -> torch.Tensor:
    """``draws`` targets per x_t (B * draws, L): x_s at ``t_next`` for ``target="step"``,
    else x_0 through the teacher's chain from t via s; ``batch_size`` sequences per
    network call (default all); ``coupling="stratified"``: the draws of one x_t are
    coupled chains (:func:`teacher_chain`'s ``strata``)."""
    x_from, t_from, t_to = x_t.repeat_interleave(draws, 0), t.repeat_interleave(draws), t_next.repeat_interleave(draws)
    options = dict(method=method, generator=generator, batch_size=batch_size,
                   strata=draws if coupling == "stratified" else 1)
    if target == "step":
        return teacher_chain(teacher, graph, noise, x_from, t_from, t_to, teacher_steps, **options)
    default_s = t_from / teacher_steps
    s_time = default_s if s is None else torch.where(torch.full_like(t_from, float(s)) < t_from,
                                                     torch.full_like(t_from, float(s)), default_s)
    x_s = x_from
    if teacher_steps > 1:
        x_s = teacher_chain(teacher, graph, noise, x_from, t_from, s_time, teacher_steps - 1, **options)
    return teacher_chain(teacher, graph, noise, x_s, s_time, torch.zeros_like(t_from), 1, **options)


def _noisy_inputs(student, graph: ck.Graph, noise, x0: torch.Tensor, steps: int, *, t_dist: str,
                  grid_weights: Optional[Sequence[float]], rollout: float, method: str, generator) -> tuple:
    """``(t, t_next, x_t)`` of a joint-CDM step: times on the student's grid, and ``x0``
    noised to t, or for a ``rollout`` share of sequences the student's own sampler's state."""
    device, (batch, seq_len) = x0.device, x0.shape
    t, t_next = sample_times(steps, batch, t_dist=t_dist, grid_weights=grid_weights, generator=generator,
                             device=device)
    x_t = add_noise(graph, x0, tau_of_time(noise, t)[:, None], generator)
    if rollout:
        own = _uniform(batch, generator, device) < rollout
        if bool(own.any()):
            x_t[own] = student_rollout(student, graph, noise, t[own], steps, seq_len, method=method, generator=generator)
    return t, t_next, x_t


def _position_log_likelihood(graph: ck.Graph, log_score: torch.Tensor, x_t: torch.Tensor, tau_t: torch.Tensor,
                             y: torch.Tensor, tau_next: Optional[torch.Tensor], method: str) -> torch.Tensor:
    """``log p(y^i | x_t)`` per position (B, L) of the student's clean conditional, or with
    ``tau_next`` (B,) of its reverse step to that noise level (:func:`step_log_likelihood`)."""
    if tau_next is not None:
        return step_log_likelihood(graph, log_score, x_t, tau_t, tau_next[:, None].expand(x_t.shape), y, method)
    # one-hot targets are exact in float32 (a float64 copy would double the memory of the M-fold batch)
    one_hot = nn.functional.one_hot(y, graph.num_states).to(torch.float32)
    return -ck.conditional_matching_loss(graph, log_score, x_t, tau_t, one_hot, reduction="none")


def _mixture_log_likelihoods(student, graph: ck.Graph, noise, x_t: torch.Tensor, t: torch.Tensor,
                             t_next: torch.Tensor, targets: Optional[torch.Tensor], *, num_latents: int,
                             stratified: bool, target: str, method: str, generator,
                             chunk: Optional[int] = None) -> torch.Tensor:
    """``log sum_m prod_i p(y^i | x_t, lambda_m) - log M`` (B, R) for the R targets y
    per x_t in ``targets`` (B * R, L), or (B, S) for every sequence of the support
    (``target="exact"``, ``targets`` None); with mixture weights, each latent's term
    carries its importance weight ``K w_k(x_t)``.

    ``chunk`` (a ``DiT`` student; not with ``target="exact"``, which needs whole
    conditionals): the student's output layer and the targets' log-likelihoods
    run ``chunk`` positions at a time under activation checkpointing
    (``DiT.forward(per_position=...)``), so no (B * M, L, N) tensor is held: at
    the field's vocabulary that tensor, several times over, is most of a step's
    memory (docs/ARCHITECTURE.md, "A joint-CDM step at the field's scale"). The
    value and gradients are those of ``chunk=None``; the output layer runs once
    more in backward."""
    device, (batch, seq_len) = x_t.device, x_t.shape
    tau_t = tau_of_time(noise, t)
    m = num_latents if latent_dim(student) else 1
    x_rep = x_t.repeat_interleave(m, 0)
    tau_rep = tau_t.repeat_interleave(m, 0)[:, None].expand(x_rep.shape)
    lam = draw_latents(student, batch * m, generator, device, stratified_groups=m if (stratified and m > 1) else 0)
    # with shared blocks, M latents per sequence go in one call: the blocks before the latent run once per sequence
    x_in, tau_in = (x_t, tau_t) if shared_block_count(student) else (x_rep, tau_rep[:, 0])
    if target == "exact":  # every x_0 of the support: (B, M, S)
        log_score = _scores(student, x_in, tau_in, lam, graph=graph)
        log_lik = _joint_log_likelihoods(graph, log_score, x_rep, tau_rep).view(batch, m, -1)
    else:
        r = len(targets) // batch
        targets = targets.view(batch, r, seq_len).repeat_interleave(m, 0)  # (B * M, r, L)
        tau_next = tau_of_time(noise, t_next).repeat_interleave(m, 0) if target == "step" else None

        def per_position(log_score, x, sigma, positions):  # log p(y^i | x_t, lambda) of each target: (B * M, P, r)
            log_score = log_score.to(inversion_dtype(graph, log_score.dtype))
            tau = sigma[:, None].expand(x.shape)
            return torch.stack([_position_log_likelihood(graph, log_score, x, tau, targets[:, j, positions], tau_next,
                                                         method) for j in range(r)], -1)

        if chunk is None:
            per_pos = per_position(call_model(student, x_in, tau_in, lam), x_rep, tau_rep[:, 0], slice(None))
        else:
            per_pos = call_model(student, x_in, tau_in, lam, per_position=per_position, chunk=chunk)
        log_lik = per_pos.sum(1).view(batch, m, r)
    log_w = mixture_log_weights(student, x_t, tau_t)
    if log_w is not None:  # lambda was drawn uniformly: importance weight K w_k
        components = log_w.shape[-1]
        index = component_index(lam, components).view(batch, m)
        log_lik = log_lik + (log_w.gather(1, index) + math.log(components)).to(log_lik.dtype)[..., None]
    return torch.logsumexp(log_lik, dim=1) - math.log(m)


def joint_cdm_loss(student, teacher, graph: ck.Graph, noise, x0: torch.Tensor, *, steps: int = 1,
                   num_latents: int = 8, num_targets: int = 1, teacher_steps: int = 16, target: str = "clean",
                   s: Optional[float] = None, t_dist: str = "grid", grid_weights: Optional[Sequence[float]] = None,
                   stratified: bool = True, rollout: float = 0.0, weighting: Union[str, Callable] = "none",
                   method: str = "analytic", exact_targets: Optional[ExactTargets] = None,
                   chunk: Optional[int] = None, teacher_batch: Optional[int] = None, coupling: str = "independent",
                   generator: Optional[torch.Generator] = None, reduction: str = "mean") -> torch.Tensor:
    """Joint CDM loss on clean data ``x0`` (B, L) for a ``steps``-step mixture student.

    For each sequence: t on the student's grid (``t_dist``, ``grid_weights``: see
    :func:`sample_times`), ``x_t`` by forward noising, then a draw from the
    teacher's joint conditional ``x_0' ~ p_0|t(. | x_t)`` through the Markov
    decomposition: the teacher's ``teacher_steps``-step sampler run from t
    (``teacher_steps - 1`` steps down to s, then one step to tau = 0, i.e.
    ``x_0'`` from the teacher's per-token conditional at s). ``s`` (a time)
    defaults to ``t / teacher_steps``, which makes the chain the teacher's own
    ``teacher_steps``-step grid restricted to [0, t]; a given ``s >= t`` falls
    back to that default for the sequence. ``rollout`` (grid times only): the
    share of sequences whose ``x_t`` comes from the student's own sampler
    (:func:`student_rollout`), so that it also learns its conditionals at the
    states its sampler visits; the default 0, because it gained nothing beyond
    the run-to-run spread (docs/RESULTS.md).

    ``target="step"`` (k > 1; at k = 1 the two coincide): the target is instead
    ``x_s`` at the student's next grid time ``s = t - 1/k``, drawn by
    ``teacher_steps`` teacher steps from t to s, and the student is fitted by the
    mixture NLL of its own reverse step, ``-log E_lambda prod_i P(x_s^i | x_t,
    lambda)`` (:func:`step_log_likelihood`: the transition its sampler takes).
    Summed over the grid these are the terms of the path KL between the
    teacher's chain and the student's sampler, an upper bound on the KL of their
    outputs; fitting ``p_0|t`` instead (``"clean"``) also spends the mixture on
    detail of x_0 that the noise between s and 0 washes out.

    ``target="exact"`` (enumerable data; ``exact_targets``, an :class:`ExactTargets`
    of the same ``steps`` and ``teacher_steps``): the clean target's law itself,
    ``-sum_{x_0} P(x_0 | x_t) log q(x_0 | x_t)`` over every x_0, in place of R draws
    (``num_targets`` is ignored and the teacher is not called).

    The student is evaluated at ``(x_t, t)`` with ``num_latents`` (M) latent
    draws per sequence (stratified in the first coordinate when ``stratified``),
    and the loss is the mixture NLL per token,
    ``-(logsumexp_m sum_i log p(x_0'^i | x_t, lambda_m) - log M) / L``,
    through ``conditional_matching_loss`` with one-hot targets (the per-token
    log-likelihoods of the student's inverted conditionals). A student without a
    latent gets M = 1 (plain NLL of the teacher's joint samples). A K-component
    student with weights ``w(x_t)`` (``mixture_weights``) is fitted by
    ``-log (1/M) sum_m K w_{k_m}(x_t) prod_i p(x_0'^i | x_t, k_m)``, an unbiased
    estimate of its mixture likelihood inside the log for any M (exact at
    M = K, each component once), so the weights are learnt with the components.
    ``num_targets`` (R): draws of the target per x_t, their NLLs averaged; the
    student's M evaluations are shared by all R, so the R-fold cost is the
    teacher's chain only. Returns the batch mean of ``w(t) * NLL``
    (``reduction="none"``: (B,)). The defaults (M = 8, 16 teacher steps) are
    where the exact study stopped gaining for its cost (docs/RESULTS.md).

    ``coupling="stratified"`` couples the R draws of an x_t by Latin-hypercube uniforms
    (each still an exact draw: the same objective at a lower variance for the same teacher
    calls; :func:`teacher_chain`, MATH.md section 6). ``chunk`` and ``teacher_batch`` bound
    the step's memory, not its value: see :func:`_mixture_log_likelihoods` and :func:`teacher_chain`.
    """
    _check_joint_options(x0, steps=steps, num_latents=num_latents, num_targets=num_targets,
                         teacher_steps=teacher_steps, target=target, s=s, t_dist=t_dist, rollout=rollout,
                         method=method, exact_targets=exact_targets, reduction=reduction, chunk=chunk,
                         coupling=coupling)
    t, t_next, x_t = _noisy_inputs(student, graph, noise, x0, steps, t_dist=t_dist, grid_weights=grid_weights,
                                   rollout=rollout, method=method, generator=generator)
    targets = None
    if target == "exact":
        target_probs = exact_targets.probabilities(x_t, t)  # (B, S): the law of the draws
    else:
        targets = _teacher_draws(teacher, graph, noise, x_t, t, t_next, num_targets, target=target, s=s,
                                 teacher_steps=teacher_steps, method=method, generator=generator,
                                 batch_size=teacher_batch, coupling=coupling)
    log_mixture = _mixture_log_likelihoods(student, graph, noise, x_t, t, t_next, targets, num_latents=num_latents,
                                           stratified=stratified, target=target, method=method, generator=generator,
                                           chunk=chunk)
    nll = (-torch.where(target_probs > 0, target_probs * log_mixture, 0.0).sum(-1) if target == "exact"
           else -log_mixture.mean(-1))
    return _reduce(_weights(weighting, noise, t).to(nll.dtype) * (nll / x0.shape[1]), reduction)
