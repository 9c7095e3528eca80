"""Metrics of text samples that need no enumeration: generative perplexity, entropy, the NLL bound.

``entropy`` (:func:`unigram_entropy`): the mean over samples of the entropy
(nats) of the empirical distribution of the tokens within each sample: DUO's
``Metrics.record_entropy`` (s-sahoo/duo, metrics.py), the number MDLM, DUO
and their distillations report next to generative perplexity. A sampler that
repeats itself lowers it.

``gen_ppl`` (:func:`generative_perplexity`): ``exp`` of the mean negative
log-likelihood, under an evaluator causal LM, of every sample token but the
first given the tokens before it, the mean taken over all scored tokens of all
samples (DUO's ``record_generative_perplexity``). The evaluator is either

- a Hugging Face causal LM in a local folder (:class:`HuggingFaceEvaluator`,
  ``cdm ... --eval-model DIR``; GPT-2 large is what the papers use): samples
  are decoded to text and re-tokenized with the model's own tokenizer; or
- offline by default, a :class:`cdm.models.causal.CausalLM` trained on the
  corpus's training split and cached (:func:`load_text_evaluator`), which
  scores the samples' ids directly; its own validation perplexity is stored
  with it (``validation_ppl``): the gen_ppl of real text.

The two are not comparable with each other, nor across corpora or tokenizers.

``nll_bound`` (:func:`validation_nll_bound`): the diffusion ELBO of a score
model on the validation windows, nats per token (an upper bound on its NLL).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .checkpoint import check_metadata, load_checkpoint, save_checkpoint
from .data.text import TextData
from .models.causal import CausalLM, CausalLMConfig

__all__ = ["unigram_entropy", "generative_perplexity", "CausalLMEvaluator", "HuggingFaceEvaluator",
           "train_text_evaluator", "load_text_evaluator", "text_metrics", "validation_nll_bound",
           "EVALUATOR_STEPS"]

ASSETS = Path(__file__).parent / "assets"
EVALUATOR_STEPS = 1500  # training steps of the default evaluator (batch 64)
EVALUATOR_BATCH = 64


def unigram_entropy(samples: torch.Tensor) -> float:
    """Mean over the rows of samples (n, L) of the entropy of each row's token histogram, in nats."""
    if samples.dim() != 2 or samples.shape[0] == 0 or samples.shape[1] == 0:
        raise ValueError(f"samples must have shape (n, L) with n, L > 0, got {tuple(samples.shape)}")
    total = 0.0
    for row in samples:
        p = torch.unique(row, return_counts=True)[1].double() / row.numel()
        total -= float((p * p.log()).sum())
    return total / samples.shape[0]


class CausalLMEvaluator:
    """Scores samples in the data's own token ids with a causal LM ``model(ids) -> logits (n, L, V)``.

    ``validation_ppl``: the model's perplexity on the validation windows, when known.
    """

    def __init__(self, model, name: str = "causal LM", validation_ppl: Optional[float] = None):
        self.model, self.name, self.validation_ppl = model, name, validation_ppl

    @torch.no_grad()
    def token_nlls(self, samples: torch.Tensor, data: TextData) -> tuple[torch.Tensor, torch.Tensor]:
        """``-log p(x_i | x_<i)`` for i >= 1, float64 (n, L - 1), and the weights of those tokens (all 1)."""
        del data  # the ids are already the evaluator's
        logits = self.model(samples.long()).double()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), samples[:, 1:].long(), reduction="none")
        return nll, torch.ones_like(nll)


class HuggingFaceEvaluator:
    """A local Hugging Face causal LM (``transformers``; never downloaded): samples are decoded to text
    and re-tokenized with the model's tokenizer; padding is not scored."""

    def __init__(self, directory: str | os.PathLike):
        try:
            import transformers
        except ImportError:
            raise ValueError(f"--eval-model {directory}: needs the 'transformers' package") from None
        if not Path(directory).is_dir():
            raise ValueError(f"--eval-model {directory}: no such folder (a local Hugging Face model; "
                             "nothing is downloaded)")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
        except (OSError, ValueError) as error:
            raise ValueError(f"--eval-model {directory}: not a local causal LM with its tokenizer ({error})") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.name, self.validation_ppl = str(directory), None
        self.max_length = getattr(self.model.config, "max_position_embeddings", None) or 1024

    @torch.no_grad()
    def token_nlls(self, samples: torch.Tensor, data: TextData) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.tokenizer(data.decode(samples), return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length, return_token_type_ids=False)
        ids, attention = encoded["input_ids"], encoded["attention_mask"]
        logits = self.model(input_ids=ids, attention_mask=attention).logits.double()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        return nll, attention[:, 1:].double()


def generative_perplexity(samples: torch.Tensor, data: TextData, evaluator, batch_size: int = 256) -> float:
    """``exp(sum of token NLLs / number of scored tokens)`` of samples (n, L) under ``evaluator``."""
    if samples.dim() != 2 or samples.shape[0] == 0 or samples.shape[1] < 2:
        raise ValueError(f"samples must have shape (n, L) with n > 0 and L >= 2, got {tuple(samples.shape)}")
    total, count = 0.0, 0.0
    for batch in samples.split(batch_size):
        nll, weight = evaluator.token_nlls(batch, data)
        total += float((nll * weight).sum())
        count += float(weight.sum())
    if count == 0:
        raise ValueError("samples hold no token the evaluator can score")
    return math.exp(total / count)


def text_metrics(samples: torch.Tensor, data: TextData, evaluator) -> dict[str, float]:
    """``{"gen_ppl", "entropy"}`` of samples (n, L) (module notes)."""
    return {"gen_ppl": generative_perplexity(samples, data, evaluator), "entropy": unigram_entropy(samples)}


# ----------------------------------------------------------------------------- the default evaluator


def train_text_evaluator(data: TextData, steps: int = EVALUATOR_STEPS, seed: int = 0) -> CausalLM:
    """A ``CausalLM`` trained on ``data``'s training windows: AdamW, warmup then cosine decay, batch 64.

    Deterministic given ``seed`` (the global RNG is forked, so callers' state is untouched)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CausalLM(CausalLMConfig(data.vocab_size, data.seq_len))
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = min(100, steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in range(steps):
        x = data.sample(EVALUATOR_BATCH, generator)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.transpose(1, 2), x[:, 1:])
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
    return model.eval()


def _evaluator_name(data: TextData, steps: int, seed: int) -> str:
    return f"text-evaluator-{data.fingerprint}-n{steps}-s{seed}.safetensors"


def load_text_evaluator(data: TextData, cache_dir: str | os.PathLike | None = None, steps: int = EVALUATOR_STEPS,
                        seed: int = 0) -> CausalLMEvaluator:
    """The default evaluator of ``data``: trained once and cached, keyed by ``data.fingerprint``.

    It is looked up in the package's assets (the shipped corpus's evaluator ships
    there), then in ``cache_dir`` (default ``$CDM_CACHE_DIR`` or ``~/.cache/cdm``,
    where the digits classifier is also cached); a missing, corrupt or stale file
    is rebuilt there. The cache is not written next to a ``path=`` corpus: a
    folder corpus would read it back as text, and data folders are often
    read-only.
    """
    from .metrics import _default_cache_dir

    name = _evaluator_name(data, steps, seed)
    cache = (Path(cache_dir) if cache_dir is not None else _default_cache_dir()) / name
    config = CausalLMConfig(data.vocab_size, data.seq_len)
    settings = {"fingerprint": data.fingerprint, "steps": steps, "seed": seed, "vocab_size": config.vocab_size,
                "seq_len": config.seq_len}
    for path in (ASSETS / name, cache):
        try:
            tensors, metadata = load_checkpoint(path)
            check_metadata(metadata, settings, what=str(path))
            model = CausalLM(CausalLMConfig(**metadata["config"]))
            model.load_state_dict(tensors)
            return CausalLMEvaluator(model.eval(), str(path), metadata["validation_ppl"])
        except (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError):
            continue  # absent, corrupt or stale: try the next place, or rebuild below
    print(f"training the text evaluator ({steps} steps; cached as {cache})", flush=True)
    model = train_text_evaluator(data, steps, seed)
    evaluator = CausalLMEvaluator(model, str(cache))
    evaluator.validation_ppl = generative_perplexity(data.validation, data, evaluator)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(cache, model.state_dict(), {**settings, "config": asdict(config),
                                                "validation_ppl": evaluator.validation_ppl})
    return evaluator


# ----------------------------------------------------------------------------- the diffusion bound


@torch.no_grad()
def validation_nll_bound(model, graph, noise, data: TextData, draws: int = 4, seed: int = 0,
                         batch_size: int = 256) -> float:
    """The ELBO of a score model on ``data.validation``: nats per token, an upper bound on its NLL.

    SEDD's bound: the score entropy ``rate(t) sum_i DSE_i`` integrated over t in
    (1e-3, 1), estimated with ``draws`` stratified t per window; the prior term
    at t = 1 (of order ``e^-tau(1) log V`` per token) and the sliver t < 1e-3 are
    left out, as in SEDD's and MDLM's reported bounds.
    """
    from .losses.score_entropy import score_entropy_loss

    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    windows = data.validation.to(device)
    total = 0.0
    for j in range(draws):
        for batch in windows.split(batch_size):
            u = (j + torch.rand(len(batch), generator=generator, device=device, dtype=torch.float64)) / draws
            t = (1.0 - 1e-3) * u + 1e-3
            losses = score_entropy_loss(model, graph, noise, batch, t=t, generator=generator, reduction="none")
            total += float(losses.double().sum())
    return total * (1.0 - 1e-3) / (draws * windows.numel())
