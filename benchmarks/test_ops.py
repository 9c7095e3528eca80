"""Every op: eager reference, torch.compile of the reference, each fused backend.

One test per (case, impl), parametrised in conftest.py (case-major, so the
eager and compiled medians of a case are in the session cache when its fused
backends run). Benchmarks report; nothing here asserts a speed.
"""

from __future__ import annotations

import pytest

import _harness as H


def _ratio(base, value):
    return round(base / value, 3) if base and value else None


def test_op(benchmark, bench_session, op_case: H.Case, impl: str):
    s = bench_session
    case, device = op_case, s.device
    H.drop_inputs(keep=case, device=device)
    fits, why = H.fits_in_memory(case, impl, device)
    if not fits:
        pytest.skip(why)
    copy_gbps = s.copy_gbps  # the rooflines are measured before the first result, not in the middle of one

    inputs = H.cached_inputs(case, device)
    runnable = H.build_runnable(case, impl, inputs, device)
    benchmark.group = case.key
    m = H.measure(benchmark, runnable.run, device, s.budget_s, second_warmup=impl != "eager")
    s.results[(case.key, impl)] = (m.median_s, m.cpu_s)

    # the baselines of this case: measured by their own tests just before, or now
    baselines = {}
    for base in ("eager", "compile"):
        # (a baseline deselected with -k is measured here; one left out with --cdm-impls is not)
        if (case.key, base) not in s.results and impl not in ("eager", "compile") and base in s.impls:
            if H.fits_in_memory(case, base, device)[0]:
                other = H.build_runnable(case, base, inputs, device)
                s.results[(case.key, base)] = H.quick_median(other.run, device, s.budget_s)
                del other
        baselines[base] = s.results.get((case.key, base), (None, None))
    checked_s = None
    if s.value_checks and impl in s.fused:  # the same call as a user makes it, value checks on
        checked_s = H.checked_median(runnable.run, device, s.budget_s)
    nbytes = H.min_bytes(case)
    gbps = nbytes / m.median_s / 1e9
    benchmark.extra_info.update(
        op=case.op,
        graph=case.graph,
        P=case.P,
        N=case.N,
        dtype=case.dtype,
        pass_=case.pass_,
        impl=impl,
        device=str(device),
        bytes=nbytes,
        gbps=round(gbps, 3),
        copy_gbps=round(copy_gbps, 3),
        pct_copy_bw=round(100 * gbps / copy_gbps, 2),
        gelem_per_s=round(case.P * case.N / m.median_s / 1e9, 4),
        x_eager=_ratio(baselines["eager"][0], m.median_s),
        x_compile=_ratio(baselines["compile"][0], m.median_s),
        cpu_s=m.cpu_s,
        checked_s=checked_s,
        x_value_checks=round(checked_s / m.median_s, 3) if checked_s else None,
        x_eager_cpu=_ratio(baselines["eager"][1], m.cpu_s),
        x_compile_cpu=_ratio(baselines["compile"][1], m.cpu_s),
        peak_mem_bytes=m.peak_bytes,
        peak_mem_method=m.peak_method,
        warmup_s=round(m.warmup_s, 4),
        compile_s=round(runnable.compile_s, 2) if runnable.compile_s is not None else None,
        rounds=m.rounds,
        iterations=m.iterations,
    )
