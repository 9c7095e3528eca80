"""``cdm distill/compare --recipe NAME | --config FILE.toml``, ``cdm recipes``, the
grouped ``--help``, the refusal of options the chosen methods do not read, and the
axis of the default plot."""

import pytest

import cdm.cli
from cdm import recipes
from cdm.cli import main

#: every shipped recipe -> the command line it stands for
RECIPE_COMMANDS = {
    "default": [],
    "best-1step": ["--methods", "joint", "--student-steps", "1", "--latent-components", "64", "--teacher-steps", "64",
                   "--num-targets", "1", "--lr-schedule", "cosine", "--steps", "4000"],
    "best-4step-exact": ["--methods", "joint", "--student-steps", "4", "--latent-components", "64", "--mixture-weights",
                         "--shared-blocks", "1", "--rollout", "0.5", "--lr-schedule", "cosine", "--joint-target",
                         "exact", "--teacher-steps", "128", "--steps", "22000"],
    "best-4step-sampled": ["--methods", "joint", "--student-steps", "4", "--latent-components", "64",
                           "--mixture-weights", "--shared-blocks", "1", "--rollout", "0.5", "--lr-schedule", "cosine",
                           "--num-targets", "8", "--teacher-steps", "64", "--steps", "30000"],
}


@pytest.fixture
def resolved(monkeypatch):
    """``resolved(argv)``: the settings ``cdm argv`` would run with (the run itself replaced)."""
    def run(argv):
        captured = []
        monkeypatch.setattr(cdm.cli, "distill", captured.append)
        main([str(a) for a in argv])
        settings = vars(captured[0])
        return {k: v for k, v in settings.items() if k not in ("run", "recipe", "config")}

    return run


def fails(argv, capsys, *needles):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)


def test_cdm_recipes_lists_every_shipped_recipe_on_one_line(capsys):
    assert set(RECIPE_COMMANDS) <= set(recipes.names())
    main(["recipes"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == recipes.names()
    described = dict(line.split(maxsplit=1) for line in lines)
    assert "exact targets" in described["best-4step-exact"] and "enumerable data only" in described["best-4step-exact"]
    assert "sampled targets" in described["best-4step-sampled"] and "[data: any]" in described["best-4step-sampled"]
    for name in recipes.names():
        assert recipes.read_recipe(name)["about"]
        assert "docs/RESULTS.md" in (recipes.DIRECTORY / f"{name}.toml").read_text()


@pytest.mark.parametrize("name", list(RECIPE_COMMANDS))
@pytest.mark.parametrize("command", ["distill", "compare"])
def test_a_recipe_is_the_command_line_it_stands_for(name, command, resolved):
    assert resolved([command, "--recipe", name]) == resolved([command, *RECIPE_COMMANDS[name]])


def test_no_recipe_is_the_default_recipe_with_each_commands_methods(resolved):
    distill = resolved(["distill"])
    assert distill == resolved(["distill", "--recipe", "default"])
    assert (distill["steps"], distill["batch_size"], distill["lr"], distill["ema"]) == (800, 32, 2e-3, 0.99)
    assert (distill["latent_components"], distill["teacher_steps"], distill["num_targets"]) == (32, 16, 4)
    assert distill["methods"] == ["per-token", "joint"] and distill["teacher_nfe"][-1] == 256
    compare = resolved(["compare"])
    assert compare["methods"] == ["per-token", "joint", "di4c", "dmmd"]
    assert compare["teacher_nfe"] == [1, 2, 4, 8, 64, 256]
    assert {k: v for k, v in compare.items() if k not in ("methods", "teacher_nfe", "out", "command")} == \
        {k: v for k, v in distill.items() if k not in ("methods", "teacher_nfe", "out", "command")}


@pytest.mark.parametrize("command", ["distill", "compare"])
def test_data_with_a_recipe_of_its_own_starts_from_it(command, tmp_path, resolved):
    """``--data text`` alone runs the text recipe's settings (a CPU-sized run); typed options,
    ``--config`` and an explicit ``--recipe`` override them; other data keep ``default``."""
    text = resolved([command, "--data", "text"])
    assert text == resolved([command, "--recipe", "text"])
    assert (text["data"], text["steps"], text["latent_components"], text["teacher_steps"]) == ("text", 300, 4, 8)
    assert (text["num_targets"], text["num_samples"]) == (1, 256)
    assert text["lr"] == 2e-3 and text["batch_size"] == 32  # what the text recipe leaves: the default recipe's
    typed = resolved([command, "--data", "text", "--steps", "5", "--latent-components=2"])
    assert (typed["steps"], typed["latent_components"], typed["teacher_steps"]) == (5, 2, 8)
    chosen = resolved([command, "--data", "text", "--recipe", "default"])
    assert (chosen["data"], chosen["steps"], chosen["latent_components"]) == ("text", 800, 32)
    config = tmp_path / "mine.toml"
    config.write_text("steps = 7\n")
    assert [resolved([command, "--data", "text", "--config", config])[k]
            for k in ("steps", "latent_components")] == [7, 4]
    config.write_text('data = "text"\nnum-samples = 64\n')  # the data named in a config picks its recipe too
    from_config = resolved([command, "--config", config])
    assert (from_config["data"], from_config["steps"], from_config["num_samples"]) == ("text", 300, 64)
    assert resolved([command, "--data", "markov"]) == {**resolved([command]), "data": "markov"}
    assert resolved([command, "--data", "words"])["steps"] == 800


def test_a_data_sets_recipe_applies_to_that_data():
    assert recipes.for_data("text") == "text"
    assert [recipes.for_data(data) for data in ("markov", "words", "digits", None)] == ["default"] * 4
    for name in recipes.names():
        if name in cdm.cli.DATA_SETS:
            assert recipes.read_recipe(name)["applies-to"] == name == recipes.read_recipe(name)["data"]


def test_help_says_which_recipe_a_run_starts_from(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    assert "--data text: text" in " ".join(capsys.readouterr().out.split())


def test_the_command_line_overrides_a_recipe(resolved):
    settings = resolved(["distill", "--recipe", "best-4step-exact", "--steps", "10", "--no-mixture-weights",
                         "--teacher-steps=8"])
    assert (settings["steps"], settings["mixture_weights"], settings["teacher_steps"]) == (10, False, 8)
    assert (settings["joint_target"], settings["latent_components"], settings["rollout"]) == ("exact", 64, 0.5)


def test_a_users_config_file_over_a_recipe_under_the_command_line(tmp_path, resolved):
    config = tmp_path / "mine.toml"
    config.write_text('about = "my run"\nmethods = ["joint"]\nstudent-steps = "1,2"\nlr = 1e-3\nsteps = 7\n'
                      'mixture-weights = true\ndevice = "cpu"\n')
    settings = resolved(["distill", "--recipe", "best-1step", "--config", config, "--steps", "3"])
    assert (settings["methods"], settings["student_steps"], settings["lr"]) == (["joint"], [1, 2], 1e-3)
    assert settings["steps"] == 3 and settings["mixture_weights"] and settings["device"].type == "cpu"
    assert (settings["latent_components"], settings["teacher_steps"]) == (64, 64)  # from the recipe
    config.write_text("mixture-weights = false\n")
    assert not resolved(["distill", "--recipe", "best-4step-exact", "--config", config])["mixture_weights"]
    config.write_text("no-mixture-weights = true\nstudent-steps = [2]\n")
    settings = resolved(["distill", "--recipe", "best-4step-sampled", "--config", config])
    assert not settings["mixture_weights"] and settings["student_steps"] == [2]


def test_recipes_and_config_files_are_refused_by_name(tmp_path, capsys):
    fails(["distill", "--recipe", "fastest"], capsys, "--recipe", "'fastest'", "best-1step", "cdm recipes")
    path = tmp_path / "bad.toml"
    path.write_text("lr = \n")
    fails(["distill", "--config", path], capsys, "--config", str(path), "not valid TOML")
    fails(["distill", "--config", tmp_path / "absent.toml"], capsys, "--config", "absent.toml", "cannot read")
    for text, needles in (('colour = "red"\n', ["unknown option 'colour'", str(path)]),
                          ("latent_components = 8\n", ["unknown option 'latent_components'", "latent-components"]),
                          ("lat = 8\n", ["unknown option 'lat'"]),
                          ("help = true\n", ["unknown option 'help'"]),
                          ("lr = true\n", ["argument --lr", "expected one argument"]),
                          ("lr = -1\n", ["argument --lr", str(path)]),
                          ('joint-target = "x0"\n', ["argument --joint-target", "'x0'"]),
                          ('recipe = "default"\n', ["'recipe' cannot be set"]),
                          ("[training]\nsteps = 3\n", ["'training' cannot be set"])):
        path.write_text(text)
        fails(["distill", "--config", path], capsys, *needles)


@pytest.mark.parametrize("argv, needle", [
    (["--methods", "per-token", "--num-targets", "2"], "--num-targets applies to --methods joint only"),
    (["--methods", "joint", "--dmmd-lr", "1e-3"], "--dmmd-lr applies to --methods dmmd only; this run trains joint"),
    (["--methods", "di4c", "--mixture-weights"], "--mixture-weights applies to --methods joint only"),
    (["--methods", "per-token", "--no-mixture-weights"], "--mixture-weights applies to --methods joint only"),
    (["--methods", "dmmd,di4c", "--grid-weights", "1,1", "--student-steps", "2"], "--grid-weights applies to"),
    (["--methods", "per-token,dmmd", "--latent-components", "8"],
     "--latent-components applies to --methods joint,di4c"),
    (["--methods", "per-token", "--teacher-steps", "8"], "--teacher-steps applies to --methods joint only"),
    (["--methods", "di4c", "--rollout", "0.5"], "--rollout applies to --methods joint only"),
    (["--latent-dim", "3"], "--latent-dim sizes a continuous latent: it needs --latent-components 0"),
    (["--joint-target", "exact", "--num-targets", "2"], "--num-targets: --joint-target exact"),
    (["--methods", "per-token", "--target-coupling", "stratified"], "--target-coupling applies to --methods joint"),
    (["--joint-target", "exact", "--target-coupling", "stratified"], "--target-coupling: --joint-target exact"),
    (["--recipe", "best-4step-exact", "--num-targets", "2"], "--num-targets: --joint-target exact"),
    (["--student-steps", "1", "--rollout", "0.5"], "--rollout runs the student's own k-step sampler"),
])
def test_an_option_the_chosen_methods_do_not_read_is_refused(argv, needle, tmp_path, capsys):
    fails(["distill", *argv, "--out", tmp_path / "out"], capsys, needle)
    assert not (tmp_path / "out").exists()


def test_a_recipes_values_for_other_methods_are_not_refused(tmp_path, resolved):
    """A recipe or --config may hold options of methods the run does not train (one
    file for several commands); only options typed on the command line are checked."""
    settings = resolved(["distill", "--recipe", "best-4step-exact", "--methods", "per-token", "--student-steps", "1"])
    assert settings["methods"] == ["per-token"] and settings["mixture_weights"]
    config = tmp_path / "c.toml"
    config.write_text("dmmd-lr = 1e-3\nnum-targets = 2\n")
    assert resolved(["distill", "--methods", "joint", "--config", config])["dmmd_lr"] == 1e-3


@pytest.mark.parametrize("command", ["distill", "compare"])
def test_help_groups_the_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    groups = ["recipe:", "data and model:", "distillation:", "training:", "experimental:"]
    starts = [text.index(f"\n{group}\n") for group in groups]
    assert starts == sorted(starts)

    def group_of(option):
        at = text.index(f"\n  {option}", starts[0])
        return [g for g, s in zip(groups, starts) if s < at][-1]

    for option, group in (("--recipe", "recipe:"), ("--teacher", "data and model:"),
                          ("--latent-components", "data and model:"), ("--num-targets", "distillation:"),
                          ("--target-coupling", "distillation:"),
                          ("--dmmd-lr", "distillation:"), ("--lr", "training:"), ("--out", "training:"),
                          ("--grid-weights", "experimental:"), ("--extra-blocks", "experimental:"),
                          ("--student-init", "experimental:"), ("--student-output", "experimental:"),
                          ("--latent-dim", "experimental:")):
        assert group_of(option) == group, option


def test_the_default_plot_has_a_log_axis_for_metrics_spanning_orders_of_magnitude(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cdm.experiment import Setup

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))

    def plot(teacher_kls, student_kls):
        rows = [{"model": "teacher", "method": "analytic", "nfe": 2 ** i, "metrics": {"kl": kl}}
                for i, kl in enumerate(teacher_kls)]
        rows += [{"model": "student", "method": "cdm-joint", "nfe": 2 ** i, "metrics": {"kl": kl}}
                 for i, kl in enumerate(student_kls)]
        cdm.cli._plot_metric_vs_nfe(tmp_path / "plot.png", Setup(), rows, {"kl": 0.0})
        assert (tmp_path / "plot.png").stat().st_size > 1000
        return figures[-1].axes[0]

    axis = plot([10.3, 1.25, 0.31], [0.19, 0.15, 0.15])
    assert axis.get_yscale() == "log" and "log" in axis.get_ylabel()
    axis = plot([1.2, 0.9, 0.5], [0.4, 0.3, 0.3])
    assert axis.get_yscale() == "linear"
    assert [line.get_label() for line in axis.get_lines()][-1] == "held-out data"
    assert cdm.cli._spans_orders_of_magnitude([10.0, 0.5, float("nan")])
    assert not cdm.cli._spans_orders_of_magnitude([10.0, 0.0])  # 0 has no place on a log axis
    assert not cdm.cli._spans_orders_of_magnitude([-1.0, -100.0])
