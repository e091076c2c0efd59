import math

import numpy as np
import pytest
import torch

from hf_hyperflow.stats import mean_confidence_interval, paired_difference


def test_known_sample():
    # mean 2.5; population variance ((1.5^2 + 0.5^2) * 2) / 4 = 1.25; half width 1.96 * sqrt(1.25) / 2
    mean, half = mean_confidence_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert half == pytest.approx(1.0956733, abs=1e-7)
    assert half == pytest.approx(1.96 * math.sqrt(1.25) / 2, rel=1e-15)


def test_two_values_and_custom_z():
    # mean 0.6, population std 0.1, n = 2
    mean, half = mean_confidence_interval(np.array([0.5, 0.7]), z=2.0)
    assert mean == pytest.approx(0.6, abs=1e-15)
    assert half == pytest.approx(2.0 * 0.1 / math.sqrt(2.0), rel=1e-12)


def test_population_std_not_sample_std():
    values = [0.0, 0.0, 6.0]  # population std sqrt(8), sample std sqrt(12)
    _, half = mean_confidence_interval(values, z=1.0)
    assert half == pytest.approx(math.sqrt(8.0) / math.sqrt(3.0), rel=1e-12)


def test_single_value_and_constant_values():
    assert mean_confidence_interval([0.73]) == (0.73, 0.0)
    assert mean_confidence_interval([5, 5, 5]) == (5.0, 0.0)


def test_accepts_arrays_tensors_and_returns_floats():
    mean, half = mean_confidence_interval(torch.tensor([1.0, 3.0]))
    assert type(mean) is float and type(half) is float
    assert (mean, half) == pytest.approx((2.0, 1.96 * 1.0 / math.sqrt(2.0)))


def test_errors():
    with pytest.raises(ValueError, match=r"values is empty: a confidence interval needs at least one value"):
        mean_confidence_interval([])
    with pytest.raises(
        ValueError, match=r"values must be 1-D \(one number per episode\), got shape \(2, 2\)"
    ):
        mean_confidence_interval([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(ValueError, match=r"values must all be finite, got \[nan\]"):
        mean_confidence_interval([1.0, float("nan")])
    with pytest.raises(
        ValueError, match=r"z must be a finite number >= 0 \(1.96 for a 95% interval\), got -1.0"
    ):
        mean_confidence_interval([1.0], z=-1.0)
    with pytest.raises(ValueError, match=r"values must be a 1-D sequence of numbers, got list"):
        mean_confidence_interval(["a", "b"])


def test_paired_difference_known_answer():
    # differences 1, 1, 4: mean 2, population std sqrt(2)
    mean, half = paired_difference([2.0, 3.0, 9.0], [1.0, 2.0, 5.0])
    assert mean == pytest.approx(2.0, rel=1e-15)
    assert half == pytest.approx(1.96 * math.sqrt(2.0) / math.sqrt(3.0), rel=1e-12)


def test_paired_difference_is_narrower_than_unpaired_for_correlated_episodes():
    rng = np.random.default_rng(0)
    hardness = rng.uniform(40, 100, size=200)
    baseline = hardness + rng.normal(0, 1, size=200)
    method = hardness + 2 + rng.normal(0, 1, size=200)
    mean, half = paired_difference(method, baseline)
    assert 1.5 < mean < 2.5
    assert half < mean_confidence_interval(method)[1] / 5


def test_paired_difference_errors():
    with pytest.raises(ValueError, match=r"paired values need the same episodes: got shapes \(2,\) and \(3,\)"):
        paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"values must all be finite"):
        paired_difference([1.0, float("inf")], [1.0, 2.0])
