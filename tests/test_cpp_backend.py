"""Internals of the C++ CPU backend (csrc/cpu/) that the public-API tests do not reach:
Philox bit-equality with Triton's tl.rand, the ISA variants (default / AVX2 / AVX-512)
agreeing, the vectorised exp/log, 16-bit conversions, and sampling edge cases.

The ops are called directly (torch.ops.cdm_kernels.*), with the flattened inputs the
Python front end hands every backend.
"""

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from cdm_kernels import reference
from cdm_kernels.graphs import AbsorbingGraph, UniformGraph, ordinal_graph

try:
    import cdm_kernels._C  # noqa: F401

    HAVE_CPP = torch._C._dispatch_has_kernel_for_dispatch_key("cdm_kernels::scores_to_posterior", "CPU")
except ImportError:
    HAVE_CPP = False

pytestmark = pytest.mark.skipif(not HAVE_CPP, reason="cdm_kernels._C (CPU kernels) not built")

ops = torch.ops.cdm_kernels if HAVE_CPP else None
ISAS = ("default", "avx2", "avx512")


def desc(graph):
    return (graph.family_id, *graph.spectral())


@contextlib.contextmanager
def unchecked():
    """The kernels' value checks off: for scores the fronts reject (NaN, -inf), fed on purpose."""
    ops._set_value_checks(False)
    try:
        yield
    finally:
        ops._set_value_checks(True)


def seed_offset(seed, offset=0):
    return torch.tensor([seed, offset], dtype=torch.int64)


def supported_isas():
    current = ops._cpu_isa()
    found = []
    for isa in ISAS:
        try:
            ops._cpu_isa(isa)
            found.append(isa)
        except RuntimeError:
            pass
    ops._cpu_isa(current)
    return found


@pytest.fixture
def restore_isa():
    current = ops._cpu_isa()
    yield
    ops._cpu_isa(current)


# ----------------------------------------------------------------------------- Philox


def test_philox_matches_triton_rand():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1 (set before triton is imported)")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    @triton.jit
    def rand_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + p, tl.rand(seed, offset + p), mask=p < n)

    n = 700
    cases = [
        (0, 0),
        (12345, 7),
        (2**62 - 17, 3),  # the high word of the seed is the second key word
        (2**40 + 5, 2**31 - 100),  # offset + p crosses 2^31 (int32 wrap in Triton: same low word)
        (987654321, 2**33 + 11),  # an int64 offset: its high word is counter word 1
        (-5, 0),
    ]
    for seed, offset in cases:
        expected = torch.empty(n, dtype=torch.float32, device=device)
        rand_kernel[(triton.cdiv(n, 256),)](expected, seed, offset, n, BLOCK=256)
        assert torch.equal(ops._philox_uniform(seed, offset, n), expected.cpu()), (seed, offset)


def test_step_draws_its_uniform_by_inverse_cdf():
    """Position p lands where the Philox uniform u_p falls in the CDF of its step
    probabilities: the first state whose cumulative mass exceeds u_p * total."""
    gen = torch.Generator().manual_seed(0)
    for graph, method in [(UniformGraph(13), "analytic"), (UniformGraph(40), "euler"), (AbsorbingGraph(9), "analytic")]:
        n, positions = graph.num_states, 400
        log_score = torch.randn(positions, n, generator=gen, dtype=torch.float64)
        x = torch.randint(0, n, (positions,), generator=gen)
        if graph.family == "absorbing":
            x[:] = n - 1
        tau_t = torch.full((positions,), 0.9, dtype=torch.float64)
        tau_s = torch.full((positions,), 0.4, dtype=torch.float64)
        seed, offset = 4242, 17
        out = ops.fused_euler_step(*desc(graph), log_score, x, tau_t, tau_s, ("analytic", "euler").index(method),
                             seed_offset(seed, offset))
        probs = reference.step_probabilities(graph, log_score, x, tau_t, tau_s, method)
        cdf = probs.cumsum(-1)
        u = ops._philox_uniform(seed, offset, positions).double()
        target = u * cdf[:, -1]
        expected = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
        near_edge = ((cdf - target.unsqueeze(-1)).abs() < 1e-9).any(-1)
        assert torch.equal(out[~near_edge], expected[~near_edge]), graph
        assert near_edge.sum() < 3


# ----------------------------------------------------------------------------- ISA variants


def run_all_ops(seed):
    """Every op on a few families, dtypes and awkward sizes; returns a list of outputs."""
    gen = torch.Generator().manual_seed(seed)
    results = []
    for n in (2, 19, 1000):
        for graph in (UniformGraph(n), AbsorbingGraph(n)):
            positions = 37
            x = torch.randint(0, n, (positions,), generator=gen)
            x[::2] = n - 1
            tau = torch.exp(torch.empty(positions, dtype=torch.float64).uniform_(-6, 2, generator=gen))
            tau_s = tau * torch.rand(positions, generator=gen, dtype=torch.float64)
            tau_s[::5] = 0
            target = torch.softmax(torch.randn(positions, n, generator=gen), -1)
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                ls = (2 * torch.randn(positions, n, generator=gen)).to(dtype)
                grad = torch.randn(positions, n, generator=gen).to(dtype)
                g = desc(graph)
                results += [
                    ops.transition_column(*g, x, tau, n, False),
                    ops.apply_kernel(*g, ls, tau, True),
                    ops.apply_kernel(*g, ls, tau, False),
                    ops.scores_to_posterior(*g, ls, x, tau),
                    ops.scores_to_posterior_backward(*g, grad, ls, x, tau),
                    ops.posterior_to_scores(*g, torch.log_softmax(ls.float(), -1).to(dtype), x, tau),
                    ops.posterior_to_scores_backward(*g, grad, torch.log_softmax(ls.float(), -1).to(dtype), x, tau),
                    ops.conditional_matching_loss(*g, ls, x, tau, target),
                    ops.conditional_matching_loss_backward(*g, torch.ones(positions), ls, x, tau, target),
                    ops.fused_euler_step(*g, ls, x, tau, tau_s, 0, seed_offset(seed)),
                    ops.fused_euler_step(*g, ls, x, tau, tau_s, 1, seed_offset(seed)),
                ]
    return results


def test_isa_variants_agree(restore_isa):
    isas = supported_isas()
    assert "default" in isas
    outputs = {}
    for isa in isas:
        assert ops._cpu_isa(isa) == isa
        outputs[isa] = run_all_ops(seed=5)
    base = outputs["default"]
    for isa in isas[1:]:
        mismatched_draws = 0
        for a, b in zip(base, outputs[isa]):
            assert a.dtype == b.dtype and a.shape == b.shape
            if a.dtype == torch.int64:  # samples: a draw within ~1e-7 of a CDF edge may differ
                mismatched_draws += (a != b).sum().item()
                continue
            finite = torch.isfinite(a.double())
            assert torch.equal(finite, torch.isfinite(b.double())), isa
            # float64 partial sums in another order and FMA contraction: a few ulp, amplified by
            # the inversion's conditioning (1/alpha); measured against each row's scale
            x, y = torch.where(finite, a.double(), 0.0), torch.where(finite, b.double(), 0.0)
            scale = x.abs() + (x.abs().amax(-1, keepdim=True) if x.dim() > 1 else x.abs())
            tol = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 4e-3}[a.dtype]
            assert ((x - y).abs() <= tol * scale).all(), (isa, ((x - y).abs() / scale.clamp_min(1e-300)).max())
        assert mismatched_draws <= 2, isa


def test_isa_environment_variable():
    code = "import torch, cdm_kernels._C; print(torch.ops.cdm_kernels._cpu_isa())"
    env = dict(os.environ, CDM_KERNELS_CPU_ISA="default")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "default"
    env["CDM_KERNELS_CPU_ISA"] = "sse9"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "auto, default, avx2 or avx512" in out.stderr


# ----------------------------------------------------------------------------- vectorised math


def test_fast_exp_log_accuracy(restore_isa):
    finite = torch.cat([
        torch.linspace(-103.9, 88.7, 200001),
        -torch.logspace(-30, 2, 2000),
        torch.logspace(-30, 2, 2000),
        torch.tensor([0.0, -0.0, 1e-40, -87.4, -88.0, -100.0, 88.72]),
    ]).float()
    positive = torch.cat([
        torch.logspace(-45, 38.5, 200001),
        torch.tensor([1.0, 1 - 2**-24, 1 + 2**-23, 2**-149, 2**-126, 1.17e-38, 3.4e38]),
    ]).float()
    positive = positive[positive > 0]
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -1.0])
    for isa in supported_isas():
        ops._cpu_isa(isa)
        e = ops._cpu_vec_math(finite, 0).double()
        truth = finite.double().exp()
        normal = (truth >= 2**-126) & (truth <= torch.finfo(torch.float32).max)
        rel = ((e - truth).abs() / truth)[normal]
        assert torch.isinf(e[truth > 3.5e38]).all()
        assert rel.max() < 2.5e-7, (isa, rel.max())
        # subnormal results: within one subnormal ulp (2^-149) of the truth
        sub = (truth < 2**-126) & (truth > 0)
        assert ((e - truth).abs()[sub] <= 2**-149).all(), isa
        assert (ops._cpu_vec_math(torch.tensor([-104.0, -200.0]), 0) == 0).all()
        assert torch.isinf(ops._cpu_vec_math(torch.tensor([88.8, 1000.0]), 0)).all()

        lg = ops._cpu_vec_math(positive, 1).double()
        truth = positive.double().log()
        err = (lg - truth).abs() / truth.abs().clamp_min(1e-3)
        assert err.max() < 3e-7, (isa, err.max())

        normal = positive[positive >= 2**-126]
        lg = ops._cpu_vec_math(normal, 2).double()
        truth = normal.double().log()
        assert ((lg - truth).abs() / truth.abs().clamp_min(1e-3)).max() < 3e-7, isa
        sn = ops._cpu_vec_math(torch.tensor([float("inf"), float("nan")]), 2)
        assert sn[0] == float("inf") and torch.isnan(sn[1])

        se = ops._cpu_vec_math(specials, 0)
        assert se[0] == float("inf") and se[1] == 0 and torch.isnan(se[2]) and se[3] == 1
        sl = ops._cpu_vec_math(specials, 1)
        assert sl[0] == float("inf") and torch.isnan(sl[1]) and torch.isnan(sl[2])
        assert sl[3] == float("-inf") and torch.isnan(sl[4])


# ----------------------------------------------------------------------------- 16-bit I/O


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_io_is_float32_compute_rounded_once(dtype, restore_isa):
    """16-bit inputs are widened exactly and the float32 result rounded once, as torch's
    own conversions do (vectorised conversions in the body, scalar in the tail)."""
    gen = torch.Generator().manual_seed(1)
    graph = UniformGraph(45)  # not a multiple of any vector width
    ls = (3 * torch.randn(9, 45, generator=gen)).to(dtype)
    ls[0, :4] = torch.tensor([float("nan"), 1e-6, -7e4 if dtype == torch.float16 else -1e30, 65504.0]).to(dtype)
    x = torch.randint(0, 45, (9,), generator=gen)
    tau = torch.full((9,), 0.3, dtype=torch.float64)
    for isa in supported_isas():
        ops._cpu_isa(isa)
        low = ops.apply_kernel(*desc(graph), ls, tau, True)
        high = ops.apply_kernel(*desc(graph), ls.float(), tau, True)
        assert torch.equal(low[1:], high[1:].to(dtype)), isa
        assert torch.isnan(low[0]).all()
        low = ops.scores_to_posterior(*desc(graph), ls[1:], x[1:], tau[1:])
        high = ops.scores_to_posterior(*desc(graph), ls[1:].float(), x[1:], tau[1:])
        assert torch.equal(low, high.to(dtype)), isa


def test_mixed_dtypes_of_grad_and_target():
    gen = torch.Generator().manual_seed(2)
    graph = UniformGraph(33)
    ls = torch.randn(5, 33, generator=gen)
    x = torch.randint(0, 33, (5,), generator=gen)
    tau = torch.full((5,), 0.5, dtype=torch.float64)
    grad = torch.randn(5, 33, generator=gen)
    target = torch.softmax(torch.randn(5, 33, generator=gen), -1)
    g = desc(graph)
    a = ops.scores_to_posterior_backward(*g, grad, ls.bfloat16(), x, tau)
    b = ops.scores_to_posterior_backward(*g, grad.bfloat16(), ls.bfloat16(), x, tau)
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    loss32 = ops.conditional_matching_loss(*g, ls.bfloat16(), x, tau, target)
    loss16 = ops.conditional_matching_loss(*g, ls.bfloat16(), x, tau, target.bfloat16())
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32, loss16, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- sampling edges


def test_zero_probability_states_are_never_drawn():
    n, positions = 50, 4000
    gen = torch.Generator().manual_seed(3)
    # absorbing analytic to tau_s = 0: never the mask; euler with tau_s = 0 likewise
    graph = AbsorbingGraph(n)
    ls = torch.randn(positions, n, generator=gen)
    x = torch.full((positions,), n - 1)
    tau_t = torch.full((positions,), 2.0, dtype=torch.float64)
    zero = torch.zeros(positions, dtype=torch.float64)
    for method in (0, 1):
        out = ops.fused_euler_step(*desc(graph), ls, x, tau_t, zero, method, seed_offset(9))
        assert (out != n - 1).all()
    # tau_t = tau_s = 0 on a mask is 0/0: falls back to q, a real token
    out = ops.fused_euler_step(*desc(graph), ls[:50], x[:50], zero[:50], zero[:50], 0, seed_offset(9))
    assert (out != n - 1).all()
    # states with log-score -inf have no euler jump mass, even with a draw near 1
    graph = UniformGraph(n)
    ls = torch.randn(positions, n, generator=gen)
    ls[:, n // 2:] = float("-inf")
    x = torch.zeros(positions, dtype=torch.int64)
    tau_s = torch.full((positions,), 1.0, dtype=torch.float64)
    with unchecked():
        out = ops.fused_euler_step(*desc(graph), ls, x, tau_t, tau_s, 1, seed_offset(11))
    assert (out < n // 2).all()
    # a NaN row has no distribution: the token stays
    ls = torch.full((3, n), float("nan"))
    with unchecked():
        out = ops.fused_euler_step(*desc(graph), ls, torch.tensor([1, 2, 3]), tau_t[:3], tau_s[:3], 0, seed_offset(1))
    assert out.tolist() == [1, 2, 3]


def test_dense_step_distribution():
    graph = ordinal_graph(6)
    gen = torch.Generator().manual_seed(4)
    ls = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    x = torch.tensor([1, 4])
    reps = 20000
    for method in ("analytic", "euler"):
        tau_t = torch.full((2,), 0.8, dtype=torch.float64)
        tau_s = torch.full((2,), 0.3, dtype=torch.float64)
        probs = reference.step_probabilities(graph, ls, x, tau_t, tau_s, method)
        out = ops.fused_euler_step(*desc(graph), ls.repeat_interleave(reps, 0), x.repeat_interleave(reps),
                             tau_t.repeat_interleave(reps), tau_s.repeat_interleave(reps),
                             ("analytic", "euler").index(method), seed_offset(21))
        for r in range(2):
            freq = torch.bincount(out[r * reps:(r + 1) * reps], minlength=6).double() / reps
            sd = (probs[r] * (1 - probs[r]) / reps).sqrt()
            assert ((freq - probs[r]).abs() <= 5 * sd + 1e-12).all(), (method, freq, probs[r])


def test_input_checks():
    graph = UniformGraph(5)
    ls = torch.randn(3, 5)
    x = torch.tensor([0, 1, 2])
    tau = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="tau must be"):
        ops.scores_to_posterior(*desc(graph), ls, x, tau.float())
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.scores_to_posterior(*desc(graph), torch.randn(5, 3).t(), x, tau)
    # "got 7": an integer streamed into the message (a second, static libstdc++ in the
    # extension printed nothing there, or crashed; setup.py links the shared one)
    with pytest.raises(RuntimeError, match="family .* got 7"):
        ops.scores_to_posterior(7, None, None, None, ls, x, tau)
    with pytest.raises(RuntimeError, match="dense graph"):
        ops.scores_to_posterior(2, None, None, None, ls, x, tau)
    with pytest.raises(RuntimeError, match="states in"):
        ops.scores_to_posterior(*desc(graph), ls, torch.tensor([0, 5, 1]), tau)
    with pytest.raises(RuntimeError, match="seed_offset"):
        ops.fused_euler_step(*desc(graph), ls, x, tau, tau * 0, 0, torch.tensor([1.0, 2.0]))
