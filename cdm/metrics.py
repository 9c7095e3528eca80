"""Quality metrics for samples of the three data sets. All values are in nats.

Markov chain (exact likelihoods):
    ``exact_nll_per_token``, ``sample_entropy``, ``exact_kl``, ``empirical_kl``.
Words: ``CharNGram``, ``words_metrics``.
Digits: ``frechet_distance``, ``DigitsClassifier``, ``load_digits_classifier``,
    ``digits_metrics``.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import check_metadata, load_checkpoint, save_checkpoint
from .data.digits import DigitsData
from .data.markov import MarkovData, sequence_index
from .data.words import LETTERS, WordsData

__all__ = [
    "exact_nll_per_token", "sample_entropy", "exact_kl", "empirical_distribution", "empirical_kl",
    "CharNGram", "words_metrics",
    "frechet_distance", "DigitsClassifier", "train_digits_classifier", "load_digits_classifier",
    "digits_metrics",
]


# --------------------------------------------------------------------------- Markov

def exact_nll_per_token(data: MarkovData, samples: torch.Tensor) -> float:
    """Mean of ``-log p_data(x) / L`` over samples (n, L): how likely the data finds them.

    A low value alone can mean mode collapse; read it with ``sample_entropy``.
    """
    return float(-data.log_prob(samples).mean() / data.seq_len)


def sample_entropy(samples: torch.Tensor, per_token: bool = False) -> float:
    """Plug-in entropy of samples (n, L).

    per_token=False: entropy of the empirical distribution of whole sequences.
    It is biased low (by about (support seen - 1) / 2n), and capped at log n,
    so compare it only between sample sets of equal size.
    per_token=True: mean over positions of the entropy of each position's
    empirical marginal; it ignores correlations, so it upper-bounds
    (entropy of sequences) / L up to the same estimation bias.
    """
    if samples.dim() != 2 or samples.shape[0] == 0:
        raise ValueError(f"samples must have shape (n, L) with n > 0, got {tuple(samples.shape)}")
    if per_token:
        return sum(_plugin_entropy(torch.unique(column, return_counts=True)[1])
                   for column in samples.T) / samples.shape[1]
    return _plugin_entropy(torch.unique(samples, dim=0, return_counts=True)[1])


def _plugin_entropy(counts: torch.Tensor) -> float:
    """Entropy of the distribution proportional to counts (zero counts allowed)."""
    p = counts[counts > 0].double() / counts.sum()
    return float((p * p.reciprocal().log()).sum())


def exact_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """``KL(p || q) = sum_s p(s) log(p(s) / q(s))`` for probability vectors over one support.

    p: the data distribution, q: the model's, both (S,) in the same enumeration
    order (e.g. ``MarkovData.exact_distribution()``); computed in float64.
    Terms with p(s) = 0 contribute 0; q(s) = 0 where p(s) > 0 gives inf.
    """
    if p.shape != q.shape or p.dim() != 1:
        raise ValueError(f"p and q must be 1-D of equal shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    for name, dist in (("p", p), ("q", q)):
        if bool((dist < 0).any()) or abs(float(dist.double().sum()) - 1.0) > 1e-6:
            raise ValueError(f"{name} must be a probability vector (non-negative, summing to 1)")
    p, q = p.double(), q.double()
    support = p > 0
    if bool((q[support] == 0).any()):
        return math.inf
    return float((p[support] * (p[support].log() - q[support].log())).sum())


def empirical_distribution(samples: torch.Tensor, vocab_size: int, smoothing: float = 0.5) -> torch.Tensor:
    """Add-``smoothing`` estimate of the sample distribution over all vocab_size^L sequences.

    ``q(s) = (count(s) + smoothing) / (n + smoothing * S)``, float64 (S,), in
    the lexicographic order of ``cdm.data.markov.enumerate_sequences``.
    """
    if smoothing <= 0:
        raise ValueError(f"smoothing must be > 0 (it keeps the KL finite), got {smoothing}")
    support = vocab_size ** samples.shape[1]
    counts = torch.bincount(sequence_index(samples, vocab_size).cpu(), minlength=support).double()
    return (counts + smoothing) / (counts.sum() + smoothing * support)


def empirical_kl(p: torch.Tensor, samples: torch.Tensor, vocab_size: int, smoothing: float = 0.5) -> float:
    """KL(p || q_hat) with q_hat the smoothed empirical distribution of samples (n, L).

    The estimator: ``exact_kl(p, empirical_distribution(samples, vocab_size,
    smoothing))``. Default smoothing 0.5 is the Jeffreys/Krichevsky-Trofimov
    choice. Even for samples drawn from p the value is positive, of order
    (S - 1) / 2n, so it only ranks samplers compared at the same n, and is
    informative only when n is well above the support size S.
    """
    q = empirical_distribution(samples, vocab_size, smoothing)
    if q.shape != p.shape:
        raise ValueError(f"p has {p.numel()} entries but samples span a support of {q.numel()}")
    return exact_kl(p, q)


# --------------------------------------------------------------------------- words

START, END = "^", "$"


class CharNGram:
    """Character n-gram model of words with add-k smoothing.

    Each word is scored as its letters followed by an end symbol ``$``, each
    symbol conditioned on the previous ``order - 1`` symbols, with the word
    start padded by ``^``. The predicted alphabet has V = 28 symbols: a-z,
    ``_`` (the decoding of an interior pad, never seen in training, so
    malformed samples get a low probability) and ``$``:
    ``p(c | ctx) = (count(ctx, c) + k) / (count(ctx) + k V)``.
    """

    alphabet = LETTERS + "_" + END

    def __init__(self, words: list[str], order: int = 3, k: float = 0.1):
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be an int >= 1, got {order!r}")
        if not k > 0:
            raise ValueError(f"k must be > 0, got {k}")
        self.order, self.k = order, k
        self._pair_counts: Counter[tuple[str, str]] = Counter()
        self._context_counts: Counter[str] = Counter()
        for word in words:
            for context, symbol in self._events(word):
                self._pair_counts[context, symbol] += 1
                self._context_counts[context] += 1

    def _events(self, word: str):
        padded = START * (self.order - 1) + word + END
        for i in range(self.order - 1, len(padded)):
            yield padded[i - self.order + 1:i], padded[i]

    def nll(self, word: str) -> tuple[float, int]:
        """Total ``-log p`` of the word and its end symbol, and the number of predicted symbols."""
        if not set(word) <= set(self.alphabet[:-1]):
            raise ValueError(f"word must use only the characters {self.alphabet[:-1]!r}, got {word!r}")
        total, count = 0.0, 0
        for context, symbol in self._events(word):
            numerator = self._pair_counts[context, symbol] + self.k
            denominator = self._context_counts[context] + self.k * len(self.alphabet)
            total -= math.log(numerator / denominator)
            count += 1
        return total, count


def words_metrics(samples: torch.Tensor, data: WordsData, ngram: CharNGram | None = None) -> dict[str, float]:
    """Quality of word samples (n, seq_len), decoded with ``data.decode``.

    real_word_rate: share of samples that are words of the full source list.
    novel_rate: share not in the training split (a memorising model scores 0).
    novel_real_word_rate: share that are real words outside the training split.
    ngram_nll_per_char: sum of n-gram NLLs over all samples divided by the
        number of predicted symbols (letters + one end symbol per sample);
        the n-gram (order 3, add-k) is fitted on ``data.train_words`` unless given.
    """
    words = data.decode(samples)
    if not words:
        raise ValueError("samples must hold at least one sequence")
    ngram = ngram or CharNGram(data.train_words)
    train = set(data.train_words)
    real = [w in data.all_words for w in words]
    novel = [w not in train for w in words]
    nll_and_counts = [ngram.nll(w) for w in words]
    n = len(words)
    return {
        "real_word_rate": sum(real) / n,
        "novel_rate": sum(novel) / n,
        "novel_real_word_rate": sum(r and v for r, v in zip(real, novel)) / n,
        "ngram_nll_per_char": sum(t for t, _ in nll_and_counts) / sum(c for _, c in nll_and_counts),
    }


# --------------------------------------------------------------------------- digits

def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (n, D) and (m, D).

    ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)``, the FID
    formula; the matrix square root goes through symmetric eigendecompositions
    in float64 (tiny negative eigenvalues from rounding are clipped to 0).
    """
    if features_a.dim() != 2 or features_b.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"features_a and features_b must be (n, D) with equal D, got "
                         f"{tuple(features_a.shape)} and {tuple(features_b.shape)}")
    if min(len(features_a), len(features_b)) < 2:
        raise ValueError("features_a and features_b need at least 2 rows each for a covariance")
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eigvals_a, eigvecs_a = torch.linalg.eigh(cov_a)
    sqrt_cov_a = (eigvecs_a * eigvals_a.clamp(min=0).sqrt()) @ eigvecs_a.T
    middle = sqrt_cov_a @ cov_b @ sqrt_cov_a
    trace_sqrt_middle = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt_middle
    return float(distance.clamp(min=0))


class DigitsClassifier(nn.Module):
    """MLP on 8x8 digit tokens: 64 -> hidden -> features -> 10 classes.

    Input tokens (n, 64) in [0, levels) are scaled to [0, 1]; ``features``
    returns the penultimate activations used for the Frechet distance.
    """

    def __init__(self, levels: int, hidden: int = 128, feature_dim: int = 64):
        super().__init__()
        self.levels = levels
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, 10)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, 64) tokens -> (n, feature_dim) float32."""
        return self.body(tokens.float() / (self.levels - 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, 64) tokens -> (n, 10) class logits."""
        return self.head(self.features(tokens))


def train_digits_classifier(data: DigitsData, steps: int = 300, seed: int = 0) -> DigitsClassifier:
    """Train a ``DigitsClassifier`` on ``data.train`` with full-batch Adam.

    Deterministic given ``seed`` (initialisation runs under a forked, seeded
    global RNG so callers' random state is untouched). The default steps train
    it to convergence at little cost (its accuracy and time: docs/RESULTS.md).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier(data.vocab_size)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        optimiser.zero_grad()
        F.cross_entropy(model(data.train), data.train_labels).backward()
        optimiser.step()
    return model.eval()


def _default_cache_dir() -> Path:
    return Path(os.environ.get("CDM_CACHE_DIR", Path.home() / ".cache" / "cdm"))


def load_digits_classifier(data: DigitsData, cache_dir: str | os.PathLike | None = None,
                           steps: int = 300, seed: int = 0) -> DigitsClassifier:
    """The digits classifier for ``data``'s grey levels, trained once and cached.

    The cache file ``digits_classifier_L{levels}_s{seed}_n{steps}.safetensors``
    lives in ``cache_dir`` (default ``$CDM_CACHE_DIR`` or ``~/.cache/cdm``); its
    metadata is checked, and it is retrained if missing or unreadable.
    Training always uses the default split (seed 0) of ``data``'s levels, so
    every caller compares against the same classifier.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    settings = {"levels": data.vocab_size, "seed": seed, "steps": steps}
    path = cache_dir / f"digits_classifier_L{data.vocab_size}_s{seed}_n{steps}.safetensors"
    model = DigitsClassifier(data.vocab_size)
    try:
        tensors, metadata = load_checkpoint(path)
        check_metadata(metadata, settings, what=str(path))
        model.load_state_dict(tensors)
        return model.eval()
    except (FileNotFoundError, ValueError, RuntimeError):
        pass  # absent, corrupt or stale: rebuild it below
    model = train_digits_classifier(DigitsData(levels=data.vocab_size), steps=steps, seed=seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model.state_dict(), settings)
    return model


@torch.no_grad()
def digits_metrics(samples: torch.Tensor, data: DigitsData, classifier: DigitsClassifier | None = None
                   ) -> dict[str, float]:
    """Quality of digit samples (n, 64) against ``data.test``.

    frechet_distance: between classifier features of samples and of the real
        test digits (0 for identical statistics; a few digit samples give a
        noisy, upward-biased value, so compare at equal n).
    class_entropy: entropy of the histogram of predicted classes (log 10 =
        2.303 for balanced classes; low values mean mode collapse).
    classifier defaults to ``load_digits_classifier(data)``.
    """
    if samples.dim() != 2 or samples.shape[1] != data.seq_len:
        raise ValueError(f"samples must have shape (n, {data.seq_len}), got {tuple(samples.shape)}")
    classifier = classifier or load_digits_classifier(data)
    samples = samples.cpu()
    predicted = classifier(samples).argmax(-1)
    return {
        "frechet_distance": frechet_distance(classifier.features(samples), classifier.features(data.test)),
        "class_entropy": _plugin_entropy(torch.bincount(predicted, minlength=10)),
    }
