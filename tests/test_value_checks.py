"""The value checks the C++ CPU kernels make inside their own pass (csrc/value_checks.h).

For the ops of ``KERNEL_CHECKS["cpp"]`` the fronts leave the scans of the ``(P, N)``
inputs to the kernels, which raise the same ValueError as the eager checks of the other
backends, after their pass. Every place a bad value can hide is covered: each layout of
the CPU kernels (lanes rows of <= 96 states, long rows, dense graphs), the entry at x
(which the inversion overwrites), the mask entry, rows the kernel otherwise never reads
(unmasked absorbing positions), each input dtype, and the switch (set_value_checks).
Tests taking ``backend`` run on the reference too (tests/conftest.py): the same messages.
"""

import pytest
import torch

import cdm_kernels as ck
from cdm_kernels.graphs import AbsorbingGraph, UniformGraph, ordinal_graph
from cdm_kernels.ops._validation import KERNEL_CHECKS

pytestmark = pytest.mark.skipif("cpp" not in ck.available_backends(torch.device("cpu")), reason="no cpp backend")

SIZES = (7, 96, 97, 1029)  # lanes layout up to 96 states, rows above
BAD = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def make_graph(family, n):
    return {"uniform": UniformGraph, "absorbing": AbsorbingGraph}[family](n) if family != "dense" else ordinal_graph(n)


def cases():
    for family in ("uniform", "absorbing"):
        for n in SIZES:
            yield family, n
    yield "dense", 7


def inputs(graph, positions=21, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = graph.num_states
    ls = (torch.randn(positions, n, generator=g) * 2).to(dtype)
    x = torch.randint(0, n, (positions,), generator=g)
    if graph.family_id == 1:
        x[::2] = n - 1  # half the positions masked; the others are never read by the inversion
    return ls, x


def where_to_poison(graph, x):
    """(position, state) pairs: a plain entry, the entry at x, the mask entry, an unmasked absorbing row."""
    n = graph.num_states
    spots = [(0, (int(x[0]) + 1) % n), (1, int(x[1])), (2, n - 1)]
    if graph.family_id == 1:
        spots.append((1, 0))  # x[1] != mask: this row's scores are never used
    return spots


def test_the_kernels_scan_the_ops_that_matter():
    assert {"scores_to_posterior", "fused_euler_step", "conditional_matching_loss"} <= set(KERNEL_CHECKS["cpp"])


@pytest.mark.parametrize("family, n", list(cases()))
@pytest.mark.parametrize("bad", list(BAD))
def test_scores_to_posterior_and_step_name_bad_scores(family, n, bad, backend):
    graph = make_graph(family, n)
    ls, x = inputs(graph)
    for p, a in where_to_poison(graph, x):
        poisoned = ls.clone()
        poisoned[p, a] = BAD[bad]
        with pytest.raises(ValueError, match="log_score contains NaN or inf"):
            ck.scores_to_posterior(graph, poisoned, x, 0.7, backend=backend)
        with pytest.raises(ValueError, match="log_score contains NaN or inf"):
            ck.fused_euler_step(graph, poisoned, x, 0.7, 0.3, backend=backend)
        with pytest.raises(ValueError, match="log_score contains NaN or inf"):
            ck.fused_euler_step(graph, poisoned, x, 0.7, 0.3, method="euler", backend=backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_every_dtype_is_scanned(dtype):
    for graph in (UniformGraph(1029), AbsorbingGraph(50)):
        ls, x = inputs(graph, dtype=dtype)
        ls[3, 5] = float("nan")
        with pytest.raises(ValueError, match="log_score contains NaN or inf"):
            ck.scores_to_posterior(graph, ls, x, 0.7, backend="cpp")
        with pytest.raises(ValueError, match="log_score contains NaN or inf"):
            ck.fused_euler_step(graph, ls, x, 0.7, 0.0, backend="cpp")


@pytest.mark.parametrize("family, n", list(cases()))
def test_posterior_to_scores_allows_minus_inf_only(family, n, backend):
    graph = make_graph(family, n)
    ls, x = inputs(graph)
    log_p0 = torch.log_softmax(ls, -1)
    log_p0[4, (int(x[4]) + 2) % n] = float("-inf")  # probability 0: a value, not an error
    assert ck.posterior_to_scores(graph, log_p0, x, 0.7, backend=backend).shape == log_p0.shape
    for bad in ("nan", "+inf"):
        poisoned = log_p0.clone()
        poisoned[1, int(x[1])] = BAD[bad]
        with pytest.raises(ValueError, match="log_p0 contains NaN or inf"):
            ck.posterior_to_scores(graph, poisoned, x, 0.7, backend=backend)


def loss_inputs(graph):
    ls, x = inputs(graph)
    n = graph.num_states
    target = torch.softmax(torch.randn(ls.shape, generator=torch.Generator().manual_seed(3)), -1)
    if graph.family_id == 1:  # consistent with the graph: one-hot off the mask, no mass on the mask
        target[:, n - 1] = 0
        target /= target.sum(-1, keepdim=True)
        unmasked = x != n - 1
        target[unmasked] = torch.nn.functional.one_hot(x[unmasked], n).float()
    return ls, x, target


@pytest.mark.parametrize("family, n", list(cases()))
def test_loss_names_bad_scores_and_targets(family, n, backend):
    graph = make_graph(family, n)
    ls, x, target = loss_inputs(graph)
    assert torch.isfinite(ck.conditional_matching_loss(graph, ls, x, 0.7, target, backend=backend))
    for p, a in where_to_poison(graph, x):
        for bad in BAD.values():
            poisoned = ls.clone()
            poisoned[p, a] = bad
            with pytest.raises(ValueError, match="student_log_score contains NaN or inf"):
                ck.conditional_matching_loss(graph, poisoned, x, 0.7, target, backend=backend)
            bad_target = target.clone()
            bad_target[p, a] = bad
            with pytest.raises(ValueError, match="target contains NaN or inf"):
                ck.conditional_matching_loss(graph, ls, x, 0.7, bad_target, backend=backend)
        negative = target.clone()
        negative[p, (a + 1) % n] += negative[p, a] + 0.5  # still sums to 1
        negative[p, a] = -0.5
        with pytest.raises(ValueError, match=r"target must be probabilities \(non-negative\)"):
            ck.conditional_matching_loss(graph, ls, x, 0.7, negative, backend=backend)
        off = target.clone()
        off[p] *= 1.02
        with pytest.raises(ValueError, match="target rows must sum to 1"):
            ck.conditional_matching_loss(graph, ls, x, 0.7, off, backend=backend)
    within = target.clone()
    within[0] *= 1.005  # inside the 1e-2 tolerance
    ck.conditional_matching_loss(graph, ls, x, 0.7, within, backend=backend)


def test_the_switch_turns_the_kernel_checks_off_and_on():
    graph = UniformGraph(1029)
    ls, x = inputs(graph)
    ls[2, 3] = float("nan")
    ck.set_value_checks(False)
    try:
        out = ck.scores_to_posterior(graph, ls, x, 0.7, backend="cpp")  # no check: NaN flows through
        assert torch.isnan(out[2]).any() and torch.isfinite(out[0]).all()
        ck.fused_euler_step(graph, ls, x, 0.7, 0.3, backend="cpp")
    finally:
        ck.set_value_checks(True)
    with pytest.raises(ValueError, match="log_score contains NaN or inf"):
        ck.scores_to_posterior(graph, ls, x, 0.7, backend="cpp")


def test_backward_passes_are_not_rechecked():
    """The backward trusts what its forward checked: a grad with NaN flows through."""
    graph = UniformGraph(97)
    ls, x = inputs(graph)
    ls.requires_grad_(True)
    out = ck.scores_to_posterior(graph, ls, x, 0.7, backend="cpp")
    grad = torch.zeros_like(out)
    grad[0, 0] = float("nan")
    (g,) = torch.autograd.grad(out, ls, grad)
    assert torch.isnan(g[0]).any() and torch.isfinite(g[1:]).all()


def test_clean_inputs_give_what_the_unchecked_kernels_give():
    """The checks only read: with them on and off the outputs agree bit for bit."""
    for graph in (UniformGraph(1029), AbsorbingGraph(97), UniformGraph(17)):
        ls, x, target = loss_inputs(graph)
        gen = torch.Generator().manual_seed(5)
        checked = (ck.scores_to_posterior(graph, ls, x, 0.7, backend="cpp"),
                   ck.fused_euler_step(graph, ls, x, 0.7, 0.3, generator=gen, backend="cpp"),
                   ck.conditional_matching_loss(graph, ls, x, 0.7, target, reduction="none", backend="cpp"))
        ck.set_value_checks(False)
        try:
            gen = torch.Generator().manual_seed(5)
            unchecked = (ck.scores_to_posterior(graph, ls, x, 0.7, backend="cpp"),
                         ck.fused_euler_step(graph, ls, x, 0.7, 0.3, generator=gen, backend="cpp"),
                         ck.conditional_matching_loss(graph, ls, x, 0.7, target, reduction="none", backend="cpp"))
        finally:
            ck.set_value_checks(True)
        for a, b in zip(checked, unchecked):
            assert torch.equal(a, b)
