"""Exact checks of the trainer's losses and samplers on enumerable state spaces,
and the study of docs/MATH.md section 4:

* L = 3 tokens, N = 4 states, uniform graph, data a sticky Markov chain
  (64 sequences), the teacher the *exact* score computed by enumeration in
  float64 (``EnumeratedScoreModel``), every sampler's output distribution
  computed exactly (``exact_sample_distribution``), students table-based
  (``TabularScoreModel``: one free conditional per sequence, grid time and
  mixture component), trained with the library's loss code.
* (i) per-token CDM leaves the 1-step sampler at the product of the data
  marginals (the teacher's own 1-step sampler); (ii) joint CDM with a mixture
  student cuts the exact 1-step KL by more than 10x.

Schedule: geometric with sigma_max = 10 rather than SEDD's 20: at tau = 20 the
uniform graph's conditional lies below the inversion's clamp
(``POSTERIOR_FLOOR`` relative to ``r_x``; the inverted ratios scale as
``e^-tau``), so the kernels cannot represent the exact teacher there.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import cdm_kernels as ck
from cdm.data.markov import MarkovData, enumerate_sequences, sequence_index
from cdm.losses import ExactTargets, get_loss, joint_cdm_loss, per_token_cdm_loss, score_entropy, score_entropy_loss
from cdm.losses.cdm import sample_times, student_rollout, teacher_chain
from cdm.losses.score_entropy import kernel_ratios
from cdm.metrics import exact_kl
from cdm.models import make_student
from cdm.sampling import (add_noise, draw_latents, exact_chain_matrix, exact_sample_distribution, prior_sample,
                          sample, step_distribution, tau_grid, tau_of_time, time_grid)
from cdm.schedules import GeometricNoise, LogLinearNoise

from score_models import EnumeratedScoreModel, TabularScoreModel
from study import L, N, exact_kl_of

pytestmark = pytest.mark.usefixtures("single_thread")


def train_table(study, student, loss, steps, iters, lr, batch, seed=1, **options):
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(student.parameters(), lr=lr)
    # constant, then linear decay to 0 over the second half (less SGD noise at the end)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda i: min(1.0, 2.0 - 2.0 * i / iters))
    for _ in range(iters):
        x0 = study["data"].sample(batch, generator)
        value = loss(student, study["teacher"], study["graph"], study["noise"], x0, steps=steps,
                     generator=generator, **options)
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
        schedule.step()
    return student


# ----------------------------------------------------------------------------- score entropy


def _graphs():
    return [ck.UniformGraph(N), ck.AbsorbingGraph(N + 1), ck.ordinal_graph(N, "birth_death")]


def _data_tokens(graph, shape, generator):
    real = graph.num_states - 1 if graph.family == "absorbing" else graph.num_states
    return torch.randint(0, real, shape, generator=generator)


@pytest.mark.parametrize("graph", _graphs(), ids=lambda g: g.family)
def test_score_entropy_is_nonnegative_and_zero_at_the_kernel_ratio(graph):
    generator = torch.Generator().manual_seed(0)
    x0 = _data_tokens(graph, (64, L), generator)
    tau = torch.rand(64, 1, generator=generator, dtype=torch.float64) * 3 + 0.05
    x_t = add_noise(graph, x0, tau, generator)
    truth = kernel_ratios(graph, x0, x_t, tau, torch.float64).clamp_min(1e-30).log()
    at_truth = score_entropy(graph, truth, x_t, x0, tau)
    assert at_truth.abs().max() < 1e-9
    for scale in (0.1, 1.0, 5.0):
        other = truth + scale * torch.randn(truth.shape, generator=generator, dtype=torch.float64)
        value = score_entropy(graph, other, x_t, x0, tau)
        assert torch.isfinite(value).all() and (value >= -1e-12).all()
        weights_active = value > 0
        assert weights_active.any()


@pytest.mark.parametrize("graph", [ck.UniformGraph(3), ck.AbsorbingGraph(4)], ids=lambda g: g.family)
def test_score_entropy_minimiser_is_the_true_concrete_score(graph):
    """Averaged over x0 ~ p(x0 | x_t), the loss is minimised by p_t(x^{i<-y}) / p_t(x):
    check the closed-form minimiser E[R | x_t] against the exact score by enumeration,
    and that the expected loss's gradient vanishes there and the value is larger nearby."""
    real = graph.num_states - 1 if graph.family == "absorbing" else graph.num_states
    generator = torch.Generator().manual_seed(1)
    support = enumerate_sequences(real, 2)
    probs = torch.rand(len(support), generator=generator, dtype=torch.float64) ** 3
    probs /= probs.sum()
    exact = EnumeratedScoreModel(graph, support, probs)
    tau = 0.7
    noisy = enumerate_sequences(graph.num_states, 2)
    # p(x0 | x_t) for every noisy sequence (rows) and clean sequence (columns)
    kernel = graph.kernel(tau)
    joint = probs[None, :] * kernel[support[:, 0]][:, noisy[:, 0]].T * kernel[support[:, 1]][:, noisy[:, 1]].T
    keep = joint.sum(1) > 0
    noisy, joint = noisy[keep], joint[keep]
    posterior = joint / joint.sum(1, keepdim=True)  # (X, S)
    sigma = torch.full((len(noisy),), tau, dtype=torch.float64)
    truth = exact(noisy, sigma)  # (X, 2, N)
    x_t = noisy[:, None, :].expand(-1, len(support), -1)
    x0 = support[None].expand(len(noisy), -1, -1)
    ratios = kernel_ratios(graph, x0, x_t, tau, torch.float64)  # (X, S, 2, N)
    expected_ratio = (posterior[:, :, None, None] * ratios).sum(1)
    weights = torch.stack([torch.nn.functional.one_hot(noisy[:, i], graph.num_states) for i in range(2)], 1) == 0
    if graph.family == "absorbing":
        weights &= (noisy == graph.num_states - 1)[..., None]
        weights[..., -1] = False
    torch.testing.assert_close(truth[weights].exp(), expected_ratio[weights], rtol=1e-9, atol=1e-12)

    def expected_loss(log_score):
        per = score_entropy(graph, log_score[:, None].expand(-1, len(support), -1, -1), x_t, x0, tau)
        return (posterior[:, :, None] * per).sum()

    log_score = truth.clone().requires_grad_(True)
    value = expected_loss(log_score)
    (grad,) = torch.autograd.grad(value, log_score)
    assert grad.abs().max() < 1e-8
    bumped = truth + 0.05 * torch.randn(truth.shape, generator=generator, dtype=torch.float64)
    assert expected_loss(bumped) > value.detach() + 1e-8


def test_score_entropy_loss_trains_a_dit_and_matches_sedd_normalisation():
    from cdm.models import DiT, DiTConfig

    torch.manual_seed(0)
    data = MarkovData(vocab_size=N, seq_len=8, seed=0)
    graph, noise = ck.UniformGraph(N), GeometricNoise()
    model = DiT(DiTConfig.preset("tiny", vocab_size=N, seq_len=8))
    generator = torch.Generator().manual_seed(0)
    x0 = data.sample(16, generator)
    t = torch.full((16,), 0.5, dtype=torch.float64)
    per_sequence = score_entropy_loss(model, graph, noise, x0, t=t, generator=torch.Generator().manual_seed(3),
                                      reduction="none")
    # reproduce by hand: rate(t) * sum over positions of the per-position score entropy
    x_t = add_noise(graph, x0, noise.total(t)[:, None], torch.Generator().manual_seed(3))
    manual = noise.rate(t).float() * score_entropy(graph, model(x_t, noise.total(t)), x_t, x0,
                                                   noise.total(t)[:, None]).sum(-1)
    torch.testing.assert_close(per_sequence, manual)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = get_loss("score_entropy", graph, noise)
    losses = []
    for _ in range(30):
        loss = loss_fn(model, data.sample(64, generator), generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])


# ----------------------------------------------------------------------------- CDM losses


@pytest.mark.parametrize("form", ["per_token", "joint"])
@pytest.mark.parametrize("family", ["uniform", "absorbing"])
def test_cdm_gradients_reach_the_student_only(form, family):
    from cdm.models import DiT, DiTConfig

    torch.manual_seed(0)
    vocab = N + 1 if family == "absorbing" else N
    graph = ck.UniformGraph(N) if family == "uniform" else ck.AbsorbingGraph(N + 1)
    noise = GeometricNoise() if family == "uniform" else LogLinearNoise()
    teacher = DiT(DiTConfig.preset("tiny", vocab_size=vocab, seq_len=6, scale_by_sigma=family == "absorbing"))
    for p in teacher.parameters():  # give the zero-initialised output layers some signal
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
    student = make_student(teacher, latent_dim=1 if form == "joint" else 0)
    x0 = torch.randint(0, N, (8, 6))
    generator = torch.Generator().manual_seed(0)
    if form == "per_token":
        loss = per_token_cdm_loss(student, teacher, graph, noise, x0, steps=2, generator=generator)
    else:
        loss = joint_cdm_loss(student, teacher, graph, noise, x0, steps=2, num_latents=4, teacher_steps=3,
                              generator=generator)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    if form == "joint":  # the latent embedding learns (its last layer starts at zero)
        assert student.latent_map.mlp[2].weight.grad.abs().sum() > 0


def test_mixture_student_starts_as_the_teacher():
    from cdm.models import DiT, DiTConfig

    torch.manual_seed(0)
    teacher = DiT(DiTConfig.preset("tiny", vocab_size=N, seq_len=5))
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
    student = make_student(teacher, latent_dim=2)
    x = torch.randint(0, N, (3, 5))
    sigma = torch.tensor([0.1, 1.0, 5.0])
    lam = torch.rand(3, 2)
    torch.testing.assert_close(student(x, sigma, lam), teacher(x, sigma))


def test_student_of_another_size_starts_fresh():
    from cdm.models import DiT, DiTConfig

    torch.manual_seed(0)
    teacher = DiT(DiTConfig.preset("tiny", vocab_size=N, seq_len=5))
    same = make_student(teacher, size="tiny")
    assert all(torch.equal(a, b) for a, b in zip(same.parameters(), teacher.parameters()))
    bigger = make_student(teacher, latent_dim=1, latent_components=4, size="mini")
    assert (bigger.config.hidden, bigger.config.n_blocks, bigger.config.latent_components) == (128, 4, 4)
    assert sum(p.numel() for p in bigger.parameters()) > 4 * sum(p.numel() for p in teacher.parameters())
    with pytest.raises(ValueError, match="size"):
        make_student(teacher, size="huge")


def test_extra_blocks_start_as_the_identity_and_learn():
    """A deeper student computes the model it starts from (a teacher, or an
    earlier weighted mixture student, whose components and weights it keeps)
    until its new blocks learn, and they do get gradients."""
    from cdm.models import DiT, DiTConfig

    torch.manual_seed(0)
    teacher = DiT(DiTConfig.preset("tiny", vocab_size=N, seq_len=5))
    for p in teacher.parameters():  # not zero-initialised, so that the output depends on every block
        torch.nn.init.normal_(p, std=0.05)
    x, sigma = torch.randint(0, N, (3, 5)), torch.tensor([0.1, 1.0, 5.0])
    deeper = make_student(teacher, extra_blocks=2)
    assert deeper.config.n_blocks == teacher.config.n_blocks + 2
    torch.testing.assert_close(deeper(x, sigma), teacher(x, sigma), rtol=0, atol=0)

    earlier = make_student(teacher, latent_dim=1, latent_components=3, mixture_weights=True, shared_blocks=1)
    for p in earlier.parameters():  # components and weights that differ, as after training
        torch.nn.init.normal_(p, std=0.05)
    grown = make_student(earlier, latent_dim=1, latent_components=3, extra_blocks=1)
    assert (grown.config.n_blocks, grown.config.shared_blocks, grown.config.mixture_weights) == (3, 1, True)
    lam = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(grown(x, sigma, lam), earlier(x, sigma, lam), rtol=0, atol=0)
    torch.testing.assert_close(grown(x, sigma, mixture_weights=True), earlier(x, sigma, mixture_weights=True),
                               rtol=0, atol=0)
    grown(x, sigma, lam).logsumexp(-1).sum().backward()
    assert grown.blocks[2].adaLN_modulation.weight.grad.abs().sum() > 0

    with pytest.raises(ValueError, match="extra_blocks"):
        make_student(teacher, extra_blocks=-1)
    with pytest.raises(ValueError, match="latent_components=4: .* needs a multiple of 3"):
        make_student(earlier, latent_dim=1, latent_components=4)


def test_split_components_keep_the_mixture_and_separate():
    """A 6-component student grown from a weighted 3-component one: each pair of
    copies carries exactly its original's weight and nearly its original's
    conditional, and the copies differ (identical ones would never separate)."""
    from cdm.models import DiT, DiTConfig

    torch.manual_seed(0)
    teacher = DiT(DiTConfig.preset("tiny", vocab_size=N, seq_len=5))
    earlier = make_student(teacher, latent_dim=1, latent_components=3, mixture_weights=True, shared_blocks=1,
                           parameterization="posterior", graph="uniform")
    for p in earlier.parameters():
        torch.nn.init.normal_(p, std=0.05)
    split = make_student(earlier, latent_dim=1, latent_components=6)
    x, sigma = torch.randint(0, N, (3, 5)), torch.tensor([0.1, 1.0, 5.0])
    weights = split(x, sigma, mixture_weights=True).exp().view(3, 3, 2).sum(-1)
    torch.testing.assert_close(weights, earlier(x, sigma, mixture_weights=True).exp(), rtol=1e-6, atol=1e-7)

    def conditional(model, components, j):
        lam = torch.full((3,), (j + 0.5) / components)
        return ck.scores_to_posterior(ck.UniformGraph(N), model(x, sigma, lam), x, sigma[:, None]).exp()

    for j in range(3):
        original = conditional(earlier, 3, j)
        copies = [conditional(split, 6, 2 * j + c) for c in (0, 1)]
        for copy_ in copies:
            torch.testing.assert_close(copy_, original, rtol=0, atol=1e-3)
        assert not torch.equal(copies[0], copies[1])


# ----------------------------------------------------------------------------- samplers


def test_many_step_exact_teacher_reproduces_the_data(study):
    assert exact_kl_of(study, study["teacher"], 64) < 1e-3


def test_one_step_sampler_is_the_product_of_marginals(study):
    q = exact_sample_distribution(study["teacher"], study["graph"], study["support"], tau_grid(study["noise"], 1))
    torch.testing.assert_close(q, study["product"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["analytic", "euler"])
def test_sampler_matches_its_exact_distribution(study, method):
    """Monte Carlo draws of ``sample`` (through fused_euler_step) against the exact
    distribution of the same 2-step sampler: a total-variation bound."""
    graph, support = study["graph"], study["support"]
    exact = exact_sample_distribution(study["teacher"], graph, support, tau_grid(study["noise"], 2), method=method)
    draws = sample(study["teacher"], graph, study["noise"], 20000, L, 2, method=method,
                   generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(study["data"].sequence_index(draws), minlength=len(support)).double()
    tv = 0.5 * (counts / counts.sum() - exact).abs().sum()
    assert tv < 0.03  # ~0.014 expected from sampling noise alone with 64 cells


def test_mixture_student_sampler_draws_a_latent_per_step(study):
    """A 2-component table student whose components disagree: sampling with a fresh
    latent per step and sequence matches the exact mixture-per-step distribution."""
    graph, support, noise = study["graph"], study["support"], study["noise"]
    student = TabularScoreModel(graph, support, tau_grid(noise, 2)[:-1], components=2)
    student.init_from(study["teacher"], noise_scale=2.0, generator=torch.Generator().manual_seed(0))
    exact = exact_sample_distribution(student, graph, support, tau_grid(noise, 2), latents=torch.tensor([[0.25], [0.75]]))
    draws = sample(student, graph, noise, 20000, L, 2, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(study["data"].sequence_index(draws), minlength=len(support)).double()
    assert 0.5 * (counts / counts.sum() - exact).abs().sum() < 0.03


def test_sampling_is_reproducible_and_starts_from_the_prior(study):
    kwargs = dict(method="analytic")
    a = sample(study["teacher"], study["graph"], study["noise"], 64, L, 3, generator=torch.Generator().manual_seed(5), **kwargs)
    b = sample(study["teacher"], study["graph"], study["noise"], 64, L, 3, generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(a, b)
    absorbing = ck.AbsorbingGraph(N + 1)
    assert (prior_sample(absorbing, (4, L)) == N).all()
    uniform = prior_sample(study["graph"], (4000,), torch.Generator().manual_seed(0))
    assert set(uniform.tolist()) == set(range(N))


@pytest.mark.parametrize("graph", _graphs(), ids=lambda g: g.family)
def test_add_noise_follows_the_forward_kernel(graph):
    generator = torch.Generator().manual_seed(0)
    tau = 0.6
    x0 = torch.zeros(40000, dtype=torch.int64)
    counts = torch.bincount(add_noise(graph, x0, tau, generator), minlength=graph.num_states).double()
    torch.testing.assert_close(counts / counts.sum(), graph.kernel(tau)[0], atol=0.01, rtol=0)


def test_stratified_latents_cover_every_stratum():
    class Mixture(torch.nn.Module):
        latent_dim = 1

    lam = draw_latents(Mixture(), 32, torch.Generator().manual_seed(0), stratified_groups=8)
    strata = (lam[:, 0] * 8).long().view(4, 8)
    assert (strata == torch.arange(8)).all()


# ----------------------------------------------------------------------------- the study


def _per_token_fixed_point(study, quadrature=16, iterations=40):
    """The exact optimum of 1-step per-token CDM as seed 001 runs it (x_s from the
    student's own analytic step, s ~ U(0, 1)): the student's table q(. | x_t) is
    the fixed point of q = E_s E_{x_s ~ P_q(. | x_t)} p^teacher_0|s(. | x_s), with
    the expectation over x_s by enumeration and over s by the midpoint rule."""
    graph, support, teacher, noise = study["graph"], study["support"], study["teacher"], study["noise"]
    size = len(support)
    tau_t = float(noise.total(1.0))
    sigma_t = torch.full((size,), tau_t, dtype=torch.float64)
    q = teacher.log_conditional(support, sigma_t).exp()
    times = [1.0 - (m + 0.5) / quadrature for m in range(quadrature)]
    taus = [float(noise.total(s)) for s in times]
    posteriors = [teacher.log_conditional(support, torch.full((size,), tau, dtype=torch.float64)).exp() for tau in taus]
    for _ in range(iterations):
        log_score = ck.posterior_to_scores(graph, q.clamp_min(1e-300).log(), support, sigma_t[:, None].expand(size, L).contiguous())
        target = torch.zeros_like(q)
        for tau_s, posterior in zip(taus, posteriors):
            step = step_distribution(graph, log_score, support, tau_t, tau_s)  # (S, L, N)
            joint = torch.ones(size, size, dtype=torch.float64)
            for i in range(L):
                joint *= step[:, i, :][:, support[:, i]]
            target += torch.einsum("ab,bin->ain", joint, posterior) / quadrature
        q = target
    student = TabularScoreModel(graph, support, [tau_t])
    with torch.no_grad():
        student.logits[0, 0] = q.clamp_min(1e-300).log()
    return student


def test_per_token_cdm_exact_optimum_is_the_teachers_factorised_sampler(study):
    """(i), exactly: the optimum of per-token CDM's 1-step student gives the
    teacher's 1-step sampler (the product of the data marginals) up to ~1%."""
    teacher_kl = exact_kl_of(study, study["teacher"], 1)
    assert teacher_kl == pytest.approx(exact_kl(study["p"], study["product"]), rel=1e-6)
    optimum_kl = exact_kl_of(study, _per_token_fixed_point(study), 1)
    assert optimum_kl == pytest.approx(teacher_kl, rel=0.02)


def test_per_token_cdm_training_returns_to_the_factorised_sampler(study):
    """(i), by the loss code: a per-token student perturbed away from the teacher
    and trained with per-token CDM (x_s from its own step, as seed 001) returns
    to the teacher's 1-step sampler: KL unchanged."""
    graph, support, noise = study["graph"], study["support"], study["noise"]
    teacher_kl = exact_kl_of(study, study["teacher"], 1)
    student = TabularScoreModel(graph, support, tau_grid(noise, 1)[:-1])
    student.init_from(study["teacher"], noise_scale=2.0, generator=torch.Generator().manual_seed(0))
    perturbed_kl = exact_kl_of(study, student, 1)
    assert abs(perturbed_kl - teacher_kl) > 0.1 * teacher_kl
    train_table(study, student, per_token_cdm_loss, steps=1, iters=300, lr=0.2, batch=256)
    student_kl = exact_kl_of(study, student, 1)
    assert student_kl == pytest.approx(teacher_kl, rel=0.03)


def test_joint_cdm_mixture_student_beats_the_factorised_one_step_sampler(study):
    """(ii) Joint CDM with an M = 8 component mixture student cuts the exact
    1-step KL by more than an order of magnitude."""
    graph, support, noise = study["graph"], study["support"], study["noise"]
    teacher_kl = exact_kl_of(study, study["teacher"], 1)
    student = TabularScoreModel(graph, support, tau_grid(noise, 1)[:-1], components=8)
    student.init_from(study["teacher"], noise_scale=0.5, generator=torch.Generator().manual_seed(0))
    train_table(study, student, joint_cdm_loss, steps=1, iters=200, lr=0.2, batch=128, num_latents=8,
                teacher_steps=16)
    student_kl = exact_kl_of(study, student, 1, components=8)
    assert student_kl < teacher_kl / 10


def test_exact_distribution_does_not_depend_on_the_support_order(study):
    """The Kronecker fast path (full product space, lexicographic) and the gather path
    (any other order) give the same distribution."""
    graph, support, taus = study["graph"], study["support"], tau_grid(study["noise"], 3)
    permutation = torch.randperm(len(support), generator=torch.Generator().manual_seed(0))
    in_order = exact_sample_distribution(study["teacher"], graph, support, taus)
    permuted = exact_sample_distribution(study["teacher"], graph, support[permutation], taus)
    torch.testing.assert_close(permuted, in_order[permutation], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("graph_name", ["uniform", "absorbing"])
def test_exact_metrics_of_a_mixture_student(graph_name):
    """cdm.experiment.exact_metrics: both KLs of a K-component posterior-form student,
    against the exact distribution averaged over its components by hand."""
    from cdm.experiment import Setup, exact_metrics, new_model
    from cdm.models import make_student
    from cdm.metrics import exact_kl

    setup = Setup(data="markov", data_options={"vocab_size": 3, "seq_len": 3}, graph=graph_name)
    torch.manual_seed(0)
    teacher = new_model(setup, "tiny").eval()
    student = make_student(teacher, latent_dim=1, latent_components=2, parameterization="posterior",
                           graph=graph_name).eval()
    metrics = exact_metrics(student, setup, 2)
    graph, data = setup.kernel_graph, setup.dataset
    support = torch.cartesian_prod(*[torch.arange(graph.num_states)] * 3)
    q = sum(exact_sample_distribution(student, graph, support, tau_grid(setup.schedule, 2), latents=torch.tensor([[lam]]))
            for lam in (0.25, 0.75)) / 2
    clean = (support < data.vocab_size).all(1)
    assert abs(float(q[clean].sum()) - 1) < 1e-9  # the last step never leaves a mask
    p = data.exact_distribution()
    assert metrics["kl"] == pytest.approx(exact_kl(p, q[clean]), rel=1e-9)
    assert metrics["reverse_kl"] == pytest.approx(exact_kl(q[clean], p), rel=1e-9)


@pytest.mark.parametrize("graph_name", ["uniform", "absorbing"])
def test_exact_handover_metrics_chain_the_student_and_the_teacher(graph_name):
    """cdm.experiment.exact_handover_metrics: the student alone is exact_metrics of its
    k-step sampler, the teacher alone that of its k * m-step one, and a mixed pattern
    the student's exact step distribution fed as the prior of the teacher's m steps."""
    from cdm.experiment import Setup, exact_handover_metrics, exact_metrics, new_model
    from cdm.models import make_student
    from cdm.sampling import tau_of_time, time_grid

    setup = Setup(data="markov", data_options={"vocab_size": 3, "seq_len": 3}, graph=graph_name)
    torch.manual_seed(0)
    teacher = new_model(setup, "tiny").eval()
    student = make_student(teacher, latent_dim=1, latent_components=2, parameterization="posterior",
                           graph=graph_name).eval()
    results = exact_handover_metrics(student, teacher, setup, 2, teacher_steps=3)
    assert list(results) == ["ss", "tt", "st", "ts"]
    for pattern, model, steps in (("ss", student, 2), ("tt", teacher, 6)):
        for name, value in exact_metrics(model, setup, steps).items():
            assert results[pattern][name] == pytest.approx(value, rel=1e-9), (pattern, name)
    graph, data, noise = setup.kernel_graph, setup.dataset, setup.schedule
    support = torch.cartesian_prod(*[torch.arange(graph.num_states)] * 3)
    half = exact_sample_distribution(student, graph, support, tau_of_time(noise, time_grid(1, 1.0, 0.5)),
                                     latents=torch.tensor([[0.25], [0.75]]))
    q = exact_sample_distribution(teacher, graph, support, tau_of_time(noise, time_grid(3, 0.5, 0.0)), prior=half)
    q = q[(support < data.vocab_size).all(1)]
    assert results["st"]["kl"] == pytest.approx(exact_kl(data.exact_distribution(), q), rel=1e-9)
    assert results["st"] != results["ts"]
    only = exact_handover_metrics(student, teacher, setup, 2, teacher_steps=3, patterns=["ts", "ts"])
    assert only == {"ts": results["ts"]}
    for bad in (["s"], ["sx"], ["sss"]):
        with pytest.raises(ValueError, match="patterns"):
            exact_handover_metrics(student, teacher, setup, 2, patterns=bad)
    with pytest.raises(ValueError, match="teacher_steps"):
        exact_handover_metrics(student, teacher, setup, 2, teacher_steps=0)


def test_student_rollout_stops_where_the_students_sampler_is(study):
    """``student_rollout`` (joint CDM's ``rollout``): run to t = 0 it is the k-step
    sampler itself, draw for draw; stopped at t = 1/2 of a 2-step student its states
    follow the exact law after the sampler's first step."""
    graph, support, noise = study["graph"], study["support"], study["noise"]
    student = TabularScoreModel(graph, support, tau_grid(noise, 2)[:-1], components=2)
    student.init_from(study["teacher"], noise_scale=2.0, generator=torch.Generator().manual_seed(0))
    to_the_end = student_rollout(student, graph, noise, torch.zeros(64, dtype=torch.float64), 2, L,
                                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(to_the_end, sample(student, graph, noise, 64, L, 2, generator=torch.Generator().manual_seed(3)))
    start = student_rollout(student, graph, noise, torch.ones(8, dtype=torch.float64), 2, L,
                            generator=torch.Generator().manual_seed(3))
    assert torch.equal(start, prior_sample(graph, (8, L), torch.Generator().manual_seed(3)))
    half = student_rollout(student, graph, noise, torch.full((20000,), 0.5, dtype=torch.float64), 2, L,
                           generator=torch.Generator().manual_seed(4))
    exact = exact_sample_distribution(student, graph, support, tau_grid(noise, 2)[:2], latents=torch.tensor([[0.25], [0.75]]))
    counts = torch.bincount(study["data"].sequence_index(half), minlength=len(support)).double()
    assert 0.5 * (counts / counts.sum() - exact).abs().sum() < 0.03


def test_joint_cdm_rollout_trains_at_the_students_own_states(study):
    graph, noise = study["graph"], study["noise"]
    student = TabularScoreModel(graph, study["support"], tau_grid(noise, 2)[:-1], components=2)
    x0 = study["data"].sample(16, torch.Generator().manual_seed(0))
    loss = joint_cdm_loss(student, study["teacher"], graph, noise, x0, steps=2, num_latents=2, teacher_steps=4,
                          rollout=1.0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and student.logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="rollout"):
        joint_cdm_loss(student, study["teacher"], graph, noise, x0, steps=2, rollout=1.5)
    with pytest.raises(ValueError, match="rollout"):
        joint_cdm_loss(student, study["teacher"], graph, noise, x0, steps=2, rollout=0.5, t_dist="uniform")


def test_grid_weights_set_how_often_each_grid_time_is_trained(study):
    """``grid_weights``: the k grid times drawn with the given relative frequencies
    (equal weights: the default draws, bit for bit); a grid time of weight 1 and
    the rest 0 is a 1-step student's loss, draw for draw."""
    t, t_next = sample_times(4, 40000, grid_weights=[1, 2, 3, 0], generator=torch.Generator().manual_seed(0))
    shares = torch.stack([(t == 1 - j / 4).double().mean() for j in range(4)])
    torch.testing.assert_close(shares, torch.tensor([1, 2, 3, 0], dtype=torch.float64) / 6, rtol=0, atol=0.01)
    torch.testing.assert_close(t_next, t - 0.25)
    default, _ = sample_times(4, 64, generator=torch.Generator().manual_seed(1))
    equal, _ = sample_times(4, 64, grid_weights=[2.0] * 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(default, equal)

    graph, noise = study["graph"], study["noise"]
    student = TabularScoreModel(graph, study["support"], tau_grid(noise, 2)[:-1], components=2)
    student.init_from(study["teacher"], noise_scale=1.0, generator=torch.Generator().manual_seed(0))
    x0 = study["data"].sample(16, torch.Generator().manual_seed(0))
    first_only, one_step = (joint_cdm_loss(student, study["teacher"], graph, noise, x0, num_latents=2, teacher_steps=3,
                                           generator=torch.Generator().manual_seed(1), reduction="none", **options)
                            for options in ({"steps": 2, "grid_weights": [1, 0]}, {"steps": 1}))
    assert torch.equal(first_only, one_step)
    for bad in ([1, 1, 1], [1, -1], [0, 0], [1, math.nan], "11"):
        with pytest.raises(ValueError, match="grid_weights"):
            per_token_cdm_loss(student, study["teacher"], graph, noise, x0, steps=2, grid_weights=bad)
    with pytest.raises(ValueError, match="grid_weights needs t_dist='grid'"):
        joint_cdm_loss(student, study["teacher"], graph, noise, x0, steps=2, grid_weights=[1, 1], t_dist="uniform")


# ----------------------------------------------------------------------------- joint CDM, step targets


@pytest.mark.parametrize("method", ["analytic", "euler"])
@pytest.mark.parametrize("graph", _graphs(), ids=lambda g: g.family)
def test_step_log_likelihood_is_the_law_of_the_step(graph, method):
    """``step_log_likelihood`` (joint CDM's step target) against the reference step law
    ``step_probabilities`` in float64, value and gradient, including steps to tau = 0."""
    from cdm_kernels import reference
    from cdm.losses.cdm import step_log_likelihood

    generator = torch.Generator().manual_seed(0)
    shape = (5, 3)
    x_t = _data_tokens(graph, shape, generator)
    if graph.family == "absorbing":
        x_t[:2] = N  # masked positions: the only ones with a choice
    tau_t = 0.1 + 3 * torch.rand(shape, generator=generator, dtype=torch.float64)
    tau_s = tau_t * torch.rand(shape, generator=generator, dtype=torch.float64)
    tau_s[0] = 0.0
    log_score = torch.randn(*shape, graph.num_states, generator=generator, dtype=torch.float64, requires_grad=True)
    law = reference.step_probabilities(graph, log_score, x_t, tau_t, tau_s, method)
    x_s = torch.multinomial(law.detach().view(-1, graph.num_states), 1, generator=generator).view(shape)
    expected = law.gather(-1, x_s[..., None]).squeeze(-1).log()
    got = step_log_likelihood(graph, log_score, x_t, tau_t, tau_s, x_s, method)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    weights = torch.rand(shape, generator=generator, dtype=torch.float64)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), log_score)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), log_score)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-9, atol=1e-12)


def test_joint_cdm_averages_the_mixture_nll_over_its_targets(study, monkeypatch):
    """``num_targets = R``: the loss of each x_t is the mean over its R teacher draws of
    the exact mixture NLL (an M-component student, each component once), by hand."""
    import cdm.losses.cdm as cdm_module

    graph, noise, m, r = study["graph"], study["noise"], 3, 4
    student = TabularScoreModel(graph, study["support"], tau_grid(noise, 2)[:-1], components=m)
    student.init_from(study["teacher"], noise_scale=1.0, generator=torch.Generator().manual_seed(0))
    calls, chain = [], cdm_module.teacher_chain

    def recording_chain(*args, **kwargs):  # (x from, t from, x to) of every call
        calls.append((args[3], args[4], chain(*args, **kwargs)))
        return calls[-1][2]

    monkeypatch.setattr(cdm_module, "teacher_chain", recording_chain)
    x0 = study["data"].sample(6, torch.Generator().manual_seed(0))
    loss = joint_cdm_loss(student, study["teacher"], graph, noise, x0, steps=2, num_latents=m, num_targets=r,
                          teacher_steps=3, generator=torch.Generator().manual_seed(1), reduction="none")
    (x_from, t_from, _), (_, _, x_clean) = calls  # the chain to s, then the last step to 0
    x_t, tau_t = x_from[::r], noise.total(t_from[::r])
    log_q = torch.stack([student.log_conditional(x_t, tau_t, torch.full((len(x_t), 1), (k + 0.5) / m))
                         for k in range(m)], 1)  # (B, M, L, N)
    targets = x_clean.view(len(x_t), 1, r, L, 1).expand(-1, m, -1, -1, -1)
    log_lik = log_q[:, :, None].expand(-1, -1, r, -1, -1).gather(-1, targets).squeeze(-1).sum(-1)  # (B, M, R)
    expected = -(torch.logsumexp(log_lik, 1) - math.log(m)).mean(-1) / L
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="num_targets"):
        joint_cdm_loss(student, study["teacher"], graph, noise, x0, num_targets=0)


@pytest.mark.parametrize("num_targets", [1, 3])
def test_joint_cdm_targets_agree_for_a_one_step_student(study, num_targets):
    """At k = 1 the next grid time is 0: the step target is the clean one, draw for draw."""
    graph, noise = study["graph"], study["noise"]
    student = TabularScoreModel(graph, study["support"], tau_grid(noise, 1)[:-1], components=2)
    student.init_from(study["teacher"], noise_scale=1.0, generator=torch.Generator().manual_seed(0))
    x0 = study["data"].sample(32, torch.Generator().manual_seed(0))
    losses = [joint_cdm_loss(student, study["teacher"], graph, noise, x0, steps=1, num_latents=2, teacher_steps=5,
                             num_targets=num_targets, target=target, generator=torch.Generator().manual_seed(1),
                             reduction="none")
              for target in ("clean", "step")]
    # the clean target's fused loss returns float32 (its one-hot target's dtype)
    torch.testing.assert_close(losses[1], losses[0].double(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="target"):
        joint_cdm_loss(student, study["teacher"], graph, noise, x0, target="x_s")
    with pytest.raises(ValueError, match="s "):
        joint_cdm_loss(student, study["teacher"], graph, noise, x0, target="step", s=0.1)


def test_joint_cdm_step_target_beats_the_factorised_two_step_sampler(study):
    """Joint CDM fitted to the teacher's transitions (``target="step"``) cuts the exact
    2-step KL by more than an order of magnitude, as the clean target does."""
    graph, support, noise = study["graph"], study["support"], study["noise"]
    teacher_kl = exact_kl_of(study, study["teacher"], 2)
    student = TabularScoreModel(graph, support, tau_grid(noise, 2)[:-1], components=8)
    student.init_from(study["teacher"], noise_scale=0.5, generator=torch.Generator().manual_seed(0))
    train_table(study, student, joint_cdm_loss, steps=2, iters=200, lr=0.2, batch=128, num_latents=8,
                teacher_steps=16, target="step")
    student_kl = exact_kl_of(study, student, 2, components=8)
    assert student_kl < teacher_kl / 10


def _chain_from(study, start: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """The teacher chain's exact law from one sequence, by propagating its one-hot."""
    one_hot = torch.zeros(len(study["support"]), dtype=torch.float64)
    one_hot[sequence_index(start[None], N)] = 1.0
    return exact_sample_distribution(study["teacher"], study["graph"], study["support"], taus, prior=one_hot)


def test_exact_chain_matrix_holds_the_chain_from_every_start(study):
    """Row a of the (S, S) matrix product is the chain's law from support[a], as the
    vector propagation of exact_sample_distribution computes it."""
    graph, support, noise = study["graph"], study["support"], study["noise"]
    taus = tau_of_time(noise, time_grid(5, 0.6, 0.0))
    chain = exact_chain_matrix(study["teacher"], graph, support, taus)
    assert chain.shape == (N ** L, N ** L) and chain.dtype == torch.float32
    torch.testing.assert_close(chain.sum(1), torch.ones(N ** L), rtol=0, atol=1e-5)
    for a in (0, 17, N ** L - 1):
        torch.testing.assert_close(chain[a].double(), _chain_from(study, support[a], taus), rtol=1e-4, atol=1e-6)
    mixture = TabularScoreModel(graph, support, tau_grid(noise, 2)[:-1], components=2)
    with pytest.raises(ValueError, match="plain model"):
        exact_chain_matrix(mixture, graph, support, taus)
    with pytest.raises(ValueError, match="taus"):
        exact_chain_matrix(study["teacher"], graph, support, taus.flip(0))


def test_joint_cdm_exact_target_is_the_expected_mixture_nll(study):
    """``target="exact"``: the mixture NLL of every x_0 weighed by the teacher chain's
    exact law from x_t (``teacher_steps`` steps on [0, t]), by hand, per sequence."""
    graph, support, noise, m, teacher_steps = study["graph"], study["support"], study["noise"], 3, 3
    student = TabularScoreModel(graph, support, tau_grid(noise, 2)[:-1], components=m)
    student.init_from(study["teacher"], noise_scale=1.0, generator=torch.Generator().manual_seed(0))
    targets = ExactTargets(study["teacher"], graph, noise, L, steps=2, teacher_steps=teacher_steps)
    seen, lookup = [], targets.probabilities
    targets.probabilities = lambda x_t, t: seen.append((x_t.clone(), t.clone())) or lookup(x_t, t)
    x0 = study["data"].sample(6, torch.Generator().manual_seed(0))
    loss = joint_cdm_loss(student, study["teacher"], graph, noise, x0, steps=2, num_latents=m,
                          teacher_steps=teacher_steps, target="exact", exact_targets=targets,
                          generator=torch.Generator().manual_seed(1), reduction="none")
    ((x_t, t),) = seen
    assert sorted(set(t.tolist())) != [1.0], "both grid times should be drawn"
    for b in range(len(x0)):
        with torch.no_grad():
            log_q = torch.stack([student.log_conditional(x_t[b:b + 1], noise.total(t[b:b + 1]),
                                                         torch.full((1, 1), (k + 0.5) / m))[0] for k in range(m)])
        log_lik = log_q[:, torch.arange(L), support].sum(-1)  # (M, S): log prod_i q_k(y^i | x_t)
        law = _chain_from(study, x_t[b], tau_of_time(noise, time_grid(teacher_steps, float(t[b]), 0.0)))
        expected = -(law * (torch.logsumexp(log_lik, 0) - math.log(m))).sum() / L
        assert float(loss[b].detach()) == pytest.approx(float(expected), rel=1e-5)


def test_joint_cdm_exact_target_is_the_limit_of_many_draws(study):
    """The sampled clean target with R draws per x_t averages to the exact one (the same
    x_t: the draws before the targets are the same)."""
    graph, support, noise, m = study["graph"], study["support"], study["noise"], 2
    student = TabularScoreModel(graph, support, tau_grid(noise, 2)[:-1], components=m)
    student.init_from(study["teacher"], noise_scale=1.0, generator=torch.Generator().manual_seed(0))
    x0 = study["data"].sample(8, torch.Generator().manual_seed(2))
    targets = ExactTargets(study["teacher"], graph, noise, L, steps=2, teacher_steps=4)
    common = dict(steps=2, num_latents=m, teacher_steps=4, reduction="none")
    with torch.no_grad():
        exact = joint_cdm_loss(student, study["teacher"], graph, noise, x0, target="exact", exact_targets=targets,
                               generator=torch.Generator().manual_seed(3), **common)
        sampled = joint_cdm_loss(student, study["teacher"], graph, noise, x0, num_targets=4000,
                                 generator=torch.Generator().manual_seed(3), **common)
    # per x_t the draws' NLL spreads by ~1 nat, so 4000 draws leave ~0.015 per entry and ~0.005 on the mean
    assert float(sampled.mean()) == pytest.approx(float(exact.mean()), abs=0.015)
    assert float((sampled - exact).abs().max()) < 0.06


def test_joint_cdm_exact_target_refuses_what_it_cannot_serve(study):
    graph, support, noise = study["graph"], study["support"], study["noise"]
    student = TabularScoreModel(graph, support, tau_grid(noise, 2)[:-1], components=2)
    x0 = study["data"].sample(4, torch.Generator().manual_seed(0))
    targets = ExactTargets(study["teacher"], graph, noise, L, steps=2, teacher_steps=2)
    run = functools.partial(joint_cdm_loss, student, study["teacher"], graph, noise, x0, steps=2, num_latents=2)
    with pytest.raises(ValueError, match="exact_targets"):
        run(target="exact", teacher_steps=2)
    with pytest.raises(ValueError, match="teacher_steps=3"):
        run(target="exact", teacher_steps=3, exact_targets=targets)
    with pytest.raises(ValueError, match="exact_targets"):
        run(target="clean", teacher_steps=2, exact_targets=targets)
    with pytest.raises(ValueError, match="t_dist"):
        run(target="exact", teacher_steps=2, exact_targets=targets, t_dist="uniform")
    with pytest.raises(ValueError, match="grid"):
        targets.probabilities(support[:2], torch.tensor([1.0, 0.7], dtype=torch.float64))
    with pytest.raises(ValueError, match="positive ints"):
        ExactTargets(study["teacher"], graph, noise, L, steps=0, teacher_steps=2)


def test_joint_cdm_exact_target_trains_further_than_one_draw_per_input(study):
    """At equal steps the exact target (no sampling variance) leaves the 2-step mixture
    student closer to the data than one teacher draw per noisy input, and both cut the
    factorised sampler's KL by more than an order of magnitude."""
    graph, support, noise = study["graph"], study["support"], study["noise"]
    teacher_kl = exact_kl_of(study, study["teacher"], 2)
    kls = {}
    for target in ("clean", "exact"):
        student = TabularScoreModel(graph, support, tau_grid(noise, 2)[:-1], components=8)
        student.init_from(study["teacher"], noise_scale=0.5, generator=torch.Generator().manual_seed(0))
        extra = {"exact_targets": ExactTargets(study["teacher"], graph, noise, L, 2, 16)} if target == "exact" else {}
        train_table(study, student, joint_cdm_loss, steps=2, iters=150, lr=0.2, batch=128, num_latents=8,
                    teacher_steps=16, target=target, **extra)
        kls[target] = exact_kl_of(study, student, 2, components=8)
    assert kls["exact"] < kls["clean"] < teacher_kl / 10, (kls, teacher_kl)


# ----------------------------------------------------------------------------- coupled targets


def test_stratified_draws_are_exact_draws_that_cover_their_law():
    """Each row of ``_stratified_draw`` is a draw of its own law (chi-square over many
    groups), and in a group of R rows with the same law the number of draws up to each
    state is within one of R times its CDF (the R uniforms cover the R strata)."""
    from cdm.losses.cdm import _stratified_draw

    generator, r, groups = torch.Generator().manual_seed(0), 8, 4000
    law = torch.tensor([[0.05, 0.5, 0.0, 0.3, 0.15], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)  # 2 positions
    weights = (3.0 * law).float()[None].expand(groups * r, -1, -1)  # unnormalised, as the step's weights are
    draws = _stratified_draw(weights, r, generator)
    counts = torch.nn.functional.one_hot(draws, 5).view(groups, r, 2, 5).sum(1).double()  # (groups, L, N) per group
    # the rows below each state boundary: those of the strata below R * CDF, and at most one more
    assert float((counts.cumsum(-1) - r * law.cumsum(-1)).abs().max()) < 1.0 + 1e-6
    assert int(counts[:, 0, 2].sum()) == 0  # a state of probability 0 is never drawn
    for row in (0, r - 1):  # the law of one row across groups: chi-square, 3 and 4 degrees of freedom
        seen = torch.nn.functional.one_hot(draws.view(groups, r, 2)[:, row], 5).sum(0).double()
        expected = groups * law
        chi2 = torch.where(expected > 0, (seen - expected) ** 2 / expected.clamp_min(1e-12), 0.0).sum(-1)
        assert bool((chi2 < 20.0).all()), chi2


def test_coupled_targets_refuse_what_they_cannot_serve(study):
    graph, support, noise = study["graph"], study["support"], study["noise"]
    student = TabularScoreModel(graph, support, tau_grid(noise, 2)[:-1], components=2)
    x0 = study["data"].sample(4, torch.Generator().manual_seed(0))
    targets = ExactTargets(study["teacher"], graph, noise, L, steps=2, teacher_steps=2)
    run = functools.partial(joint_cdm_loss, student, study["teacher"], graph, noise, x0, steps=2, num_latents=2,
                            teacher_steps=2)
    with pytest.raises(ValueError, match="coupling"):
        run(coupling="latin")
    with pytest.raises(ValueError, match="coupling"):
        run(coupling="stratified", target="exact", exact_targets=targets)
    times = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="strata"):
        teacher_chain(study["teacher"], graph, noise, x0, times, times / 2, 2, strata=3)


def test_stratified_targets_give_an_unbiased_gradient_of_lower_variance(study, monkeypatch):
    """On fixed noisy inputs (every sequence at both grid times of a 2-step student), the
    gradient of the joint loss w.r.t. a mixture table student's logits, over seeds: with
    R = 8 coupled chains (``coupling="stratified"``) its mean is the exact target's
    gradient (the squared error of the mean is what the spread alone explains), and its
    mean squared error is below that of R = 8 independent chains (the same teacher calls)
    and far below one draw's."""
    import cdm.losses.cdm as cdm_module

    graph, support, noise, m, teacher_steps = study["graph"], study["support"], study["noise"], 4, 8
    student = TabularScoreModel(graph, support, tau_grid(noise, 2)[:-1], components=m)
    student.init_from(study["teacher"], noise_scale=0.5, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1.0, 0.5], dtype=torch.float64).repeat_interleave(len(support))
    monkeypatch.setattr(cdm_module, "_noisy_inputs", lambda *args, **kwargs: (t, t - 0.5, support.repeat(2, 1)))
    common = dict(steps=2, num_latents=m, teacher_steps=teacher_steps)

    def gradient(seed, **options):
        student.zero_grad()
        joint_cdm_loss(student, study["teacher"], graph, noise, support, generator=torch.Generator().manual_seed(seed),
                       **common, **options).backward()
        return student.logits.grad.flatten().clone()

    exact = gradient(0, target="exact", exact_targets=ExactTargets(study["teacher"], graph, noise, L, 2, teacher_steps))
    seeds = range(1, 25)
    errors = {name: torch.stack([gradient(seed, **options) for seed in seeds]) - exact
              for name, options in [("one", dict(num_targets=1)), ("independent", dict(num_targets=8)),
                                    ("stratified", dict(num_targets=8, coupling="stratified"))]}
    mse = {name: float((e ** 2).sum(1).mean()) for name, e in errors.items()}
    bias2 = float((errors["stratified"].mean(0) ** 2).sum())
    print(mse, bias2)
    assert bias2 < 2.0 * mse["stratified"] / len(seeds), (bias2, mse)
    assert mse["stratified"] < 0.9 * mse["independent"] < 0.9 * mse["one"] / 6, mse
