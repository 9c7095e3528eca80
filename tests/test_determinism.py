"""The same seed gives the same samples and the same training curve (same backend);
another seed gives others."""

import json

import pytest
import torch

import cdm_kernels as ck
from cdm.cli import main
from cdm.experiment import Setup, default_teacher_path, evaluate, load_model, new_model, save_model
from cdm.losses import get_loss
from cdm.models import make_student
from cdm.sampling import sample
from cdm.train import TrainConfig, Trainer

DATA = ["--data-option", "vocab_size=4", "--data-option", "seq_len=4"]


def curve(path):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


def pretrain(out, seed):
    main(["pretrain", *DATA, "--steps", "6", "--batch-size", "8", "--warmup", "2", "--log-every", "1",
          "--seed", str(seed), "--out", str(out), "--quiet"])
    return (out / "teacher.safetensors").read_bytes(), curve(out / "log.jsonl")


def test_cli_pretrain_same_seed_same_model_and_curve(tmp_path, capsys):
    # the global torch RNG is disturbed in between: the CLI must seed everything itself
    first = pretrain(tmp_path / "a", seed=1)
    torch.rand(10)
    second = pretrain(tmp_path / "b", seed=1)
    assert first == second
    other = pretrain(tmp_path / "c", seed=2)
    assert other[0] != first[0] and other[1] != first[1]
    out = capsys.readouterr().out.splitlines()
    assert out[0].split("sampler:")[1] == out[1].split("sampler:")[1]


def run_trainer(out, seed, distill_from=None):
    setup = Setup(data="markov", data_options={"vocab_size": 4, "seq_len": 4})
    if distill_from is None:
        torch.manual_seed(0)  # the same initial weights; `seed` drives batches and noise
        model = new_model(setup, "tiny")
        loss = get_loss("score_entropy", setup.kernel_graph, setup.schedule)
    else:
        torch.manual_seed(0)  # as `cdm distill` does: the new latent layers are random
        model = make_student(distill_from, latent_dim=2)
        loss = get_loss("cdm_joint", setup.kernel_graph, setup.schedule, teacher=distill_from, steps=1,
                        num_latents=2, teacher_steps=2)
    config = TrainConfig(steps=4, batch_size=8, warmup=1, log_every=1, save_every=2, seed=seed, progress=False)
    trainer = Trainer(model, loss, setup.dataset.sample, config, out, {"name": "d"})
    trainer.fit()
    return curve(out / "log.jsonl"), [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("kind", ["teacher", "joint-student"])
def test_trainer_same_seed_same_curve(kind, tmp_path):
    teacher = None
    if kind == "joint-student":
        torch.manual_seed(1)
        teacher = new_model(Setup(data="markov", data_options={"vocab_size": 4, "seq_len": 4}), "tiny").eval()
    first = run_trainer(tmp_path / "a", 7, teacher)
    second = run_trainer(tmp_path / "b", 7, teacher)
    assert first[0] == second[0]
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    other = run_trainer(tmp_path / "c", 8, teacher)
    assert other[0] != first[0]


def shipped_or_tiny(tmp_path):
    path = default_teacher_path()
    if path is None:
        setup = Setup(data="markov", data_options={"vocab_size": 4, "seq_len": 4})
        torch.manual_seed(0)
        path = tmp_path / "teacher.safetensors"
        save_model(path, new_model(setup, "tiny"), setup, "teacher")
    return path


@pytest.mark.parametrize("method", ["analytic", "euler"])
def test_same_seed_same_samples(method, tmp_path):
    model, setup, _ = load_model(shipped_or_tiny(tmp_path))
    draws = [evaluate(model, setup, 3, 64, seed=seed, method=method)[1] for seed in (4, 4, 5)]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])
    # the generator alone decides: the global RNG does not leak in
    torch.manual_seed(123)
    again = sample(model, setup.kernel_graph, setup.schedule, 64, setup.dataset.seq_len, 3, method=method,
                   generator=torch.Generator().manual_seed(4))
    assert torch.equal(again, draws[0])


def test_cli_sample_same_seed_same_output(tmp_path, capsys):
    path = shipped_or_tiny(tmp_path)
    outputs = []
    for seed in (0, 0, 1):
        main(["sample", "--checkpoint", str(path), "--steps", "2", "--num-samples", "8", "--seed", str(seed)])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]


@pytest.mark.parametrize("graph", [ck.UniformGraph(9), ck.AbsorbingGraph(9), ck.ordinal_graph(9)], ids=str)
def test_euler_step_draws_depend_on_the_seed_only(backend, graph):
    """Per backend: the same generator seed gives the same tokens, whatever the
    thread count; cpp draws from Philox keyed by position."""
    gen = torch.Generator().manual_seed(0)
    log_score = torch.randn(3, 257, 9, generator=gen, dtype=torch.float64)
    x = torch.randint(0, 9, (3, 257), generator=gen)

    def step(seed, threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return ck.fused_euler_step(graph, log_score, x, 1.5, 0.5, generator=torch.Generator().manual_seed(seed),
                                       backend=backend)
        finally:
            torch.set_num_threads(previous)

    first = step(11, 1)
    assert torch.equal(first, step(11, 2))
    assert torch.equal(first, step(11, 1))
    assert not torch.equal(first, step(12, 1))


def test_cli_distill_same_seed_same_student(tmp_path, capsys):
    teacher = shipped_or_tiny(tmp_path)

    def distill(out):
        main(["distill", "--teacher", str(teacher), "--methods", "joint", "--student-steps", "1", "--teacher-nfe", "1",
              "--steps", "6", "--batch-size", "8", "--num-samples", "32", "--num-latents", "2", "--teacher-steps", "2",
              "--log-every", "1", "--out", str(out), "--quiet"])
        torch.rand(10)  # disturb the global RNG between runs
        return (out / "student-joint-k1.safetensors").read_bytes(), curve(out / "joint-k1" / "log.jsonl")

    assert distill(tmp_path / "a") == distill(tmp_path / "b")


def test_cli_deterministic_flag_with_two_threads(tmp_path):
    """`--deterministic`: the default joint-CDM student (32 components, posterior output)
    twice with two threads, bit for bit (without it they differ by ~1e-7 after 30 steps:
    a threaded torch op sums in a varying order); the process-wide flag is restored."""
    teacher = shipped_or_tiny(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def distill(out):
            main(["distill", "--teacher", str(teacher), "--methods", "joint", "--student-steps", "1",
                  "--teacher-nfe", "1", "--steps", "30", "--num-samples", "16", "--out", str(out), "--quiet",
                  "--deterministic"])
            return (out / "student-joint-k1.safetensors").read_bytes()

        assert distill(tmp_path / "a") == distill(tmp_path / "b")
    finally:
        torch.set_num_threads(threads)
    assert not torch.are_deterministic_algorithms_enabled()
