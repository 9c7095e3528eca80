"""Noise schedules, as in SEDD (docs/MATH.md section 1).

A schedule maps time ``t`` in [0, 1] to the total noise ``tau(t)`` (SEDD's
``total_noise``; the value handed to the score network as ``sigma``) and to its
rate ``d tau / dt`` (SEDD's ``rate_noise``; the factor in front of ``Q``).

Both methods accept a Python float (and return a float) or a floating tensor of
any shape (and return a tensor of the same shape, dtype and device). Tensor
inputs are range-checked, which costs one host sync on an accelerator.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NoiseSchedule", "GeometricNoise", "LogLinearNoise", "get_noise"]


def _check_time(t: float | torch.Tensor) -> None:
    """Raise TypeError/ValueError unless ``t`` is a float or floating tensor in [0, 1]."""
    if isinstance(t, torch.Tensor):
        if not t.is_floating_point():
            raise TypeError(f"t must be a floating tensor, got dtype {t.dtype}")
        if t.numel() and bool(((t < 0) | (t > 1) | t.isnan()).any()):
            raise ValueError("t must lie in [0, 1]; got values outside it")
    elif isinstance(t, (float, int)) and not isinstance(t, bool):
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must lie in [0, 1], got {t}")
    else:
        raise TypeError(f"t must be a float or a floating tensor, got {type(t).__name__}")


class NoiseSchedule:
    """Base class: subclasses implement ``_total`` and ``_rate`` on tensors."""

    name: str

    def total(self, t: float | torch.Tensor) -> float | torch.Tensor:
        """Total noise ``tau(t)``, same shape as ``t``."""
        _check_time(t)
        return self._apply(self._total, t)

    def rate(self, t: float | torch.Tensor) -> float | torch.Tensor:
        """Noise rate ``d tau / dt`` at ``t``, same shape as ``t``."""
        _check_time(t)
        return self._apply(self._rate, t)

    @staticmethod
    def _apply(fn, t: float | torch.Tensor) -> float | torch.Tensor:
        if isinstance(t, torch.Tensor):
            return fn(t)
        # Floats are evaluated in float64 so scalar callers lose no precision.
        return float(fn(torch.tensor(float(t), dtype=torch.float64)))

    def _total(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _rate(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class GeometricNoise(NoiseSchedule):
    """``tau(t) = sigma_min^(1-t) * sigma_max^t``; ``rate = tau(t) * log(sigma_max / sigma_min)``.

    As in SEDD, ``tau(0) = sigma_min`` (not 0): the data is never exactly clean.
    SEDD uses it with the uniform graph.
    """

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 20.0):
        if not sigma_min > 0:
            raise ValueError(f"sigma_min must be > 0, got {sigma_min}")
        if not sigma_max > sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min={sigma_min}, got {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def _total(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def _rate(self, t: torch.Tensor) -> torch.Tensor:
        return self._total(t) * self._log_ratio

    def __repr__(self) -> str:
        return f"GeometricNoise(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class LogLinearNoise(NoiseSchedule):
    """``tau(t) = -log(1 - (1 - eps) t)``; ``rate = (1 - eps) / (1 - (1 - eps) t)``.

    Built so that the absorbing graph's masking probability ``1 - e^-tau =
    (1 - eps) t`` is linear in t; ``eps`` keeps ``tau(1) = -log(eps)`` finite.
    SEDD uses it with the absorbing graph.
    """

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must lie in (0, 1), got {eps}")
        self.eps = float(eps)

    def _total(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log1p(-(1.0 - self.eps) * t)

    def _rate(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * t)

    def __repr__(self) -> str:
        return f"LogLinearNoise(eps={self.eps})"


_SCHEDULES = {cls.name: cls for cls in (GeometricNoise, LogLinearNoise)}


def get_noise(name: str, **kwargs) -> NoiseSchedule:
    """Build a schedule by name: ``"geometric"`` or ``"loglinear"``; kwargs go to its constructor."""
    if name not in _SCHEDULES:
        raise ValueError(f"name must be one of {sorted(_SCHEDULES)}, got {name!r}")
    return _SCHEDULES[name](**kwargs)
