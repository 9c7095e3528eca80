"""End to end: a distillation training step (tokens/s) and sampling (samples/s),
with the fused ops against the same code on the reference ops.

* ``test_distill_step``: one per-token CDM step written out here with the
  public ops and an explicit ``backend=``: the student's reverse step
  (``fused_euler_step``) from x_t, the teacher's forward and conditional at s
  (``scores_to_posterior``), the student's forward + backward through
  ``conditional_matching_loss``, an Adam step. Scores in float32.
* ``test_cdm_loss_step``: the trainer's own loss, ``cdm.losses.per_token_cdm_loss``
  (+ backward + Adam step), when that module imports. It takes no ``backend=``:
  the default backend is forced for the duration of the call (see
  ``H.default_backend``). It hands float64 scores to the kernels for the
  uniform graph (``cdm.sampling.inversion_dtype``), as training does.
* ``test_sampling``: ``cdm.sampling.sample`` for a teacher (32 steps) and a
  student (1 and 4 steps), default backend forced likewise.

The network is the tiny DiT (``DiTConfig.preset("tiny", ...)``), randomly
initialised with its zero-initialised layers perturbed so scores are not all 0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

import cdm_kernels as ck
import _harness as H
from cdm.models.dit import DiT, DiTConfig
from cdm.sampling import add_noise, sample, tau_of_time
from cdm.schedules import LogLinearNoise


@dataclass(frozen=True)
class E2EConfig:
    vocab: int
    seq_len: int
    batch: int  # training batch (sequences); sampling draws `samples` sequences
    samples: int

    @property
    def key(self) -> str:
        return f"N{self.vocab}-L{self.seq_len}-B{self.batch}"


DEFAULT_CONFIGS = (E2EConfig(vocab=1024, seq_len=128, batch=16, samples=4),)
FULL_CONFIGS = DEFAULT_CONFIGS + (
    E2EConfig(vocab=17, seq_len=64, batch=64, samples=64),
    E2EConfig(vocab=50257, seq_len=128, batch=4, samples=2),
)
TEACHER_STEPS = 32
STUDENT_STEPS = (1, 4)


def pytest_generate_tests(metafunc):
    if "e2e_config" in metafunc.fixturenames:
        configs = FULL_CONFIGS if H.SESSION.full else DEFAULT_CONFIGS
        metafunc.parametrize("e2e_config", configs, ids=[c.key for c in configs])


_MODELS = {}


def models(config: E2EConfig, device):
    """(teacher, student, graph, noise) for ``config``, built once per session."""
    key = (config, str(device))
    if key not in _MODELS:
        _MODELS.clear()
        torch.manual_seed(0)
        teacher = DiT(DiTConfig.preset("tiny", config.vocab, config.seq_len)).to(device)
        with torch.no_grad():
            for parameter in teacher.parameters():
                if not parameter.detach().abs().sum():
                    parameter.normal_(0.0, 0.02)
        teacher.eval().requires_grad_(False)
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        _MODELS[key] = (teacher, student, ck.UniformGraph(config.vocab), LogLinearNoise())
    return _MODELS[key]


def distill_step(teacher, student, optimizer, graph, noise, x0, backend, generator):
    """One per-token CDM step, every op on ``backend``; returns the loss."""
    batch, seq_len = x0.shape
    device = x0.device
    t = 0.05 + 0.95 * torch.rand(batch, generator=generator, dtype=torch.float64).to(device)
    s = t * torch.rand(batch, generator=generator, dtype=torch.float64).to(device)
    tau_t, tau_s = tau_of_time(noise, t), tau_of_time(noise, s)
    tau_t_pos, tau_s_pos = tau_t[:, None].expand(batch, seq_len), tau_s[:, None].expand(batch, seq_len)
    x_t = add_noise(graph, x0, tau_t[:, None], generator)
    with torch.no_grad():
        # the reverse step t -> s, drawn with the student (seed 001's choice)
        x_s = ck.fused_euler_step(graph, student(x_t, tau_t), x_t, tau_t_pos, tau_s_pos,
                                  generator=generator, backend=backend)
        # the teacher's conditional at s: the target
        target = ck.scores_to_posterior(graph, teacher(x_s, tau_s), x_s, tau_s_pos, backend=backend).exp()
    loss = ck.conditional_matching_loss(graph, student(x_t, tau_t), x_t, tau_t_pos, target, backend=backend)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def _report(benchmark, kind, config, impl, m: H.Measured, units: float, unit_name: str):
    s = H.SESSION
    key = (f"e2e-{kind}-{config.key}", impl)
    s.results[key] = (m.median_s, m.cpu_s)
    ref = s.results.get((key[0], "reference"))
    benchmark.extra_info.update(
        kind=kind,
        config=config.key,
        impl=impl,
        device=str(s.device),
        **{unit_name: round(units / m.median_s, 3)},
        x_reference=round(ref[0] / m.median_s, 3) if ref else None,
        cpu_s=m.cpu_s,
        x_reference_cpu=round(ref[1] / m.cpu_s, 3) if ref else None,
        peak_mem_bytes=m.peak_bytes,
        peak_mem_method=m.peak_method,
        warmup_s=round(m.warmup_s, 4),
        rounds=m.rounds,
        iterations=m.iterations,
    )


def test_distill_step(benchmark, bench_session, e2e_config: E2EConfig, e2e_impl: str):
    s, config = bench_session, e2e_config
    teacher, student, graph, noise = models(config, s.device)
    student = copy.deepcopy(student)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, config.vocab, (config.batch, config.seq_len), generator=generator).to(s.device)
    benchmark.group = f"e2e-distill_step-{config.key}"
    run = lambda: distill_step(teacher, student, optimizer, graph, noise, x0, e2e_impl, generator)  # noqa: E731
    m = H.measure(benchmark, run, s.device, 2 * s.budget_s)
    _report(benchmark, "distill_step", config, e2e_impl, m, config.batch * config.seq_len, "tokens_per_s")


def test_cdm_loss_step(benchmark, bench_session, e2e_config: E2EConfig, e2e_impl: str):
    try:
        from cdm.losses import per_token_cdm_loss
    except ImportError as error:
        pytest.skip(f"cdm.losses is not importable: {error}")
    s, config = bench_session, e2e_config
    teacher, student, graph, noise = models(config, s.device)
    student = copy.deepcopy(student)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, config.vocab, (config.batch, config.seq_len), generator=generator).to(s.device)

    def run():
        with H.default_backend(s.device, e2e_impl):
            loss = per_token_cdm_loss(student, teacher, graph, noise, x0, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    benchmark.group = f"e2e-cdm_loss_step-{config.key}"
    m = H.measure(benchmark, run, s.device, 2 * s.budget_s)
    _report(benchmark, "cdm_loss_step", config, e2e_impl, m, config.batch * config.seq_len, "tokens_per_s")


@pytest.mark.parametrize("sampler", [f"teacher-{TEACHER_STEPS}steps"] + [f"student-{k}steps" for k in STUDENT_STEPS])
def test_sampling(benchmark, bench_session, e2e_config: E2EConfig, e2e_impl: str, sampler: str):
    s, config = bench_session, e2e_config
    teacher, student, graph, noise = models(config, s.device)
    model = teacher if sampler.startswith("teacher") else student
    steps = int(sampler.split("-")[1].removesuffix("steps"))
    generator = torch.Generator().manual_seed(3)

    def run():
        with H.default_backend(s.device, e2e_impl):
            return sample(model, graph, noise, config.samples, config.seq_len, steps, generator=generator)

    benchmark.group = f"e2e-sampling-{sampler}-{config.key}"
    m = H.measure(benchmark, run, s.device, 2 * s.budget_s)
    _report(benchmark, f"sampling-{sampler}", config, e2e_impl, m, config.samples, "samples_per_s")
