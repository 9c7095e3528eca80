"""D-MMD: discrete moment matching distillation (Hoogeboom, Ruhe, Heek, Mensink and
Salimans, 2026; seed 002), the discrete form of the alternating moment-matching
algorithm of Salimans et al. (2024, "Multistep distillation of diffusion models
via moment matching").

Two models are trained together:

* the generator (the student, a k-step sampler): at a time t of its grid it maps
  ``x_t`` to a per-token conditional ``x~ = p_0|t(. | x_t)`` (its first moment:
  the expected one-hot of the clean token), from which a clean sequence
  ``x^ ~ x~`` is drawn;
* an auxiliary model (initialised from the teacher) that learns the denoising
  conditional of the *generator's* samples: ``x^`` is re-noised to a time s < t
  through the forward bridge ``z_s ~ q(z_s | x_t, x^)``
  (``P(z = y) prop. to K(tau_s)[x^, y] K(tau_t - tau_s)[y, x_t]``), and the auxiliary
  model is fitted by cross-entropy of ``x^`` under its conditional at ``(z_s, s)``
  (``conditional_matching_loss`` with one-hot targets, a proper scoring rule, so
  its optimum is ``E[onehot(x^) | z_s]`` whatever the joint law of ``(x^, z_s)``).

The generator matches the first moments of the teacher and of the auxiliary
model on its own re-noised samples: with ``d = p_aux(. | z_s) - p_teacher(. | z_s)``
per token (no gradient), its loss is ``sum_i d_i . x~_i`` (the moment-matching
gradient ``d^T dx~/d theta`` of Salimans et al.), which lowers the generator's
probability of tokens the auxiliary model (the generator's own posterior)
predicts more often than the teacher. The value this module returns is the
squared moment mismatch ``sum_i ||d_i||^2`` per token (for logging); its
gradient is that of the surrogate.

Alternation: each call first takes ``aux_steps`` Adam steps of the auxiliary
model (``aux_lr``, gradient clipping at ``aux_grad_clip``) on fresh generator
samples from the same ``x_t`` (an independent draw of ``x^`` and ``z_s``), then
returns the generator loss computed with the updated auxiliary model on
another draw (reusing the draw the auxiliary model just fitted would bias ``d``
towards the generator's own samples). The auxiliary model and its optimiser
state are ``state_tensors()`` / ``load_state_tensors()`` (the Trainer saves them
under ``loss.``), so a resumed run continues exactly.

Choices the summary leaves open, and what is done here:

* ``x_t`` is clean data noised to a time of the generator's grid (as Salimans
  et al. do, rather than running the generator's own chain): at t = 1 it is a
  draw from the prior.
* s is uniform on ``(s_min, t)`` (or uniform over the given ``s_values`` below
  t: tables that answer at fixed times, as in the exact study).
* weighting ``w(s) = 1`` (``"none"``; the moments are probability vectors, all
  of one scale) or ``"rate"`` (the schedule's ``d tau / ds``).
* DistributedDataParallel: every rank holds its own replica of the auxiliary
  model (same initialisation); the auxiliary gradients are averaged over ranks
  (``all_reduce``) before each step, so the replicas stay identical; the
  checkpoint (written by rank 0) holds one copy, which every rank loads.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

import cdm_kernels as ck
from cdm_kernels import reference

from ..sampling import add_noise, draw_latents, tau_of_time
from ..train import _optimizer_tensors, _restore_optimizer
from ..models.student import freeze
from .cdm import REDUCTIONS, T_DISTS, WEIGHTINGS, _reduce, _scores, _uniform, _weights, sample_times

__all__ = ["DMMDLoss", "bridge_sample"]


@torch.no_grad()
def bridge_sample(graph: ck.Graph, x_clean: torch.Tensor, x_t: torch.Tensor, tau_t: torch.Tensor,
                  tau_s: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``z_s ~ q(z_s | x_t, x_0 = x_clean)`` per position: the forward bridge,
    ``P(z = y) prop. to K(tau_s)[x_clean, y] K(tau_t - tau_s)[y, x_t]``; tau (B,), s < t."""
    shape = x_t.shape
    onehot = nn.functional.one_hot(x_clean.long(), graph.num_states).to(torch.float64)
    row = ck.apply_kernel(graph, onehot, tau_s[:, None].expand(shape)).clamp_min(0)  # K(tau_s)[x_clean, :]
    col = ck.transition_column(graph, x_t, (tau_t - tau_s)[:, None].expand(shape)).clamp_min(0)  # K(delta)[:, x_t]
    probs = row * col
    return reference.sample_categorical(probs / probs.sum(-1, keepdim=True), generator)


class DMMDLoss(nn.Module):
    """``loss_fn(model, x0, generator=None)``: one auxiliary update, then the generator's
    D-MMD loss (see the module docstring). ``aux``: the auxiliary model (default a
    trainable copy of the teacher)."""

    def __init__(self, teacher: nn.Module, graph: ck.Graph, noise, *, steps: int = 1, aux: Optional[nn.Module] = None,
                 aux_lr: float = 1e-3, aux_steps: int = 1, aux_betas: tuple = (0.9, 0.999), aux_grad_clip: float = 1.0,
                 s_min: float = 1e-3, s_values: Optional[Sequence[float]] = None, t_dist: str = "grid",
                 weighting="none", method: str = "analytic", reduction: str = "mean"):
        super().__init__()
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if not isinstance(aux_steps, int) or aux_steps < 1:
            raise ValueError(f"aux_steps must be a positive int, got {aux_steps!r}")
        if not aux_lr > 0 or not aux_grad_clip > 0 or not 0 <= s_min < 1 / steps:
            raise ValueError("need aux_lr > 0, aux_grad_clip > 0 and 0 <= s_min < 1 / steps")
        if t_dist not in T_DISTS:
            raise ValueError(f"t_dist must be one of {T_DISTS}, got {t_dist!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not callable(weighting) and weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS} or a callable of s, got {weighting!r}")
        self._teacher = [freeze(teacher)]  # a list: not a submodule, so neither saved nor trained
        self.graph, self.noise = graph, noise
        self.steps, self.aux_steps, self.aux_grad_clip = steps, aux_steps, aux_grad_clip
        self.s_min, self.t_dist, self.weighting, self.method, self.reduction = s_min, t_dist, weighting, method, reduction
        self.s_values = None if s_values is None else torch.as_tensor(list(s_values), dtype=torch.float64)
        self.aux = copy.deepcopy(teacher) if aux is None else aux
        self.aux.requires_grad_(True).train()
        self.optimizer = torch.optim.Adam([p for p in self.aux.parameters() if p.requires_grad], lr=aux_lr,
                                          betas=tuple(aux_betas))
        self.last_aux_loss = float("nan")

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    # -------------------------------------------------------------- checkpoint state

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The auxiliary model's weights (``aux.``) and its Adam state (``optim.``)."""
        tensors = {f"aux.{k}": v for k, v in self.aux.state_dict().items()}
        tensors.update(_optimizer_tensors(self.optimizer))
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.aux.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("aux.")})
        _restore_optimizer(self.optimizer, tensors)

    # -------------------------------------------------------------- the loss

    def _draw_s(self, t: torch.Tensor, generator) -> torch.Tensor:
        if self.s_values is None:
            return self.s_min + (t - self.s_min) * _uniform(len(t), generator, t.device)
        values = self.s_values.to(t.device)
        allowed = (values[None, :] < t[:, None]).to(torch.float64)
        if bool((allowed.sum(1) == 0).any()):
            raise ValueError(f"s_values {values.tolist()} has no time below some t in {sorted(set(t.tolist()))}")
        draw_device = generator.device if generator is not None else t.device
        index = torch.multinomial(allowed.to(draw_device), 1, generator=generator).to(t.device)[:, 0]
        return values[index]

    def _renoised(self, score_t, x_t, tau_t, t, generator):
        """A generator sample ``x^ ~ p_0|t(. | x_t)`` and its re-noised ``z_s`` (with s, tau_s)."""
        x_hat = ck.fused_euler_step(self.graph, score_t, x_t, tau_t[:, None].expand(x_t.shape),
                                    torch.zeros(x_t.shape, dtype=torch.float64, device=x_t.device),
                                    method=self.method, generator=generator)
        s = self._draw_s(t, generator)
        tau_s = tau_of_time(self.noise, s)
        return x_hat, bridge_sample(self.graph, x_hat, x_t, tau_t, tau_s, generator), s, tau_s

    def _aux_update(self, x_hat, z_s, tau_s) -> float:
        graph = self.graph
        with torch.enable_grad():
            score = _scores(self.aux, z_s, tau_s, graph=graph)
            target = nn.functional.one_hot(x_hat, graph.num_states).to(torch.float32)
            loss = ck.conditional_matching_loss(graph, score, z_s, tau_s[:, None].expand(z_s.shape), target)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        params = [p for p in self.aux.parameters() if p.grad is not None]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in params:  # identical replicas: average the gradients over ranks
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        if params:
            nn.utils.clip_grad_norm_(params, self.aux_grad_clip)
        self.optimizer.step()
        return float(loss.detach())

    def forward(self, model, x0: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if x0.ndim != 2:
            raise ValueError(f"x0 must have shape (B, L), got {tuple(x0.shape)}")
        graph, noise = self.graph, self.noise
        device, (batch, seq_len) = x0.device, x0.shape
        t, _ = sample_times(self.steps, batch, t_dist=self.t_dist, generator=generator, device=device)
        tau_t = tau_of_time(noise, t)
        x_t = add_noise(graph, x0, tau_t[:, None], generator)

        lam = draw_latents(model, batch, generator, device)
        score_t = _scores(model, x_t, tau_t, lam, graph=graph)  # the generator: one forward with gradient
        x_tilde = ck.scores_to_posterior(graph, score_t, x_t, tau_t[:, None].expand(x_t.shape)).exp()

        with torch.no_grad():
            score_d = score_t.detach()
            for _ in range(self.aux_steps):
                x_hat, z_s, _, tau_s = self._renoised(score_d, x_t, tau_t, t, generator)
                self.last_aux_loss = self._aux_update(x_hat, z_s, tau_s)
            _, z_s, s, tau_s = self._renoised(score_d, x_t, tau_t, t, generator)
            expand = tau_s[:, None].expand(z_s.shape)
            p_aux = ck.scores_to_posterior(graph, _scores(self.aux, z_s, tau_s, graph=graph), z_s, expand).exp()
            p_teacher = ck.scores_to_posterior(graph, _scores(self.teacher, z_s, tau_s, graph=graph), z_s, expand).exp()
            moment_gap = (p_aux - p_teacher).to(x_tilde.dtype)
            weight = _weights(self.weighting, noise, s).to(x_tilde.dtype)

        surrogate = weight * (moment_gap * x_tilde).sum((-2, -1)) / seq_len
        mismatch = weight * moment_gap.square().sum((-2, -1)) / seq_len
        per_sequence = surrogate - surrogate.detach() + mismatch
        return _reduce(per_sequence, self.reduction)
