"""Images for short-run MCMC learning (the image half of Nijkamp, Hill et al., AAAI 2020):
the data, the ConvNet energies, image grids and a sample-quality metric.

Images travel through the training loop and the samplers flattened, as (N, C*H*W) rows with
pixel values in [-1, 1]; the networks reshape them. So `samplers.langevin` / `samplers.mala`
and train_mcmc.py's loop run on images unchanged.

    x_train, y_train, x_test, y_test = load_images("digits")         # (1348, 64), ..., (449, 64)
    F = ConvEBM("conv8", shape=(1, 8, 8), n_f=16)                    # F(x): (N, 64) -> (N,)
    metric = SampleMetric(x_train, y_train, x_test, y_test)           # classifier features
    metric(x_samples)  # 1,000 rows -> {"fd", "fd_pixels", "label_tv", "fd_ratio", ...}
    metric.floor["fd"], metric.floor_sd["fd"]   # what 1,000 real digits score, its spread
    save_grid("images/run/negatives/step_000100.png", x_samples[:100], (1, 8, 8))

Data: scikit-learn's 8x8 digits (embedded, no download) or local MNIST IDX files (.gz allowed,
read by tilt_data.load_mnist_idx). The train / test split is fixed (seed 0, a quarter of the
digits, a tenth of MNIST up to 10,000 held out), whatever the run's seed, so that every run is
scored against the same held-out images.

The metric: the Frechet distance (Heusel et al. 2017, "FID") between Gaussian fits of
features of samples and of the held-out test images,
    FD = |mu_s - mu_r|^2 + tr(S_s + S_r - 2 (S_s S_r)^(1/2)),
with features from the penultimate layer of a small MLP classifier trained on the training
split (and the same distance on raw pixels, 2x2-pooled for 28px MNIST), plus the total-variation distance between the
classifier's predicted-label histogram of the samples and the test labels' histogram (label
coverage). Samples are clamped to [-1, 1] (what the image shows) before scoring. Its floor is
the mean score of n training images drawn with replacement, with its spread (sd over the
draws; SampleMetric); FD grows with fewer samples, so samples are always scored at the
floor's n (`SampleMetric.n`, 1,000 by default).
"""
import hashlib
import math
import os

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

import tilt_data
import util

IMAGE_DATASETS = ("digits", "mnist")


# ----------------------------------------------------------------------------- data
class DataError(ValueError):
    """Bad or missing image files (the entry scripts turn it into a one-line exit-2 error)."""


def load_images(dataset, mnist_images=None, mnist_labels=None):
    """(x_train, y_train, x_test, y_test): float32 rows in [-1, 1] and int64 labels, with the
    fixed held-out split described in the module docstring. Raises DataError for a missing or
    malformed MNIST file."""
    if dataset == "digits":
        X, y = tilt_data.load_digits_data()
        n_test = len(y) // 4
    elif dataset == "mnist":
        try:
            X, y = tilt_data.load_mnist_idx(mnist_images, mnist_labels)
        except FileNotFoundError as e:
            raise DataError(str(e)) from None
        except (ValueError, OSError, EOFError) as e:  # bad header, truncated, not gzip
            raise DataError(f"cannot read MNIST IDX files {mnist_images!r} / {mnist_labels!r} "
                            f"({e}); pass the uncompressed or .gz IDX files from "
                            f"yann.lecun.com/exdb/mnist") from None
        if X.shape[1] != 28 * 28:
            raise DataError(f"{mnist_images}: expected 28x28 images, got {X.shape[1]} pixels; "
                            f"pass MNIST's own IDX files")
        n_test = min(len(y) // 10, 10000)
    else:
        raise DataError(f"unknown image dataset {dataset!r}; choose one of "
                        f"{', '.join(IMAGE_DATASETS)}")
    if n_test < 2 or len(y) - n_test < 2:
        raise DataError(f"{dataset}: {len(y)} images are too few for a train / test split")
    perm = np.random.default_rng(0).permutation(len(y))
    test, train = perm[:n_test], perm[n_test:]
    X = torch.from_numpy(2.0 * X - 1.0).float()
    y = torch.from_numpy(y)
    return X[train], y[train], X[test], y[test]


def image_shape(dataset):
    """(C, H, W) of a dataset's images."""
    return {"digits": (1, 8, 8), "mnist": (1, 28, 28)}[dataset]


# ----------------------------------------------------------------------------- energies
class ConvEBM(nn.Module):
    """Energy F(x) of flattened images x (N, C*H*W) -> (N,): a ConvNet of Conv2d layers with
    LeakyReLU(0.05) between them (none after the last), as in the paper's code.

    arch "conv8" (8x8 images, 4 layers, n_f-2n_f-4n_f channels):
        conv3x3 s1 -> conv4x4 s2 -> conv4x4 s2 -> conv2x2 (8 -> 8 -> 4 -> 2 -> 1)
    arch "vanilla" (the paper's VanillaNet for 32x32; 28x28 MNIST is padded with -1 to 32):
        conv3x3 s1 -> conv4x4 s2 -> conv4x4 s2 -> conv4x4 s2 -> conv4x4 (32 -> ... -> 4 -> 1)

        F = ConvEBM("conv8", (1, 8, 8), n_f=16)
        F(torch.rand(5, 64) * 2 - 1)        # (5,) energies of five 8x8 images in [-1, 1]
    """

    ARCHS = ("conv8", "vanilla")

    def __init__(self, arch: str = "conv8", shape: Sequence[int] = (1, 8, 8), n_f: int = 16):
        super().__init__()
        if arch not in self.ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(self.ARCHS)}")
        self.arch, self.shape, self.n_f = arch, tuple(shape), int(n_f)
        c, h, w = self.shape
        act = lambda: nn.LeakyReLU(0.05)  # noqa: E731
        if arch == "conv8":
            if (h, w) != (8, 8):
                raise ValueError(f"arch conv8 is for 8x8 images, got {h}x{w}; use vanilla")
            self.pad = 0
            self.net = nn.Sequential(
                nn.Conv2d(c, n_f, 3, 1, 1), act(), nn.Conv2d(n_f, 2 * n_f, 4, 2, 1), act(),
                nn.Conv2d(2 * n_f, 4 * n_f, 4, 2, 1), act(), nn.Conv2d(4 * n_f, 1, 2, 1, 0))
        else:
            if h != w or h not in (28, 32):
                raise ValueError(f"arch vanilla is for 28x28 or 32x32 images, got {h}x{w}; "
                                 f"use conv8 for 8x8")
            self.pad = (32 - h) // 2
            self.net = nn.Sequential(
                nn.Conv2d(c, n_f, 3, 1, 1), act(), nn.Conv2d(n_f, 2 * n_f, 4, 2, 1), act(),
                nn.Conv2d(2 * n_f, 4 * n_f, 4, 2, 1), act(),
                nn.Conv2d(4 * n_f, 8 * n_f, 4, 2, 1), act(), nn.Conv2d(8 * n_f, 1, 4, 1, 0))

    def images(self, x: Tensor) -> Tensor:
        """Flattened rows (N, C*H*W) -> the padded (N, C, H', W') batch the convs see."""
        x = x.reshape(x.shape[0], *self.shape)
        if self.pad:
            x = nn.functional.pad(x, (self.pad,) * 4, value=-1.0)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """F(x) of flattened images x (N, C*H*W), shape (N,)."""
        return self.net(self.images(x)).reshape(x.shape[0])

    def energy_params(self) -> list[nn.Parameter]:
        """The parameters of F (all of them: a ConvEBM has no log-normaliser)."""
        return list(self.net.parameters())

    def spec(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this module (stored in checkpoints)."""
        return {"arch": self.arch, "shape": list(self.shape), "n_f": self.n_f}


def default_arch(dataset):
    return "conv8" if dataset == "digits" else "vanilla"


def load_image_ebm(checkpoint, key="image_ebm", device="cpu"):
    """The ConvEBM stored in a train_mcmc.py image checkpoint under `key` ("image_ebm": U
    itself, the last layer scaled by 2 / eps^2; "F": the trained network)."""
    net = ConvEBM(**checkpoint["image_ebm_spec"]).to(device)
    net.load_state_dict(checkpoint[key])
    return net.eval()


# ----------------------------------------------------------------------------- grids
def to_uint8(x, shape):
    """Flattened images in [-1, 1] (clamped) -> uint8 array (N, H, W) or (N, H, W, C)."""
    x = x.detach().float().cpu().clamp(-1, 1).reshape(-1, *shape)
    x = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return x[..., 0] if shape[0] == 1 else x


def grid_array(x, shape, nrow=10, pad=1):
    """Tile images into one uint8 array (nrow per row, `pad` grey pixels between them)."""
    imgs = to_uint8(x, shape)
    n, h, w = imgs.shape[:3]
    ncol = nrow
    nrows = max(1, math.ceil(n / ncol))
    out = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad) + imgs.shape[3:], 128,
                  np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad): pad + r * (h + pad) + h,
            pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return out


def save_grid(path, x, shape, nrow=10, scale=None, title=None):
    """A grid of images (values in [-1, 1]) as a PNG, enlarged by an integer factor (nearest
    neighbour) so that 8x8 digits are visible; `title` is written in a strip above. The file
    size is fixed for a fixed number of images (gif frames line up)."""
    from PIL import Image, ImageDraw

    arr = grid_array(x, shape, nrow)
    scale = scale or max(1, 320 // arr.shape[1])
    im = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale),
                                     Image.NEAREST).convert("RGB")
    if title:
        canvas = Image.new("RGB", (im.width, im.height + 16), "white")
        canvas.paste(im, (0, 16))
        ImageDraw.Draw(canvas).text((3, 2), title, fill="black")
        im = canvas
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    im.save(path)
    return path


# ----------------------------------------------------------------------------- metric
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
    f = np.asarray(f, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


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


_CLASSIFIERS = {}  # (data hash, seed, steps) -> trained classifier, shared within a process


def cached_classifier(x, y, seed=0, steps=600):
    """train_classifier(x, y, seed, steps), trained once per process for the same inputs."""
    key = (hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest(), seed, steps)
    if key not in _CLASSIFIERS:
        _CLASSIFIERS[key] = train_classifier(x, y, seed=seed, steps=steps)
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
            self.test_accuracy = float((self.clf(x_test).argmax(1) == y_test).float().mean())
            self.ref_feat = _stats(self.clf.features(x_test).numpy())
        self.ref_pix = _stats(self._pixels(x_test))
        self.ref_hist = np.bincount(y_test.numpy(), minlength=10)[:10] / len(y_test)
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
        pred = self.clf.head(feats).argmax(1).numpy()
        hist = np.bincount(pred, minlength=10)[:10] / len(pred)
        out["fd"] = frechet_distance(*_stats(feats.numpy()), *self.ref_feat)
        out["fd_pixels"] = frechet_distance(*_stats(self._pixels(x)), *self.ref_pix)
        out["label_tv"] = 0.5 * float(np.abs(hist - self.ref_hist).sum())
        return out
