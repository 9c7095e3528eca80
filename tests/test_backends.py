import os

import pytest
import torch

import cdm_kernels as ck


def test_reference_is_always_available_and_default_is_first():
    backends = ck.available_backends("cpu")
    assert "reference" in backends
    assert backends[0] == ("cpp" if "cpp" in backends else "reference")
    assert "cuda" not in backends


@pytest.mark.skipif(os.environ.get("CDM_KERNELS_REQUIRE_CPP") != "1", reason="only where the build is required (CI)")
def test_the_cpp_extension_was_built():
    assert "cpp" in ck.available_backends("cpu")


def test_triton_on_cpu_only_under_the_interpreter():
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert ("triton" in ck.available_backends("cpu")) == (interpreted and ck.backends._TRITON_ERROR is None and ck.backends._triton_ops_loaded())


def test_default_backend_agrees_with_reference():
    graph = ck.UniformGraph(13)
    log_score, x = torch.randn(4, 13, dtype=torch.float64), torch.randint(0, 13, (4,))
    assert torch.allclose(
        ck.scores_to_posterior(graph, log_score, x, 0.4), ck.scores_to_posterior(graph, log_score, x, 0.4, backend="reference")
    )
