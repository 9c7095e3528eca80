"""The Triton backend against the reference (the spec).

Without a GPU the kernels run under Triton's CPU interpreter (tests/conftest.py
sets TRITON_INTERPRET=1) with one small fixed block config, so the vocabulary
loops run several times on these small odd shapes. Errors are measured against
the reference in float64 ("truth", on the same quantised inputs) and must stay
within ~2x of the reference's own error in the same dtype. ``test_aot_compile``
compiles every kernel launched here, with the signatures and constexprs
actually used, for Hopper (sm_90), so a kernel that would not lower fails.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import cdm_kernels as ck
from cdm_kernels import reference
from cdm_kernels.graphs import ABSORBING

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    "triton" not in ck.available_backends(DEVICE), reason="the Triton backend is not available here"
)

#: P in {1, 7}, N in {2, 17, 130}: with the interpreter's 32-wide blocks, N = 130 loops five times
SHAPES = [(1, 2), (7, 17), (1, 130), (7, 130)]
FAMILIES = ["uniform", "absorbing", "ordinal"]
DTYPES = [torch.float32, torch.bfloat16]
#: absolute slack on top of "2x the reference's own error", per dtype, relative to the output scale
SLACK = {torch.float32: 2e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float64: 1e-9}


@functools.lru_cache(maxsize=None)
def make_graph(family: str, n: int):
    """Graphs are immutable; dense ones are worth caching (an eigendecomposition each)."""
    if family == "uniform":
        return ck.UniformGraph(n)
    if family == "absorbing":
        return ck.AbsorbingGraph(n)
    return ck.ordinal_graph(n)


def make_inputs(graph, p: int, seed: int):
    """Scores, tokens (absorbing: mostly the mask) and noise levels."""
    gen = torch.Generator().manual_seed(seed)
    n = graph.num_states
    log_score = 1.5 * torch.randn(p, n, generator=gen, dtype=torch.float64)
    x = torch.randint(0, n, (p,), generator=gen)
    if graph.family_id == ABSORBING:
        x = torch.where(torch.rand(p, generator=gen) < 0.6, torch.full_like(x, n - 1), x)
    tau = 0.05 + 1.5 * torch.rand(p, generator=gen, dtype=torch.float64)
    return log_score, x, tau


def to_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def max_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest absolute error over the entries finite in ``truth``; ``-inf`` (and
    ``inf``) must sit exactly where the truth has them."""
    value = value.detach().double().cpu()
    truth = truth.detach().double().cpu()
    finite = torch.isfinite(truth)
    assert torch.equal(value[~finite], truth[~finite]), "infinite entries differ from the reference"
    if not finite.any():
        return 0.0
    diff = (value[finite] - truth[finite]).abs()
    assert torch.isfinite(diff).all(), "non-finite values where the reference is finite"
    return diff.max().item()


def assert_within(ours, ref_low, truth, dtype, what=""):
    """``ours`` is at most ~2x as far from ``truth`` as the reference run in ``dtype``."""
    finite = torch.isfinite(truth)
    scale = max(1.0, truth[finite].abs().max().item()) if finite.any() else 1.0
    err = max_error(ours, truth)
    ref_err = max_error(ref_low, truth) if ref_low is not None and torch.isfinite(ref_low[finite]).all() else 0.0
    bound = 2.0 * ref_err + SLACK[dtype] * scale
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (reference in {dtype}: {ref_err:.3g})"


# ----------------------------------------------------------------------------- transition_column, apply_kernel


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("p,n", SHAPES)
def test_transition_column(family, p, n):
    graph = make_graph(family, n)
    _, x, tau = make_inputs(graph, p, seed=1)
    x, tau = to_device(x, tau)
    for out64 in (False, True):
        t = tau if out64 else tau.float()
        ours = ck.transition_column(graph, x, t, backend="triton")
        assert ours.dtype == (torch.float64 if out64 else torch.float32)
        truth = reference.transition_column(graph, x.cpu(), tau.cpu(), torch.float64)
        low = reference.transition_column(graph, x.cpu(), tau.cpu(), ours.dtype)
        assert_within(ours, low, truth, ours.dtype, "transition_column")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("p,n", SHAPES)
def test_apply_kernel(family, p, n, dtype):
    graph = make_graph(family, n)
    v, _, tau = make_inputs(graph, p, seed=2)
    tau = torch.where(torch.arange(p) % 2 == 1, -0.3 * tau, tau)  # negative tau: the inverse
    v = v.to(dtype)
    grad = torch.randn(p, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    vd, taud, gradd = to_device(v, tau, grad)
    vd.requires_grad_(True)
    ours = ck.apply_kernel(graph, vd, taud, backend="triton")
    (ours_grad,) = torch.autograd.grad(ours, vd, gradd)
    v64 = v.double().requires_grad_(True)
    truth = reference.apply_kernel(graph, v64, tau)
    (truth_grad,) = torch.autograd.grad(truth, v64, grad.double())
    vl = v.clone().requires_grad_(True)
    low = reference.apply_kernel(graph, vl, tau)
    (low_grad,) = torch.autograd.grad(low, vl, grad)
    assert ours.dtype == dtype and ours_grad.dtype == dtype
    assert_within(ours, low, truth, dtype, "apply_kernel")
    assert_within(ours_grad, low_grad, truth_grad, dtype, "apply_kernel backward")


# ----------------------------------------------------------------------------- the inversion and its inverse


def _posterior_case(family, p, n, dtype, seed):
    graph = make_graph(family, n)
    log_score, x, tau = make_inputs(graph, p, seed)
    if family == "ordinal":
        tau = 0.3 * tau  # the eigenbasis inversion amplifies rounding by e^{tau |lambda|}
    grad = torch.randn(p, n, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    return graph, log_score.to(dtype), x, tau, grad.to(dtype)


def _run_both(fn_ours, fn_ref, inp, grad, dtype):
    """(ours, ours_grad), (truth, truth_grad), (low, low_grad) of a (P, N) -> (P, N) op."""
    ind = inp.to(DEVICE).requires_grad_(True)
    ours = fn_ours(ind)
    (ours_grad,) = torch.autograd.grad(ours, ind, grad.to(DEVICE))
    results = [(ours, ours_grad)]
    for d in (torch.float64, dtype):
        i = inp.to(d).requires_grad_(True)
        out = fn_ref(i)
        (g,) = torch.autograd.grad(out, i, grad.to(d))
        results.append((out, g))
    return results


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("p,n", SHAPES)
def test_scores_to_posterior(family, p, n, dtype):
    graph, log_score, x, tau, grad = _posterior_case(family, p, n, dtype, seed=4)
    xd, taud = to_device(x, tau)
    (ours, ours_g), (truth, truth_g), (low, low_g) = _run_both(
        lambda s: ck.scores_to_posterior(graph, s, xd, taud, backend="triton"),
        lambda s: reference.scores_to_posterior(graph, s, x, tau),
        log_score, grad, dtype,
    )
    assert ours.dtype == dtype
    assert_within(ours, low, truth, dtype, "scores_to_posterior")
    assert_within(ours_g, low_g, truth_g, dtype, "scores_to_posterior backward")


def test_scores_to_posterior_clamps():
    """Scores whose inversion goes negative: clamped at the floor, renormalised."""
    graph = ck.UniformGraph(17)
    p = 5
    log_score = torch.full((p, 17), -6.0, dtype=torch.float64)
    log_score[:, 3] = 4.0  # one dominant state: u = r - beta S < 0 for the rest at large tau
    x = torch.tensor([0, 3, 5, 16, 3])
    tau = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    grad = torch.randn(p, 17, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    xd, taud = to_device(x, tau)
    (ours, ours_g), (truth, truth_g), (low, low_g) = _run_both(
        lambda s: ck.scores_to_posterior(graph, s, xd, taud, backend="triton"),
        lambda s: reference.scores_to_posterior(graph, s, x, tau),
        log_score.float(), grad.float(), torch.float32,
    )
    assert (truth < -15).any(), "the case should clamp"
    assert_within(ours, low, truth, torch.float32, "clamped scores_to_posterior")
    assert_within(ours_g, low_g, truth_g, torch.float32, "clamped scores_to_posterior backward")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("p,n", SHAPES)
def test_posterior_to_scores(family, p, n, dtype):
    graph, log_score, x, tau, grad = _posterior_case(family, p, n, dtype, seed=6)
    log_p0 = reference.scores_to_posterior(graph, log_score.double(), x, tau).to(dtype)
    xd, taud = to_device(x, tau)
    (ours, ours_g), (truth, truth_g), (low, low_g) = _run_both(
        lambda q: ck.posterior_to_scores(graph, q, xd, taud, backend="triton"),
        lambda q: reference.posterior_to_scores(graph, q, x, tau),
        log_p0, grad, dtype,
    )
    assert ours.dtype == dtype
    assert_within(ours, low, truth, dtype, "posterior_to_scores")
    assert_within(ours_g, low_g, truth_g, dtype, "posterior_to_scores backward")


# ----------------------------------------------------------------------------- the loss


def _target(graph, p, seed):
    gen = torch.Generator().manual_seed(seed)
    n = graph.num_states
    target = torch.softmax(2 * torch.randn(p, n, generator=gen, dtype=torch.float64), -1)
    zeros = torch.rand(p, n, generator=gen) < 0.2
    zeros[:, 0] = False  # state 0 is real in every family: rows keep mass
    target = torch.where(zeros, 0.0, target)  # some exact zeros
    return target


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("p,n", SHAPES)
def test_conditional_matching_loss(family, p, n, dtype):
    graph, log_score, x, tau, _ = _posterior_case(family, p, n, dtype, seed=7)
    target = _target(graph, p, seed=8)
    if family == "absorbing":  # no mass on structural zeros (that case is test_loss_structural_zero)
        target[:, -1] = 0.0
        onehot = torch.nn.functional.one_hot(x, n).double()
        target = torch.where((x == n - 1).unsqueeze(-1), target, onehot)
    target = (target / target.sum(-1, keepdim=True)).to(dtype)
    grad = torch.rand(p, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.5
    xd, taud, targetd = to_device(x, tau, target)
    ind = log_score.to(DEVICE).requires_grad_(True)
    ours = ck.conditional_matching_loss(graph, ind, xd, taud, targetd, reduction="none", backend="triton")
    (ours_g,) = torch.autograd.grad(ours, ind, grad.float().to(DEVICE))
    assert ours.dtype == torch.float32 and ours.shape == (p,)
    refs = []
    for d in (torch.float64, dtype):
        i = log_score.to(d).requires_grad_(True)
        out = reference.conditional_matching_loss(graph, i, x, tau, target.to(d))
        (g,) = torch.autograd.grad(out, i, grad.to(d))
        refs.append((out, g))
    (truth, truth_g), (low, low_g) = refs
    slack_dtype = torch.float32 if dtype == torch.float32 else dtype
    assert_within(ours, low, truth, slack_dtype, "loss")
    assert_within(ours_g, low_g, truth_g, dtype, "loss backward")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided", "expanded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_gradient_written_in_the_forward(family, layout, reduction):
    """The gradient the forward kernel writes, scaled in backward, on views of odd shapes and
    every reduction: within 2x the reference's own error in float32 and bf16."""
    from layouts import view_of

    graph = make_graph(family, 17)
    for dtype in DTYPES:
        log_score, x, tau = make_inputs(graph, 6, seed=21)
        target = _target(graph, 6, seed=22)
        if family == "absorbing":
            target[:, -1] = 0.0
            target = torch.where((x == 16).unsqueeze(-1), target, torch.nn.functional.one_hot(x, 17).double())
        target = (target / target.sum(-1, keepdim=True)).to(dtype).view(2, 3, 17)
        x, tau = x.view(2, 3), tau.view(2, 3)
        leaf = log_score.to(dtype).view(2, 3, 17).to(DEVICE).requires_grad_(True)
        ours = ck.conditional_matching_loss(graph, view_of(leaf, layout), *to_device(x, tau, target),
                                            reduction=reduction, backend="triton")
        cotangent = torch.rand(ours.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
        (ours_g,) = torch.autograd.grad(ours, leaf, cotangent.float().to(DEVICE))
        refs = []
        for d in (torch.float64, dtype):
            i = leaf.detach().cpu().to(d).requires_grad_(True)
            out = reference.conditional_matching_loss(graph, view_of(i, layout).contiguous(), x, tau, target.to(d))
            out = {"mean": out.mean(), "sum": out.sum(), "none": out}[reduction]
            refs.append(torch.autograd.grad(out, i, cotangent.to(out.dtype))[0])
        assert ours_g.dtype == dtype
        assert_within(ours_g.cpu(), refs[1], refs[0], dtype, f"{family} {dtype} {layout} {reduction}")


def test_loss_backward_only_scales_the_saved_gradient():
    """With grad the forward runs the loss-with-gradient op and keeps one (P, N) gradient
    (not the scores); the backward launches no Triton kernel; without grad no gradient is made;
    no double backward."""
    from test_conditional_matching_loss import _Calls, _fused_node

    graph = make_graph("uniform", 17)
    log_score, x, tau = to_device(*make_inputs(graph, 5, seed=23))
    target = torch.softmax(torch.randn_like(log_score), -1)
    scores = log_score.float().requires_grad_(True)
    with _Calls() as forward:
        loss = ck.conditional_matching_loss(graph, scores, x, tau, target, reduction="none", backend="triton")
    assert [n for n in forward.names if n.startswith("cdm_kernels")] == [
        "cdm_kernels.triton_conditional_matching_loss_with_grad.default"]
    (saved,) = _fused_node(loss).saved_tensors
    assert saved.shape == scores.shape and saved.data_ptr() != scores.data_ptr()
    written = saved.clone()
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss.sum(), scores, create_graph=True)
    with _Calls() as backward:
        (grad,) = torch.autograd.grad(loss, scores, torch.full((5,), 0.25, device=DEVICE))
    assert not [n for n in backward.names if n.startswith("cdm_kernels")]
    assert torch.allclose(grad, 0.25 * written) and grad.data_ptr() == saved.data_ptr()
    with torch.no_grad(), _Calls() as inference:
        ck.conditional_matching_loss(graph, scores, x, tau, target, backend="triton")
    assert [n for n in inference.names if n.startswith("cdm_kernels")] == [
        "cdm_kernels.triton_conditional_matching_loss.default"]


def test_loss_structural_zero():
    """Target mass on a structural zero of the absorbing conditional: ``inf``, as the reference."""
    graph = ck.AbsorbingGraph(9)
    log_score = torch.randn(3, 9)
    x = torch.tensor([8, 2, 8])
    target = torch.full((3, 9), 1.0 / 9)
    ours = ck.conditional_matching_loss(graph, *to_device(log_score, x), 0.7, target.to(DEVICE), reduction="none",
                                        backend="triton")
    truth = reference.conditional_matching_loss(graph, log_score, x, torch.full((3,), 0.7, dtype=torch.float64), target)
    assert torch.isinf(truth).all() and torch.equal(ours.cpu(), truth.float())


# ----------------------------------------------------------------------------- sampling


def _uniforms(p: int, seed: int, offset: int) -> torch.Tensor:
    """What ``tl.rand(seed, offset + p)`` returns for every position (the kernels' draw)."""
    import triton
    import triton.language as tl

    @triton.jit
    def draw(out_ptr, P, seed, offset, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + rows, tl.rand(seed, offset + rows.to(tl.int64)), mask=rows < P)

    out = torch.empty(p, dtype=torch.float32, device=DEVICE)
    draw[(triton.cdiv(p, 1024),)](out, p, seed, offset, BLOCK=1024)
    return out.cpu()


def _step_case(family, p, n, seed):
    graph = make_graph(family, n)
    log_score, x, tau_t = make_inputs(graph, p, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    tau_s = tau_t * torch.rand(p, generator=gen, dtype=torch.float64)
    tau_s = torch.where(torch.rand(p, generator=gen) < 0.25, 0.0, tau_s)  # some final steps
    if family == "ordinal":
        tau_t, tau_s = 0.3 * tau_t, 0.3 * tau_s
    return graph, log_score.float(), x, tau_t, tau_s


@pytest.mark.parametrize("method", ["analytic", "euler"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("p,n", [(7, 17), (5, 130)])
def test_euler_step_inverse_cdf(family, p, n, method):
    """Each position's draw is the inverse CDF of the reference's step probabilities at
    ``tl.rand(seed, offset + p)``: exactly, away from rounding-level ties."""
    graph, log_score, x, tau_t, tau_s = _step_case(family, p, n, seed=10)
    seed, offset = 2**40 + 12345, 77
    ours = torch.ops.cdm_kernels.triton_fused_euler_step(
        *graph.descriptor(DEVICE), *to_device(log_score, x, tau_t, tau_s), 0 if method == "analytic" else 1,
        torch.tensor([seed, offset], dtype=torch.int64),
    ).cpu()
    probs = reference.step_probabilities(graph, log_score.double(), x, tau_t, tau_s, method)
    cdf = probs.cumsum(-1)
    target = _uniforms(p, seed, offset).double() * cdf[:, -1]
    expected = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1).clamp_max(n - 1)
    assert (probs.gather(-1, ours.unsqueeze(-1)) > 0).all(), "drew a zero-probability state"
    near_tie = (cdf - target.unsqueeze(-1)).abs().min(-1).values < 1e-5
    assert torch.equal(ours[~near_tie], expected[~near_tie]), f"{ours} != {expected}"


@pytest.mark.parametrize("method", ["analytic", "euler"])
@pytest.mark.parametrize("family", FAMILIES)
def test_euler_step_distribution(family, method, monkeypatch):
    """Chi-square of 20000 draws per row against ``reference.step_probabilities``."""
    from cdm_kernels.triton_kernels import _common

    monkeypatch.setitem(_common.INTERPRET_BLOCKS, "BLOCK_P", 2048)  # big programs: fast under the interpreter
    monkeypatch.setitem(_common.INTERPRET_BLOCKS, "BLOCK_N", 8)
    monkeypatch.setattr(_common, "INTERPRET_DENSE_BLOCKS", {"BLOCK_P": 2048, "BLOCK_I": 16, "BLOCK_J": 16})
    rows, n, draws = 3, 13, 20000
    graph, log_score, x, tau_t, tau_s = _step_case(family, rows, n, seed=11)
    x[0] = n - 1  # absorbing: a masked position; tau_s = 0 on one row, positive on another
    tau_s[1], tau_s[2] = 0.0, 0.5 * tau_t[2]
    probs = reference.step_probabilities(graph, log_score.double(), x, tau_t, tau_s, method)
    rep = lambda t: t.repeat_interleave(draws, 0)  # noqa: E731
    gen = torch.Generator().manual_seed(12)
    draws_out = ck.fused_euler_step(graph, *to_device(rep(log_score), rep(x), rep(tau_t), rep(tau_s)),
                                    method=method, generator=gen, backend="triton").cpu().view(rows, draws)
    for row in range(rows):
        counts = torch.bincount(draws_out[row], minlength=n).double()
        expected = probs[row] * draws
        assert (counts[expected == 0] == 0).all(), "drew a zero-probability state"
        keep = expected > 0
        if keep.sum() < 2:
            continue
        chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
        dof = int(keep.sum()) - 1
        # 5 standard deviations above the mean of a chi-square with dof degrees of freedom
        assert chi2 < dof + 5 * math.sqrt(2 * dof) + 10, f"row {row}: chi2 {chi2:.1f} with {dof} dof"


@pytest.mark.parametrize("family", FAMILIES)
def test_euler_step_matches_cpp(family):
    """Same Philox stream, same inverse CDF: the C++ CPU backend draws the same states."""
    if (
        DEVICE != "cpu"
        or "cpp" not in ck.available_backends("cpu")
        or not torch._C._dispatch_has_kernel_for_dispatch_key("cdm_kernels::fused_euler_step", "CPU")
    ):
        pytest.skip("needs the C++ CPU fused_euler_step and the interpreter")
    graph, log_score, x, tau_t, tau_s = _step_case(family, 32, 130, seed=13)
    for method in (0, 1):
        for dtype in DTYPES:
            args = (*graph.descriptor("cpu"), log_score.to(dtype), x, tau_t, tau_s, method,
                    torch.tensor([2**35 + 5, 3]))
            ours = torch.ops.cdm_kernels.triton_fused_euler_step(*args)
            theirs = torch.ops.cdm_kernels.fused_euler_step(*args)
            # identical up to rounding-level ties of the two accumulation orders
            assert (ours == theirs).float().mean() > 0.95, (method, dtype, ours, theirs)


def _one_big_many_small(small: int, big_mass: float = 1 - 1e-3):
    """An absorbing graph whose masked position draws (``tau_s = 0``: from the softmax
    of its scores) state 0 with ``big_mass`` and ``small`` states sharing the rest,
    far below float32's resolution next to the first state's mass."""
    n = small + 2  # state 0, the small ones, the mask
    graph = make_graph("absorbing", n)
    scores = torch.full((n,), math.log((1 - big_mass) / small))
    scores[0] = math.log(big_mass)
    scores[-1] = 0.0
    return graph, scores


@pytest.mark.parametrize("method", ["analytic", "euler"])
@pytest.mark.parametrize("one_block", [True, False])
def test_sampling_precision_large_vocabulary(method, one_block, monkeypatch):
    """One state with 1 - 1e-3 of the mass first, 4095 sharing 1e-3 after it (each
    ~2.4e-7 of the row, ~4 float32 ulps of the running CDF there): the float64
    running sum of the sampling rule draws each small state where the float64
    inverse CDF puts it (to a neighbour: the float32 masses themselves carry that
    much rounding), and the small states at their rate. (The interpreter makes
    50,000 small states too slow; 4095 already sit below float32's resolution.)"""
    from cdm_kernels.triton_kernels import _common

    graph, scores = _one_big_many_small(4095)
    n = graph.num_states
    monkeypatch.setitem(_common.INTERPRET_BLOCKS, "BLOCK_N", 8192 if one_block else 1024)
    monkeypatch.setitem(_common.INTERPRET_BLOCKS, "BLOCK_P", 1)
    tau_t = torch.tensor([1.0], dtype=torch.float64)
    x = torch.tensor([n - 1])
    probs = reference.step_probabilities(graph, scores.double()[None], x, tau_t, torch.zeros(1, dtype=torch.float64),
                                         method)[0]
    cdf = probs.cumsum(0)
    seed = 2**33 + 7
    uniforms = _uniforms(1 << 16, seed, 0).double()
    chosen = torch.nonzero(uniforms > 1 - 1e-3).flatten()[:24]  # the draws that land among the small states
    assert len(chosen) >= 24
    for offset in chosen.tolist():
        draw = torch.ops.cdm_kernels.triton_fused_euler_step(
            *graph.descriptor(DEVICE), *to_device(scores[None], x, tau_t, torch.zeros(1, dtype=torch.float64)),
            0 if method == "analytic" else 1, torch.tensor([seed, offset]))
        expected = int(torch.searchsorted(cdf, uniforms[offset] * cdf[-1], right=True))
        assert 1 <= int(draw) <= n - 2, f"u = {uniforms[offset]:.9f} drew state {int(draw)}, not a small one"
        assert abs(int(draw) - expected) <= 1, f"u = {uniforms[offset]:.9f}: drew {int(draw)}, expected {expected}"


def test_sampling_rate_of_the_small_states(monkeypatch):
    """8192 draws of the row above (the analytic step; the Euler step draws from the
    same scan): the small states' share within Poisson noise of 1e-3."""
    from cdm_kernels.triton_kernels import _common

    graph, scores = _one_big_many_small(4095)
    monkeypatch.setitem(_common.INTERPRET_BLOCKS, "BLOCK_N", 8192)
    monkeypatch.setitem(_common.INTERPRET_BLOCKS, "BLOCK_P", 128)
    draws = 8192
    log_score = scores.expand(draws, -1)  # a broadcast view: one row, drawn 8192 times
    x = torch.full((draws,), graph.num_states - 1)
    out = ck.fused_euler_step(graph, *to_device(log_score, x), 1.0, 0.0,
                              generator=torch.Generator().manual_seed(23), backend="triton").cpu()
    small = int(((out > 0) & (out < graph.num_states - 1)).sum())
    expected = 1e-3 * draws
    assert (out < graph.num_states - 1).all(), "drew the mask at tau_s = 0"
    assert abs(small - expected) <= 5 * math.sqrt(expected) + 1, f"{small} small draws, expected {expected:.1f}"


# ----------------------------------------------------------------------------- other dtypes, long rows


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("family", FAMILIES)
def test_other_dtypes(family, dtype):
    """float16 storage (float32 math) and float64 storage (float64 math)."""
    graph, log_score, x, tau, grad = _posterior_case(family, 7, 17, dtype, seed=15)
    xd, taud = to_device(x, tau)
    (ours, ours_g), (truth, truth_g), (low, low_g) = _run_both(
        lambda s: ck.scores_to_posterior(graph, s, xd, taud, backend="triton"),
        lambda s: reference.scores_to_posterior(graph, s, x, tau),
        log_score, grad, dtype,
    )
    assert ours.dtype == dtype and ours_g.dtype == dtype
    assert_within(ours, low, truth, dtype, "scores_to_posterior")
    assert_within(ours_g, low_g, truth_g, dtype, "scores_to_posterior backward")


def test_large_vocabulary(monkeypatch):
    """A vocabulary far wider than one block (interpreter blocks widened to stay fast)."""
    from cdm_kernels.triton_kernels import _common

    monkeypatch.setitem(_common.INTERPRET_BLOCKS, "BLOCK_N", 16384)
    graph = ck.UniformGraph(100003)
    log_score, x, tau = make_inputs(graph, 2, seed=16)
    log_score = log_score.float()
    xd, taud, sd = to_device(x, tau, log_score)
    ours = ck.scores_to_posterior(graph, sd, xd, taud, backend="triton")
    truth = reference.scores_to_posterior(graph, log_score.double(), x, tau)
    low = reference.scores_to_posterior(graph, log_score, x, tau)
    assert_within(ours, low, truth, torch.float32, "scores_to_posterior, N = 100003")
    target = torch.softmax(log_score, -1)
    loss = ck.conditional_matching_loss(graph, sd, xd, taud, target.to(DEVICE), reduction="none", backend="triton")
    truth = reference.conditional_matching_loss(graph, log_score.double(), x, tau, target.double())
    assert torch.allclose(loss.cpu().double(), truth, rtol=1e-4)
    step = ck.fused_euler_step(graph, sd, xd, taud, 0.5 * taud, backend="triton")
    assert ((step >= 0) & (step < 100003)).all()


# ----------------------------------------------------------------------------- any layout


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
@pytest.mark.parametrize("op", ["transition_column", "apply_kernel", "scores_to_posterior", "posterior_to_scores",
                                "fused_euler_step", "conditional_matching_loss"])
@pytest.mark.parametrize("family", FAMILIES)
def test_any_layout(family, op, layout):
    """Scores, tokens (2-D), noise levels and targets as views in ``layout``: exactly
    the output and gradient of contiguous copies."""
    from layouts import assert_layout_free

    graph = make_graph(family, 17)
    log_score, x, tau = make_inputs(graph, 6, seed=19)
    log_score, x, tau = (t.reshape(2, 3, *t.shape[1:]) for t in (log_score.float(), x, tau))
    target = _target(graph, 6, seed=20).float().reshape(2, 3, 17)
    target = target / target.sum(-1, keepdim=True)
    log_score, x, tau, target = to_device(log_score, x, tau, target)
    cotangent = torch.randn(log_score.shape, generator=torch.Generator().manual_seed(21)).to(DEVICE)
    others = {"x": x, "tau": tau}
    if op == "transition_column":
        call, data, cotangent = (lambda data, x, tau: ck.transition_column(graph, x, tau + data, backend="triton"),
                                 torch.zeros((), dtype=torch.float64, device=DEVICE), None)
    elif op == "apply_kernel":
        call, data, others = lambda data, tau: ck.apply_kernel(graph, data, tau, backend="triton"), target, {"tau": tau}
    elif op == "scores_to_posterior":
        call, data = lambda data, x, tau: ck.scores_to_posterior(graph, data, x, tau, backend="triton"), log_score
    elif op == "posterior_to_scores":
        log_q = ck.scores_to_posterior(graph, log_score, x, tau, backend="reference")
        call, data = lambda data, x, tau: ck.posterior_to_scores(graph, data, x, tau, backend="triton"), log_q
    elif op == "fused_euler_step":
        call, data, cotangent = (lambda data, x, tau: ck.fused_euler_step(
            graph, data, x, tau, 0.5 * tau, generator=torch.Generator().manual_seed(22), backend="triton"),
            log_score, None)
    else:
        others["target"] = target
        call, data, cotangent = (lambda data, x, tau, target: ck.conditional_matching_loss(
            graph, data, x, tau, target, reduction="none", backend="triton"), log_score, cotangent[..., 0])
    layouts = {name: layout for name in ("x", "tau", "target")}
    layouts["data"] = layout if data.ndim else "contiguous"
    assert_layout_free(call, data, layouts, others, cotangent)


# ----------------------------------------------------------------------------- custom-op plumbing


@pytest.mark.parametrize("family", ["uniform"])
def test_opcheck(family):
    """Schema, fake tensors, autograd registration and dispatch of every Triton op."""
    graph = make_graph(family, 9)
    log_score, x, tau = to_device(*make_inputs(graph, 5, seed=17))
    log_score = log_score.float()
    d = graph.descriptor(DEVICE)
    target = torch.softmax(log_score, -1)
    lq = ck.scores_to_posterior(graph, log_score, x, tau, backend="triton")
    ops = torch.ops.cdm_kernels
    cases = [
        (ops.triton_transition_column, (*d, x, tau, 9, False)),
        (ops.triton_apply_kernel, (*d, log_score.clone().requires_grad_(True), tau, True)),
        (ops.triton_scores_to_posterior, (*d, log_score.clone().requires_grad_(True), x, tau)),
        (ops.triton_scores_to_posterior_backward, (*d, torch.randn_like(log_score), log_score, x, tau)),
        (ops.triton_posterior_to_scores, (*d, lq.clone().requires_grad_(True), x, tau)),
        (ops.triton_posterior_to_scores_backward, (*d, torch.randn_like(lq), lq, x, tau)),
        (ops.triton_fused_euler_step, (*d, log_score, x, tau, 0.5 * tau, 1, torch.tensor([3, 0]))),
        (ops.triton_conditional_matching_loss, (*d, log_score.clone().requires_grad_(True), x, tau, target)),
        (ops.triton_conditional_matching_loss_with_grad, (*d, log_score.clone().requires_grad_(True), x, tau, target)),
        (ops.triton_conditional_matching_loss_backward, (*d, torch.rand(5, device=DEVICE), log_score, x, tau, target)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile():
    """The ops trace under ``torch.compile(fullgraph=True)`` (fake tensors, autograd)."""
    graph = ck.UniformGraph(11)
    log_score, x, tau = to_device(*make_inputs(graph, 6, seed=18))
    log_score = log_score.float()
    target = torch.softmax(torch.randn_like(log_score), -1)

    def step(s, x, tau):
        loss = ck.conditional_matching_loss(graph, s, x, tau, target, backend="triton")
        return loss, ck.fused_euler_step(graph, s.detach(), x, tau, 0.5 * tau, backend="triton")

    s = log_score.clone().requires_grad_(True)
    loss, draw = torch.compile(step, backend="aot_eager", fullgraph=True)(s, x, tau)
    loss.backward()
    s_ref = log_score.detach().cpu().clone().requires_grad_(True)
    reference.conditional_matching_loss(graph, s_ref, x.cpu(), tau.cpu(), target.cpu()).float().mean().backward()
    assert torch.allclose(s.grad.cpu(), s_ref.grad, atol=1e-5) and draw.shape == x.shape


def test_fixed_config_is_one_autotune_would_try():
    """CDM_KERNELS_TRITON_AUTOTUNE=0 launches a config the pruned autotune list holds:
    one long-row program for big vocabularies, several rows per program for small ones,
    a block spanning the row for kernels that hold it in registers (``ONE_BLOCK``)."""
    from cdm_kernels.triton_kernels import _common

    for n in (2, 17, 130, 256, 257, 1024, 4097, 50257, 262144):
        config = _common.fixed_config("row", n)
        assert config in _common.prune_row_configs(_common.row_configs(), {"N": n})
        if n > 4096:
            assert config.kwargs["BLOCK_P"] == 1
        if n <= 256:
            assert config.kwargs["BLOCK_P"] > 1
        # a row that fits one block: a config whose block spans it
        if n <= _common.ONE_BLOCK_MAX:
            config = _common.fixed_config("row", n, one_block=True)
            assert config.kwargs["BLOCK_N"] >= n
            assert config in _common.prune_row_configs(_common.row_configs(), {"N": n}, ONE_BLOCK=True)
    assert _common.fixed_config("dense", 64) in _common.dense_configs()


# ----------------------------------------------------------------------------- graph descriptor and schemas


def test_schemas_match_cpp():
    """Every op of csrc/ops.cpp has a Triton twin with exactly its schema."""
    import pathlib
    import re

    from cdm_kernels import triton_kernels

    assert triton_kernels.load()
    source = (pathlib.Path(__file__).resolve().parents[1] / "csrc" / "ops.cpp").read_text()
    schemas = ["".join(re.findall(r'"([^"]*)"', m)) for m in re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", source)]
    assert len(schemas) == 10
    for schema in schemas:
        name, rest = schema.split("(", 1)
        op = getattr(torch.ops.cdm_kernels, f"triton_{name}").default
        assert str(op._schema) == f"cdm_kernels::triton_{name}({rest}", str(op._schema)


# ----------------------------------------------------------------------------- ahead-of-time compilation


_TYPES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32",
}
_BLOCK_NAMES = ("BLOCK_P", "BLOCK_N", "BLOCK_I", "BLOCK_J")

#: run in a fresh interpreter without TRITON_INTERPRET (the kernels must be real
#: JITFunctions to compile): reads variants as JSON, compiles each for sm_90 with
#: its configs, prints the number compiled and the failures
_AOT_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from cdm_kernels.triton_kernels import _common
target = GPUTarget("cuda", 90, 32)
compiled, failures = 0, []
for v in json.load(sys.stdin):
    fn = getattr(importlib.import_module(v["module"]), v["name"])
    configs = _common.launch_configs(v["kind"], v["constants"].get("ONE_BLOCK", False))
    for index in v["configs"]:
        config = configs[index]
        signature = dict(v["signature"], **{k: "constexpr" for k in config.kwargs})
        constants = dict(v["constants"], **config.kwargs)
        try:
            kernel = triton.compile(triton.compiler.ASTSource(fn, signature, constants), target=target,
                                    options={"num_warps": config.num_warps})
            assert kernel.asm.get("cubin")
            compiled += 1
        except Exception as error:
            failures.append(f"{v['name']} {signature} {constants} num_warps={config.num_warps}: "
                            f"{type(error).__name__}: {str(error)[-300:]}")
print(json.dumps({"compiled": compiled, "failures": failures}))
"""


def _configs_to_compile(variant: dict, index: int, every: bool):
    """Which autotune configs to compile a variant with: all of them when ``every``
    (CDM_AOT_ALL_CONFIGS=1); else one: the widest single-row config for float32
    data (the layout where Triton's in-loop reduction rewrites apply, which have
    crashed on float32 loads), otherwise rotating so every config is covered. A row
    held in registers compiles with the configs of the longest such row."""
    from cdm_kernels.triton_kernels import _common

    count = len(_common.launch_configs(variant["kind"], variant["constants"].get("ONE_BLOCK", False)))
    if every:
        return list(range(count))
    if variant["kind"] == "row" and "*fp32" in variant["signature"].values():
        return [min(2, count - 1)]
    return [index % count]


def _variant(fn, args, constexprs, kind):
    """The compile-time description of one launch: signature of the runtime arguments
    (by the values actually passed), constexprs other than the block sizes."""
    raw = getattr(fn, "fn", fn)  # the interpreter wraps the Python function
    names = [n for n in fn.arg_names if n not in constexprs and n not in _BLOCK_NAMES]
    assert len(names) == len(args), (raw.__name__, names, len(args))
    signature = {}
    for name, arg in zip(names, args):
        if isinstance(arg, torch.Tensor):
            signature[name] = "*" + _TYPES[arg.dtype]
        elif isinstance(arg, bool):
            signature[name] = "i1"
        elif isinstance(arg, int):
            signature[name] = "i32" if -(2**31) <= arg < 2**31 else "i64"
        else:
            signature[name] = "fp32"
    constants = {k: (bool(v) if isinstance(v, bool) else v) for k, v in constexprs.items()}
    signature.update({k: "constexpr" for k in constants})
    module = raw.__module__
    # the op modules bind the jit function under its own name
    return {"module": module, "name": raw.__name__, "signature": signature, "constants": constants, "kind": kind}


def test_aot_compile(monkeypatch):
    """Every kernel launched by the ops (bf16 and fp32, every family, both step methods,
    forward and backward; rows held in registers and streamed rows), compiled for
    Hopper with each GPU config of its autotuner."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    from cdm_kernels.triton_kernels import _common
    from every_op import run_every_op

    record = []
    monkeypatch.setattr(_common, "RECORD", record)
    for family in FAMILIES:
        graph = make_graph(family, 5)
        for dtype in DTYPES:
            log_score, x, tau = make_inputs(graph, 3, seed=14)
            log_score, x, tau = to_device(log_score.to(dtype), x, tau)
            run_every_op(graph, log_score, x, tau, torch.softmax(log_score.float(), -1).to(dtype))
        ck.transition_column(graph, x, tau.float(), backend="triton")
    for family in ("uniform", "absorbing"):  # rows longer than the interpreter's block: the streaming variants
        graph = make_graph(family, 40)
        log_score, x, tau = to_device(*make_inputs(graph, 3, seed=14))
        run_every_op(graph, log_score.float(), x, tau, torch.softmax(log_score.float(), -1))
    variants = {}
    for fn, args, constexprs, kind in record:
        v = _variant(fn, args, constexprs, kind)
        variants.setdefault(json.dumps(v, sort_keys=True), v)
    names = {v["name"] for v in variants.values()}
    assert len(names) >= 15, sorted(names)
    every = os.environ.get("CDM_AOT_ALL_CONFIGS", "0") == "1"
    todo = [dict(v, configs=_configs_to_compile(v, i, every)) for i, v in enumerate(variants.values())]
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    root = pathlib.Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    workers = 2  # two compiler processes
    procs = [
        subprocess.Popen([sys.executable, "-c", _AOT_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=root)
        for _ in range(workers)
    ]
    outputs = [proc.communicate(json.dumps(todo[k::workers]), timeout=900) for k, proc in enumerate(procs)]
    compiled, failures = 0, []
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        compiled += result["compiled"]
        failures += result["failures"]
    assert not failures, "\n".join(failures)
    print(f"compiled {compiled} kernels ({len(variants)} signatures) for sm_90")
