"""scores_to_posterior / posterior_to_scores against float64 enumeration of small joints."""

import pytest
import torch

import cdm_kernels as ck
from cdm_kernels import reference
from exact import exact_noisy, random_data_distribution, small_graphs

TAUS = [0.05, 0.7, 3.0]


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_ratios_give_exact_posterior(backend, tau, dtype):
    for graph in small_graphs(4):
        length = 3
        truth = exact_noisy(graph, random_data_distribution(graph, length), length, tau)
        log_q = ck.scores_to_posterior(graph, truth.log_ratio.to(dtype), truth.x, tau, backend=backend)
        assert log_q.dtype == dtype and log_q.shape == truth.log_ratio.shape
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        if graph.family == "dense" and dtype == torch.float32:
            # float32 rounding of the inputs is amplified by the eigenbasis inversion (up to e^{tau |lambda|}):
            # dense graphs at large tau need float64 scores (DenseGraph's docstring)
            if tau > 1:
                continue
            tol = 1e-3
        assert torch.allclose(log_q.double().exp(), truth.posterior, atol=tol), graph


@pytest.mark.parametrize("tau", [12.0, 20.0])
def test_exact_ratios_at_sedd_largest_noise(backend, tau):
    # alpha = e^-tau is tiny: the clamp must act on the scale of the inverted ratios, or
    # small but real probabilities get floored (a one-token closed form, in float64)
    graph = ck.UniformGraph(4)
    p0 = torch.tensor([0.999, 2.4e-5, 1e-3 - 2.4e-5, 0.0], dtype=torch.float64)
    marginal = p0 @ graph.kernel(tau)  # p_t(y)
    x = torch.arange(4)
    log_ratio = (marginal[None, :] / marginal[x][:, None]).log()
    posterior = p0[:, None] * graph.kernel(tau)[:, x] / marginal[x][None, :]  # p(a | x), column per x
    log_q = ck.scores_to_posterior(graph, log_ratio, x, tau, backend=backend)
    assert torch.allclose(log_q.exp(), posterior.T, rtol=1e-3, atol=1e-9)  # (the floor: < 1e-10)


@pytest.mark.parametrize("tau", TAUS)
def test_forward_map_gives_exact_ratios(backend, tau):
    for graph in small_graphs(4):
        length = 2
        truth = exact_noisy(graph, random_data_distribution(graph, length), length, tau)
        log_r = ck.posterior_to_scores(graph, truth.posterior.log(), truth.x, tau, backend=backend)
        determined = torch.ones_like(truth.posterior, dtype=torch.bool)
        if graph.family == "absorbing":  # q holds no information on u(a) where K[a, x] = 0
            determined = (truth.x == graph.num_states - 1).unsqueeze(-1).expand_as(determined)
        assert torch.allclose(log_r.exp()[determined], truth.log_ratio.exp()[determined], rtol=1e-8, atol=1e-10), graph
        assert torch.allclose(log_r.gather(-1, truth.x.unsqueeze(-1)), torch.zeros(1, dtype=torch.float64), atol=1e-12)


def noisy_scores(graph, positions, tau, seed, noise=0.5, dtype=torch.float32):
    """Exact log-ratios of a random single-token posterior, plus noise: what an imperfect network outputs."""
    gen = torch.Generator().manual_seed(seed)
    n = graph.num_states
    real = n - 1 if graph.family == "absorbing" else n
    q = torch.softmax(3 * torch.randn(positions, real, generator=gen, dtype=torch.float64), -1)
    if real < n:
        q = torch.cat([q, torch.zeros(positions, 1, dtype=torch.float64)], -1)
    x = torch.randint(0, n, (positions,), generator=gen)
    if graph.family == "absorbing":
        x[: positions // 2] = n - 1
    tau = torch.full((positions,), tau, dtype=torch.float64)
    log_r = reference.posterior_to_scores(graph, q.log(), x, tau)
    log_r = torch.where(torch.isfinite(log_r), log_r, -30.0)  # a network outputs finite values
    return (log_r + noise * torch.randn(log_r.shape, generator=gen, dtype=torch.float64)).to(dtype), x


@pytest.mark.parametrize("tau", [1e-6, 1e-3, 0.5, 5.0, 20.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_imperfect_scores_give_a_distribution(backend, tau, dtype):
    for graph in [ck.UniformGraph(17), ck.AbsorbingGraph(17), ck.ordinal_graph(17)]:
        log_score, x = noisy_scores(graph, 64, tau, seed=3, dtype=dtype)
        log_q = ck.scores_to_posterior(graph, log_score, x, tau, backend=backend)
        assert not torch.isnan(log_q).any() and not (log_q == float("inf")).any()
        q = log_q.float().exp()
        assert (q >= 0).all()
        # a bf16 log-probability carries ~2^-9 relative error, so its exp sums to 1 within a few percent
        # (the fused backends accumulate in float32; the eager reference works in bf16 throughout)
        tol = {torch.float32: 1e-5, torch.bfloat16: 0.1 if backend == "reference" else 3e-2}[dtype]
        assert torch.allclose(q.sum(-1), torch.ones(64), atol=tol)
        if graph.family == "uniform":  # no structural zeros: every log-probability is finite
            assert torch.isfinite(log_q).all()


def test_absorbing_structure(backend):
    graph = ck.AbsorbingGraph(6)
    log_score = torch.randn(2, 6)
    x = torch.tensor([2, 5])
    log_q = ck.scores_to_posterior(graph, log_score, x, 1.3, backend=backend)
    assert log_q[0, 2] == 0 and torch.isinf(log_q[0, [0, 1, 3, 4, 5]]).all()
    assert log_q[1, 5] == float("-inf")  # never the mask
    assert torch.allclose(log_q[1, :5], torch.log_softmax(log_score[1, :5], -1), atol=1e-6)


def test_entry_at_x_is_ignored(backend):
    graph = ck.UniformGraph(9)
    log_score, x = torch.randn(4, 9), torch.tensor([0, 3, 8, 3])
    moved = log_score.clone()
    moved[torch.arange(4), x] += 5.0
    a = ck.scores_to_posterior(graph, log_score, x, 0.4, backend=backend)
    b = ck.scores_to_posterior(graph, moved, x, 0.4, backend=backend)
    assert torch.equal(a, b)


def test_tau_zero_is_identity(backend):
    for graph in small_graphs(5):
        x = torch.tensor([1, 2])  # (at tau = 0 the absorbing mask is unreachable)
        log_q = ck.scores_to_posterior(graph, torch.randn(2, 5), x, 0.0, backend=backend)
        assert torch.allclose(log_q.exp(), torch.nn.functional.one_hot(x, 5).float(), atol=1e-6), graph


@pytest.mark.parametrize("tau", [0.05, 1.0, 4.0])
def test_gradients_match_finite_differences(backend, tau):
    for graph in small_graphs(5):
        log_score, x = noisy_scores(graph, 6, tau, seed=7, noise=0.05, dtype=torch.float64)
        log_score.requires_grad_(True)
        weights = torch.randn(6, 5, dtype=torch.float64)

        def posterior(scores):
            log_q = ck.scores_to_posterior(graph, scores, x, tau, backend=backend)
            return torch.where(torch.isfinite(log_q), log_q, 0.0) * weights

        assert torch.autograd.gradcheck(posterior, (log_score,)), graph

        log_p0 = torch.log_softmax(torch.randn(6, 5, dtype=torch.float64), -1).requires_grad_(True)
        if graph.family == "absorbing":
            continue  # the forward map has structural zeros there; covered by the enumeration test
        assert torch.autograd.gradcheck(
            lambda p: ck.posterior_to_scores(graph, p, x, tau, backend=backend), (log_p0,)
        ), graph


@pytest.mark.parametrize("n", [2, 17, 1000, 50257])
@pytest.mark.parametrize("lead", [(), (1,), (3, 5)])
def test_shapes_and_large_vocabularies(backend, n, lead):
    for graph in (ck.UniformGraph(n), ck.AbsorbingGraph(n)):
        gen = torch.Generator().manual_seed(n)
        log_score = torch.randn(*lead, n, generator=gen)
        x = torch.randint(0, n, lead, generator=gen)
        out = ck.scores_to_posterior(graph, log_score, x, 0.8, backend=backend)
        expected = reference.scores_to_posterior(graph, log_score.double(), x, torch.full(lead, 0.8, dtype=torch.float64))
        assert out.shape == (*lead, n)
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(out), finite)
        # compared as probabilities: near-cancelling r_a - beta S lose relative (not absolute) accuracy in float32
        assert torch.allclose(out.double().exp(), expected.exp(), rtol=1e-4, atol=1e-7)


def test_bf16_error_at_most_twice_eager_bf16(backend):
    for graph in [ck.UniformGraph(17), ck.AbsorbingGraph(17), ck.ordinal_graph(17)]:
        log_score, x = noisy_scores(graph, 256, 0.7, seed=11, noise=0.2, dtype=torch.float64)
        tau = torch.full((256,), 0.7, dtype=torch.float64)
        truth = reference.scores_to_posterior(graph, log_score, x, tau).exp()
        eager = reference.scores_to_posterior(graph, log_score.bfloat16(), x, tau).double().exp()
        fused = ck.scores_to_posterior(graph, log_score.bfloat16(), x, 0.7, backend=backend).double().exp()
        eager_error = (eager - truth).abs().max().item()
        fused_error = (fused - truth).abs().max().item()
        assert fused_error <= 2 * eager_error + 1e-6, (graph, fused_error, eager_error)
