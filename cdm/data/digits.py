"""8x8 handwritten digits (scikit-learn's ``load_digits``, shipped with the package).

Each image is 64 tokens in row-major order; a token is a grey level. The raw
data has 17 levels (0..16); ``levels < 17`` quantises them evenly,
``token = floor(value * levels / 17)``, so 0 stays black and 16 maps to
``levels - 1``.
"""

from __future__ import annotations

import numpy as np
import torch

from ._common import draw_rows

__all__ = ["DigitsData"]

RAW_LEVELS = 17  # load_digits stores grey values 0..16


class DigitsData:
    """Tokenised digits with a fixed, class-stratified train/test split.

    Attributes: ``vocab_size`` (= levels), ``seq_len`` (64), ``image_shape``
    (8, 8), ``train``/``test`` LongTensor (n, 64), ``train_labels``/
    ``test_labels`` LongTensor (n,) with the digit classes 0..9.
    """

    image_shape = (8, 8)
    seq_len = 64

    def __init__(self, levels: int = RAW_LEVELS, test_fraction: float = 0.2, seed: int = 0):
        if not isinstance(levels, int) or not 2 <= levels <= RAW_LEVELS:
            raise ValueError(f"levels must be an int in [2, {RAW_LEVELS}], got {levels!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        # Imported here so that `import cdm.data` stays cheap.
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        self.vocab_size = levels
        digits = load_digits()
        values = digits.data.astype(np.int64)
        tokens = (values * levels) // RAW_LEVELS
        train_x, test_x, train_y, test_y = train_test_split(
            tokens, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target)
        self.train = torch.from_numpy(train_x)
        self.test = torch.from_numpy(test_x)
        self.train_labels = torch.from_numpy(train_y.astype(np.int64))
        self.test_labels = torch.from_numpy(test_y.astype(np.int64))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` training images drawn uniformly with replacement: LongTensor (n, 64)."""
        return draw_rows(self.train, n, generator)

    def to_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (n, 64) -> float32 images (n, 8, 8) with intensities in [0, 1]."""
        if tokens.dim() != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"tokens must have shape (n, {self.seq_len}), got {tuple(tokens.shape)}")
        return (tokens.float() / (self.vocab_size - 1)).reshape(-1, *self.image_shape)
