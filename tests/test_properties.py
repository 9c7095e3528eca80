"""Property-based tests: every op, on every CPU backend, against the float64
reference over random shapes (odd N, leading dims), graphs (uniform, absorbing,
dense via ``ordinal_graph``), total noise in [1e-6, 20] and noisy scores
(exact log-ratios plus Gaussian noise), in float32 and bfloat16.

Accuracy follows flash-attention's rule: a backend's error against the float64
result (of the same, already rounded inputs) is at most twice the error of the
plain PyTorch reference run in that dtype, plus a small slack of a few units
in the last place of the output's scale. The reference backend satisfies it
trivially; for it the tests check the invariants (finite outputs, conditionals
that are distributions, structural zeros). Every op also takes its arguments in
any layout (transposed, strided, broadcast views) and gives exactly what it
gives on contiguous copies, forward and backward.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cdm_kernels as ck
from cdm_kernels import reference
from cdm_kernels.ops._validation import MAX_INVERSE_EXPONENT
from layouts import LAYOUTS, assert_layout_free

DTYPES = [torch.float32, torch.bfloat16]
FAMILIES = ["uniform", "absorbing", "gaussian", "birth_death"]
#: machine epsilon, and the slack in units of it at the output's scale (float32: a reduction
#: over N states in another order differs by several ulps; bfloat16: two ulps)
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.bfloat16: torch.finfo(torch.bfloat16).eps}
ULPS = {torch.float32: 16, torch.bfloat16: 2}

PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])


@functools.lru_cache(maxsize=None)
def make_graph(family: str, n: int) -> ck.Graph:
    if family == "uniform":
        return ck.UniformGraph(n)
    if family == "absorbing":
        return ck.AbsorbingGraph(n)
    return ck.ordinal_graph(n, family)


def largest_tau(graph) -> float:
    """20 (SEDD's largest total noise), or less where a dense graph's K(tau)^-1 would overflow float64."""
    if graph.family != "dense":
        return 20.0
    return min(20.0, MAX_INVERSE_EXPONENT / -float(graph.spectral()[0].min()))


@st.composite
def cases(draw):
    """A graph, leading shape, per-position tau, scores noise level and a data seed."""
    family = draw(st.sampled_from(FAMILIES))
    n = draw(st.integers(2, 23))
    # the last leading dim is 32 positions: the accuracy rule compares maximum errors, which
    # is only stable over a few dozen positions (one position's error is luck)
    lead = (*draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)), 32)
    tau_kind = draw(st.sampled_from(["scalar", "per-position"]))
    tau_max = largest_tau(make_graph(family, n))
    if tau_kind == "scalar":
        tau = draw(st.one_of(st.sampled_from([1e-6, tau_max]),
                             st.floats(math.log(1e-6), math.log(tau_max)).map(math.exp)))
    else:
        tau = None  # drawn per position from the seed, log-uniform over [1e-6, tau_max]
    noise = draw(st.sampled_from([0.0, 0.1, 1.0, 3.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return make_graph(family, n), lead, tau, tau_max, noise, seed


def materialise(graph, lead, tau, tau_max, seed):
    """Tokens x, float64 tau of shape ``lead`` and a clean-data law p0 per position."""
    gen = torch.Generator().manual_seed(seed)
    n = graph.num_states
    if tau is None:
        log_tau = torch.empty(lead, dtype=torch.float64).uniform_(math.log(1e-6), math.log(tau_max), generator=gen)
        tau = log_tau.exp()
    else:
        tau = torch.full(lead, tau, dtype=torch.float64)
    p0 = torch.softmax(3 * torch.randn(*lead, n, generator=gen, dtype=torch.float64), -1)
    x = torch.randint(0, n, lead, generator=gen)
    if graph.family == "absorbing":  # clean data never holds the mask; about half the noisy tokens are masked
        p0[..., -1] = 0
        p0 = p0 / p0.sum(-1, keepdim=True)
        x = torch.where(torch.rand(lead, generator=gen) < 0.5, n - 1, x)
    return x, tau, p0, gen


def exact_log_ratios(graph, p0, x, tau):
    """``log p_t(y) / p_t(x)`` of one token whose clean law is p0 (float64, finite)."""
    p_t = reference.apply_kernel(graph, p0, tau)  # K(tau)^T p0
    log_r = p_t.clamp_min(1e-300).log() - p_t.gather(-1, x.unsqueeze(-1)).clamp_min(1e-300).log()
    return log_r.clamp(-60, 60)


def exact_conditional(graph, p0, x, tau):
    """``p(x_0 = a | x_t = x)`` in float64 (a distribution with the right structural zeros)."""
    joint = p0 * reference.transition_column(graph, x, tau, torch.float64)
    return joint / joint.sum(-1, keepdim=True)


def noisy_scores(graph, lead, tau, tau_max, noise, seed, dtype):
    x, tau, p0, gen = materialise(graph, lead, tau, tau_max, seed)
    log_r = exact_log_ratios(graph, p0, x, tau)
    log_r = log_r + noise * torch.randn(log_r.shape, generator=gen, dtype=torch.float64)
    return log_r.to(dtype), x, tau, p0, gen


def max_error(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest |found - truth| where truth is finite (inf where found is not finite there)."""
    finite = torch.isfinite(truth)
    if not finite.any():
        return 0.0
    diff = (found.double() - truth)[finite].abs()
    diff = torch.where(torch.isnan(diff), math.inf, diff)
    return diff.max().item()


def assert_accurate(backend_out, reference_out, truth, dtype, what, tau=None, graph=None):
    """flash-attention's rule: error <= 2 x (the dtype reference's error) + a few ulps at the output's scale.

    The maximum error is dominated by the worst-conditioned position (the uniform inversion's
    condition number grows like e^tau), so the rule compares like with like only when every
    position has the same tau: with a per-position ``tau`` it is skipped (the invariants still hold).
    """
    if tau is not None and tau.numel() > 1 and not bool((tau == tau.flatten()[0]).all()):
        return
    if graph is not None and graph.family == "dense" and float(tau.max()) > 1.0:
        # at large tau a dense inversion of float32 scores is decided by float64 rounding in every
        # implementation (docs/MATH.md section 6): the backends agree only where they sum in one order
        return
    finite = truth[torch.isfinite(truth)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    slack = ULPS[dtype] * EPS[dtype] * max(1.0, scale)
    err_backend = max_error(backend_out, truth)
    err_reference = max_error(reference_out, truth)
    assert err_backend <= 2 * err_reference + slack, (
        f"{what}: backend error {err_backend:.3g} > 2 x reference error {err_reference:.3g} + {slack:.2g}")


def assert_distribution(graph, log_q: torch.Tensor, truth_log_q: torch.Tensor, dtype, reference_backend: bool):
    q = log_q.double().exp()
    assert not torch.isnan(log_q).any() and not (log_q == math.inf).any()
    if graph.family == "absorbing":  # structural zeros exactly where the float64 result has them
        assert torch.equal(torch.isneginf(log_q), torch.isneginf(truth_log_q))
    elif graph.family == "uniform":  # none: the clamp keeps every entry positive
        assert torch.isfinite(log_q).all()
    # (dense: an eigenbasis column can round a 1e-18 entry to 0, so -inf may appear where
    # the float64 conditional is tiny; the accuracy check covers it)
    assert (q >= 0).all()
    # a bf16 log-probability carries ~2^-9 relative error (the eager reference works in bf16
    # throughout, the fused backends accumulate in float32), as in test_posterior.py
    sum_tol = 1e-5 if dtype == torch.float32 else (0.15 if reference_backend else 3e-2)
    torch.testing.assert_close(q.sum(-1), torch.ones_like(q[..., 0]), atol=sum_tol, rtol=0)


# ----------------------------------------------------------------------------- forward kernel


@PROPERTY_SETTINGS
@given(case=cases())
def test_transition_column(backend, case):
    graph, lead, tau, tau_max, _, seed = case
    x, tau, _, _ = materialise(graph, lead, tau, tau_max, seed)
    truth = reference.transition_column(graph, x, tau, torch.float64)
    out = ck.transition_column(graph, x, tau.float(), backend=backend)  # a float32 tau: float32 output
    assert out.dtype == torch.float32 and out.shape == (*lead, graph.num_states)
    assert torch.isfinite(out).all() and (out >= 0).all()
    ref = reference.transition_column(graph, x, tau, torch.float32)
    assert_accurate(out, ref, truth, torch.float32, "transition_column", tau)
    out64 = ck.transition_column(graph, x, tau, backend=backend)  # a float64 tau: float64 output
    torch.testing.assert_close(out64, truth, atol=1e-12, rtol=1e-9)


@PROPERTY_SETTINGS
@given(case=cases(), dtype=st.sampled_from(DTYPES))
def test_apply_kernel_pushes_distributions_forward(backend, case, dtype):
    graph, lead, tau, tau_max, _, seed = case
    _, tau, p0, _ = materialise(graph, lead, tau, tau_max, seed)
    v = p0.to(dtype)
    truth = reference.apply_kernel(graph, v.double(), tau)
    out = ck.apply_kernel(graph, v, tau, backend=backend)
    assert out.dtype == dtype and out.shape == v.shape and torch.isfinite(out).all()
    ulp = EPS[dtype]
    assert (out.double() >= -4 * ulp).all()
    # probability is conserved: sum K^T v = sum v
    torch.testing.assert_close(out.double().sum(-1), v.double().sum(-1), atol=4 * ulp * graph.num_states, rtol=0)
    ref = reference.apply_kernel(graph, v, tau)
    assert_accurate(out, ref, truth, dtype, "apply_kernel", tau)


# ----------------------------------------------------------------------------- inversion and its forward map


@PROPERTY_SETTINGS
@given(case=cases(), dtype=st.sampled_from(DTYPES))
def test_scores_to_posterior(backend, case, dtype):
    graph, lead, tau, tau_max, noise, seed = case
    log_score, x, tau, _, _ = noisy_scores(graph, lead, tau, tau_max, noise, seed, dtype)
    truth = reference.scores_to_posterior(graph, log_score.double(), x, tau)
    log_q = ck.scores_to_posterior(graph, log_score, x, tau, backend=backend)
    assert log_q.dtype == dtype and log_q.shape == log_score.shape
    assert_distribution(graph, log_q, truth, dtype, backend == "reference")
    ref = reference.scores_to_posterior(graph, log_score, x, tau)
    assert_accurate(log_q.double().exp(), ref.double().exp(), truth.exp(), dtype, "scores_to_posterior", tau, graph)


@PROPERTY_SETTINGS
@given(case=cases(), dtype=st.sampled_from(DTYPES))
def test_posterior_to_scores(backend, case, dtype):
    graph, lead, tau, tau_max, _, seed = case
    x, tau, p0, _ = materialise(graph, lead, tau, tau_max, seed)
    if graph.family == "dense":
        # an eigenbasis column K[:, x] is exact to ~1e-16 absolutely; entries below that
        # (birth-death graphs at tiny tau) are noise, see test_cpp_forward_map_dense_tiny_tau
        assume(bool((reference.transition_column(graph, x, tau, torch.float64) > 1e-13).all()))
    log_p0 = exact_conditional(graph, p0, x, tau).log().to(dtype)
    truth = reference.posterior_to_scores(graph, log_p0.double(), x, tau)
    out = ck.posterior_to_scores(graph, log_p0, x, tau, backend=backend)
    assert out.dtype == dtype and out.shape == log_p0.shape
    assert not torch.isnan(out).any() and not (out == math.inf).any()
    # r_x = sum q = 1 (up to the rounding of q's entries)
    at_x = out.gather(-1, x.unsqueeze(-1)).double()
    assert (at_x.abs() <= 8 * EPS[dtype] * graph.num_states).all()
    ref = reference.posterior_to_scores(graph, log_p0, x, tau)
    assert_accurate(out, ref, truth, dtype, "posterior_to_scores", tau)


# ----------------------------------------------------------------------------- reverse step


@PROPERTY_SETTINGS
@given(case=cases(), dtype=st.sampled_from(DTYPES), method=st.sampled_from(["analytic", "euler"]),
       to_zero=st.booleans())
def test_fused_euler_step_draws_reachable_states(backend, case, dtype, method, to_zero):
    graph, lead, tau, tau_max, noise, seed = case
    log_score, x, tau_t, _, gen = noisy_scores(graph, lead, tau, tau_max, noise, seed, dtype)
    tau_s = torch.zeros_like(tau_t) if to_zero else tau_t * torch.rand(lead, generator=gen, dtype=torch.float64)
    draw = lambda s: ck.fused_euler_step(graph, log_score, x, tau_t, tau_s, method=method,  # noqa: E731
                                         generator=torch.Generator().manual_seed(s), backend=backend)
    x_s = draw(seed)
    assert x_s.dtype == torch.int64 and x_s.shape == x.shape
    assert ((x_s >= 0) & (x_s < graph.num_states)).all()
    assert torch.equal(x_s, draw(seed))  # the generator decides
    if graph.family == "absorbing":
        mask = graph.num_states - 1
        unmasked = x != mask
        assert torch.equal(x_s[unmasked], x[unmasked])  # a real token never changes in reverse
        if to_zero:
            assert (x_s != mask).all()  # tau_s = 0 lands on clean data
    # every drawn state has positive probability in the float64 step distribution
    probs = reference.step_probabilities(graph, log_score.double(), x, tau_t, tau_s, method)
    if method == "analytic":  # the bridge has no clamping: its zeros are structural
        assert (probs.gather(-1, x_s.unsqueeze(-1)) > 0).all()


# ----------------------------------------------------------------------------- loss


@PROPERTY_SETTINGS
@given(case=cases(), dtype=st.sampled_from(DTYPES))
def test_conditional_matching_loss_and_gradient(backend, case, dtype):
    graph, lead, tau, tau_max, noise, seed = case
    log_score, x, tau, p0, _ = noisy_scores(graph, lead, tau, tau_max, noise, seed, dtype)
    target = exact_conditional(graph, p0, x, tau).float()  # the exact conditional: a valid target

    def loss_and_grad(scores, op):
        scores = scores.detach().requires_grad_(True)
        per_position = op(scores)
        per_position.sum().backward()
        return per_position.detach(), scores.grad

    truth, truth_grad = loss_and_grad(
        log_score.double(), lambda s: reference.conditional_matching_loss(graph, s, x, tau, target.double()))
    loss, grad = loss_and_grad(
        log_score, lambda s: ck.conditional_matching_loss(graph, s, x, tau, target, reduction="none", backend=backend))
    assert loss.dtype == torch.float32 and loss.shape == lead and grad.dtype == dtype
    # dense graphs: where K(tau)[:, x] is float64 noise, the target built from the reference's column
    # can put mass where the cpp column rounds to 0, an infinite loss by chance (docs/MATH.md section 6)
    if not (backend == "cpp" and graph.family == "dense"):
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (loss >= -1e-6).all()  # a cross-entropy of distributions
    ref, ref_grad = loss_and_grad(
        log_score, lambda s: reference.conditional_matching_loss(graph, s, x, tau, target).float())
    assert_accurate(loss, ref, truth, dtype, "conditional_matching_loss", tau, graph)
    assert_accurate(grad, ref_grad, truth_grad, dtype, "conditional_matching_loss backward", tau, graph)


# ----------------------------------------------------------------------------- layouts


LAYOUT_OPS = ["transition_column", "apply_kernel", "scores_to_posterior", "posterior_to_scores", "fused_euler_step",
              "conditional_matching_loss"]


@PROPERTY_SETTINGS
@given(case=cases(), dtype=st.sampled_from(DTYPES), op=st.sampled_from(LAYOUT_OPS),
       layouts=st.fixed_dictionaries({name: st.sampled_from(LAYOUTS) for name in ("data", "x", "tau", "target")}))
def test_any_layout(backend, case, dtype, op, layouts):
    """Scores, tokens, noise levels and targets given as transposed, strided or
    broadcast views: the same output (and gradient) as contiguous copies, exactly."""
    graph, lead, tau, tau_max, noise, seed = case
    log_score, x, tau, p0, gen = noisy_scores(graph, lead, tau, tau_max, noise, seed, dtype)
    cotangent = torch.randn(log_score.shape, generator=gen, dtype=torch.float64)
    target = exact_conditional(graph, p0, x, tau).float()
    others = {"x": x, "tau": tau}
    if op == "transition_column":
        call, data, cotangent = (lambda data, x, tau: ck.transition_column(graph, x, tau + data, backend=backend),
                                 torch.zeros(()), None)
    elif op == "apply_kernel":
        call, data, others = (lambda data, tau: ck.apply_kernel(graph, data, tau, backend=backend), p0.to(dtype),
                              {"tau": tau})
    elif op == "scores_to_posterior":
        call, data = lambda data, x, tau: ck.scores_to_posterior(graph, data, x, tau, backend=backend), log_score
    elif op == "posterior_to_scores":
        call, data = (lambda data, x, tau: ck.posterior_to_scores(graph, data, x, tau, backend=backend),
                      target.log().to(dtype))
    elif op == "fused_euler_step":
        call, data, cotangent = (lambda data, x, tau: ck.fused_euler_step(
            graph, data, x, tau, 0.5 * tau, generator=torch.Generator().manual_seed(seed), backend=backend),
            log_score, None)
    else:
        others["target"] = target
        call, data, cotangent = (lambda data, x, tau, target: ck.conditional_matching_loss(
            graph, data, x, tau, target, reduction="none", backend=backend), log_score, cotangent[..., 0])
    assert_layout_free(call, data, dict(layouts, data=layouts["data"] if data.ndim else "contiguous"), others,
                       cotangent)


@pytest.mark.parametrize("op", ["scores_to_posterior", "fused_euler_step", "conditional_matching_loss", "apply_kernel"])
def test_dense_inversion_past_float64_is_refused(backend, op):
    """K(tau)^-1 of a birth-death graph on 13 states overflows float64 past tau ~ 10.3:
    a clear error instead of NaN."""
    graph = ck.ordinal_graph(13, "birth_death")
    limit = largest_tau(graph)
    log_score, x = torch.zeros(2, 13), torch.tensor([3, 7])
    calls = {
        "scores_to_posterior": lambda tau: ck.scores_to_posterior(graph, log_score, x, tau, backend=backend),
        "fused_euler_step": lambda tau: ck.fused_euler_step(graph, log_score, x, tau, 0.0, backend=backend,
                                                            generator=torch.Generator().manual_seed(0)),
        "conditional_matching_loss": lambda tau: ck.conditional_matching_loss(
            graph, log_score, x, tau, torch.full((2, 13), 1 / 13), backend=backend),
        "apply_kernel": lambda tau: ck.apply_kernel(graph, torch.ones(2, 13, dtype=torch.float64), -tau, backend=backend),
    }
    assert torch.isfinite(calls[op](0.99 * limit).double()).all()
    with pytest.raises(ValueError, match="too large to invert"):
        calls[op](1.01 * limit)
