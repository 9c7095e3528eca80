"""Exact quantities by float64 enumeration of a small joint state space (N^L
sequences): the independent reference every op is tested against."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from cdm_kernels import AbsorbingGraph, Graph, UniformGraph, ordinal_graph


def small_graphs(num_states: int = 4):
    """One graph per family (dense twice: Gaussian and birth-death)."""
    return [
        UniformGraph(num_states),
        AbsorbingGraph(num_states),
        ordinal_graph(num_states, "gaussian"),
        ordinal_graph(num_states, "birth_death"),
    ]


def random_data_distribution(graph: Graph, length: int, seed: int = 0) -> torch.Tensor:
    """A sparse-ish random distribution over all N^L clean sequences (no mask token for absorbing graphs)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = all_sequences(graph.num_states, length)
    p0 = torch.rand(len(seqs), generator=gen, dtype=torch.float64) ** 4
    if graph.family == "absorbing":
        p0[(seqs == graph.num_states - 1).any(dim=1)] = 0
    return p0 / p0.sum()


def all_sequences(num_states: int, length: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(num_states), repeat=length)), dtype=torch.long)


@dataclass
class ExactNoisy:
    """Every reachable noisy sequence x_t with its exact per-position quantities."""

    x: torch.Tensor  # (S, L) reachable noisy sequences
    log_ratio: torch.Tensor  # (S, L, N) log p_t(x with position i set to y) / p_t(x)
    posterior: torch.Tensor  # (S, L, N) p(x_0^i = a | x_t = x)
    marginal: torch.Tensor  # (S,) p_t(x)


def exact_noisy(graph: Graph, p0: torch.Tensor, length: int, tau: float) -> ExactNoisy:
    n = graph.num_states
    seqs = all_sequences(n, length)
    kernel = graph.kernel(tau)
    # transition[x0, x] = prod_j K[x0_j, x_j]
    transition = torch.ones(len(seqs), len(seqs), dtype=torch.float64)
    for j in range(length):
        transition = transition * kernel[seqs[:, j][:, None], seqs[:, j][None, :]]
    p_t = p0 @ transition
    joint = p0[:, None] * transition  # p(x0, x)
    powers = n ** torch.arange(length - 1, -1, -1)
    reachable = torch.nonzero(p_t > 1e-280).flatten()
    ratios, posteriors = [], []
    for k in reachable.tolist():
        x = seqs[k]
        ratio = torch.empty(length, n, dtype=torch.float64)
        posterior = torch.empty(length, n, dtype=torch.float64)
        for i in range(length):
            for y in range(n):
                index = k + (y - x[i].item()) * powers[i].item()
                ratio[i, y] = p_t[index] / p_t[k]
                posterior[i, y] = joint[seqs[:, i] == y, k].sum() / p_t[k]
        ratios.append(ratio)
        posteriors.append(posterior)
    return ExactNoisy(seqs[reachable], torch.stack(ratios).log(), torch.stack(posteriors), p_t[reachable])
