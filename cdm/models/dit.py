"""A SEDD-style diffusion transformer (DiT) that outputs log-scores.

Architecture (that of SEDD's ``DDiT``, written anew): token embedding;
conditioning ``c = silu(sigma_map(sigma) [+ latent_map(lam)])`` with
``sigma_map`` a sinusoidal embedding of the total noise followed by an MLP;
``n_blocks`` pre-norm transformer blocks with adaLN-zero modulation, rotary
positions and bidirectional attention (``scaled_dot_product_attention``); an
adaLN-modulated, zero-initialised output layer.

Parameter names follow SEDD's state dict exactly (``vocab_embed.embedding``,
``sigma_map.mlp.{0,2}.*``, ``rotary_emb.inv_freq``, ``blocks.N.norm1.weight``,
``blocks.N.attn_qkv.weight``, ``blocks.N.attn_out.weight``,
``blocks.N.norm2.weight``, ``blocks.N.mlp.{0,2}.*``,
``blocks.N.adaLN_modulation.*``, ``output_layer.{norm_final,linear,adaLN_modulation}.*``),
so published SEDD weights load with ``load_state_dict`` (see ``cdm.models.sedd``).
Only ``latent_map.*`` (present when ``latent_dim > 0``) and ``weight_head.*``
(when ``mixture_weights``) are ours.

Output convention (docs/MATH.md section 2): ``log_score[b, i, y] =
log p_t(x with position i set to y) / p_t(x)``; the entry at the current token
``y = x[b, i]`` is exactly 0 (ratio 1).

Two parameterisations of that output (``DiTConfig.parameterization``):
``"score"`` (SEDD): the last layer's outputs are the log-scores. ``"posterior"``
(as MDLM, DUO and Di4C's networks): they are the logits of the denoising
conditional ``p_0|t(. | x_t)`` per position, and the log-scores follow exactly
from it and the forward kernel (``cdm_kernels.posterior_to_scores``). For the
uniform graph at high noise the scores are ``1 + O(e^-tau)`` perturbations, so
a score network must place its outputs to ~e^-tau precision to move the
conditional at all; the posterior form trains the conditional directly, and
students default to it (the two compared: docs/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import cdm_kernels as ck

__all__ = ["DiTConfig", "DiT", "PRESETS"]

#: ``per_position(log_score, x, sigma, positions) -> (B', P, ...)``: see ``DiT.forward``
PerPosition = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, slice], torch.Tensor]

# name -> (hidden, n_heads, n_blocks, cond_dim). "sedd-small"/"sedd-medium" are
# the published SEDD sizes; the others are for CPU experiments.
PRESETS = {
    "tiny": (64, 4, 2, 32),
    "mini": (128, 4, 4, 64),
    "base": (256, 8, 6, 128),
    "sedd-small": (768, 12, 12, 128),
    "sedd-medium": (1024, 16, 24, 128),
}

PARAMETERIZATIONS = ("score", "posterior")
POSTERIOR_GRAPHS = ("uniform", "absorbing", "ordinal")
LOG_ZERO = -1e4  # a log-score standing for ratio 0
SIGMA_FREQUENCIES = 256  # size of the sinusoidal sigma embedding, as SEDD
LATENT_FREQUENCIES = 8  # sin/cos pairs per latent coordinate


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of ``DiT``.

    vocab_size: tokens the network reads and scores (for the absorbing graph
        this includes the mask token, which is the last one, ``vocab_size - 1``).
    seq_len: the training sequence length (rotary positions work for any
        length; this is what checkpoints record).
    hidden, n_heads, n_blocks, cond_dim, mlp_ratio, dropout: transformer sizes;
        dropout applies to the residual branches in training mode only.
    scale_by_sigma: SEDD's absorbing-graph output scaling (see ``DiT.forward``);
        only meaningful for the absorbing graph.
    latent_dim: 0 for a plain score network; > 0 adds a latent input ``lam``
        (B, latent_dim) for mixture students (see ``DiT.forward``).
    latent_components: 0 for a continuous latent ``lam`` in [0, 1]^latent_dim;
        K > 0 for a K-component mixture (``latent_dim`` must be 1): ``lam`` in
        [0, 1) selects component ``floor(K lam)`` through an embedding table, so
        ``E_lambda`` is an exact average over K components (a mixture NLL over
        K stratified draws is exact, and so is the sampler's exact distribution).
    mixture_weights: with ``latent_components``: the components are weighted by
        ``w(x_t)`` (``forward(..., mixture_weights=True)``, a head on the
        latent-free trunk) instead of equally; the head starts at zero, so the
        weights start uniform.
    shared_blocks: with a latent: the first ``shared_blocks`` blocks are
        conditioned on sigma alone and the latent enters the later blocks and
        the output layer only. Their output is shared by every latent of a
        sequence (a mixture loss over M latents computes it once), and the
        weight head reads it, so a weighted student draws its component and
        scores it in one pass (``forward(..., draw=u)``). 0 (the default): the
        latent conditions every block, and the weights take a latent-free pass
        of the whole trunk of their own.
    parameterization: ``"score"`` (the last layer outputs log-scores, SEDD) or
        ``"posterior"`` (it outputs logits of ``p_0|t``; see the module notes).
    graph: the forward process over ``vocab_size`` states, needed by the
        posterior form to turn conditionals into scores: ``"uniform"``,
        ``"absorbing"`` (mask = last token) or ``"ordinal"``; ignored by ``"score"``.
    time_conditioning: whether the network sees the noise level. False (MDLM's
        released models) conditions every block on sigma = 0, as MDLM's
        backbone does; the posterior form still turns the conditional into
        scores with the true sigma.
    """

    vocab_size: int
    seq_len: int
    hidden: int = 64
    n_heads: int = 4
    n_blocks: int = 2
    cond_dim: int = 32
    mlp_ratio: int = 4
    dropout: float = 0.0
    scale_by_sigma: bool = False
    latent_dim: int = 0
    latent_components: int = 0
    mixture_weights: bool = False
    shared_blocks: int = 0
    parameterization: str = "score"
    graph: str = ""
    time_conditioning: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "hidden", "n_heads", "n_blocks", "cond_dim", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.hidden % self.n_heads or (self.hidden // self.n_heads) % 2:
            raise ValueError(f"hidden={self.hidden} must split into n_heads={self.n_heads} "
                             "heads of even size (rotary embeddings rotate pairs)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not isinstance(self.latent_dim, int) or self.latent_dim < 0:
            raise ValueError(f"latent_dim must be an int >= 0, got {self.latent_dim!r}")
        if not isinstance(self.latent_components, int) or self.latent_components < 0:
            raise ValueError(f"latent_components must be an int >= 0, got {self.latent_components!r}")
        if self.latent_components and self.latent_dim != 1:
            raise ValueError(f"a {self.latent_components}-component latent needs latent_dim=1, got {self.latent_dim}")
        if self.mixture_weights and not self.latent_components:
            raise ValueError("mixture_weights needs latent_components > 0 (weights over a finite set of components)")
        if not isinstance(self.shared_blocks, int) or not 0 <= self.shared_blocks <= self.n_blocks:
            raise ValueError(f"shared_blocks must be an int in [0, n_blocks={self.n_blocks}], "
                             f"got {self.shared_blocks!r}")
        if self.shared_blocks and not self.latent_dim:
            raise ValueError("shared_blocks needs a latent (latent_dim > 0): it says which blocks the latent skips")
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {self.parameterization!r}")
        if self.parameterization == "posterior":
            if self.graph not in POSTERIOR_GRAPHS:
                raise ValueError(f"a posterior-parameterised DiT needs graph in {POSTERIOR_GRAPHS}, got {self.graph!r}")
            if self.scale_by_sigma:
                raise ValueError("scale_by_sigma applies to score outputs only, not to parameterization='posterior'")
        if not isinstance(self.time_conditioning, bool):
            raise TypeError(f"time_conditioning must be a bool, got {self.time_conditioning!r}")

    @classmethod
    def preset(cls, name: str, vocab_size: int, seq_len: int, **overrides) -> DiTConfig:
        """A config from ``PRESETS`` (tiny ~0.1M parameters ... sedd-small, sedd-medium)."""
        if name not in PRESETS:
            raise ValueError(f"name must be one of {sorted(PRESETS)}, got {name!r}")
        hidden, n_heads, n_blocks, cond_dim = PRESETS[name]
        sizes = dict(hidden=hidden, n_heads=n_heads, n_blocks=n_blocks, cond_dim=cond_dim)
        return cls(vocab_size=vocab_size, seq_len=seq_len, **{**sizes, **overrides})


def graph_by_name(name: str, num_states: int) -> ck.Graph:
    """The forward process ``name`` (one of ``POSTERIOR_GRAPHS``) over ``num_states``
    states, mask included for the absorbing graph."""
    if name == "uniform":
        return ck.UniformGraph(num_states)
    if name == "absorbing":
        return ck.AbsorbingGraph(num_states)
    return ck.ordinal_graph(num_states)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (B, L, D), shift/scale (B, 1, D)."""
    return x * (1 + scale) + shift


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of real scalars: values (B,) -> float32 (B, dim), ``[cos | sin]``, dim even.

    Frequencies ``max_period^(-k/half)``, k = 0..half-1, cosines first: the
    layout SEDD's sigma embedding was trained with.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    angles = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class LayerNorm(nn.Module):
    """LayerNorm with a scale but no bias, computed in float32 (as SEDD)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],)) * self.weight


class SigmaEmbedder(nn.Module):
    """Total noise sigma (B,) -> (B, cond_dim): sinusoidal features then an MLP."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(SIGMA_FREQUENCIES, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(sigma, SIGMA_FREQUENCIES)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LatentEmbedder(nn.Module):
    """Latent lam (B, latent_dim) in [0, 1] -> (B, cond_dim).

    Each coordinate becomes ``sin/cos(pi 2^k lam)``, k < LATENT_FREQUENCIES,
    so nearby latent values can still map to very different conditionings;
    an MLP follows. Its last layer starts at zero: a fresh latent student
    computes exactly what its non-latent initialisation (e.g. the teacher's
    weights) computes, and learns to use the latent from there.
    """

    def __init__(self, latent_dim: int, cond_dim: int):
        super().__init__()
        frequencies = math.pi * 2.0 ** torch.arange(LATENT_FREQUENCIES, dtype=torch.float32)
        self.register_buffer("frequencies", frequencies, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * LATENT_FREQUENCIES * latent_dim, cond_dim), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, lam: torch.Tensor) -> torch.Tensor:
        angles = (lam.float()[:, :, None] * self.frequencies).flatten(1)
        features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class ComponentEmbedder(nn.Module):
    """Latent lam (B, 1) in [0, 1) -> the conditioning of component ``floor(K lam)``:
    (B, cond_dim), from a table.

    The table starts random, N(0, 1), unlike ``LatentEmbedder``'s zero start: K
    identical components get identical gradients (uniform responsibilities) and
    never separate (the start's scale compared: docs/RESULTS.md)."""

    def __init__(self, components: int, cond_dim: int):
        super().__init__()
        self.components = components
        self.table = nn.Parameter(torch.randn(components, cond_dim))

    def forward(self, lam: torch.Tensor) -> torch.Tensor:
        return self.table[component_index(lam, self.components)]


def component_index(lam: torch.Tensor, components: int) -> torch.Tensor:
    """The component ``floor(K lam)`` that latents (n, 1) select in a K-component
    student: LongTensor (n,)."""
    return (lam[:, 0].float() * components).long().clamp_(0, components - 1)


def component_from_uniform(log_weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Component k drawn with probability ``w_k`` by inverting the CDF of the weights
    at a uniform: log_weights (B, K), u (B,) in [0, 1) -> LongTensor (B,). The CDF
    is summed in float64, so no component with weight > 0 is skipped by rounding."""
    cdf = log_weights.detach().double().softmax(-1).cumsum(-1)
    point = u.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, point).squeeze(1).clamp_(max=log_weights.shape[-1] - 1)


class MixtureWeightHead(nn.Module):
    """Trunk features (B, L, hidden) -> log-weights of the K components (B, K):
    mean over positions, norm, a zero-initialised projection (uniform weights at
    the start, so a fresh weighted student computes what the equal-weight one does)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(config.hidden)
        self.linear = nn.Linear(config.hidden, config.latent_components)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.linear(self.norm(h.mean(1))).float(), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding over head dimension ``head_dim`` (half-split layout, as SEDD)."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        # Persistent so the name matches SEDD's state dict (rotary_emb.inv_freq).
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (seq_len, head_dim), float32."""
        positions = torch.arange(seq_len, dtype=torch.float32, device=self.inv_freq.device)
        angles = torch.outer(positions, self.inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, L, Dh) by position: pairs are (j, j + Dh/2)."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP block; adaLN-zero shift/scale/gate from the conditioning."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.hidden
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, config.mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.mlp_ratio * dim, dim))
        # Zero modulation: every block starts as the identity (gates are 0).
        self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * dim)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), c (B, cond_dim) -> (B, L, D)."""
        batch, seq_len, dim = x.shape
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)

        h = modulate(self.norm1(x), shift_attn, scale_attn).to(x.dtype)
        q, k, v = self.attn_qkv(h).view(batch, seq_len, 3, self.n_heads, dim // self.n_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
        attended = attended.transpose(1, 2).reshape(batch, seq_len, dim)
        x = x + gate_attn * F.dropout(self.attn_out(attended), self.dropout, self.training)

        h = modulate(self.norm2(x), shift_mlp, scale_mlp).to(x.dtype)
        return x + gate_mlp * F.dropout(self.mlp(h), self.dropout, self.training)


class OutputLayer(nn.Module):
    """Final adaLN-modulated norm and projection to vocab_size logits, zero-initialised."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.norm_final = LayerNorm(config.hidden)
        self.linear = nn.Linear(config.hidden, config.vocab_size)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 2 * config.hidden)
        for layer in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale).to(x.dtype))


class TokenEmbedding(nn.Module):
    """A plain embedding table stored as ``embedding`` (SEDD's parameter name)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding[x]


class DiT(nn.Module):
    """Score network: ``forward(x, sigma, lam=None) -> log_score``; see the module docstring."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        if not isinstance(config, DiTConfig):
            raise TypeError(f"config must be a DiTConfig, got {type(config).__name__}")
        self.config = config
        self.vocab_embed = TokenEmbedding(config.vocab_size, config.hidden)
        self.sigma_map = SigmaEmbedder(config.cond_dim)
        if config.latent_components:
            self.latent_map = ComponentEmbedder(config.latent_components, config.cond_dim)
        elif config.latent_dim:
            self.latent_map = LatentEmbedder(config.latent_dim, config.cond_dim)
        if config.mixture_weights:
            self.weight_head = MixtureWeightHead(config)
        self.rotary_emb = Rotary(config.hidden // config.n_heads)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.n_blocks))
        self.output_layer = OutputLayer(config)
        self.kernel_graph = (graph_by_name(config.graph, config.vocab_size)
                             if config.parameterization == "posterior" else None)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, lam: torch.Tensor | None = None, *,
                mixture_weights: bool = False, draw: torch.Tensor | None = None,
                per_position: PerPosition | None = None, chunk: int | None = None) -> torch.Tensor:
        """Log-scores of every single-token change.

        x: LongTensor (B, L), tokens in [0, vocab_size) (not range-checked:
            that would cost a host sync; out-of-range tokens fail in the embedding).
        sigma: (B,) total noise tau(t) of each sequence (not t itself), > 0.
        lam: latent of a mixture student, only when ``latent_dim > 0``:
            (B, latent_dim), or (B,) when latent_dim == 1, values in [0, 1].
            None means all zeros (the latent-free behaviour at initialisation).
            It may also hold M latents per sequence, (B * M, ...) grouped by
            sequence: the output is then (B * M, L, vocab_size), the M
            evaluations of each sequence, and the ``shared_blocks`` run once
            per sequence rather than M times.
        Returns float32 (B, L, vocab_size), with ``out[b, i, x[b, i]] == 0``;
        float64 for the posterior form on the uniform and ordinal graphs, whose
        scores need it at high noise (docs/MATH.md section 6).

        ``mixture_weights=True`` (a ``config.mixture_weights`` model, no ``lam``):
        instead the log-weights ``log w_k(x_t)`` of its components, float32 (B, K),
        from the trunk conditioned on sigma alone (its ``shared_blocks``, or all
        of it when there are none). A keyword of ``forward`` rather than a method
        of its own so that DDP/FSDP wrappers see the call.

        ``draw`` (B,) uniforms in [0, 1) (a ``config.mixture_weights`` model, no
        ``lam``): the log-scores of component k drawn from ``w(x_t)`` by
        inverting the CDF of the weights at ``draw``: a sampler's step. With
        ``shared_blocks`` this is one pass of the network.

        ``per_position`` (with ``chunk``, a number of positions): instead of the
        log-scores, ``per_position(log_score, x, sigma, positions)`` of each run of
        ``chunk`` positions, concatenated along the positions: ``log_score``
        (B', P, vocab_size) and ``x`` (B', P) are those positions' (``positions``,
        a slice), ``sigma`` (B',). The output layer and ``per_position`` of a
        chunk run under activation checkpointing, so no (B', L, vocab_size)
        tensor is ever held: a loss that needs a few numbers per position (the
        log-likelihood of a target) costs O(B' chunk vocab_size) memory for the
        vocabulary, not O(B' L vocab_size), for one more pass of the output layer
        in backward. It runs inside ``forward`` so that DDP/FSDP wrappers see it.

        With ``scale_by_sigma`` (SEDD, absorbing graph), the raw output is
        shifted by ``-log(e^sigma - 1) - log(vocab_size - 1)``: for a masked
        position the true ratios are ``p(y | unmasked) / (e^sigma - 1)``, so
        the network only has to learn a log-probability around
        ``-log(vocab_size - 1)`` rather than the sigma-dependent scale.
        """
        group = self._check_inputs(x, sigma, lam, mixture_weights, draw)
        if (per_position is None) != (chunk is None) or (per_position is not None and mixture_weights):
            raise ValueError("per_position and chunk go together, and not with mixture_weights=True")
        c_sigma = self.sigma_map(sigma if self.config.time_conditioning else torch.zeros_like(sigma))
        cos, sin = self.rotary_emb(x.shape[1])
        h = self.vocab_embed(x)
        shared = self.config.shared_blocks
        for block in self.blocks[:shared]:
            h = block(h, cos, sin, F.silu(c_sigma))
        if mixture_weights or draw is not None:
            log_weights = self.weight_head(h if shared else self._blocks(h, cos, sin, F.silu(c_sigma)))
            if mixture_weights:
                return log_weights
            latent = self.latent_map.table[component_from_uniform(log_weights, draw)]
        elif self.config.latent_dim:
            if lam is None:
                lam = torch.zeros(x.shape[0], self.config.latent_dim, device=x.device)
            latent = self.latent_map(lam.reshape(-1, self.config.latent_dim))
            if group > 1:
                x, sigma, c_sigma, h = (v.repeat_interleave(group, 0) for v in (x, sigma, c_sigma, h))
        c = F.silu(c_sigma + latent) if self.config.latent_dim else F.silu(c_sigma)
        h = self._blocks(h, cos, sin, c, start=shared)
        if per_position is not None:
            return self._chunked(h, c, x, sigma, per_position, chunk)
        return self._head(h, c, x, sigma)

    def _head(self, h: torch.Tensor, c: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Log-scores (B, P, vocab_size) of positions whose last hidden states are h (B, P, hidden)."""
        out = self.output_layer(h, c).float()
        if self.kernel_graph is not None:
            return self._posterior_scores(out, x, sigma)
        log_score = out

        if self.config.scale_by_sigma:
            sigma = sigma.float()
            # expm1 is accurate for small sigma, where exp(sigma) - 1 cancels.
            log_scale = torch.log(torch.expm1(sigma))[:, None, None] + math.log(self.config.vocab_size - 1)
            log_score = log_score - log_scale
        return torch.scatter(log_score, -1, x.long()[..., None], 0.0)

    def _chunked(self, h: torch.Tensor, c: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                 per_position: PerPosition, chunk: int | None) -> torch.Tensor:
        """``per_position`` of the log-scores, ``chunk`` positions at a time, each chunk checkpointed."""
        seq_len = x.shape[1]
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int (positions per chunk) with per_position, got {chunk!r}")

        def run(h_part, x_part, start):
            positions = slice(start, start + x_part.shape[1])
            return per_position(self._head(h_part, c, x_part, sigma), x_part, sigma, positions)

        parts = []
        for i in range(0, seq_len, chunk):
            h_part, x_part = h[:, i:i + chunk], x[:, i:i + chunk].contiguous()
            parts.append(checkpoint(run, h_part, x_part, i, use_reentrant=False) if torch.is_grad_enabled()
                         else run(h_part, x_part, i))
        return torch.cat(parts, dim=1)

    def _blocks(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c: torch.Tensor,
                start: int = 0) -> torch.Tensor:
        for block in self.blocks[start:]:
            h = block(h, cos, sin, c)
        return h

    def _posterior_scores(self, logits: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        graph = self.kernel_graph
        if isinstance(graph, ck.AbsorbingGraph):
            # MDLM's carry-over: a clean token is its own conditional; a masked one never denoises to the mask
            dtype = torch.float32
            mask = graph.num_states - 1
            logits = logits.index_fill(-1, torch.tensor([mask], device=x.device), -math.inf)
            clean = F.one_hot(x.long(), graph.num_states).bool() | (x == mask)[..., None]
            logits = logits.masked_fill(~clean, -math.inf)
        else:
            dtype = torch.float64
        log_p0 = torch.log_softmax(logits.to(dtype), dim=-1)
        tau = sigma.to(torch.float64)[:, None].expand(x.shape)
        # a clean token under the absorbing graph cannot change: ratio 0, log -inf; the kernels
        # take finite scores, and any very negative one means the same there
        log_score = ck.posterior_to_scores(graph, log_p0, x, tau).clamp_min(LOG_ZERO)
        return torch.scatter(log_score, -1, x.long()[..., None], 0.0)  # r_x = 1 exactly, not to rounding

    def _check_inputs(self, x, sigma, lam, mixture_weights, draw) -> int:
        """Validate shapes and types; returns the number of latents per sequence."""
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int64, torch.int32):
            raise TypeError("x must be an integer (int64/int32) tensor")
        if x.dim() != 2:
            raise ValueError(f"x must have shape (B, L), got {tuple(x.shape)}")
        batch = x.shape[0]
        if not isinstance(sigma, torch.Tensor) or sigma.shape != (batch,):
            raise ValueError(f"sigma must be a tensor of shape ({batch},), got "
                             f"{tuple(sigma.shape) if isinstance(sigma, torch.Tensor) else type(sigma).__name__}")
        if (mixture_weights or draw is not None) and not self.config.mixture_weights:
            raise ValueError(f"{'mixture_weights=True' if mixture_weights else 'draw'} needs a model built with "
                             "config.mixture_weights")
        if mixture_weights and draw is not None:
            raise ValueError("draw does not go with mixture_weights=True (that returns the weights, not scores)")
        if (mixture_weights or draw is not None) and lam is not None:
            raise ValueError(f"lam must be None with {'mixture_weights=True' if mixture_weights else 'draw'} "
                             "(the weights choose among every component)")
        if draw is not None and (not isinstance(draw, torch.Tensor) or draw.shape != (batch,)):
            raise ValueError(f"draw must be a tensor of shape ({batch},) of uniforms in [0, 1), got "
                             f"{tuple(draw.shape) if isinstance(draw, torch.Tensor) else type(draw).__name__}")
        if lam is None:
            return 1
        latent_dim = self.config.latent_dim
        if not latent_dim:
            raise ValueError("lam was given but this model has latent_dim=0")
        rows = lam.shape[0] if lam.dim() else 0
        group = 1 if rows == batch else (rows // batch if batch and rows % batch == 0 else 0)
        if not group or tuple(lam.shape[1:]) not in ({(latent_dim,)} | ({()} if latent_dim == 1 else set())):
            raise ValueError(f"lam must have shape ({batch} * M, {latent_dim})"
                             f"{f' or ({batch} * M,)' if latent_dim == 1 else ''} with M >= 1 latents per "
                             f"sequence, got {tuple(lam.shape)}")
        return group
