"""Shared pieces of the Triton kernels: launch/autotune plumbing, the per-family
coefficient math and the streaming building blocks (online max/sum-exp,
the inverse-CDF block scan).

Layout conventions of every "row kernel": a program owns ``BLOCK_P`` positions
(rows of the flattened ``(P, N)`` inputs) and streams the vocabulary in
``BLOCK_N`` chunks, so ``N`` up to 256k never has to fit in registers. Row
offsets are int64 (``P * N`` may exceed 2^31). Reductions run in float32 (or
float64 for float64 inputs and dense graphs) whatever the storage dtype.

On a GPU the block sizes are autotuned (``triton.autotune``, keyed on ``N``);
``CDM_KERNELS_TRITON_AUTOTUNE=0`` uses one config chosen from ``N`` instead
(:func:`fixed_config`): no timing runs, so no host synchronisation at a new
``N`` (CUDA-graph capture) and one compile per kernel (the GPU tests). Under
``TRITON_INTERPRET=1`` (CPU tensors, no driver) one fixed small config is used,
:data:`INTERPRET_BLOCKS` (32-wide vocabulary blocks, so the loops run several
times on the tests' N = 130).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
import triton
import triton.language as tl

UNIFORM, ABSORBING, DENSE = 0, 1, 2
FAMILIES = (UNIFORM, ABSORBING, DENSE)

#: mirrors ``reference.POSTERIOR_FLOOR`` = 1 / FLOOR_INV (1e10 is exact in float32,
#: so ``x / FLOOR_INV`` is the correctly rounded ``1e-10 x`` in either precision)
FLOOR_INV = tl.constexpr(1e10)
#: the floor never drops below float32's smallest normal number, so the normaliser
#: cannot vanish (the reference uses its dtype's; they differ only for float64 past tau + M ~ 64)
SMALLEST_FLOOR = tl.constexpr(1.1754943508222875e-38)

#: True when kernels run under Triton's CPU interpreter
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: False: one config per N from fixed_config() instead of autotuning (read at import)
AUTOTUNE = os.environ.get("CDM_KERNELS_TRITON_AUTOTUNE", "1") != "0"


def _version(text: str) -> tuple:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


if INTERPRET:
    import numpy

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        # its interpreter calls range() on a 1-element array: every vocabulary loop fails
        raise ImportError(
            f"the interpreter of triton {triton.__version__} cannot run loops with a runtime bound under "
            f"numpy {numpy.__version__}; use triton >= 3.7 or numpy < 2.4 (GPU runs are unaffected)"
        )

#: the longest row a GPU program holds in registers (``ONE_BLOCK``): every pass
#: after the first then reads registers, not memory; longer rows stream in blocks
ONE_BLOCK_MAX = 16384

#: the fixed config used under the interpreter (tests may change these dicts)
INTERPRET_BLOCKS: Dict[str, int] = {"BLOCK_P": 8, "BLOCK_N": 32}
INTERPRET_DENSE_BLOCKS: Dict[str, int] = {"BLOCK_P": 8, "BLOCK_I": 64, "BLOCK_J": 64}

#: when a list, every launch appends (jit function, positional args, constexpr kwargs, kind):
#: the ahead-of-time compilation test replays them for a GPU target
RECORD: Optional[List[tuple]] = None


# ----------------------------------------------------------------------------- configs


def row_configs() -> List[triton.Config]:
    """GPU configs of the row kernels: one long row per program for large
    vocabularies, several short rows per program for small ones."""
    configs = [
        triton.Config({"BLOCK_P": 1, "BLOCK_N": 1024}, num_warps=4),
        triton.Config({"BLOCK_P": 1, "BLOCK_N": 2048}, num_warps=8),
        triton.Config({"BLOCK_P": 1, "BLOCK_N": 4096}, num_warps=8),
        triton.Config({"BLOCK_P": 4, "BLOCK_N": 256}, num_warps=4),
        triton.Config({"BLOCK_P": 16, "BLOCK_N": 64}, num_warps=4),
        triton.Config({"BLOCK_P": 32, "BLOCK_N": 32}, num_warps=4),
        triton.Config({"BLOCK_P": 64, "BLOCK_N": 16}, num_warps=4),
    ]
    return configs


def one_block_configs(n: int) -> List[triton.Config]:
    """GPU configs of a row kernel whose rows fit one block (``ONE_BLOCK``): the
    block spans the whole row, which stays in registers between the passes."""
    width = max(16, triton.next_power_of_2(n))
    if width <= 256:
        return [triton.Config({"BLOCK_P": rows, "BLOCK_N": width}, num_warps=4) for rows in (4, 16, 32)
                if rows * width <= 8192]
    warps = min(16, max(4, width // 512))
    return [triton.Config({"BLOCK_P": 1, "BLOCK_N": width}, num_warps=w) for w in sorted({warps, min(16, 2 * warps)})]


def fits_one_block(n: int) -> bool:
    """Whether a row of ``n`` states is held in registers (``ONE_BLOCK``)."""
    return n <= (INTERPRET_BLOCKS["BLOCK_N"] if INTERPRET else ONE_BLOCK_MAX)


def stream_chunks(n: int) -> int:
    """How many vocabulary blocks a row of ``n`` states spans at most (a power of
    two; 1 when it fits one block): the narrowest block any config may launch."""
    if fits_one_block(n):
        return 1
    narrowest = INTERPRET_BLOCKS["BLOCK_N"] if INTERPRET else min(
        c.kwargs["BLOCK_N"] for c in prune_row_configs(row_configs(), {"N": n}))
    return triton.next_power_of_2(triton.cdiv(n, narrowest))


def prune_row_configs(configs, named_args, **kwargs):
    """Drop blocks wider than the vocabulary and multi-row programs for long rows;
    a kernel told ``ONE_BLOCK`` gets :func:`one_block_configs` instead."""
    n = int(named_args["N"])
    if kwargs.get("ONE_BLOCK"):
        return one_block_configs(n)
    width = max(16, triton.next_power_of_2(n))
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_N"] <= width and (c.kwargs["BLOCK_P"] == 1 or n <= 4096)
        and (c.kwargs["BLOCK_P"] > 1 or n > 256)
    ]
    return kept or [configs[0]]


def fixed_config(kind: str, n: int, one_block: bool = False) -> triton.Config:
    """The config used without autotuning: the first row config that
    :func:`prune_row_configs` keeps for this N (dense kernels: the middle one)."""
    if kind == "dense":
        return dense_configs()[1]
    return prune_row_configs(row_configs(), {"N": n}, ONE_BLOCK=one_block)[0]


def launch_configs(kind: str, one_block: bool = False) -> List[triton.Config]:
    """Every GPU config a kernel of ``kind`` may launch with (``one_block``: those of
    the longest row held in registers)."""
    if kind == "dense":
        return dense_configs()
    return one_block_configs(ONE_BLOCK_MAX) if one_block else row_configs()


def dense_configs() -> List[triton.Config]:
    return [
        triton.Config({"BLOCK_P": 4, "BLOCK_I": 16, "BLOCK_J": 32}, num_warps=4),
        triton.Config({"BLOCK_P": 8, "BLOCK_I": 16, "BLOCK_J": 64}, num_warps=4),
        triton.Config({"BLOCK_P": 16, "BLOCK_I": 8, "BLOCK_J": 64}, num_warps=8),
    ]


class Kernel:
    """A ``@triton.jit`` function plus, on a GPU, its autotuned wrapper."""

    def __init__(self, fn, kind: str):
        self.fn = fn  # the JITFunction (what the AOT test compiles)
        self.kind = kind  # "row" or "dense"
        self.tuned = None
        if not INTERPRET and AUTOTUNE:
            if kind == "row":
                self.tuned = triton.autotune(
                    configs=row_configs(), key=["N"], prune_configs_by={"early_config_prune": prune_row_configs}
                )(fn)
            else:
                self.tuned = triton.autotune(configs=dense_configs(), key=["N"])(fn)

    def __call__(self, grid_rows: int, *args, grid_cols: int = 0, **constexprs):
        """Launch over ``grid_rows`` positions (and, for dense kernels, ``grid_cols``
        output columns); ``constexprs`` are the non-block compile-time arguments."""
        if grid_rows == 0:
            return
        n = int(args[self.fn.arg_names.index("N")])  # every kernel takes N as a runtime argument
        if "ONE_BLOCK" in self.fn.arg_names:
            constexprs["ONE_BLOCK"] = fits_one_block(n)
        if RECORD is not None:
            RECORD.append((self.fn, args, dict(constexprs), self.kind))
        if INTERPRET:
            blocks = INTERPRET_BLOCKS if self.kind == "row" else INTERPRET_DENSE_BLOCKS
            grid = (triton.cdiv(grid_rows, blocks["BLOCK_P"]),)
            if self.kind == "dense":
                grid = grid + (triton.cdiv(grid_cols, blocks["BLOCK_J"]),)
            self.fn[grid](*args, **constexprs, **blocks)
            return
        if self.kind == "row":

            def grid(meta):
                return (triton.cdiv(grid_rows, meta["BLOCK_P"]),)

        else:

            def grid(meta):
                return (triton.cdiv(grid_rows, meta["BLOCK_P"]), triton.cdiv(grid_cols, meta["BLOCK_J"]))

        if not AUTOTUNE:
            config = fixed_config(self.kind, n, constexprs.get("ONE_BLOCK", False))
            self.fn[grid(config.kwargs)](*args, **constexprs, **config.kwargs, num_warps=config.num_warps)
            return

        self.tuned[grid](*args, **constexprs)


def row_kernel(fn) -> Kernel:
    return Kernel(fn, "row")


def dense_kernel(fn) -> Kernel:
    return Kernel(fn, "dense")


# ----------------------------------------------------------------------------- host-side helpers


def check_family(family: int, evals, vecs, vecs_inv, n: int, device) -> tuple:
    """Validate the graph descriptor; returns float64 contiguous eigen tensors (dense) or Nones."""
    if family not in FAMILIES:
        raise ValueError(f"family must be 0 (uniform), 1 (absorbing) or 2 (dense), got {family}")
    if family != DENSE:
        return None, None, None
    if evals is None or vecs is None or vecs_inv is None:
        raise ValueError("a dense graph (family 2) needs evals, vecs and vecs_inv")
    out = []
    for t, shape in ((evals, (n,)), (vecs, (n, n)), (vecs_inv, (n, n))):
        if tuple(t.shape) != shape:
            raise ValueError(f"dense graph tensors must have shapes ({n},), ({n}, {n}); got {tuple(t.shape)}")
        out.append(t.to(device=device, dtype=torch.float64).contiguous())
    return tuple(out)


def schema(arguments: str, returns: str = "Tensor") -> str:
    """A Triton op's schema: the graph descriptor, then ``arguments``, returning
    ``returns`` (the C++ op of the same name has the same one, csrc/ops.cpp)."""
    return f"(int family, Tensor? evals, Tensor? vecs, Tensor? vecs_inv, {arguments}) -> {returns}"


def compute_f64(*tensors: torch.Tensor) -> bool:
    """Whether the kernels accumulate in float64 (float64 storage)."""
    return any(t.dtype == torch.float64 for t in tensors)


def prepare(family: int, evals, vecs, vecs_inv, n: int, x: Optional[torch.Tensor], tau: torch.Tensor,
            *rows: torch.Tensor) -> tuple:
    """The arguments of a Triton op as its kernels want them: the checked graph
    tensors, ``x`` contiguous int64 (or None), ``tau`` contiguous float64, then
    each of ``rows`` contiguous."""
    graph = check_family(family, evals, vecs, vecs_inv, n, tau.device)
    x = None if x is None else x.contiguous().long()
    return (graph, x, tau.to(torch.float64).contiguous(), *(t.contiguous() for t in rows))


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def program_rows(P, N, BLOCK_P: tl.constexpr):
    """This program's positions, their mask and their int64 row offsets."""
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    return rows, rows < P, rows.to(tl.int64) * N


@triton.jit
def row_tile(start, base, rmask, N, BLOCK_N: tl.constexpr):
    """The vocabulary block at ``start``: its state ids, the in-bounds mask of the
    ``[BLOCK_P, BLOCK_N]`` tile and the tile's element offsets."""
    cols = start + tl.arange(0, BLOCK_N)
    return cols, rmask[:, None] & (cols[None, :] < N), base[:, None] + cols[None, :]


@triton.jit
def row_cache(ptr, base, rmask, N, ONE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """When the row fits one block (``ONE_BLOCK``): its ``[BLOCK_P, BLOCK_N]`` tile of
    ``ptr``, read once and kept in registers for every pass; else nothing (0: each
    pass streams the row from memory)."""
    if ONE_BLOCK:
        cols, msk, offs = row_tile(0, base, rmask, N, BLOCK_N)
        cache = tl.load(ptr + offs, mask=msk, other=0.0)
    else:
        cache = 0.0
    return cache


@triton.jit
def tile_load(ptr, offs, msk, other, cache, ONE_BLOCK: tl.constexpr):
    """A tile of ``ptr`` (``other`` outside ``msk``): from the registers of
    :func:`row_cache` when the row fits one block, else from memory. Half types
    come back as float32 from the registers (exact; every caller widens them)."""
    if ONE_BLOCK:
        if cache.dtype == tl.bfloat16 or cache.dtype == tl.float16:
            cache = cache.to(tl.float32)
        v = tl.where(msk, cache, other)
    else:
        v = tl.load(ptr + offs, mask=msk, other=other)
    return v


@triton.jit
def row_sum(ptr, base, rmask, N, cache, CT: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """``sum_y ptr[row, y]`` per row, in ``CT`` (0 for masked rows)."""
    total = tl.zeros([BLOCK_P], CT)
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        total += tl.sum(tile_load(ptr, offs, msk, 0.0, cache, ONE_BLOCK).to(CT), axis=1)
    return total


@triton.jit
def upstream_scale(gl_ptr, rows, rmask, FROM_TARGET: tl.constexpr, LOSS: tl.constexpr, CT: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    """The per-row factor of the upstream gradient: ``-grad_loss`` when it is built
    from the target (the matching loss's backward), -1 in the loss's forward with its
    gradient (``LOSS``: ``grad_loss = 1``), else 1."""
    if LOSS:
        gscale = tl.full([BLOCK_P], -1.0, CT)
    elif FROM_TARGET:
        gscale = -tl.load(gl_ptr + rows, mask=rmask, other=0.0).to(CT)
    else:
        gscale = tl.full([BLOCK_P], 1.0, CT)
    return gscale


@triton.jit
def expm1_f64(t):
    """``e^t - 1`` in float64, accurate for small ``|t|`` (Taylor below 1e-2)."""
    poly = t * (1.0 + t / 2.0 * (1.0 + t / 3.0 * (1.0 + t / 4.0 * (1.0 + t / 5.0 * (
        1.0 + t / 6.0 * (1.0 + t / 7.0 * (1.0 + t / 8.0)))))))
    return tl.where(tl.abs(t) < 1e-2, poly, tl.exp(t) - 1.0)


@triton.jit
def decay_coefficients(tau):
    """``alpha = e^-tau`` and ``1 - alpha = -expm1(-tau)`` (float64 in, float64 out)."""
    tau = tau.to(tl.float64)
    return tl.exp(-tau), -expm1_f64(-tau)


@triton.jit
def spread(oma, total, N, FAMILY: tl.constexpr):
    """What a closed-form kernel adds from a row's sum: ``(1 - alpha) / N`` of it
    to every state (uniform), ``(1 - alpha)`` of it to one state (absorbing)."""
    if FAMILY == 0:
        add = oma / N * total
    else:
        add = oma * total
    return add


@triton.jit
def online_step(m, s, vals):
    """One block of an online max / sum-exp: ``vals`` [BP, BN] (excluded entries -inf),
    ``m``, ``s`` [BP]; returns the running max, ``sum exp(v - max)``, the finite
    shift used and the block's ``exp(vals - shift)``. One exp per element, one per
    row per block."""
    m_new = tl.maximum(m, tl.max(vals, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp(vals - m_safe[:, None])
    s = s * tl.exp(m - m_safe) + tl.sum(e, axis=1)
    return m_new, s, m_safe, e


@triton.jit
def online_update(m, s, vals):
    """:func:`online_step`'s running max and sum-exp."""
    m, s, m_safe, e = online_step(m, s, vals)
    return m, s


@triton.jit
def scan_step(p, cols, target, carry, found, result, lastpos):
    """One block of the inverse-CDF search, the sampling rule of every backend
    (csrc/cpu/fused_euler_step.cpp ``pick``). ``p`` [BP, BN] non-negative masses
    in the compute dtype (0 outside the row), ``cols`` [BP or 1, BN] their state ids,
    ``target`` [BP] the float64 uniform times the float64 sum of the masses
    (:func:`mass_total`), ``carry`` [BP] the float64 mass before this block. The
    masses are summed in float64, so a state far below float32's resolution
    relative to its row's running CDF is still drawn at its rate. A state is
    picked where the running CDF first exceeds the target and its own mass is
    positive (never a zero-probability state); ``lastpos`` tracks the last state
    with mass for rows whose target rounding walks past the end."""
    p = p.to(tl.float64)
    cdf = tl.cumsum(p, axis=1) + carry[:, None]
    hit = (cdf > target[:, None]) & (p > 0)
    first = tl.min(tl.where(hit, cols, 2147483647), axis=1)
    newly = (found == 0) & (first < 2147483647)
    result = tl.where(newly, first, result)
    found = tl.where(newly, 1, found)
    lastpos = tl.maximum(lastpos, tl.max(tl.where(p > 0, cols, -1), axis=1))
    carry = carry + tl.sum(p, axis=1)
    return carry, found, result, lastpos


@triton.jit
def mass_total(total, p):
    """``total`` [BP] plus the float64 sum of one block of masses ``p`` [BP, BN]."""
    return total + tl.sum(p.to(tl.float64), axis=1)


@triton.jit
def finish_scan(found, result, lastpos, x):
    """The picked state; falls back to the last state with mass, then to ``x``
    (a row without any mass, which valid inputs never produce)."""
    fallback = tl.where(lastpos >= 0, lastpos, x)
    return tl.where(found != 0, result, fallback)


#: the interpreter converts float32 to bfloat16 by truncation (a GPU rounds to
#: nearest even): under it, :func:`to_store` rounds by hand so that tests see the
#: accuracy the GPU delivers
_MANUAL_BF16_ROUNDING = tl.constexpr(INTERPRET)


@triton.jit
def to_store(val, ptr):
    """``val`` cast to ``ptr``'s element type, rounding to nearest even; half types
    go through float32 (the interpreter also mis-converts float64 to bfloat16)."""
    ty: tl.constexpr = ptr.dtype.element_ty
    if ty == tl.bfloat16 or ty == tl.float16:
        val = val.to(tl.float32)
    if ty == tl.bfloat16 and _MANUAL_BF16_ROUNDING:
        bits = val.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        val = tl.where(val != val, val, rounded)  # NaN stays NaN
    return val.to(ty)
