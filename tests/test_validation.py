"""Bad input gets a clear TypeError/ValueError naming the argument, before any kernel runs."""

import pytest
import torch

import cdm_kernels as ck

G = ck.UniformGraph(5)
SCORES = torch.randn(2, 3, 5)
X = torch.randint(0, 5, (2, 3))
TARGET = torch.softmax(torch.randn(2, 3, 5), -1)


def call(op, **overrides):
    args = dict(graph=G, log_score=SCORES, x=X, tau=0.5)
    if op is ck.fused_euler_step:
        args = dict(graph=G, log_score=SCORES, x=X, tau_t=0.5, tau_s=0.1)
    if op is ck.conditional_matching_loss:
        args = dict(graph=G, student_log_score=SCORES, x_t=X, tau_t=0.5, target=TARGET)
    if op is ck.posterior_to_scores:
        args = dict(graph=G, log_p0=torch.log_softmax(SCORES, -1), x=X, tau=0.5)
    args.update(overrides)
    return op(**args)


SCORE_OPS = [ck.scores_to_posterior, ck.fused_euler_step]


def with_nan():
    bad = SCORES.clone()
    bad[0, 1, 2] = float("nan")
    return bad


@pytest.mark.parametrize("op", SCORE_OPS)
@pytest.mark.parametrize(
    "override, error, message",
    [
        (dict(x=torch.full((2, 3), 5)), ValueError, r"x holds token ids outside \[0, 5\)"),
        (dict(x=torch.full((2, 3), -1)), ValueError, "x holds token ids outside"),
        (dict(x=X.float()), TypeError, "x must be int64 or int32"),
        (dict(x=X[:1]), ValueError, r"x must have shape \(2, 3\)"),
        (dict(log_score=SCORES[..., :4]), ValueError, r"log_score must have shape \(\.\.\., 5\)"),
        (dict(log_score=SCORES.long()), TypeError, "log_score must be float32"),
        (dict(log_score=with_nan()), ValueError, "log_score contains NaN or inf"),
        (dict(log_score=SCORES.tolist()), TypeError, "log_score must be a torch.Tensor"),
        (dict(graph="uniform"), TypeError, "graph must be a cdm_kernels Graph"),
        (dict(backend="cuda"), ValueError, "backend 'cuda' is not available"),
        (dict(backend="fastest"), ValueError, "unknown backend 'fastest'"),
    ],
)
def test_bad_arguments_are_named(op, override, error, message):
    with pytest.raises(error, match=message):
        call(op, **override)


@pytest.mark.parametrize("bad_tau, message", [(-0.1, "tau must be >= 0"), (float("nan"), "tau must be finite"), ("1", "tau must be a float or a tensor"), (torch.ones(4), "does not broadcast")])
def test_bad_tau(bad_tau, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ck.scores_to_posterior(G, SCORES, X, bad_tau)


def test_tau_broadcasts_per_position():
    per_row = torch.tensor([[0.1], [2.0]])
    out = ck.scores_to_posterior(G, SCORES, X, per_row)
    assert torch.allclose(out[1], ck.scores_to_posterior(G, SCORES[1], X[1], 2.0))


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(tau_s=0.5), "tau_s must be < tau_t"),
        (dict(tau_s=0.9), "tau_s must be < tau_t"),
        (dict(tau_s=-0.1), "tau_s must be >= 0"),
        (dict(tau_t=float("inf")), "tau_t must be finite"),
        (dict(method="heun"), "method must be one of"),
        (dict(generator=3), "generator must be a torch.Generator"),
    ],
)
def test_bad_step_arguments(override, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(ck.fused_euler_step, **override)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(target=TARGET[..., :4]), r"target must have shape \(\.\.\., 5\)"),
        (dict(target=TARGET[:1]), "target must have the shape of student_log_score"),
        (dict(target=torch.randn(2, 3, 5)), "target must be probabilities|target rows must sum to 1"),
        (dict(target=2 * TARGET), "target rows must sum to 1"),
        (dict(reduction="max"), "reduction must be one of"),
        (dict(x_t=X.double()), "x_t must be int64 or int32"),
        (dict(tau_t=-1.0), "tau_t must be >= 0"),
    ],
)
def test_bad_loss_arguments(override, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(ck.conditional_matching_loss, **override)


def test_log_p0_allows_minus_inf_but_not_nan():
    log_p0 = torch.log_softmax(SCORES, -1)
    log_p0[0, 0, 1] = float("-inf")
    assert torch.isfinite(call(ck.posterior_to_scores, log_p0=log_p0)[0, 0, X[0, 0]])
    log_p0[0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="log_p0 contains NaN"):
        call(ck.posterior_to_scores, log_p0=log_p0)


def test_apply_kernel_arguments():
    with pytest.raises(ValueError, match=r"v must have shape \(\.\.\., 5\)"):
        ck.apply_kernel(G, torch.randn(3, 4), 0.5)
    # a negative tau is the inverse kernel, not an error
    v = torch.randn(3, 5, dtype=torch.float64)
    assert torch.allclose(ck.apply_kernel(G, ck.apply_kernel(G, v, 0.5), -0.5), v)


def test_value_checks_can_be_disabled_for_gpu_throughput():
    ck.set_value_checks(False)
    try:
        call(ck.scores_to_posterior, log_score=with_nan())  # no host-synchronising check
    finally:
        ck.set_value_checks(True)
    with pytest.raises(ValueError):
        call(ck.scores_to_posterior, log_score=with_nan())
