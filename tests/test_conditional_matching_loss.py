"""conditional_matching_loss: value, gradient, reductions, against independent computations."""

import pytest
import torch

import cdm_kernels as ck
from cdm_kernels import reference
from exact import exact_noisy, random_data_distribution, small_graphs
from test_posterior import noisy_scores


def test_value_is_cross_entropy_against_the_exact_conditional(backend):
    for graph in small_graphs(4):
        truth = exact_noisy(graph, random_data_distribution(graph, 2), 2, 0.6)
        target = torch.softmax(torch.randn(truth.posterior.shape, dtype=torch.float64), -1)
        if graph.family == "absorbing":  # a target never puts mass where the conditional is structurally 0
            target = torch.where(truth.posterior > 0, target, 0.0)
            target = target / target.sum(-1, keepdim=True)
        loss = ck.conditional_matching_loss(graph, truth.log_ratio, truth.x, 0.6, target, reduction="none", backend=backend)
        plogq = torch.where(target > 0, target * truth.posterior.log(), 0.0)
        assert loss.dtype == torch.float32
        assert torch.allclose(loss.double(), -plogq.sum(-1), rtol=1e-5, atol=1e-6), graph


def test_reductions(backend):
    graph = ck.UniformGraph(9)
    log_score, x = torch.randn(3, 5, 9), torch.randint(0, 9, (3, 5))
    target = torch.softmax(torch.randn(3, 5, 9), -1)
    per_position = ck.conditional_matching_loss(graph, log_score, x, 0.5, target, reduction="none", backend=backend)
    assert per_position.shape == (3, 5)
    assert torch.allclose(ck.conditional_matching_loss(graph, log_score, x, 0.5, target, backend=backend), per_position.mean())
    assert torch.allclose(ck.conditional_matching_loss(graph, log_score, x, 0.5, target, reduction="sum", backend=backend), per_position.sum())


@pytest.mark.parametrize("tau", [0.05, 1.0, 4.0])
def test_gradient_matches_finite_differences(backend, tau):
    for graph in small_graphs(5):
        log_score, x = noisy_scores(graph, 6, tau, seed=2, noise=0.05, dtype=torch.float64)
        truth = reference.scores_to_posterior(graph, log_score, x, torch.full((6,), tau, dtype=torch.float64)).exp()
        target = 0.5 * truth + 0.5 * torch.softmax(torch.randn(6, 5, dtype=torch.float64), -1) * (truth > 0)
        target = target / target.sum(-1, keepdim=True)
        weights = torch.rand(6, dtype=torch.float64)
        log_score.requires_grad_(True)

        def loss(scores):
            return ck.conditional_matching_loss(graph, scores, x, tau, target, reduction="none", backend=backend).double() * weights

        # the fused backends return a float32 loss: compare their gradient with autograd of the float64 reference
        grad = torch.autograd.grad(loss(log_score).sum(), log_score)[0]
        expected = torch.autograd.grad(
            (reference.conditional_matching_loss(graph, log_score, x, torch.full((6,), tau, dtype=torch.float64), target) * weights).sum(),
            log_score,
        )[0]
        assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-7), graph


def test_gradient_vanishes_at_the_matching_student(backend):
    # CE(target, q) is minimised at q = target: exact scores of the target's posterior have zero gradient
    graph = ck.UniformGraph(6)
    x, tau = torch.tensor([0, 3, 5]), torch.full((3,), 0.9, dtype=torch.float64)
    target = torch.softmax(torch.randn(3, 6, dtype=torch.float64), -1)
    log_score = ck.posterior_to_scores(graph, target.log(), x, tau).requires_grad_(True)
    loss = ck.conditional_matching_loss(graph, log_score, x, tau, target, reduction="sum", backend=backend)
    (grad,) = torch.autograd.grad(loss, log_score)
    assert grad.abs().max() < 1e-5


def test_only_the_student_gets_a_gradient(backend):
    graph = ck.UniformGraph(5)
    target = torch.softmax(torch.randn(2, 5, requires_grad=True), -1)
    with pytest.raises(ValueError, match="target must not require grad"):
        ck.conditional_matching_loss(graph, torch.randn(2, 5), torch.tensor([0, 1]), 0.5, target, backend=backend)


def test_bf16_error_at_most_twice_eager_bf16(backend):
    for graph in [ck.UniformGraph(17), ck.AbsorbingGraph(17), ck.ordinal_graph(17)]:
        log_score, x = noisy_scores(graph, 256, 0.7, seed=4, noise=0.2, dtype=torch.float64)
        tau = torch.full((256,), 0.7, dtype=torch.float64)
        target = reference.scores_to_posterior(graph, log_score + 0.1 * torch.randn_like(log_score), x, tau).exp()
        truth = reference.conditional_matching_loss(graph, log_score, x, tau, target)
        eager = reference.conditional_matching_loss(graph, log_score.bfloat16(), x, tau, target.bfloat16()).double()
        fused = ck.conditional_matching_loss(graph, log_score.bfloat16(), x, 0.7, target.bfloat16(), reduction="none", backend=backend).double()
        assert (fused - truth).abs().max() <= 2 * (eager - truth).abs().max() + 1e-6, graph


@pytest.mark.parametrize("n", [17, 1000, 50257])
def test_large_vocabulary_loss_and_gradient(backend, n):
    graph = ck.UniformGraph(n)
    gen = torch.Generator().manual_seed(0)
    log_score = torch.randn(2, 3, n, generator=gen, requires_grad=True)
    x = torch.randint(0, n, (2, 3), generator=gen)
    target = torch.softmax(torch.randn(2, 3, n, generator=gen), -1)
    tau = torch.full((2, 3), 0.3, dtype=torch.float64)
    loss = ck.conditional_matching_loss(graph, log_score, x, 0.3, target, backend=backend)
    (grad,) = torch.autograd.grad(loss, log_score)

    def reference_gradient(dtype):
        scores = log_score.detach().to(dtype).requires_grad_(True)
        value = reference.conditional_matching_loss(graph, scores, x, tau, target.to(dtype)).mean()
        return value, torch.autograd.grad(value, scores)[0].double()

    exact_loss, exact_grad = reference_gradient(torch.float64)
    _, eager_grad = reference_gradient(torch.float32)
    assert torch.allclose(loss.double(), exact_loss, rtol=1e-5)
    # random scores make some r_a - beta S nearly cancel, where float32 gradients lose relative accuracy:
    # hold the fused backend to (at most twice) the error of eager float32 PyTorch
    error = (grad.double() - exact_grad).norm() / exact_grad.norm()
    eager_error = (eager_grad - exact_grad).norm() / exact_grad.norm()
    assert error <= 2 * eager_error + 1e-6, (error, eager_error)
