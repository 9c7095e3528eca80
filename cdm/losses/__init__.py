"""Training losses: SEDD's score entropy (teacher pre-training) and the two forms
of exact conditional distribution matching (distillation).

``get_loss(name, graph, noise, teacher=None, **options)`` returns a callable
``loss_fn(model, x0, generator=None) -> scalar`` with the options bound, so a
training loop needs no knowledge of which loss it runs.
"""

from __future__ import annotations

import functools

from .cdm import freeze, joint_cdm_loss, make_student, per_token_cdm_loss, sample_times, teacher_chain
from .score_entropy import kernel_ratios, score_entropy, score_entropy_loss

__all__ = [
    "score_entropy",
    "score_entropy_loss",
    "kernel_ratios",
    "per_token_cdm_loss",
    "joint_cdm_loss",
    "make_student",
    "freeze",
    "sample_times",
    "teacher_chain",
    "get_loss",
    "LOSSES",
]

LOSSES = ("score_entropy", "cdm_per_token", "cdm_joint")


def get_loss(name: str, graph, noise, teacher=None, **options):
    """``loss_fn(model, x0, generator=None)`` for ``name`` in ``LOSSES``; ``options``
    are the keyword options of the underlying loss. The CDM losses need ``teacher``."""
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
    raise ValueError(f"name must be one of {LOSSES}, got {name!r}")
