"""Samplers over ``cdm_kernels.fused_euler_step``, forward noising, and exact
evaluation of samplers on enumerable state spaces (docs/MATH.md sections 1-4).

Conventions
-----------
A *score model* is any callable ``model(x, sigma) -> log_score`` with ``x``
LongTensor (B, L), ``sigma`` (B,) total noise and ``log_score`` (B, L, N) (the
``cdm.models.DiT`` signature). A *mixture student* also takes a latent,
``model(x, sigma, lam)`` with ``lam`` (B, latent_dim) in [0, 1]; it exposes
``model.config.latent_dim > 0`` or a ``latent_dim`` attribute, and may define
``sample_latent(n, generator) -> (n, latent_dim)`` to override the default
``lam ~ U(0, 1)^latent_dim`` (a model with finitely many components does).
A K-component student whose weights depend on x_t (``config.mixture_weights``,
see ``cdm.models.DiT``) returns its log-weights (B, K) from
``model(x, sigma, mixture_weights=True)`` (``mixture_log_weights``), and the
log-scores of a component drawn from them from ``model(x, sigma, draw=u)``
(``step_log_scores``: what samplers call).

Time grids: a k-step sampler visits ``t_j = 1 - j / k`` (j = 0..k) and takes
the total noise from the schedule, ``tau_j = noise.total(t_j)``, except that
the last point is ``tau_k = 0`` exactly: the last step samples the clean data
from ``p_0|t`` (``fused_euler_step`` with ``tau_s = 0``). So k steps cost k
network evaluations (NFE = k), and a 1-step sampler draws every token
independently from the conditional at ``tau(1)``.

Precision: for the uniform graph the inversion ``scores -> p_0|t`` subtracts
nearly equal numbers (``alpha = e^-tau``; MATH.md section 2): float32 scores
lose the conditional entirely at ``tau >~ 15`` (SEDD's geometric schedule ends
at 20). Everything here therefore hands the kernels float64 log-scores for the
uniform and dense graphs (``inversion_dtype``); the network itself stays in
its own precision. Absorbing graphs use a softmax and stay in float32.

Reproducibility: every random draw comes from the ``generator`` argument (a
CPU generator may drive CUDA tensors); the same seed gives the same samples on
the same backend.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import cdm_kernels as ck
from cdm_kernels import reference

from .models.dit import component_index
from .models.student import model_device

__all__ = [
    "inversion_dtype",
    "rate_column",
    "prior_distribution",
    "prior_sample",
    "add_noise",
    "time_grid",
    "tau_grid",
    "tau_of_time",
    "unwrap",
    "latent_dim",
    "has_mixture_weights",
    "shared_block_count",
    "mixture_log_weights",
    "network_evaluations",
    "draw_latents",
    "step_log_scores",
    "latent_quadrature",
    "call_model",
    "sample",
    "step_distribution",
    "exact_sample_distribution",
    "exact_chain_matrix",
]

METHODS = ("analytic", "euler")

#: the largest state space (num_states^L) enumerated exactly, by ``cdm.experiment.exact_metrics``
#: and the exact targets of joint CDM: S^2 multiply-adds and S network rows per sampler step
EXACT_SUPPORT = 8192


# ----------------------------------------------------------------------------- graph helpers


def inversion_dtype(graph: ck.Graph, dtype: torch.dtype) -> torch.dtype:
    """The dtype in which log-scores are handed to the kernels' inversion:
    float64 for uniform and dense graphs (ill-conditioned at large tau), else
    ``dtype`` promoted to at least float32."""
    if graph.family in ("uniform", "dense"):
        return torch.float64
    return torch.promote_types(dtype, torch.float32)


def rate_column(graph: ck.Graph, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``out[..., y] = Q[y, x]`` for ``y != x`` and 0 at ``y = x``: the forward rate
    into the current token from every other state, (..., N). These are SEDD's
    score-entropy weights and the Euler step's jump rates (MATH.md section 3)."""
    return reference.rate_column(graph, x, dtype).clamp_min(0)  # the diagonal is the only negative entry


def prior_distribution(graph: ck.Graph, dtype=torch.float64) -> torch.Tensor:
    """The limiting distribution of one token (N,): uniform for the uniform graph,
    the mask for the absorbing one, and ``K(50)^T u`` for a dense graph (its
    stationary law when it is irreducible; ``ordinal_graph`` has spectral gap 1)."""
    n = graph.num_states
    if graph.family == "uniform":
        return torch.full((n,), 1.0 / n, dtype=dtype)
    if graph.family == "absorbing":
        out = torch.zeros(n, dtype=dtype)
        out[-1] = 1.0
        return out
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
    pi = ck.apply_kernel(graph, uniform, torch.tensor(50.0, dtype=torch.float64)).clamp_min(0)
    return (pi / pi.sum()).to(dtype)


def _uniforms(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=draw_device).to(device)


def prior_sample(graph: ck.Graph, shape, generator: Optional[torch.Generator] = None, device="cpu") -> torch.Tensor:
    """Draws from the prior (the start of every sampler): uniform tokens, all
    mask (absorbing), or the dense graph's stationary law. LongTensor ``shape``."""
    n = graph.num_states
    shape = tuple(shape)
    if graph.family == "absorbing":
        return torch.full(shape, n - 1, dtype=torch.int64, device=device)
    if graph.family == "uniform":
        draw_device = generator.device if generator is not None else device
        return torch.randint(0, n, shape, generator=generator, device=draw_device).to(device)
    return reference.sample_categorical(prior_distribution(graph).to(device).expand(*shape, n), generator)


def add_noise(graph: ck.Graph, x0: torch.Tensor, tau, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Forward noising: ``x_t^i ~ K(tau)[x_0^i, :]`` independently per position.

    tau: a float or a tensor broadcastable to ``x0`` (e.g. (B, 1) per sequence).
    Uniform: with probability ``1 - e^-tau`` a token is redrawn uniformly;
    absorbing: masked; dense: drawn from the row ``K(tau)[x0, :]``
    (``apply_kernel`` on the one-hot of x0).
    """
    x0 = x0.long()
    tau = torch.as_tensor(tau, dtype=torch.float64, device=x0.device)
    tau = torch.broadcast_to(tau, x0.shape)
    n = graph.num_states
    if graph.family in ("uniform", "absorbing"):
        move = _uniforms(x0.shape, generator, x0.device) < -torch.expm1(-tau)
        if graph.family == "absorbing":
            return torch.where(move, torch.full_like(x0, n - 1), x0)
        draw_device = generator.device if generator is not None else x0.device
        fresh = torch.randint(0, n, x0.shape, generator=generator, device=draw_device).to(x0.device)
        return torch.where(move, fresh, x0)
    row = ck.apply_kernel(graph, nn.functional.one_hot(x0, n).to(torch.float64), tau).clamp_min(0)
    return reference.sample_categorical(row, generator)


# ----------------------------------------------------------------------------- time grids


def time_grid(steps: int, t_start: float = 1.0, t_end: float = 0.0, device=None) -> torch.Tensor:
    """``steps + 1`` times from ``t_start`` down to ``t_end``, equally spaced, float64."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64, device=device)


def tau_of_time(noise, t: torch.Tensor) -> torch.Tensor:
    """``noise.total(t)`` with ``t = 0`` mapped to ``tau = 0`` exactly (clean data)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    tau = noise.total(t.clamp(0.0, 1.0))
    return torch.where(t <= 0, torch.zeros_like(tau), tau)


def tau_grid(noise, steps: int, device=None) -> torch.Tensor:
    """Total noise on the k-step grid: ``tau(t_j)``, ``t_j = 1 - j/k``, with the last entry 0."""
    return tau_of_time(noise, time_grid(steps, device=device))


# ----------------------------------------------------------------------------- models


def unwrap(model):
    """The model inside wrappers that keep it as ``.module`` (DistributedDataParallel, FSDP)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def latent_dim(model) -> int:
    """0 for a plain score model, else the size of the mixture latent (wrappers such
    as DistributedDataParallel are looked through)."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "latent_dim", 0):
        return int(config.latent_dim)
    return int(getattr(model, "latent_dim", 0) or 0)


def _config_value(model, name: str, default=0):
    """``model.config.<name>`` (wrappers looked through), or ``default`` for a model without it."""
    return getattr(getattr(unwrap(model), "config", None), name, default)


def has_mixture_weights(model) -> bool:
    """Whether ``model`` is a mixture student whose component weights depend on x_t."""
    return bool(_config_value(model, "mixture_weights", False))


def shared_block_count(model) -> int:
    """How many leading blocks of a mixture student its latent skips (``DiTConfig.shared_blocks``):
    their output serves every latent of an input; 0 for any other model."""
    return int(_config_value(model, "shared_blocks") or 0)


def mixture_log_weights(model, x: torch.Tensor, tau) -> Optional[torch.Tensor]:
    """``log w_k(x_t)`` (B, K) of a mixture student whose component weights depend on
    x_t (``config.mixture_weights``); None for any other model (equal weights)."""
    if not has_mixture_weights(model):
        return None
    return model(x, _sigma(x, tau), mixture_weights=True)


def network_evaluations(model, steps: int) -> int:
    """What a ``steps``-step sampler of ``model`` costs in network passes (the NFE the
    tables report): one per step, two for a student with x_t-dependent mixture
    weights and no ``shared_blocks`` (its weights come from a pass of its trunk
    without a component, before the component's own pass). With shared blocks the
    weights read features the component's pass computes anyway: one pass (plus
    the weight head, a mean over positions and one linear layer)."""
    second_pass = has_mixture_weights(model) and not shared_block_count(model)
    return steps * (2 if second_pass else 1)


def _component_count(model) -> int:
    return int(_config_value(model, "latent_components") or 0)


def draw_latents(model, n: int, generator: Optional[torch.Generator] = None, device="cpu",
                 stratified_groups: int = 0) -> Optional[torch.Tensor]:
    """``n`` latents for a mixture student ((n, latent_dim)), or None for a plain model.

    ``model.sample_latent(n, generator)`` is used when defined; otherwise
    ``lam ~ U(0, 1)^latent_dim``. ``stratified_groups = M > 0`` (n a multiple
    of M): consecutive groups of M draws are stratified in the first
    coordinate, ``lam_m = (m + u_m) / M``, which lowers the variance of a
    mixture estimate over M draws (a model with M equal-weight components then
    sees each component exactly once per group). A student whose weights
    depend on x_t (``mixture_weights``) takes only stratified draws here (a
    loss that weighs them itself); its sampler draws the component inside the
    model (:func:`step_log_scores`).
    """
    dim = latent_dim(model)
    if dim == 0:
        return None
    if stratified_groups:
        if n % stratified_groups:
            raise ValueError(f"n={n} is not a multiple of stratified_groups={stratified_groups}")
        lam = _uniforms((n, dim), generator, device)
        strata = torch.arange(n, device=device) % stratified_groups
        lam[:, 0] = (strata + lam[:, 0]) / stratified_groups
        return lam.float()
    if has_mixture_weights(model):
        raise ValueError("this student weighs its components by x_t: its sampler draws them from w(x_t) "
                         "(step_log_scores), and only stratified draws (stratified_groups > 0) are free of x_t")
    sampler = getattr(unwrap(model), "sample_latent", None)
    if callable(sampler):
        return sampler(n, generator).to(device)
    return _uniforms((n, dim), generator, device).float()


def step_log_scores(model, x: torch.Tensor, tau, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The log-scores a sampler's step at ``(x, tau)`` uses: a plain model's; a
    mixture student's at a fresh latent per sequence (:func:`draw_latents`); a
    student with weights ``w(x_t)`` at a component drawn from them inside the
    model (``model(x, sigma, draw=u)``, one uniform per sequence)."""
    if has_mixture_weights(model):
        return model(x, _sigma(x, tau), draw=_uniforms((len(x),), generator, x.device))
    return call_model(model, x, tau, draw_latents(model, len(x), generator, x.device))


def latent_quadrature(model, points: int = 64) -> Optional[torch.Tensor]:
    """Equally weighted latent values whose average stands for ``E_lambda`` in exact
    evaluation (``exact_sample_distribution(latents=...)``), or None for a plain model.

    A K-component student (``config.latent_components = K``): one value per
    component, exact. A continuous latent: ``points`` scrambled Sobol points of
    ``[0, 1]^latent_dim`` (fixed seed): a quadrature, whose error shows up in the
    exact metrics of such a student.
    """
    dim = latent_dim(model)
    if dim == 0:
        return None
    components = _component_count(model)
    if components:
        return ((torch.arange(components, dtype=torch.float32) + 0.5) / components)[:, None]
    return torch.quasirandom.SobolEngine(dim, scramble=True, seed=0).draw(points)


def _sigma(x: torch.Tensor, tau) -> torch.Tensor:
    """The per-sequence total noise (B,), float64, the networks' ``sigma`` argument, from a scalar or (B,) ``tau``."""
    return torch.broadcast_to(torch.as_tensor(tau, dtype=torch.float64, device=x.device), x.shape[:1]).contiguous()


def call_model(model, x: torch.Tensor, tau: torch.Tensor, lam: Optional[torch.Tensor] = None,
               **options) -> torch.Tensor:
    """``model(x, sigma[, lam], **options)`` with ``sigma`` the per-sequence total noise (B,)."""
    sigma = _sigma(x, tau)
    if lam is None:
        return model(x, sigma, **options)
    return model(x, sigma, lam, **options)


# ----------------------------------------------------------------------------- samplers


@torch.no_grad()
def sample(model, graph: ck.Graph, noise, num_samples: int, seq_len: int, steps: int, *,
           method: str = "analytic", generator: Optional[torch.Generator] = None,
           batch_size: Optional[int] = None, device=None, taus: Optional[torch.Tensor] = None,
           autocast: bool = False) -> torch.Tensor:
    """Draw ``num_samples`` sequences with a ``steps``-step sampler: LongTensor (num_samples, seq_len).

    Starts from the prior, then ``x <- fused_euler_step(graph, model(x, tau_j), x,
    tau_j, tau_{j+1})`` along ``tau_grid(noise, steps)`` (or the given ``taus``,
    decreasing, ending at 0). A mixture student gets a fresh latent per step and
    per sequence (from its weights ``w(x_t)`` when it has them). ``method``:
    ``"analytic"`` or ``"euler"``; the last step
    (to tau = 0) samples ``p_0|t`` in both. ``autocast``: bf16 autocast of the
    network on CUDA.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    device = torch.device(device) if device is not None else model_device(model)
    taus = tau_grid(noise, steps, device=device) if taus is None else taus.to(device, torch.float64)
    if taus.ndim != 1 or len(taus) < 2 or bool((taus[1:] >= taus[:-1]).any()):
        raise ValueError("taus must be a strictly decreasing 1-D tensor of length >= 2")
    was_training = model.training if isinstance(model, nn.Module) else None
    if was_training:
        model.eval()
    batch_size = batch_size or num_samples
    chunks = []
    try:
        for start in range(0, num_samples, batch_size):
            b = min(batch_size, num_samples - start)
            x = prior_sample(graph, (b, seq_len), generator, device)
            for j in range(len(taus) - 1):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
                    log_score = step_log_scores(model, x, taus[j], generator)
                log_score = log_score.to(inversion_dtype(graph, log_score.dtype))
                x = ck.fused_euler_step(graph, log_score, x, taus[j], taus[j + 1], method=method, generator=generator)
            chunks.append(x)
    finally:
        if was_training:
            model.train()
    return torch.cat(chunks)


# ----------------------------------------------------------------------------- exact evaluation


def step_distribution(graph: ck.Graph, log_score: torch.Tensor, x: torch.Tensor, tau_t, tau_s,
                      method: str = "analytic") -> torch.Tensor:
    """``P(x_s^i = y | x_t)`` per position (..., N), float64: the law that
    ``fused_euler_step`` samples from (its definition in ``cdm_kernels.reference``),
    for exact evaluation of samplers."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    tau_t = torch.broadcast_to(torch.as_tensor(tau_t, dtype=torch.float64, device=x.device), x.shape)
    tau_s = torch.broadcast_to(torch.as_tensor(tau_s, dtype=torch.float64, device=x.device), x.shape)
    return reference.step_probabilities(graph, log_score.to(torch.float64), x.long(), tau_t, tau_s, method)


def _is_full_product(support: torch.Tensor, num_states: int) -> bool:
    """Whether ``support`` is every sequence over ``num_states`` tokens in lexicographic order."""
    size, seq_len = support.shape
    if size != num_states ** seq_len:
        return False
    powers = num_states ** torch.arange(seq_len - 1, -1, -1, dtype=torch.int64, device=support.device)
    return bool(((support * powers).sum(1) == torch.arange(size, device=support.device)).all())


def _joint_rows(probs: torch.Tensor, support: torch.Tensor, full_product: bool) -> torch.Tensor:
    """``prod_i probs[b, i, y_i]`` for every support sequence y: (b, S), float64.

    On the full product space in lexicographic order this is the Kronecker
    product of the L per-position vectors, built by L - 1 broadcast products
    (no gathers); otherwise one gather per position."""
    if full_product:
        rows = probs[:, 0, :]
        for i in range(1, probs.shape[1]):
            rows = (rows[:, :, None] * probs[:, i, None, :]).reshape(len(probs), -1)
        return rows
    rows = torch.ones(len(probs), len(support), dtype=torch.float64, device=probs.device)
    for i in range(probs.shape[1]):
        rows *= probs[:, i, :][:, support[:, i]]
    return rows


@torch.no_grad()
def exact_sample_distribution(model, graph: ck.Graph, support: torch.Tensor, taus: torch.Tensor, *,
                              method: str = "analytic", latents: Optional[torch.Tensor] = None,
                              prior: Optional[torch.Tensor] = None, batch_size: int = 1024) -> torch.Tensor:
    """The exact distribution of a sampler's output over an enumerated state space.

    support: (S, L) every sequence the chain can visit (for the absorbing graph
        include the masked ones), in the order of the returned vector.
    taus: the decreasing total-noise grid, ending at 0 (e.g. ``tau_grid``).
    latents: for a mixture student, (M, latent_dim) equally weighted latent
        values; each step's transition is the average over them (exact for a
        model with M components, a quadrature of ``E_lambda`` otherwise). A
        student with weights ``w(x_t)`` (``mixture_weights``) needs one value
        per component (``latent_quadrature``), and each is weighted by ``w_k(x)``.
    prior: (S,) start distribution; default the product of ``prior_distribution``.
    Returns float64 (S,): the probability of each support sequence after the
    last step. Cost per step and latent: S network rows and S^2 multiply-adds
    (the (S, S) transition is streamed in blocks of ``batch_size`` rows, never
    held whole). Timings: docs/RESULTS.md.
    """
    support = support.long()
    size, seq_len = support.shape
    device = support.device
    if prior is None:
        per_token = prior_distribution(graph).to(device)
        prior = per_token[support].prod(-1)
    full_product = _is_full_product(support, graph.num_states)
    dist = prior.to(torch.float64)
    lam_values = [None] if latents is None else list(latents.to(device))
    weighted = latents is not None and has_mixture_weights(model)
    if weighted:
        components = _component_count(model)
        index = component_index(latents, components)
        if sorted(index.tolist()) != list(range(components)):
            raise ValueError(f"latents must hold one value per component of this weighted {components}-component "
                             "student (latent_quadrature(model))")
    taus = taus.to(torch.float64)
    for j in range(len(taus) - 1):
        next_dist = torch.zeros_like(dist)
        for start in range(0, size, batch_size):
            x, weight = support[start:start + batch_size], dist[start:start + batch_size]
            if not bool((weight > 0).any()):
                continue
            weights = mixture_log_weights(model, x, taus[j]).double().exp() if weighted else None
            for i, lam in enumerate(lam_values):
                lam_b = None if lam is None else lam.reshape(1, -1).expand(len(x), -1)
                log_score = call_model(model, x, taus[j], lam_b)
                probs = step_distribution(graph, log_score, x, taus[j], taus[j + 1], method)  # (b, L, N)
                share = weight * weights[:, index[i]] if weighted else weight / len(lam_values)
                next_dist += share @ _joint_rows(probs, support, full_product)
        dist = next_dist
    return dist


@torch.no_grad()
def exact_chain_matrix(model, graph: ck.Graph, support: torch.Tensor, taus: torch.Tensor, *,
                       method: str = "analytic", batch_size: int = 1024) -> torch.Tensor:
    """The exact law of a plain model's whole chain over an enumerated state space:
    ``P[a, b] = P(the chain ends at support[b] | it starts at support[a])``, (S, S)
    float32, each row a distribution.

    The chain takes ``model``'s steps along the decreasing grid ``taus`` (each step's
    transition ``prod_i P(y^i | x)`` of :func:`step_distribution`, the law
    ``fused_euler_step`` samples). It is the product of the steps' (S, S) transitions,
    one S^3 matrix product a step in float32, whose rounding (~1e-7 relative per step)
    is far below anything a loss on these rows resolves (timings: docs/RESULTS.md);
    :func:`exact_sample_distribution` is ``prior @ P`` at S^2 a step. Used as the exact
    targets of joint CDM on enumerable data (``cdm.losses.ExactTargets``).
    """
    support = support.long()
    if latent_dim(model):
        raise ValueError("exact_chain_matrix takes a plain model (a teacher), not a mixture student")
    taus = taus.to(torch.float64)
    if taus.ndim != 1 or len(taus) < 2 or bool((taus[1:] >= taus[:-1]).any()):
        raise ValueError("taus must be a strictly decreasing 1-D tensor of length >= 2")
    size = len(support)
    full_product = _is_full_product(support, graph.num_states)
    chain = None
    for j in range(len(taus) - 2, -1, -1):  # from the last step back: P <- T_j @ P
        step = torch.empty(size, size, dtype=torch.float32, device=support.device)
        for start in range(0, size, batch_size):
            x = support[start:start + batch_size]
            probs = step_distribution(graph, call_model(model, x, taus[j]), x, taus[j], taus[j + 1], method)
            step[start:start + batch_size] = _joint_rows(probs, support, full_product)
        chain = step if chain is None else step @ chain
    return chain
