"""Peak memory of one joint-CDM training step (the teacher's chain, the student's
M-fold forward, the mixture loss, backward), whole against chunked over
positions (``joint_cdm_loss(chunk=8, teacher_batch=1)``), sweeping B, M, L and
N one at a time around a base point; and the activations of the transformer
trunk per token and block at SEDD-small's width. They are the measurements
behind the memory model in docs/ARCHITECTURE.md ("A joint-CDM step at the
field's scale").

``extra_info``: ``B``, ``M``, ``R``, ``L``, ``N``, ``chunk`` and
``teacher_batch`` (null: whole), ``peak_mem_bytes`` (allocator high-water mark
of the step above what was live before it; on CPU from torch.profiler's
allocator events, on CUDA ``max_memory_allocated``), ``bytes_per_BMLN``
(peak / (B M L N)) and ``seconds``.

The network is the tiny DiT (hidden 64) of the absorbing graph in the posterior
form (MDLM's SUBS), K = M components, so the vocabulary-sized tensors dominate,
as they do at SEDD-small's shape (N = 50258 against hidden 768).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import cdm_kernels as ck
import _harness as H
from cdm.losses import joint_cdm_loss
from cdm.models.dit import DiT, DiTConfig
from cdm.schedules import LogLinearNoise

TARGETS = 2  # R: teacher draws per noisy input
TEACHER_STEPS = 2
CHUNK = 8


@dataclass(frozen=True)
class StepShape:
    B: int
    M: int
    L: int
    N: int
    chunk: Optional[int]

    @property
    def key(self) -> str:
        return f"B{self.B}-M{self.M}-L{self.L}-N{self.N}-{'whole' if self.chunk is None else f'chunk{self.chunk}'}"


BASE = dict(B=2, M=4, L=32, N=4096)
SWEEP = {"B": (1, 4), "M": (2, 8), "L": (16, 64), "N": (1024, 16384)}


def shapes() -> list[StepShape]:
    points = [dict(BASE)] + [{**BASE, name: value} for name, values in SWEEP.items() for value in values]
    return [StepShape(**point, chunk=chunk) for point in points for chunk in (None, CHUNK)]


@pytest.mark.parametrize("shape", shapes(), ids=lambda s: s.key)
def test_joint_step_memory(benchmark, bench_session, shape: StepShape):
    device = bench_session.device
    torch.manual_seed(0)
    network = dict(parameterization="posterior", graph="absorbing")
    teacher = DiT(DiTConfig.preset("tiny", shape.N, shape.L, **network)).to(device)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.normal_(0.0, 0.02)
    teacher.eval().requires_grad_(False)
    student = DiT(DiTConfig.preset("tiny", shape.N, shape.L, latent_dim=1, latent_components=shape.M,
                                   **network)).to(device)
    student.load_state_dict(teacher.state_dict(), strict=False)
    graph = ck.AbsorbingGraph(shape.N)
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, shape.N - 1, (shape.B, shape.L), generator=generator).to(device)

    def step():
        loss = joint_cdm_loss(student, teacher, graph, LogLinearNoise(), x0, num_latents=shape.M,
                              num_targets=TARGETS, teacher_steps=TEACHER_STEPS, chunk=shape.chunk,
                              teacher_batch=None if shape.chunk is None else 1, generator=generator)
        student.zero_grad(set_to_none=True)
        loss.backward()

    benchmark.group = f"joint-step-memory-B{shape.B}-M{shape.M}-L{shape.L}-N{shape.N}"
    measured = H.measure(benchmark, step, device, bench_session.budget_s)
    elements = shape.B * shape.M * shape.L * shape.N
    benchmark.extra_info.update(
        B=shape.B, M=shape.M, R=TARGETS, L=shape.L, N=shape.N, chunk=shape.chunk,
        teacher_batch=None if shape.chunk is None else 1, device=str(device),
        peak_mem_bytes=measured.peak_bytes, peak_mem_method=measured.peak_method,
        bytes_per_BMLN=round(measured.peak_bytes / elements, 2) if measured.peak_bytes else None,
        seconds=round(measured.median_s, 4),
    )


@pytest.mark.parametrize("blocks", (1, 2))
def test_trunk_activation_memory(benchmark, bench_session, blocks: int):
    """Forward + backward of a SEDD-small-wide DiT (hidden 768, 12 heads, cond 128) with ``blocks``
    blocks on one sequence of 256 tokens and 16 states: the difference of the two peaks is what a
    block holds for backward per token (``bytes_per_token``), in the training dtype of this device
    (float32 on CPU)."""
    device = bench_session.device
    torch.manual_seed(0)
    length = 256
    model = DiT(DiTConfig(16, length, hidden=768, n_heads=12, n_blocks=blocks, cond_dim=128)).to(device).train()
    x = torch.randint(0, 16, (1, length), device=device)
    sigma = torch.ones(1, device=device)

    def step():
        model.zero_grad(set_to_none=True)
        model(x, sigma).sum().backward()

    benchmark.group = "trunk-activation-memory"
    measured = H.measure(benchmark, step, device, bench_session.budget_s)
    benchmark.extra_info.update(blocks=blocks, L=length, hidden=768, device=str(device),
                                peak_mem_bytes=measured.peak_bytes, peak_mem_method=measured.peak_method,
                                bytes_per_token=round(measured.peak_bytes / length) if measured.peak_bytes else None,
                                seconds=round(measured.median_s, 4))
