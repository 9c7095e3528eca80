import math

import numpy as np
import pytest
import scipy.linalg
import torch

from cdm.checkpoint import load_checkpoint
from cdm.data import DigitsData, MarkovData, WordsData
from cdm.data.words import PAD
from cdm.metrics import (CharNGram, digits_metrics, empirical_distribution, empirical_kl, exact_kl,
                         exact_nll_per_token, frechet_distance, load_digits_classifier, sample_entropy,
                         words_metrics)


@pytest.fixture(scope="module")
def chain():
    return MarkovData(vocab_size=4, seq_len=4, seed=0)


@pytest.fixture(scope="module")
def words():
    return WordsData(seq_len=6)


@pytest.fixture(scope="module")
def digits():
    return DigitsData()


@pytest.fixture(scope="module")
def classifier(digits, tmp_path_factory):
    return load_digits_classifier(digits, cache_dir=tmp_path_factory.mktemp("cache"))


# --------------------------------------------------------------------------- Markov

def test_exact_nll_per_token_by_hand(chain):
    sequence = torch.tensor([[0, 2, 2, 1]])
    log_p = (chain.initial[0].log() + chain.transition[0, 2].log() + chain.transition[2, 2].log()
             + chain.transition[2, 1].log()).item()
    assert exact_nll_per_token(chain, sequence) == pytest.approx(-log_p / 4, rel=1e-12)


def test_exact_nll_of_data_samples_approaches_entropy_rate(chain):
    p = chain.exact_distribution()
    entropy_per_token = -(p * p.log()).sum().item() / 4
    samples = chain.sample(20_000, torch.Generator().manual_seed(0))
    assert exact_nll_per_token(chain, samples) == pytest.approx(entropy_per_token, abs=0.02)


def test_exact_kl_is_zero_on_itself_and_positive_otherwise(chain):
    p = chain.exact_distribution()
    assert exact_kl(p, p) == pytest.approx(0.0, abs=1e-12)
    other = MarkovData(vocab_size=4, seq_len=4, seed=1).exact_distribution()
    assert exact_kl(p, other) > 0.1
    uniform = torch.full_like(p, 1 / p.numel())
    # KL to the uniform distribution is log S - H(p).
    assert exact_kl(p, uniform) == pytest.approx(math.log(p.numel()) + (p * p.log()).sum().item(), rel=1e-10)


def test_exact_kl_two_point_by_hand_and_edge_cases():
    p, q = torch.tensor([0.25, 0.75]), torch.tensor([0.5, 0.5])
    assert exact_kl(p, q) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-7)
    assert exact_kl(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])) == pytest.approx(math.log(2))
    assert exact_kl(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])) == math.inf
    with pytest.raises(ValueError, match="probability"):
        exact_kl(torch.tensor([0.5, 0.6]), q)
    with pytest.raises(ValueError, match="shape"):
        exact_kl(p, torch.tensor([1.0]))


def test_sample_entropy_known_values():
    samples = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]]).repeat(5, 1)
    assert sample_entropy(samples) == pytest.approx(math.log(4))
    assert sample_entropy(samples, per_token=True) == pytest.approx(math.log(2))
    constant = torch.zeros(10, 3, dtype=torch.long)
    assert sample_entropy(constant) == 0.0 and sample_entropy(constant, per_token=True) == 0.0


def test_empirical_kl_ranks_samplers(chain):
    p = chain.exact_distribution()
    generator = torch.Generator().manual_seed(0)
    own = chain.sample(50_000, generator)
    other = MarkovData(vocab_size=4, seq_len=4, seed=1).sample(50_000, generator)
    q_hat = empirical_distribution(own, 4)
    assert q_hat.sum().item() == pytest.approx(1.0) and q_hat.shape == (256,)
    own_kl = empirical_kl(p, own, vocab_size=4)
    assert 0 < own_kl < 0.01  # estimator bias ~ (S - 1) / 2n = 0.0026
    assert empirical_kl(p, other, vocab_size=4) > 10 * own_kl
    with pytest.raises(ValueError, match="smoothing"):
        empirical_kl(p, own, vocab_size=4, smoothing=0.0)


# --------------------------------------------------------------------------- words

def test_char_ngram_nll_by_hand():
    # order 3, add-k with k=1 over V=28 symbols; training words "ab" and "ac".
    ngram = CharNGram(["ab", "ac"], order=3, k=1.0)
    total, count = ngram.nll("ab")
    # contexts: "^^" -> a (2 of 2), "^a" -> b (1 of 2), "ab" -> $ (1 of 1)
    expected = -(math.log(3 / 30) + math.log(2 / 30) + math.log(2 / 29))
    assert count == 3 and total == pytest.approx(expected, rel=1e-12)
    unseen_total, _ = ngram.nll("zz")
    # "^^" was seen (z: 0 of 2); "^z" and "zz" never were, so they are uniform.
    assert unseen_total == pytest.approx(math.log(30) + 2 * math.log(28), rel=1e-12)


def test_char_ngram_validation():
    with pytest.raises(ValueError, match="word"):
        CharNGram(["ab"]).nll("a$")
    with pytest.raises(ValueError, match="order"):
        CharNGram(["ab"], order=0)


def test_words_metrics_on_real_novel_and_malformed_samples(words):
    train_metrics = words_metrics(words.train[:500], words)
    assert train_metrics["real_word_rate"] == 1.0 and train_metrics["novel_rate"] == 0.0
    test_metrics = words_metrics(words.test[:500], words)
    assert test_metrics["real_word_rate"] == 1.0 and test_metrics["novel_real_word_rate"] == 1.0
    noise = torch.randint(0, 27, (500, 6), generator=torch.Generator().manual_seed(0))
    noise_metrics = words_metrics(noise, words)
    assert noise_metrics["real_word_rate"] < 0.05
    assert noise_metrics["ngram_nll_per_char"] > test_metrics["ngram_nll_per_char"] + 1.0

    cat = [2, 0, 19]
    malformed = torch.tensor([cat + [PAD] * 3, [2, PAD, 0, 19, PAD, PAD]])
    mixed = words_metrics(malformed, words)
    assert mixed["real_word_rate"] == 0.5  # "cat" is a word, "c_at" is not


def test_words_metrics_aggregates_nll_over_symbols(words):
    ngram = CharNGram(["ab", "ac"])
    samples = words.encode(["ab", "abc"])
    (first, n_first), (second, n_second) = ngram.nll("ab"), ngram.nll("abc")
    metrics = words_metrics(samples, words, ngram=ngram)
    assert metrics["ngram_nll_per_char"] == pytest.approx((first + second) / (n_first + n_second))


# --------------------------------------------------------------------------- digits

def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def test_frechet_distance_against_scipy_and_shifts():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=generator, dtype=torch.float64) @ torch.randn(6, 6, generator=generator,
                                                                                   dtype=torch.float64)
    b = torch.randn(300, 6, generator=generator, dtype=torch.float64) * 2 + 0.5
    assert frechet_distance(a, b) == pytest.approx(scipy_frechet(a.numpy(), b.numpy()), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = torch.tensor([1.0, 0, 0, 2.0, 0, 0], dtype=torch.float64)
    # Same covariance, so only the mean term remains: |shift|^2 = 5.
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, rel=1e-8)
    assert frechet_distance(a, a + 2 * shift) > frechet_distance(a, a + shift)
    with pytest.raises(ValueError, match="features_a"):
        frechet_distance(a, b[:, :3])


def test_digits_classifier_is_accurate_and_cached(digits, classifier, tmp_path):
    accuracy = (classifier(digits.test).argmax(-1) == digits.test_labels).float().mean().item()
    assert accuracy > 0.9
    cache_dir = tmp_path / "cache"
    first = load_digits_classifier(digits, cache_dir=cache_dir, steps=20)
    (cache_file,) = cache_dir.iterdir()
    tensors, metadata = load_checkpoint(cache_file)
    assert metadata == {"levels": 17, "seed": 0, "steps": 20}
    cache_file.write_bytes(b"corrupt")  # a damaged cache is rebuilt, not fatal
    rebuilt = load_digits_classifier(digits, cache_dir=cache_dir, steps=20)
    for name, tensor in first.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor)  # training is deterministic
    reloaded = load_digits_classifier(digits, cache_dir=cache_dir, steps=20)
    assert torch.equal(reloaded.head.weight, first.head.weight)


def test_digits_metrics_separate_real_from_noise(digits, classifier):
    real = digits_metrics(digits.train[:360], digits, classifier)
    noise = digits_metrics(torch.randint(0, 17, (360, 64), generator=torch.Generator().manual_seed(0)),
                           digits, classifier)
    one_class = digits_metrics(digits.train[digits.train_labels == 3], digits, classifier)
    assert real["frechet_distance"] < noise["frechet_distance"] / 5
    assert real["class_entropy"] == pytest.approx(math.log(10), abs=0.05)
    assert one_class["class_entropy"] < 0.3
    with pytest.raises(ValueError, match="samples"):
        digits_metrics(digits.train[:, :10], digits, classifier)
