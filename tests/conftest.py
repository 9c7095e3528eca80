"""Test-wide setup. Triton's interpreter must be chosen before triton is
imported: without a GPU, the Triton kernels run on CPU tensors under it."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # one config per N, not autotuning: the Triton tests compile each kernel once, not seven times
    os.environ.setdefault("CDM_KERNELS_TRITON_AUTOTUNE", "0")
os.environ.setdefault("CDM_KERNELS_QUIET", "1")

import cdm_kernels  # noqa: E402  (after the environment above)

# The fast CPU backends every op test runs on; Triton (interpreted, slow) has
# its own test file.
CPU_BACKENDS = [b for b in ("reference", "cpp") if b in cdm_kernels.available_backends("cpu")]


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", CPU_BACKENDS)


@pytest.fixture(scope="module")
def study():
    """The exact study (tests/study.py), built once per module."""
    from study import make_study

    return make_study()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: thread start-up and oversubscription would dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
