"""The memory traffic of every Triton kernel, counted under the interpreter.

``TRITON_INTERPRET=1`` runs each load and store through the interpreter's
``create_masked_load`` / ``create_masked_store``; :func:`count_traffic` wraps
both and attributes every unmasked element to the kernel argument whose memory
holds it, so a test sees, per launch and per tensor, how many times the kernel
read and wrote it (bytes moved / the tensor's bytes). No GPU needed: the counts
are the kernel's algorithm, whatever the device.

The goal (issue 22): at most 1.05 reads of the scores for every step and the
loss forward, at most one read and one write for the inversion, where the row
fits on chip. A Triton program holds a row that fits one block in registers
(``ONE_BLOCK``: ``N <= _common.ONE_BLOCK_MAX`` on a GPU, ``N <= BLOCK_N`` here),
and every kernel then reads each input once (:data:`ONE_BLOCK_READS`). Longer
rows stream in blocks; :data:`STREAMING_PASSES` records their passes and why
each is there.
"""

from __future__ import annotations

import collections
import contextlib

import numpy as np
import pytest
import torch

import cdm_kernels as ck
from cdm_kernels.backends import triton_interpreting
from every_op import run_every_op

pytestmark = pytest.mark.skipif(
    not triton_interpreting() or "triton" not in ck.available_backends("cpu"),
    reason="counts loads and stores of Triton's CPU interpreter",
)

P, N = 16, 130
#: every launch of a one-block row: each input read once, each output written once
ONE_BLOCK_READS = 1.0

#: rows longer than a block: (full passes over the scores, whether the step then
#: reads one more block: the one its draw falls in); each extra pass exists
#: because its values need a whole-row reduction of the pass before
STREAMING_PASSES = {
    # max / sum-exp; Z = sum col u (u clamped against beta S: needs S); the write (needs Z)
    ("uniform", "scores_to_posterior"): (3, False),
    # the log-sum-exp over the real tokens; the write (needs it)
    ("absorbing", "scores_to_posterior"): (2, False),
    # max / sum-exp keeping each block's running max and sum: the masses are e_y times
    # a per-row factor, so the blocks' masses follow; then the drawn block again
    ("uniform", "euler"): (1, True),
    ("absorbing", "analytic"): (1, True),
    ("absorbing", "euler"): (1, True),
    # max / sum-exp; each block's float64 mass and U = sum u (u clamped against beta S:
    # needs S); then the drawn block again
    ("uniform", "analytic"): (2, True),
    # max / sum-exp; log Z and sum t log u (u clamped against beta S)
    ("uniform", "conditional_matching_loss"): (2, False),
    # one online pass: log-sum-exp, sum t ls and sum t together
    ("absorbing", "conditional_matching_loss"): (1, False),
}


@contextlib.contextmanager
def count_traffic():
    """Yields a list that gets, per kernel launch, ``{"kernel", "sizes", "read",
    "written"}``: bytes of each tensor argument, bytes read from and written to it."""
    from triton.runtime import interpreter

    executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
    init, load, store = executor._init_args_hst, builder.create_masked_load, builder.create_masked_store
    launches = []

    def counting_init(self, args_dev, kwargs):
        args_hst, kwargs_hst = init(self, args_dev, kwargs)
        ranges = {}
        for name, arg in zip(self.arg_names, args_hst):
            # an op may pass one tensor for several unused pointers: the first name owns it
            if isinstance(arg, torch.Tensor) and all(arg.data_ptr() != start for start, _ in ranges.values()):
                ranges[name] = (arg.data_ptr(), arg.numel() * arg.element_size())
        launches.append({"kernel": self.fn.__name__, "ranges": ranges,
                         "read": collections.Counter(), "written": collections.Counter()})
        return args_hst, kwargs_hst

    def count(kind, ptrs, mask):
        launch = launches[-1]
        address = ptrs.data.astype(np.uint64)
        active = np.broadcast_to(mask.data, address.shape)
        itemsize = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        for name, (start, nbytes) in launch["ranges"].items():
            inside = active & (address >= start) & (address < start + nbytes)
            launch[kind][name] += int(inside.sum()) * itemsize

    def counting_load(self, ptrs, mask, other, *rest):
        count("read", ptrs, mask)
        return load(self, ptrs, mask, other, *rest)

    def counting_store(self, ptrs, value, mask, *rest):
        count("written", ptrs, mask)
        return store(self, ptrs, value, mask, *rest)

    executor._init_args_hst, builder.create_masked_load, builder.create_masked_store = (
        counting_init, counting_load, counting_store)
    try:
        yield launches
    finally:
        executor._init_args_hst, builder.create_masked_load, builder.create_masked_store = init, load, store


def passes(launch: dict, kind: str) -> dict:
    """Times each tensor argument of one launch was read (``kind="read"``) or written."""
    return {name: launch[kind][name] / launch["ranges"][name][1] for name in launch["ranges"] if launch[kind][name]}


def _inputs(family: str, n: int = N):
    graph = ck.UniformGraph(n) if family == "uniform" else ck.AbsorbingGraph(n)
    gen = torch.Generator().manual_seed(30)
    log_score = 1.5 * torch.randn(P, n, generator=gen)
    # absorbing: every position on the mask, so every row is read (the others read nothing)
    x = torch.full((P,), n - 1) if family == "absorbing" else torch.randint(0, n, (P,), generator=gen)
    tau = 0.05 + 1.5 * torch.rand(P, generator=gen, dtype=torch.float64)
    target = torch.softmax(torch.randn(P, n, generator=gen), -1)
    return graph, log_score, x, tau, target


def _forward(family: str, op: str, n: int = N):
    """One call of ``op`` (steps: ``analytic`` / ``euler``) and its single launch."""
    graph, log_score, x, tau, target = _inputs(family, n)
    calls = {
        "scores_to_posterior": lambda: ck.scores_to_posterior(graph, log_score, x, tau, backend="triton"),
        "analytic": lambda: ck.fused_euler_step(graph, log_score, x, tau, 0.5 * tau, backend="triton"),
        "euler": lambda: ck.fused_euler_step(graph, log_score, x, tau, 0.5 * tau, method="euler", backend="triton"),
        "conditional_matching_loss": lambda: ck.conditional_matching_loss(graph, log_score, x, tau, target,
                                                                          backend="triton"),
    }
    with count_traffic() as launches:
        calls[op]()
    assert len(launches) == 1, [launch["kernel"] for launch in launches]
    return launches[0]


@pytest.fixture
def blocks(monkeypatch):
    """Sets the interpreter's vocabulary block: ``blocks(256)`` holds a whole row."""
    from cdm_kernels.triton_kernels import _common

    def set_block(width: int):
        monkeypatch.setitem(_common.INTERPRET_BLOCKS, "BLOCK_N", width)
        monkeypatch.setitem(_common.INTERPRET_BLOCKS, "BLOCK_P", 8)

    return set_block


FORWARD_CASES = [(family, op) for family in ("uniform", "absorbing")
                 for op in ("scores_to_posterior", "analytic", "euler", "conditional_matching_loss")]


@pytest.mark.parametrize("family,op", FORWARD_CASES)
def test_one_read_of_the_scores_when_the_row_fits(family, op, blocks):
    """The goal: every step and the loss forward read the scores at most 1.05 times,
    the inversion reads them once and writes once (here exactly once)."""
    blocks(256)
    launch = _forward(family, op)
    reads, writes = passes(launch, "read"), passes(launch, "written")
    # (absorbing kernels never read the mask's own score: (N - 1) / N)
    assert 1 - 1 / N - 1e-9 <= reads["ls_ptr"] <= ONE_BLOCK_READS + 1e-9, (launch["kernel"], reads)
    assert all(value <= ONE_BLOCK_READS + 1e-9 for value in reads.values()), reads
    assert writes == {"out_ptr": pytest.approx(1.0)}, writes


@pytest.mark.parametrize("family,op", FORWARD_CASES)
def test_streaming_reads(family, op, blocks):
    """Rows longer than a block: the passes of :data:`STREAMING_PASSES`."""
    blocks(32)
    launch = _forward(family, op)
    reads = passes(launch, "read")["ls_ptr"]
    full, block = STREAMING_PASSES[family, op]
    low = full * (1 - 1 / N) - 1e-9  # absorbing kernels skip the mask's score
    assert low <= reads <= full + (32 / N if block else 0) + 1e-9, (launch["kernel"], reads)
    assert passes(launch, "written") == {"out_ptr": pytest.approx(1.0)}


@pytest.mark.parametrize("family,op", [("uniform", "euler"), ("absorbing", "analytic"), ("absorbing", "euler")])
def test_streaming_steps_read_the_scores_once_and_a_block(family, op, blocks):
    """The steps whose masses follow from pass 1 reach the goal on rows far longer
    than a block: one pass plus the drawn block (N = 1300 in 32-wide blocks: 1.025)."""
    blocks(32)
    n = 1300
    reads = passes(_forward(family, op, n), "read")["ls_ptr"]
    assert reads <= 1 + 32 / n + 1e-9 <= 1.05, reads


@pytest.mark.parametrize("family", ["uniform", "absorbing", "ordinal"])
def test_every_kernel_reads_each_input_once_when_the_row_fits(family, blocks):
    """Every row kernel of every op, forward and backward (dense graphs: the
    eigenbasis pipeline's row kernels too): one read of each input, one write."""
    blocks(256)
    graph = ck.ordinal_graph(N) if family == "ordinal" else _inputs(family)[0]
    _, log_score, x, tau, target = _inputs("absorbing" if family == "absorbing" else "uniform")
    if family == "ordinal":
        tau = 0.3 * tau
    with count_traffic() as launches:
        run_every_op(graph, log_score, x, tau, target)
    row_kernels = [launch for launch in launches if launch["kernel"] not in DENSE_MATVEC]
    assert len(row_kernels) >= 10
    for launch in row_kernels:
        for name, value in passes(launch, "read").items():
            # the absorbing forward map's backward also gathers the mask entry: 1 + 1/N
            assert value <= 1.0 + 1.0 / N + 1e-9, (launch["kernel"], name, value)
        for name, value in passes(launch, "written").items():
            assert value == pytest.approx(1.0), (launch["kernel"], name, value)


#: the dense graphs' O(N^2) eigenbasis products read the (P, N) operand once per
#: block of output columns: matrix products, not row passes
DENSE_MATVEC = ("_column_kernel", "_matvec_kernel")


#: reads of the scores by the loss's forward + backward in training: (written in the forward, the
#: backward a multiply; recomputing in backward, as the bare op's autograd does), per row layout
TRAINING_READS = {
    ("uniform", 256): (1, 2),
    ("absorbing", 256): (1, 2),
    # streaming: the backward's three passes (max / sum-exp; Z, sum g / u, C; the write), the loss
    # summed in the second; recomputing adds the forward's two
    ("uniform", 32): (3, 5),
    # the log-sum-exp; the write, the loss summed in it; recomputing adds the forward's one
    ("absorbing", 32): (2, 3),
}


@pytest.mark.parametrize("family,width", list(TRAINING_READS))
def test_loss_forward_and_backward_read_the_scores_once(family, width, blocks):
    """Training (scores that require grad): the forward writes the gradient in the pass that
    computes the loss and the backward only scales it, so forward + backward read the scores
    once in total where the row fits one block; recomputing in backward read them twice."""
    blocks(width)
    graph, log_score, x, tau, target = _inputs(family)
    low = 1 - 1 / N if family == "absorbing" else 1.0  # absorbing kernels skip the mask's score

    def reads_of(train):
        scores = log_score.clone().requires_grad_(True)
        with count_traffic() as launches:
            train(scores).backward()
        return launches, sum(passes(launch, "read").get("ls_ptr", 0.0) for launch in launches)

    fused, recomputing = TRAINING_READS[family, width]
    launches, reads = reads_of(lambda s: ck.conditional_matching_loss(graph, s, x, tau, target, backend="triton"))
    assert [launch["kernel"] for launch in launches] == [
        "_posterior_backward_kernel" if family == "uniform" else "_absorbing_backward_kernel"]
    assert fused * low - 1e-9 <= reads <= fused + 1e-9, reads
    if width == 256:  # the target too is read once; the loss and the gradient written once
        assert all(value <= 1 + 1e-9 for value in passes(launches[0], "read").values())
        assert passes(launches[0], "written") == {"out_ptr": pytest.approx(1.0), "loss_ptr": pytest.approx(1.0)}
    bare = torch.ops.cdm_kernels.triton_conditional_matching_loss
    _, reads = reads_of(lambda s: bare(*graph.descriptor(), s, x, tau, target).sum())
    assert recomputing * low - 1e-9 <= reads <= recomputing + 1e-9, reads
