"""Turn pytest-benchmark JSON from this suite into markdown tables.

    python benchmarks/report.py out.json [more.json ...] [--cpu-time] [--target-positions 8192]

Op results are grouped by case (op, graph, shape, dtype, pass) so that the
eager reference, its torch.compile and each fused backend sit on consecutive
rows. Speedups are recomputed from the medians in the JSON (the eager and
compiled rows of the same case), falling back to the ``extra_info`` ratios
when a baseline is not in the file. ``--stat min`` uses the fastest round
instead of the median. ``--cpu-time`` computes time, GB/s and
ratios from process CPU time per call divided by the torch thread count
instead of wall-clock medians (useful when the machine was shared: CPU time
leaves out the waits for a core; dividing by the threads assumes the call
kept them all busy).
Several files are merged (later files win for the same test).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict

OP_ORDER = (
    "transition_column",
    "apply_kernel",
    "scores_to_posterior",
    "posterior_to_scores",
    "fused_euler_step[analytic]",
    "fused_euler_step[euler]",
    "conditional_matching_loss",
)
GRAPH_ORDER = ("uniform", "absorbing", "dense")
IMPL_ORDER = ("eager", "compile", "cpp", "triton", "cuda")
DTYPE_ORDER = ("fp32", "bf16", "fp16", "fp64")
PASS_ORDER = ("fwd", "fwd+bwd")
TARGET_X_EAGER = 3.0  # issue 2: each fused op >= 3x eager ...
TARGET_X_COMPILE = 1.0  # ... and no slower than torch.compile


def _index(seq, value):
    return seq.index(value) if value in seq else len(seq)


def fmt_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(nbytes):
    if nbytes is None:
        return "-"
    if nbytes < 2**20:
        return f"{nbytes / 2**10:.0f} KiB"
    if nbytes < 2**30:
        return f"{nbytes / 2**20:.1f} MiB"
    return f"{nbytes / 2**30:.2f} GiB"


def fmt_ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def fmt_num(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def load(paths, stat="median"):
    """(op rows, e2e rows, session info) merged over ``paths``; each row's
    ``median_s`` holds the chosen statistic of the rounds (per call)."""
    by_name = OrderedDict()
    info = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        info = {**info, **data.get("machine_info", {}).get("cdm", {}), **data.get("cdm", {})}
        info.setdefault("_datetime", data.get("datetime"))
        for bench in data.get("benchmarks", []):
            by_name[bench["fullname"]] = bench
    ops, e2e = [], []
    for bench in by_name.values():
        extra = bench.get("extra_info", {})
        row = dict(extra)
        row["median_s"] = bench["stats"][stat]
        row["name"] = bench["name"]
        if "op" in extra:
            ops.append(row)
        elif "kind" in extra:
            e2e.append(row)
    return ops, e2e, info


THREADS = 1  # torch threads of the run (set from the JSON): CPU time / THREADS estimates a quiet wall time


def _time_of(row, cpu):
    if not cpu:
        return row["median_s"]
    return row["cpu_s"] / THREADS if row.get("cpu_s") else None


def op_table(ops, cpu=False):
    groups = OrderedDict()
    key = lambda r: (  # noqa: E731
        _index(OP_ORDER, r["op"]), _index(GRAPH_ORDER, r["graph"]), r["P"], r["N"],
        _index(DTYPE_ORDER, r["dtype"]), _index(PASS_ORDER, r["pass_"]),
    )
    for row in sorted(ops, key=lambda r: (key(r), _index(IMPL_ORDER, r["impl"]), r["impl"])):
        groups.setdefault(key(row), []).append(row)
    time_label = "CPU time / threads" if cpu else "time"
    lines = [
        f"| op | graph | B*L x N | dtype | pass | backend | {time_label} | GB/s | % copy BW | x eager | x compile | peak mem |",
        "|---|---|---|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for rows in groups.values():
        base = {r["impl"]: _time_of(r, cpu) for r in rows}
        for r in rows:
            t = _time_of(r, cpu)
            fallback_e = r.get("x_eager_cpu" if cpu else "x_eager")
            fallback_c = r.get("x_compile_cpu" if cpu else "x_compile")
            x_eager = base["eager"] / t if base.get("eager") and t else fallback_e
            x_compile = base["compile"] / t if base.get("compile") and t else fallback_c
            gbps = r["bytes"] / t / 1e9 if t else None
            pct = 100 * gbps / r["copy_gbps"] if gbps and r.get("copy_gbps") else None
            impl = r["impl"] if r["impl"] in ("eager", "compile") else f"**{r['impl']}**"
            lines.append(
                f"| {r['op']} | {r['graph']} | {r['P']} x {r['N']} | {r['dtype']} | {r['pass_']} | {impl} | "
                f"{fmt_time(t)} | {fmt_num(gbps)} | {fmt_num(pct, 1)} | {fmt_ratio(x_eager)} | "
                f"{fmt_ratio(x_compile)} | {fmt_bytes(r.get('peak_mem_bytes'))} |"
            )
    return "\n".join(lines)


def target_table(ops, positions, cpu=False):
    """The issue-2 target: at B*L = ``positions``, fp32, each fused op >= 3x eager, >= 1x compile."""
    cases = OrderedDict()
    for r in ops:
        if r["P"] != positions or r["dtype"] != "fp32":
            continue
        k = (_index(OP_ORDER, r["op"]), r["op"], r["graph"], r["N"], _index(PASS_ORDER, r["pass_"]), r["pass_"])
        cases.setdefault(k, {})[r["impl"]] = r
    if not cases:
        return None
    lines = [
        "| op | graph | N | pass | backend | eager | compile | fused | x eager | x compile | target met |",
        "|---|---|--:|---|---|--:|--:|--:|--:|--:|:-:|",
    ]
    for k in sorted(cases):
        impls = cases[k]
        eager, compiled = impls.get("eager"), impls.get("compile")
        fused = [i for i in impls if i not in ("eager", "compile")]
        for name in sorted(fused, key=lambda i: _index(IMPL_ORDER, i)):
            r = impls[name]
            t = _time_of(r, cpu)
            te = _time_of(eager, cpu) if eager else None
            tc = _time_of(compiled, cpu) if compiled else None
            xe = te / t if te else r.get("x_eager_cpu" if cpu else "x_eager")
            xc = tc / t if tc else r.get("x_compile_cpu" if cpu else "x_compile")
            met = "?" if xe is None or xc is None else ("yes" if xe >= TARGET_X_EAGER and xc >= TARGET_X_COMPILE else "**no**")
            lines.append(
                f"| {k[1]} | {k[2]} | {k[3]} | {k[5]} | {name} | {fmt_time(te)} | {fmt_time(tc)} | {fmt_time(t)} | "
                f"{fmt_ratio(xe)} | {fmt_ratio(xc)} | {met} |"
            )
    if len(lines) == 2:
        return None
    return "\n".join(lines)


def e2e_table(e2e, cpu=False):
    if not e2e:
        return None
    groups = OrderedDict()
    for r in sorted(e2e, key=lambda r: (r["kind"], r["config"], _index(("reference",) + IMPL_ORDER, r["impl"]))):
        groups.setdefault((r["kind"], r["config"]), []).append(r)
    lines = [
        "| benchmark | config | ops | time | throughput | x reference | peak mem |",
        "|---|---|---|--:|--:|--:|--:|",
    ]
    for rows in groups.values():
        ref = next((_time_of(r, cpu) for r in rows if r["impl"] == "reference"), None)
        for r in rows:
            t = _time_of(r, cpu)
            if "tokens_per_s" in r:
                units = r["tokens_per_s"] * r["median_s"]
                throughput = f"{units / t:,.0f} tokens/s"
            else:
                units = r["samples_per_s"] * r["median_s"]
                throughput = f"{units / t:,.2f} samples/s"
            x = ref / t if ref and t else r.get("x_reference_cpu" if cpu else "x_reference")
            lines.append(
                f"| {r['kind']} | {r['config']} | {r['impl']} | {fmt_time(t)} | {throughput} | {fmt_ratio(x)} | "
                f"{fmt_bytes(r.get('peak_mem_bytes'))} |"
            )
    return "\n".join(lines)


def value_checks_table(ops):
    """The cost of the value checks (--cdm-value-checks): a default call against the same
    call with cdm_kernels.set_value_checks(False), per fused op."""
    rows = [r for r in ops if r.get("x_value_checks")]
    if not rows:
        return None
    lines = [
        "| op | graph | B*L x N | dtype | pass | backend | checks off | default (checks on) | ratio |",
        "|---|---|---|---|---|---|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['graph']} | {r['P']} x {r['N']} | {r['dtype']} | {r['pass_']} | {r['impl']} | "
            f"{fmt_time(r['median_s'])} | {fmt_time(r['checked_s'])} | {fmt_ratio(r['x_value_checks'])} |"
        )
    return "\n".join(lines)


def header(info):
    fields = [
        ("date", info.get("date") or info.get("_datetime")),
        ("CPU", f"{info.get('cpu_model')} ({info.get('cores_usable')} usable cores, {info.get('torch_threads')} torch threads)"),
        ("device", info.get("device") + (f" ({info['gpu']})" if info.get("gpu") else "") if info.get("device") else None),
        ("torch / triton", f"{info.get('torch')} / {info.get('triton')}"),
        ("backends available", ", ".join(info.get("backends", []))),
        ("copy bandwidth (start / end of session)",
         f"{info['copy_gbps']:.2f} / {info.get('copy_gbps_at_end') or float('nan'):.2f} GB/s" if info.get("copy_gbps") else None),
        ("exp throughput", f"{info['exp_gelem_per_s']:.3f} G elem/s" if info.get("exp_gelem_per_s") else None),
        ("load average (start / end)", f"{info.get('loadavg_at_start')} / {info.get('loadavg_at_end')}"),
        ("CPU pressure avg60 % (start / end)", f"{info.get('cpu_pressure_at_start')} / {info.get('cpu_pressure_at_end')}"),
        ("session wall time", f"{info['session_wall_s']:.0f} s" if info.get("session_wall_s") else None),
    ]
    return "\n".join(f"- {name}: {value}" for name, value in fields if value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json=...)")
    parser.add_argument("--cpu-time", action="store_true", help="use process CPU time per call instead of wall time")
    parser.add_argument("--stat", choices=("median", "min", "mean"), default="median",
                        help="statistic of the timed rounds (wall clock); min is the least disturbed by other load")
    parser.add_argument("--target-positions", type=int, default=8192, help="B*L of the issue-2 target table")
    parser.add_argument("--no-header", action="store_true")
    args = parser.parse_args(argv)
    global THREADS
    ops, e2e, info = load(args.json, args.stat)
    THREADS = info.get("torch_threads") or 1
    out = []
    if not args.no_header:
        out += [header(info), ""]
    target = target_table(ops, args.target_positions, args.cpu_time)
    if target:
        out += [f"### Target (issue 2): B*L = {args.target_positions}, fp32: fused >= {TARGET_X_EAGER:g}x eager "
                f"and >= {TARGET_X_COMPILE:g}x torch.compile", "", target, ""]
    if ops:
        out += ["### Ops", "", op_table(ops, args.cpu_time), ""]
    table = value_checks_table(ops)
    if table:
        out += ["### Value checks: a default call against one with set_value_checks(False)", "", table, ""]
    table = e2e_table(e2e, args.cpu_time)
    if table:
        out += ["### End to end", "", table, ""]
    sys.stdout.write("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
