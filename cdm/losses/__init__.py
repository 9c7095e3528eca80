"""Training losses: SEDD's score entropy (teacher pre-training), the two forms
of exact conditional distribution matching (distillation), and the two peer
distillation methods: Di4C (``di4c``, a mixture student) and D-MMD (``dmmd``,
a generator with an auxiliary model: ``DMMDLoss`` is an ``nn.Module`` holding
that model and its optimiser, which the Trainer checkpoints under ``loss.``).

``get_loss(name, graph, noise, teacher=None, **options)`` returns a callable
``loss_fn(model, x0, generator=None) -> scalar`` with the options bound, so a
training loop needs no knowledge of which loss it runs.
"""

from __future__ import annotations

import functools

from ..models.student import freeze
from .cdm import ExactTargets, joint_cdm_loss, per_token_cdm_loss
from .di4c import di4c_loss
from .dmmd import DMMDLoss
from .score_entropy import score_entropy, score_entropy_loss

__all__ = [
    "score_entropy",
    "score_entropy_loss",
    "per_token_cdm_loss",
    "joint_cdm_loss",
    "ExactTargets",
    "di4c_loss",
    "DMMDLoss",
    "get_loss",
    "LOSSES",
]

LOSSES = ("score_entropy", "cdm_per_token", "cdm_joint", "di4c", "dmmd")


def get_loss(name: str, graph, noise, teacher=None, **options):
    """``loss_fn(model, x0, generator=None)`` for ``name`` in ``LOSSES``; ``options``
    are the keyword options of the underlying loss. The distillation losses need ``teacher``;
    ``di4c`` wants a mixture student (``cdm.models.make_student(teacher, latent_dim=...)``); ``dmmd``
    returns a ``DMMDLoss`` module (options: its keyword arguments, e.g. ``steps``, ``aux_lr``)."""
    if name == "score_entropy":
        if teacher is not None:
            raise ValueError("score_entropy trains a teacher from data: teacher must be None")
        fn = functools.partial(score_entropy_loss, graph=graph, noise=noise, **options)
        return lambda model, x0, generator=None: fn(model, x0=x0, generator=generator)
    if name in ("cdm_per_token", "cdm_joint"):
        if teacher is None:
            raise ValueError(f"{name} distils a teacher: pass teacher=")
        freeze(teacher)
        loss = per_token_cdm_loss if name == "cdm_per_token" else joint_cdm_loss
        return lambda model, x0, generator=None: loss(model, teacher, graph, noise, x0, generator=generator, **options)
    if name == "di4c":
        if teacher is None:
            raise ValueError(f"{name} distils a teacher: pass teacher=")
        freeze(teacher)
        return lambda model, x0, generator=None: di4c_loss(model, teacher, graph, noise, x0, generator=generator,
                                                           **options)
    if name == "dmmd":
        if teacher is None:
            raise ValueError(f"{name} distils a teacher: pass teacher=")
        return DMMDLoss(teacher, graph, noise, **options)
    raise ValueError(f"name must be one of {LOSSES}, got {name!r}")
