"""Images as a density-estimation task: the one continuous density every estimator fits, and
its units (Theis et al. 2016; Uria et al. 2013; Ho et al. 2019 for the convention).

An image has D pixels with integer grey levels k in {0, ..., L-1} (L = 17 for scikit-learn's
8x8 digits, 256 for MNIST). Uniform dequantisation adds u ~ U[0, 1)^D, giving a continuous
point v = k + u in [0, L)^D. For any density p_v on [0, L)^D,

    log P(k) >= E_u [ log p_v(k + u) ]          (Jensen: P(k) = int_[0,1)^D p_v(k + u) du),

so the test log-likelihood of the dequantised images, in nats per image on the [0, L) scale,
is a lower bound on the discrete log-likelihood and is THE number compared across models
here. Bits per dimension: bpd = -log p_v / (D ln 2); the uniform density on [0, L)^D scores
log2(L) bits per dimension (4.09 for the digits, 8 for MNIST).

The models see v rescaled to [-1, 1] (the scale of the image EBMs and their samplers):

    y = 2 v / L - 1,    log p_v(v) = log p_y(y) + D log(2 / L)      (`to_nats`).

Images elsewhere in the toolkit are rows k / (L - 1) * 2 - 1 in [-1, 1] (mcmc_images.py);
`levels` recovers k from them.

    x_train, y_train, x_test, y_test = mcmc_images.load_images("digits")
    L = LEVELS["digits"]
    y = dequantize(x_train, L, generator)          # a fresh draw for every training batch
    y_test = dequantize(x_test, L, torch.Generator().manual_seed(0))   # fixed for evaluation
    nats = to_nats(log_p_y, D=64, L=L); bpd = bits_per_dim(log_p_y, 64, L)
"""
import math

import torch
from torch import Tensor

LEVELS = {"digits": 17, "mnist": 256}
TEST_SEED = 0  # the held-out images are dequantised once, with this seed, for every model


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
