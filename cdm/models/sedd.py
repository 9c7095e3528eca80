"""Read and write SEDD checkpoints in the layout SEDD publishes on the hub.

A checkpoint is a directory (``cdm.models.checkpoint_dir``) with
- ``config.json``: SEDD's whole training config; what is read here is
  ``tokens``, ``graph.type`` ("absorb" or "uniform"), ``noise.type``
  ("loglinear" or "geometric", with ``noise.sigma_min``/``sigma_max``) and
  ``model.{hidden_size, n_heads, n_blocks, cond_dim, length, dropout,
  scale_by_sigma}``;
- ``model.safetensors`` or ``pytorch_model.bin``: the ``SEDD`` module's state
  dict, whose parameter names ``DiT`` shares (see ``cdm.models.dit``).

For the absorbing graph SEDD's vocabulary is ``tokens + 1`` (the mask token
is last); for the uniform graph it is ``tokens``. SEDD's networks output
log-scores: this layout holds ``parameterization="score"`` networks only.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..schedules import GeometricNoise, LogLinearNoise, NoiseSchedule
from .checkpoint_dir import (build_dit, check_describes, mixture_entry, mixture_settings, read_checkpoint_dir,
                             write_checkpoint_dir)
from .dit import DiT, DiTConfig

__all__ = ["load_sedd_checkpoint", "save_sedd_checkpoint", "sedd_config", "dit_config_from_sedd",
           "sedd_noise_schedule"]

GRAPH_TYPES = ("absorb", "uniform")
SEDD_MLP_RATIO = 4  # fixed in SEDD's blocks


def sedd_config(dit_config: DiTConfig, graph: str, noise: str = "loglinear",
                sigma_min: float = 1e-4, sigma_max: float = 20.0) -> dict[str, Any]:
    """A hub-format config dict (the keys SEDD reads) describing ``dit_config``.

    graph: "absorb" (then ``dit_config.vocab_size`` counts the mask token) or "uniform".
    noise, sigma_min, sigma_max: SEDD's noise settings (defaults: SEDD's release config).
    """
    if graph not in GRAPH_TYPES:
        raise ValueError(f"graph must be one of {GRAPH_TYPES}, got {graph!r}")
    if noise not in ("loglinear", "geometric"):
        raise ValueError(f"noise must be 'loglinear' or 'geometric', got {noise!r}")
    if dit_config.parameterization != "score":
        raise ValueError("SEDD's layout holds score networks; a posterior network goes in MDLM's layout "
                         "(absorbing graph) or DUO's (uniform graph)")
    if not dit_config.time_conditioning:
        raise ValueError("SEDD's networks always see the noise level; dit_config has time_conditioning=False")
    if dit_config.mlp_ratio != SEDD_MLP_RATIO:
        raise ValueError(f"dit_config.mlp_ratio must be {SEDD_MLP_RATIO} for SEDD, got {dit_config.mlp_ratio}")
    if dit_config.scale_by_sigma and graph != "absorb":
        raise ValueError("scale_by_sigma is only defined for the absorbing graph")
    return {
        "tokens": dit_config.vocab_size - (1 if graph == "absorb" else 0),
        "graph": {"type": graph},
        "noise": {"type": noise, "sigma_min": sigma_min, "sigma_max": sigma_max},
        "model": {
            "name": "cdm", "type": "ddit",
            "hidden_size": dit_config.hidden, "n_heads": dit_config.n_heads,
            "n_blocks": dit_config.n_blocks, "cond_dim": dit_config.cond_dim,
            "length": dit_config.seq_len, "dropout": dit_config.dropout,
            "scale_by_sigma": dit_config.scale_by_sigma,
        },
        **mixture_entry(dit_config),
    }


def _lookup(config: dict, dotted_key: str):
    value = config
    for part in dotted_key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"SEDD config is missing key {dotted_key!r}")
        value = value[part]
    return value


def dit_config_from_sedd(config: dict[str, Any]) -> DiTConfig:
    """Translate a hub-format SEDD config dict into a ``DiTConfig``."""
    graph = _lookup(config, "graph.type")
    if graph not in GRAPH_TYPES:
        raise ValueError(f"SEDD config graph.type must be one of {GRAPH_TYPES}, got {graph!r}")
    scale_by_sigma = bool(_lookup(config, "model.scale_by_sigma"))
    if scale_by_sigma and graph != "absorb":
        raise ValueError("SEDD config sets model.scale_by_sigma with a non-absorbing graph")
    return DiTConfig(
        vocab_size=int(_lookup(config, "tokens")) + (1 if graph == "absorb" else 0),
        seq_len=int(_lookup(config, "model.length")),
        hidden=int(_lookup(config, "model.hidden_size")),
        n_heads=int(_lookup(config, "model.n_heads")),
        n_blocks=int(_lookup(config, "model.n_blocks")),
        cond_dim=int(_lookup(config, "model.cond_dim")),
        mlp_ratio=SEDD_MLP_RATIO,
        dropout=float(_lookup(config, "model.dropout")),
        scale_by_sigma=scale_by_sigma,
        **mixture_settings(config, "SEDD"),
    )


def sedd_noise_schedule(config: dict[str, Any]) -> NoiseSchedule:
    """The schedule a SEDD config trained with.

    As in SEDD's own code, "loglinear" ignores ``sigma_min``/``sigma_max``
    (it always uses eps = 1e-3), and "geometric" uses both.
    """
    kind = _lookup(config, "noise.type")
    if kind == "loglinear":
        return LogLinearNoise()
    if kind == "geometric":
        return GeometricNoise(float(_lookup(config, "noise.sigma_min")), float(_lookup(config, "noise.sigma_max")))
    raise ValueError(f"SEDD config noise.type must be 'loglinear' or 'geometric', got {kind!r}")


def load_sedd_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                         ) -> tuple[DiT, dict[str, Any]]:
    """Load a hub-layout SEDD directory: returns ``(model, config)``.

    model: a ``DiT`` in eval mode holding the weights (``model.config`` is its DiTConfig).
    config: the checkpoint's config dict as read, for the graph type
        (``config["graph"]["type"]``) and ``sedd_noise_schedule(config)``.
    Raises FileNotFoundError for a missing directory or files and ValueError
    for missing/unexpected parameters or shape mismatches.
    """
    config, state = read_checkpoint_dir(path, "SEDD")
    return build_dit(dit_config_from_sedd(config), state, "SEDD").to(device), config


def save_sedd_checkpoint(model: DiT, config: dict[str, Any], path: str | os.PathLike,
                         safe_serialization: bool = True) -> None:
    """Write ``model`` in the hub layout: ``config.json`` plus weights.

    config: a hub-format dict (e.g. from ``sedd_config`` or a loaded
        checkpoint) that must describe ``model``'s architecture.
    safe_serialization: write ``model.safetensors`` (default) or ``pytorch_model.bin``.
    The directory is created if needed.
    """
    check_describes(dit_config_from_sedd(config), model)
    write_checkpoint_dir(path, config, model.state_dict(), safe_serialization)
