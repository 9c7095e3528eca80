"""Data sets: a toy Markov chain with exact likelihoods, 8x8 digits, English words, real text.

Every data set has ``vocab_size`` (number of data tokens; a graph that needs a
mask token adds it on top), ``seq_len`` and ``sample(n, generator) ->
LongTensor (n, seq_len)``. Digits and words also have fixed ``train``/``test``
LongTensor splits; ``sample`` draws from ``train``. Text has a seeded
train/validation split of its token stream (``validation``) and ``decode``.
"""

from .digits import DigitsData
from .markov import MarkovData
from .text import TextData
from .words import WordsData

__all__ = ["MarkovData", "DigitsData", "WordsData", "TextData", "get_dataset", "DATA_SETS"]

_DATASETS = {"markov": MarkovData, "digits": DigitsData, "words": WordsData, "text": TextData}
DATA_SETS = tuple(_DATASETS)


def get_dataset(name: str, **kwargs):
    """Build a data set by name: ``"markov"``, ``"digits"``, ``"words"`` or ``"text"``; kwargs go to its constructor."""
    if name not in _DATASETS:
        raise ValueError(f"name must be one of {sorted(_DATASETS)}, got {name!r}")
    return _DATASETS[name](**kwargs)
