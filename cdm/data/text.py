"""Real text as fixed-length token windows: a file, a folder, a pre-tokenized ``.bin``, or the shipped corpus.

Options (``--data text --data-option KEY=VALUE``):

``path``: a UTF-8 text file; a folder, whose non-hidden files are read
    recursively in sorted order and joined by a blank line (each must be
    UTF-8 text); or a ``.bin`` of token ids, one flat array of ``dtype``
    (``uint16`` or ``uint32``, native byte order, the layout nanoGPT's
    ``prepare.py`` writes), memory-mapped and never read whole (one pass over
    it checks the ids' range). Without ``path``: the shipped corpus (below).
``tokenizer``: ``bytes`` (the default; the UTF-8 bytes, vocabulary 256) or
    the path of a Hugging Face ``tokenizers`` JSON file (``tokenizer.json``;
    the optional ``tokenizers`` package reads it offline).
``seq_len`` (default 64): tokens per sequence.
``validation_fraction`` (default 0.05) and ``seed`` (default 0): the split.
``dtype``: the ids of a ``.bin``; default ``uint16`` when the vocabulary fits
    in it (nanoGPT's choice for GPT-2), else ``uint32``.

The split: the token stream is cut into ``n = tokens // seq_len`` aligned
chunks; chunk ``i`` is a validation chunk when ``(a i + b) mod n <
round(validation_fraction n)``, with ``a`` (coprime to n) and ``b`` drawn from
``seed``. That is a seeded permutation of the chunks that needs no memory, so it
works for corpora larger than memory, and it spreads the validation chunks
evenly over the corpus. Training windows start at any token, but only where
every token they hold lies in a training chunk, so no training window shares a
token position with a validation one. Validation windows are the validation
chunks themselves (``validation``, at most ``VALIDATION_WINDOWS`` of them).

The shipped corpus, ``cdm/assets/text-stdlib-docstrings.txt.gz``: 926,579
ASCII characters (7,166 paragraphs; 281 kB compressed) of English prose from
the docstrings of CPython 3.11's standard library, built by
``python -m cdm.data.build_corpus`` (see there; the text is under the PSF
License). With the byte tokenizer and seq_len 64 it holds 14,477 chunks.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["TextData", "ByteTokenizer", "JsonTokenizer", "load_tokenizer", "DEFAULT_CORPUS", "VALIDATION_WINDOWS"]

DEFAULT_CORPUS = Path(__file__).parents[1] / "assets" / "text-stdlib-docstrings.txt.gz"
BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
DOCUMENT_SEPARATOR = "\n\n"  # between the files of a folder
VALIDATION_WINDOWS = 4096  # the most validation windows ``validation`` holds
SCAN_CHUNK = 1 << 24  # ids per read when a .bin is checked


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256); decoding replaces invalid sequences with U+FFFD."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return self.name


class JsonTokenizer:
    """A Hugging Face ``tokenizers`` JSON file (offline: the file is all it reads)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError(f"tokenizer={path}: reading a tokenizer file needs the 'tokenizers' package "
                             "(pip install 'cdm-kernels[text]')") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"tokenizer={path}: no such file (expected 'bytes' or a tokenizers JSON file)")
        try:
            self._tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as error:  # tokenizers raises its own exception types for bad JSON
            raise ValueError(f"tokenizer={path}: not a tokenizers JSON file ({error})") from None
        self.name = str(self.path)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        if self.vocab_size < 2:
            raise ValueError(f"tokenizer={path}: its vocabulary has {self.vocab_size} tokens; at least 2 are needed")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def load_tokenizer(spec) -> ByteTokenizer | JsonTokenizer:
    """``"bytes"`` or the path of a tokenizers JSON file."""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"tokenizer must be 'bytes' or a file path, got {spec!r}")
    return ByteTokenizer() if str(spec) == "bytes" else JsonTokenizer(spec)


def _read_text_file(path: Path, option: str) -> str:
    raw = path.read_bytes()
    if b"\0" in raw:
        raise ValueError(f"{option}: {path} is a binary file, not UTF-8 text (a .bin of token ids must end in .bin)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{option}: {path} is not UTF-8 text ({error})") from None


def _folder_files(folder: Path) -> list[Path]:
    """The non-hidden files under ``folder``, recursively, in sorted order."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _read_corpus_text(path: Path | None) -> str:
    """The text of the shipped corpus, of a file, or of a folder of files."""
    if path is None:
        return gzip.decompress(DEFAULT_CORPUS.read_bytes()).decode("utf-8")
    option = f"path={path}"
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise ValueError(f"{option}: the folder holds no files")
        return DOCUMENT_SEPARATOR.join(text for text in (_read_text_file(f, option) for f in files) if text)
    if not path.is_file():
        raise ValueError(f"{option}: no such file or folder")
    return _read_text_file(path, option)


def _smallest_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _open_bin(path: Path, dtype: str | None, vocab_size: int) -> np.memmap:
    """A read-only memory map of a flat id array, its size and id range checked in one chunked pass."""
    if dtype is None:
        dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    if dtype not in BIN_DTYPES:
        raise ValueError(f"dtype={dtype}: a .bin holds ids as one of {sorted(BIN_DTYPES)}")
    itemsize = np.dtype(BIN_DTYPES[dtype]).itemsize
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"path={path}: the file is empty")
    if size % itemsize:
        raise ValueError(f"path={path}: {size} bytes is not a whole number of {dtype} ids (wrong dtype=?)")
    ids = np.memmap(path, dtype=BIN_DTYPES[dtype], mode="r")
    head = np.asarray(ids[:SCAN_CHUNK])
    # uint32 ids below 2^16 read as uint16 show up as every other id being 0
    if dtype == "uint16" and len(head) >= 64 and not head[1::2].any() and head[0::2].any():
        raise ValueError(f"path={path}: every other id is 0, as uint32 ids read as uint16 look; pass dtype=uint32")
    for start in range(0, len(ids), SCAN_CHUNK):
        top = int(ids[start:start + SCAN_CHUNK].max())
        if top >= vocab_size:
            raise ValueError(f"path={path}: holds id {top}, outside the tokenizer's range [0, {vocab_size}) "
                             f"(wrong tokenizer= or dtype={dtype}?)")
    return ids


class TextData:
    """Token windows of a text corpus with a fixed, seeded train/validation split (module notes).

    Attributes: ``vocab_size`` (the tokenizer's), ``seq_len``, ``tokenizer``,
    ``tokens`` (the whole id stream: a numpy array, or a read-only memmap for
    a ``.bin``), ``num_chunks``, ``num_validation_chunks``, ``validation``
    LongTensor (m, seq_len) and ``fingerprint`` (a hash of the corpus, the
    tokenizer and the split: what a cached evaluator is keyed by).
    """

    def __init__(self, path=None, tokenizer="bytes", seq_len: int = 64, validation_fraction: float = 0.05,
                 seed: int = 0, dtype: str | None = None):
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a file or folder path, got {path!r}")
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        if not isinstance(validation_fraction, (int, float)) or not 0 < validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seq_len = seq_len
        self.tokenizer = load_tokenizer(tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        path = None if path is None else Path(path)
        self.tokens = self._load_tokens(path, dtype)
        self.num_chunks = len(self.tokens) // seq_len
        if self.num_chunks < 2:
            raise ValueError(f"seq_len={seq_len}: the corpus holds {len(self.tokens)} tokens, fewer than the "
                             f"2 * seq_len that one training and one validation sequence need")
        if self.num_chunks >= 1 << 31:
            raise ValueError(f"path={path}: {self.num_chunks} chunks of seq_len={seq_len}; at most 2^31 are supported")
        self.num_validation_chunks = min(self.num_chunks - 1, max(1, round(validation_fraction * self.num_chunks)))
        rng = np.random.default_rng(seed)
        multiplier = 1
        while self.num_chunks > 2:
            multiplier = int(rng.integers(1, self.num_chunks))
            if math.gcd(multiplier, self.num_chunks) == 1:
                break
        self._multiplier, self._offset = multiplier, int(rng.integers(0, self.num_chunks))
        self.fingerprint = hashlib.sha256(repr((self._corpus_fingerprint(path), self.tokenizer.fingerprint(), seq_len,
                                                validation_fraction, seed)).encode()).hexdigest()[:16]
        self.validation = self._windows(self.validation_chunks(VALIDATION_WINDOWS) * seq_len)

    def _load_tokens(self, path: Path | None, dtype: str | None) -> np.ndarray:
        if path is not None and path.suffix == ".bin" and path.is_file():
            return _open_bin(path, dtype, self.vocab_size)
        if dtype is not None:
            raise ValueError(f"dtype={dtype}: only a .bin path has a dtype")
        text = _read_corpus_text(path)
        if not text:
            raise ValueError(f"path={path}: the corpus is empty")
        ids = self.tokenizer.encode(text)
        return ids.astype(_smallest_dtype(self.vocab_size))

    def _corpus_fingerprint(self, path: Path | None) -> str:
        if isinstance(self.tokens, np.memmap):  # never hash a corpus larger than memory: name, size and time
            stat = path.stat()
            return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        return hashlib.sha256(self.tokens.tobytes()).hexdigest()

    # ------------------------------------------------------------------ the split

    def is_validation_chunk(self, chunks: np.ndarray) -> np.ndarray:
        """Whether each chunk index (int64 array) is a validation chunk."""
        rank = (self._multiplier * chunks.astype(np.int64) + self._offset) % self.num_chunks
        return rank < self.num_validation_chunks

    def validation_chunks(self, limit: int | None = None) -> np.ndarray:
        """The indices of the validation chunks (the first ``limit`` in the permuted order), int64."""
        count = self.num_validation_chunks if limit is None else min(limit, self.num_validation_chunks)
        inverse = pow(self._multiplier, -1, self.num_chunks)
        ranks = np.arange(count, dtype=np.int64)
        return ((ranks - self._offset) % self.num_chunks * inverse) % self.num_chunks

    def training_starts(self, n: int, generator: torch.Generator | None = None) -> np.ndarray:
        """``n`` start positions of training windows, uniform over those that hold only training tokens."""
        last_start = (self.num_chunks - 1) * self.seq_len
        starts, filled = np.empty(n, dtype=np.int64), 0
        while filled < n:
            draws = torch.randint(last_start + 1, (2 * (n - filled) + 16,), generator=generator).numpy()
            ok = ~(self.is_validation_chunk(draws // self.seq_len)
                   | self.is_validation_chunk((draws + self.seq_len - 1) // self.seq_len))
            taken = draws[ok][:n - filled]
            starts[filled:filled + len(taken)] = taken
            filled += len(taken)
        return starts

    def _windows(self, starts: np.ndarray) -> torch.Tensor:
        index = starts[:, None] + np.arange(self.seq_len)
        return torch.from_numpy(np.asarray(self.tokens[index]).astype(np.int64))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` training windows drawn uniformly with replacement: LongTensor (n, seq_len)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        return self._windows(self.training_starts(n, generator))

    # ------------------------------------------------------------------ text

    def encode(self, text: str) -> torch.Tensor:
        """A string -> its ids, LongTensor (n,)."""
        return torch.from_numpy(np.asarray(self.tokenizer.encode(text)).astype(np.int64))

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """LongTensor (n, L) of ids -> n strings (the byte tokenizer writes invalid UTF-8 as U+FFFD)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (n, L), got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.vocab_size}), got range "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        return [self.tokenizer.decode(row) for row in tokens.tolist()]
