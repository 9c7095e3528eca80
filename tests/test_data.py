import itertools
import math

import pytest
import torch

from cdm.data import DigitsData, MarkovData, WordsData, get_dataset
from cdm.data.markov import enumerate_sequences, sequence_index
from cdm.data.words import PAD


@pytest.fixture(scope="module")
def words():
    return WordsData(seq_len=6)


@pytest.fixture(scope="module")
def digits():
    return DigitsData()


# --------------------------------------------------------------------------- Markov

def naive_probability(chain: MarkovData, sequence: list[int]) -> float:
    """Product of chain probabilities, one Python float multiplication at a time."""
    probability = chain.initial[sequence[0]].item()
    for previous, current in zip(sequence, sequence[1:]):
        probability *= chain.transition[previous, current].item()
    return probability


def test_markov_parameters_are_distributions():
    chain = MarkovData(vocab_size=6, seq_len=4, seed=3)
    assert chain.initial.dtype == torch.float64 and chain.transition.shape == (6, 6)
    torch.testing.assert_close(chain.transition.sum(1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)
    assert chain.initial.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert bool((chain.transition > 0).all())


def test_markov_exact_distribution_sums_to_one_and_matches_naive_product():
    chain = MarkovData(vocab_size=4, seq_len=5, seed=1)
    support = chain.enumerate_support()
    probabilities = chain.exact_distribution()
    assert support.shape == (4 ** 5, 5) and probabilities.dtype == torch.float64
    assert probabilities.sum().item() == pytest.approx(1.0, abs=1e-12)
    for row in [0, 17, 500, 1023]:
        assert probabilities[row].item() == pytest.approx(naive_probability(chain, support[row].tolist()), rel=1e-12)


def test_enumeration_order_is_lexicographic_and_matches_sequence_index():
    support = enumerate_sequences(3, 3)
    assert support.tolist() == [list(s) for s in itertools.product(range(3), repeat=3)]
    torch.testing.assert_close(sequence_index(support, 3), torch.arange(27))
    with pytest.raises(ValueError, match="max_support"):
        MarkovData(vocab_size=8, seq_len=8).enumerate_support()


def test_markov_sampling_is_seeded_and_follows_the_exact_distribution():
    chain = MarkovData(vocab_size=3, seq_len=4, seed=2)
    samples = chain.sample(40_000, torch.Generator().manual_seed(0))
    again = chain.sample(40_000, torch.Generator().manual_seed(0))
    assert samples.dtype == torch.int64 and samples.shape == (40_000, 4)
    assert torch.equal(samples, again)
    frequencies = torch.bincount(chain.sequence_index(samples), minlength=81).double() / len(samples)
    expected = chain.exact_distribution()
    # Per-cell binomial standard error; 5 sigma keeps the test stable yet a
    # wrong transition (off by a few percent) fails it.
    tolerance = 5 * torch.sqrt(expected * (1 - expected) / len(samples)) + 1e-4
    assert bool(((frequencies - expected).abs() <= tolerance).all())


def test_markov_chain_has_real_correlations():
    # KL(chain || product of its position marginals) = total correlation;
    # a nearly independent chain would make joint samplers pointless to test.
    chain = MarkovData(vocab_size=4, seq_len=4)
    support, p = chain.enumerate_support(), chain.exact_distribution()
    marginals = [torch.zeros(4, dtype=torch.float64).index_add_(0, support[:, i], p) for i in range(4)]
    product = math.prod(marginals[i][support[:, i]] for i in range(4))
    total_correlation = (p * (p / product).log()).sum().item()
    assert total_correlation > 0.2


def test_markov_log_prob_validates_input():
    chain = MarkovData(vocab_size=4, seq_len=3)
    with pytest.raises(ValueError, match="shape"):
        chain.log_prob(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens"):
        chain.log_prob(torch.tensor([[0, 1, 4]]))
    with pytest.raises(TypeError, match="integer"):
        chain.log_prob(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="vocab_size"):
        MarkovData(vocab_size=1)
    with pytest.raises(ValueError, match="stickiness"):
        MarkovData(stickiness=1.0)


def test_markov_chain_depends_only_on_seed():
    assert torch.equal(MarkovData(seed=5).transition, MarkovData(seed=5).transition)
    assert not torch.equal(MarkovData(seed=5).transition, MarkovData(seed=6).transition)


# --------------------------------------------------------------------------- digits

def test_digits_split_and_tokens(digits):
    assert digits.vocab_size == 17 and digits.seq_len == 64
    assert len(digits.train) + len(digits.test) == 1797
    assert digits.train.dtype == torch.int64 and digits.train.shape[1] == 64
    assert int(digits.train.min()) == 0 and int(digits.train.max()) == 16
    # Stratified: every class appears in the test split in near-equal numbers.
    assert torch.bincount(digits.test_labels, minlength=10).min() >= 30
    assert torch.equal(DigitsData().test, digits.test)


def test_digits_quantisation_keeps_black_and_white():
    two_level = DigitsData(levels=2)
    full = DigitsData()
    assert set(two_level.train.unique().tolist()) == {0, 1}
    torch.testing.assert_close(two_level.train, (full.train * 2) // 17)
    with pytest.raises(ValueError, match="levels"):
        DigitsData(levels=18)


def test_digits_sample_draws_training_rows(digits):
    samples = digits.sample(50, torch.Generator().manual_seed(0))
    assert samples.shape == (50, 64)
    train_rows = {tuple(r) for r in digits.train.tolist()}
    assert all(tuple(r) in train_rows for r in samples.tolist())
    assert digits.to_images(samples).shape == (50, 8, 8)


# --------------------------------------------------------------------------- words

def test_words_token_map_and_round_trip(words):
    encoded = words.encode(["abz", "zz"])
    assert encoded.tolist() == [[0, 1, 25, PAD, PAD, PAD], [25, 25, PAD, PAD, PAD, PAD]]
    assert words.vocab_size == 27
    assert words.decode(words.train[:100]) == words.train_words[:100]


def test_words_decode_marks_interior_pads(words):
    tokens = torch.tensor([[0, PAD, 1, PAD, PAD, PAD], [PAD] * 6])
    assert words.decode(tokens) == ["a_b", ""]


def test_words_split_is_fixed_disjoint_and_valid(words):
    train, test = set(words.train_words), set(words.test_words)
    assert not train & test
    assert len(test) == pytest.approx(0.1 * (len(train) + len(test)), abs=1)
    assert all(2 <= len(w) <= 6 and w.isalpha() and w.islower() and w in words.all_words
               for w in words.train_words + words.test_words)
    assert WordsData(seq_len=6).test_words == words.test_words
    assert WordsData(seq_len=6, seed=1).test_words != words.test_words


def test_words_validation(words):
    with pytest.raises(ValueError, match="words"):
        words.encode(["toolongword"])
    with pytest.raises(ValueError, match="min_len"):
        WordsData(seq_len=4, min_len=5)


def test_get_dataset_factory():
    chain = get_dataset("markov", vocab_size=5, seq_len=2)
    assert isinstance(chain, MarkovData) and chain.vocab_size == 5
    with pytest.raises(ValueError, match="name"):
        get_dataset("imagenet")
