"""What a run is made of (data, graph, noise schedule, network), how a trained
network is stored with it, and how samplers are evaluated: the glue between
the CLI and the library pieces.

A model file (``*.safetensors``) holds the network's weights and, as metadata,
everything needed to rebuild the run around it: ``{"kind", "setup", "model",
...}``. ``load_model`` checks that the file matches what it claims.

A teacher may also be a checkpoint directory in SEDD's, MDLM's or DUO's layout
(``cdm.models.pretrained``): it brings the graph, schedule, vocabulary and
length, the run brings the data, and ``load_teacher`` checks that they fit.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

import cdm_kernels as ck

from .checkpoint import check_metadata, load_checkpoint, save_checkpoint, shape_mismatches
from .data import get_dataset
from .models.dit import DiT, DiTConfig, graph_by_name
from .models.pretrained import Pretrained, load_pretrained
from .models.student import model_device
from .sampling import (EXACT_SUPPORT, exact_sample_distribution, latent_quadrature, sample, tau_of_time,
                       time_grid)
from .schedules import get_noise

GRAPHS = ("uniform", "absorbing", "ordinal")
ASSETS = Path(__file__).parent / "assets"
#: the teacher that ships for each data set's default options (``cdm distill --data NAME``)
DEFAULT_TEACHERS = {"markov": ASSETS / "teacher-markov.safetensors", "text": ASSETS / "teacher-text.safetensors"}


@dataclass
class Setup:
    """The data, forward process and schedule of a run (JSON-serialisable)."""

    data: str = "markov"
    data_options: dict = field(default_factory=dict)
    graph: str = "uniform"
    noise: str = "geometric"
    noise_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {self.graph!r}")

    @property
    def dataset(self):
        if not hasattr(self, "_dataset"):
            self._dataset = get_dataset(self.data, **self.data_options)
        return self._dataset

    @property
    def evaluator(self):
        """What scores text samples' gen_ppl (``cdm.metrics_text``): by default the corpus's own causal
        LM, trained once and cached; set it to a ``HuggingFaceEvaluator`` for ``--eval-model``."""
        if not hasattr(self, "_evaluator"):
            from .metrics_text import load_text_evaluator

            self._evaluator = load_text_evaluator(self.dataset)
        return self._evaluator

    @evaluator.setter
    def evaluator(self, value) -> None:
        self._evaluator = value

    @property
    def kernel_graph(self) -> ck.Graph:
        vocab = self.dataset.vocab_size
        return graph_by_name(self.graph, vocab + 1 if self.graph == "absorbing" else vocab)  # the mask: an extra state

    @property
    def schedule(self):
        return get_noise(self.noise, **self.noise_options)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items()}


def new_model(setup: Setup, preset: str = "tiny", **overrides) -> DiT:
    config = DiTConfig.preset(preset, setup.kernel_graph.num_states, setup.dataset.seq_len, **overrides)
    return DiT(config)


def save_model(path, model: DiT, setup: Setup, kind: str, **extra) -> None:
    """Weights plus the metadata :func:`load_model` needs to rebuild everything."""
    metadata = {"kind": kind, "setup": setup.to_json(), "model": asdict(model.config), **extra}
    save_checkpoint(path, dict(model.state_dict()), metadata)


def load_model(path, device="cpu") -> tuple[DiT, Setup, dict]:
    """``(model, setup, metadata)`` from a model file written by :func:`save_model`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    tensors, metadata = load_checkpoint(path, device=device)
    for key in ("kind", "setup", "model"):
        if key not in metadata:
            raise ValueError(f"{path} is not a cdm model file (its metadata lacks {key!r})")
    try:
        setup = Setup(**metadata["setup"])
        config = DiTConfig(**metadata["model"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: invalid settings in its metadata: {error}") from None
    check_metadata({"vocab_size": config.vocab_size, "seq_len": config.seq_len},
                   {"vocab_size": setup.kernel_graph.num_states, "seq_len": setup.dataset.seq_len},
                   what=f"model file {path}")
    model = DiT(config)
    wrong = shape_mismatches(tensors, model.state_dict())
    if wrong:
        raise ValueError(f"{path}: weights do not match the stored config: shapes differ for {wrong} (file -> config)")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the stored config (missing {missing}, unexpected {unexpected})")
    return model.to(device).eval(), setup, metadata


def load_teacher(path, device="cpu", data: Optional[str] = None, data_options: Optional[dict] = None
                 ) -> tuple[DiT, Setup, Optional[Pretrained]]:
    """``(model, setup, pretrained)`` of a teacher: a cdm model file (``pretrained`` None; it
    carries its own data, so ``data`` and ``data_options``, where given, must be its own) or a
    checkpoint directory in SEDD's, MDLM's or DUO's layout on ``data`` (default "markov")
    with ``data_options``.

    Raises ValueError naming both sides when the checkpoint's vocabulary, length or
    graph does not fit the data (:func:`pretrained_setup`).
    """
    path = Path(path)
    if not path.is_dir():
        model, setup, _ = load_model(path, device=device)
        if (data is not None and data != setup.data) or (data_options and data_options != setup.data_options):
            options = "".join(f" --data-option {key}={value}" for key, value in setup.data_options.items())
            raise ValueError(f"--data: the model file {path} was trained on --data {setup.data}{options}, which it "
                             "carries; other data (--data, --data-option) goes with a checkpoint directory")
        return model, setup, None
    pretrained = load_pretrained(path, device=device)
    setup = pretrained_setup(pretrained, data or "markov", data_options or {}, f"--teacher {path}")
    return pretrained.model, setup, pretrained


def pretrained_setup(pretrained: Pretrained, data: str, data_options: dict, source: str = "the checkpoint",
                     graph: Optional[str] = None) -> Setup:
    """The run of ``pretrained`` on ``data``: its graph and schedule, the data's tokens.

    graph: the graph the run must have (e.g. a student's), if any.
    Raises ValueError naming both sides for a graph other than ``graph``, a
    vocabulary that is not the data's (plus the mask, absorbing graph) or a length
    other than the data's.
    """
    if graph is not None and graph != pretrained.graph:
        raise ValueError(f"{source} is a {pretrained.layout.upper()} checkpoint of the {pretrained.graph} graph; "
                         f"the run is on the {graph} graph")
    setup = Setup(data=data, data_options=dict(data_options), graph=pretrained.graph, noise=pretrained.noise,
                  noise_options=dict(pretrained.noise_options))
    tokens, seq_len = setup.dataset.vocab_size, setup.dataset.seq_len
    states = setup.kernel_graph.num_states
    if pretrained.num_states != states:
        mask = " plus the mask" if pretrained.graph == "absorbing" else ""
        raise ValueError(f"{source}: the {pretrained.layout.upper()} checkpoint's {pretrained.graph} graph has "
                         f"{pretrained.num_states} states, but the {data} data has {tokens} tokens{mask}: "
                         f"{states} states{_vocabulary_hint(pretrained, setup)}")
    if pretrained.seq_len != seq_len:
        fix = (f" (--data-option seq_len={pretrained.seq_len} fits it)"
               if "seq_len" in inspect.signature(type(setup.dataset)).parameters else "")
        raise ValueError(f"{source}: the {pretrained.layout.upper()} checkpoint's length is {pretrained.seq_len}, "
                         f"the {data} data's {seq_len}{fix}")
    return setup


def _vocabulary_hint(pretrained: Pretrained, setup: Setup) -> str:
    """How to give the data a checkpoint's vocabulary: the data option that sets it, and for a
    tokenizer file one token off, the pad token that DUO's releases count and MDLM's and SEDD's
    do not (DUO: GPT-2's 50257 tokens + the [PAD] its code adds = 50258 states of the uniform
    graph; MDLM, SEDD: 50257 + the mask = 50258 of the absorbing graph)."""
    if setup.data == "markov":
        return " (--data names the data, default markov; --data-option vocab_size=N sets the markov data's tokens)"
    if setup.data != "text":
        return ""
    extra = pretrained.num_states - setup.kernel_graph.num_states
    if setup.dataset.tokenizer.name != "bytes" and extra == 1 and pretrained.graph == "uniform":
        return ("; a DUO release counts the [PAD] token that DUO's code adds to GPT-2's 50257 (vocabulary 50258): "
                "add it to the file given as --data-option tokenizer=FILE, e.g. python -c \"from tokenizers import "
                "Tokenizer; t = Tokenizer.from_file('FILE'); t.add_special_tokens(['[PAD]']); t.save('PADDED.json')\"")
    if setup.dataset.tokenizer.name != "bytes" and extra == -1 and pretrained.graph == "absorbing":
        return ("; MDLM's and SEDD's releases count GPT-2's 50257 tokens plus the mask (50258): the file given as "
                "--data-option tokenizer=FILE holds one token more (an added pad token?); give it without")
    return (" (--data-option tokenizer=FILE gives the text data a tokenizer file's vocabulary; the default, bytes, "
            "has 256 tokens)")


# ----------------------------------------------------------------------------- evaluation


def exact_metrics(model, setup: Setup, steps: int, method: str = "analytic") -> Optional[dict[str, float]]:
    """Exact divergences of the ``steps``-step sampler from the data, or None where
    the state space is too large to enumerate (only the markov data has an exact
    distribution).

    ``kl`` = KL(data || sampler) (the study's measure in docs/MATH.md section 4:
    it punishes a sampler that misses data, so collapse cannot score well) and
    ``reverse_kl`` = KL(sampler || data), from the sampler's exact output
    distribution over all ``num_states^L`` sequences (``exact_sample_distribution``;
    a mixture student's latent average as ``latent_quadrature``).
    """
    if not enumerable(setup):
        return None
    support = _exact_support(setup)
    return _divergences(setup, support, _exact_output(model, setup, support, time_grid(steps), method))


def exact_handover_metrics(student, teacher, setup: Setup, steps: int, teacher_steps: int = 16,
                           patterns: Optional[list[str]] = None, method: str = "analytic"
                           ) -> Optional[dict[str, dict[str, float]]]:
    """Where a ``steps``-step student loses, exactly: samplers that take, on each
    interval of the student's grid, either the student's step (``"s"``) or
    ``teacher_steps`` steps of the teacher (``"t"``), each interval starting from
    the exact distribution the previous one ended at.

    ``patterns`` (strings of ``steps`` letters) default to the student alone, the
    teacher alone and the student on one interval at a time with the teacher
    around it: each of the latter minus the teacher alone is what that one step
    of the student costs (docs/RESULTS.md, for what it found and how
    ``--grid-weights`` uses it). Returns ``{pattern: {"kl", "reverse_kl"}}``
    (:func:`exact_metrics`), or None where the state space is not enumerable.
    """
    if not isinstance(teacher_steps, int) or teacher_steps < 1:
        raise ValueError(f"teacher_steps must be a positive int, got {teacher_steps!r}")
    if patterns is None:
        patterns = ["s" * steps, "t" * steps] + ["t" * j + "s" + "t" * (steps - j - 1) for j in range(steps)]
    for pattern in patterns:
        if len(pattern) != steps or set(pattern) - {"s", "t"}:
            raise ValueError(f"patterns must be strings of {steps} letters s (student) or t (teacher), got {pattern!r}")
    if not enumerable(setup):
        return None
    support = _exact_support(setup)
    grid = time_grid(steps)
    after = {"": None}  # the exact distribution after each pattern prefix: patterns share their prefixes
    for pattern in patterns:
        for j, who in enumerate(pattern):
            if pattern[:j + 1] not in after:
                model, times = ((student, grid[j:j + 2]) if who == "s"
                                else (teacher, time_grid(teacher_steps, float(grid[j]), float(grid[j + 1]))))
                after[pattern[:j + 1]] = _exact_output(model, setup, support, times, method, prior=after[pattern[:j]])
    return {pattern: _divergences(setup, support, after[pattern]) for pattern in patterns}


def _exact_support(setup: Setup) -> torch.Tensor:
    from .data.markov import enumerate_sequences

    return enumerate_sequences(setup.kernel_graph.num_states, setup.dataset.seq_len, max_support=EXACT_SUPPORT)


def _exact_output(model, setup: Setup, support: torch.Tensor, times: torch.Tensor, method: str,
                  prior: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The exact distribution over ``support`` after ``model``'s steps on the decreasing
    time grid ``times``, from ``prior`` (default: the graph's prior)."""
    device = model_device(model)
    return exact_sample_distribution(model, setup.kernel_graph, support.to(device),
                                     tau_of_time(setup.schedule, times.to(device)), method=method,
                                     latents=latent_quadrature(model),
                                     prior=None if prior is None else prior.to(device))


def _divergences(setup: Setup, support: torch.Tensor, q: torch.Tensor) -> dict[str, float]:
    """KL(data || q) and KL(q || data) of a distribution over ``support`` that ends at t = 0."""
    from .metrics import exact_kl

    q = q.cpu()
    # the absorbing graph's mask: its support holds the clean sequences in the data's order and then masked ones
    if setup.kernel_graph.num_states != setup.dataset.vocab_size:
        q = q[(support < setup.dataset.vocab_size).all(dim=1)]
    p = setup.dataset.exact_distribution()
    return {"kl": exact_kl(p, q), "reverse_kl": exact_kl(q, p)}


def sample_metrics(setup: Setup, samples: torch.Tensor) -> dict[str, float]:
    """The metrics of a set of samples for the run's data set (see cdm.metrics)."""
    from . import metrics

    data = setup.dataset
    if setup.data == "markov":
        nll = -data.log_prob(samples) / data.seq_len
        return {
            "nll": nll.mean().item(),
            "nll_stderr": (nll.std() / math.sqrt(len(nll))).item(),
            "entropy_per_token": metrics.sample_entropy(samples, per_token=True),
        }
    if setup.data == "words":
        return metrics.words_metrics(samples, data)
    if setup.data == "digits":
        return metrics.digits_metrics(samples, data)
    if setup.data == "text":
        from .metrics_text import text_metrics

        return text_metrics(samples, data, setup.evaluator)
    raise ValueError(f"no metrics for data set {setup.data!r}")


#: the metric each data set is judged by, and whether lower is better
PRIMARY_METRIC = {"markov": ("kl", True), "words": ("real_word_rate", False), "digits": ("frechet_distance", True),
                  "text": ("gen_ppl", True)}


def primary_metric(setup: Setup) -> tuple[str, bool]:
    """``(name, lower_is_better)`` of the run's metric: ``PRIMARY_METRIC``, except that a
    markov chain too large to enumerate is judged by the exact NLL of its samples."""
    if setup.data == "markov" and not enumerable(setup):
        return "nll", True
    return PRIMARY_METRIC[setup.data]


def enumerable(setup: Setup) -> bool:
    """Whether :func:`exact_metrics` evaluates this run's samplers exactly."""
    return setup.data == "markov" and setup.kernel_graph.num_states ** setup.dataset.seq_len <= EXACT_SUPPORT


def data_reference(setup: Setup) -> dict[str, float]:
    """The metrics of held-out data itself: what a perfect sampler scores."""
    generator = torch.Generator().manual_seed(12345)
    data = setup.dataset
    held_out = {"markov": lambda: data.sample(4096, generator), "text": lambda: data.validation}
    reference = held_out.get(setup.data, lambda: data.test)()
    metrics = sample_metrics(setup, reference)
    if enumerable(setup):
        metrics.update(kl=0.0, reverse_kl=0.0)
    return metrics


def evaluate(model, setup: Setup, steps: int, num_samples: int, *, seed: int = 0, method: str = "analytic",
             batch_size: int = 4096) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics of ``num_samples`` draws of the ``steps``-step sampler (and, where the
    state space is enumerable, the exact ones of :func:`exact_metrics`), and the draws."""
    generator = torch.Generator().manual_seed(seed)
    samples = sample(model, setup.kernel_graph, setup.schedule, num_samples, setup.dataset.seq_len, steps,
                     method=method, generator=generator, batch_size=batch_size).cpu()
    if setup.graph == "absorbing" and int(samples.max()) >= setup.dataset.vocab_size:
        raise RuntimeError("a sampler ended on the mask token; the final step must go to tau = 0")
    metrics = exact_metrics(model, setup, steps, method) or {}
    return {**metrics, **sample_metrics(setup, samples)}, samples


def result_row(model: str, method: str, nfe: int, metrics: dict[str, float], **extra) -> dict:
    """One row of results.json."""
    return {"model": model, "method": method, "nfe": int(nfe), "metrics": metrics, **extra}


def default_teacher_path(data: str = "markov") -> Optional[Path]:
    """The shipped teacher of a data set, or None where none ships."""
    path = DEFAULT_TEACHERS.get(data)
    return path if path is not None and path.is_file() else None


def ensure_dir(path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
