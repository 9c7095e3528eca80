"""A fixed, seeded Markov chain over tokens: toy data with an exact likelihood.

Sequences ``x = (x_0, ..., x_{L-1})`` with ``x_0 ~ initial`` and
``x_i ~ transition[x_{i-1}]``. Everything is float64 so that exact NLL and KL
values are trustworthy.

The enumeration order of the full support (``enumerate_support``,
``exact_distribution``, ``sequence_index``) is lexicographic: sequence ``x`` has
index ``sum_i x_i * N^(L-1-i)``, i.e. the sequence read as a base-N number.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["MarkovData", "sequence_index", "enumerate_sequences", "MAX_SUPPORT"]

# Largest support enumerated by default: 1e5 float64 probabilities and their
# sequences fit easily in memory, and exact sums over them take milliseconds.
MAX_SUPPORT = 100_000


def _check_tokens(x: torch.Tensor, vocab_size: int, seq_len: int, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer (int64/int32) tensor")
    if x.dim() != 2 or x.shape[1] != seq_len:
        raise ValueError(f"{name} must have shape (n, {seq_len}), got {tuple(x.shape)}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab_size):
        raise ValueError(f"{name} must hold tokens in [0, {vocab_size}), got range "
                         f"[{int(x.min())}, {int(x.max())}]")


def sequence_index(x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Index of each sequence in the lexicographic enumeration.

    x: LongTensor (n, L) with tokens in [0, vocab_size). Returns LongTensor (n,).
    """
    if x.dim() != 2:
        raise ValueError(f"x must have shape (n, L), got {tuple(x.shape)}")
    seq_len = x.shape[1]
    if vocab_size ** seq_len >= 2 ** 63:
        raise ValueError(f"vocab_size^L = {vocab_size}^{seq_len} overflows int64 indices")
    powers = vocab_size ** torch.arange(seq_len - 1, -1, -1, dtype=torch.int64, device=x.device)
    return (x.long() * powers).sum(dim=1)


def enumerate_sequences(vocab_size: int, seq_len: int, max_support: int = MAX_SUPPORT) -> torch.Tensor:
    """All ``vocab_size^seq_len`` sequences in lexicographic order: LongTensor (N^L, L)."""
    support = vocab_size ** seq_len
    if support > max_support:
        raise ValueError(f"support {vocab_size}^{seq_len} = {support} exceeds "
                         f"max_support={max_support}; enumerate only small chains")
    index = torch.arange(support, dtype=torch.int64)
    powers = vocab_size ** torch.arange(seq_len - 1, -1, -1, dtype=torch.int64)
    return (index[:, None] // powers) % vocab_size


class MarkovData:
    """A random but fixed Markov chain, built from ``seed``.

    The initial distribution is ``Dirichlet(concentration)``; each transition
    row is ``(1 - stickiness) * Dirichlet(concentration) + stickiness * e_self``.
    A concentration below 1 makes rows sparse-ish (a few likely successors),
    and stickiness favours repeats; both give strong correlations between
    neighbouring tokens, so a factorised sampler is visibly worse than a joint one.

    The default, 8 tokens x 4 positions, is the package's default data: 4096
    sequences, few enough that every sampler's output distribution is computed
    exactly (``cdm.experiment.exact_metrics``), yet correlated enough that the
    product of its marginals is far from it (its KL: docs/RESULTS.md).

    Attributes: ``vocab_size`` (N), ``seq_len`` (L), ``initial`` float64 (N,),
    ``transition`` float64 (N, N) with rows summing to 1.
    """

    def __init__(self, vocab_size: int = 8, seq_len: int = 4, seed: int = 0,
                 concentration: float = 0.3, stickiness: float = 0.3):
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        if not concentration > 0:
            raise ValueError(f"concentration must be > 0, got {concentration}")
        if not 0.0 <= stickiness < 1.0:
            raise ValueError(f"stickiness must lie in [0, 1), got {stickiness}")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        rng = np.random.default_rng(seed)
        alpha = np.full(vocab_size, float(concentration))
        initial = rng.dirichlet(alpha)
        rows = rng.dirichlet(alpha, size=vocab_size)
        transition = (1.0 - stickiness) * rows + stickiness * np.eye(vocab_size)
        # Dirichlet draws with small concentration can underflow to exact zeros;
        # a floor keeps every sequence possible so log-likelihoods stay finite.
        initial, transition = initial + 1e-12, transition + 1e-12
        self.initial = torch.from_numpy(initial / initial.sum())
        self.transition = torch.from_numpy(transition / transition.sum(axis=1, keepdims=True))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` sequences: LongTensor (n, L). Deterministic given ``generator``'s state."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        # Position-major so that each position's uniforms are contiguous.
        uniforms = torch.rand(self.seq_len, n, generator=generator, dtype=torch.float64)
        # Inverse-CDF sampling, one uniform per token; the clamp guards against
        # a cumulative sum that ends a rounding error below 1.
        initial_cdf = self.initial.cumsum(0)
        transition_cdf = self.transition.cumsum(1)
        last = self.vocab_size - 1
        x = torch.empty(n, self.seq_len, dtype=torch.int64)
        x[:, 0] = torch.searchsorted(initial_cdf, uniforms[0], right=True).clamp_(max=last)
        for i in range(1, self.seq_len):
            rows = transition_cdf[x[:, i - 1]]
            x[:, i] = torch.searchsorted(rows, uniforms[i, :, None], right=True)[:, 0].clamp_(max=last)
        return x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-likelihood of each sequence: x LongTensor (n, L) -> float64 (n,)."""
        _check_tokens(x, self.vocab_size, self.seq_len)
        x = x.long().cpu()
        log_p = self.initial.log()[x[:, 0]]
        if self.seq_len > 1:
            log_p = log_p + self.transition.log()[x[:, :-1], x[:, 1:]].sum(dim=1)
        return log_p

    def enumerate_support(self, max_support: int = MAX_SUPPORT) -> torch.Tensor:
        """All N^L sequences, lexicographic order: LongTensor (N^L, L)."""
        return enumerate_sequences(self.vocab_size, self.seq_len, max_support)

    def exact_distribution(self, max_support: int = MAX_SUPPORT) -> torch.Tensor:
        """Probability of every sequence, in ``enumerate_support`` order: float64 (N^L,)."""
        return self.log_prob(self.enumerate_support(max_support)).exp()

    def sequence_index(self, x: torch.Tensor) -> torch.Tensor:
        """Position of each sequence of x (n, L) in ``enumerate_support``: LongTensor (n,)."""
        _check_tokens(x, self.vocab_size, self.seq_len)
        return sequence_index(x, self.vocab_size)
