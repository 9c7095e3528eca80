"""The CUDA C++ backend (csrc/cuda/) on CUDA tensors, against the reference.

Runs only with a GPU and an extension built with CUDA kernels (CDM_KERNELS_CUDA=1);
skipped otherwise. Every op, every graph family, float32 / bfloat16 / float16 /
float64, odd and aligned vocabulary sizes (both row layouts of the kernels, with and
without the shared-memory row cache), backward passes, sampling (exactly the inverse
CDF of the CPU backend for the same Philox seed, and a chi-square test), int64
indexing beyond 2^31 elements, and no host synchronisation.

Accuracy is judged against the float64 reference, allowing what the reference itself
loses when run in the kernels' compute dtype (float32 for 16/32-bit inputs: the
uniform inversion is ill-conditioned, MATH.md section 2), a few times over, plus the
output rounding.

The raw-op tests also run on CPU tensors against the CPU emulation of the same
kernels (csrc/cuda/emulate.h): set CDM_CUDA_EMULATION_LIB to a library built from
csrc/cuda/*.cu with -DCDM_CUDA_EMULATE that registers the ops as cdm_emu::* for CPU
(.ci/cuda_emulation_check.sh builds it and runs this file against it).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import cdm_kernels as ck
from cdm_kernels import reference
from cdm_kernels.graphs import AbsorbingGraph, UniformGraph, ordinal_graph
from cdm_kernels.ops.fused_euler_step import seed_and_offset

EMULATION_LIB = os.environ.get("CDM_CUDA_EMULATION_LIB")
if EMULATION_LIB:
    torch.ops.load_library(EMULATION_LIB)
    OPS = torch.ops.cdm_emu
    DEV = torch.device("cpu")
    HAVE = True
else:
    OPS = torch.ops.cdm_kernels
    DEV = torch.device("cuda")
    HAVE = torch.cuda.is_available() and "cuda" in ck.available_backends("cuda")

pytestmark = pytest.mark.skipif(not HAVE, reason="no GPU, or cdm_kernels._C built without CUDA kernels")
public_api = pytest.mark.skipif(bool(EMULATION_LIB), reason="the public API needs CUDA tensors")

FAMILIES = ("uniform", "absorbing", "dense")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# one warp per row up to 1024 states, a 256-thread block above; odd sizes take the
# scalar (unaligned) layout, multiples of 8 the 16-byte vector layout
SIZES = (2, 7, 50, 256, 1024, 1029, 4096, 5000)
DENSE_SIZES = (2, 7, 50, 64)


def make_graph(family: str, n: int):
    if family == "uniform":
        return UniformGraph(n)
    if family == "absorbing":
        return AbsorbingGraph(n)
    return ordinal_graph(n)


def cases(sizes=SIZES):
    for family in FAMILIES:
        for n in DENSE_SIZES if family == "dense" else sizes:
            yield family, n


def desc(graph):
    return graph.descriptor(DEV)


def make_inputs(graph, positions: int, seed: int, scale: float = 2.0):
    """float64 CPU log-scores, tokens (half of the absorbing rows masked) and tau."""
    g = torch.Generator().manual_seed(seed)
    n = graph.num_states
    ls = torch.randn(positions, n, generator=g, dtype=torch.float64) * scale
    x = torch.randint(0, n, (positions,), generator=g)
    if graph.family_id == 1:
        x[torch.rand(positions, generator=g) < 0.5] = n - 1
    tau = torch.rand(positions, generator=g, dtype=torch.float64) * 3 + 0.01
    return ls, x, tau


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tolerances(dtype):
    """(atol, rtol) of one output rounding plus kernel-level noise."""
    return {
        torch.float64: (1e-9, 1e-9),
        torch.float32: (2e-5, 2e-5),
        torch.float16: (2e-3, 2**-10),
        torch.bfloat16: (1e-2, 2**-7),
    }[dtype]


def assert_close(out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, dtype, what: str):
    """out (any device/dtype) against the float64 reference `ref`; `base` is the reference
    computed in the kernels' compute dtype: its largest error is allowed four times over
    (float32 sums in another order land within a small factor of it)."""
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    base = base.detach().to("cpu", torch.float64)
    finite = torch.isfinite(ref)
    mismatch = (torch.isfinite(out) != finite) | (~finite & (out != ref))
    assert not mismatch.any(), f"{what}: -inf/inf pattern differs at {mismatch.nonzero()[:5].tolist()}"
    atol, rtol = tolerances(dtype)
    base_err = torch.where(finite & torch.isfinite(base), (base - ref).abs(), torch.zeros_like(ref)).max()
    err = torch.where(finite, (out - ref).abs(), torch.zeros_like(ref))
    allowed = atol + rtol * ref.abs().where(finite, torch.zeros_like(ref)) + 4 * base_err
    worst = (err - allowed).max().item() if err.numel() else 0.0
    assert worst <= 0, f"{what}: max error {err.max().item():.3e} beyond the allowed (base error {base_err.item():.3e})"


def on_device(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.to(DEV, dtype) if dtype is not None else t.to(DEV)


# ----------------------------------------------------------------------------- the inversion


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("family,n", list(cases()))
def test_scores_to_posterior(family, n, dtype):
    dtype = DTYPES[dtype]
    graph = make_graph(family, n)
    positions = 12 if n > 1024 else 37
    ls, x, tau = make_inputs(graph, positions, seed=n)
    ls_d = ls.to(dtype)
    out = OPS.scores_to_posterior(*desc(graph), on_device(ls_d), on_device(x), on_device(tau))
    assert out.dtype == dtype and out.shape == ls.shape and out.device.type == DEV.type
    ref = reference.scores_to_posterior(graph, ls_d.double(), x, tau)
    base = reference.scores_to_posterior(graph, ls_d.to(compute_dtype(dtype)), x, tau)
    assert_close(out, ref, base, dtype, "scores_to_posterior")

    grad = torch.randn(positions, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    gout = OPS.scores_to_posterior_backward(*desc(graph), on_device(grad), on_device(ls_d), on_device(x), on_device(tau))

    def ref_grad(work):
        leaf = ls_d.to(work).requires_grad_()
        q = reference.scores_to_posterior(graph, leaf, x, tau)
        return torch.autograd.grad(q, leaf, grad.to(work))[0]

    assert_close(gout, ref_grad(torch.float64), ref_grad(compute_dtype(dtype)), dtype, "scores_to_posterior backward")


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("family,n", list(cases((2, 7, 300, 1029, 4096))))
def test_matching_loss(family, n, dtype):
    dtype = DTYPES[dtype]
    graph = make_graph(family, n)
    positions = 12 if n > 1024 else 29
    ls, x, tau = make_inputs(graph, positions, seed=3 * n)
    teacher, _, _ = make_inputs(graph, positions, seed=5 * n)
    target = reference.scores_to_posterior(graph, teacher, x, tau).exp().to(dtype)  # zero where q_student is
    ls_d = ls.to(dtype)
    out = OPS.conditional_matching_loss(*desc(graph), on_device(ls_d), on_device(x), on_device(tau), on_device(target))
    assert out.dtype == torch.float32 and out.shape == (positions,)
    ref = reference.conditional_matching_loss(graph, ls_d.double(), x, tau, target.double())
    base = reference.conditional_matching_loss(graph, ls_d.to(compute_dtype(dtype)), x, tau, target)
    assert_close(out, ref, base, torch.float32 if dtype == torch.float64 else dtype, "matching loss")

    grad_loss = torch.randn(positions, generator=torch.Generator().manual_seed(2))
    gout = OPS.conditional_matching_loss_backward(
        *desc(graph), on_device(grad_loss), on_device(ls_d), on_device(x), on_device(tau), on_device(target)
    )

    def ref_grad(work):
        leaf = ls_d.to(work).requires_grad_()
        loss = reference.conditional_matching_loss(graph, leaf, x, tau, target.to(work))
        return torch.autograd.grad(loss, leaf, grad_loss.to(work))[0]

    assert_close(gout, ref_grad(torch.float64), ref_grad(compute_dtype(dtype)), dtype, "matching loss backward")

    # with its gradient (what autograd runs when the scores require grad): the loss, summed in the
    # backward kernel's passes, and that kernel's gradient for grad_loss = 1
    loss, gradient = OPS.conditional_matching_loss_with_grad(*desc(graph), on_device(ls_d), on_device(x),
                                                             on_device(tau), on_device(target))
    ones = OPS.conditional_matching_loss_backward(*desc(graph), on_device(torch.ones(positions)), on_device(ls_d),
                                                  on_device(x), on_device(tau), on_device(target))
    assert_close(loss, ref, base, torch.float32 if dtype == torch.float64 else dtype, "matching loss with grad")
    assert gradient.dtype == ls_d.dtype and torch.equal(gradient, ones)


def test_matching_loss_structural_zero_is_inf():
    graph = AbsorbingGraph(9)
    ls, _, tau = make_inputs(graph, 3, seed=0)
    x = torch.tensor([2, 8, 8])
    target = torch.zeros(3, 9, dtype=torch.float64)
    target[0, 5] = 1.0  # unmasked x = 2: q = e_2, mass elsewhere -> inf
    target[1, 8] = 1.0  # masked: q(mask) = 0 -> inf
    target[2, 3] = 1.0  # finite
    out = OPS.conditional_matching_loss(*desc(graph), on_device(ls), on_device(x), on_device(tau), on_device(target))
    ref = reference.conditional_matching_loss(graph, ls, x, tau, target)
    assert torch.isinf(out[:2]).all() and torch.isfinite(out[2])
    assert torch.allclose(out[2].cpu().double(), ref[2], rtol=1e-5)
    fused, _ = OPS.conditional_matching_loss_with_grad(*desc(graph), on_device(ls), on_device(x), on_device(tau),
                                                       on_device(target))
    assert torch.isinf(fused[:2]).all() and torch.allclose(fused[2].cpu().double(), ref[2], rtol=1e-5)


# ----------------------------------------------------------------------------- forward kernel, forward map


@pytest.mark.parametrize("out_float64", [False, True])
@pytest.mark.parametrize("family,n", list(cases((2, 7, 300, 1029, 4096))))
def test_transition_column(family, n, out_float64):
    graph = make_graph(family, n)
    _, x, tau = make_inputs(graph, 23, seed=n)
    dtype = torch.float64 if out_float64 else torch.float32
    out = OPS.transition_column(*desc(graph), on_device(x), on_device(tau), n, out_float64)
    ref = reference.transition_column(graph, x, tau, dtype)
    assert out.dtype == dtype
    atol = 1e-12 if out_float64 else 1e-7
    assert torch.allclose(out.cpu(), ref, rtol=1e-6, atol=atol)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("family,n", list(cases((2, 7, 300, 1029, 4096))))
def test_apply_kernel(family, n, transpose, dtype):
    dtype = DTYPES[dtype]
    graph = make_graph(family, n)
    _, _, tau = make_inputs(graph, 17, seed=n)
    tau = tau * torch.where(torch.arange(17) % 2 == 0, 0.3, -0.3).double()  # negative tau: the inverse
    v = torch.randn(17, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)).to(dtype)
    out = OPS.apply_kernel(*desc(graph), on_device(v), on_device(tau), transpose)
    ref = reference.apply_kernel(graph, v.double(), tau, transpose)
    base = reference.apply_kernel(graph, v.to(compute_dtype(dtype)), tau, transpose)
    assert_close(out / ref.abs().max(), ref / ref.abs().max(), base / ref.abs().max(), dtype, "apply_kernel")


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("family,n", list(cases((2, 7, 300, 1029, 4096))))
def test_posterior_to_scores(family, n, dtype):
    dtype = DTYPES[dtype]
    graph = make_graph(family, n)
    positions = 12 if n > 1024 else 21
    ls, x, tau = make_inputs(graph, positions, seed=7 * n)
    log_p0 = reference.scores_to_posterior(graph, ls, x, tau).to(dtype)  # a genuine conditional
    out = OPS.posterior_to_scores(*desc(graph), on_device(log_p0), on_device(x), on_device(tau))
    ref = reference.posterior_to_scores(graph, log_p0.double(), x, tau)
    base = reference.posterior_to_scores(graph, log_p0.to(compute_dtype(dtype)), x, tau)
    assert_close(out, ref, base, dtype, "posterior_to_scores")

    grad = torch.where(torch.isfinite(ref), torch.randn(positions, n, dtype=torch.float64), 0.0).to(dtype)
    gout = OPS.posterior_to_scores_backward(*desc(graph), on_device(grad), on_device(log_p0), on_device(x), on_device(tau))

    def ref_grad(work):
        leaf = log_p0.to(work).requires_grad_()
        r = reference.posterior_to_scores(graph, leaf, x, tau)
        return torch.autograd.grad(r, leaf, grad.to(work))[0]

    assert_close(gout, ref_grad(torch.float64), ref_grad(compute_dtype(dtype)), dtype, "posterior_to_scores backward")


# ----------------------------------------------------------------------------- layouts, caches, large inputs


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("n", [16, 2048, 20000, 70000])
def test_misaligned_rows_and_row_cache(n, dtype):
    """A row start that is not 16-byte aligned (scalar layout) gives what the aligned
    layout gives; 20000 (bf16 and fp32) keeps the row in shared memory, 70000 does not."""
    dtype = DTYPES[dtype]
    graph = UniformGraph(n)
    ls, x, tau = make_inputs(graph, 6, seed=n)
    ls_d = on_device(ls, dtype)
    flat = torch.empty(6 * n + 1, dtype=dtype, device=DEV)
    shifted = flat[1:].view(6, n)
    shifted.copy_(ls_d)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    a = OPS.scores_to_posterior(*desc(graph), ls_d, on_device(x), on_device(tau))
    b = OPS.scores_to_posterior(*desc(graph), shifted, on_device(x), on_device(tau))
    ref = reference.scores_to_posterior(graph, ls_d.cpu().double(), x, tau)
    base = reference.scores_to_posterior(graph, ls_d.cpu().float(), x, tau)
    assert_close(a, ref, base, dtype, "aligned")
    assert_close(b, ref, base, dtype, "misaligned")
    so = torch.tensor([11, 0], dtype=torch.int64)
    sa = OPS.fused_euler_step(*desc(graph), ls_d, on_device(x), on_device(tau), on_device(tau / 2), 0, so)
    sb = OPS.fused_euler_step(*desc(graph), shifted, on_device(x), on_device(tau), on_device(tau / 2), 0, so)
    assert torch.equal(sa, sb)


@pytest.mark.skipif(bool(EMULATION_LIB), reason="8 GiB of device memory")
def test_int64_offsets_beyond_2_31():
    """P * N > 2^31 elements (bf16, 4.3 GB in, 4.3 GB out): the last rows are right."""
    n, positions = 65_600, 33_000
    assert positions * n > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free device memory")
    graph = UniformGraph(n)
    g = torch.Generator(device=DEV).manual_seed(0)
    ls = torch.randn(positions, n, device=DEV, dtype=torch.bfloat16, generator=g)
    x = torch.randint(0, n, (positions,), device=DEV, generator=g)
    tau = torch.rand(positions, device=DEV, dtype=torch.float64, generator=g) + 0.1
    out = OPS.scores_to_posterior(*desc(graph), ls, x, tau)
    rows = torch.tensor([0, positions // 2, positions - 2, positions - 1])
    ref = reference.scores_to_posterior(graph, ls[rows].cpu().double(), x[rows].cpu(), tau[rows].cpu())
    base = reference.scores_to_posterior(graph, ls[rows].cpu().float(), x[rows].cpu(), tau[rows].cpu())
    assert_close(out[rows], ref, base, torch.bfloat16, "last rows")
    del out
    picks = OPS.fused_euler_step(*desc(graph), ls, x, tau, tau / 2, 0, torch.tensor([5, 0], dtype=torch.int64))
    probs = reference.step_probabilities(graph, ls[rows].cpu().double(), x[rows].cpu(), tau[rows].cpu(),
                                         tau[rows].cpu() / 2)
    assert (probs.gather(1, picks[rows].cpu().unsqueeze(1)) > 0).all()


# ----------------------------------------------------------------------------- sampling


def cpp_available() -> bool:
    return "cpp" in ck.available_backends("cpu")


@pytest.mark.parametrize("method", [0, 1], ids=["analytic", "euler"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("family,n", list(cases((2, 5, 300, 1029, 3000))))
def test_euler_step_is_the_inverse_cdf_of_the_cpu_backend(family, n, dtype, method):
    """Same [seed, offset] -> the same Philox uniform per position as the C++ CPU backend
    (and Triton's tl.rand); the draws are the inverse CDF of the step probabilities, so
    CPU and CUDA agree except where rounding puts the uniform on a CDF boundary."""
    if not cpp_available():
        pytest.skip("the C++ CPU backend is not built")
    dtype = DTYPES[dtype]
    graph = make_graph(family, n)
    positions = 64 if n > 1024 else 400
    ls, x, tau_t = make_inputs(graph, positions, seed=n + method)
    tau_s = tau_t * torch.rand(positions, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    tau_s[::7] = 0.0
    ls_d = ls.to(dtype)
    so = torch.tensor([987654321 + n, 12345], dtype=torch.int64)
    cuda_picks = OPS.fused_euler_step(*desc(graph), on_device(ls_d), on_device(x), on_device(tau_t), on_device(tau_s), method, so)
    cpu_picks = torch.ops.cdm_kernels.fused_euler_step(*graph.descriptor("cpu"), ls_d, x, tau_t, tau_s, method, so)
    probs = reference.step_probabilities(graph, ls_d.double(), x, tau_t, tau_s, ("analytic", "euler")[method])
    assert (probs.gather(1, cuda_picks.cpu().unsqueeze(1)) > 0).all(), "a zero-probability state was drawn"
    agree = (cuda_picks.cpu() == cpu_picks).double().mean().item()
    assert agree >= 0.99, f"CUDA and CPU draws agree on {agree:.3%} of positions"


def test_large_vocabulary_tail_draws_match_the_cpu_backend():
    """50,000 states sharing 30% of a row behind one state with 70% (the tail's running
    CDF sums 50,000 increments of 6e-6 onto 0.7): CUDA draws the states the CPU backend
    draws (float64 CDFs in both; test_fused_euler_step.test_large_vocabulary_rates checks
    the CPU backend's rates)."""
    if not cpp_available():
        pytest.skip("the C++ CPU backend is not built")
    graph = AbsorbingGraph(50002)
    ls = torch.full((64, graph.num_states), math.log(0.3 / 50000))
    ls[:, 0] = math.log(0.7)
    x = torch.full((64,), graph.mask)
    tau_t = torch.ones(64, dtype=torch.float64)
    tau_s = torch.zeros(64, dtype=torch.float64)
    tail = 0
    for seed in range(4):
        so = torch.tensor([seed, 64 * seed], dtype=torch.int64)
        cuda_picks = OPS.fused_euler_step(*desc(graph), on_device(ls), on_device(x), on_device(tau_t), on_device(tau_s), 0, so)
        cpu_picks = torch.ops.cdm_kernels.fused_euler_step(*graph.descriptor("cpu"), ls, x, tau_t, tau_s, 0, so)
        assert torch.equal(cuda_picks.cpu(), cpu_picks)
        tail += int((cpu_picks > 0).sum())
    assert 40 < tail < 120  # ~77 of 256 draws land in the tail


@pytest.mark.parametrize("method", ["analytic", "euler"])
@pytest.mark.parametrize("family,n", [("uniform", 11), ("absorbing", 11), ("dense", 11), ("uniform", 1500)])
def test_euler_step_chi_square(family, n, method):
    """Many draws of one row (fresh Philox counters per position) follow the step's P."""
    graph = make_graph(family, n)
    draws = 200_000 if n < 100 else 60_000
    ls, x, tau_t = make_inputs(graph, 1, seed=4)
    if family == "absorbing":
        x[:] = n - 1
    if EMULATION_LIB:
        draws //= 20
    tau_s = tau_t * 0.4
    rows = ls.expand(draws, n).contiguous().float()
    xs, tts, tss = x.expand(draws).contiguous(), tau_t.expand(draws).contiguous(), tau_s.expand(draws).contiguous()
    picks = OPS.fused_euler_step(*desc(graph), on_device(rows), on_device(xs), on_device(tts), on_device(tss),
                           ("analytic", "euler").index(method), torch.tensor([2024, 77], dtype=torch.int64))
    probs = reference.step_probabilities(graph, ls.float().double(), x, tau_t, tau_s, method)[0]
    counts = torch.bincount(picks.cpu(), minlength=n).double()
    assert counts[probs == 0].sum() == 0, "a zero-probability state was drawn"
    expected = probs * draws
    keep = expected > 5
    other = counts[~keep].sum() - expected[~keep].sum()
    stat = (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum().item()
    if expected[~keep].sum() > 5:
        stat += other.item() ** 2 / expected[~keep].sum().item()
    dof = max(int(keep.sum().item()), 1)
    assert stat < dof + 6 * math.sqrt(2 * dof) + 10, f"chi-square {stat:.1f} with {dof} degrees of freedom"


def test_euler_step_tau_s_zero_never_the_mask():
    graph = AbsorbingGraph(40)
    ls, _, tau = make_inputs(graph, 512, seed=9)
    x = torch.full((512,), 39)
    for method in (0, 1):
        picks = OPS.fused_euler_step(*desc(graph), on_device(ls.float()), on_device(x), on_device(tau),
                               on_device(torch.zeros(512, dtype=torch.float64)), method,
                               torch.tensor([3, 0], dtype=torch.int64))
        assert (picks != 39).all()


def test_euler_step_zero_step_on_the_mask_samples_q():
    """tau_t = tau_s = 0 on a masked row makes the analytic step 0/0: CPU and CUDA both
    sample the conditional q (never the mask) with the same uniforms."""
    if not cpp_available():
        pytest.skip("the C++ CPU backend is not built")
    graph = AbsorbingGraph(40)
    ls, _, _ = make_inputs(graph, 256, seed=12)
    x = torch.full((256,), 39)
    zero = torch.zeros(256, dtype=torch.float64)
    so = torch.tensor([8, 3], dtype=torch.int64)
    picks = OPS.fused_euler_step(*desc(graph), on_device(ls.float()), on_device(x), on_device(zero), on_device(zero), 0, so)
    cpu_picks = torch.ops.cdm_kernels.fused_euler_step(*graph.descriptor("cpu"), ls.float(), x, zero, zero, 0, so)
    assert (picks.cpu() != 39).all()
    assert (picks.cpu() == cpu_picks).double().mean().item() >= 0.99


def test_euler_step_offsets_give_fresh_draws():
    graph = UniformGraph(64)
    ls, x, tau = make_inputs(graph, 256, seed=1)
    args = (*desc(graph), on_device(ls.float()), on_device(x), on_device(tau), on_device(tau / 3), 0)
    a = OPS.fused_euler_step(*args, torch.tensor([1, 0], dtype=torch.int64))
    b = OPS.fused_euler_step(*args, torch.tensor([1, 0], dtype=torch.int64))
    c = OPS.fused_euler_step(*args, torch.tensor([1, 256], dtype=torch.int64))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------- the public API on CUDA


@public_api
@pytest.mark.parametrize("family", FAMILIES)
def test_public_ops_with_backend_cuda(family):
    n = 33 if family == "dense" else 517
    graph = make_graph(family, n)
    ls, x, tau = make_inputs(graph, 24, seed=2)
    ls_d = ls.float().to(DEV).requires_grad_()
    q = ck.scores_to_posterior(graph, ls_d, x.to(DEV), tau.to(DEV), backend="cuda")
    ref = reference.scores_to_posterior(graph, ls.float().double(), x, tau)
    assert_close(q, ref, reference.scores_to_posterior(graph, ls.float(), x, tau), torch.float32, "public")
    q.masked_fill(~torch.isfinite(q), 0).sum().backward()
    assert torch.isfinite(ls_d.grad).all()
    target = ref.exp()
    loss = ck.conditional_matching_loss(graph, ls_d, x.to(DEV), tau.to(DEV), target.float().to(DEV), backend="cuda")
    loss.backward()
    gen = torch.Generator(device=DEV).manual_seed(0)
    picks = ck.fused_euler_step(graph, ls_d.detach(), x.to(DEV), tau.to(DEV), tau.to(DEV) / 2, generator=gen,
                                backend="cuda")
    assert picks.shape == x.shape and picks.device.type == "cuda"


@public_api
def test_no_host_synchronisation():
    """With the value checks off, no op of the cuda backend synchronises with the host."""
    graphs = [UniformGraph(300), AbsorbingGraph(300), ordinal_graph(16)]
    for graph in graphs:
        graph.descriptor(DEV)  # the eigen tensors' first copy to the device is not the op's
    previous = ck.ops._validation._value_checks
    ck.set_value_checks(False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for graph in graphs:
            n = graph.num_states
            ls = torch.randn(64, n, device=DEV, requires_grad=True)
            x = torch.randint(0, n, (64,), device=DEV)
            tau = torch.rand(64, device=DEV, dtype=torch.float64) + 0.1
            q = ck.scores_to_posterior(graph, ls, x, tau, backend="cuda")
            q.masked_fill(~torch.isfinite(q), 0).sum().backward()
            loss = ck.conditional_matching_loss(graph, ls, x, tau, q.detach().exp(), backend="cuda")
            loss.backward()
            ck.fused_euler_step(graph, ls.detach(), x, tau, tau / 2, backend="cuda")
            ck.transition_column(graph, x, tau, backend="cuda")
            ck.apply_kernel(graph, ls.detach(), tau, backend="cuda")
            ck.posterior_to_scores(graph, q.detach(), x, tau, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
        ck.set_value_checks(previous)
    torch.cuda.synchronize()


@public_api
def test_seed_offset_from_a_cuda_generator_advances():
    gen = torch.Generator(device=DEV).manual_seed(5)
    a = seed_and_offset(gen, 100)
    b = seed_and_offset(gen, 100)
    assert a[0] == b[0] and b[1] == a[1] + 100


# ----------------------------------------------------------------------------- value checks and the row plan


def raises_in_kernel(match, call):
    """The op's kernels find the error; on a GPU it is raised once its record has arrived."""
    with pytest.raises(ValueError, match=match):
        call()
        if not EMULATION_LIB:
            torch.cuda.synchronize()
            torch.ops.cdm_kernels._raise_value_errors()


@pytest.mark.parametrize("family,n", [("uniform", 7), ("uniform", 1029), ("absorbing", 50), ("absorbing", 1029)])
def test_kernels_check_the_values_they_read(family, n):
    graph = make_graph(family, n)
    ls, x, tau = make_inputs(graph, 12, seed=n)
    ls, x, tau = on_device(ls.float()), on_device(x), on_device(tau)
    tau_s = tau / 2
    target = torch.softmax(ls, -1)
    if family == "absorbing":  # half the rows are unmasked: the kernels never read their scores otherwise
        target[:, -1] = 0
        target = target / target.sum(-1, keepdim=True)
        target[x != n - 1] = torch.nn.functional.one_hot(x[x != n - 1], n).float()
    d = desc(graph)
    losses = (OPS.conditional_matching_loss, OPS.conditional_matching_loss_with_grad)  # with grad: fused kernel
    for row in (0, 1):  # a masked and an unmasked absorbing row
        for bad in (float("nan"), float("inf"), float("-inf")):
            poisoned = ls.clone()
            poisoned[row, n // 2] = bad
            raises_in_kernel("log_score contains NaN or inf", lambda: OPS.scores_to_posterior(*d, poisoned, x, tau))
            raises_in_kernel("log_score contains NaN or inf",
                             lambda: OPS.fused_euler_step(*d, poisoned, x, tau, tau_s, 0, torch.tensor([1, 0])))
            bad_target = target.clone()
            bad_target[row, n // 2] = bad
            for loss in losses:
                raises_in_kernel("student_log_score contains NaN or inf", lambda: loss(*d, poisoned, x, tau, target))
                raises_in_kernel("target contains NaN or inf", lambda: loss(*d, ls, x, tau, bad_target))
        lp = torch.log_softmax(ls, -1)
        lp[row, 1] = float("-inf")  # probability 0 is a value
        OPS.posterior_to_scores(*d, lp, x, tau)
        lp[row, 1] = float("nan")
        raises_in_kernel("log_p0 contains NaN or inf", lambda: OPS.posterior_to_scores(*d, lp, x, tau))
    shifted = target.clone()
    shifted[0, 0] -= 0.5
    shifted[0, 1] += 0.5
    outside = x.clone()
    outside[3], outside[5] = n, -2
    for loss in losses:
        raises_in_kernel("target rows must sum to 1", lambda: loss(*d, ls, x, tau, target * 1.05))
        raises_in_kernel(r"target must be probabilities \(non-negative\)", lambda: loss(*d, ls, x, tau, shifted))
        raises_in_kernel("x_t holds token ids outside", lambda: loss(*d, ls, outside, tau, target))
    raises_in_kernel(rf"x holds token ids outside \[0, {n}\): min -2, max {n}",
                     lambda: OPS.scores_to_posterior(*d, ls, outside, tau))
    negative = tau.clone()
    negative[2] = -0.1
    raises_in_kernel(r"tau must be >= 0", lambda: OPS.posterior_to_scores(*d, torch.log_softmax(ls, -1), x, negative))
    raises_in_kernel(r"tau_t must be finite", lambda: OPS.fused_euler_step(*d, ls, x, tau * float("inf"), tau_s, 1,
                                                                            torch.tensor([1, 0])))
    raises_in_kernel(r"tau_s must be < tau_t", lambda: OPS.fused_euler_step(*d, ls, x, tau, tau, 0, torch.tensor([1, 0])))


def test_the_value_checks_switch():
    graph = UniformGraph(300)
    ls, x, tau = make_inputs(graph, 8, seed=1)
    ls = on_device(ls.float())
    ls[2, 3] = float("nan")
    switch = OPS._set_value_checks
    switch(False)
    try:
        out = OPS.scores_to_posterior(*desc(graph), ls, on_device(x), on_device(tau))
        assert torch.isnan(out[2]).any() and torch.isfinite(out[0]).all()
    finally:
        switch(True)
    raises_in_kernel("log_score contains NaN or inf", lambda: OPS.scores_to_posterior(*desc(graph), ls, on_device(x), on_device(tau)))


@pytest.mark.skipif(not EMULATION_LIB, reason="the planner is exported by the emulation build")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "n", [1024, 32768, 50257, 50258,
          pytest.param(128256, marks=pytest.mark.xfail(strict=True, reason="a 250 KB row needs a cluster of blocks"))])
def test_forward_kernels_read_their_rows_once(n, dtype):
    """The shared-memory plan caches the row of every forward kernel that reads it twice
    (scores_to_posterior, the loss forward, posterior_to_scores, apply_kernel: no stats;
    fused_euler_step's uniform analytic step: with segment stats) and keeps two blocks
    per SM: no 16-bit row of up to 50258 states falls back to a second read."""
    for stats in (False, True):
        cached, block_bytes, blocks_per_sm = OPS._row_plan(n, dtype, stats, 1)
        assert cached == 1, (n, dtype, stats, block_bytes)
        assert blocks_per_sm >= 2, (n, dtype, stats, block_bytes)
