"""Score models for exact studies on small enumerable state spaces: an exact
teacher (``EnumeratedScoreModel``) and a free table student
(``TabularScoreModel``), both float64 and exposed as log-scores through
``posterior_to_scores``, so every sampler and loss of ``cdm`` runs on them."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

import cdm_kernels as ck
from cdm.sampling import call_model


class EnumeratedScoreModel(nn.Module):
    """The exact concrete score of a distribution over an enumerated support (an
    exact teacher for studies on small state spaces), in float64.

    support (S, L) and probs (S,) define the clean data distribution. The exact
    per-token conditional ``p(x_0^i = a | x_t)`` is computed by enumeration,
    ``prop. to sum_s p(s) [s_i = a] prod_j K(tau)[s_j, x_j]`` (sums of positive
    terms: no cancellation), and the log-scores from it with
    ``posterior_to_scores`` (MATH.md section 2: ``r_i = K^T u_i`` holds exactly
    for the joint). Differencing ``log p_tau`` of neighbouring sequences instead
    would lose the conditional to rounding at large tau (uniform graph, tau = 20:
    ``log r ~ 1e-9``).
    """

    def __init__(self, graph: ck.Graph, support: torch.Tensor, probs: torch.Tensor):
        super().__init__()
        self.graph = graph
        self.register_buffer("support", support.long())
        self.register_buffer("probs", probs.to(torch.float64))

    def log_conditional(self, x: torch.Tensor, sigma: torch.Tensor, lam=None) -> torch.Tensor:
        """``log p(x_0^i = a | x_t = x)`` at total noise ``sigma`` (B,): (B, L, N) float64."""
        n, seq_len = self.graph.num_states, x.shape[1]
        tau = sigma.to(torch.float64)[:, None].expand(x.shape).contiguous()
        column = ck.transition_column(self.graph, x, tau)  # (B, L, N): K[a, x_i]
        log_weight = self.probs.log().expand(x.shape[0], -1).clone()  # (B, S)
        for i in range(seq_len):
            entry = column[:, i, self.support[:, i]]
            log_weight += torch.where(entry > 0, entry, 1.0).log().masked_fill(entry <= 0, -math.inf)
        log_weight -= torch.logsumexp(log_weight, dim=1, keepdim=True)
        weight = log_weight.exp()
        out = torch.zeros(x.shape[0], seq_len, n, dtype=torch.float64, device=x.device)
        for i in range(seq_len):
            out[:, i].index_add_(1, self.support[:, i], weight)
        return torch.where(out > 0, out, 0.0).log()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, lam=None) -> torch.Tensor:
        tau = sigma.to(torch.float64)[:, None].expand(x.shape).contiguous()
        log_score = ck.posterior_to_scores(self.graph, self.log_conditional(x, sigma), x, tau)
        return log_score.clamp_min(-1e4)  # structural zeros as a finite log-score


class TabularScoreModel(nn.Module):
    """A table-based score model for enumerable studies: one free conditional
    ``p(x_0^i | x_t, component)`` per (component, time on a grid, sequence,
    position), exposed as log-scores through ``posterior_to_scores``.

    It answers only at the total-noise values ``taus`` it was built for (the
    student's grid; the nearest one is used). With ``components = M > 1`` it
    is a mixture student with ``latent_dim = 1``: ``lam`` in [0, 1] selects
    component ``floor(lam M)``, and ``sample_latent`` draws the component
    centres uniformly, so every component has weight 1/M.
    """

    def __init__(self, graph: ck.Graph, support: torch.Tensor, taus: Sequence[float], components: int = 1):
        super().__init__()
        self.graph = graph
        self.components = int(components)
        self.latent_dim = 1 if self.components > 1 else 0
        self.register_buffer("support", support.long())
        self.register_buffer("taus", torch.as_tensor(list(taus), dtype=torch.float64))
        size, seq_len = support.shape
        n = graph.num_states
        self.logits = nn.Parameter(torch.zeros(self.components, len(self.taus), size, seq_len, n, dtype=torch.float64))
        self.vocab = n
        powers = n ** torch.arange(seq_len - 1, -1, -1)
        lookup = torch.full((n ** seq_len,), -1, dtype=torch.int64)
        lookup[(self.support * powers).sum(1)] = torch.arange(size)
        self.register_buffer("powers", powers)
        self.register_buffer("lookup", lookup)

    def _index(self, x, sigma, lam):
        rows = self.lookup[(x.long() * self.powers).sum(1)]
        if bool((rows < 0).any()):
            raise ValueError("x holds a sequence outside the table's support")
        grid = (sigma.to(torch.float64)[:, None] - self.taus[None]).abs().argmin(1)
        if lam is None:
            comp = torch.zeros_like(rows)
        else:
            comp = (lam.reshape(len(x), -1)[:, 0].to(torch.float64) * self.components).long().clamp(0, self.components - 1)
        return comp, grid, rows

    @torch.no_grad()
    def init_from(self, model, noise_scale: float = 0.0, generator: Optional[torch.Generator] = None) -> None:
        """Set every component's conditional to ``model``'s (e.g. the teacher), plus
        Gaussian noise of ``noise_scale`` on the logits (breaks the symmetry of a mixture)."""
        size = len(self.support)
        for g, tau in enumerate(self.taus):
            tau_b = tau.expand(size)
            log_q = ck.scores_to_posterior(self.graph, call_model(model, self.support, tau_b).to(torch.float64),
                                           self.support, tau_b[:, None].expand(self.support.shape).contiguous())
            self.logits[:, g] = log_q.clamp_min(-60.0)
        if noise_scale:
            self.logits.add_(noise_scale * torch.randn(self.logits.shape, generator=generator, dtype=torch.float64))

    def sample_latent(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        comp = torch.randint(0, self.components, (n, 1), generator=generator)
        return ((comp + 0.5) / self.components).float()

    def log_conditional(self, x, sigma, lam=None) -> torch.Tensor:
        """``log p(x_0^i | x_t, component)`` (B, L, N), float64."""
        comp, grid, rows = self._index(x, sigma, lam)
        return torch.log_softmax(self.logits[comp, grid, rows], dim=-1)

    def forward(self, x, sigma, lam=None) -> torch.Tensor:
        tau = sigma.to(torch.float64)[:, None].expand(x.shape).contiguous()
        log_score = ck.posterior_to_scores(self.graph, self.log_conditional(x, sigma, lam), x, tau)
        return log_score.clamp_min(-1e4)  # structural zeros (absorbing graph) as a finite log-score
