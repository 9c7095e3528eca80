"""The files of a hub-layout checkpoint directory, shared by SEDD's, MDLM's and DUO's layouts.

A directory holds ``config.json`` and the weights, ``model.safetensors`` or
``pytorch_model.bin`` (a state dict, read with ``weights_only``). What the
config says and how the parameters are named differ by layout (``cdm.models.sedd``,
``cdm.models.mdlm``); reading, writing and checking the files does not.

A mixture student (``DiTConfig.latent_dim > 0``) has parameters that none of
the layouts knows: they are stored in the same state dict under their cdm names
(``latent_map.*``, ``weight_head.*``) and the settings that rebuild them under
the config's ``MIXTURE_KEY`` entry, which the layouts' own code ignores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .dit import DiT, DiTConfig

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
PICKLE_FILE = "pytorch_model.bin"
MIXTURE_KEY = "cdm_mixture"
MIXTURE_FIELDS = ("latent_dim", "latent_components", "mixture_weights", "shared_blocks")
#: the fields of DiTConfig a layout's config must agree on with the network written under it
ARCHITECTURE_FIELDS = ("vocab_size", "seq_len", "hidden", "n_heads", "n_blocks", "cond_dim", "mlp_ratio",
                       "scale_by_sigma", "parameterization", "graph", "time_conditioning") + MIXTURE_FIELDS


def read_checkpoint_dir(path: str | os.PathLike, layout: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, state)`` of a checkpoint directory; ``layout`` names it in errors.

    Raises FileNotFoundError for a missing directory or file, ValueError for a
    config.json that is not a JSON object.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"no {layout} checkpoint directory at {directory}")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{layout} checkpoint {directory} has no {CONFIG_FILE}")
    config = read_config(config_path)
    if (directory / SAFETENSORS_FILE).is_file():
        state = load_file(directory / SAFETENSORS_FILE, device="cpu")
    elif (directory / PICKLE_FILE).is_file():
        # weights_only: a state dict needs no arbitrary unpickling.
        state = torch.load(directory / PICKLE_FILE, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{layout} checkpoint {directory} has neither {SAFETENSORS_FILE} nor {PICKLE_FILE}")
    return config, state


def read_config(config_path: Path) -> dict[str, Any]:
    """A checkpoint's config.json, which must hold a JSON object."""
    try:
        with open(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    return config


def write_checkpoint_dir(path: str | os.PathLike, config: dict[str, Any], state: dict[str, torch.Tensor],
                         safe_serialization: bool = True) -> None:
    """Write ``config.json`` and the weights (safetensors, or a pickled state dict)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in state.items()}
    if safe_serialization:
        save_file(state, directory / SAFETENSORS_FILE, metadata={"format": "pt"})
    else:
        torch.save(state, directory / PICKLE_FILE)
    with open(directory / CONFIG_FILE, "w") as f:
        json.dump(config, f, indent=2)


def build_dit(config: DiTConfig, state: dict[str, torch.Tensor], layout: str) -> DiT:
    """A DiT holding ``state`` (cdm parameter names), in eval mode.

    ``rotary_emb.inv_freq`` may be absent (checkpoints saved without persistent
    buffers): the DiT's own base-10000 frequencies then stay. Raises ValueError
    naming missing/unexpected parameters and shape mismatches.
    """
    model = DiT(config)
    expected = model.state_dict()
    state = dict(state)
    state.setdefault("rotary_emb.inv_freq", expected["rotary_emb.inv_freq"])
    problems = []
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing:
        problems.append(f"missing parameters {missing}")
    if unexpected:
        problems.append(f"unexpected parameters {unexpected}")
    problems += [f"{name}: checkpoint shape {tuple(state[name].shape)}, model expects {tuple(t.shape)}"
                 for name, t in expected.items() if name in state and state[name].shape != t.shape]
    if problems:
        raise ValueError(f"{layout} checkpoint does not match its config: " + "; ".join(problems))
    model.load_state_dict(state)
    return model.eval()


def mixture_settings(config: dict[str, Any], layout: str) -> dict[str, Any]:
    """The DiTConfig mixture fields recorded under ``MIXTURE_KEY`` ({} for a plain network)."""
    settings = config.get(MIXTURE_KEY, {})
    if not isinstance(settings, dict) or set(settings) - set(MIXTURE_FIELDS):
        raise ValueError(f"{layout} config entry {MIXTURE_KEY!r} must be an object with keys among "
                         f"{MIXTURE_FIELDS}, got {settings!r}")
    return settings


def mixture_entry(config: DiTConfig) -> dict[str, Any]:
    """``{MIXTURE_KEY: settings}`` for a mixture network, {} for a plain one."""
    if not config.latent_dim:
        return {}
    return {MIXTURE_KEY: {name: getattr(config, name) for name in MIXTURE_FIELDS}}


def check_describes(described: DiTConfig, model: DiT) -> None:
    """ValueError unless a layout config (translated to ``described``) describes ``model``."""
    if not isinstance(model, DiT):
        raise TypeError(f"model must be a DiT, got {type(model).__name__}")
    mismatched = [name for name in ARCHITECTURE_FIELDS if getattr(described, name) != getattr(model.config, name)]
    if mismatched:
        raise ValueError(f"config does not describe model: differs in {mismatched}")
