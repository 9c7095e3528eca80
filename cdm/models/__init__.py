"""Score networks: a SEDD-style DiT, SEDD hub-checkpoint compatibility, and
distillation students built from a teacher."""

from .dit import PRESETS, DiT, DiTConfig
from .sedd import (dit_config_from_sedd, load_sedd_checkpoint, save_sedd_checkpoint, sedd_config,
                   sedd_noise_schedule)
from .student import freeze, make_student

__all__ = ["DiT", "DiTConfig", "PRESETS", "load_sedd_checkpoint", "save_sedd_checkpoint", "sedd_config",
           "dit_config_from_sedd", "sedd_noise_schedule", "make_student", "freeze"]
