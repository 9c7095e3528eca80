"""Rate-matrix graphs: the forward CTMC of one token (MATH.md section 1).

Row convention: ``Q[i, j] >= 0`` (i != j) is the rate of jumping ``i -> j``;
rows sum to 0; ``K(tau) = expm(tau Q)`` and ``K[a, x] = P(x_t = x | x_0 = a)``.

Every graph hands the backends the same small descriptor (``family_id`` and,
for dense graphs, the float64 eigen-decomposition ``Q = V diag(lam) V^-1``), so
a backend never needs to know which Python class it was given.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["Graph", "UniformGraph", "AbsorbingGraph", "DenseGraph", "ordinal_graph"]

UNIFORM, ABSORBING, DENSE = 0, 1, 2


def _check_num_states(num_states) -> int:
    if isinstance(num_states, bool) or not isinstance(num_states, int):
        raise TypeError(f"num_states must be an int, got {type(num_states).__name__}")
    if num_states < 2:
        raise ValueError(f"num_states must be >= 2, got {num_states}")
    return num_states


def _tau_tensor(tau) -> torch.Tensor:
    tau = torch.as_tensor(tau, dtype=torch.float64)
    if not torch.isfinite(tau).all():
        raise ValueError("tau must be finite")
    return tau


class Graph:
    """Base class: a forward CTMC over ``num_states`` states.

    Subclasses define ``family_id`` and the dense ``rate_matrix``; ``kernel``
    is provided for tests and small N (it forms the full N x N matrix).
    """

    family_id: int
    family: str
    num_states: int

    def rate_matrix(self) -> torch.Tensor:
        """The generator Q, (N, N) float64, rows summing to 0."""
        raise NotImplementedError

    def kernel(self, tau) -> torch.Tensor:
        """Dense ``K(tau) = expm(tau Q)``, (N, N) float64 (tau: a float)."""
        raise NotImplementedError

    def spectral(self, device=None) -> Tuple[Optional[torch.Tensor], ...]:
        """``(eigenvalues, V, V^-1)`` as float64 tensors on ``device``;
        ``(None, None, None)`` for families with closed forms."""
        return (None, None, None)

    def descriptor(self, device=None) -> tuple:
        """What every compiled backend receives: ``(family_id, eigenvalues, V, V^-1)``."""
        return (self.family_id, *self.spectral(device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_states={self.num_states})"


class UniformGraph(Graph):
    """``Q = 11^T / N - I``: every state jumps to every state (itself included)
    at rate 1/N, SEDD's normalisation. ``K(tau) = alpha I + beta 11^T`` with
    ``alpha = e^-tau``, ``beta = (1 - e^-tau) / N``."""

    family_id = UNIFORM
    family = "uniform"

    def __init__(self, num_states: int):
        self.num_states = _check_num_states(num_states)

    def rate_matrix(self) -> torch.Tensor:
        n = self.num_states
        return torch.full((n, n), 1.0 / n, dtype=torch.float64) - torch.eye(n, dtype=torch.float64)

    def kernel(self, tau) -> torch.Tensor:
        tau = _tau_tensor(tau)
        n = self.num_states
        alpha = torch.exp(-tau)
        beta = -torch.expm1(-tau) / n
        return alpha * torch.eye(n, dtype=torch.float64) + beta * torch.ones(n, n, dtype=torch.float64)


class AbsorbingGraph(Graph):
    """Absorbing ("masked") diffusion: state ``mask = N - 1`` absorbs; every other
    state jumps to it at rate 1. ``K[a, a] = e^-tau``, ``K[a, mask] = 1 - e^-tau``
    for ``a != mask``; the mask row is ``e_mask``. Clean data never holds the mask."""

    family_id = ABSORBING
    family = "absorbing"

    def __init__(self, num_states: int):
        self.num_states = _check_num_states(num_states)

    @property
    def mask(self) -> int:
        return self.num_states - 1

    def rate_matrix(self) -> torch.Tensor:
        n, m = self.num_states, self.mask
        q = -torch.eye(n, dtype=torch.float64)
        q[:, m] += 1.0
        return q  # row m: -1 + 1 = 0

    def kernel(self, tau) -> torch.Tensor:
        tau = _tau_tensor(tau)
        n, m = self.num_states, self.mask
        k = torch.exp(-tau) * torch.eye(n, dtype=torch.float64)
        k[:, m] = -torch.expm1(-tau)
        k[m, m] = 1.0
        return k


class DenseGraph(Graph):
    """Any generator ``Q`` that is diagonalisable with a real spectrum.

    ``Q`` is eigen-decomposed once, in float64: for a reversible ``Q`` (detailed
    balance with a positive stationary distribution pi) through ``eigh`` of the
    symmetrisation ``D^1/2 Q D^-1/2``, ``D = diag(pi)``, which is exact and well
    conditioned; otherwise through ``eig``, refusing a complex spectrum or an
    ill-conditioned eigenbasis (the kernels would silently lose digits).

    The inversion of scores (``K(tau)^-T r``) amplifies rounding in ``r`` by up
    to ``e^{tau (lambda_max - lambda_min)}``: a wide spectrum (e.g. a
    birth-death chain over many states) needs float64 scores at large tau.
    The kernels themselves always work in float64 for dense graphs.
    """

    family_id = DENSE
    family = "dense"

    #: the largest condition number of V accepted for a non-reversible Q
    max_condition = 1e8

    def __init__(self, rate_matrix: torch.Tensor):
        q = torch.as_tensor(rate_matrix).detach().to("cpu", torch.float64)
        if q.ndim != 2 or q.shape[0] != q.shape[1]:
            raise ValueError(f"rate_matrix must be square (N, N), got shape {tuple(q.shape)}")
        n = _check_num_states(q.shape[0])
        if not torch.isfinite(q).all():
            raise ValueError("rate_matrix must be finite")
        off_diagonal = q - torch.diag(torch.diagonal(q))
        if (off_diagonal < 0).any():
            raise ValueError("rate_matrix must have non-negative off-diagonal entries (row convention)")
        scale = q.abs().max().item()
        if scale == 0:
            raise ValueError("rate_matrix must not be all zero")
        if (q.sum(dim=1).abs() > 1e-9 * scale * n).any():
            raise ValueError("rate_matrix rows must sum to 0 (row convention: Q[i, j] is the rate i -> j)")
        self.num_states = n
        self._q = q
        self._eigenvalues, self._vecs, self._vecs_inv = self._decompose(q)
        self._device_cache = {}

    @staticmethod
    def _stationary(q: torch.Tensor) -> Optional[torch.Tensor]:
        """The stationary distribution if Q is irreducible enough to have a
        strictly positive one (left null vector), else None."""
        evals, evecs = torch.linalg.eig(q.T)
        k = torch.argmin(evals.abs())
        pi = evecs[:, k].real
        pi = pi / pi.sum()
        if not torch.isfinite(pi).all() or (pi <= 0).any():
            return None
        return pi

    @classmethod
    def _decompose(cls, q: torch.Tensor):
        scale = q.abs().max().item()
        pi = cls._stationary(q)
        if pi is not None:
            flux = pi[:, None] * q
            if torch.allclose(flux, flux.T, rtol=1e-9, atol=1e-12 * scale):
                root = pi.sqrt()
                sym = root[:, None] * q / root[None, :]
                evals, u = torch.linalg.eigh(0.5 * (sym + sym.T))
                return evals, u / root[:, None], u.T * root[None, :]
        evals, vecs = torch.linalg.eig(q)
        if (evals.imag.abs() > 1e-9 * scale).any():
            raise ValueError("rate_matrix has a complex spectrum; DenseGraph needs real eigenvalues")
        if (evals.real > 1e-9 * scale).any():
            raise ValueError("rate_matrix has a positive eigenvalue; it is not a valid generator")
        vecs = vecs.real
        condition = torch.linalg.cond(vecs).item()
        if not math.isfinite(condition) or condition > cls.max_condition:
            raise ValueError(
                f"rate_matrix is not diagonalisable in a well-conditioned basis (cond(V) = {condition:.3g} "
                f"> {cls.max_condition:.0e}); the eigenbasis kernels would be inaccurate"
            )
        order = torch.argsort(evals.real)
        evals, vecs = evals.real[order], vecs[:, order]
        return evals, vecs, torch.linalg.inv(vecs)

    def rate_matrix(self) -> torch.Tensor:
        return self._q.clone()

    def kernel(self, tau) -> torch.Tensor:
        tau = _tau_tensor(tau)
        return (self._vecs * torch.exp(tau * self._eigenvalues)) @ self._vecs_inv

    def spectral(self, device=None):
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type != "cpu" and device.index is None:
            # "cuda" and "cuda:0" are one device: key the cache by the explicit index, so an
            # op on x.device ("cuda:0") finds what descriptor("cuda") copied (no second copy, no sync)
            device = torch.device(device.type, getattr(torch, device.type).current_device())
        if device not in self._device_cache:
            self._device_cache[device] = tuple(
                t.to(device) for t in (self._eigenvalues, self._vecs, self._vecs_inv)
            )
        return self._device_cache[device]


def ordinal_graph(num_states: int, kind: str = "gaussian", bandwidth: float = 0.25) -> DenseGraph:
    """A reversible graph for ordinal data (pixel intensities): nearby states
    exchange faster than distant ones.

    ``kind="birth_death"``: jumps to the two neighbours only.
    ``kind="gaussian"``: discretised-Gaussian rates ``exp(-(i - j)^2 / (2 (bandwidth (N-1))^2))``
    (D3PM-style), symmetric, so the stationary law is uniform.

    Both are normalised so that the slowest decaying mode has rate 1 (spectral
    gap 1): under the same noise schedule the chain mixes on the same time
    scale as ``UniformGraph`` does (``e^-tau``).
    """
    n = _check_num_states(num_states)
    idx = torch.arange(n, dtype=torch.float64)
    distance = idx[:, None] - idx[None, :]
    if kind == "birth_death":
        rates = (distance.abs() == 1).to(torch.float64)
    elif kind == "gaussian":
        if not (isinstance(bandwidth, (int, float)) and bandwidth > 0 and math.isfinite(bandwidth)):
            raise ValueError(f"bandwidth must be a positive float, got {bandwidth!r}")
        rates = torch.exp(-distance**2 / (2 * (bandwidth * (n - 1)) ** 2))
        rates.fill_diagonal_(0.0)
    else:
        raise ValueError(f"kind must be 'birth_death' or 'gaussian', got {kind!r}")
    q = rates - torch.diag(rates.sum(dim=1))
    gap = -torch.linalg.eigvalsh(q)[-2]  # eigenvalues ascending; the last is 0
    return DenseGraph(q / gap)
