"""The class-imbalanced digits of the tilted-VAE experiment (train_tilt.py): the "biased" /
"unbiased" split, the label classifier's settings and the experiment's metric, the TV distance
of a label histogram to the uniform distribution over the kept digits.

    X, y = image_data.load_digits_data()            # (1797, 64) in [0, 1], labels 0-9
    split = biased_unbiased_split(y, rng, per_class=10)
    X[split.biased], X[split.unbiased]
    clf, accuracy = label_classifier(X, y, rng, seed, steps=1000)
    tv_to_uniform(clf.predict(images).numpy())

The biased set keeps digits 0-4 with class proportions BIASED_PROPORTIONS of half of the
available images of digits 0-4 (counts by largest-remainder rounding, so they sum exactly);
the unbiased set takes an equal number per class from the images of digits 0-4 left over.
Indices are shuffled (per class, by `rng`) before any truncation.
"""
from types import SimpleNamespace

import numpy as np
import torch

from image_metrics import cached_classifier, label_histogram, total_variation

CLASSES = (0, 1, 2, 3, 4)
BIASED_PROPORTIONS = {0: 0.12, 1: 0.33, 2: 0.28, 3: 0.20, 4: 0.07}


# ----------------------------------------------------------------------------- splits
def biased_counts(n, proportions=BIASED_PROPORTIONS):
    """Per-class counts summing exactly to n: floor(p n), then +1 for the largest remainders."""
    classes = sorted(proportions)
    raw = np.array([proportions[c] * n for c in classes])
    counts = np.floor(raw + 1e-9).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return dict(zip(classes, counts.tolist()))


def biased_unbiased_split(y, rng, per_class=None, proportions=BIASED_PROPORTIONS, frac=0.5):
    """Index sets (into y) of the biased and the unbiased set, which never overlap.

    biased: digits in `proportions` with those class proportions, frac x (number of images of
        those digits) in all.
    unbiased: `per_class` images of each of those digits from the ones left over; None takes
        all that the scarcest class allows.
    Returns a namespace with .biased, .unbiased, .rest (every other index), .biased_counts and
    .per_class. Raises ValueError when the data cannot supply the requested counts."""
    y = np.asarray(y)
    classes = sorted(proportions)
    n_avail = {c: int((y == c).sum()) for c in classes}
    n_biased = int(frac * sum(n_avail.values()))
    counts = biased_counts(n_biased, proportions)
    perm = rng.permutation(len(y))  # shuffle before any truncation
    biased, leftover = [], {}
    for c in classes:
        idx = perm[y[perm] == c]
        if counts[c] > len(idx):
            raise ValueError(f"class {c}: the biased set needs {counts[c]} images, the data has "
                             f"{len(idx)}")
        biased.append(idx[: counts[c]])
        leftover[c] = idx[counts[c]:]
    most = min(len(v) for v in leftover.values())
    if per_class is None:
        per_class = most
    if not 0 < per_class <= most:
        raise ValueError(f"--per_class={per_class}: the images left over allow 1 to {most} "
                         f"per class")
    unbiased = [leftover[c][:per_class] for c in classes]
    biased, unbiased = np.concatenate(biased), np.concatenate(unbiased)
    used = np.zeros(len(y), bool)
    used[biased] = used[unbiased] = True
    return SimpleNamespace(biased=rng.permutation(biased), unbiased=rng.permutation(unbiased),
                           rest=np.flatnonzero(~used), biased_counts=counts,
                           per_class=per_class)


# ----------------------------------------------------------------------------- labels
def tv_to_uniform(labels, classes=CLASSES, n_classes=10):
    """Total-variation distance between the label histogram and the uniform distribution over
    `classes`; labels outside `classes` count fully as error."""
    target = np.zeros(n_classes)
    target[list(classes)] = 1.0 / len(classes)
    return total_variation(label_histogram(labels, n_classes), target)


def label_classifier(X, y, rng, seed, steps, test_frac=0.25, max_train=10000):
    """The classifier that labels generated images: image_metrics.cached_classifier on all ten
    digits, `steps` Adam steps without input noise (most images it labels are decoded means),
    trained on at most `max_train` of the images left after holding out a quarter (a
    permutation drawn from `rng`). Returns (classifier, its accuracy on the held-out quarter)."""
    perm = rng.permutation(len(y))
    n_test = int(test_frac * len(y))
    test, train = perm[:n_test], perm[n_test:][:max_train]
    X, y = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y)
    clf = cached_classifier(X[train], y[train], seed=seed, steps=steps, noise=0.0)
    return clf, clf.accuracy(X[test], y[test])
