"""Score networks: a SEDD-style DiT and SEDD hub-checkpoint compatibility."""

from .dit import PRESETS, DiT, DiTConfig
from .sedd import (dit_config_from_sedd, load_sedd_checkpoint, save_sedd_checkpoint, sedd_config,
                   sedd_noise_schedule)

__all__ = ["DiT", "DiTConfig", "PRESETS", "load_sedd_checkpoint", "save_sedd_checkpoint", "sedd_config",
           "dit_config_from_sedd", "sedd_noise_schedule"]
