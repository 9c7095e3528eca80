"""cdm: a thin trainer for distilling discrete diffusion models into few-step samplers.

Subpackages and modules (import them directly; nothing heavy is imported here):
``cdm.data`` (toy and small real data sets), ``cdm.models`` (SEDD-style DiT and
SEDD checkpoint loading), ``cdm.schedules`` (noise schedules), ``cdm.metrics``
(exact and sample-based quality metrics), ``cdm.checkpoint`` (atomic safetensors
checkpoints).
"""

__version__ = "0.1.0"
