"""Argument checks shared by the ops: every bad input becomes a ``TypeError`` or
``ValueError`` naming the argument, before any kernel runs.

Checks on tensor *values* (token range, NaN/inf scores, tau >= 0) read the data,
which costs a host synchronisation on a GPU; :func:`set_value_checks` turns
them off for production GPU runs. They are skipped while ``torch.compile``
traces (a data-dependent branch cannot be compiled into a graph).

The scans of whole ``(P, N)`` inputs (scores finite, the loss's target a
distribution) cost more than the op itself when done here as separate passes;
the compiled kernels of :data:`KERNEL_CHECKS` make them inside the pass they
make anyway and raise the same ``ValueError`` (csrc/value_checks.h), so for
those the fronts leave them out (:func:`kernel_checks`). The CUDA kernels check
the tokens and noise levels too and raise without a host synchronisation: an
error surfaces at the next checked CUDA call, or at :func:`check_value_errors`.
"""

from __future__ import annotations

import numbers

import torch

from ..backends import extension_loaded, select_backend
from ..graphs import DENSE, Graph

SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TOKEN_DTYPES = (torch.int64, torch.int32)

_value_checks = True

#: ``K(-tau) = V diag(e^{tau |lambda|}) V^-1`` overflows float64 (e^709.8) when
#: ``tau |lambda_min|`` nears 709; past this bound a dense inversion gives NaN
MAX_INVERSE_EXPONENT = 700.0


_CHECKED_OPS = ("scores_to_posterior", "posterior_to_scores", "fused_euler_step", "conditional_matching_loss")
#: per compiled backend, the ops whose kernels check values themselves, and which: "rows"
#: the ``(P, N)`` inputs (the cheap per-position checks of x and tau stay here), "all"
#: those and the tokens and noise levels
KERNEL_CHECKS = {"cpp": dict.fromkeys(_CHECKED_OPS, "rows"), "cuda": dict.fromkeys(_CHECKED_OPS, "all")}


def set_value_checks(enabled: bool) -> None:
    """Enable (default) or disable the checks that read tensor values (here and in the kernels)."""
    global _value_checks
    _value_checks = bool(enabled)
    if extension_loaded():
        torch.ops.cdm_kernels._set_value_checks(_value_checks)


def kernel_checks(op: str, graph, backend, scores) -> str:
    """What the kernels of ``op`` check on the backend that ``backend`` resolves to for
    ``scores``: "", "rows" or "all" (:data:`KERNEL_CHECKS`; "" when that backend, the
    graph or the scores are invalid: the checks that follow name the problem). Dense
    graphs on CUDA run through ATen, unchecked."""
    if not isinstance(scores, torch.Tensor) or not isinstance(graph, Graph):
        return ""
    try:
        chosen = select_backend(backend, scores.device)
    except (ValueError, TypeError):
        return ""
    if chosen == "cuda" and graph.family_id == DENSE:
        return ""
    return KERNEL_CHECKS.get(chosen, {}).get(op, "")


def check_value_errors() -> None:
    """Raise the ``ValueError`` that the CUDA kernels of earlier calls found (they record
    errors on the device and raise at the next checked call; this waits for the device)."""
    if extension_loaded():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        torch.ops.cdm_kernels._raise_value_errors()


def value_checks_enabled() -> bool:
    return _value_checks and not torch.compiler.is_compiling()


def check_graph(graph) -> Graph:
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a cdm_kernels Graph (UniformGraph, AbsorbingGraph, DenseGraph), got {type(graph).__name__}")
    return graph


def check_scores(scores, graph: Graph, name: str, allow_minus_inf: bool = False, scan: bool = True) -> torch.Tensor:
    """``(..., N)`` floating tensor with finite values (``-inf`` allowed, as
    probability 0, for log-probabilities when ``allow_minus_inf``); ``scan=False``
    leaves the values to the kernel (:func:`kernel_checks`)."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dtype not in SCORE_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {scores.dtype}")
    if scores.ndim < 1 or scores.shape[-1] != graph.num_states:
        raise ValueError(
            f"{name} must have shape (..., {graph.num_states}) for a graph with {graph.num_states} states, "
            f"got {tuple(scores.shape)}"
        )
    if scan and value_checks_enabled():
        bad = torch.isnan(scores) | (scores == float("inf"))
        if not allow_minus_inf:
            bad |= scores == float("-inf")
        if bad.any():
            raise ValueError(f"{name} contains NaN or inf")
    return scores


def check_tokens(x, shape: torch.Size, num_states: int, device: torch.device, name: str = "x",
                 scan: bool = True) -> torch.Tensor:
    """Integer tokens of exactly ``shape`` in ``[0, num_states)`` (the range left to the
    kernel when not ``scan``); returned as int64."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(x).__name__}")
    if x.dtype not in TOKEN_DTYPES:
        raise TypeError(f"{name} must be int64 or int32 token ids, got {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (the scores' leading dims), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the scores are on {device}")
    if scan and value_checks_enabled() and x.numel() > 0:
        low, high = x.min().item(), x.max().item()
        if low < 0 or high >= num_states:
            raise ValueError(f"{name} holds token ids outside [0, {num_states}): min {low}, max {high}")
    return x.long()


def check_tau(tau, shape: torch.Size, device: torch.device, name: str = "tau", allow_negative: bool = False,
              scan: bool = True) -> torch.Tensor:
    """A float or a tensor broadcastable to ``shape`` (finite and >= 0 unless
    ``allow_negative``; left to the kernel when not ``scan``); returned as contiguous
    float64 of ``shape``."""
    if isinstance(tau, torch.Tensor):
        if not (tau.dtype.is_floating_point or tau.dtype in TOKEN_DTYPES):
            raise TypeError(f"{name} must be a real tensor or a float, got {tau.dtype}")
        if tau.device != device and tau.numel() != 1:
            raise ValueError(f"{name} is on {tau.device} but the inputs are on {device}")
        tau = tau.to(device=device, dtype=torch.float64)
    elif isinstance(tau, numbers.Real) and not isinstance(tau, bool):
        tau = torch.tensor(float(tau), dtype=torch.float64, device=device)
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(tau).__name__}")
    try:
        tau = torch.broadcast_to(tau, shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(tau.shape)} does not broadcast to {tuple(shape)}") from None
    if scan and value_checks_enabled():
        if torch.isnan(tau).any() or torch.isinf(tau).any():
            raise ValueError(f"{name} must be finite, got NaN or inf")
        if not allow_negative and (tau < 0).any():
            raise ValueError(f"{name} must be >= 0 (total noise), got a negative value")
    return tau.contiguous()


def check_invertible(graph: Graph, tau: torch.Tensor, name: str = "tau") -> None:
    """A dense graph's inverse kernel ``K(tau)^-1`` (used by the inversion, and by
    ``apply_kernel`` with a negative ``tau``) must fit in float64: ``|tau| |lambda_min|
    <= MAX_INVERSE_EXPONENT``. Closed-form families have no such limit."""
    if graph.family_id != DENSE or not value_checks_enabled() or tau.numel() == 0:
        return
    rate = -float(graph.spectral()[0].min())  # the fastest decaying mode
    largest = float(tau.abs().max())
    if largest * rate > MAX_INVERSE_EXPONENT:
        raise ValueError(
            f"{name} = {largest:.4g} is too large to invert this dense graph: K(tau)^-1 grows like "
            f"e^(tau * {rate:.4g}) and overflows float64 beyond tau = {MAX_INVERSE_EXPONENT / rate:.4g} "
            "(use fewer states, a smaller tau or a graph with a smaller spectral radius)"
        )

