"""The class-imbalanced digits of the tilt experiment (imbalance.py): the biased / unbiased
split, the TV of a label histogram to uniform over 0-4, the label classifier's settings."""
import numpy as np
import pytest
import torch

import image_data
import image_metrics
import imbalance


@pytest.fixture(scope="module")
def digits():
    return image_data.load_digits_data()


@pytest.mark.parametrize("per_class", [10, None])
def test_split_counts_and_disjoint(digits, per_class):
    X, y = digits
    assert X.shape == (1797, 64) and 0 <= X.min() and X.max() == 1.0
    s = imbalance.biased_unbiased_split(y, np.random.default_rng(0), per_class=per_class)
    n04 = int(np.isin(y, imbalance.CLASSES).sum())
    assert len(s.biased) == n04 // 2 == 450
    counts = np.bincount(y[s.biased], minlength=10)
    for c, p in imbalance.BIASED_PROPORTIONS.items():
        assert counts[c] == s.biased_counts[c]
        assert abs(counts[c] - p * 450) <= 1
    assert counts[5:].sum() == 0
    # unbiased: equal per class, digits 0-4 only; "all" is what the scarcest leftover allows
    ucounts = np.bincount(y[s.unbiased], minlength=10)
    expected = per_class or min(int((y == c).sum()) - s.biased_counts[c] for c in imbalance.CLASSES)
    assert list(ucounts[:5]) == [expected] * 5 and ucounts[5:].sum() == 0
    assert not set(s.biased) & set(s.unbiased)
    assert len(set(s.biased) | set(s.unbiased) | set(s.rest)) == len(y)


def test_split_is_shuffled_and_seeded(digits):
    _, y = digits
    a = imbalance.biased_unbiased_split(y, np.random.default_rng(1), per_class=10)
    b = imbalance.biased_unbiased_split(y, np.random.default_rng(1), per_class=10)
    c = imbalance.biased_unbiased_split(y, np.random.default_rng(2), per_class=10)
    assert np.array_equal(a.biased, b.biased)
    assert not np.array_equal(np.sort(a.biased), np.sort(c.biased))
    # shuffling before truncation: not simply the first images of each class
    first = np.concatenate([np.flatnonzero(y == k)[:n] for k, n in a.biased_counts.items()])
    assert not np.array_equal(np.sort(a.biased), np.sort(first))


def test_split_rejects_impossible_per_class(digits):
    _, y = digits
    with pytest.raises(ValueError, match="per_class"):
        imbalance.biased_unbiased_split(y, np.random.default_rng(0), per_class=1000)


def test_tv_to_uniform():
    assert imbalance.tv_to_uniform([0, 1, 2, 3, 4] * 10) == pytest.approx(0.0)
    assert imbalance.tv_to_uniform([7] * 10) == pytest.approx(1.0)
    assert imbalance.tv_to_uniform([0] * 10) == pytest.approx(0.8)


def test_label_classifier_is_the_metrics_classifier_on_its_own_split(digits, monkeypatch):
    """The tilt's labels come from image_metrics' one classifier (cached: a second call trains
    nothing), trained without input noise on the images outside a held-out quarter, the
    quarter drawn from rng; the accuracy is on that quarter, and high."""
    monkeypatch.setattr(image_metrics, "_CLASSIFIERS", {})
    X, y = digits
    clf, acc = imbalance.label_classifier(X, y, np.random.default_rng(3), seed=0, steps=300)
    perm = np.random.default_rng(3).permutation(len(y))
    test, train = perm[: len(y) // 4], perm[len(y) // 4:]
    assert isinstance(clf, image_metrics.Classifier) and len(image_metrics._CLASSIFIERS) == 1
    x_t, y_t = torch.as_tensor(X), torch.as_tensor(y)
    assert image_metrics.cached_classifier(x_t[train], y_t[train], seed=0, steps=300,
                                           noise=0.0) is clf
    assert acc == clf.accuracy(x_t[test], y_t[test]) and acc > 0.9
    again, _ = imbalance.label_classifier(X, y, np.random.default_rng(3), seed=0, steps=300)
    assert again is clf and len(image_metrics._CLASSIFIERS) == 1
