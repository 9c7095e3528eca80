"""Mixture students whose component weights depend on x_t (``DiTConfig.mixture_weights``):
the weight head, the joint-CDM loss against the weighted mixture NLL by hand, the
sampler's component draws, and the exact distribution against Monte Carlo draws."""

from __future__ import annotations

import math

import pytest
import torch

import cdm_kernels as ck
from cdm.experiment import Setup, exact_metrics, new_model
from cdm.losses import di4c_loss, joint_cdm_loss
from cdm.models import DiTConfig, make_student
from cdm.sampling import (draw_latents, exact_sample_distribution, latent_quadrature, mixture_log_weights,
                          network_evaluations, sample, tau_grid)

pytestmark = pytest.mark.usefixtures("single_thread")

K = 4
SETUP = Setup(data="markov", data_options={"vocab_size": 3, "seq_len": 3}, graph="uniform")


def _perturbed(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its (partly zero) initialisation: weights and components differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return _perturbed(new_model(SETUP, "tiny")).eval()


def _student(teacher, weighted=True, shared_blocks=0):
    torch.manual_seed(1)
    return make_student(teacher, latent_dim=1, latent_components=K, parameterization="posterior", graph="uniform",
                        mixture_weights=weighted, shared_blocks=shared_blocks)


def test_weight_head_starts_uniform_and_validates(teacher):
    student = _student(teacher)
    x = SETUP.dataset.sample(5, torch.Generator().manual_seed(0))
    log_w = mixture_log_weights(student, x, 2.0)
    torch.testing.assert_close(log_w, torch.full((5, K), -math.log(K)))  # uniform: the equal-weight student
    _perturbed(student.weight_head, seed=2)
    log_w = mixture_log_weights(student, x, 2.0)
    assert log_w.shape == (5, K) and log_w.dtype == torch.float32
    torch.testing.assert_close(log_w.exp().sum(-1), torch.ones(5))
    assert (log_w - log_w[:1]).abs().max() > 1e-3  # they depend on x_t
    assert mixture_log_weights(teacher, x, 2.0) is None
    with pytest.raises(ValueError, match="latent_components"):
        DiTConfig(vocab_size=3, seq_len=3, mixture_weights=True)
    with pytest.raises(ValueError, match="mixture_weights"):
        teacher(x, torch.full((5,), 2.0, dtype=torch.float64), mixture_weights=True)
    with pytest.raises(ValueError, match="lam"):
        student(x, torch.full((5,), 2.0, dtype=torch.float64), torch.zeros(5, 1), mixture_weights=True)


@pytest.mark.parametrize("shared_blocks", [0, 1])
def test_joint_cdm_loss_is_the_weighted_mixture_nll(teacher, monkeypatch, shared_blocks):
    """M = K (each component once): ``-log sum_k w_k(x_t) prod_i p(x_0^i | x_t, k)`` per
    token, averaged over the R targets, by hand; gradients reach the weight head. With
    shared blocks the loss evaluates the K components in one grouped call."""
    import cdm.losses.cdm as cdm_module

    graph, noise, r = SETUP.kernel_graph, SETUP.schedule, 3
    student = _perturbed(_student(teacher, shared_blocks=shared_blocks), seed=3)
    calls, chain = [], cdm_module.teacher_chain

    def recording_chain(*args, **kwargs):
        calls.append((args[3], args[4], chain(*args, **kwargs)))
        return calls[-1][2]

    monkeypatch.setattr(cdm_module, "teacher_chain", recording_chain)
    x0 = SETUP.dataset.sample(6, torch.Generator().manual_seed(0))
    loss = joint_cdm_loss(student, teacher, graph, noise, x0, steps=2, num_latents=K, num_targets=r, teacher_steps=3,
                          generator=torch.Generator().manual_seed(1), reduction="none")
    (x_from, t_from, _), (_, _, x_clean) = calls
    x_t, tau_t = x_from[::r], noise.total(t_from[::r])
    with torch.no_grad():
        log_w = student(x_t, tau_t, mixture_weights=True).double()  # (B, K)
        log_p0 = torch.stack([_log_conditional(student, x_t, tau_t, k) for k in range(K)], 1)  # (B, K, L, N)
    targets = x_clean.view(len(x_t), 1, r, 3, 1).expand(-1, K, -1, -1, -1)
    log_lik = log_p0[:, :, None].expand(-1, -1, r, -1, -1).gather(-1, targets).squeeze(-1).sum(-1)  # (B, K, R)
    expected = -torch.logsumexp(log_w[..., None] + log_lik, 1).mean(-1) / 3
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)
    loss.mean().backward()
    assert student.weight_head.linear.weight.grad.abs().sum() > 0


def _log_conditional(student, x, tau, k):
    """Component k's ``log p_0|t(. | x_t)`` (B, L, N), float64, inverted from its scores."""
    lam = torch.full((len(x), 1), (k + 0.5) / K)
    log_score = student(x, tau, lam).double()
    return ck.scores_to_posterior(SETUP.kernel_graph, log_score, x, tau[:, None].expand(x.shape))


def test_uniform_weights_give_the_equal_weight_loss(teacher):
    """At initialisation (uniform weights) the weighted student's loss is the equal-weight
    student's, draw for draw, also with M < K stratified draws."""
    graph, noise = SETUP.kernel_graph, SETUP.schedule
    weighted, plain = _student(teacher), _student(teacher, weighted=False)
    x0 = SETUP.dataset.sample(8, torch.Generator().manual_seed(0))
    for m in (K, 2):
        losses = [joint_cdm_loss(s, teacher, graph, noise, x0, steps=2, num_latents=m, teacher_steps=3,
                                 generator=torch.Generator().manual_seed(1), reduction="none") for s in (weighted, plain)]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)


def test_weighted_students_draw_inside_the_model_and_count_their_passes(teacher):
    """Free draws of a weighted student's latent are refused (its sampler draws from
    w(x_t) inside the model); NFE: two passes a step without shared blocks, one with."""
    student = _student(teacher)
    with pytest.raises(ValueError, match="step_log_scores"):
        draw_latents(student, 8, torch.Generator().manual_seed(0))
    assert draw_latents(student, 8, torch.Generator().manual_seed(0), stratified_groups=4).shape == (8, 1)
    assert network_evaluations(student, 4) == 8
    assert network_evaluations(_student(teacher, shared_blocks=1), 4) == 4
    assert network_evaluations(_student(teacher, weighted=False), 4) == 4


@pytest.mark.parametrize("shared_blocks", [0, 1])
def test_exact_distribution_of_a_weighted_student_matches_its_sampler(teacher, shared_blocks):
    """A weighted student with uneven, x_t-dependent weights: Monte Carlo draws of its
    2-step sampler against ``exact_sample_distribution`` (total variation), and
    ``exact_metrics`` uses that distribution."""
    graph, noise = SETUP.kernel_graph, SETUP.schedule
    student = _student(teacher, shared_blocks=shared_blocks)
    _perturbed(student.weight_head, scale=2.0, seed=4)
    support = torch.cartesian_prod(*[torch.arange(3)] * 3)
    exact = exact_sample_distribution(student, graph, support, tau_grid(noise, 2), latents=latent_quadrature(student))
    draws = sample(student, graph, noise, 20000, 3, 2, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(SETUP.dataset.sequence_index(draws), minlength=27).double()
    assert 0.5 * (counts / counts.sum() - exact).abs().sum() < 0.03  # ~0.01 from sampling noise with 27 cells
    # the weights matter: the same components weighted equally give another distribution
    plain = _student(teacher, weighted=False, shared_blocks=shared_blocks)
    equal = exact_sample_distribution(plain, graph, support, tau_grid(noise, 2), latents=latent_quadrature(student))
    assert 0.5 * (equal - exact).abs().sum() > 0.05
    from cdm.metrics import exact_kl

    metrics = exact_metrics(student, SETUP, 2)
    assert metrics["kl"] == pytest.approx(exact_kl(SETUP.dataset.exact_distribution(), exact), rel=1e-9)
    with pytest.raises(ValueError, match="one value per component"):
        exact_sample_distribution(student, graph, support, tau_grid(noise, 2), latents=torch.tensor([[0.1], [0.2]]))


def test_di4c_refuses_a_weighted_student(teacher):
    x0 = SETUP.dataset.sample(4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="student"):
        di4c_loss(_student(teacher), teacher, SETUP.kernel_graph, SETUP.schedule, x0, num_latents=K)
