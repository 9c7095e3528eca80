"""Read and write SEDD checkpoints in the layout SEDD publishes on the hub.

A checkpoint is a directory with
- ``config.json``: SEDD's whole training config; what is read here is
  ``tokens``, ``graph.type`` ("absorb" or "uniform"), ``noise.type``
  ("loglinear" or "geometric", with ``noise.sigma_min``/``sigma_max``) and
  ``model.{hidden_size, n_heads, n_blocks, cond_dim, length, dropout,
  scale_by_sigma}``;
- ``model.safetensors`` or ``pytorch_model.bin``: the ``SEDD`` module's state
  dict, whose parameter names ``DiT`` shares (see ``cdm.models.dit``).

For the absorbing graph SEDD's vocabulary is ``tokens + 1`` (the mask token
is last); for the uniform graph it is ``tokens``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..schedules import GeometricNoise, LogLinearNoise, NoiseSchedule
from .dit import DiT, DiTConfig

__all__ = ["load_sedd_checkpoint", "save_sedd_checkpoint", "sedd_config", "dit_config_from_sedd",
           "sedd_noise_schedule"]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
PICKLE_FILE = "pytorch_model.bin"
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
    if dit_config.latent_dim:
        raise ValueError("dit_config has latent_dim > 0; SEDD checkpoints have no latent input")
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
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"no SEDD checkpoint directory at {directory}")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"SEDD checkpoint {directory} has no {CONFIG_FILE}")
    with open(config_path) as f:
        config = json.load(f)

    if (directory / SAFETENSORS_FILE).is_file():
        state = load_file(directory / SAFETENSORS_FILE, device="cpu")
    elif (directory / PICKLE_FILE).is_file():
        # weights_only: a state dict needs no arbitrary unpickling.
        state = torch.load(directory / PICKLE_FILE, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"SEDD checkpoint {directory} has neither {SAFETENSORS_FILE} nor {PICKLE_FILE}")

    model = DiT(dit_config_from_sedd(config))
    _check_state_dict(state, model.state_dict())
    model.load_state_dict(state)
    return model.to(device).eval(), config


def _check_state_dict(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """ValueError naming missing/unexpected keys and shape mismatches."""
    problems = []
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    if missing:
        problems.append(f"missing parameters {missing}")
    if unexpected:
        problems.append(f"unexpected parameters {unexpected}")
    problems += [f"{name}: checkpoint shape {tuple(found[name].shape)}, model expects {tuple(t.shape)}"
                 for name, t in expected.items() if name in found and found[name].shape != t.shape]
    if problems:
        raise ValueError("SEDD checkpoint does not match its config: " + "; ".join(problems))


def save_sedd_checkpoint(model: DiT, config: dict[str, Any], path: str | os.PathLike,
                         safe_serialization: bool = True) -> None:
    """Write ``model`` in the hub layout: ``config.json`` plus weights.

    config: a hub-format dict (e.g. from ``sedd_config`` or a loaded
        checkpoint) that must describe ``model``'s architecture.
    safe_serialization: write ``model.safetensors`` (default) or ``pytorch_model.bin``.
    The directory is created if needed.
    """
    if not isinstance(model, DiT):
        raise TypeError(f"model must be a DiT, got {type(model).__name__}")
    described = dit_config_from_sedd(config)
    if model.config.latent_dim:
        raise ValueError("model has latent_dim > 0; SEDD checkpoints have no latent input")
    mismatched = [name for name in ("vocab_size", "seq_len", "hidden", "n_heads", "n_blocks", "cond_dim",
                                    "mlp_ratio", "scale_by_sigma")
                  if getattr(described, name) != getattr(model.config, name)]
    if mismatched:
        raise ValueError(f"config does not describe model: differs in {mismatched}")

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    if safe_serialization:
        save_file(state, directory / SAFETENSORS_FILE, metadata={"format": "pt"})
    else:
        torch.save(state, directory / PICKLE_FILE)
    with open(directory / CONFIG_FILE, "w") as f:
        json.dump(config, f, indent=2)
