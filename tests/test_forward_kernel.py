"""transition_column and apply_kernel against the dense kernel K(tau) = expm(tau Q)."""

import pytest
import torch

import cdm_kernels as ck
from exact import small_graphs


def random_tau(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(shape, dtype=torch.float64).uniform_(-9, 3, generator=gen))  # 1e-4 .. 20


@pytest.mark.parametrize("n", [2, 5, 17])
@pytest.mark.parametrize("lead", [(), (1,), (3, 7)])
def test_transition_column_matches_dense_kernel(backend, n, lead):
    for graph in small_graphs(n):
        x = torch.randint(0, n, lead)
        tau = random_tau(lead)
        column = ck.transition_column(graph, x, tau, backend=backend)
        assert column.shape == (*lead, n) and column.dtype == torch.float64
        for index in torch.cartesian_prod(*[torch.arange(s) for s in lead]).reshape(-1, len(lead)) if lead else [()]:
            index = tuple(index.tolist()) if lead else ()
            expected = graph.kernel(tau[index].item())[:, x[index]]
            assert torch.allclose(column[index], expected, atol=1e-9), (graph, index)


def test_transition_column_float_tau_gives_float32(backend):
    graph = ck.UniformGraph(1000)
    x = torch.randint(0, 1000, (4, 3), dtype=torch.int32)
    column = ck.transition_column(graph, x, 0.5, backend=backend)
    assert column.dtype == torch.float32
    expected = graph.kernel(0.5)[:, x.long()].permute(1, 2, 0).float()
    assert torch.allclose(column, expected, rtol=1e-6, atol=1e-9)


def spectral_spread(graph) -> float:
    """How fast the fastest mode decays: K(-tau) amplifies rounding by e^{tau * spread}."""
    if graph.family != "dense":
        return 1.0
    evals = graph.spectral()[0]
    return (evals.max() - evals.min()).item()


@pytest.mark.parametrize("n", [2, 17])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_apply_kernel_matches_dense_kernel_and_inverts(backend, n, dtype):
    for graph in small_graphs(n):
        v = torch.randn(5, 3, n, dtype=dtype)
        amplification = 1e6 if dtype == torch.float64 else 1e2  # what the round trip below can afford
        tau = random_tau((5, 3), seed=1).clamp(max=torch.log(torch.tensor(amplification)).item() / spectral_spread(graph))
        pushed = ck.apply_kernel(graph, v, tau.to(dtype), backend=backend)
        expected = torch.stack(
            [torch.stack([graph.kernel(tau[i, j].item()).T @ v[i, j].double() for j in range(3)]) for i in range(5)]
        )
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        assert torch.allclose(pushed.double(), expected, rtol=tol, atol=tol * 10), graph
        back = ck.apply_kernel(graph, pushed, -tau.to(dtype), backend=backend)
        inverse_tol = 1e-8 if dtype == torch.float64 else 1e-2
        assert torch.allclose(back.double(), v.double(), atol=inverse_tol), graph


def test_apply_kernel_gradient(backend):
    for graph in small_graphs(5):
        v = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        tau = torch.tensor([0.1, 1.0, 3.0], dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda v: ck.apply_kernel(graph, v, tau, backend=backend), (v,))


def test_apply_kernel_preserves_mass_forward(backend):
    # K^T of a probability vector is a probability vector
    for graph in small_graphs(17):
        p = torch.softmax(torch.randn(6, 17, dtype=torch.float64), -1)
        out = ck.apply_kernel(graph, p, 2.5, backend=backend)
        assert torch.allclose(out.sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-10)
        assert (out > -1e-12).all()


@pytest.mark.parametrize("n", [1000, 50257])
def test_large_vocabulary_closed_forms(backend, n):
    x = torch.tensor([0, n - 1, n // 2])
    tau = torch.tensor([1e-3, 1.0, 10.0], dtype=torch.float64)
    alpha, one_minus_alpha = torch.exp(-tau)[:, None], -torch.expm1(-tau)[:, None]
    onehot = torch.nn.functional.one_hot(x, n).double()
    uniform = ck.transition_column(ck.UniformGraph(n), x, tau, backend=backend)
    assert torch.allclose(uniform, alpha * onehot + one_minus_alpha / n, rtol=1e-12, atol=0)
    absorbing = ck.transition_column(ck.AbsorbingGraph(n), x, tau, backend=backend)
    expected = alpha * onehot
    expected[1] = one_minus_alpha[1]  # x = mask: reached from everywhere
    expected[1, -1] = 1.0
    assert torch.allclose(absorbing, expected, rtol=1e-12, atol=0)
