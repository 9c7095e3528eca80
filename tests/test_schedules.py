import math

import pytest
import torch

from cdm.schedules import GeometricNoise, LogLinearNoise, get_noise

SCHEDULES = [GeometricNoise(), GeometricNoise(1e-4, 5.0), LogLinearNoise(), LogLinearNoise(0.05)]


def test_geometric_endpoints_and_formula():
    noise = GeometricNoise(sigma_min=1e-3, sigma_max=20.0)
    assert noise.total(0.0) == pytest.approx(1e-3, rel=1e-12)
    assert noise.total(1.0) == pytest.approx(20.0, rel=1e-12)
    assert noise.total(0.3) == pytest.approx(1e-3 ** 0.7 * 20.0 ** 0.3, rel=1e-12)


def test_loglinear_masking_probability_is_linear():
    eps = 1e-3
    noise = LogLinearNoise(eps)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    mask_probability = 1 - torch.exp(-noise.total(t))
    torch.testing.assert_close(mask_probability, (1 - eps) * t, rtol=0, atol=1e-12)
    assert noise.total(1.0) == pytest.approx(-math.log(eps), rel=1e-12)


@pytest.mark.parametrize("noise", SCHEDULES, ids=repr)
def test_rate_matches_finite_difference_of_total(noise):
    h = 1e-6
    t = torch.linspace(0.01, 0.99, 23, dtype=torch.float64)
    finite_difference = (noise.total(t + h) - noise.total(t - h)) / (2 * h)
    torch.testing.assert_close(noise.rate(t), finite_difference, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("noise", SCHEDULES, ids=repr)
def test_float_and_tensor_inputs_agree(noise):
    t = torch.tensor([[0.0, 0.25], [0.5, 1.0]], dtype=torch.float32)
    total, rate = noise.total(t), noise.rate(t)
    assert total.shape == t.shape and total.dtype == torch.float32 and rate.shape == t.shape
    assert isinstance(noise.total(0.25), float) and isinstance(noise.rate(1), float)
    assert total[0, 1].item() == pytest.approx(noise.total(0.25), rel=1e-6)
    assert rate[1, 0].item() == pytest.approx(noise.rate(0.5), rel=1e-6)
    assert bool((total[0, 1:] > total[0, :1]).all()) and bool((rate > 0).all())


@pytest.mark.parametrize("bad", [-0.1, 1.5, torch.tensor([0.5, 1.01]), torch.tensor([float("nan")])])
def test_time_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match="t must"):
        GeometricNoise().total(bad)
    with pytest.raises(ValueError, match="t must"):
        LogLinearNoise().rate(bad)


@pytest.mark.parametrize("bad", [torch.tensor([0, 1]), "0.5", None, True])
def test_time_of_wrong_type_is_rejected(bad):
    with pytest.raises(TypeError, match="t must"):
        LogLinearNoise().total(bad)


def test_constructor_validation():
    with pytest.raises(ValueError, match="sigma_min"):
        GeometricNoise(sigma_min=0.0)
    with pytest.raises(ValueError, match="sigma_max"):
        GeometricNoise(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="eps"):
        LogLinearNoise(eps=1.0)


def test_get_noise_factory():
    noise = get_noise("geometric", sigma_min=0.01, sigma_max=2.0)
    assert isinstance(noise, GeometricNoise) and noise.sigma_max == 2.0
    assert isinstance(get_noise("loglinear"), LogLinearNoise)
    with pytest.raises(ValueError, match="name"):
        get_noise("cosine")
