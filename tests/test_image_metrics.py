"""image_metrics.py: the Frechet distance against a closed form, the classifier and its cache,
label histograms and TV, and SampleMetric judged against its real-data floor: the floor's
spread is reported and honest (bootstrap draws, not overlapping subsets), real digits at the
floor's n score within floor +- 3 sd, and samples at another n, noisy or blurred digits do
not.

The classifier is trained for 200 steps (a few tenths of a second); the digits' 1,348
training images give n = 1,000, the default."""
import numpy as np
import pytest
import torch
from torch import nn

import image_metrics
from image_data import load_images
from image_metrics import SampleMetric


@pytest.fixture(scope="module")
def digits():
    return load_images("digits")


@pytest.fixture(scope="module")
def metric(digits):
    return SampleMetric(*digits, steps=200)


@pytest.fixture(scope="module")
def metric500(digits):
    """The metric as train_mcmc.py builds it (600 classifier steps), at n = 500."""
    return SampleMetric(*digits, n=500)


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


# ----------------------------------------------------------------------------- FD, classifier
def test_frechet_distance_matches_matrix_square_root():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 12)), 1.3 * rng.normal(size=(300, 12)) + 0.2
    (m1, s1), (m2, s2) = [(v.mean(0), np.cov(v, rowvar=False)) for v in (a, b)]
    ref = (m1 - m2) @ (m1 - m2) + np.trace(s1 + s2 - 2 * np.real(linalg.sqrtm(s1 @ s2)))
    assert image_metrics.frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-9)
    assert abs(image_metrics.frechet_distance(m1, s1, m1, s1)) < 1e-9


@pytest.mark.slow
def test_metric_floor_real_noise_blur(digits, metric500):
    x_train, _, x_test, _ = digits
    floor = metric500.floor
    assert metric500.test_accuracy > 0.95
    # other real digits (a subset the floor did not fix) score near the floor
    real = metric500(x_train[torch.from_numpy(np.random.default_rng(7).permutation(1348)[:500])])
    assert real["fd"] < 1.5 * floor["fd"] and real["fd_pixels"] < 1.5 * floor["fd_pixels"]
    assert real["label_tv"] < 0.15
    # uniform noise and heavily blurred digits score far worse
    torch.manual_seed(0)
    noise = metric500(2 * torch.rand(500, 64) - 1)
    k = torch.exp(-torch.arange(-3.0, 4.0) ** 2 / (2 * 1.5 ** 2))
    k = (k[:, None] * k[None, :] / k.sum() ** 2)[None, None]
    img = x_train[:500].reshape(-1, 1, 8, 8)
    blurred = nn.functional.conv2d(nn.functional.pad(img, (3,) * 4, mode="replicate"), k)
    blur = metric500(blurred.reshape(500, 64))
    for bad in (noise, blur):
        assert bad["fd"] > 20 * floor["fd"] and bad["fd_pixels"] > 10 * floor["fd_pixels"]
    # one class only: covers nothing else
    threes = x_train[digits[1] == 3]
    assert metric500(threes[torch.arange(500) % len(threes)])["label_tv"] > 0.8


@pytest.mark.slow
def test_metric_is_deterministic_clamps_and_drops_nonfinite(digits, metric500, monkeypatch):
    monkeypatch.setattr(image_metrics, "_CLASSIFIERS", {})  # train the classifier again
    torch.manual_seed(99)  # whatever the global RNG state
    again = SampleMetric(*digits, n=500)
    assert again.clf is not metric500.clf and again.floor == metric500.floor
    assert again.floor_sd == metric500.floor_sd
    x = digits[0][:500].clone()
    assert metric500(x) == again(x)
    # scored as the image shows: pixels beyond [-1, 1] count as -1 / 1
    assert metric500(3 * x) == metric500((3 * x).clamp(-1, 1))
    x[:5] = float("nan")
    m = metric500(x)
    assert m["n_nonfinite"] == 5 and np.isfinite(m["fd"])


def test_label_histogram_and_total_variation_have_their_closed_forms():
    """Fractions of labels 0-9 (labels beyond the bins dropped, so the histogram may sum to
    less than one), and TV = 1/2 sum |p - q|: 0 for equal histograms, 1 for disjoint ones."""
    h = image_metrics.label_histogram([0, 0, 3, 9, 12])
    assert h.tolist() == [0.4, 0, 0, 0.2, 0, 0, 0, 0, 0, 0.2]
    assert image_metrics.total_variation(h, h) == 0.0
    assert image_metrics.total_variation([1, 0, 0], [0, 0.5, 0.5]) == 1.0
    assert image_metrics.total_variation([0.5, 0.5], [0.8, 0.2]) == pytest.approx(0.3)


def test_one_classifier_per_setting_trained_once(digits, monkeypatch):
    """cached_classifier trains once per (data, seed, steps, noise) and returns that network
    after; another setting is another network. Its labels are the argmax of its logits and its
    accuracy the share of rows it labels right."""
    monkeypatch.setattr(image_metrics, "_CLASSIFIERS", {})
    x, y = digits[0], digits[1]
    a = image_metrics.cached_classifier(x, y, seed=0, steps=50)
    assert image_metrics.cached_classifier(x, y, seed=0, steps=50) is a
    b = image_metrics.cached_classifier(x, y, seed=0, steps=50, noise=0.0)
    assert b is not a and len(image_metrics._CLASSIFIERS) == 2
    with torch.no_grad():
        assert torch.equal(a.predict(x), a(x).argmax(1))
    pred = a.predict(x)
    assert a.accuracy(x, pred) == 1.0
    assert a.accuracy(x, y) == pytest.approx(float((pred == y).double().mean()))

