"""Machinery shared by the benchmark files: cases, inputs, byte counts, timing,
peak memory, and the per-session cache of medians that lets a fused result
report its speedup over eager and over ``torch.compile`` of the same case.

Vocabulary:
  case   one op, graph, shape (P = B*L positions, N states), dtype and pass
         ("fwd" or "fwd+bwd")
  impl   "eager" (cdm_kernels.reference, as written), "compile"
         (``torch.compile(reference, dynamic=False)``, compiled once per case),
         or a fused backend name ("cpp", "triton", "cuda")
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import cdm_kernels as ck
from cdm_kernels import reference as R

#: the conftest's BenchSession of this pytest run (options, device, caches)
SESSION = None

# ----------------------------------------------------------------------------- the grid

OPS = (
    "transition_column",
    "apply_kernel",
    "scores_to_posterior",
    "posterior_to_scores",
    "fused_euler_step[analytic]",
    "fused_euler_step[euler]",
    "conditional_matching_loss",
)
DIFFERENTIABLE = ("apply_kernel", "scores_to_posterior", "posterior_to_scores", "conditional_matching_loss")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64, "fp16": torch.float16}
GRAPHS = ("uniform", "absorbing", "dense")

# The default run (meant to fit in ~10 minutes on the 2-core CPU): (P, N, dtype).
# The eager reference at P x 50257 costs seconds to a minute per call here, so
# N = 50257 runs at P = 1024 only; --cdm-target runs the issue-2 target
# (P = 8192, N in {17, 1024, 50257}, fp32) and --cdm-full the whole product.
DEFAULT_PLAN: Tuple[Tuple[int, int, str], ...] = (
    (1024, 17, "fp32"),
    (1024, 1024, "fp32"),
    (1024, 50257, "fp32"),
    (16384, 17, "fp32"),
    (16384, 1024, "fp32"),
    (1024, 50257, "bf16"),
    (16384, 1024, "bf16"),
)
TARGET_PLAN = tuple((8192, n, "fp32") for n in (17, 1024, 50257))
FULL_POSITIONS = (1024, 8192, 16384)
FULL_STATES = (17, 1024, 50257)
FULL_DTYPES = ("fp32", "bf16")
FULL_GRAPHS = GRAPHS
DENSE_MAX_STATES = 1024  # a dense graph carries three N x N float64 matrices


@dataclass(frozen=True)
class Case:
    op: str
    graph: str
    P: int
    N: int
    dtype: str
    pass_: str  # "fwd" | "fwd+bwd"

    @property
    def key(self) -> str:
        return f"{self.op}-{self.graph}-{self.P}x{self.N}-{self.dtype}-{self.pass_}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    out = []
    for item in text.split(","):
        p, n = item.lower().strip().split("x")
        out.append((int(p), int(n)))
    return out


def plan_cases(
    plan: Sequence[Tuple[int, int, str]],
    graphs: Sequence[str],
    ops: Sequence[str] = OPS,
    passes: Sequence[str] = ("fwd", "fwd+bwd"),
) -> List[Case]:
    """Every (op, graph, shape, dtype, pass) of ``plan`` that makes sense.

    transition_column has no input scores (its output is float32): it runs for
    fp32 entries only. Dense graphs run for N <= DENSE_MAX_STATES only.
    """
    cases = []
    seen = set()
    for graph in graphs:
        for p, n, dtype in plan:
            if graph == "dense" and n > DENSE_MAX_STATES:
                continue
            for op in ops:
                if op == "transition_column" and dtype != "fp32":
                    continue
                for pass_ in passes:
                    if pass_ == "fwd+bwd" and op not in DIFFERENTIABLE:
                        continue
                    case = Case(op, graph, p, n, dtype, pass_)
                    if case not in seen:
                        seen.add(case)
                        cases.append(case)
    return cases


# ----------------------------------------------------------------------------- graphs and inputs

_GRAPH_CACHE: Dict[Tuple[str, int], ck.Graph] = {}


def make_graph(name: str, n: int) -> ck.Graph:
    if (name, n) not in _GRAPH_CACHE:
        if name == "uniform":
            graph = ck.UniformGraph(n)
        elif name == "absorbing":
            graph = ck.AbsorbingGraph(n)
        elif name == "dense":
            graph = ck.ordinal_graph(n, "gaussian")
        else:
            raise ValueError(f"unknown graph {name!r}; expected one of {GRAPHS}")
        _GRAPH_CACHE[(name, n)] = graph
    return _GRAPH_CACHE[(name, n)]


@dataclass
class Inputs:
    """Tensors of one case (on the device), built once and shared by its impls."""

    x: torch.Tensor  # (P,) int64
    tau: torch.Tensor  # (P,) float64 (tau_t for the step)
    tau_s: torch.Tensor  # (P,) float64, tau / 2
    scores: Optional[torch.Tensor]  # (P, N): log-scores, log p0, or v, in the case dtype
    target: Optional[torch.Tensor]  # (P, N) probabilities (loss only)
    grad_out: Optional[torch.Tensor]  # cotangent of the output (fwd+bwd only)


def make_inputs(case: Case, device: torch.device) -> Inputs:
    """Deterministic inputs of realistic magnitude. Absorbing graphs: half the
    positions hold the mask; the loss target is consistent with the graph
    (one-hot at unmasked positions), so every value stays finite."""
    p, n, dtype = case.P, case.N, case.torch_dtype
    gen = torch.Generator().manual_seed(1234 + 7 * n + p)
    x = torch.randint(0, n, (p,), generator=gen)
    if case.graph == "absorbing":
        masked = torch.rand(p, generator=gen) < 0.5
        x = torch.where(masked, n - 1, torch.randint(0, n - 1, (p,), generator=gen))
    tau = 0.05 + 2.95 * torch.rand(p, generator=gen, dtype=torch.float64)
    scores = target = grad_out = None
    if case.op != "transition_column":
        raw = torch.randn(p, n, generator=gen)
        if case.op == "posterior_to_scores":
            raw = torch.log_softmax(raw, dim=-1)
            if case.graph == "absorbing":  # p_0|t never puts mass on the mask
                raw[:, -1] = float("-inf")
        scores = raw.to(dtype)
        del raw
    if case.op == "conditional_matching_loss":
        probs = torch.softmax(torch.randn(p, n, generator=gen), dim=-1)
        if case.graph == "absorbing":
            probs[:, -1] = 0.0
            probs /= probs.sum(-1, keepdim=True)
            unmasked = x != n - 1
            probs[unmasked] = torch.nn.functional.one_hot(x[unmasked], n).float()
        target = probs.to(dtype)
        del probs
    if case.pass_ == "fwd+bwd" and case.op != "conditional_matching_loss":
        grad_out = torch.randn(p, n, generator=gen).to(dtype)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Inputs(move(x), move(tau), move(tau / 2), move(scores), move(target), move(grad_out))


_INPUT_CACHE: Dict[Tuple[str, str], Inputs] = {}


def cached_inputs(case: Case, device: torch.device) -> Inputs:
    """The inputs of ``case``, kept until another case asks (one case at a time:
    the big ones take gigabytes)."""
    key = (case.key, str(device))
    if key not in _INPUT_CACHE:
        _INPUT_CACHE.clear()
        gc.collect()
        _INPUT_CACHE[key] = make_inputs(case, device)
    return _INPUT_CACHE[key]


def drop_inputs(keep: Optional[Case] = None, device: Optional[torch.device] = None) -> None:
    """Free the cached inputs (except ``keep``'s), e.g. before judging whether a case fits in memory."""
    if keep is not None and (keep.key, str(device)) in _INPUT_CACHE:
        return
    _INPUT_CACHE.clear()
    gc.collect()


# ----------------------------------------------------------------------------- what runs


def _forward_fn(case: Case, graph: ck.Graph, impl: str) -> Tuple[Callable, Callable[[Inputs], tuple]]:
    """``(fn, args_of)``: ``fn(*args_of(inputs))`` computes the case's forward.

    eager/compile call cdm_kernels.reference with exactly what the public op
    hands it (validated, flattened; tau float64); a fused impl calls the public
    op with ``backend=impl``.
    """
    op = case.op
    ref = impl in ("eager", "compile")
    if op == "transition_column":
        if ref:
            return (lambda x, tau: R.transition_column(graph, x, tau, torch.float32)), lambda i: (i.x, i.tau)
        # a float32 tau keeps the public op's output float32 (a float64 tau asks for float64)
        return (lambda x, tau: ck.transition_column(graph, x, tau, backend=impl)), lambda i: (i.x, i.tau.float())
    if op == "apply_kernel":
        if ref:
            return (lambda v, tau: R.apply_kernel(graph, v, tau)), lambda i: (i.scores, i.tau)
        return (lambda v, tau: ck.apply_kernel(graph, v, tau, backend=impl)), lambda i: (i.scores, i.tau)
    if op in ("scores_to_posterior", "posterior_to_scores"):
        fn = getattr(R, op) if ref else getattr(ck, op)
        if ref:
            return (lambda s, x, tau: fn(graph, s, x, tau)), lambda i: (i.scores, i.x, i.tau)
        return (lambda s, x, tau: fn(graph, s, x, tau, backend=impl)), lambda i: (i.scores, i.x, i.tau)
    if op.startswith("fused_euler_step"):
        method = op[op.index("[") + 1 : -1]
        args_of = lambda i: (i.scores, i.x, i.tau, i.tau_s)  # noqa: E731
        if ref:
            return (lambda s, x, tt, ts: R.fused_euler_step(graph, s, x, tt, ts, method)), args_of
        return (lambda s, x, tt, ts: ck.fused_euler_step(graph, s, x, tt, ts, method=method, backend=impl)), args_of
    if op == "conditional_matching_loss":
        args_of = lambda i: (i.scores, i.x, i.tau, i.target)  # noqa: E731
        if ref:  # what the public op does with backend="reference" (reduction="mean")
            return (lambda s, x, tau, t: R.conditional_matching_loss(graph, s, x, tau, t).float().mean()), args_of
        return (lambda s, x, tau, t: ck.conditional_matching_loss(graph, s, x, tau, t, backend=impl)), args_of
    raise ValueError(f"unknown op {op!r}")


@dataclass
class Runnable:
    run: Callable[[], object]
    compile_s: Optional[float] = None  # first call of the compiled function (tracing + codegen + run)


def build_runnable(case: Case, impl: str, inputs: Inputs, device: torch.device) -> Runnable:
    """A zero-argument callable timing one forward (or forward+backward) of ``case``
    under ``impl``. For "compile" the function is compiled and called once here."""
    graph = make_graph(case.graph, case.N)
    fn, args_of = _forward_fn(case, graph, impl)
    compile_s = None
    if impl == "compile":
        torch._dynamo.reset()  # one compiled case at a time: no guard chains, no recompile limit
        fn = torch.compile(fn, dynamic=False)
    args = args_of(inputs)
    if case.pass_ == "fwd":

        def run():
            with torch.no_grad():
                return fn(*args)

    else:
        leaf = args[0].detach().requires_grad_(True)
        args = (leaf,) + tuple(args[1:])
        grad_out = inputs.grad_out

        def run():
            out = fn(*args)
            return torch.autograd.grad(out, leaf, grad_out)

    if impl == "compile":
        start = time.perf_counter()
        run()
        sync(device)
        compile_s = time.perf_counter() - start
    return Runnable(run, compile_s)


# ----------------------------------------------------------------------------- bytes


def min_bytes(case: Case) -> int:
    """The bytes the op must move at minimum: every input read once, every output
    written once (the forward of a fwd+bwd pass included; the backward reads
    what it needs again, e.g. the scores it recomputes from). Intermediates a
    fused kernel keeps in registers or cache are not counted, so GB/s here is
    the 'effective' bandwidth of the op, comparable across implementations."""
    p, n = case.P, case.N
    s = DTYPES[case.dtype].itemsize
    idx, tau = 8, 8  # int64 tokens, float64 tau
    row = p * n * s
    dense = 3 * n * n * 8 + n * 8 if case.graph == "dense" else 0
    op = case.op
    if op == "transition_column":
        return p * (idx + tau) + p * n * 4 + dense
    if op == "apply_kernel":
        fwd = 2 * row + p * tau
        bwd = 2 * row + p * tau  # read grad, write grad_v
    elif op in ("scores_to_posterior", "posterior_to_scores"):
        fwd = 2 * row + p * (idx + tau)
        bwd = 3 * row + p * (idx + tau)  # read grad and the input, write the input's grad
    elif op.startswith("fused_euler_step"):
        fwd = row + p * (idx + 2 * tau) + p * 8  # read scores, x, tau_t, tau_s; write x_s (int64)
        bwd = 0
    elif op == "conditional_matching_loss":
        fwd = 2 * row + p * (idx + tau) + p * 4  # read scores and target; write the per-position loss
        bwd = 3 * row + p * (idx + tau + 4)  # read scores, target, grad_loss; write the scores' grad
    else:
        raise ValueError(op)
    total = fwd + (bwd if case.pass_ == "fwd+bwd" else 0)
    return total + dense * (2 if case.pass_ == "fwd+bwd" else 1)


# ----------------------------------------------------------------------------- timing and memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def profiled_call(fn: Callable[[], object], device: torch.device) -> Tuple[float, Optional[int], str]:
    """Run ``fn`` once; return (seconds, peak bytes allocated during the call
    above what was live before it, method).

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
    CPU: the CPU allocator's allocation/free events recorded by
    ``torch.profiler`` (``profile_memory=True``), summed in time order: the
    high-water mark of tensor memory, which tracemalloc cannot see and
    ru_maxrss (a process-lifetime maximum) cannot attribute to one call. The
    seconds include the profiler's overhead (small next to the op's own time;
    this call doubles as the warm-up and is not one of the timed rounds).
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        seconds = timed_call(fn, device)
        return seconds, torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        seconds = timed_call(fn, device)
    try:
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # pragma: no cover - profiler internals moved
        return seconds, None, "unavailable"
    events.sort()
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return seconds, peak, "torch.profiler CPU allocator events"


MIN_ROUND_S = 0.005  # a round shorter than this loops the call (iterations > 1)


def plan_rounds(seconds: float, budget_s: float) -> Tuple[int, int]:
    """(rounds, iterations) for a call that takes ``seconds``, spending about
    ``budget_s`` on the timed rounds: at least 3 rounds (2 when a call takes
    over 1 s, 1 over 8 s: the eager reference at N = 50257), at most 50."""
    seconds = max(seconds, 1e-7)
    iterations = max(1, min(10_000, math.ceil(MIN_ROUND_S / seconds)))
    per_round = seconds * iterations
    low = 3 if per_round < 1 else (2 if per_round < 8 else 1)
    rounds = max(low, min(50, int(budget_s / per_round)))
    return rounds, iterations


@dataclass
class Measured:
    median_s: float  # wall clock, median over the rounds (per call)
    cpu_s: float  # process CPU time per call (all threads), mean over the rounds
    warmup_s: float
    peak_bytes: Optional[int]
    peak_method: str
    rounds: int
    iterations: int


def measure(benchmark, fn: Callable[[], object], device: torch.device, budget_s: float, profile: bool = True,
            second_warmup: bool = False) -> Measured:
    """Warm up (one call, profiled for peak memory when ``profile``), then time
    ``fn`` with ``benchmark.pedantic`` for about ``budget_s`` seconds.

    ``second_warmup``: when the first call took over a second, make one more
    (unprofiled) call and size the rounds from the faster of the two: a first
    call can be several times slower than the rest (first touch of gigabytes
    of fresh output pages, lazy initialisation), which would leave a fast op
    with too few rounds. Not worth it for the eager reference at N = 50257.

    The process CPU time of the timed rounds is recorded beside the wall clock:
    on a machine shared with other work, wall time includes waiting for a core,
    CPU time does not (it does include OpenMP threads spinning at barriers)."""
    if device.type == "cuda":  # every timed call ends when the device is done
        inner = fn

        def fn():
            out = inner()
            sync(device)
            return out

    if profile:
        warm_s, peak, method = profiled_call(fn, device)
    else:
        warm_s, peak, method = timed_call(fn, device), None, "not measured"
    if second_warmup and warm_s > 1.0:
        warm_s = min(warm_s, timed_call(fn, device))
    rounds, iterations = plan_rounds(warm_s, budget_s)
    cpu_start = time.process_time()
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=0)
    cpu_s = (time.process_time() - cpu_start) / (rounds * iterations)
    median = benchmark.stats.stats.median if benchmark.stats is not None else warm_s
    return Measured(median, cpu_s, warm_s, peak, method, rounds, iterations)


def quick_median(fn: Callable[[], object], device: torch.device, budget_s: float) -> Tuple[float, float]:
    """(median wall s, mean CPU s) per call, outside pytest-benchmark: for a
    baseline whose own test did not run in this session (e.g. filtered out)."""
    first = timed_call(fn, device)
    rounds, iterations = plan_rounds(first, budget_s)
    times = []
    cpu_start = time.process_time()
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / iterations)
    return statistics.median(times), (time.process_time() - cpu_start) / (rounds * iterations)


def checked_median(fn: Callable[[], object], device: torch.device, budget_s: float) -> float:
    """Median wall seconds of ``fn`` with the ops' value checks on, as a user calls the
    ops (the suite otherwise runs with them off)."""
    ck.set_value_checks(True)
    try:
        return quick_median(fn, device, budget_s)[0]
    finally:
        ck.set_value_checks(False)


# ----------------------------------------------------------------------------- memory guard


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


# Peak memory above the inputs, in multiples of one (P, N) array of
# max(4, itemsize) bytes: what this suite measured (profiler peaks at
# 1024 x 50257 and 16384 x 1024) plus ~10%. The eager reference materialises
# several temporaries (the step's float64 CDF among them); a fwd+bwd keeps the
# saved activations.
_MEMORY_FACTOR = {
    ("eager", "fwd"): 7.5, ("eager", "fwd+bwd"): 8.5,
    ("compile", "fwd"): 5.5, ("compile", "fwd+bwd"): 4.0,
    ("fused", "fwd"): 1.5, ("fused", "fwd+bwd"): 2.5,
}
MEMORY_MARGIN = 1.5 * 2**30  # left free for everything else on the machine


def memory_needed(case: Case, impl: str) -> int:
    """Estimated bytes ``impl`` needs for ``case``: its inputs plus its peak."""
    kind = impl if impl in ("eager", "compile") else "fused"
    row = case.P * case.N
    wide = 8 if case.graph == "dense" else max(DTYPES[case.dtype].itemsize, 4)
    arrays = 0 if case.op == "transition_column" else 1  # scores
    arrays += case.op == "conditional_matching_loss"  # target
    arrays += case.pass_ == "fwd+bwd" and case.op != "conditional_matching_loss"  # cotangent
    return int(row * wide * _MEMORY_FACTOR[(kind, case.pass_)] + row * DTYPES[case.dtype].itemsize * arrays)


def fits_in_memory(case: Case, impl: str, device: torch.device) -> Tuple[bool, str]:
    needed, available = memory_needed(case, impl), available_memory(device)
    ok = needed <= available - MEMORY_MARGIN
    return ok, f"needs ~{needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"


# ----------------------------------------------------------------------------- rooflines


def copy_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 10) -> float:
    """GB/s (read + write) of ``torch.empty_like(x).copy_(x)`` on a ``megabytes``
    buffer: the best of ``repeats`` (a roofline is what the machine can do; the
    best run is also the one least disturbed by other work on a shared machine)."""
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    fn = lambda: torch.empty_like(x).copy_(x)  # noqa: E731
    for _ in range(2):
        timed_call(fn, device)
    times = [timed_call(fn, device) for _ in range(repeats)]
    return 2 * x.numel() * 4 / min(times) / 1e9


def exp_throughput(device: torch.device, elements: int = 32 * 2**20, repeats: int = 7) -> float:
    """G elements/s of ``torch.exp`` on float32 (the transcendental roofline), best of ``repeats``."""
    x = torch.rand(elements, device=device)
    fn = lambda: torch.exp(x)  # noqa: E731
    timed_call(fn, device)
    times = [timed_call(fn, device) for _ in range(repeats)]
    return elements / min(times) / 1e9


def fused_backends(device: torch.device) -> List[str]:
    """The fused backends to measure on ``device``: every available one but the
    reference, and never Triton on CPU (only its interpreter runs there)."""
    names = ck.available_backends(device)
    return [b for b in names if b != "reference" and not (b == "triton" and torch.device(device).type == "cpu")]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


@contextlib.contextmanager
def default_backend(device, name: str):
    """Make ``name`` the default backend (``backend=None``) of ``device``'s type for
    the duration: for code that takes no ``backend=`` argument (the trainer's
    loss, the sampler). Benchmark-only: it patches cdm_kernels.backends' table
    of preferences and restores it."""
    from cdm_kernels import backends

    kind = torch.device(device).type
    if name not in ck.available_backends(device):
        raise ValueError(f"backend {name!r} is not available on {device}")
    old = backends._PREFERENCE.get(kind)
    backends._PREFERENCE[kind] = (name,)
    try:
        yield
    finally:
        if old is None:
            backends._PREFERENCE.pop(kind, None)
        else:
            backends._PREFERENCE[kind] = old
