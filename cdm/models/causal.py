"""A small causal (autoregressive) transformer: the offline evaluator of text samples.

``CausalLM(config)(ids) -> logits``: token and learned position embeddings,
``n_blocks`` pre-norm transformer blocks with causal self-attention, a final
norm and a linear head; ``logits[b, i]`` predicts token ``i + 1`` from tokens
``0..i``. ``cdm.metrics_text`` trains one per text corpus and scores samples
with it (generative perplexity) where no Hugging Face model is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CausalLMConfig", "CausalLM"]


@dataclass(frozen=True)
class CausalLMConfig:
    """vocab_size: tokens read and predicted; seq_len: the longest input (positions are learned)."""

    vocab_size: int
    seq_len: int
    hidden: int = 96
    n_heads: int = 4
    n_blocks: int = 2
    mlp_ratio: int = 4

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "hidden", "n_heads", "n_blocks", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden % self.n_heads:
            raise ValueError(f"hidden={self.hidden} must split into n_heads={self.n_heads} equal heads")


class CausalLM(nn.Module):
    def __init__(self, config: CausalLMConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden)
        self.position_embedding = nn.Embedding(config.seq_len, config.hidden)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(config.hidden, config.n_heads, config.mlp_ratio * config.hidden, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(config.n_blocks))
        self.norm = nn.LayerNorm(config.hidden)
        self.head = nn.Linear(config.hidden, config.vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) with L <= seq_len -> next-token logits (B, L, vocab_size)."""
        if ids.dim() != 2 or not 1 <= ids.shape[1] <= self.config.seq_len:
            raise ValueError(f"ids must have shape (B, L) with 1 <= L <= {self.config.seq_len}, got {tuple(ids.shape)}")
        length = ids.shape[1]
        h = self.token_embedding(ids) + self.position_embedding(torch.arange(length, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device, dtype=h.dtype)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))
