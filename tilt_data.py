"""Images for the tilting experiments: scikit-learn's 8x8 digits (offline, the default) or local
MNIST IDX files, and the class-imbalanced "biased" / class-balanced "unbiased" splits.

    X, y = load_digits_data()                       # (1797, 64) in [0, 1], labels 0-9
    X, y = load_mnist_idx("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    split = biased_unbiased_split(y, rng, per_class=10)
    X[split.biased], X[split.unbiased]

The biased set keeps digits 0-4 with class proportions BIASED_PROPORTIONS of half of the
available images of digits 0-4 (counts by largest-remainder rounding, so they sum exactly);
the unbiased set takes an equal number per class from the images of digits 0-4 left over.
Indices are shuffled (per class, by `rng`) before any truncation.
"""
import gzip
import os
from types import SimpleNamespace

import numpy as np

CLASSES = (0, 1, 2, 3, 4)
BIASED_PROPORTIONS = {0: 0.12, 1: 0.33, 2: 0.28, 3: 0.20, 4: 0.07}


# ----------------------------------------------------------------------------- loading
def load_digits_data():
    """scikit-learn's 8x8 digits (1,797 images), pixel values 0-16 divided by 16."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def _open(path):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx(path):
    """An IDX file (LeCun's MNIST format, optionally .gz) as a numpy uint8 array.

    Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    then one big-endian uint32 per dimension."""
    with _open(path) as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported "
                         f"(type code {data[2]:#x})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    n = int(np.prod(shape)) if shape else 0
    if len(data) - offset != n:
        raise ValueError(f"{path}: header says {n} values, file holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def write_idx(path, array):
    """Write a uint8 array as an IDX file (used by the tests to make a small MNIST)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape)
    with open(path, "wb") as fh:
        fh.write(header + array.tobytes())


def load_mnist_idx(images_path, labels_path):
    """Local MNIST IDX files -> (N, H*W) float32 in [0, 1] and (N,) int64 labels."""
    for p in (images_path, labels_path):
        if not p or not os.path.isfile(p):
            raise FileNotFoundError(f"MNIST IDX file {p!r} not found; pass existing files to "
                                    f"--mnist_images and --mnist_labels (no download at run time)")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"expected images (N, H, W) and labels (N,), got {images.shape} and "
                         f"{labels.shape}")
    return (images.reshape(len(images), -1) / 255.0).astype(np.float32), labels.astype(np.int64)


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
def label_histogram(labels, n_classes=10):
    """Fraction of each label 0..n_classes-1."""
    labels = np.asarray(labels)
    return np.bincount(labels, minlength=n_classes)[:n_classes] / max(len(labels), 1)


def tv_to_uniform(labels, classes=CLASSES, n_classes=10):
    """Total-variation distance between the label histogram and the uniform distribution over
    `classes`; labels outside `classes` count fully as error."""
    h = label_histogram(labels, n_classes)
    target = np.zeros(n_classes)
    target[list(classes)] = 1.0 / len(classes)
    return 0.5 * float(np.abs(h - target).sum())


def train_classifier(X, y, rng, test_frac=0.25, max_train=10000, max_iter=1000):
    """Multinomial logistic regression on all ten digits (a held-out quarter gives its test
    accuracy); it labels decoded samples. Returns (classifier, test accuracy)."""
    from sklearn.linear_model import LogisticRegression

    perm = rng.permutation(len(y))
    n_test = int(test_frac * len(y))
    test, train = perm[:n_test], perm[n_test:][:max_train]
    clf = LogisticRegression(max_iter=max_iter, C=1.0)
    clf.fit(X[train], y[train])
    return clf, float((clf.predict(X[test]) == y[test]).mean())
