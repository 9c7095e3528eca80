"""``fused_euler_step``: one reverse step, fused (kernel evaluation, inversion, sampling)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..backends import select_backend
from ._compiled import run_on_rows
from ._validation import (check_graph, check_invertible, check_scores, check_tau, check_tokens, kernel_checks,
                          value_checks_enabled)

METHOD_IDS = {"analytic": 0, "euler": 1}


def seed_and_offset(generator: Optional[torch.Generator], draws: int) -> torch.Tensor:
    """The Philox ``[seed, offset]`` (a CPU int64 tensor) for one call that needs
    ``draws`` uniforms, taken from ``generator`` so that every call gets fresh
    numbers and a seeded generator replays them.

    A CPU generator (or None: the default CPU generator, seeded by
    ``torch.manual_seed``) yields a fresh 62-bit seed per call, drawn on the
    host: no device synchronisation even for CUDA inputs. A CUDA generator
    lends its own Philox state: its seed, and its offset, advanced past this
    call's draws.
    """
    if generator is None or generator.device.type == "cpu":
        seed = torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64)
        return torch.cat([seed, seed.new_zeros(1)])
    offset = generator.get_offset()
    generator.set_offset(offset + draws)
    return torch.tensor([generator.initial_seed() & (2**63 - 1), offset], dtype=torch.int64)


def fused_euler_step(
    graph,
    log_score: torch.Tensor,
    x: torch.Tensor,
    tau_t,
    tau_s,
    *,
    method: str = "analytic",
    generator: Optional[torch.Generator] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """One reverse step from total noise ``tau_t`` to ``tau_s < tau_t``: ``x_s``, int64 of ``x``'s shape.

    ``method="analytic"``: the exact per-token bridge of MATH.md section 3,
    ``P(y) = K(Delta)[y, x] sum_a q(a) K(tau_s)[a, y] / K(tau_t)[a, x]`` from the
    (clamped) conditional ``q``, exact for exact scores and a distribution for
    any scores. ``method="euler"``: the first-order step
    ``P(y) = Delta Q[y, x] r_y`` (``y != x``), clamped and renormalised.
    ``tau_s = 0`` samples from ``p_0|t`` (never the absorbing mask).
    ``generator`` makes draws reproducible; backends draw differently
    (``cpp``/``triton`` share Philox; ``reference`` uses ``torch.rand``).
    """
    check_graph(graph)
    if method not in METHOD_IDS:
        raise ValueError(f"method must be one of {tuple(METHOD_IDS)}, got {method!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    in_kernel = kernel_checks("fused_euler_step", graph, backend, log_score)
    log_score = check_scores(log_score, graph, "log_score", scan=not in_kernel)
    x = check_tokens(x, log_score.shape[:-1], graph.num_states, log_score.device, scan=in_kernel != "all")
    tau_t = check_tau(tau_t, x.shape, x.device, "tau_t", scan=in_kernel != "all")
    tau_s = check_tau(tau_s, x.shape, x.device, "tau_s", scan=in_kernel != "all")
    check_invertible(graph, tau_t, "tau_t")
    if in_kernel != "all" and value_checks_enabled() and (tau_s >= tau_t).any():
        raise ValueError("tau_s must be < tau_t (a reverse step goes from more noise to less)")
    chosen = select_backend(backend, log_score.device)
    if chosen == "reference":
        return reference.fused_euler_step(graph, log_score.contiguous(), x.contiguous(), tau_t, tau_s, method,
                                          generator)
    extra = (METHOD_IDS[method], seed_and_offset(generator, x.numel()))
    return run_on_rows("fused_euler_step", chosen, graph, log_score, x, tau_t, tau_s, extra=extra).view(x.shape)


def register(prefix: str) -> None:
    @torch.library.register_fake(f"cdm_kernels::{prefix}fused_euler_step")
    def _(family, evals, vecs, vecs_inv, log_score, x, tau_t, tau_s, method, seed_offset):
        return torch.empty_like(x)
