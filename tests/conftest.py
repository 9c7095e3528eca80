"""Test-wide setup. Triton's interpreter must be chosen before triton is
imported: without a GPU, the Triton kernels run on CPU tensors under it."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CDM_KERNELS_QUIET", "1")
