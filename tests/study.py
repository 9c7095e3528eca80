"""The exact study of docs/MATH.md section 4, shared by the trainer's exact tests
(tests/test_cdm_exact.py, tests/test_baselines.py): L = 3 tokens, N = 4 states,
uniform graph, data a sticky Markov chain (64 sequences), the exact teacher
(``EnumeratedScoreModel``), every sampler's output distribution by enumeration.
"""

from __future__ import annotations

import torch

import cdm_kernels as ck
from cdm.data.markov import MarkovData
from cdm.metrics import exact_kl
from cdm.sampling import exact_sample_distribution, tau_grid
from cdm.schedules import GeometricNoise

from score_models import EnumeratedScoreModel

N, L = 4, 3


def make_study() -> dict:
    data = MarkovData(vocab_size=N, seq_len=L, seed=0, concentration=0.3, stickiness=0.5)
    support, probs = data.enumerate_support(), data.exact_distribution()
    graph = ck.UniformGraph(N)
    marginals = [torch.zeros(N, dtype=torch.float64).index_add_(0, support[:, i], probs) for i in range(L)]
    product = torch.stack([marginals[i][support[:, i]] for i in range(L)], 1).prod(1)
    return dict(data=data, support=support, p=probs, graph=graph, teacher=EnumeratedScoreModel(graph, support, probs),
                noise=GeometricNoise(1e-3, 10.0), product=product)


def exact_kl_of(study: dict, model, steps: int, components: int = 1) -> float:
    """KL(data || the model's ``steps``-step sampler), a K-component table student averaged exactly."""
    latents = None if components == 1 else ((torch.arange(components) + 0.5) / components)[:, None]
    q = exact_sample_distribution(model, study["graph"], study["support"], tau_grid(study["noise"], steps),
                                  latents=latents)
    return exact_kl(study["p"], q)
