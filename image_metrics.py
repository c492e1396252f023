"""How good image samples are: the Frechet distance (Heusel et al. 2017, "FID") between
Gaussian fits of features of samples and of the held-out test images, label histograms and
their total-variation distance, and the one label classifier both come from.

    metric = SampleMetric(x_train, y_train, x_test, y_test)         # image_data.load_images
    metric(x_samples)  # 1,000 rows -> {"fd", "fd_pixels", "label_tv", "fd_ratio", ...}
    metric.floor["fd"], metric.floor_sd["fd"]   # what 1,000 real digits score, its spread
    clf = cached_classifier(x, y, seed=0, steps=600)                 # trained once per process
    clf.predict(x)                                                   # labels of images

The metric: FD = |mu_s - mu_r|^2 + tr(S_s + S_r - 2 (S_s S_r)^(1/2)), with features from the
penultimate layer of a small MLP classifier trained on the training split (and the same
distance on raw pixels, 2x2-pooled for 28px MNIST), plus the total-variation distance between
the classifier's predicted-label histogram of the samples and the test labels' histogram
(label coverage). Samples are clamped to [-1, 1] (what the image shows) before scoring. Its
floor is the mean score of n training images drawn with replacement, with its spread (sd over
the draws; SampleMetric); FD grows with fewer samples, so samples are always scored at the
floor's n (`SampleMetric.n`, 1,000 by default).

The classifier labels samples wherever a label is needed: the metric's features and label
histogram, and the tilted-VAE experiment's labels of decoded images (imbalance.py passes its
own steps and split; `cached_classifier` trains each setting once per process).
"""
import hashlib
import math

import numpy as np
import torch
from torch import nn

import util


def frechet_distance(mu1, s1, mu2, s2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    tr (S1 S2)^(1/2) = tr (A S2 A)^(1/2) with A = S1^(1/2) (same eigenvalues), and A S2 A is
    symmetric PSD: two symmetric eigendecompositions, exact and fast also for rank-deficient
    covariances (fewer samples than dimensions), unlike a general matrix square root."""
    diff = mu1 - mu2
    w, V = np.linalg.eigh(s1)
    A = (V * np.sqrt(np.clip(w, 0, None))) @ V.T
    ev = np.linalg.eigvalsh(A @ s2 @ A)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _stats(f):
    """Mean and covariance (float64) of the rows f: the Gaussian fit FD compares."""
    f = np.asarray(f, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def label_histogram(labels, n_classes=10):
    """Fraction of each label 0..n_classes-1 (labels outside are dropped from the bins)."""
    labels = np.asarray(labels)
    return np.bincount(labels, minlength=n_classes)[:n_classes] / max(len(labels), 1)


def total_variation(p, q):
    """TV(p, q) = 1/2 sum_i |p_i - q_i| of two histograms."""
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


class Classifier(nn.Module):
    """MLP D-256-64-10 (ReLU); `features` is the 64-d penultimate layer."""

    def __init__(self, dim):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))

    @torch.no_grad()
    def predict(self, x):
        """The most probable label of each row of x."""
        return self(x).argmax(1)

    def accuracy(self, x, y):
        """The share of the rows of x labelled y."""
        return float((self.predict(x) == y).float().mean())


def train_classifier(x, y, seed=0, steps=600, batch=256, noise=0.05):
    """Train the feature classifier on (x, y) with Adam; deterministic for a fixed seed
    (its own generator and util.fixed_rng: the global random streams are untouched). Gaussian pixel noise of std `noise` is
    added to the inputs, as the samples carry Langevin noise."""
    g = torch.Generator().manual_seed(seed)
    with util.fixed_rng(seed):  # every random stream, on every device, restored afterwards
        clf = Classifier(x.shape[1])
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(len(x), (min(batch, len(x)),), generator=g)
        xb = x[idx] + noise * torch.randn(len(idx), x.shape[1], generator=g)
        loss = nn.functional.cross_entropy(clf(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval()


_CLASSIFIERS = {}  # (data hash, settings) -> trained classifier, shared within a process


def cached_classifier(x, y, seed=0, steps=600, noise=0.05):
    """train_classifier(x, y, seed, steps, noise=noise), trained once per process for the same
    inputs and settings (x, y on the CPU)."""
    key = (hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest(), seed, steps,
           noise)
    if key not in _CLASSIFIERS:
        _CLASSIFIERS[key] = train_classifier(x, y, seed=seed, steps=steps, noise=noise)
    return _CLASSIFIERS[key]


class SampleMetric:
    """Scores n flattened image samples against the held-out test images (module docstring).

    metric(x) -> {"fd": FD on classifier features, "fd_pixels": FD on raw pixels,
                  "label_tv": TV of predicted-label histograms, "fd_ratio": fd / floor["fd"],
                  "n_nonfinite": rows dropped}
    x must hold exactly `n` rows: FD is biased upwards by finite samples (roughly by
    tr(S)/n from the mean alone), so samples and floor are always scored at the same n
    (another n is a ValueError naming the fix).

    The floor: what n draws from the data score. `floor` holds the mean and `floor_sd` the
    standard deviation (ddof 1) of the scores of `n_floor` fixed draws of n training images
    *with replacement* (a bootstrap): each draw is n i.i.d. samples of the empirical
    distribution F_N of the N training images, exactly what n independent samples of a model
    that had learnt F_N would be, so the sd is the spread of an ideal model's score. Subsets
    drawn without replacement would understate it when n is close to N: the mean of a subset
    has variance (sigma^2 / n) (N - n) / (N - 1) instead of sigma^2 / n, a factor 0.26 for
    n = 1,000 of the N = 1,348 digits, and two such subsets share n^2 / N = 742 images on
    average. (Digits, n = 1,000: FD 4.73 +- 1.16 with replacement, 3.95 +- 0.52 without.)
    A score is "at the floor" when it lies within floor +- 3 floor_sd; `ratio` = fd / floor.
    `test_accuracy` is the classifier's accuracy on the test images. Deterministic: the
    classifier is trained with a fixed seed and scoring draws no random numbers (beyond the
    floor's fixed draws)."""

    KEYS = ("fd", "fd_pixels", "label_tv")

    def __init__(self, x_train, y_train, x_test, y_test, n=1000, seed=0, steps=600,
                 n_floor=20):
        if n < 2 or n_floor < 2:
            raise ValueError(f"SampleMetric needs n >= 2 samples (a covariance) and n_floor >= 2 "
                             f"draws (a spread), got n={n}, n_floor={n_floor}")
        self.n, self.n_floor, self.n_train = n, n_floor, len(x_train)
        side = math.isqrt(x_test.shape[1])
        # pixel statistics of 28px MNIST on 2x2-pooled 14x14 images (196-d, not 784-d)
        self.pool = 2 if side * side == x_test.shape[1] and side > 16 and side % 2 == 0 else 1
        self.clf = cached_classifier(x_train.cpu(), y_train.cpu(), seed=seed, steps=steps)
        with torch.no_grad():
            self.test_accuracy = self.clf.accuracy(x_test, y_test)
            self.ref_feat = _stats(self.clf.features(x_test).numpy())
        self.ref_pix = _stats(self._pixels(x_test))
        self.ref_hist = label_histogram(y_test.numpy())
        rng = np.random.default_rng(seed)
        draws = [x_train.cpu()[torch.from_numpy(rng.integers(len(x_train), size=n))]
                 for _ in range(n_floor)]
        scores = [self._score(x) for x in draws]
        self.floor = {k: float(np.mean([s[k] for s in scores])) for k in self.KEYS}
        self.floor_sd = {k: float(np.std([s[k] for s in scores], ddof=1)) for k in self.KEYS}

    def ratio(self, fd):
        """fd / floor["fd"]: 1 is as good as n draws of the training digits."""
        return fd / self.floor["fd"]

    def describe(self):
        """One line: the floor with its spread and how it was drawn."""
        f, s = self.floor, self.floor_sd
        return (f"FD floor {f['fd']:.2f} +- {s['fd']:.2f} (pixels {f['fd_pixels']:.3f} +- "
                f"{s['fd_pixels']:.3f}, label TV {f['label_tv']:.3f} +- {s['label_tv']:.3f}; "
                f"mean +- sd of {self.n_floor} draws of n = {self.n} of the {self.n_train} "
                f"training images with replacement)")

    def _pixels(self, x):
        if self.pool == 1:
            return x.numpy()
        side = math.isqrt(x.shape[1])
        return nn.functional.avg_pool2d(x.reshape(-1, 1, side, side), self.pool).flatten(1).numpy()

    @torch.no_grad()
    def __call__(self, x):
        if len(x) != self.n:
            raise ValueError(f"{len(x)} samples scored against a floor of n = {self.n} real "
                             f"images (FD grows as n shrinks); score {self.n} samples or build "
                             f"SampleMetric(..., n={len(x)})")
        out = self._score(x)
        out["fd_ratio"] = self.ratio(out["fd"])
        return out

    @torch.no_grad()
    def _score(self, x):
        x = x.detach().float().cpu()
        ok = torch.isfinite(x).all(1)
        out = {"n_nonfinite": int((~ok).sum())}
        x = x[ok].clamp(-1, 1)
        if len(x) < 2:
            return {"fd": float("nan"), "fd_pixels": float("nan"), "label_tv": float("nan"),
                    **out}
        feats = self.clf.features(x)
        hist = label_histogram(self.clf.head(feats).argmax(1).numpy())
        out["fd"] = frechet_distance(*_stats(feats.numpy()), *self.ref_feat)
        out["fd_pixels"] = frechet_distance(*_stats(self._pixels(x)), *self.ref_pix)
        out["label_tv"] = total_variation(hist, self.ref_hist)
        return out
