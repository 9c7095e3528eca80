"""pytest-benchmark suite of cdm-kernels: options, session fixtures, machine info.

    pytest benchmarks --benchmark-only                      # default sweep (~10 min on 2 CPU cores)
    pytest benchmarks/test_ops.py --benchmark-only --cdm-target   # issue-2 target: 8192 x {17, 1024, 50257} fp32
    pytest benchmarks --benchmark-only --cdm-full           # everything (hours on a CPU)

See benchmarks/README.md.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("CDM_KERNELS_QUIET", "1")  # a missing extension is reported in the header instead

import pytest  # noqa: E402
import torch  # noqa: E402

import cdm_kernels as ck  # noqa: E402

import _harness as H  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("cdm", "cdm-kernels benchmarks")
    group.addoption("--cdm-full", action="store_true",
                    help="full sweep: B*L in {1024, 8192, 16384} x N in {17, 1024, 50257} x {fp32, bf16} "
                         "x {uniform, absorbing, dense (N <= 1024)}, and the larger end-to-end configs")
    group.addoption("--cdm-target", action="store_true",
                    help="run the issue-2 target cases instead of the default plan: B*L = 8192, "
                         "N in {17, 1024, 50257}, fp32")
    group.addoption("--cdm-shapes", default=None,
                    help="replace the shapes, e.g. '8192x17,8192x1024' (with --cdm-dtypes, default fp32)")
    group.addoption("--cdm-dtypes", default=None, help="comma list of fp32, bf16, fp64, fp16 (filters the plan)")
    group.addoption("--cdm-graphs", default=None, help="comma list of uniform, absorbing, dense (default: uniform)")
    group.addoption("--cdm-ops", default=None, help="comma list of op names (substring match), e.g. 'posterior,loss'")
    group.addoption("--cdm-passes", default=None, help="comma list of fwd, fwd+bwd")
    group.addoption("--cdm-impls", default=None,
                    help="comma list of eager, compile and fused backends (default: all available)")
    group.addoption("--cdm-budget", type=float, default=None,
                    help="seconds of timed rounds per measurement (default 0.6; 2.0 with --cdm-full)")
    group.addoption("--cdm-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--cdm-value-checks", action="store_true",
                    help="also time each fused op as a user calls it, with the value checks on (the default "
                         "of cdm_kernels; the suite times them off): extra_info x_value_checks = checked / unchecked")


def cpu_pressure():
    """Linux PSI ``some avg60``: % of the last minute in which some task waited for a
    CPU (other work competing with the benchmark); None where unavailable."""
    try:
        with open("/proc/pressure/cpu") as f:
            fields = dict(item.split("=") for item in f.readline().split()[1:])
        return float(fields["avg60"])
    except (OSError, KeyError, ValueError):
        return None


class BenchSession:
    """What every benchmark of one session shares."""

    def __init__(self, config):
        opt = config.getoption
        self.config = config
        self.full = opt("--cdm-full")
        self.target = opt("--cdm-target")
        device = opt("--cdm-device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.budget_s = opt("--cdm-budget") or (2.0 if self.full else 0.6)
        self.fused = H.fused_backends(self.device)
        self.value_checks = opt("--cdm-value-checks")
        impls = ["eager", "compile", *self.fused]
        if opt("--cdm-impls"):
            wanted = [s.strip() for s in opt("--cdm-impls").split(",")]
            impls = [i for i in impls if i in wanted]
        self.impls = impls
        self.graphs = [s.strip() for s in opt("--cdm-graphs").split(",")] if opt("--cdm-graphs") else (
            list(H.FULL_GRAPHS) if self.full else ["uniform"])
        dtypes = [s.strip() for s in opt("--cdm-dtypes").split(",")] if opt("--cdm-dtypes") else None
        if opt("--cdm-shapes"):
            plan = [(p, n, d) for p, n in H.parse_shapes(opt("--cdm-shapes")) for d in (dtypes or ["fp32"])]
        else:
            if self.full:
                plan = [(p, n, d) for p in H.FULL_POSITIONS for n in H.FULL_STATES for d in H.FULL_DTYPES]
            else:
                plan = list(H.TARGET_PLAN if self.target else H.DEFAULT_PLAN)
            if dtypes:
                plan = [entry for entry in plan if entry[2] in dtypes]
        self.plan = plan
        ops = H.OPS
        if opt("--cdm-ops"):
            keys = [s.strip() for s in opt("--cdm-ops").split(",")]
            ops = tuple(o for o in H.OPS if any(k in o for k in keys))
        passes = [s.strip() for s in opt("--cdm-passes").split(",")] if opt("--cdm-passes") else ("fwd", "fwd+bwd")
        self.cases = H.plan_cases(plan, self.graphs, ops, passes)
        self.results = {}  # (case.key, impl) -> median seconds
        self._copy_gbps = None
        self._exp_gelem = None
        self.start = time.time()
        self.load_start = os.getloadavg()
        self.pressure_start = cpu_pressure()

    @property
    def copy_gbps(self) -> float:
        if self._copy_gbps is None:  # the rooflines, measured once, at the first result
            self._copy_gbps = H.copy_bandwidth(self.device)
            self._exp_gelem = H.exp_throughput(self.device)
        return self._copy_gbps

    @property
    def exp_gelem(self) -> float:
        if self._exp_gelem is None:
            self._exp_gelem = H.exp_throughput(self.device)
        return self._exp_gelem

    def machine(self) -> dict:
        info = {
            "cpu_model": H.cpu_model(),
            "cores_usable": H.usable_cores(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cdm_kernels": ck.__version__,
            "device": str(self.device),
            "backends": ck.available_backends(self.device),
            "fused_measured": self.fused,
            "loadavg_at_start": [round(v, 2) for v in self.load_start],
            "cpu_pressure_at_start": self.pressure_start,
        }
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.device)
        return info


_SESSION: BenchSession = None


def pytest_configure(config):
    global _SESSION
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:torch")
    torch.set_num_threads(H.usable_cores())
    # each compiled case is compiled once (after a dynamo reset); never fall back to eager silently
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    ck.set_value_checks(False)  # timed as in production; --cdm-value-checks adds the checked time
    _SESSION = H.SESSION = BenchSession(config)


def pytest_report_header(config):
    s = _SESSION
    return [
        f"cdm-kernels benchmarks: device {s.device}, {torch.get_num_threads()} threads, impls {s.impls}, "
        f"graphs {s.graphs}, {len(s.cases)} op cases, budget {s.budget_s}s per measurement"
    ]


@pytest.fixture(scope="session")
def bench_session() -> BenchSession:
    return _SESSION


def pytest_generate_tests(metafunc):
    if "e2e_impl" in metafunc.fixturenames:
        # the same step with the reference ops, then with each fused backend
        impls = ["reference", *_SESSION.fused]
        if metafunc.config.getoption("--cdm-impls"):
            wanted = [s.strip() for s in metafunc.config.getoption("--cdm-impls").split(",")]
            impls = [i for i in impls if i in wanted or (i == "reference" and "eager" in wanted)]
        metafunc.parametrize("e2e_impl", impls)
    if "op_case" in metafunc.fixturenames:
        # case-major, impl-minor: eager, then compile, then the fused backends of one
        # case run back to back (so a fused result can quote both baselines)
        params = [(c, i) for c in _SESSION.cases for i in _SESSION.impls]
        metafunc.parametrize(("op_case", "impl"), params, ids=[f"{c.key}-{i}" for c, i in params])


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["cdm"] = _SESSION.machine()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    s = _SESSION
    output_json["cdm"] = {
        **s.machine(),
        "copy_gbps": s._copy_gbps,
        "exp_gelem_per_s": s._exp_gelem,
        # measured again after the last benchmark: a large difference means the machine's load changed
        "copy_gbps_at_end": H.copy_bandwidth(s.device) if s._copy_gbps is not None else None,
        "loadavg_at_end": [round(v, 2) for v in os.getloadavg()],
        "cpu_pressure_at_end": cpu_pressure(),
        "session_wall_s": round(time.time() - s.start, 1),
        "budget_s": s.budget_s,
        "plan": [list(e) for e in s.plan],
        "graphs": s.graphs,
        "value_checks": bool(config.getoption("--cdm-value-checks")),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
