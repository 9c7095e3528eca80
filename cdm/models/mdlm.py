"""Read and write MDLM's and DUO's checkpoints in the layout of their hub releases.

Both publish a Hugging Face ``PreTrainedModel`` wrapper whose only module is
``backbone``, the DiT of their repositories (models/dit.py, SEDD's DDiT with
the same parameter names): the state dict holds ``backbone.vocab_embed.embedding``,
``backbone.sigma_map.mlp.{0,2}.*``, ``backbone.rotary_emb.inv_freq``,
``backbone.blocks.N.*`` and ``backbone.output_layer.*``, which are ``DiT``'s
names behind the prefix ``backbone.``. The directory (``cdm.models.checkpoint_dir``)
holds ``config.json``, a flat ``PretrainedConfig``:

- MDLM (``kuleshov-group/mdlm-owt``): ``model_type "mdlm"``, ``vocab_size``
  (the mask token included, last: GPT-2's 50257 tokens + 1), ``model_length``,
  ``hidden_dim``, ``cond_dim``, ``n_blocks``, ``n_heads``, ``dropout``,
  ``time_conditioning`` (False in the release: the backbone sees sigma = 0).
  The output is SUBS: logits of the denoising conditional over the clean
  tokens, the mask's logit at -inf and unmasked tokens carried over, which is
  ``DiTConfig(parameterization="posterior", graph="absorbing")``.
- DUO (``s-sahoo/duo``): ``model_type "DUO"``, the same sizes plus ``causal``
  (only the bidirectional, adaLN-conditioned network is a diffusion model).
  Uniform-state diffusion, parameterisation "mean": logits of ``p_0|t`` over
  all ``vocab_size`` tokens, conditioned on ``sigma = -log(alpha_t)``, which
  is ``DiTConfig(parameterization="posterior", graph="uniform")``.

Neither config records the noise schedule: both releases train with the
log-linear schedule, ``alpha_t = 1 - (1 - 1e-3) t``, i.e. ``tau(t) =
-log(1 - (1 - eps) t)`` = ``LogLinearNoise(1e-3)`` (MDLM's noise_schedule.py,
DUO's trainer_base.LogLinear).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .checkpoint_dir import (build_dit, check_describes, mixture_entry, mixture_settings, read_checkpoint_dir,
                             write_checkpoint_dir)
from .dit import DiT, DiTConfig

__all__ = ["MDLM_LAYOUTS", "denoiser_config", "dit_config_from_denoiser", "load_denoiser_checkpoint",
           "save_denoiser_checkpoint"]

#: layout -> (model_type written, the graph of its forward process)
MDLM_LAYOUTS = {"mdlm": ("mdlm", "absorbing"), "duo": ("DUO", "uniform")}
PREFIX = "backbone."
MLP_RATIO = 4  # fixed in their blocks
DEFAULT_DROPOUT = 0.1  # their configs' default
ARCHITECTURE_KEYS = ("vocab_size", "model_length", "hidden_dim", "cond_dim", "n_blocks", "n_heads")


def _layout_name(layout: str) -> str:
    if layout not in MDLM_LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(MDLM_LAYOUTS)}, got {layout!r}")
    return layout.upper()


def denoiser_config(dit_config: DiTConfig, layout: str) -> dict[str, Any]:
    """The config.json of ``layout`` ("mdlm" or "duo") describing ``dit_config``."""
    name = _layout_name(layout)
    model_type, graph = MDLM_LAYOUTS[layout]
    if dit_config.parameterization != "posterior" or dit_config.graph != graph:
        raise ValueError(f"{name}'s layout holds posterior networks of the {graph} graph; dit_config has "
                         f"parameterization={dit_config.parameterization!r}, graph={dit_config.graph!r}")
    if dit_config.mlp_ratio != MLP_RATIO:
        raise ValueError(f"dit_config.mlp_ratio must be {MLP_RATIO} for {name}, got {dit_config.mlp_ratio}")
    if layout == "duo" and not dit_config.time_conditioning:
        raise ValueError("DUO's networks always see the noise level; dit_config has time_conditioning=False")
    config = {"model_type": model_type, "vocab_size": dit_config.vocab_size, "model_length": dit_config.seq_len,
              "hidden_dim": dit_config.hidden, "cond_dim": dit_config.cond_dim, "n_blocks": dit_config.n_blocks,
              "n_heads": dit_config.n_heads, "dropout": dit_config.dropout}
    config.update({"time_conditioning": dit_config.time_conditioning} if layout == "mdlm" else {"causal": False})
    return {**config, **mixture_entry(dit_config)}


def dit_config_from_denoiser(config: dict[str, Any], layout: str) -> DiTConfig:
    """Translate an MDLM or DUO config.json into a ``DiTConfig``."""
    name = _layout_name(layout)
    model_type, graph = MDLM_LAYOUTS[layout]
    missing = [key for key in ARCHITECTURE_KEYS if key not in config]
    if missing:
        raise ValueError(f"{name} config is missing keys {missing}")
    if str(config.get("model_type", model_type)).lower() != model_type.lower():
        raise ValueError(f"{name} config has model_type {config['model_type']!r}, expected {model_type!r}")
    if layout == "duo" and config.get("causal", False):
        raise ValueError("DUO config sets causal=true: that is an autoregressive network, not a diffusion model")
    mask = config.get("mask_token_id", config.get("mask_index"))
    if layout == "mdlm" and mask is not None and mask != config["vocab_size"] - 1:
        raise ValueError(f"MDLM config has mask token {mask}; cdm's absorbing graph needs it last "
                         f"(vocab_size - 1 = {config['vocab_size'] - 1})")
    try:
        return DiTConfig(
            vocab_size=int(config["vocab_size"]), seq_len=int(config["model_length"]),
            hidden=int(config["hidden_dim"]), n_heads=int(config["n_heads"]), n_blocks=int(config["n_blocks"]),
            cond_dim=int(config["cond_dim"]), mlp_ratio=MLP_RATIO,
            dropout=float(config.get("dropout", DEFAULT_DROPOUT)),
            parameterization="posterior", graph=graph,
            time_conditioning=bool(config.get("time_conditioning", False)) if layout == "mdlm" else True,
            **mixture_settings(config, name))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} config describes no valid network: {error}") from None


def load_denoiser_checkpoint(path: str | os.PathLike, layout: str, device: str | torch.device = "cpu"
                             ) -> tuple[DiT, dict[str, Any]]:
    """Load an MDLM (``layout="mdlm"``) or DUO (``"duo"``) directory: ``(model, config)``.

    model: a ``DiT`` in eval mode whose log-scores are those of the checkpoint's
        denoiser (``cdm_kernels.posterior_to_scores`` of its conditional).
    Raises FileNotFoundError for a missing directory or files, ValueError for
    parameters outside ``backbone.``, missing/unexpected ones or wrong shapes.
    """
    name = _layout_name(layout)
    config, state = read_checkpoint_dir(path, name)
    dit_config = dit_config_from_denoiser(config, layout)
    outside = sorted(key for key in state if not key.startswith(PREFIX))
    if outside:
        raise ValueError(f"{name} checkpoint does not match its config: parameters outside {PREFIX!r}: {outside}")
    backbone = {key[len(PREFIX):]: tensor for key, tensor in state.items()}
    return build_dit(dit_config, backbone, name).to(device), config


def save_denoiser_checkpoint(model: DiT, config: dict[str, Any], path: str | os.PathLike, layout: str,
                             safe_serialization: bool = True) -> None:
    """Write ``model`` in MDLM's or DUO's layout.

    config: a config.json dict (``denoiser_config``, or a loaded checkpoint's:
        keys it holds beyond the architecture, e.g. ``auto_map``, are kept)
        that must describe ``model``. The directory is created if needed.
    """
    check_describes(dit_config_from_denoiser(config, layout), model)
    state = {PREFIX + key: tensor for key, tensor in model.state_dict().items()}
    write_checkpoint_dir(path, config, state, safe_serialization)
