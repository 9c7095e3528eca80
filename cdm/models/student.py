"""Students: a distillation student initialised from its teacher (or from an
earlier student), and teachers frozen for distillation.

A student keeps its source's architecture except for the changes asked for
(a mixture latent, more components, a posterior parameterisation, another
size, more blocks), and starts from every source weight that fits, so it
computes the source's function at initialisation wherever it can.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
from torch import nn

from ..checkpoint import shape_mismatches
from .dit import PRESETS

__all__ = ["make_student", "freeze", "model_device"]


def model_device(model) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for anything else."""
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return torch.device("cpu")


def _load_source_weights(student: nn.Module, weights: dict, first_new_block: int) -> None:
    """Load the weights of the model a student starts from; the only names
    allowed to be missing are the parts the student adds (latent embedding,
    weight head, blocks from ``first_new_block`` on), which keep their identity
    initialisation."""
    differ = shape_mismatches(weights, student.state_dict())
    if differ:
        raise ValueError(f"the student's architecture does not fit the weights it starts from: shapes differ for "
                         f"{differ} (weights -> student)")
    missing, unexpected = student.load_state_dict(weights, strict=False)
    new_blocks = tuple(f"blocks.{j}." for j in range(first_new_block, len(getattr(student, "blocks", ()))))
    if unexpected or any(not name.startswith(("latent_map.", "weight_head.") + new_blocks) for name in missing):
        raise ValueError(f"the student's architecture does not fit the weights it starts from: "
                         f"missing {missing}, unexpected {unexpected}")


def _split_components(weights: dict, components: int, new_components: int) -> dict:
    """The weights of a ``components``-component student with each component
    split into ``new_components // components`` copies. The copies share their
    original's weight (the weight head's rows repeat, and its log-softmax gives
    each copy w/m), so the mixture is the same; their table rows are nudged
    apart by 1% of the table's spread, because identical components get
    identical gradients and never separate (``ComponentEmbedder``)."""
    if new_components % components:
        raise ValueError(f"latent_components={new_components}: a student that starts from a {components}-component "
                         f"one needs a multiple of {components} (each component splits into equal copies)")
    copies = new_components // components
    split = dict(weights)
    table = weights["latent_map.table"].repeat_interleave(copies, 0)
    split["latent_map.table"] = table + 0.01 * table.std() * torch.randn_like(table)
    for name in ("weight_head.linear.weight", "weight_head.linear.bias"):
        if name in weights:
            split[name] = weights[name].repeat_interleave(copies, 0)
    return split


def make_student(teacher: nn.Module, latent_dim: int = 0, parameterization: Optional[str] = None,
                 graph: Optional[str] = None, latent_components: int = 0, size: Optional[str] = None,
                 mixture_weights: bool = False, shared_blocks: int = 0, extra_blocks: int = 0) -> nn.Module:
    """A student initialised from the teacher (seed 001: "student init from teacher").

    ``latent_dim = 0`` and no other change: a copy of the teacher. Otherwise (a
    ``DiT`` teacher) the teacher's architecture with the changes, loaded with
    every teacher weight: ``latent_dim > 0`` adds a latent input whose
    embedding starts at zero (a mixture student that computes the teacher's
    function for every lambda at initialisation; ``latent_components = K``
    makes it a K-component mixture, ``latent_dim`` then 1, and ``mixture_weights``
    weighs those components by ``w(x_t)``, a head that starts at uniform weights;
    ``shared_blocks``: the leading blocks the latent skips, see
    ``cdm.models.DiTConfig``); ``parameterization=
    "posterior"`` (with ``graph``, the forward process's name) reads the last
    layer's outputs as logits of ``p_0|t`` instead of log-scores (see
    ``cdm.models.dit``): the trunk starts from the teacher's, the output is
    re-learnt. ``size``: a name of ``cdm.models.dit.PRESETS`` (hidden width, heads,
    blocks, conditioning width); a size other than the teacher's makes a student
    with fresh random weights (nothing of the teacher fits), which the
    distillation loss alone trains. ``extra_blocks = N``: N more blocks than
    the teacher (or the size), appended after its own; adaLN-zero starts them
    as the identity, so a deeper student still starts as the teacher's function.

    ``teacher`` is the model the student starts from; it may also be an
    earlier student (``cdm distill --student-init``), whose architecture the
    student keeps except for the changes asked for. From a K-component
    student, ``latent_components`` may be a multiple of K: each component is
    split into copies that share its weight (see ``_split_components``), so
    the student starts as nearly the same mixture with more components to train.
    """
    config = getattr(teacher, "config", None)
    changes = {}
    fresh = False
    if size is not None:
        if config is None or not dataclasses.is_dataclass(config) or not hasattr(config, "hidden"):
            raise TypeError("a student of another size needs a DiT-like teacher with a dataclass `config`")
        if size not in PRESETS:
            raise ValueError(f"size must be one of {sorted(PRESETS)}, got {size!r}")
        sizes = dict(zip(("hidden", "n_heads", "n_blocks", "cond_dim"), PRESETS[size]))
        fresh = any(getattr(config, key) != value for key, value in sizes.items())
        if fresh:
            changes.update(sizes)
    if not isinstance(extra_blocks, int) or extra_blocks < 0:
        raise ValueError(f"extra_blocks must be an int >= 0, got {extra_blocks!r}")
    if extra_blocks:
        if config is None or not dataclasses.is_dataclass(config) or not hasattr(config, "n_blocks"):
            raise TypeError("extra_blocks needs a DiT-like teacher with a dataclass `config`")
        changes["n_blocks"] = changes.get("n_blocks", config.n_blocks) + extra_blocks
    if latent_dim:
        changes["latent_dim"] = latent_dim
    if latent_components:
        changes["latent_components"] = latent_components
    if mixture_weights:
        changes["mixture_weights"] = True
    if shared_blocks:
        changes["shared_blocks"] = shared_blocks
    if parameterization is not None and parameterization != getattr(config, "parameterization", "score"):
        changes.update(parameterization=parameterization, graph=graph or "")
        if parameterization == "posterior" and getattr(config, "scale_by_sigma", False):
            changes["scale_by_sigma"] = False  # SEDD's score shift has no meaning for a conditional's logits
    if not changes:
        student = copy.deepcopy(teacher)
    else:
        if config is None or not dataclasses.is_dataclass(config) or not hasattr(config, "latent_dim"):
            raise TypeError("a mixture or re-parameterised student needs a DiT-like teacher with a dataclass `config`")
        student = type(teacher)(dataclasses.replace(config, **changes))
        if not fresh:
            weights = teacher.state_dict()
            components = getattr(config, "latent_components", 0)
            if components and student.config.latent_components != components:
                weights = _split_components(weights, components, student.config.latent_components)
            _load_source_weights(student, weights, first_new_block=config.n_blocks)
        student.to(model_device(teacher))
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    return student.train()


def freeze(model: nn.Module) -> nn.Module:
    """Put a teacher in eval mode with gradients off; returns it."""
    if isinstance(model, nn.Module):
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    return model
