"""Pretrained networks from the field: a checkpoint directory in SEDD's, MDLM's or
DUO's layout, recognised from its config.json, with everything a run needs
from it (graph, noise schedule, vocabulary, length, parameterisation).

Recognition: ``model_type`` "mdlm" is MDLM's layout, "DUO" DUO's (their
Hugging Face configs); a config with SEDD's ``graph``/``noise``/``model``
sections is SEDD's. Nothing is downloaded: the directory must be local.

Which layout holds a network follows from its output: log-scores (``"score"``)
are SEDD's, a posterior of the absorbing graph is MDLM's SUBS, one of the
uniform graph DUO's; ``save_pretrained`` writes a student in that layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..schedules import get_noise
from .checkpoint_dir import CONFIG_FILE, MIXTURE_KEY, read_config
from .dit import DiT
from .mdlm import MDLM_LAYOUTS, denoiser_config, load_denoiser_checkpoint, save_denoiser_checkpoint
from .sedd import load_sedd_checkpoint, save_sedd_checkpoint, sedd_config

__all__ = ["Pretrained", "LAYOUTS", "checkpoint_layout", "load_pretrained", "save_pretrained", "layout_of"]

LAYOUTS = ("sedd", "mdlm", "duo")
SEDD_GRAPHS = {"absorb": "absorbing", "uniform": "uniform"}  # SEDD's graph.type -> cdm's name
RELEASED_EPS = 1e-3  # the log-linear schedule's eps in all three releases


@dataclass(frozen=True)
class Pretrained:
    """A loaded checkpoint directory.

    model: the network, a ``DiT`` in eval mode returning log-scores.
    layout: "sedd", "mdlm" or "duo".
    graph: the forward process's cdm name ("absorbing" or "uniform").
    noise, noise_options: the schedule (``cdm.schedules.get_noise(noise, **noise_options)``).
    config: the checkpoint's config.json as read.
    """

    model: DiT
    layout: str
    graph: str
    noise: str
    noise_options: dict
    config: dict

    @property
    def num_states(self) -> int:
        return self.model.config.vocab_size

    @property
    def seq_len(self) -> int:
        return self.model.config.seq_len


def checkpoint_layout(path: str | os.PathLike) -> str:
    """The layout of the checkpoint directory at ``path``, from its config.json.

    Raises FileNotFoundError when there is no such directory or config, and
    ValueError when the config is none of the three layouts.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"checkpoint directory {directory} has no {CONFIG_FILE}")
    config = read_config(directory / CONFIG_FILE)
    model_type = str(config.get("model_type", "")).lower()
    for layout, (written_type, _) in MDLM_LAYOUTS.items():
        if model_type == written_type.lower():
            return layout
    if all(isinstance(config.get(key), dict) for key in ("graph", "noise", "model")):
        return "sedd"
    raise ValueError(f"{directory / CONFIG_FILE} is none of the layouts cdm reads: MDLM's and DUO's have "
                     f"model_type 'mdlm'/'DUO' (found {config.get('model_type')!r}), SEDD's has 'graph', 'noise' "
                     "and 'model' sections")


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> Pretrained:
    """Load the checkpoint directory at ``path`` in whichever layout it is."""
    layout = checkpoint_layout(path)
    if layout == "sedd":
        model, config = load_sedd_checkpoint(path, device)
        noise = config["noise"]["type"]
        options = ({"sigma_min": float(config["noise"]["sigma_min"]), "sigma_max": float(config["noise"]["sigma_max"])}
                   if noise == "geometric" else {})
        return Pretrained(model, layout, SEDD_GRAPHS[config["graph"]["type"]], noise, options, config)
    model, config = load_denoiser_checkpoint(path, layout, device)
    return Pretrained(model, layout, MDLM_LAYOUTS[layout][1], "loglinear", {}, config)


def layout_of(model: DiT) -> str:
    """The layout that holds ``model``'s parameterisation and graph."""
    config = model.config
    if config.parameterization == "score":
        return "sedd"
    for layout, (_, graph) in MDLM_LAYOUTS.items():
        if config.graph == graph:
            return layout
    raise ValueError(f"no published layout holds a posterior network of the {config.graph} graph "
                     "(MDLM's holds the absorbing graph's, DUO's the uniform graph's)")


def save_pretrained(model: DiT, path: str | os.PathLike, graph: str, noise: str, noise_options: dict,
                    like: Optional[Pretrained] = None, safe_serialization: bool = True) -> str:
    """Write ``model`` in the layout that holds it (``layout_of``); returns that layout.

    graph, noise, noise_options: the run's forward process and schedule (cdm names).
    like: the checkpoint the model comes from: when it has the same layout, the
        keys of its config that do not describe the network (SEDD's training
        settings, a Hugging Face ``auto_map``) are kept.
    Raises ValueError for a schedule the layout cannot record (MDLM's and DUO's
    configs record none: only the released log-linear schedule fits).
    """
    layout = layout_of(model)
    if noise == "loglinear" and float(noise_options.get("eps", RELEASED_EPS)) != RELEASED_EPS:
        raise ValueError(f"the {layout.upper()} layout records the log-linear schedule with eps={RELEASED_EPS} only, "
                         f"got eps={noise_options['eps']}")
    base = ({key: value for key, value in like.config.items() if key != MIXTURE_KEY}
            if like is not None and like.layout == layout else {})
    if layout == "sedd":
        inverse = {name: key for key, name in SEDD_GRAPHS.items()}
        if graph not in inverse:
            raise ValueError(f"SEDD's layout holds the absorbing and uniform graphs, got {graph!r}")
        config = {**base, **sedd_config(model.config, inverse[graph], noise, **_sigma_range(noise, noise_options))}
        save_sedd_checkpoint(model, config, path, safe_serialization)
        return layout
    if noise != "loglinear":
        raise ValueError(f"the {layout.upper()} layout records no noise schedule: only the released log-linear "
                         f"one fits, got {noise!r}")
    save_denoiser_checkpoint(model, {**base, **denoiser_config(model.config, layout)}, path, layout,
                             safe_serialization)
    return layout


def _sigma_range(noise: str, noise_options: dict) -> dict[str, Any]:
    """SEDD's ``noise.sigma_min``/``sigma_max`` of a geometric schedule (the log-linear one has none)."""
    if noise == "geometric":
        schedule = get_noise(noise, **noise_options)
        return {"sigma_min": schedule.sigma_min, "sigma_max": schedule.sigma_max}
    return {}
