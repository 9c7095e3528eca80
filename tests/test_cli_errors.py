"""The ``cdm`` command refuses bad input with one clear line naming the argument,
exit code 2 and no traceback: missing, truncated, foreign or mismatched files,
unknown or malformed options, out-of-range values."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from cdm.checkpoint import load_checkpoint, save_checkpoint
from cdm.cli import main
from cdm.experiment import Setup, new_model, save_model
from cdm.train import TrainConfig, Trainer

DATA = ["--data-option", "vocab_size=4", "--data-option", "seq_len=4"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """An untrained tiny model file (4 tokens, length 4): loading is all these tests need."""
    path = tmp_path_factory.mktemp("model") / "teacher.safetensors"
    setup = Setup(data="markov", data_options={"vocab_size": 4, "seq_len": 4})
    torch.manual_seed(0)
    save_model(path, new_model(setup, "tiny"), setup, "teacher")
    return path


def fails(argv, capsys, *needles):
    """Run ``cdm argv`` in-process: it must exit with code 2 and print every needle on stderr."""
    with pytest.raises(SystemExit) as exit_info:  # any other exception would be a traceback
        main([str(a) for a in argv])
    assert exit_info.value.code == 2, exit_info.value.code
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# ----------------------------------------------------------------------------- model files


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_missing_model_file(command, tmp_path, capsys):
    path = tmp_path / "absent.safetensors"
    fails([command, "--checkpoint", path], capsys, "no model file", str(path))


def test_missing_teacher_for_distill(tmp_path, capsys):
    path = tmp_path / "absent.safetensors"
    fails(["distill", "--teacher", path, "--out", tmp_path / "d"], capsys, "no model file", str(path))


@pytest.mark.parametrize("cut", ["half", "header", "empty", "garbage"])
def test_truncated_or_garbage_model_file(cut, model_file, tmp_path, capsys):
    data = model_file.read_bytes()
    path = tmp_path / "bad.safetensors"
    path.write_bytes({"half": data[: len(data) // 2], "header": data[:5], "empty": b"",
                      "garbage": b"not a checkpoint at all"}[cut])
    fails(["sample", "--checkpoint", path], capsys, "corrupt", str(path))


def test_foreign_safetensors_file(tmp_path, capsys):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, path)
    fails(["eval", "--checkpoint", path], capsys, "without cdm metadata")


def test_training_checkpoint_is_not_a_model_file(model_file, tmp_path, capsys):
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, {"model.x": torch.zeros(1)}, {"step": 3})
    fails(["sample", "--checkpoint", path], capsys, "not a cdm model file", "'kind'")


def rewrite(model_file, path, edit_metadata=None, edit_tensors=None):
    tensors, metadata = load_checkpoint(model_file)
    if edit_metadata:
        edit_metadata(metadata)
    if edit_tensors:
        edit_tensors(tensors)
    save_checkpoint(path, tensors, metadata)
    return path


def test_model_file_whose_config_does_not_match_its_weights(model_file, tmp_path, capsys):
    path = rewrite(model_file, tmp_path / "m.safetensors", edit_metadata=lambda m: m["model"].update(hidden=32))
    fails(["sample", "--checkpoint", path], capsys, "weights do not match the stored config", "shapes differ")
    path = rewrite(model_file, tmp_path / "n.safetensors", edit_tensors=lambda t: t.pop("blocks.0.norm1.weight"))
    fails(["eval", "--checkpoint", path], capsys, "weights do not match", "blocks.0.norm1.weight")


def test_model_file_whose_config_does_not_match_its_data(model_file, tmp_path, capsys):
    path = rewrite(model_file, tmp_path / "m.safetensors",
                   edit_metadata=lambda m: m["setup"]["data_options"].update(vocab_size=6))
    fails(["sample", "--checkpoint", path], capsys, "vocab_size", "does not match")


def test_model_file_with_invalid_settings(model_file, tmp_path, capsys):
    path = rewrite(model_file, tmp_path / "m.safetensors", edit_metadata=lambda m: m["setup"].update(colour="red"))
    fails(["sample", "--checkpoint", path], capsys, "invalid settings", "colour")
    path = rewrite(model_file, tmp_path / "n.safetensors", edit_metadata=lambda m: m["setup"].update(graph="hexagonal"))
    fails(["sample", "--checkpoint", path], capsys, "invalid settings", "hexagonal")


# ----------------------------------------------------------------------------- --resume


def write_training_checkpoint(out, graph="uniform"):
    setup = Setup(data="markov", data_options={"vocab_size": 4, "seq_len": 4}, graph=graph)
    torch.manual_seed(0)
    model = new_model(setup, "tiny")
    from cdm.losses import get_loss

    loss = get_loss("score_entropy", setup.kernel_graph, setup.schedule)
    metadata = {"name": "pretrain", "setup": setup.to_json(), "model": model.config.__dict__}
    config = TrainConfig(steps=1, batch_size=4, warmup=1, progress=False)
    Trainer(model, loss, setup.dataset.sample, config, out, metadata).fit()


def test_resume_from_a_checkpoint_of_other_settings(tmp_path, capsys):
    write_training_checkpoint(tmp_path, graph="absorbing")
    fails(["pretrain", *DATA, "--steps", 2, "--out", tmp_path, "--resume", "--quiet"], capsys,
          "--resume", "other settings", "setup")
    assert not (tmp_path / "teacher.safetensors").exists()


def test_resume_of_a_distillation_takes_new_loss_options_but_not_another_student(model_file, tmp_path, capsys):
    """The checkpoint pins the model, data and method; the loss options (here the
    teacher's steps per target) may change when a run is extended."""
    def argv(steps, teacher_steps, components=2, resume=()):
        return [str(a) for a in ["distill", "--teacher", model_file, "--methods", "joint", "--student-steps", 1,
                                 "--teacher-nfe", 1, "--num-samples", 8, "--batch-size", 4, "--steps", steps,
                                 "--teacher-steps", teacher_steps, "--latent-components", components,
                                 "--out", tmp_path, "--quiet", *resume]]

    main(argv(2, 2))
    capsys.readouterr()
    main(argv(3, 4, resume=["--resume"]))
    assert "joint-k1: resumed at step 2" in capsys.readouterr().out
    _, metadata = load_checkpoint(tmp_path / "joint-k1" / "checkpoint.safetensors")
    assert int(metadata["step"]) == 3
    fails(argv(4, 4, components=3, resume=["--resume"]), capsys, "--resume", "other settings", "model")


def test_grid_weights_reach_the_cdm_losses_only(model_file, tmp_path, monkeypatch, capsys):
    """``--grid-weights`` is an option of the two CDM losses (Di4C and D-MMD draw
    their own times): the loss each student is built with, caught before training;
    for a run of Di4C or D-MMD alone it is refused by name."""
    import cdm.cli

    class Built(Exception):
        pass

    def fake_get_loss(name, graph, noise, teacher=None, **options):
        raise Built(name, options)

    monkeypatch.setattr(cdm.cli, "get_loss", fake_get_loss)
    for method in ("joint", "per-token", "di4c", "dmmd"):
        argv = [str(a) for a in ["compare", "--teacher", model_file, "--methods", method, "--student-steps", 3,
                                 "--teacher-nfe", 1, "--num-samples", 8, "--grid-weights", "1,2.5,0",
                                 "--out", tmp_path, "--quiet"]]
        if method in ("di4c", "dmmd"):
            fails(argv, capsys, "--grid-weights applies to --methods per-token,joint only")
            continue
        with pytest.raises(Built) as built:
            main(argv)
        assert built.value.args[1].get("grid_weights") == [1.0, 2.5, 0.0], (method, built.value.args)


def test_student_init_starts_the_students_from_another_model_file(model_file, tmp_path, monkeypatch, capsys):
    """``--student-init`` (with ``--extra-blocks``): the student handed to training
    computes the earlier student; a file of other data, or components that do not
    split evenly, are refused by name."""
    import cdm.cli
    from cdm.experiment import load_model

    common = ["distill", "--teacher", model_file, "--methods", "joint", "--student-steps", 1, "--teacher-nfe", 1,
              "--num-samples", 8, "--batch-size", 4, "--steps", 2, "--quiet"]
    main([str(a) for a in [*common, "--latent-components", 2, "--out", tmp_path / "first"]])
    earlier_file = tmp_path / "first" / "student-joint-k1.safetensors"
    earlier, _, _ = load_model(earlier_file)

    class Built(Exception):
        pass

    def fake_trainer(model, *args, **kwargs):
        raise Built(model)

    monkeypatch.setattr(cdm.cli, "Trainer", fake_trainer)
    with pytest.raises(Built) as built:
        main([str(a) for a in [*common, "--latent-components", 2, "--student-init", earlier_file,
                               "--extra-blocks", 1, "--out", tmp_path / "second"]])
    student = built.value.args[0]
    assert student.config.n_blocks == earlier.config.n_blocks + 1
    x, sigma, lam = torch.randint(0, 4, (3, 4)), torch.tensor([0.2, 1.0, 4.0]), torch.tensor([0.2, 0.6, 0.9])
    torch.testing.assert_close(student(x, sigma, lam), earlier(x, sigma, lam), rtol=0, atol=0)

    fails([*common, "--latent-components", 3, "--student-init", earlier_file, "--out", tmp_path / "third"], capsys,
          "latent_components=3", "needs a multiple of 2")
    other = tmp_path / "other.safetensors"
    setup = Setup(data="markov", data_options={"vocab_size": 4, "seq_len": 4}, graph="absorbing")
    save_model(other, new_model(setup, "tiny"), setup, "teacher")
    fails([*common, "--student-init", other, "--out", tmp_path / "fourth"], capsys, "--student-init", "absorbing")


def test_eval_handover_prints_every_pattern_and_refuses_a_foreign_teacher(model_file, tmp_path, capsys):
    """``cdm eval --handover``: one row per sampler pattern; a teacher of another setup
    and data too large to enumerate are refused by name."""
    main([str(a) for a in ["eval", "--checkpoint", model_file, "--steps", 2, "--handover", "--teacher", model_file,
                           "--teacher-steps", 2]])
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["ss", "tt", "st", "ts"]
    other = tmp_path / "other.safetensors"
    setup = Setup(data="markov", data_options={"vocab_size": 3, "seq_len": 4})
    save_model(other, new_model(setup, "tiny"), setup, "teacher")
    fails(["eval", "--checkpoint", model_file, "--handover", "--teacher", other], capsys, "--teacher", "another setup")
    large = tmp_path / "large.safetensors"
    setup = Setup(data="markov", data_options={"vocab_size": 8, "seq_len": 8})
    save_model(large, new_model(setup, "tiny"), setup, "teacher")
    fails(["eval", "--checkpoint", large, "--handover", "--teacher", large], capsys, "--handover", "enumerable")


def test_resume_from_a_truncated_checkpoint(tmp_path, capsys):
    write_training_checkpoint(tmp_path)
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    fails(["pretrain", *DATA, "--steps", 2, "--out", tmp_path, "--resume", "--quiet"], capsys, "corrupt", str(path))


def test_resume_from_a_checkpoint_without_training_state(tmp_path, capsys):
    # right metadata, wrong contents (e.g. a model file copied over the checkpoint)
    write_training_checkpoint(tmp_path)
    path = tmp_path / "checkpoint.safetensors"
    tensors, metadata = load_checkpoint(path)
    save_checkpoint(path, {k: v for k, v in tensors.items() if not k.startswith("model.blocks")}, metadata)
    fails(["pretrain", *DATA, "--steps", 2, "--out", tmp_path, "--resume", "--quiet"], capsys,
          "--resume", "not a training checkpoint")


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("option, needles", [
    (["--data-option", "colour=3"], ["--data-option", "colour"]),
    (["--data-option", "vocab_size"], ["--data-option", "key=value", "'vocab_size'"]),
    (["--data-option", "=4"], ["--data-option", "key=value"]),
    (["--data-option", "vocab_size=1"], ["--data-option", "vocab_size"]),
    (["--data-option", "vocab_size=four"], ["--data-option", "vocab_size", "'four'"]),
    (["--data-option", "stickiness=1.5"], ["--data-option", "stickiness"]),
    (["--noise-option", "colour=3"], ["--noise-option", "colour"]),
    (["--noise-option", "sigma_max"], ["--noise-option", "key=value"]),
])
def test_bad_data_and_noise_options(option, needles, tmp_path, capsys):
    fails(["pretrain", *option, "--steps", 1, "--out", tmp_path / "t", "--quiet"], capsys, *needles)
    assert not (tmp_path / "t" / "checkpoint.safetensors").exists()


@pytest.mark.parametrize("argv, argument", [
    (["pretrain", "--steps", "0"], "argument --steps"),
    (["pretrain", "--steps", "many"], "argument --steps"),
    (["pretrain", "--batch-size", "-4"], "argument --batch-size"),
    (["pretrain", "--lr", "0"], "argument --lr"),
    (["pretrain", "--lr", "fast"], "argument --lr"),
    (["pretrain", "--ema", "1"], "argument --ema"),
    (["pretrain", "--ema", "-0.5"], "argument --ema"),
    (["pretrain", "--warmup", "-1"], "argument --warmup"),
    (["pretrain", "--save-every", "0"], "argument --save-every"),
    (["pretrain", "--log-every", "0"], "argument --log-every"),
    (["pretrain", "--model", "enormous"], "argument --model"),
    (["pretrain", "--graph", "hexagonal"], "argument --graph"),
    (["pretrain", "--data", "imagenet"], "argument --data"),
    (["distill", "--methods", "magic"], "argument --methods"),
    (["distill", "--methods", ","], "argument --methods"),
    (["distill", "--student-steps", "0,1"], "argument --student-steps"),
    (["distill", "--teacher-nfe", "one"], "argument --teacher-nfe"),
    (["distill", "--num-samples", "0"], "argument --num-samples"),
    (["distill", "--num-latents", "-1"], "argument --num-latents"),
    (["compare", "--latent-components", "-2"], "argument --latent-components"),
    (["compare", "--student-output", "logits"], "argument --student-output"),
    (["sample", "--checkpoint", "x", "--steps", "0"], "argument --steps"),
    (["sample", "--checkpoint", "x", "--num-samples", "-1"], "argument --num-samples"),
    (["sample", "--checkpoint", "x", "--method", "magic"], "argument --method"),
    (["eval", "--checkpoint", "x", "--steps", "1,-2"], "argument --steps"),
    (["eval"], "required: --checkpoint"),
    (["pretrain", "--device", "tpu9"], "argument --device"),
    (["distill", "--device", "mps"], "argument --device"),
    (["sample", "--checkpoint", "x", "--device", "gpu"], "argument --device"),
    (["eval", "--checkpoint", "x", "--device", f"cuda:{torch.cuda.device_count()}"], "argument --device"),
    (["distill", "--joint-target", "x0"], "argument --joint-target"),
    (["distill", "--num-targets", "0"], "argument --num-targets"),
    (["distill", "--target-coupling", "latin"], "argument --target-coupling"),
    (["distill", "--mixture-weights", "--latent-components", "0"], "--mixture-weights needs --latent-components"),
    (["distill", "--shared-blocks", "-1"], "--shared-blocks"),
    (["distill", "--extra-blocks", "-1"], "argument --extra-blocks"),
    (["distill", "--student-steps", "2", "--grid-weights", "1,-1"], "argument --grid-weights"),
    (["distill", "--student-steps", "2", "--grid-weights", "0,0"], "argument --grid-weights"),
    (["distill", "--grid-weights", "1,2"], "--grid-weights gives 2 grid times: it needs --student-steps 2"),
    (["eval", "--checkpoint", "x", "--teacher", "y"], "--teacher: cdm eval reads a teacher only with --handover"),
])
def test_bad_values_are_refused_by_the_parser(argv, argument, tmp_path, capsys):
    if argv[0] in ("pretrain", "distill"):
        argv = [*argv, "--out", tmp_path / "out"]
    fails(argv, capsys, argument)
    assert not (tmp_path / "out").exists()


def test_out_is_an_existing_file(tmp_path, capsys):
    path = tmp_path / "taken"
    path.write_text("")
    fails(["pretrain", *DATA, "--steps", 1, "--out", path, "--quiet"], capsys, str(path))


# ----------------------------------------------------------------------------- a real process


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--checkpoint", "{missing}"], "no model file"),
    (["eval", "--checkpoint", "{truncated}"], "corrupt"),
    (["pretrain", "--data-option", "colour=3", "--out", "{tmp}/t"], "--data-option"),
    (["pretrain", "--data-option", "vocab_size", "--out", "{tmp}/t"], "--data-option"),
    (["distill", "--methods", "magic", "--out", "{tmp}/d"], "argument --methods"),
])
def test_the_command_exits_with_2_and_no_traceback(argv, needle, model_file, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(model_file.read_bytes()[:100])
    paths = {"missing": tmp_path / "absent.safetensors", "truncated": truncated, "tmp": tmp_path}
    argv = [a.format(**paths) for a in argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "cdm.cli", *argv], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert needle in done.stderr.strip().splitlines()[-1]  # ends with the message (after argparse's usage), no dump


def test_exact_joint_targets_need_enumerable_data(tmp_path, capsys):
    setup = Setup(data="markov", data_options={"vocab_size": 8, "seq_len": 6})  # 8^6 sequences
    torch.manual_seed(0)
    save_model(tmp_path / "teacher.safetensors", new_model(setup, "tiny"), setup, "teacher")
    fails(["distill", "--teacher", tmp_path / "teacher.safetensors", "--methods", "joint", "--joint-target", "exact",
           "--student-steps", 1, "--teacher-nfe", 1, "--num-samples", 8, "--steps", 1, "--quiet",
           "--out", tmp_path / "d"], capsys, "--joint-target exact", "8192")
