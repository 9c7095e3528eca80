"""The ``cdm`` command: ``pretrain``, ``distill``, ``compare``, ``recipes``, ``sample``, ``eval``.

``cdm distill`` with no arguments runs the whole pipeline on the default data
(a seeded Markov chain over 8^4 sequences, so every sampler is evaluated
exactly) with the teacher that ships in the package: the teacher's exact KL at
1..256 steps, per-token and joint CDM students at 1, 2 and 4 steps, one table,
``results.json`` and plots. ``cdm compare`` does the same for every method
(per-token and joint CDM, Di4C, D-MMD) on one teacher and budget. Both take
``--recipe NAME`` (``cdm recipes`` lists the shipped ones, in cdm/recipes/) or
``--config FILE.toml``; options typed on the command line override them.
Without ``--recipe`` a data set's own recipe, where one ships, gives the
defaults: ``cdm distill --data text`` runs the recipe ``text``.
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

from . import recipes
from .experiment import (
    Setup,
    data_reference,
    DEFAULT_TEACHERS,
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
from .data import DATA_SETS
from .losses import ExactTargets, get_loss
from .metrics_text import EVALUATOR_STEPS
from .models.dit import PRESETS
from .models.pretrained import load_pretrained, save_pretrained
from .models.student import make_student
from .sampling import EXACT_SUPPORT, has_mixture_weights, network_evaluations
from .train import LR_SCHEDULES, PRECISIONS, TrainConfig, Trainer, default_device

#: --methods name -> the loss (cdm.losses.get_loss) and the label of its rows
METHODS = {"per-token": "cdm_per_token", "joint": "cdm_joint", "di4c": "di4c", "dmmd": "dmmd"}
METHOD_LABELS = {"per-token": "cdm-per-token", "joint": "cdm-joint", "di4c": "di4c", "dmmd": "d-mmd"}
MIXTURE_METHODS = ("joint", "di4c")
_UNSET = object()  # the default of every option in _options_parser: tells what a command line sets
#: metrics plotted beside the primary one: text's gen_ppl drops when a sampler loses diversity
SIDE_METRICS = {"text": ["entropy"]}

#: the teacher's NFEs each command evaluates (the rest of their defaults: the recipe `default`)
TEACHER_NFE = {"distill": [1, 2, 4, 8, 16, 32, 64, 128, 256], "compare": [1, 2, 4, 8, 64, 256]}
#: distill/compare options that only some methods read -> those methods; typing one for a run of
#: none of them is an error (a recipe's or --config's values for other methods are not: they go unread)
METHOD_OPTIONS = {
    "--latent-components": MIXTURE_METHODS, "--latent-dim": MIXTURE_METHODS, "--num-latents": MIXTURE_METHODS,
    "--shared-blocks": MIXTURE_METHODS, "--mixture-weights": ("joint",), "--teacher-steps": ("joint",),
    "--num-targets": ("joint",), "--joint-target": ("joint",), "--rollout": ("joint",),
    "--grid-weights": ("per-token", "joint"), "--dmmd-lr": ("dmmd",), "--chunk": ("joint",),
    "--teacher-batch": ("joint",), "--target-coupling": ("joint",),
}


class _Append(argparse.Action):
    """``action="append"`` that starts a list over any default that is not one (the
    ``_UNSET`` of ``_options_parser``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, (items if isinstance(items, list) else []) + [values])


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


def _add_training_options(group) -> None:
    """The options of every training command; each command sets its own ``steps``,
    ``batch_size``, ``lr`` and ``ema`` defaults (distill's: the recipe ``default``)."""
    _add_device_option(group)
    group.add_argument("--steps", type=_number(int, 1), help="training steps (per student for distill)")
    group.add_argument("--batch-size", type=_number(int, 1))
    group.add_argument("--lr", type=_number(float, 0, low_open=True))
    group.add_argument("--warmup", type=_number(int, 0), default=50)
    group.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                       help="after the warmup: constant, or a cosine decay to 0 at the last step")
    group.add_argument("--ema", type=_number(float, 0, 1), help="EMA decay of the weights (0: off)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--deterministic", action="store_true",
                       help="torch.use_deterministic_algorithms(True): bit-exact reruns with several CPU threads "
                            "(a threaded torch op in the joint-CDM path otherwise sums in a varying order)")
    group.add_argument("--log-every", type=_number(int, 1), default=25, help="steps between log.jsonl records")
    group.add_argument("--save-every", type=_number(int, 1), default=250, help="steps between checkpoints (for --resume)")
    group.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    group.add_argument("--precision", choices=PRECISIONS, default="bf16",
                       help="the training loss on a GPU: bf16 autocast, or fp32 (no effect on the CPU, which "
                            "computes in fp32; tiny networks are launch-bound and gain nothing from bf16)")
    group.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard the model with FSDP2 instead of DDP (checkpoints stay full; "
                            "no effect in a single process)")


def _add_evaluation_options(parser) -> None:
    parser.add_argument("--eval-model", metavar="DIR",
                        help="text: score gen_ppl with this local Hugging Face causal LM (transformers; never "
                             "downloaded) instead of the corpus's own evaluator")
    parser.add_argument("--evaluator-steps", type=_number(int, 1), default=EVALUATOR_STEPS,
                        help="text without --eval-model: training steps of the corpus's own evaluator "
                             "(trained once, then cached by corpus and steps)")


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
    output = {"parameterization": "posterior", "graph": setup.graph} if args.parameterization == "posterior" else {}
    model = new_model(setup, args.model, **output)
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
        _prepare_evaluation(setup, args)
        metrics, _ = evaluate(teacher, setup, 64, 1024, seed=args.seed)
        metrics.update(_text_reference(teacher, setup))
        print(f"teacher written to {out / 'teacher.safetensors'}; 64-step sampler: {_format(metrics)}")


# ----------------------------------------------------------------------------- distill


def distill(args) -> None:
    """The teacher's metrics at every NFE of ``--teacher-nfe``, then one student per
    method and NFE of ``--student-steps``, all in one table (``cdm compare`` is
    this with every method)."""
    teacher, setup, pretrained = _load_teacher(args)
    _prepare_evaluation(setup, args)
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
        clock = time.perf_counter()
        metrics, _ = evaluate(teacher, setup, nfe, args.num_samples, seed=args.seed)
        rows.append(result_row("teacher", "analytic", nfe, metrics, seconds=round(time.perf_counter() - clock, 1)))
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
        reference = {**data_reference(setup), **_text_reference(teacher, setup)}
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
                       rollout=args.rollout, chunk=args.chunk, teacher_batch=args.teacher_batch,
                       coupling=args.target_coupling)
        if args.joint_target == "exact":
            if not enumerable(setup):
                raise ValueError(f"--joint-target exact: the targets' law is enumerated over num_states^L "
                                 f"<= {EXACT_SUPPORT} sequences (the markov data); this data has more")
            options["exact_targets"] = ExactTargets(teacher, setup.kernel_graph, setup.schedule, setup.dataset.seq_len,
                                                    k, args.teacher_steps)
    loss = get_loss(METHODS[method], setup.kernel_graph, setup.schedule, teacher=teacher, **options)
    return student, loss


def _load_teacher(args):
    """``(teacher, setup, pretrained)`` of ``--teacher`` (a model file, or a checkpoint
    directory run on ``--data`` with ``--data-option``: ``pretrained``, else None), or of
    the teacher that ships for ``--data``."""
    data = args.data or "markov"
    teacher_path = args.teacher or default_teacher_path(data)
    if teacher_path is None:
        raise SystemExit(f"error: no --teacher given and no teacher ships for --data {data} "
                         f"(train one with cdm pretrain --data {data})")
    return load_teacher(teacher_path, args.device, args.data, _options(args.data_option, "--data-option"))


def _check_data(args, setup: Setup, path) -> None:
    if args.data is not None and args.data != setup.data:
        raise ValueError(f"--data {args.data}: {path} was trained on --data {setup.data}")


def _prepare_evaluation(setup: Setup, args) -> None:
    """Text: choose the evaluator of gen_ppl (``--eval-model``, or the corpus's own, trained once)."""
    if setup.data != "text":
        if args.eval_model:
            raise ValueError(f"--eval-model: only text samples are scored by a causal LM, this is {setup.data} data")
        return
    from .metrics_text import HuggingFaceEvaluator, load_text_evaluator

    setup.evaluator = (HuggingFaceEvaluator(args.eval_model) if args.eval_model
                       else load_text_evaluator(setup.dataset, steps=args.evaluator_steps))
    known = setup.evaluator.validation_ppl
    print(f"gen_ppl evaluator: {setup.evaluator.name}"
          + (f" (its validation perplexity: {known:.3f})" if known is not None else ""))


def _text_reference(teacher, setup: Setup) -> dict[str, float]:
    """Text: the teacher's validation NLL bound (nats per token), next to the held-out data's metrics."""
    if setup.data != "text":
        return {}
    from .metrics_text import validation_nll_bound

    return {"teacher_nll_bound": validation_nll_bound(teacher, setup.kernel_graph, setup.schedule, setup.dataset)}


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
    others = {k: v for k, v in reference.items() if k not in names}
    if others:
        lines.append(f"also: {_format(others)}")
    return "\n".join(lines)


def _write_results(out: Path, setup: Setup, rows: list[dict], reference: dict, samples: dict) -> None:
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "data_reference.json").write_text(json.dumps(reference, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    _plot_metric_vs_nfe(out / "metric_vs_nfe.png", setup, rows, reference)
    if setup.data == "digits" and samples:
        _sample_grid(out / "samples.png", setup, samples)


def _spans_orders_of_magnitude(values: list[float]) -> bool:
    """Whether a plot of ``values`` reads better on a log axis: all positive, spanning more than 10x."""
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) > 10 * min(finite)


def _plot_metric_vs_nfe(path: Path, setup: Setup, rows: list[dict], reference: dict) -> None:
    """The primary metric of every row against its NFE; a log y axis when the values
    span orders of magnitude (a 1-step teacher far from the data, many-step samplers close to it)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import StrMethodFormatter

    metrics = [primary_metric(setup)[0]] + SIDE_METRICS.get(setup.data, [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    teacher = [r for r in rows if r["model"] == "teacher"]
    for ax, metric in zip(axes[0], metrics):
        ax.plot([r["nfe"] for r in teacher], [r["metrics"][metric] for r in teacher], "o-", color="black",
                label="teacher")
        for method in sorted({r["method"] for r in rows if r["model"] == "student"}):
            points = [r for r in rows if r["method"] == method and r["model"] == "student"]
            ax.plot([r["nfe"] for r in points], [r["metrics"][metric] for r in points], "s--",
                    label=f"student ({method})")
        log_axis = _spans_orders_of_magnitude([r["metrics"][metric] for r in rows])
        if log_axis:
            ax.set_yscale("log")
            ax.grid(True, which="both", axis="y", alpha=0.3)
        if metric in reference and (reference[metric] > 0 or not log_axis):  # 0 (an exact KL) has no place on a log axis
            ax.axhline(reference[metric], color="gray", linestyle=":", label="held-out data")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))  # 1, 2, 4, ... rather than 2^0, 2^1, 2^2
        ax.set_xlabel("NFE (network evaluations per sample)")
        ax.set_ylabel(metric + (" (log scale)" if log_axis else ""))
        ax.set_title(f"{setup.data} / {setup.graph}: {metric}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    _check_data(args, setup, args.checkpoint)
    _prepare_evaluation(setup, args)
    metrics, samples = evaluate(model, setup, args.steps, args.num_samples, seed=args.seed, method=args.method)
    if setup.data == "words":
        print("\n".join(setup.dataset.decode(samples)))
    elif setup.data == "text":  # one sample a line: line breaks, control characters and backslashes escaped
        print("\n".join(map(_escaped, setup.dataset.decode(samples))))
    else:
        for row in samples.tolist():
            print(" ".join(map(str, row)))
    if args.out:
        torch.save(samples, args.out)


def _escaped(text: str) -> str:
    """``text`` on one printable line: backslashes and unprintable characters as Python escapes."""
    return "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in text)


def eval_command(args) -> None:
    model, setup, _ = load_model(args.checkpoint, device=args.device)
    _check_data(args, setup, args.checkpoint)
    _prepare_evaluation(setup, args)
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
    teacher_path = args.teacher or default_teacher_path(setup.data)
    if teacher_path is None:
        raise SystemExit(f"error: no --teacher given and no teacher ships for {setup.data} data")
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


# ----------------------------------------------------------------------------- recipes


def recipes_command(args) -> None:
    for name in recipes.names():
        print(recipes.summary(name))


def _options_parser(command: str, **kwargs) -> argparse.ArgumentParser:
    """A parser of ``command``'s options alone whose defaults are all ``_UNSET``, so
    that a parse shows what its arguments set."""
    parser = argparse.ArgumentParser(prog=f"cdm {command}", add_help=False, **kwargs)
    COMMAND_OPTIONS[command](parser)
    parser.set_defaults(**{name: _UNSET for name in vars(parser.parse_args([]))})
    return parser


def _set_by(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[dict, list[str]]:
    """The ``args`` attributes that ``argv`` sets (by an ``_options_parser``), and what it could not read."""
    namespace, unknown = parser.parse_known_args(argv)
    return {name: value for name, value in vars(namespace).items() if value is not _UNSET}, unknown


def _recipe_settings(command: str, table: dict, source: str) -> dict:
    """The option values (by ``args`` attribute) that a recipe or config table sets
    for ``command``, parsed and checked by that command's own option types."""
    parser = _options_parser(command, allow_abbrev=False, exit_on_error=False)
    settings = {}
    for key, value in recipes.options_of(table).items():
        if key in ("recipe", "config") or isinstance(value, dict):
            raise ValueError(f"{source}: {key!r} cannot be set in a recipe")
        if isinstance(value, list):
            value = ",".join(map(str, value))
        try:
            values, unknown = _set_by(parser, [f"--{key}" if isinstance(value, bool) else f"--{key}={value}"])
        except argparse.ArgumentError as error:
            raise ValueError(f"{source}: {error}") from None
        if unknown or not values:
            raise ValueError(f"{source}: unknown option {key!r} for cdm {command} (keys are the command's options "
                             f"without their dashes, e.g. latent-components = 64; `cdm {command} --help` lists them)")
        settings.update({name: not flag if value is False else flag for name, flag in values.items()})
    return settings


def _apply_recipe(args, argv: list[str]) -> set[str]:
    """Sets what the recipe and then ``--config`` give on ``args``, except the options
    typed on the command line, which win; returns those typed options.

    The recipe is ``--recipe``, or else the one for the run's data (``recipes.for_data``
    of ``--data`` as typed or as ``--config`` sets it): ``--data text`` alone runs the
    text recipe's settings."""
    typed = set(_set_by(_options_parser(args.command), argv)[0])
    config = (_recipe_settings(args.command, recipes.read_file(args.config), f"--config {args.config}")
              if args.config else {})
    data = args.data if "data" in typed else config.get("data")
    name = args.recipe or recipes.for_data(data)
    source = f"--recipe {name}" if args.recipe else f"the recipe {name} (the default of --data {data})"
    args.recipe = name
    for settings in (_recipe_settings(args.command, recipes.read_recipe(name), source), config):
        for option, value in settings.items():
            if option not in typed:
                setattr(args, option, value)
    return typed


def _check_distill_options(args, typed: set[str]) -> None:
    """Refuses an option typed for a run that would not read it, and contradictory settings."""
    for option, users in METHOD_OPTIONS.items():
        if option[2:].replace("-", "_") in typed and not set(users) & set(args.methods):
            raise ValueError(f"{option} applies to --methods {','.join(users)} only; "
                             f"this run trains {','.join(args.methods)}")
    if "latent_dim" in typed and args.latent_components:
        raise ValueError("--latent-dim sizes a continuous latent: it needs --latent-components 0")
    for option in ("num_targets", "target_coupling"):  # options of drawn targets
        if option in typed and args.joint_target == "exact":
            raise ValueError(f"--{option.replace('_', '-')}: --joint-target exact fits the targets' whole law, "
                             f"not draws from it")
    if "rollout" in typed and max(args.student_steps) == 1:
        raise ValueError("--rollout runs the student's own k-step sampler: it needs --student-steps k > 1")
    if args.mixture_weights and not args.latent_components:
        raise ValueError("--mixture-weights needs --latent-components K > 0 (weights over a finite set of components)")
    if args.grid_weights and args.student_steps != [len(args.grid_weights)]:
        raise ValueError(f"--grid-weights gives {len(args.grid_weights)} grid times: it needs --student-steps "
                         f"{len(args.grid_weights)} (one student), got --student-steps "
                         f"{','.join(map(str, args.student_steps))}")


# ----------------------------------------------------------------------------- parser


def _add_recipe_options(group) -> None:
    group.add_argument("--recipe", metavar="NAME",
                       help="start from a shipped recipe's settings (`cdm recipes` lists them); default: the recipe "
                            "named for --data where one ships (--data text: text, sized for a CPU), else default")
    group.add_argument("--config", metavar="FILE.toml",
                       help="start from your own settings: options without their dashes as TOML keys "
                            "(lr = 1e-3); over --recipe's, under the command line's")


def _add_pretrain_data_options(group) -> None:
    """The data and the model a teacher is trained on (a new data set: DATA_SETS)."""
    group.add_argument("--data", default="markov", choices=DATA_SETS)
    group.add_argument("--data-option", action="append", metavar="KEY=VALUE", help="data set option (repeatable)")
    group.add_argument("--graph", default="uniform", choices=["uniform", "absorbing", "ordinal"])
    group.add_argument("--noise", default="geometric", choices=["geometric", "loglinear"])
    group.add_argument("--noise-option", action="append", metavar="KEY=VALUE",
                       help="schedule option, e.g. sigma_max=8 (repeatable)")
    group.add_argument("--model", default="tiny", choices=list(PRESETS), help="DiT preset")
    group.add_argument("--parameterization", default="score", choices=["score", "posterior"],
                       help="what the network's last layer outputs: log-scores (SEDD) or the logits of p_0|t (MDLM); "
                            "posterior students then start as an exact copy of a posterior teacher")


def _add_pretrain_options(parser) -> None:
    _add_pretrain_data_options(parser.add_argument_group("data and model"))
    training = parser.add_argument_group("training")
    training.add_argument("--out", default="runs/teacher")
    _add_training_options(training)
    _add_evaluation_options(parser.add_argument_group("evaluation"))


def _add_student_model_options(group) -> None:
    """The teacher (which fixes the data) and the students' networks."""
    group.add_argument("--teacher", help="teacher model file (default: the one shipped for --data), or a local "
                                         "checkpoint directory in SEDD's, MDLM's or DUO's layout (config.json + "
                                         "model.safetensors or pytorch_model.bin), which brings its graph, noise "
                                         "schedule and parameterisation; --data then names the data")
    group.add_argument("--data", choices=DATA_SETS,
                       help="without --teacher: distil the teacher shipped for this data (default markov; one ships "
                            f"for {', '.join(sorted(DEFAULT_TEACHERS))}); with a model file: checked against the "
                            "teacher's; with a checkpoint directory: the data it runs on (default markov)")
    group.add_argument("--data-option", action=_Append, metavar="KEY=VALUE",
                       help="with a checkpoint directory as --teacher: data set option (repeatable)")
    group.add_argument("--student-size", choices=sorted(PRESETS),
                       help="the students' network size (default: the teacher's, from its weights); "
                            "another size starts from random weights")
    group.add_argument("--latent-components", type=_number(int, 0),
                       help="mixture students (joint CDM, Di4C): K components; 0: a continuous latent")
    group.add_argument("--mixture-weights", action=argparse.BooleanOptionalAction, default=False,
                       help="joint CDM: weigh the K components by w(x_t), a head the student learns, "
                            "instead of equally")
    group.add_argument("--shared-blocks", type=_number(int, 0), default=0,
                       help="mixture students: the leading blocks the latent skips (run once for all latents; "
                            "with --mixture-weights the weights read them, so a step is one pass)")


def _add_distillation_options(group) -> None:
    group.add_argument("--methods", type=_method_list, help=f"among {','.join(METHODS)}")
    group.add_argument("--student-steps", default=[1, 2, 4], type=_int_list,
                       help="sampler steps of the students (NFE: twice that with --mixture-weights "
                            "and no --shared-blocks)")
    group.add_argument("--teacher-nfe", type=_int_list, help="the teacher's samplers evaluated for the table")
    group.add_argument("--num-samples", type=_number(int, 1), default=1024,
                       help="samples per evaluated sampler (the markov data is also evaluated exactly)")
    group.add_argument("--num-latents", type=_number(int, 0), default=0,
                       help="mixture students: latent draws per example (0: one per component, i.e. the exact "
                            "mixture; 16 for a continuous latent)")
    group.add_argument("--teacher-steps", type=_number(int, 1),
                       help="joint CDM: teacher steps behind each target (from t to 0, or to the next grid time "
                            "with --joint-target step)")
    group.add_argument("--num-targets", type=_number(int, 1),
                       help="joint CDM: teacher draws per noisy input; they share the student's evaluations")
    group.add_argument("--target-coupling", default="independent", choices=["independent", "stratified"],
                       help="joint CDM: the noisy input's --num-targets teacher chains drawn independently, or "
                            "coupled by Latin-hypercube uniforms (each still exact; an even spread, lower variance)")
    group.add_argument("--joint-target", default="clean", choices=["clean", "step", "exact"],
                       help="joint CDM: fit the student's p_0|t to the teacher's x_0 (clean) or its reverse step "
                            "to the teacher's x at the next grid time (step; the same at 1 step); exact: the clean "
                            "target's whole law, enumerated (the markov data only; minutes to build)")
    group.add_argument("--chunk", type=_number(int, 1),
                       help="joint CDM: the student's output layer and the targets' likelihoods this many positions "
                            "at a time (no B*M*L*N tensor is held; memory model in docs/ARCHITECTURE.md)")
    group.add_argument("--teacher-batch", type=_number(int, 1),
                       help="joint CDM: sequences per call of the teacher's chain (default: all B*R at once)")
    group.add_argument("--rollout", type=_number(float, 0, 1), default=0.0,
                       help="joint CDM, k > 1: share of x_t drawn by the student's own sampler instead of by "
                            "noising data")
    # D-MMD's generator loss is linear in its probabilities: at the shared lr it runs to one
    # sequence before its auxiliary model can follow (docs/RESULTS.md, "Every method on one teacher")
    group.add_argument("--dmmd-lr", type=_number(float, 0, low_open=True), default=2e-4,
                       help="D-MMD: learning rate of its generator (the others use --lr)")


def _add_experimental_options(group) -> None:
    """Options kept for experiments that measured no gain (docs/RESULTS.md)."""
    group.add_argument("--student-output", choices=["posterior", "score"],
                       help="what the students' last layer outputs (cdm.models.dit); default: posterior, or a "
                            "checkpoint directory's own output")
    group.add_argument("--latent-dim", type=_number(int, 1), default=4,
                       help="mixture students with --latent-components 0: size of the continuous latent")
    group.add_argument("--student-init", metavar="MODEL_FILE",
                       help="start the students from this model file (an earlier student, or another teacher of "
                            "the same data) instead of from the teacher; the teacher still makes the targets")
    group.add_argument("--extra-blocks", type=_number(int, 0), default=0,
                       help="students get this many more blocks than the model they start from, appended and "
                            "starting as the identity (adaLN-zero), so they start as that model's function")
    group.add_argument("--grid-weights", type=_weight_list, metavar="W1,...,Wk",
                       help="CDM students (one --student-steps k): relative frequencies of the k grid times "
                            "t = 1, 1 - 1/k, ..., 1/k in training (default equal)")


def _add_distill_options(parser) -> None:
    _add_recipe_options(parser.add_argument_group("recipe"))
    _add_student_model_options(parser.add_argument_group("data and model"))
    _add_distillation_options(parser.add_argument_group("distillation"))
    training = parser.add_argument_group("training")
    training.add_argument("--out")
    _add_training_options(training)
    _add_evaluation_options(parser.add_argument_group("evaluation"))
    _add_experimental_options(parser.add_argument_group("experimental", _add_experimental_options.__doc__))


#: the commands whose options a recipe or --config may set -> the function that adds those options
COMMAND_OPTIONS = {"distill": _add_distill_options, "compare": _add_distill_options}


def _add_distill_command(commands, name: str, methods: list[str], help_text: str) -> None:
    p = commands.add_parser(name, help=help_text, description=help_text + "; options given on the command "
                            "line override a --recipe's or --config's")
    _add_distill_options(p)
    p.set_defaults(**_recipe_settings(name, recipes.read_recipe("default"), "--recipe default"))
    p.set_defaults(methods=methods, teacher_nfe=TEACHER_NFE[name], out=f"runs/{name}", run=distill)


def _add_model_file_command(commands, name: str, run) -> None:
    p = commands.add_parser(name, help=f"{name} a model file's k-step sampler")
    p.add_argument("--checkpoint", required=True, help="a teacher or student model file")
    p.add_argument("--steps", type=_number(int, 1) if name == "sample" else _int_list,
                   default=4 if name == "sample" else [1, 4, 16, 64])
    p.add_argument("--num-samples", type=_number(int, 1), default=16 if name == "sample" else 4096)
    p.add_argument("--method", default="analytic", choices=["analytic", "euler"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=DATA_SETS, help="checked against the data the model file was trained on")
    _add_device_option(p)
    _add_evaluation_options(p)
    if name == "sample":
        p.add_argument("--out", help="also save the samples (torch.save) here")
    else:
        p.add_argument("--handover", action="store_true",
                       help="a student's file, enumerable data: the exact KL of samplers that take the student's "
                            "step on some grid intervals and --teacher-steps teacher steps on the others "
                            "(which of its steps loses)")
        p.add_argument("--teacher", help="with --handover: the teacher, a model file or a checkpoint directory "
                                         "(default: the one shipped for the student's data)")
        p.add_argument("--teacher-steps", type=_number(int, 1), default=16,
                       help="with --handover: teacher steps per grid interval of the student")
    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pretrain", help="train a teacher with SEDD's score entropy")
    _add_pretrain_options(p)
    p.set_defaults(steps=3000, batch_size=256, lr=2e-3, ema=0.999, run=pretrain)
    _add_distill_command(commands, "distill", ["per-token", "joint"],
                         "distil a teacher into 1-4 step students (both CDM forms)")
    _add_distill_command(commands, "compare", list(METHODS),
                         "every method (CDM per-token/joint, Di4C, D-MMD) on one teacher")
    commands.add_parser("recipes", help="list the shipped recipes (cdm distill --recipe NAME)").set_defaults(
        run=recipes_command)
    _add_model_file_command(commands, "sample", sample_command)
    _add_model_file_command(commands, "eval", eval_command)
    return parser


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handover", None) is False and args.teacher:
        parser.error("--teacher: cdm eval reads a teacher only with --handover")
    if args.command in COMMAND_OPTIONS:
        try:
            _check_distill_options(args, _apply_recipe(args, argv[argv.index(args.command) + 1:]))
        except ValueError as error:
            parser.error(str(error))
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
