"""The training loop: it learns, it resumes exactly, and the CLI runs end to end on tiny settings."""

import io
import json
import sys

import pytest
import torch

from cdm.cli import main
from cdm.experiment import Setup, load_model, new_model
from cdm.losses import get_loss
from cdm.train import TrainConfig, Trainer, learning_rate


def tiny_trainer(out, steps, seed=0, lr_schedule="constant"):
    torch.manual_seed(0)
    setup = Setup(data="markov", data_options={"vocab_size": 4, "seq_len": 4})
    model = new_model(setup, "tiny")
    loss = get_loss("score_entropy", setup.kernel_graph, setup.schedule)
    config = TrainConfig(steps=steps, batch_size=16, lr=1e-3, warmup=2, ema=0.9, log_every=1, save_every=3, seed=seed, progress=False,
                         lr_schedule=lr_schedule)
    return Trainer(model, loss, setup.dataset.sample, config, out, metadata={"name": "test", "setup": setup.to_json()})


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine"])
def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path, lr_schedule):
    straight = tiny_trainer(tmp_path / "a", steps=6, lr_schedule=lr_schedule)
    straight.fit()
    interrupted = tiny_trainer(tmp_path / "b", steps=6, lr_schedule=lr_schedule)
    sample_batch = interrupted.sample_batch

    def killed_after_the_checkpoint_at_step_3(batch_size, generator):
        if interrupted.step == 4:
            raise KeyboardInterrupt
        return sample_batch(batch_size, generator)

    interrupted.sample_batch = killed_after_the_checkpoint_at_step_3
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    resumed = tiny_trainer(tmp_path / "b", steps=6, lr_schedule=lr_schedule)
    assert resumed.resume() and resumed.step == 3
    resumed.fit()
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    resumed_losses = [json.loads(line)["loss"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert losses == resumed_losses


def test_progress_without_a_terminal_is_one_line_every_log_every_steps(tmp_path, capsys):
    trainer = tiny_trainer(tmp_path, steps=12)
    trainer.config.progress, trainer.config.log_every = True, 5
    trainer.fit()
    err = capsys.readouterr().err  # pytest's captured stderr is not a terminal
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["test: step 5/12", "test: step 10/12", "test: step 12/12"]
    assert all("loss " in line for line in lines)


def test_progress_on_a_terminal_is_a_bar(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    trainer = tiny_trainer(tmp_path, steps=12)
    trainer.config.progress, trainer.config.log_every = True, 5
    trainer.fit()
    assert "\r" in terminal.getvalue() and "step 5/12" not in terminal.getvalue()


def test_quiet_training_writes_nothing_to_stderr(tmp_path, capsys):
    tiny_trainer(tmp_path, steps=6).fit()  # progress=False, as --quiet
    assert capsys.readouterr().err == ""


def test_learning_rate_schedules():
    constant = TrainConfig(steps=100, lr=1e-3, warmup=10)
    cosine = TrainConfig(steps=100, lr=1e-3, warmup=10, lr_schedule="cosine")
    for config in (constant, cosine):  # the same linear warmup
        assert learning_rate(0, config) == pytest.approx(1e-4)
        assert learning_rate(9, config) == pytest.approx(1e-3)
    assert [learning_rate(s, constant) for s in (10, 55, 99)] == pytest.approx([1e-3] * 3)
    assert learning_rate(55, cosine) == pytest.approx(0.5e-3)  # half way through the decay
    decay = [learning_rate(s, cosine) for s in range(10, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:])) and 0 < decay[-1] < 1e-6
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_resume_refuses_other_settings(tmp_path):
    tiny_trainer(tmp_path, steps=3).fit()
    other = tiny_trainer(tmp_path, steps=6)
    other.metadata["setup"] = {**other.metadata["setup"], "graph": "absorbing"}
    with pytest.raises(ValueError, match="other settings"):
        other.resume()


def test_training_lowers_the_loss(tmp_path):
    trainer = tiny_trainer(tmp_path, steps=60)
    trainer.config.lr = 3e-3
    trainer.fit()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sum(losses[-10:]) < sum(losses[:10])


def test_tensorboard_gets_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_trainer(tmp_path, steps=4).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    for name in ("loss", "grad_norm", "lr"):
        scalars = events.Scalars(f"train/{name}")
        assert [e.step for e in scalars] == [r["step"] for r in logged]
        assert [e.value for e in scalars] == pytest.approx([r[name] for r in logged], rel=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_cli_pretrain_distill_sample_eval(tmp_path, capsys, device):
    options = ["--data-option", "vocab_size=4", "--data-option", "seq_len=4", "--device", device]
    main(["pretrain", *options, "--steps", "20", "--batch-size", "16", "--out", str(tmp_path / "t"), "--quiet"])
    teacher = tmp_path / "t" / "teacher.safetensors"
    model, setup, metadata = load_model(teacher)
    assert metadata["kind"] == "teacher" and setup.dataset.vocab_size == 4
    main(["distill", "--teacher", str(teacher), "--steps", "3", "--batch-size", "8", "--student-steps", "1,2",
          "--teacher-nfe", "1,4", "--num-samples", "64", "--teacher-steps", "2", "--num-latents", "2",
          "--joint-target", "step", "--num-targets", "2", "--device", device, "--out", str(tmp_path / "d"), "--quiet"])
    rows = json.loads((tmp_path / "d" / "results.json").read_text())
    assert {(r["model"], r["method"], r["nfe"]) for r in rows} == {
        ("teacher", "analytic", 1), ("teacher", "analytic", 4),
        ("student", "cdm-per-token", 1), ("student", "cdm-per-token", 2),
        ("student", "cdm-joint", 1), ("student", "cdm-joint", 2),
    }
    assert all({"nll", "kl", "reverse_kl"} <= set(r["metrics"]) for r in rows)  # 4^4 sequences: exact KLs
    assert (tmp_path / "d" / "metric_vs_nfe.png").stat().st_size > 1000
    main(["compare", "--teacher", str(teacher), "--methods", "di4c,dmmd", "--steps", "2", "--batch-size", "4",
          "--student-steps", "1", "--teacher-nfe", "1", "--num-samples", "32", "--latent-components", "2",
          "--device", device, "--out", str(tmp_path / "c"), "--quiet"])
    rows = json.loads((tmp_path / "c" / "results.json").read_text())
    assert [(r["model"], r["method"], r["nfe"]) for r in rows] == [
        ("teacher", "analytic", 1), ("student", "di4c", 1), ("student", "d-mmd", 1)]
    main(["distill", "--teacher", str(teacher), "--methods", "joint", "--mixture-weights", "--latent-components", "2",
          "--steps", "2", "--batch-size", "4", "--student-steps", "2", "--teacher-nfe", "1", "--num-samples", "32",
          "--teacher-steps", "2", "--device", device, "--out", str(tmp_path / "w"), "--quiet"])
    weighted = tmp_path / "w" / "student-joint-k2.safetensors"
    assert load_model(weighted)[0].config.mixture_weights
    rows = json.loads((tmp_path / "w" / "results.json").read_text())
    assert (rows[-1]["method"], rows[-1]["nfe"]) == ("cdm-joint-weighted", 4)  # 2 steps, 2 passes each
    main(["eval", "--checkpoint", str(weighted), "--steps", "2", "--num-samples", "16", "--device", device])
    main(["distill", "--teacher", str(teacher), "--methods", "joint", "--mixture-weights", "--latent-components", "2",
          "--shared-blocks", "1", "--steps", "2", "--batch-size", "4", "--student-steps", "2", "--teacher-nfe", "1",
          "--num-samples", "32", "--teacher-steps", "2", "--device", device, "--out", str(tmp_path / "s"), "--quiet"])
    assert load_model(tmp_path / "s" / "student-joint-k2.safetensors")[0].config.shared_blocks == 1
    rows = json.loads((tmp_path / "s" / "results.json").read_text())
    assert (rows[-1]["method"], rows[-1]["nfe"]) == ("cdm-joint-weighted", 2)  # one pass a step
    main(["sample", "--checkpoint", str(tmp_path / "d" / "student-joint-k1.safetensors"), "--steps", "1",
          "--num-samples", "3", "--device", device])
    main(["eval", "--checkpoint", str(teacher), "--steps", "1,2", "--num-samples", "32", "--device", device])
    out = capsys.readouterr().out
    assert "primary metric: kl" in out


def test_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(tmp_path / "missing.safetensors")])
    assert "no model file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "--methods", "magic", "--out", str(tmp_path)])


def test_a_markov_chain_too_large_to_enumerate_is_judged_by_nll(tmp_path, capsys):
    """8^8 sequences: no exact KL; the table, results and plot use the exact NLL of samples."""
    from cdm.experiment import enumerable, primary_metric

    big = Setup(data="markov", data_options={"seq_len": 8})
    assert not enumerable(big) and primary_metric(big) == ("nll", True)
    assert primary_metric(Setup()) == ("kl", True)
    main(["pretrain", "--data-option", "seq_len=8", "--steps", "2", "--batch-size", "8", "--out", str(tmp_path / "t"),
          "--quiet"])
    main(["distill", "--teacher", str(tmp_path / "t" / "teacher.safetensors"), "--methods", "per-token",
          "--student-steps", "1", "--teacher-nfe", "1", "--steps", "2", "--batch-size", "4", "--num-samples", "16",
          "--out", str(tmp_path / "d"), "--quiet"])
    rows = json.loads((tmp_path / "d" / "results.json").read_text())
    assert all("kl" not in r["metrics"] and "nll" in r["metrics"] for r in rows)
    assert "primary metric: nll" in capsys.readouterr().out
