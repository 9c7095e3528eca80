import math

import pytest
import torch

from cdm_kernels import AbsorbingGraph, DenseGraph, UniformGraph, ordinal_graph


def all_families(n):
    return [UniformGraph(n), AbsorbingGraph(n), ordinal_graph(n, "gaussian"), ordinal_graph(n, "birth_death")]


@pytest.mark.parametrize("n", [2, 5, 17])
@pytest.mark.parametrize("tau", [1e-6, 0.3, 2.0, 20.0])
def test_kernel_is_matrix_exponential_of_rate_matrix(n, tau):
    for graph in all_families(n):
        q = graph.rate_matrix()
        assert q.dtype == torch.float64 and q.shape == (n, n)
        assert torch.allclose(q.sum(1), torch.zeros(n, dtype=torch.float64), atol=1e-12)
        assert (q - torch.diag(torch.diagonal(q)) >= 0).all()
        expected = torch.linalg.matrix_exp(tau * q)
        assert torch.allclose(graph.kernel(tau), expected, atol=1e-10), graph
        assert torch.allclose(graph.kernel(tau).sum(1), torch.ones(n, dtype=torch.float64), atol=1e-10)


def test_closed_forms_follow_sedd_normalisation():
    n, tau = 6, 0.7
    uniform = UniformGraph(n).kernel(tau)
    assert math.isclose(uniform[0, 0].item(), math.exp(-tau) + (1 - math.exp(-tau)) / n)
    assert math.isclose(uniform[0, 1].item(), (1 - math.exp(-tau)) / n)
    absorbing = AbsorbingGraph(n)
    k = absorbing.kernel(tau)
    assert absorbing.mask == n - 1
    assert math.isclose(k[2, 2].item(), math.exp(-tau)) and math.isclose(k[2, n - 1].item(), 1 - math.exp(-tau))
    assert k[n - 1, n - 1].item() == 1.0


def test_dense_graph_of_uniform_rates_matches_uniform_graph():
    n = 7
    dense = DenseGraph(UniformGraph(n).rate_matrix())
    for tau in (0.01, 1.0, 5.0):
        assert torch.allclose(dense.kernel(tau), UniformGraph(n).kernel(tau), atol=1e-12)


def test_non_reversible_generator_with_real_spectrum():
    # upper-triangular generator: eigenvalues are its diagonal, distinct and real
    q = torch.tensor([[-3.0, 2.0, 1.0], [0.0, -1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    graph = DenseGraph(q)
    assert torch.allclose(graph.kernel(0.9), torch.linalg.matrix_exp(0.9 * q), atol=1e-12)
    evals, vecs, vecs_inv = graph.spectral()
    assert torch.allclose(vecs @ torch.diag(evals) @ vecs_inv, q, atol=1e-12)


def test_rejects_complex_spectrum():
    cycle = torch.tensor([[-1.0, 1.0, 0.0], [0.0, -1.0, 1.0], [1.0, 0.0, -1.0]])
    with pytest.raises(ValueError, match="complex spectrum"):
        DenseGraph(cycle)


def test_rejects_defective_generator():
    # a Jordan block: one eigenvalue, one eigenvector
    q = torch.tensor([[-1.0, 1.0, 0.0], [0.0, -1.0, 1.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="well-conditioned|diagonalisable"):
        DenseGraph(q)


@pytest.mark.parametrize(
    "q, message",
    [
        (torch.zeros(3), "square"),
        (torch.tensor([[-1.0, 1.0], [2.0, -1.0]]), "sum to 0"),
        (torch.tensor([[1.0, -1.0], [1.0, -1.0]]), "non-negative"),
        (torch.tensor([[float("nan"), 0.0], [0.0, 0.0]]), "finite"),
        (torch.zeros(2, 2), "all zero"),
    ],
)
def test_rejects_invalid_rate_matrix(q, message):
    with pytest.raises(ValueError, match=message):
        DenseGraph(q)


@pytest.mark.parametrize("bad", [1, 0, -3])
def test_rejects_too_few_states(bad):
    with pytest.raises(ValueError, match="num_states"):
        UniformGraph(bad)


def test_rejects_non_integer_states():
    with pytest.raises(TypeError, match="num_states"):
        AbsorbingGraph(3.0)


@pytest.mark.parametrize("kind", ["gaussian", "birth_death"])
def test_ordinal_graph_is_reversible_with_unit_spectral_gap(kind):
    graph = ordinal_graph(9, kind)
    evals, _, _ = graph.spectral()
    assert abs(evals.max().item()) < 1e-10
    assert math.isclose(sorted(evals.tolist())[-2], -1.0, rel_tol=1e-9)
    # nearby grey levels exchange faster than distant ones
    q = graph.rate_matrix()
    assert q[4, 5] > q[4, 7] >= 0


def test_ordinal_graph_rejects_bad_options():
    with pytest.raises(ValueError, match="kind"):
        ordinal_graph(5, "cubic")
    with pytest.raises(ValueError, match="bandwidth"):
        ordinal_graph(5, "gaussian", bandwidth=-1.0)
