"""mcmc_images.SampleMetric judged against its real-data floor: the floor's spread is reported
and honest (bootstrap draws, not overlapping subsets), real digits at the floor's n score
within floor +- 3 sd, and samples at another n, noisy or blurred digits do not.

The classifier is trained for 200 steps (a few tenths of a second); the digits' 1,348
training images give n = 1,000, the default."""
import numpy as np
import pytest
import torch
from torch import nn

from mcmc_images import SampleMetric, load_images


@pytest.fixture(scope="module")
def digits():
    return load_images("digits")


@pytest.fixture(scope="module")
def metric(digits):
    return SampleMetric(*digits, steps=200)


def fresh_draw(x, n, seed):
    """n real training digits, drawn with replacement with a seed the floor did not use."""
    return x[torch.from_numpy(np.random.default_rng(seed).integers(len(x), size=n))]


def within(metric, m, k=3.0):
    return abs(m["fd"] - metric.floor["fd"]) <= k * metric.floor_sd["fd"]


@pytest.mark.slow
def test_floor_reports_its_spread(metric):
    assert metric.n == 1000 and metric.n_floor >= 10
    for key in SampleMetric.KEYS:
        assert metric.floor_sd[key] > 0
    assert 0.05 < metric.floor_sd["fd"] / metric.floor["fd"] < 0.6
    line = metric.describe()
    assert f"{metric.floor['fd']:.2f} +- {metric.floor_sd['fd']:.2f}" in line and "n = 1000" in line


def test_real_digits_at_n_score_within_the_floor(digits, metric):
    x_train = digits[0]
    for seed in (11, 12, 13):
        m = metric(fresh_draw(x_train, metric.n, seed))
        assert within(metric, m), (m["fd"], metric.floor, metric.floor_sd)
        assert m["fd_ratio"] == pytest.approx(m["fd"] / metric.floor["fd"])
        assert m["fd_ratio"] == pytest.approx(metric.ratio(m["fd"]))
        assert abs(m["label_tv"] - metric.floor["label_tv"]) <= 3 * metric.floor_sd["label_tv"]


def test_samples_at_another_n_are_refused(digits, metric):
    x_train = digits[0]
    with pytest.raises(ValueError, match="n=100"):
        metric(fresh_draw(x_train, 100, 11))
    # the refusal matters: real digits at n = 100 score far above the n = 1000 floor
    small = SampleMetric(*digits, n=100, steps=200)
    assert small.floor["fd"] > metric.floor["fd"] + 3 * metric.floor_sd["fd"]
    assert small(fresh_draw(x_train, 100, 11))["n_nonfinite"] == 0


def test_noisy_and_blurred_digits_score_above_the_floor(digits, metric):
    x = fresh_draw(digits[0], metric.n, 11)
    torch.manual_seed(0)
    noisy = metric(x + 0.3 * torch.randn_like(x))  # about 2.4 grey levels of noise
    k = torch.exp(-torch.arange(-2.0, 3.0) ** 2 / (2 * 0.8 ** 2))
    k = (k[:, None] * k[None, :] / k.sum() ** 2)[None, None]
    img = nn.functional.pad(x.reshape(-1, 1, 8, 8), (2,) * 4, mode="replicate")
    blurred = metric(nn.functional.conv2d(img, k).reshape(len(x), 64))
    for bad in (noisy, blurred):
        assert not within(metric, bad) and bad["fd_ratio"] > 2, bad


def test_subsets_without_replacement_would_understate_the_spread(digits, metric):
    """Why the floor draws with replacement: 1,000 of 1,348 digits without replacement
    overlap by ~742 images, and their FD varies about half as much."""
    x_train = digits[0]
    rng = np.random.default_rng(0)
    fds = [metric(x_train[torch.from_numpy(rng.permutation(len(x_train))[:metric.n])])["fd"]
           for _ in range(metric.n_floor)]
    assert np.std(fds, ddof=1) < 0.75 * metric.floor_sd["fd"]
