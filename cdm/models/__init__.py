"""Score networks: a SEDD-style DiT, the checkpoint layouts of SEDD, MDLM and DUO, and
distillation students built from a teacher."""

from .dit import PRESETS, DiT, DiTConfig
from .mdlm import denoiser_config, dit_config_from_denoiser, load_denoiser_checkpoint, save_denoiser_checkpoint
from .pretrained import Pretrained, checkpoint_layout, layout_of, load_pretrained, save_pretrained
from .sedd import (dit_config_from_sedd, load_sedd_checkpoint, save_sedd_checkpoint, sedd_config,
                   sedd_noise_schedule)
from .student import freeze, make_student

__all__ = ["DiT", "DiTConfig", "PRESETS", "load_sedd_checkpoint", "save_sedd_checkpoint", "sedd_config",
           "dit_config_from_sedd", "sedd_noise_schedule", "denoiser_config", "dit_config_from_denoiser",
           "load_denoiser_checkpoint", "save_denoiser_checkpoint", "Pretrained", "checkpoint_layout",
           "load_pretrained", "save_pretrained", "layout_of", "make_student", "freeze"]
