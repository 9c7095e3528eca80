"""The ``cdm`` command: ``pretrain``, ``distill``, ``compare``, ``sample``, ``eval``.

``cdm distill`` with no arguments runs the whole pipeline on the default data
(a seeded Markov chain over 8^4 sequences, so every sampler is evaluated
exactly) with the teacher that ships in the package: the teacher's exact KL at
1..256 steps, per-token and joint CDM students at 1, 2 and 4 steps, one table,
``results.json`` and plots. ``cdm compare`` does the same for every method
(per-token and joint CDM, Di4C, D-MMD) on one teacher and budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .experiment import (
    EXACT_SUPPORT,
    Setup,
    data_reference,
    default_teacher_path,
    ensure_dir,
    enumerable,
    evaluate,
    exact_handover_metrics,
    load_model,
    load_teacher,
    new_model,
    pretrained_setup,
    primary_metric,
    result_row,
    save_model,
)
from .models.pretrained import load_pretrained, save_pretrained
from .losses import ExactTargets, get_loss, make_student
from .models.dit import PRESETS
from .sampling import has_mixture_weights, network_evaluations
from .train import LR_SCHEDULES, PRECISIONS, TrainConfig, Trainer, default_device

#: --methods name -> the loss (cdm.losses.get_loss) and the label of its rows
METHODS = {"per-token": "cdm_per_token", "joint": "cdm_joint", "di4c": "di4c", "dmmd": "dmmd"}
METHOD_LABELS = {"per-token": "cdm-per-token", "joint": "cdm-joint", "di4c": "di4c", "dmmd": "d-mmd"}
MIXTURE_METHODS = ("joint", "di4c")

# Defaults of `cdm distill` / `cdm compare`, chosen by the measurements in README.md
# ("How the defaults were chosen") so that the default run fits 10 minutes on a 2-core CPU.
DEFAULT_COMPONENTS = 32
DEFAULT_TEACHER_STEPS = 16
DEFAULT_TARGETS = 4  # teacher draws per noisy input (joint CDM): 0.383 -> 0.174 at k = 1 for +50% time
DEFAULT_STUDENT_STEPS = 800
DEFAULT_BATCH = 32
DEFAULT_LR = 2e-3


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _weight_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected finite numbers >= 0 with a positive sum, got {text!r}")
    return values


def _method_list(text: str) -> list[str]:
    methods = [m for m in text.split(",") if m]
    if not methods or any(m not in METHODS for m in methods):
        raise argparse.ArgumentTypeError(f"expected comma-separated names among {','.join(METHODS)}, got {text!r}")
    return methods


def _number(kind, low, high=None, low_open=False):
    """An argparse type: ``kind`` (int/float) in ``[low, high)`` (``(low, high)`` if ``low_open``)."""
    span = f"{'(' if low_open else '['}{low}, {'inf' if high is None else high})"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not (value > low if low_open else value >= low) or (high is not None and not value < high):
            raise argparse.ArgumentTypeError(f"expected a value in {span}, got {text!r}")
        return value

    return parse


def _options(pairs: list[str], flag: str) -> dict:
    """``key=value`` pairs; values parsed as JSON when they parse (numbers, bools)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag}: options are key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _train_config(args, steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                       lr_schedule=args.lr_schedule, ema=args.ema, seed=args.seed, progress=not args.quiet,
                       log_every=args.log_every, save_every=args.save_every, fsdp=args.fsdp,
                       precision=args.precision)


def _device(text: str) -> torch.device:
    if text == "auto":
        return default_device()
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this torch sees no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def _add_device_option(parser) -> None:
    parser.add_argument("--device", type=_device, default="auto",
                        help="where to train and sample: auto (this rank's GPU when CUDA is available, else cpu), "
                             "cpu, cuda, cuda:N")


def _add_training_options(parser, steps: int, batch_size: int, lr: float, ema: float) -> None:
    _add_device_option(parser)
    parser.add_argument("--steps", type=_number(int, 1), default=steps, help="training steps (per student for distill)")
    parser.add_argument("--batch-size", type=_number(int, 1), default=batch_size)
    parser.add_argument("--lr", type=_number(float, 0, low_open=True), default=lr)
    parser.add_argument("--warmup", type=_number(int, 0), default=50)
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                        help="after the warmup: constant, or a cosine decay to 0 at the last step")
    parser.add_argument("--ema", type=_number(float, 0, 1), default=ema, help="EMA decay of the weights (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms(True): bit-exact reruns with several CPU threads "
                             "(a threaded torch op in the joint-CDM path otherwise sums in a varying order)")
    parser.add_argument("--log-every", type=_number(int, 1), default=25, help="steps between log.jsonl records")
    parser.add_argument("--save-every", type=_number(int, 1), default=250, help="steps between checkpoints (for --resume)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16",
                        help="the training loss on a GPU: bf16 autocast, or fp32 (no effect on the CPU, which "
                             "computes in fp32; tiny networks are launch-bound and gain nothing from bf16)")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the model with FSDP2 instead of DDP (checkpoints stay full; "
                             "no effect in a single process)")


# ----------------------------------------------------------------------------- pretrain


def pretrain(args) -> None:
    setup = Setup(data=args.data, data_options=_options(args.data_option, "--data-option"), graph=args.graph,
                  noise=args.noise, noise_options=_options(args.noise_option, "--noise-option"))
    for flag, build in (("--data-option", lambda: setup.dataset), ("--noise-option", lambda: setup.schedule)):
        try:
            build()
        except (TypeError, ValueError) as error:  # an unknown key or a bad value
            raise ValueError(f"{flag}: {error}") from None
    torch.manual_seed(args.seed)  # the initial weights: the same seed trains the same model
    model = new_model(setup, args.model)
    out = ensure_dir(args.out)
    loss = get_loss("score_entropy", setup.kernel_graph, setup.schedule)
    metadata = {"name": "pretrain", "setup": setup.to_json(), "model": asdict(model.config)}
    trainer = Trainer(model, loss, setup.dataset.sample, _train_config(args, args.steps), out, metadata,
                      device=args.device)
    if args.resume and trainer.resume() and trainer.rank == 0:
        print(f"resumed at step {trainer.step}")
    teacher = trainer.fit()
    if trainer.rank == 0:
        save_model(out / "teacher.safetensors", teacher, setup, "teacher", train_steps=args.steps)
        metrics, _ = evaluate(teacher, setup, 64, 1024, seed=args.seed)
        print(f"teacher written to {out / 'teacher.safetensors'}; 64-step sampler: {_format(metrics)}")


# ----------------------------------------------------------------------------- distill


def distill(args) -> None:
    """The teacher's metrics at every NFE of ``--teacher-nfe``, then one student per
    method and NFE of ``--student-steps``, all in one table (``cdm compare`` is
    this with every method)."""
    teacher_path = args.teacher or default_teacher_path()
    if teacher_path is None:
        raise SystemExit("error: no --teacher given and no teacher ships with this installation")
    teacher, setup, pretrained = load_teacher(teacher_path, args.device, args.data,
                                              _options(args.data_option, "--data-option"))
    if args.student_output is None:  # a checkpoint's students keep its output, so its own layout holds them
        args.student_output = teacher.config.parameterization if pretrained else "posterior"
    start = teacher
    if args.student_init:
        start, start_setup, _ = load_model(args.student_init, device=args.device)
        if start_setup != setup:
            raise ValueError(f"--student-init {args.student_init} was trained on {start_setup.to_json()}, "
                             f"the teacher on {setup.to_json()}")
    out = ensure_dir(args.out)
    started = time.perf_counter()
    rows = []
    for nfe in args.teacher_nfe:
        metrics, _ = evaluate(teacher, setup, nfe, args.num_samples, seed=args.seed)
        rows.append(result_row("teacher", "analytic", nfe, metrics))
    best_samples = {}
    for method in args.methods:
        for k in args.student_steps:
            clock = time.perf_counter()
            student, loss = _student_and_loss(method, k, teacher, start, setup, args)
            name = f"{method}-k{k}"
            metadata = {"name": name, "setup": setup.to_json(), "model": asdict(student.config), "method": method, "k": k}
            config = _train_config(args, args.steps)
            if method == "dmmd":
                config = dataclasses.replace(config, lr=args.dmmd_lr)
            trainer = Trainer(student, loss, setup.dataset.sample, config, out / name, metadata, device=args.device)
            if args.resume and trainer.resume() and trainer.rank == 0:
                print(f"{name}: resumed at step {trainer.step}")
            student = trainer.fit().eval()
            if trainer.rank != 0:
                continue
            save_model(out / f"student-{name}.safetensors", student, setup, "student", method=method, k=k)
            if pretrained is not None:
                layout = save_pretrained(student, out / f"student-{name}", setup.graph, setup.noise,
                                         setup.noise_options, like=pretrained)
                print(f"{name}: also written in {layout.upper()}'s layout to {out / f'student-{name}'}")
            metrics, samples = evaluate(student, setup, k, args.num_samples, seed=args.seed)
            label = METHOD_LABELS[method] + ("-weighted" if has_mixture_weights(student) else "")
            rows.append(result_row("student", label, network_evaluations(student, k), metrics,
                                   seconds=round(time.perf_counter() - clock, 1)))  # training + evaluation
            best_samples[name] = samples
    if rows and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        reference = data_reference(setup)
        _write_results(out, setup, rows, reference, best_samples)
        print(_table(setup, rows, reference))
        print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s; wrote {out / 'results.json'}, {out / 'metric_vs_nfe.png'}")


def _student_and_loss(method: str, k: int, teacher, start, setup: Setup, args):
    """The student a method trains (from the weights of ``start``: the teacher,
    or ``--student-init``) and its loss function.

    Per-token CDM and D-MMD train factorised students; joint CDM and Di4C train
    mixture students (``--latent-components`` K > 0: a K-component mixture,
    else a continuous latent of ``--latent-dim``)."""
    torch.manual_seed(args.seed)  # new layers (latent table, D-MMD's auxiliary): the same per student and run
    mixture = method in MIXTURE_METHODS
    latent = {}
    if mixture:
        latent = ({"latent_dim": 1, "latent_components": args.latent_components} if args.latent_components
                  else {"latent_dim": args.latent_dim})
        if args.mixture_weights and method == "joint":
            latent["mixture_weights"] = True
        if args.shared_blocks:
            latent["shared_blocks"] = args.shared_blocks
    student = make_student(start, parameterization=args.student_output, graph=setup.graph, size=args.student_size,
                           extra_blocks=args.extra_blocks, **latent)
    options = {"steps": k}
    if args.grid_weights and method in ("per-token", "joint"):
        options["grid_weights"] = args.grid_weights
    if mixture:
        options["num_latents"] = args.num_latents or args.latent_components or 16
    if method == "joint":
        options.update(teacher_steps=args.teacher_steps, target=args.joint_target, num_targets=args.num_targets,
                       rollout=args.rollout, chunk=args.chunk, teacher_batch=args.teacher_batch)
        if args.joint_target == "exact":
            if not enumerable(setup):
                raise ValueError(f"--joint-target exact: the targets' law is enumerated over num_states^L "
                                 f"<= {EXACT_SUPPORT} sequences (the markov data); this data has more")
            options["exact_targets"] = ExactTargets(teacher, setup.kernel_graph, setup.schedule, setup.dataset.seq_len,
                                                    k, args.teacher_steps)
    loss = get_loss(METHODS[method], setup.kernel_graph, setup.schedule, teacher=teacher, **options)
    return student, loss


def _format(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _table(setup: Setup, rows: list[dict], reference: dict) -> str:
    metric, lower_is_better = primary_metric(setup)
    names = list(rows[0]["metrics"])
    header = f"{'model':8} {'method':18} {'NFE':>4}  " + "  ".join(f"{n:>18}" for n in names)
    lines = [f"{setup.data} data, {setup.graph} graph; primary metric: {metric} ({'lower' if lower_is_better else 'higher'} is better)", header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['model']:8} {row['method']:18} {row['nfe']:>4}  " + "  ".join(f"{row['metrics'][n]:>18.4f}" for n in names))
    lines.append(f"{'data':8} {'(held out)':18} {'':>4}  " + "  ".join(f"{reference.get(n, float('nan')):>18.4f}" for n in names))
    return "\n".join(lines)


def _write_results(out: Path, setup: Setup, rows: list[dict], reference: dict, samples: dict) -> None:
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "data_reference.json").write_text(json.dumps(reference, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, _ = primary_metric(setup)
    fig, ax = plt.subplots(figsize=(6, 4))
    teacher = [r for r in rows if r["model"] == "teacher"]
    ax.plot([r["nfe"] for r in teacher], [r["metrics"][metric] for r in teacher], "o-", color="black", label="teacher")
    for method in sorted({r["method"] for r in rows if r["model"] == "student"}):
        points = [r for r in rows if r["method"] == method and r["model"] == "student"]
        ax.plot([r["nfe"] for r in points], [r["metrics"][metric] for r in points], "s--", label=f"student ({method})")
    if metric in reference:
        ax.axhline(reference[metric], color="gray", linestyle=":", label="held-out data")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(metric)
    ax.set_title(f"{setup.data} / {setup.graph}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "metric_vs_nfe.png", dpi=120)
    plt.close(fig)
    if setup.data == "digits" and samples:
        _sample_grid(out / "samples.png", setup, samples)


def _sample_grid(path: Path, setup: Setup, samples: dict) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(samples), 1, figsize=(8, 1.3 * len(samples)), squeeze=False)
    for ax, (name, tokens) in zip(axes[:, 0], samples.items()):
        images = setup.dataset.to_images(tokens[:16]).float()
        ax.imshow(torch.cat(list(images), dim=1), cmap="gray_r")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- sample / eval


def sample_command(args) -> None:
    model, setup, _ = load_model(args.checkpoint, device=args.device)
    metrics, samples = evaluate(model, setup, args.steps, args.num_samples, seed=args.seed, method=args.method)
    if setup.data == "words":
        print("\n".join(setup.dataset.decode(samples)))
    else:
        for row in samples.tolist():
            print(" ".join(map(str, row)))
    if args.out:
        torch.save(samples, args.out)


def eval_command(args) -> None:
    model, setup, _ = load_model(args.checkpoint, device=args.device)
    if args.handover:
        handover(model, setup, args)
        return
    rows = []
    for steps in args.steps:
        metrics, _ = evaluate(model, setup, steps, args.num_samples, seed=args.seed, method=args.method)
        rows.append(result_row("model", args.method, network_evaluations(model, steps), metrics))
    print(_table(setup, rows, data_reference(setup)))


def handover(student, setup: Setup, args) -> None:
    """``cdm eval --handover``: the exact KL of samplers that take the student's step
    on some grid intervals and the teacher's on the others (``exact_handover_metrics``)."""
    teacher_path = args.teacher or default_teacher_path()
    if teacher_path is None:
        raise SystemExit("error: no --teacher given and no teacher ships with this installation")
    if Path(teacher_path).is_dir():
        pretrained = load_pretrained(teacher_path, device=args.device)
        teacher = pretrained.model
        teacher_setup = pretrained_setup(pretrained, setup.data, setup.data_options, f"--teacher {teacher_path}",
                                         graph=setup.graph)
    else:
        teacher, teacher_setup, _ = load_model(teacher_path, device=args.device)
    if teacher_setup != setup:
        raise ValueError(f"--teacher: {teacher_path} was trained on another setup than --checkpoint "
                         f"({teacher_setup.to_json()} against {setup.to_json()})")
    for steps in args.steps:
        results = exact_handover_metrics(student, teacher, setup, steps, args.teacher_steps, method=args.method)
        if results is None:
            raise ValueError("--handover needs data whose state space is enumerable (the markov data, "
                             f"num_states^L <= {EXACT_SUPPORT})")
        width = max(steps, len("sampler"))
        print(f"{steps} grid steps; per step s: the student's step, t: {args.teacher_steps} teacher steps")
        print(f"{'sampler':>{width}}  {'kl':>8}  {'reverse_kl':>10}")
        for pattern, metrics in results.items():
            print(f"{pattern:>{width}}  {metrics['kl']:8.4f}  {metrics['reverse_kl']:10.4f}")


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("pretrain", help="train a teacher with SEDD's score entropy")
    p.add_argument("--data", default="markov", choices=["markov", "digits", "words"])
    p.add_argument("--data-option", action="append", metavar="KEY=VALUE", help="data set option (repeatable)")
    p.add_argument("--graph", default="uniform", choices=["uniform", "absorbing", "ordinal"])
    p.add_argument("--noise", default="geometric", choices=["geometric", "loglinear"])
    p.add_argument("--noise-option", action="append", metavar="KEY=VALUE",
                   help="schedule option, e.g. sigma_max=8 (repeatable)")
    p.add_argument("--model", default="tiny", choices=list(PRESETS), help="DiT preset")
    p.add_argument("--out", default="runs/teacher")
    _add_training_options(p, steps=3000, batch_size=256, lr=2e-3, ema=0.999)
    p.set_defaults(run=pretrain)

    for name, methods, teacher_nfe, help_text in (
        ("distill", "per-token,joint", "1,2,4,8,16,32,64,128,256", "distil a teacher into 1-4 step students (both CDM forms)"),
        ("compare", ",".join(METHODS), "1,2,4,8,64,256", "every method (CDM per-token/joint, Di4C, D-MMD) on one teacher"),
    ):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--teacher", help="teacher model file (default: the one shipped with the package), or a "
                                         "local checkpoint directory in SEDD's, MDLM's or DUO's layout (config.json "
                                         "+ model.safetensors or pytorch_model.bin), which brings its graph, noise "
                                         "schedule and parameterisation; --data then names the data")
        p.add_argument("--data", choices=["markov", "digits", "words"],
                       help="with a checkpoint directory as --teacher: the data (default markov); a model file "
                            "carries its own")
        p.add_argument("--data-option", action="append", metavar="KEY=VALUE",
                       help="with --data: data set option (repeatable)")
        p.add_argument("--methods", default=methods, type=_method_list, help=f"among {','.join(METHODS)}")
        p.add_argument("--student-steps", default=[1, 2, 4], type=_int_list,
                       help="sampler steps of the students (NFE: twice that with --mixture-weights "
                            "and no --shared-blocks)")
        p.add_argument("--teacher-nfe", default=_int_list(teacher_nfe), type=_int_list)
        p.add_argument("--num-samples", type=_number(int, 1), default=1024,
                       help="samples per evaluated sampler (the markov data is also evaluated exactly)")
        p.add_argument("--student-output", choices=["posterior", "score"],
                       help="what the students' last layer outputs (cdm.models.dit); default: posterior, or a "
                            "checkpoint directory's own output")
        p.add_argument("--student-size", choices=sorted(PRESETS),
                       help="the students' network size (default: the teacher's, from its weights); "
                            "another size starts from random weights")
        p.add_argument("--student-init", metavar="MODEL_FILE",
                       help="start the students from this model file (an earlier student, or another teacher of "
                            "the same data) instead of from the teacher; the teacher still makes the targets")
        p.add_argument("--extra-blocks", type=_number(int, 0), default=0,
                       help="students get this many more blocks than the model they start from, appended and "
                            "starting as the identity (adaLN-zero), so they start as that model's function")
        p.add_argument("--latent-components", type=_number(int, 0), default=DEFAULT_COMPONENTS,
                       help="mixture students (joint CDM, Di4C): K components; 0: a continuous latent")
        p.add_argument("--mixture-weights", action="store_true",
                       help="joint CDM: weigh the K components by w(x_t), a head the student learns, instead of equally")
        p.add_argument("--shared-blocks", type=_number(int, 0), default=0,
                       help="mixture students: the leading blocks the latent skips (run once for all latents; "
                            "with --mixture-weights the weights read them, so a step is one pass)")
        p.add_argument("--latent-dim", type=_number(int, 1), default=4, help="size of a continuous latent")
        p.add_argument("--num-latents", type=_number(int, 0), default=0,
                       help="latent draws per example (0: one per component, i.e. the exact mixture; 16 for a continuous latent)")
        p.add_argument("--teacher-steps", type=_number(int, 1), default=DEFAULT_TEACHER_STEPS,
                       help="teacher steps behind each joint-CDM target (from t to 0, or to the next grid time with --joint-target step)")
        p.add_argument("--num-targets", type=_number(int, 1), default=DEFAULT_TARGETS,
                       help="joint CDM: teacher draws per noisy input; they share the student's evaluations")
        p.add_argument("--joint-target", default="clean", choices=["clean", "step", "exact"],
                       help="joint CDM: fit the student's p_0|t to the teacher's x_0 (clean) or its reverse step "
                            "to the teacher's x at the next grid time (step; the same at 1 step); exact: the clean "
                            "target's whole law, enumerated (the markov data; minutes to build, --num-targets unused)")
        p.add_argument("--grid-weights", type=_weight_list, metavar="W1,...,Wk",
                       help="CDM students (one --student-steps k): relative frequencies of the k grid times "
                            "t = 1, 1 - 1/k, ..., 1/k in training (default equal)")
        p.add_argument("--chunk", type=_number(int, 1),
                       help="joint CDM: the student's output layer and the targets' likelihoods this many positions "
                            "at a time (no B*M*L*N tensor is held; memory model in docs/ARCHITECTURE.md)")
        p.add_argument("--teacher-batch", type=_number(int, 1),
                       help="joint CDM: sequences per call of the teacher's chain (default: all B*R at once)")
        p.add_argument("--rollout", type=_number(float, 0, 1), default=0.0,
                       help="joint CDM, k > 1: share of x_t drawn by the student's own sampler instead of by noising data")
        # D-MMD's generator loss is linear in its probabilities: at the shared lr (2e-3) the
        # generator ran to one sequence (exact KL 70) before its auxiliary model could follow;
        # 2e-4 gave 0.43 at NFE 1 (README, "Every method on one teacher")
        p.add_argument("--dmmd-lr", type=_number(float, 0, low_open=True), default=2e-4,
                       help="learning rate of D-MMD's generator (the others use --lr)")
        p.add_argument("--out", default=f"runs/{name}")
        _add_training_options(p, steps=DEFAULT_STUDENT_STEPS, batch_size=DEFAULT_BATCH, lr=DEFAULT_LR, ema=0.99)
        p.set_defaults(run=distill)

    for name, run in (("sample", sample_command), ("eval", eval_command)):
        p = commands.add_parser(name, help=f"{name} a model file's k-step sampler")
        p.add_argument("--checkpoint", required=True, help="a teacher or student model file")
        p.add_argument("--steps", type=_number(int, 1) if name == "sample" else _int_list, default=4 if name == "sample" else [1, 4, 16, 64])
        p.add_argument("--num-samples", type=_number(int, 1), default=16 if name == "sample" else 4096)
        p.add_argument("--method", default="analytic", choices=["analytic", "euler"])
        p.add_argument("--seed", type=int, default=0)
        _add_device_option(p)
        if name == "sample":
            p.add_argument("--out", help="also save the samples (torch.save) here")
        else:
            p.add_argument("--handover", action="store_true",
                           help="a student's file, enumerable data: the exact KL of samplers that take the student's "
                                "step on some grid intervals and --teacher-steps teacher steps on the others "
                                "(which of its steps loses)")
            p.add_argument("--teacher", help="with --handover: the teacher (default: the one shipped with the package)")
            p.add_argument("--teacher-steps", type=_number(int, 1), default=16,
                           help="with --handover: teacher steps per grid interval of the student")
        p.set_defaults(run=run)
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "mixture_weights", False) and not args.latent_components:
        parser.error("--mixture-weights needs --latent-components K > 0 (weights over a finite set of components)")
    if getattr(args, "grid_weights", None) and args.student_steps != [len(args.grid_weights)]:
        parser.error(f"--grid-weights gives {len(args.grid_weights)} grid times: it needs --student-steps "
                     f"{len(args.grid_weights)} (one student), got --student-steps "
                     f"{','.join(map(str, args.student_steps))}")
    if getattr(args, "handover", None) is False and args.teacher:
        parser.error("--teacher: cdm eval reads a teacher only with --handover")
    previous = torch.are_deterministic_algorithms_enabled()  # process-wide: restored below
    try:
        if getattr(args, "deterministic", False):
            torch.use_deterministic_algorithms(True)
        args.run(args)
    except (ValueError, OSError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        torch.use_deterministic_algorithms(previous)


if __name__ == "__main__":
    main()
