"""Images as data: where they come from, the fixed train / test split, their grey levels and
the one continuous density every estimator fits (dequantisation), and image grids.

    x_train, y_train, x_test, y_test = load_images("digits")     # (1348, 64), ..., (449, 64)
    image_shape("digits"), LEVELS["digits"]                       # (1, 8, 8), 17
    y = dequantize(x_train, LEVELS["digits"], generator)          # a fresh draw per batch
    y_test = test_set(x_test, 17)                                 # fixed, for every model
    save_grid("images/run/negatives/step_000100.png", x[:100], (1, 8, 8))

Data: scikit-learn's 8x8 digits (embedded, no download) or local MNIST IDX files (.gz allowed;
`read_idx`). Images travel through the toolkit flattened, as (N, C*H*W) rows with pixel values
2 k / (L - 1) - 1 in [-1, 1] (k the grey level), and the networks reshape them. The train /
test split is fixed (seed 0, a quarter of the digits, a tenth of MNIST up to 10,000 held out),
whatever the run's seed, so that every run is scored against the same held-out images.

Dequantisation (Theis et al. 2016; Uria et al. 2013; Ho et al. 2019 for the convention). An
image has D pixels with integer grey levels k in {0, ..., L-1} (L = 17 for scikit-learn's 8x8
digits, 256 for MNIST). Uniform dequantisation adds u ~ U[0, 1)^D, giving a continuous point
v = k + u in [0, L)^D. For any density p_v on [0, L)^D,

    log P(k) >= E_u [ log p_v(k + u) ]          (Jensen: P(k) = int_[0,1)^D p_v(k + u) du),

so the test log-likelihood of the dequantised images, in nats per image on the [0, L) scale,
is a lower bound on the discrete log-likelihood and is THE number compared across models
here. Bits per dimension: bpd = -log p_v / (D ln 2); the uniform density on [0, L)^D scores
log2(L) bits per dimension (4.09 for the digits, 8 for MNIST). The models see v rescaled to
[-1, 1] (the scale of the image EBMs and their samplers):

    y = 2 v / L - 1,    log p_v(v) = log p_y(y) + D log(2 / L)      (`to_nats`).

`levels` recovers k from the rows; `test_set` dequantises the held-out images once (TEST_SEED),
so every model is scored on the same continuous points.
"""
import gzip
import math
import os

import numpy as np
import torch
from torch import Tensor

LEVELS = {"digits": 17, "mnist": 256}  # grey levels L of each image set
IMAGE_DATASETS = tuple(LEVELS)
TEST_SEED = 0  # the held-out images are dequantised once, with this seed, for every model


# ----------------------------------------------------------------------------- files
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


# ----------------------------------------------------------------------------- the split
class DataError(ValueError):
    """Bad or missing image files (the entry scripts turn it into a one-line exit-2 error)."""


def load_images(dataset, mnist_images=None, mnist_labels=None):
    """(x_train, y_train, x_test, y_test): float32 rows in [-1, 1] and int64 labels, with the
    fixed held-out split described in the module docstring. Raises DataError for a missing or
    malformed MNIST file."""
    if dataset == "digits":
        X, y = load_digits_data()
        n_test = len(y) // 4
    elif dataset == "mnist":
        try:
            X, y = load_mnist_idx(mnist_images, mnist_labels)
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


# ----------------------------------------------------------------------------- dequantisation
def levels(x: Tensor, L: int) -> Tensor:
    """Integer grey levels k in {0..L-1} of rows x = 2 k / (L - 1) - 1 (float, same shape);
    raises ValueError when x is not on that lattice."""
    k = (x.double() + 1) / 2 * (L - 1)
    r = k.round()
    if (r - k).abs().max() > 1e-3 or r.min() < 0 or r.max() > L - 1:
        raise ValueError(f"images are not on the {L}-level lattice of [-1, 1]; pass pixel "
                         f"values 2 k / {L - 1} - 1 with integer k in 0..{L - 1}")
    return r.to(x.dtype)


def dequantize(x: Tensor, L: int, generator: torch.Generator = None) -> Tensor:
    """y = 2 (k + u) / L - 1 with u ~ U[0, 1)^D drawn from `generator` (CPU), for images x on
    the L-level lattice of [-1, 1]; y lies in [-1, 1)."""
    k = levels(x, L)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return 2 * (k + u) / L - 1


def log_jacobian(D: int, L: int) -> float:
    """D log(2 / L): log p_v(v) = log p_y(y) + log_jacobian(D, L)."""
    return D * math.log(2.0 / L)


def to_nats(log_p_y, D: int, L: int):
    """Log-density on the [-1, 1] model scale -> nats per image on the [0, L) scale."""
    return log_p_y + log_jacobian(D, L)


def bits_per_dim(log_p_y, D: int, L: int):
    """-log p_v / (D ln 2), with log p_v = to_nats(log_p_y, D, L)."""
    return -to_nats(log_p_y, D, L) / (D * math.log(2.0))


def test_set(x_test: Tensor, L: int) -> Tensor:
    """The held-out images dequantised once with TEST_SEED: every model is scored on the same
    continuous points."""
    return dequantize(x_test, L, torch.Generator().manual_seed(TEST_SEED))


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
