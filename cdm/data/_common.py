"""Helpers shared by the data sets that are fixed train/test splits."""

from __future__ import annotations

import torch


def draw_rows(rows: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` rows of ``rows`` (m, L) drawn uniformly with replacement: (n, L)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return rows[torch.randint(len(rows), (n,), generator=generator)]
