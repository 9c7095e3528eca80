"""Di4C: distillation of discrete diffusion through dimensional correlations
(Hayakawa et al., ICML 2025; seed 003), as the authors' code does it.

The student is a mixture model, ``p(x_0 | x_t) = E_lambda prod_d p(x_0^d | x_t, lambda)``
with ``lambda ~ U(0, 1)^latent_dim`` (``make_student(teacher, latent_dim=...)``),
estimated with ``M`` (``num_latents``) latent draws per example. One call draws,
per sequence, ``delta`` log-uniform in ``[delta_min, delta_max]``, a time t and
``u = t - delta``, and sums three losses (each per sequence):

* distillation (small times): ``x_r`` is clean data noised to a time r near 0
  (``r = min_time + b U max_distil_time``, ``b ~ Bernoulli(1/2)``), one per latent
  draw; the loss is ``KL(p_teacher(. | x_r) || p_student(. | x_r, lambda))``
  summed over tokens, averaged over the M draws (conditional_matching_loss: the
  cross-entropy, plus the teacher's entropy so that the value is the KL).
* consistency (a teacher step t -> u, the student at u as the target): ``x_u``
  from one analytic teacher step (``fused_euler_step``) from ``x_t``, M times; the
  student at ``(x_u, u)`` with fresh latents, without gradient, gives the target.
  The per-token part is ``KL(mean_m p_student(. | x_u^m, lambda_m) || bar p_t)``
  with ``bar p_t`` the student's mixture marginal at ``(x_t, t)``; the correlation
  part draws ``x_0^m ~ p_student(. | x_u^m, lambda_m)`` (``fused_euler_step`` to
  tau = 0) and scores each draw under the student's mixture at t with the
  control variate below, averaged over the M draws.
* data (correlation, with the control variate): for the clean ``x_0`` that was
  noised to ``x_t``,
  ``-[log mean_m prod_d p(x_0^d | x_t, lambda_m) - sum_d log mean_m p(x_0^d | x_t, lambda_m)]``
  (the mixture log-likelihood minus that of the product of its marginals),
  weighted by ``data_weight * c(t)``, plus the per-token part computed in closed
  form against the teacher, ``KL(p_teacher(. | x_t) || bar p_t)`` (the control
  variate: its expectation replaces the subtracted marginal term).

Choices and where they come from (sony/di4c; ``tauldr/lib/losses/losses.py``
``DistilChain`` and ``tauldr/train_distil.py`` for the uniform-type CTMC of their
section 5.1, the setting closest to ours; ``sdtt/.../multi_round_sdtt.py`` for
their masked language model):

* all three losses every call, unit weights (tauldr); the masked-LM code instead
  switches between the distillation loss (t < 0.02) and the consistency loss.
* ``delta`` log-uniform in [1e-3, 1e-2], ``t ~ U(min_time + delta, 1)``,
  ``min_time = 0.01``, ``max_distil_time = 0.01`` (tauldr); times are this
  package's schedule times in [0, 1].
* ``c(t) = sigmoid(20 (t - 0.5))`` (``data_schedule="sigmoid"``: tauldr's run
  script and the masked-LM config); ``data_weight = 1`` (tauldr; the masked-LM
  config uses 0.1); ``"const"`` and ``"linear"`` (c = t) are their other options.
* ``M = 16`` (both of their configurations); latents i.i.d. uniform in their
  code; here stratified in the first coordinate by default (the same
  expectation, lower variance; ``stratified=False`` is theirs).
* the control variate on (``use_cv``, their default).
* the student at u and the teacher in eval/no-grad (the masked-LM code; the
  tauldr code detaches the same quantities).

Departures, and why:

* ``t_dist="grid"`` (not the default) draws t on the student's k-step grid
  (``sample_times``) as this package's CDM losses do, then clips
  ``u >= min_time``: a k-step student is only ever evaluated there, which
  matters for table students in the exact study. With the authors'
  ``t_dist="uniform"`` the ``steps`` argument is unused (their students are
  trained for every t and sampled with any number of steps).
* every term is divided by the sequence length L (the authors sum over
  tokens): the package's losses are per token; the relative weights are theirs.
* the student's conditionals come from its concrete scores through
  ``scores_to_posterior`` (the authors' networks output logits).
* the two student evaluations that need gradients (at ``x_t`` and at ``x_r``)
  are one batched forward call, so a DistributedDataParallel student sees one
  forward per backward.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

import cdm_kernels as ck

from ..sampling import add_noise, draw_latents, has_mixture_weights, latent_dim, tau_of_time
from .cdm import REDUCTIONS, _check_one_of, _reduce, _scores, _uniform, sample_times

__all__ = ["di4c_loss"]

T_DISTS = ("uniform", "grid")
DATA_SCHEDULES = ("sigmoid", "const", "linear")


def _log_posterior(graph, log_score, x, tau) -> torch.Tensor:
    """``log p_0|t(. | x)`` (B, L, N) from log-scores (differentiable), tau (B,)."""
    return ck.scores_to_posterior(graph, log_score, x, tau[:, None].expand(x.shape))


def _mixture_log_lik(log_q: torch.Tensor, x0: torch.Tensor, use_cv: bool) -> torch.Tensor:
    """Per-draw mixture log-likelihoods of tokens under an M-component estimate.

    log_q: (B, M, L, N) per-latent log-conditionals; x0: (B, K, L) K draws per
    sequence. Returns (B, K): ``log mean_m prod_d q_m(x0^d)``, minus
    ``sum_d log mean_m q_m(x0^d)`` when ``use_cv``.
    """
    batch, m, seq_len, _ = log_q.shape
    k = x0.shape[1]
    index = x0.permute(0, 2, 1)[..., None].expand(batch, seq_len, k, m)  # (B, L, K, M)
    ll = torch.gather(log_q.permute(0, 2, 3, 1), 2, index)  # (B, L, K, M): log q_m(x0_k^d)
    out = torch.logsumexp(ll.sum(1), dim=-1) - math.log(m)  # (B, K)
    if use_cv:
        out = out - (torch.logsumexp(ll, dim=-1) - math.log(m)).sum(1)
    return out


def _mixture_marginal(log_q: torch.Tensor) -> torch.Tensor:
    """``log mean_m q_m`` over dim 1 of (B, M, L, N). Structural zeros (``-inf`` in every
    component, e.g. the mask state of the absorbing graph) are floored at -1e30 first:
    logsumexp's gradient is NaN where all its inputs are ``-inf``. The floor is a
    constant there, so those entries get no gradient and still carry no mass."""
    return torch.logsumexp(log_q.clamp_min(-1e30), dim=1) - math.log(log_q.shape[1])


def _kl_rows(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum_{d, a} p (log p - log q)`` over the last two dims (0 log 0 = 0)."""
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum((-2, -1))


def _check_options(student, x0, *, reduction, t_dist, data_schedule, num_latents, min_time, delta_min, delta_max,
                   max_distil_time) -> None:
    _check_one_of("reduction", reduction, REDUCTIONS)
    _check_one_of("t_dist", t_dist, T_DISTS)
    _check_one_of("data_schedule", data_schedule, DATA_SCHEDULES)
    if not isinstance(num_latents, int) or num_latents < 1:
        raise ValueError(f"num_latents must be a positive int, got {num_latents!r}")
    if not 0 < delta_min <= delta_max or not 0 <= min_time or min_time + delta_max >= 1 or max_distil_time < 0:
        raise ValueError("need 0 < delta_min <= delta_max, 0 <= min_time, min_time + delta_max < 1, max_distil_time >= 0")
    if x0.ndim != 2:
        raise ValueError(f"x0 must have shape (B, L), got {tuple(x0.shape)}")
    if has_mixture_weights(student):
        raise ValueError("student: Di4C trains equal-weight mixtures; x_t-dependent mixture weights are for joint CDM")


def _times(batch: int, rows: int, *, steps, t_dist, min_time, delta_min, delta_max, max_distil_time, generator,
           device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t, u, r)``: per sequence t and ``u = t - delta`` (B,), and per latent draw the
    small distillation time r (B * M,)."""
    delta = delta_min * (delta_max / delta_min) ** _uniform(batch, generator, device)
    if t_dist == "uniform":
        t = min_time + delta + (1.0 - min_time - delta) * _uniform(batch, generator, device)
    else:
        t, _ = sample_times(steps, batch, t_dist="grid", generator=generator, device=device)
        t = torch.maximum(t, min_time + delta)
    r = min_time + (_uniform(rows, generator, device) < 0.5) * _uniform(rows, generator, device) * max_distil_time
    return t, t - delta, r


@torch.no_grad()
def _consistency_targets(student, graph: ck.Graph, teacher_score_t: torch.Tensor, x_t: torch.Tensor,
                         tau_t: torch.Tensor, tau_u: torch.Tensor, m: int, groups: int, method: str,
                         generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One analytic teacher step t -> u per latent draw, then the student at u with
    fresh latents: its draws of x_0 (B * M, L), its mixture marginal (B, L, N) and
    that marginal's log."""
    batch, seq_len = x_t.shape
    x_t_rep, tau_t_rep, tau_u_rep = x_t.repeat_interleave(m, 0), tau_t.repeat_interleave(m), tau_u.repeat_interleave(m)
    x_u = ck.fused_euler_step(graph, teacher_score_t.repeat_interleave(m, 0), x_t_rep,
                              tau_t_rep[:, None].expand(x_t_rep.shape), tau_u_rep[:, None].expand(x_t_rep.shape),
                              method=method, generator=generator)
    lam_u = draw_latents(student, len(x_u), generator, x_t.device, stratified_groups=groups)
    student_score_u = _scores(student, x_u, tau_u_rep, lam_u, graph=graph)
    log_q_u = _log_posterior(graph, student_score_u, x_u, tau_u_rep)  # (B*M, L, N)
    x0_u = ck.fused_euler_step(graph, student_score_u, x_u, tau_u_rep[:, None].expand(x_u.shape),
                               torch.zeros_like(x_u, dtype=torch.float64), method=method, generator=generator)
    log_q_u = log_q_u.view(batch, m, seq_len, -1)
    return x0_u, log_q_u.exp().mean(1), _mixture_marginal(log_q_u)


def _data_coefficient(data_schedule: str, t: torch.Tensor) -> torch.Tensor:
    """``c(t)``, the weight of the data term's correlation part."""
    if data_schedule == "sigmoid":
        return torch.sigmoid(20.0 * (t - 0.5))
    if data_schedule == "linear":
        return t
    return torch.ones_like(t)


def di4c_loss(student, teacher, graph: ck.Graph, noise, x0: torch.Tensor, *, steps: int = 1,
              num_latents: int = 16, t_dist: str = "uniform", min_time: float = 0.01, delta_min: float = 1e-3,
              delta_max: float = 1e-2, max_distil_time: float = 0.01, data_schedule: str = "sigmoid",
              data_weight: float = 1.0, distil_weight: float = 1.0, consistency_weight: float = 1.0,
              use_cv: bool = True, stratified: bool = True, method: str = "analytic",
              generator: Optional[torch.Generator] = None, reduction: str = "mean") -> torch.Tensor:
    """The Di4C loss on clean data ``x0`` (B, L) for a mixture student (see the module docstring).

    Returns the batch mean of ``distil + data + consistency`` per token
    (``reduction="none"``: (B,)). A student without a latent is a mixture of one
    component (M = 1: the correlation terms vanish with the control variate).
    """
    times = dict(min_time=min_time, delta_min=delta_min, delta_max=delta_max, max_distil_time=max_distil_time)
    _check_options(student, x0, reduction=reduction, t_dist=t_dist, data_schedule=data_schedule,
                   num_latents=num_latents, **times)
    device, (batch, seq_len) = x0.device, x0.shape
    m = num_latents if latent_dim(student) else 1
    rows = batch * m
    groups = m if (stratified and m > 1) else 0
    t, u, r = _times(batch, rows, steps=steps, t_dist=t_dist, generator=generator, device=device, **times)
    tau_t, tau_u, tau_r = tau_of_time(noise, t), tau_of_time(noise, u), tau_of_time(noise, r)
    tau_t_rep = tau_t.repeat_interleave(m)
    x_t = add_noise(graph, x0, tau_t[:, None], generator)
    x_t_rep = x_t.repeat_interleave(m, 0)
    x_r = add_noise(graph, x0.repeat_interleave(m, 0), tau_r[:, None], generator)

    with torch.no_grad():  # the teacher at x_t and x_r, and the consistency targets
        teacher_score_t = _scores(teacher, x_t, tau_t, graph=graph)
        log_p_teacher = _log_posterior(graph, teacher_score_t, x_t, tau_t)
        log_p_teacher_r = _log_posterior(graph, _scores(teacher, x_r, tau_r, graph=graph), x_r, tau_r)
        p_teacher, p_teacher_r = log_p_teacher.exp(), log_p_teacher_r.exp()
        x0_u, p_u_bar, log_p_u_bar = _consistency_targets(student, graph, teacher_score_t, x_t, tau_t, tau_u, m,
                                                          groups, method, generator)

    # the student: one forward with gradient at x_t and x_r
    lam_t = draw_latents(student, rows, generator, device, stratified_groups=groups)
    lam_r = draw_latents(student, rows, generator, device, stratified_groups=groups)
    lam = None if lam_t is None else torch.cat([lam_t, lam_r])
    score_all = _scores(student, torch.cat([x_t_rep, x_r]), torch.cat([tau_t_rep, tau_r]), lam, graph=graph)
    score_t, score_r = score_all[:rows], score_all[rows:]
    log_q_t = _log_posterior(graph, score_t, x_t_rep, tau_t_rep).view(batch, m, seq_len, -1)
    log_q_t_bar = _mixture_marginal(log_q_t)  # (B, L, N) the mixture's per-token marginal

    # distillation at small times: KL(teacher || student per latent), averaged over the draws
    cross_entropy = ck.conditional_matching_loss(graph, score_r, x_r, tau_r[:, None].expand(x_r.shape),
                                                 p_teacher_r.to(torch.float32), reduction="none")  # (B*M, L)
    entropy = -torch.where(p_teacher_r > 0, p_teacher_r * log_p_teacher_r, 0.0).sum(-1)
    distil = (cross_entropy - entropy.to(cross_entropy.dtype)).sum(-1).view(batch, m).mean(1)

    # data: correlation part with the control variate, per-token part against the teacher
    data_cor = -_mixture_log_lik(log_q_t, x0[:, None, :], use_cv)[:, 0]
    data = data_weight * _data_coefficient(data_schedule, t).to(data_cor.dtype) * data_cor
    if use_cv:
        data = data + _kl_rows(p_teacher, log_p_teacher, log_q_t_bar)

    # consistency: the student at u (after a teacher step) is the target of the student at t
    consistency = -_mixture_log_lik(log_q_t, x0_u.view(batch, m, seq_len), use_cv).mean(1)
    if use_cv:
        consistency = consistency + _kl_rows(p_u_bar, log_p_u_bar, log_q_t_bar)

    per_sequence = (distil_weight * distil + data + consistency_weight * consistency) / seq_len
    return _reduce(per_sequence, reduction)
