"""Real English words as short token sequences (the offline ``english-words`` package).

Token map (vocab_size 27): ``'a'..'z' -> 0..25`` and the pad token ``PAD = 26``.
A word of length k <= seq_len is its k letter tokens followed by ``seq_len - k``
pads. Words come from the ``web2`` list, lowercased, letters a-z only.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import torch

from ._common import draw_rows

__all__ = ["WordsData", "PAD", "LETTERS", "english_words"]

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PAD = len(LETTERS)
# Stands for a pad followed by a letter when decoding: such a sample is
# malformed, and the marker keeps it from ever matching a real word.
INTERIOR_PAD = "_"


@lru_cache(maxsize=None)
def english_words(source: str = "web2") -> frozenset[str]:
    """The full lowercase a-z word set of an ``english-words`` source (cached)."""
    from english_words import get_english_words_set

    letters_only = re.compile(f"[{LETTERS}]+")
    return frozenset(w for w in get_english_words_set([source], lower=True)
                     if letters_only.fullmatch(w))


class WordsData:
    """Words of ``min_len..seq_len`` letters with a fixed, seeded train/test split.

    Attributes: ``vocab_size`` (27), ``seq_len``, ``train``/``test`` LongTensor
    (n, seq_len), ``train_words``/``test_words`` (lists of str, in the order
    of the rows), ``all_words`` (the full word set of the source, any length;
    what "is a real word" is checked against).
    """

    vocab_size = PAD + 1

    def __init__(self, seq_len: int = 8, min_len: int = 2, test_fraction: float = 0.1,
                 seed: int = 0, source: str = "web2"):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        if not isinstance(min_len, int) or not 1 <= min_len <= seq_len:
            raise ValueError(f"min_len must be an int in [1, seq_len={seq_len}], got {min_len!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        self.seq_len = seq_len
        self.all_words = english_words(source)
        # Sorting first makes the split independent of set iteration order,
        # which changes between interpreter runs (string hash randomisation).
        words = sorted(w for w in self.all_words if min_len <= len(w) <= seq_len)
        order = np.random.default_rng(seed).permutation(len(words))
        n_test = max(1, round(test_fraction * len(words)))
        self.test_words = [words[i] for i in order[:n_test]]
        self.train_words = [words[i] for i in order[n_test:]]
        self.train = self.encode(self.train_words)
        self.test = self.encode(self.test_words)

    def encode(self, words: list[str]) -> torch.Tensor:
        """Words -> LongTensor (n, seq_len), pad-filled on the right."""
        tokens = np.full((len(words), self.seq_len), PAD, dtype=np.int64)
        for row, word in enumerate(words):
            if len(word) > self.seq_len or not set(word) <= set(LETTERS):
                raise ValueError(f"words must be a-z strings of length <= {self.seq_len}, got {word!r}")
            tokens[row, :len(word)] = [ord(c) - ord("a") for c in word]
        return torch.from_numpy(tokens)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """LongTensor (n, seq_len) -> n strings.

        Trailing pads are dropped; a pad followed by a letter is written as
        ``"_"`` (so ``[a, PAD, b, PAD]`` decodes to ``"a_b"``), which keeps
        malformed samples visible instead of silently repairing them.
        """
        if tokens.dim() != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"tokens must have shape (n, {self.seq_len}), got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) > PAD):
            raise ValueError(f"tokens must lie in [0, {PAD}]")
        alphabet = LETTERS + INTERIOR_PAD
        return ["".join(alphabet[t] for t in row).rstrip(INTERIOR_PAD) for row in tokens.tolist()]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` training words drawn uniformly with replacement: LongTensor (n, seq_len)."""
        return draw_rows(self.train, n, generator)
