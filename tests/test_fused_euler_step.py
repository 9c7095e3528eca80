"""fused_euler_step: the step's law against enumeration, and samples against the law."""

import pytest
import torch
from scipy import stats

import cdm_kernels as ck
from cdm_kernels import reference
from exact import exact_noisy, random_data_distribution, small_graphs


def exact_reverse_marginal(graph, p0, length, x_index, position, tau_t, tau_s):
    """p(x_s^i = y | x_t) by brute force over the joint (x_0, x_s, x_t)."""
    from exact import all_sequences

    seqs = all_sequences(graph.num_states, length)
    k_s, k_delta = graph.kernel(tau_s), graph.kernel(tau_t - tau_s)
    x_t = seqs[x_index]
    law = torch.zeros(graph.num_states, dtype=torch.float64)
    for x0, weight in zip(seqs, p0):
        if weight == 0:
            continue
        for x_s in seqs:
            path = weight.clone()
            for j in range(length):
                path = path * k_s[x0[j], x_s[j]] * k_delta[x_s[j], x_t[j]]
            law[x_s[position]] += path
    return law / law.sum()


@pytest.mark.parametrize("tau_t, tau_s", [(0.8, 0.3), (2.0, 0.0), (0.2, 0.19)])
def test_analytic_step_is_the_exact_reverse_transition(tau_t, tau_s):
    length = 2
    for graph in small_graphs(3):
        p0 = random_data_distribution(graph, length, seed=5)
        truth = exact_noisy(graph, p0, length, tau_t)
        probs = reference.step_probabilities(
            graph, truth.log_ratio, truth.x, torch.full(truth.x.shape, tau_t, dtype=torch.float64),
            torch.full(truth.x.shape, tau_s, dtype=torch.float64), "analytic",
        )
        from exact import all_sequences

        seqs = all_sequences(graph.num_states, length).tolist()
        for row in range(0, len(truth.x), 3):
            x_index = seqs.index(truth.x[row].tolist())
            for position in range(length):
                expected = exact_reverse_marginal(graph, p0, length, x_index, position, tau_t, tau_s)
                assert torch.allclose(probs[row, position], expected, atol=1e-9), (graph, row, position)


def test_euler_step_is_first_order():
    graph, delta = ck.UniformGraph(6), 1e-3
    log_score, x = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 5])
    tau_t = torch.full((5,), 1.0, dtype=torch.float64)
    probs = reference.step_probabilities(graph, log_score, x, tau_t, tau_t - delta, "euler")
    jumps = delta / 6 * log_score.exp()  # Delta Q[y, x] r_y with Q[y, x] = 1/N
    jumps[torch.arange(5), x] = 0
    expected = jumps + torch.nn.functional.one_hot(x, 6) * (1 - jumps.sum(-1, keepdim=True))
    assert torch.allclose(probs, expected, atol=1e-12)
    # and it agrees with the analytic step to first order in Delta (exact ratios of some p0)
    p0 = torch.softmax(torch.randn(6, dtype=torch.float64), -1)
    exact = ck.posterior_to_scores(graph, p0.log().expand(5, 6), x, tau_t)
    euler = reference.step_probabilities(graph, exact, x, tau_t, tau_t - delta, "euler")
    analytic = reference.step_probabilities(graph, exact, x, tau_t, tau_t - delta, "analytic")
    assert (euler - analytic).abs().max() < 10 * delta**2


def test_euler_step_overflowing_rates_jump_surely():
    graph = ck.UniformGraph(4)
    log_score = torch.tensor([[200.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    probs = reference.step_probabilities(graph, log_score, torch.tensor([2]), torch.tensor([1.0]).double(), torch.tensor([0.5]).double(), "euler")
    assert torch.allclose(probs, torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64))


def chi_square_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of integer samples against probabilities (bins with tiny expectation pooled)."""
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    expected = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if expected[-1] < 5:  # too little to test alone: pool the remainder into the last big bin
        observed, expected = observed[:-1], expected[:-1]
        observed[-1] += counts[~big].sum()
        expected[-1] += probs.double()[~big].sum() * samples.numel()
    assert (counts[probs == 0] == 0).all(), "sampled a zero-probability state"
    if len(observed) == 1:  # a point mass: the assert above was the whole test
        return 1.0
    return stats.chisquare(observed.numpy(), expected.numpy() * observed.sum().item() / expected.sum().item()).pvalue


@pytest.mark.parametrize("method", ["analytic", "euler"])
@pytest.mark.parametrize("tau_s", [0.0, 0.4])
def test_samples_follow_the_step_law(backend, method, tau_s):
    draws = 20000
    for graph in [ck.UniformGraph(7), ck.AbsorbingGraph(7), ck.ordinal_graph(7)]:
        gen = torch.Generator().manual_seed(1)
        rows = torch.randn(3, 7, generator=gen)
        x = torch.tensor([0, 6, 3])
        probs = reference.step_probabilities(
            graph, rows.double(), x, torch.full((3,), 1.2, dtype=torch.float64),
            torch.full((3,), tau_s, dtype=torch.float64), method,
        )
        log_score = rows.repeat_interleave(draws, 0).view(3, draws, 7)
        samples = ck.fused_euler_step(
            graph, log_score, x[:, None].expand(3, draws), 1.2, tau_s, method=method, generator=gen, backend=backend
        )
        assert samples.dtype == torch.int64 and samples.shape == (3, draws)
        for row in range(3):
            p_value = chi_square_pvalue(samples[row], probs[row])
            assert p_value > 1e-4, (graph, method, row, p_value)
        if graph.family == "absorbing" and tau_s == 0:
            assert (samples != graph.mask).all()


def test_generator_makes_draws_reproducible(backend):
    graph = ck.UniformGraph(50)
    log_score, x = torch.randn(64, 50), torch.randint(0, 50, (64,), dtype=torch.int32)
    first = ck.fused_euler_step(graph, log_score, x, 2.0, 1.0, generator=torch.Generator().manual_seed(3), backend=backend)
    again = ck.fused_euler_step(graph, log_score, x, 2.0, 1.0, generator=torch.Generator().manual_seed(3), backend=backend)
    other = ck.fused_euler_step(graph, log_score, x, 2.0, 1.0, generator=torch.Generator().manual_seed(4), backend=backend)
    assert torch.equal(first, again) and not torch.equal(first, other)
    gen = torch.Generator().manual_seed(3)
    a = ck.fused_euler_step(graph, log_score, x, 2.0, 1.0, generator=gen, backend=backend)
    b = ck.fused_euler_step(graph, log_score, x, 2.0, 1.0, generator=gen, backend=backend)
    assert not torch.equal(a, b)  # the generator advances per call


@pytest.mark.parametrize("n", [2, 17, 1000, 50257])
def test_large_vocabulary_step(backend, n):
    for graph in (ck.UniformGraph(n), ck.AbsorbingGraph(n)):
        x = torch.full((3, 2), n - 1)
        out = ck.fused_euler_step(graph, torch.randn(3, 2, n), x, 1.0, 0.0, backend=backend)
        assert out.shape == (3, 2) and ((out >= 0) & (out < n)).all()
        if graph.family == "absorbing":
            assert (out != n - 1).all()


def test_bf16_scores_step(backend):
    graph = ck.UniformGraph(17)
    out = ck.fused_euler_step(graph, torch.randn(4, 9, 17, dtype=torch.bfloat16), torch.randint(0, 17, (4, 9)), 1.0, 0.5, backend=backend)
    assert out.shape == (4, 9) and out.dtype == torch.int64


@pytest.mark.parametrize("method, tau_s", [("analytic", 0.0), ("analytic", 0.3), ("euler", 0.0)])
def test_large_vocabulary_rates(method, tau_s):
    """A state far below float32's resolution relative to the running CDF is still drawn at
    its rate: state 0 holds 1 - 1e-3 of q, 50,000 states share 1e-3 (2e-8 each, under
    float32's epsilon next to 1). An absorbing mask position draws from q (scaled, plus the
    mask's own mass when tau_s > 0); 102,400 draws expect ~102 of the small states."""
    if "cpp" not in ck.available_backends("cpu"):
        pytest.skip("no cpp backend")
    small = 50000
    graph = ck.AbsorbingGraph(small + 2)  # state 0, states 1..50000, the mask
    log_score = torch.full((256, graph.num_states), torch.tensor(1e-3 / small).log().item())
    log_score[:, 0] = torch.tensor(1 - 1e-3).log().item()
    x = torch.full((256,), graph.mask)
    gen = torch.Generator().manual_seed(11)
    real = hits = 0
    for _ in range(400):
        y = ck.fused_euler_step(graph, log_score, x, 1.0, tau_s, method=method, generator=gen, backend="cpp")
        real += int((y != graph.mask).sum())
        hits += int(((y >= 1) & (y <= small)).sum())
    expected = real * 1e-3
    assert abs(hits - expected) < 4 * expected**0.5, (hits, expected)
