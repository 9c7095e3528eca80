"""The global-memory traffic of every CUDA kernel, counted in the CPU emulation build.

The emulation (csrc/cuda/emulate.h) runs the .cu files' own code, and every row load and
store of cuda_common.cuh (``load_raw``, ``store_raw``, ``load_one``) adds its bytes to the
tensor whose storage holds the address (``_traffic_start`` / ``_traffic_stop`` of
csrc/cuda/emulate_ops.cpp); reads of a block's shared-memory row cache are not global
traffic and are not counted. So a test sees how many times each kernel reads its rows
from global memory and writes its outputs, without a GPU (the per-position scalars x and
tau are not counted: a few bytes a row). Needs the emulation library
(``.ci/cuda_emulation_check.sh tests/test_cuda_traffic.py`` builds it and runs this file).

The goal (issue 22): at most 1.05 reads of the scores for every step and the loss
forward, one read and one write for the inversion, where the row fits on chip; and the
shared-memory planner's promise (``_row_plan``: the row is cached, or it is read again)
is what the kernels do.
"""

from __future__ import annotations

import os

import pytest
import torch

from cdm_kernels import reference
from cdm_kernels.graphs import AbsorbingGraph, UniformGraph

EMULATION_LIB = os.environ.get("CDM_CUDA_EMULATION_LIB")
pytestmark = pytest.mark.skipif(not EMULATION_LIB, reason="counts the traffic of the CUDA emulation build")
if EMULATION_LIB:
    torch.ops.load_library(EMULATION_LIB)
    OPS = torch.ops.cdm_emu

SEGMENT = 256  # states per segment (kSeg): the step rereads the one its draw lands in
P = 6


def _inputs(family: str, n: int, dtype: torch.dtype):
    graph = UniformGraph(n) if family == "uniform" else AbsorbingGraph(n)
    gen = torch.Generator().manual_seed(n)
    log_score = (1.5 * torch.randn(P, n, generator=gen)).to(dtype)
    # absorbing: every position on the mask, so every row is used
    x = torch.full((P,), n - 1) if family == "absorbing" else torch.randint(0, n, (P,), generator=gen)
    tau = 0.05 + 1.5 * torch.rand(P, generator=gen, dtype=torch.float64)
    target = reference.scores_to_posterior(graph, log_score.double(), x, tau).exp().to(dtype)
    return graph, log_score, x, tau, target


def _desc(graph):
    return graph.descriptor("cpu")


def traffic(call, **tensors) -> dict:
    """Runs ``call()``; returns ``{name: (times read, times written)}`` of each named tensor
    (bytes moved over its bytes) and ``"other"``: bytes of anything else."""
    names = list(tensors)
    OPS._traffic_start([tensors[k] for k in names])
    try:
        out = call()
    finally:
        counts = OPS._traffic_stop()
    size = {k: tensors[k].numel() * tensors[k].element_size() for k in names}
    result = {k: (counts[2 * i] / size[k], counts[2 * i + 1] / size[k]) for i, k in enumerate(names)}
    result["other"] = (counts[-2], counts[-1])
    return result, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["uniform", "absorbing"])
def test_inversion_reads_the_scores_once_and_writes_once(family, dtype):
    graph, ls, x, tau, _ = _inputs(family, 1029, dtype)
    t, _ = traffic(lambda: OPS.scores_to_posterior(*_desc(graph), ls, x, tau), ls=ls)
    assert t["ls"] == (pytest.approx(1.0), 0.0), t
    # the kernel's own output: the one tensor outside the registered ones
    assert t["other"] == (0, ls.numel() * ls.element_size()), t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family,method", [("uniform", 0), ("uniform", 1), ("absorbing", 0), ("absorbing", 1)],
                         ids=["uniform-analytic", "uniform-euler", "absorbing-analytic", "absorbing-euler"])
def test_steps_read_the_scores_once_and_one_segment(family, method, dtype):
    """One pass over the row (held in the row cache where the step reads it again), then
    the segment the draw lands in: 1 + 256 / N at most, under 1.05 from N = 5120."""
    n = 8192
    graph, ls, x, tau, _ = _inputs(family, n, dtype)
    so = torch.tensor([7, 0], dtype=torch.int64)
    t, picks = traffic(lambda: OPS.fused_euler_step(*_desc(graph), ls, x, tau, tau / 2, method, so), ls=ls)
    reads, writes = t["ls"]
    assert 1 - 1 / n <= reads <= 1 + SEGMENT / n + 1e-12, t
    assert reads <= 1.05 and writes == 0, t
    assert t["other"][0] == 0, t  # (the picks are per-position scalars: not counted)
    assert ((picks >= 0) & (picks < n)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["uniform", "absorbing"])
def test_loss_reads_the_scores_and_the_target_once(family, dtype):
    graph, ls, x, tau, target = _inputs(family, 1029, dtype)
    t, _ = traffic(lambda: OPS.conditional_matching_loss(*_desc(graph), ls, x, tau, target), ls=ls, target=target)
    assert t["ls"] == (pytest.approx(1.0), 0.0), t
    assert t["target"] == (pytest.approx(1.0), 0.0), t
    assert t["other"][0] == 0, t  # (the per-position loss is a scalar a row: not counted)

    # with the gradient written in the same pass (what autograd runs when the scores need grad)
    t, (_, grad) = traffic(lambda: OPS.conditional_matching_loss_with_grad(*_desc(graph), ls, x, tau, target),
                           ls=ls, target=target)
    assert t["ls"] == (pytest.approx(1.0), 0.0), t
    assert t["target"] == (pytest.approx(1.0), 0.0), t
    assert t["other"][0] == 0 and t["other"][1] == grad.numel() * grad.element_size(), t

    grad_loss = torch.rand(P, dtype=torch.float32)
    t, _ = traffic(lambda: OPS.conditional_matching_loss_backward(*_desc(graph), grad_loss, ls, x, tau, target),
                   ls=ls, target=target)
    assert t["ls"] == (pytest.approx(1.0), 0.0), t
    assert t["target"] == (pytest.approx(1.0), 0.0), t
    assert t["other"] == (0, ls.numel() * ls.element_size()), t


@pytest.mark.parametrize("family", ["uniform", "absorbing"])
def test_backward_and_forward_map_read_each_row_once(family):
    dtype = torch.float32
    graph, ls, x, tau, _ = _inputs(family, 1029, dtype)
    grad = torch.randn(ls.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    nbytes = ls.numel() * ls.element_size()
    t, _ = traffic(lambda: OPS.scores_to_posterior_backward(*_desc(graph), grad, ls, x, tau), ls=ls, grad=grad)
    assert t["ls"] == (pytest.approx(1.0), 0.0) and t["grad"] == (pytest.approx(1.0), 0.0), t
    assert t["other"] == (0, nbytes), t

    log_p0 = reference.scores_to_posterior(graph, ls.double(), x, tau).to(dtype)
    t, _ = traffic(lambda: OPS.posterior_to_scores(*_desc(graph), log_p0, x, tau), log_p0=log_p0)
    once = pytest.approx(1.0, abs=1.01 / ls.shape[1])  # (absorbing: + the mask's state, read once)
    assert t["log_p0"] == (once, 0.0), t
    assert t["other"] == (0, nbytes), t
    t, _ = traffic(lambda: OPS.posterior_to_scores_backward(*_desc(graph), grad, log_p0, x, tau),
                   log_p0=log_p0, grad=grad)
    assert t["log_p0"] == (once, 0.0) and t["grad"] == (once, 0.0), t
    assert t["other"] == (0, nbytes), t


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("family", ["uniform", "absorbing"])
def test_apply_kernel_reads_once_and_writes_once(family, transpose):
    graph, v, _, tau, _ = _inputs(family, 1029, torch.float32)
    t, _ = traffic(lambda: OPS.apply_kernel(*_desc(graph), v, tau, transpose), v=v)
    assert t["v"] == (pytest.approx(1.0, abs=1.01 / v.shape[1]), 0.0), t  # (+ the mask's state, read once)
    assert t["other"] == (0, v.numel() * v.element_size()), t


@pytest.mark.parametrize("n,dtype,cached", [
    (50257, torch.bfloat16, True),   # fits the 113 KiB budget: one read
    (50258, torch.bfloat16, True),
    (32768, torch.float32, False),   # 128 KiB of fp32: read from global memory in every pass
])
def test_the_planner_is_what_the_kernels_do(n, dtype, cached):
    """``_row_plan`` says whether a row kernel caches its row; the uniform inversion then
    reads the scores once, else in each of its three passes (the max and sum of
    exponentials; Z, whose clamp needs that sum; the write, which needs Z)."""
    rows, _, _ = OPS._row_plan(n, dtype, False, 1)
    assert bool(rows) == cached
    graph = UniformGraph(n)
    gen = torch.Generator().manual_seed(1)
    ls = torch.randn(2, n, generator=gen).to(dtype)
    x, tau = torch.tensor([0, n - 1]), torch.tensor([0.3, 1.2], dtype=torch.float64)
    t, _ = traffic(lambda: OPS.scores_to_posterior(*_desc(graph), ls, x, tau), ls=ls)
    assert t["ls"][0] == pytest.approx(1.0 if cached else 3.0), t
