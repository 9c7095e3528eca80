"""Text end to end: the data set, its tokenizers and split, the text metrics, and the CLI on a small corpus."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cdm.data import TextData, get_dataset
from cdm.data.text import DEFAULT_CORPUS
from cdm.metrics_text import (CausalLMEvaluator, generative_perplexity, load_text_evaluator, text_metrics,
                              unigram_entropy, validation_nll_bound)

PROSE = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
         "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. ") * 12
UNICODE = "naïve café, Größe, ελληνικά, 日本語 ✓\n"


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(PROSE + UNICODE, encoding="utf-8")
    return path


def build_tokenizer_json(tmp_path, text: str):
    """A byte-level BPE trained on ``text`` and saved as tokenizers JSON (offline)."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer=trainer)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


# ----------------------------------------------------------------------------- tokenizers


def test_bytes_round_trip(corpus):
    data = TextData(path=corpus, seq_len=16)
    assert data.vocab_size == 256
    ids = data.encode(UNICODE)
    assert ids.tolist() == list(UNICODE.encode("utf-8"))
    assert data.decode(ids[None]) == [UNICODE]
    # the whole stream decodes back to the file
    assert data.decode(torch.from_numpy(data.tokens.astype(np.int64))[None]) == [PROSE + UNICODE]


def test_bytes_decode_replaces_a_cut_character(corpus):
    data = TextData(path=corpus, seq_len=16)
    cut = data.encode("é")[:1]  # the first of two UTF-8 bytes
    assert data.decode(cut[None]) == ["\ufffd"]


def test_tokenizer_json_round_trip(tmp_path, corpus):
    tokenizer = build_tokenizer_json(tmp_path, PROSE + UNICODE)
    data = TextData(path=corpus, tokenizer=str(tokenizer), seq_len=8)
    assert data.vocab_size == 300
    ids = data.encode(UNICODE)
    assert len(ids) < len(UNICODE.encode("utf-8"))  # merges happened
    assert data.decode(ids[None]) == [UNICODE]
    stream = torch.from_numpy(data.tokens.astype(np.int64))
    assert data.decode(stream[None]) == [PROSE + UNICODE]


# ----------------------------------------------------------------------------- readers and split


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_memmap_reader_matches_in_memory_read(tmp_path, corpus, dtype):
    in_memory = TextData(path=corpus, seq_len=16, seed=3)
    path = tmp_path / "ids.bin"
    in_memory.tokens.astype(dtype).tofile(path)
    mapped = TextData(path=path, seq_len=16, seed=3, dtype=dtype)
    assert isinstance(mapped.tokens, np.memmap)
    assert np.array_equal(np.asarray(mapped.tokens), in_memory.tokens)
    assert torch.equal(mapped.validation, in_memory.validation)
    draws = [d.sample(50, torch.Generator().manual_seed(7)) for d in (in_memory, mapped)]
    assert torch.equal(*draws)
    assert mapped.decode(draws[0][:2]) == in_memory.decode(draws[1][:2])


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    folder = tmp_path / "docs"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text("first " * 20)
    (folder / "b" / "c.txt").write_text("second " * 20)
    (folder / ".hidden").write_text("never read")
    data = TextData(path=folder, seq_len=8)
    text = data.decode(torch.from_numpy(data.tokens.astype(np.int64))[None])[0]
    assert text == "first " * 20 + "\n\n" + "second " * 20


def _window_positions(starts: np.ndarray, seq_len: int) -> set[int]:
    return {int(s) + i for s in starts for i in range(seq_len)}


def test_split_is_disjoint_seeded_and_complete(corpus):
    data = TextData(path=corpus, seq_len=8, validation_fraction=0.2, seed=1)
    chunks = np.arange(data.num_chunks)
    is_validation = data.is_validation_chunk(chunks)
    validation = data.validation_chunks()
    assert is_validation.sum() == data.num_validation_chunks == round(0.2 * data.num_chunks)
    assert sorted(validation.tolist()) == chunks[is_validation].tolist()  # a permutation: each chunk once
    validation_positions = _window_positions(validation * 8, 8)
    starts = data.training_starts(4000, torch.Generator().manual_seed(0))
    assert not _window_positions(starts, 8) & validation_positions
    assert len(set(starts.tolist())) > data.num_chunks  # windows start off the chunk grid too
    assert torch.equal(data.validation, torch.stack([torch.from_numpy(data.tokens[c * 8:(c + 1) * 8].astype(np.int64))
                                                     for c in validation]))
    again = TextData(path=corpus, seq_len=8, validation_fraction=0.2, seed=1)
    other = TextData(path=corpus, seq_len=8, validation_fraction=0.2, seed=2)
    assert np.array_equal(again.validation_chunks(), validation)
    assert set(other.validation_chunks().tolist()) != set(validation.tolist())
    assert again.fingerprint == data.fingerprint != other.fingerprint


def test_the_default_corpus_ships_and_needs_no_path():
    assert DEFAULT_CORPUS.is_file() and DEFAULT_CORPUS.stat().st_size < 4 << 20
    data = get_dataset("text")
    assert (data.vocab_size, data.seq_len) == (256, 64)
    assert len(data.tokens) == 926_579 and data.num_chunks == 14_477
    text = data.decode(data.sample(4, torch.Generator().manual_seed(0)))
    assert all(len(t) == 64 and t.isascii() for t in text)


# ----------------------------------------------------------------------------- bad input


def _bad(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("case, option", [
    ("missing", "path="), ("empty", "path="), ("binary", "path="), ("latin1", "path="), ("empty_folder", "path="),
    ("out_of_range", "path="), ("odd_bytes", "dtype="), ("uint32_as_uint16", "dtype=uint32"),
    ("too_short", "seq_len=64"), ("dtype_on_text", "dtype=uint16"), ("bad_dtype", "dtype=int8"),
    ("no_tokenizer_file", "tokenizer="), ("bad_seq_len", "seq_len"),
])
def test_bad_input_names_the_option(tmp_path, corpus, case, option):
    kwargs = {
        "missing": dict(path=tmp_path / "nowhere.txt"),
        "empty": dict(path=_bad(tmp_path, "empty.txt", b"")),
        "binary": dict(path=_bad(tmp_path, "image.png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" * 10)),
        "latin1": dict(path=_bad(tmp_path, "latin1.txt", "caf\xe9 ".encode("latin-1") * 40)),
        "empty_folder": dict(path=(tmp_path / "void").mkdir() or tmp_path / "void"),
        "out_of_range": dict(path=_bad(tmp_path, "big.bin", np.arange(100, 400, dtype=np.uint16).tobytes())),
        "odd_bytes": dict(path=_bad(tmp_path, "odd.bin", b"\1\0\2\0\3"), dtype="uint16"),
        "uint32_as_uint16": dict(path=_bad(tmp_path, "wide.bin", np.arange(1, 200, dtype=np.uint32).tobytes())),
        "too_short": dict(path=_bad(tmp_path, "short.txt", b"only a few words here")),
        "dtype_on_text": dict(path=corpus, dtype="uint16"),
        "bad_dtype": dict(path=_bad(tmp_path, "ids.bin", np.arange(200, dtype=np.uint16).tobytes()), dtype="int8"),
        "no_tokenizer_file": dict(path=corpus, tokenizer=str(tmp_path / "tokenizer.json")),
        "bad_seq_len": dict(path=corpus, seq_len=0),
    }[case]
    with pytest.raises(ValueError, match=option):
        TextData(**kwargs)


def test_a_bin_with_ids_beyond_a_tokenizer_file_is_refused(tmp_path, corpus):
    tokenizer = build_tokenizer_json(tmp_path, PROSE)
    path = _bad(tmp_path, "ids.bin", np.full(100, 300, dtype=np.uint16).tobytes())
    with pytest.raises(ValueError, match=r"holds id 300, outside the tokenizer's range \[0, 300\)"):
        TextData(path=path, tokenizer=str(tokenizer), seq_len=8)


def test_a_corrupt_tokenizer_file_is_refused(tmp_path, corpus):
    pytest.importorskip("tokenizers")
    with pytest.raises(ValueError, match="tokenizer=.*not a tokenizers JSON file"):
        TextData(path=corpus, tokenizer=str(_bad(tmp_path, "tok.json", b"{not json")))


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("rows, expected", [
    ([[3, 3, 3, 3]], 0.0),
    ([[0, 1, 2, 3]], math.log(4)),
    ([[0, 0, 1, 1], [5, 5, 5, 7]], (math.log(2) + (-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))) / 2),
])
def test_unigram_entropy_closed_form(rows, expected):
    assert unigram_entropy(torch.tensor(rows)) == pytest.approx(expected, abs=1e-12)


class Bigram(nn.Module):
    """logits[b, i] = table[x[b, i]]: a causal LM whose probabilities are known in closed form."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, ids):
        return self.table[ids]


def test_generative_perplexity_of_a_bigram_by_hand(corpus):
    data = TextData(path=corpus, seq_len=4)
    table = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    samples = torch.tensor([[0, 1, 2, 2], [2, 0, 0, 1]])
    total, count = 0.0, 0
    for row in samples.tolist():
        for previous, token in zip(row[:-1], row[1:]):
            logits = table[previous].tolist()
            total -= logits[token] - math.log(sum(math.exp(v) for v in logits))
            count += 1
    evaluator = CausalLMEvaluator(Bigram(table))
    assert count == 6
    assert generative_perplexity(samples, data, evaluator) == pytest.approx(math.exp(total / count), rel=1e-12)
    assert generative_perplexity(samples, data, evaluator, batch_size=1) == pytest.approx(math.exp(total / count))
    metrics = text_metrics(samples, data, evaluator)
    assert metrics["entropy"] == pytest.approx(unigram_entropy(samples))


def test_the_evaluator_is_trained_once_and_cached(tmp_path, corpus):
    data = TextData(path=corpus, seq_len=16)
    first = load_text_evaluator(data, cache_dir=tmp_path / "cache", steps=3)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and data.fingerprint in files[0].name
    again = load_text_evaluator(data, cache_dir=tmp_path / "cache", steps=3)
    assert again.validation_ppl == first.validation_ppl
    assert first.validation_ppl == pytest.approx(generative_perplexity(data.validation, data, again))
    files[0].write_bytes(b"corrupt")  # rebuilt, never trusted
    assert load_text_evaluator(data, cache_dir=tmp_path / "cache", steps=3).validation_ppl == pytest.approx(
        first.validation_ppl)


def test_huggingface_evaluator_matches_its_model(tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    from cdm.metrics_text import HuggingFaceEvaluator

    tokenizer_file = build_tokenizer_json(tmp_path, PROSE)
    folder = tmp_path / "hf"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="Ġ", pad_token="Ġ")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    data = TextData(path=corpus, seq_len=16)
    samples = data.validation[:3]
    evaluator = HuggingFaceEvaluator(folder)
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in data.decode(samples):
            ids = torch.tensor([fast(text)["input_ids"]])
            log_p = model(ids).logits.double().log_softmax(-1)
            total -= float(log_p[0, :-1].gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    assert generative_perplexity(samples, data, evaluator) == pytest.approx(math.exp(total / count), rel=1e-9)
    with pytest.raises(ValueError, match="--eval-model"):
        HuggingFaceEvaluator(tmp_path / "absent")


def test_nll_bound_of_a_uniform_denoiser_is_log_vocab(corpus):
    """A posterior DiT whose output layer is zero predicts x0 uniformly over the 256 bytes; the absorbing
    ELBO is then log 256 per token times the share of the t-integral that is kept (module notes)."""
    from cdm.experiment import Setup, new_model

    options = {"path": str(corpus), "seq_len": 32, "validation_fraction": 0.5}
    setup = Setup(data="text", data_options=options, graph="absorbing", noise="loglinear")
    model = new_model(setup, "tiny", parameterization="posterior", graph="absorbing").eval()
    # the estimate is #masked / t per draw: ~1.4% relative noise at ~34k token draws
    bound = validation_nll_bound(model, setup.kernel_graph, setup.schedule, setup.dataset, draws=32)
    eps = setup.schedule.eps
    assert bound == pytest.approx((1 - eps) * (1 - 1e-3) * math.log(256), rel=3e-2)


# ----------------------------------------------------------------------------- the CLI end to end

FAST = ["--evaluator-steps", "3", "--quiet"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A teacher pre-trained by ``cdm pretrain --data text`` on a small corpus, and where it lives."""
    from cdm.cli import main

    root = tmp_path_factory.mktemp("text_cli")
    corpus = root / "corpus.txt"
    corpus.write_text(PROSE + UNICODE, encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CDM_CACHE_DIR", str(root / "cache"))
        main(["pretrain", "--data", "text", "--data-option", f"path={corpus}", "--data-option", "seq_len=16",
              "--graph", "absorbing", "--noise", "loglinear", "--parameterization", "posterior",
              "--steps", "6", "--batch-size", "8", "--out", str(root / "teacher"), *FAST])
        yield root, corpus, root / "teacher" / "teacher.safetensors"


def test_cli_pretrain_distill_eval_sample(text_run, capsys, monkeypatch):
    import json

    from cdm.cli import main

    root, corpus, teacher = text_run
    monkeypatch.setenv("CDM_CACHE_DIR", str(root / "cache"))
    out = root / "distill"
    main(["distill", "--data", "text", "--teacher", str(teacher), "--teacher-nfe", "1,2", "--student-steps", "1",
          "--steps", "3", "--num-samples", "8", "--out", str(out), *FAST])
    table = capsys.readouterr().out
    assert "primary metric: gen_ppl" in table and "teacher_nll_bound=" in table
    rows = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["method"], r["nfe"]) for r in rows] == [
        ("teacher", "analytic", 1), ("teacher", "analytic", 2), ("student", "cdm-per-token", 1),
        ("student", "cdm-joint", 1)]
    for row in rows:
        assert set(row) >= {"model", "method", "nfe", "metrics"}
        assert row["metrics"]["gen_ppl"] > 1 and 0 < row["metrics"]["entropy"] <= math.log(16)
    reference = json.loads((out / "data_reference.json").read_text())
    assert reference["teacher_nll_bound"] > 0 and reference["gen_ppl"] > 1
    assert (out / "metric_vs_nfe.png").is_file()

    main(["eval", "--checkpoint", str(out / "student-joint-k1.safetensors"), "--steps", "1", "--num-samples", "8",
          *FAST[:2]])
    assert "gen_ppl" in capsys.readouterr().out
    main(["sample", "--checkpoint", str(out / "student-per-token-k1.safetensors"), "--steps", "1",
          "--num-samples", "3", "--out", str(root / "samples.pt"), *FAST[:2]])
    printed = capsys.readouterr().out.split("\n")[-4:-1]
    samples = torch.load(root / "samples.pt")
    decoded = TextData(path=corpus, seq_len=16).decode(samples)
    escaped = ["".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in t) for t in decoded]
    assert printed == escaped


@pytest.mark.parametrize("options, needle", [
    (["path=/nowhere/corpus.txt"], "--data-option: path=/nowhere/corpus.txt: no such file or folder"),
    (["seq_len=100000"], "--data-option: seq_len=100000"),
    (["tokenizer=/nowhere.json"], "--data-option: tokenizer=/nowhere.json"),
    (["dtype=uint16"], "--data-option: dtype=uint16: only a .bin path has a dtype"),
])
def test_cli_bad_text_options(text_run, capsys, options, needle):
    from cdm.cli import main

    root, corpus, _ = text_run
    argv = ["pretrain", "--data", "text", "--steps", "1", "--out", str(root / "bad")]
    if not options[0].startswith("path="):
        argv += ["--data-option", f"path={corpus}"]
    for option in options:
        argv += ["--data-option", option]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_cli_eval_model_and_data_are_checked(text_run, capsys):
    from cdm.cli import main

    root, _, teacher = text_run
    for argv, needle in ((["--data", "markov"], "--data markov: "), (["--eval-model", str(root / "absent")],
                                                                     "--eval-model")):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--checkpoint", str(teacher), "--steps", "1", "--num-samples", "2", *argv])
        assert exit_info.value.code == 2
        assert needle in capsys.readouterr().err
