"""Monotonic rational-quadratic splines (Durkan, Bekasov, Murray & Papamakarios 2019, "Neural
Spline Flows", sec. 3.1 and appendix A), the elementwise transform of the spline flows in
flows.py (NSF-AR, NSF-C) and vi_flows.py (the VI spline flow).

On [-B, B] the map is a spline of K rational-quadratic pieces through K + 1 knots
(x^k, y^k), -B = x^0 < ... < x^K = B (the same for y), with positive derivatives d^k at the knots
(Gregory & Delbourgo 1982); outside [-B, B] it is the identity. With d^0 = d^K = 1 the spline
meets the identity tails with matching slope, so the whole map is C^1 and monotone.

Parameters per coordinate (3K - 1 numbers from a network): K unnormalised widths, K
unnormalised heights, K - 1 unnormalised inner derivatives. Widths and heights go through a
softmax floored at RQ_MIN_BIN (every bin keeps a minimum size), derivatives through a softplus
floored at RQ_MIN_DERIV and shifted so that all-zero parameters give the identity.
"""
import math

import torch
from torch import Tensor
from torch.nn import functional as F

RQ_MIN_BIN, RQ_MIN_DERIV = 1e-3, 1e-3
RQ_DERIV_SHIFT = math.log(math.expm1(1 - RQ_MIN_DERIV))  # softplus^{-1}(1 - min): d = 1 at 0


def _rq_knots(unnorm: Tensor, bound: float, min_size: float) -> tuple[Tensor, Tensor]:
    """Knot positions -B = k_0 < ... < k_K = B from unnormalised bin sizes (..., K): softmax,
    floored at `min_size` of the interval, then cumulated. Returns (knots, sizes); the end
    knots are set to exactly -B and B (the cumulative sum can round off the interval)."""
    K = unnorm.shape[-1]
    sizes = min_size + (1 - min_size * K) * torch.softmax(unnorm, -1)
    knots = F.pad(torch.cumsum(sizes, -1), (1, 0))
    knots = 2 * bound * knots - bound
    knots = torch.cat([knots[..., :1].new_full(knots[..., :1].shape, -bound), knots[..., 1:-1],
                       knots[..., :1].new_full(knots[..., :1].shape, bound)], -1)
    return knots, knots[..., 1:] - knots[..., :-1]


def rational_quadratic_spline(x: Tensor, params: Tensor, bound: float,
                              inverse: bool = False) -> tuple[Tensor, Tensor]:
    """Monotonic rational-quadratic spline on [-bound, bound] with identity tails, elementwise.

    x (..., D); params (..., D, 3K - 1): K unnormalised widths, K heights and K - 1 inner
    derivatives (see the module docstring); all-zero params give the identity.
    In bin k, with w_k = x^{k+1} - x^k, h_k = y^{k+1} - y^k, s_k = h_k / w_k and
    xi = (x - x^k) / w_k in [0, 1], the forward map is (Durkan et al. eq. 4)

        y = y^k + h_k (s_k xi^2 + d^k xi (1 - xi)) / (s_k + (d^{k+1} + d^k - 2 s_k) xi (1 - xi))

    and its derivative (eq. 5)

        dy/dx = s_k^2 (d^{k+1} xi^2 + 2 s_k xi (1 - xi) + d^k (1 - xi)^2)
                / (s_k + (d^{k+1} + d^k - 2 s_k) xi (1 - xi))^2.

    Inverse (appendix A): given y in bin k (found among the y-knots), eq. 4 is the quadratic
    a xi^2 + b xi + c = 0 with, for dy = y - y^k,
        a = h_k (s_k - d^k) + dy (d^{k+1} + d^k - 2 s_k),
        b = h_k d^k - dy (d^{k+1} + d^k - 2 s_k),
        c = -s_k dy,
    whose root in [0, 1] is xi = 2c / (-b - sqrt(b^2 - 4ac)) (the form without cancellation).

    Returns (y, log|dy/dx|) elementwise, shapes of x; with `inverse`, x is read as y and the
    result is (x, log|dx/dy|). Outside the interval: the input and log-det 0.

    Example:
        >>> y, ld = rational_quadratic_spline(torch.randn(4, 2), torch.zeros(4, 2, 23), 5.0)
        >>> # all-zero params: y equals the input and ld is 0
    """
    K = (params.shape[-1] + 1) // 3
    w_un, h_un, d_un = params[..., :K], params[..., K:2 * K], params[..., 2 * K:]
    xk, w = _rq_knots(w_un, bound, RQ_MIN_BIN)
    yk, h = _rq_knots(h_un, bound, RQ_MIN_BIN)
    d = RQ_MIN_DERIV + F.softplus(d_un + RQ_DERIV_SHIFT)
    d = F.pad(d, (1, 1), value=1.0)  # d^0 = d^K = 1: the slope of the identity tails
    inside = (x > -bound) & (x < bound)
    xc = x.clamp(-bound, bound)
    knots_in = (yk if inverse else xk)[..., 1:-1].contiguous()
    k = torch.searchsorted(knots_in, xc[..., None], right=True)  # bin index 0..K-1
    pick = lambda t: t.gather(-1, k)[..., 0]  # noqa: E731
    x_k, w_k, y_k, h_k = pick(xk), pick(w), pick(yk), pick(h)
    d_k, d_k1 = pick(d), d[..., 1:].gather(-1, k)[..., 0]
    s_k = h_k / w_k
    if inverse:  # appendix A
        dy = xc - y_k
        a = h_k * (s_k - d_k) + dy * (d_k1 + d_k - 2 * s_k)
        b = h_k * d_k - dy * (d_k1 + d_k - 2 * s_k)
        c = -s_k * dy
        disc = (b * b - 4 * a * c).clamp_min(0)
        xi = ((2 * c) / (-b - torch.sqrt(disc))).clamp(0, 1)
        out = xi * w_k + x_k
    else:  # eq. 4
        xi = ((xc - x_k) / w_k).clamp(0, 1)
        num = h_k * (s_k * xi * xi + d_k * xi * (1 - xi))
        out = y_k + num / (s_k + (d_k1 + d_k - 2 * s_k) * xi * (1 - xi))
    denom = s_k + (d_k1 + d_k - 2 * s_k) * xi * (1 - xi)  # eq. 5, in logs
    log_dydx = (2 * torch.log(s_k) + torch.log(d_k1 * xi * xi + 2 * s_k * xi * (1 - xi)
                                                + d_k * (1 - xi) ** 2) - 2 * torch.log(denom))
    log_det = -log_dydx if inverse else log_dydx
    return torch.where(inside, out, x), torch.where(inside, log_det, torch.zeros_like(x))


def check_spline(bins: int, bound: float) -> None:
    """Raise ValueError (naming the flag to pass) unless bins >= 1 and 0 < bound < inf."""
    if not (isinstance(bins, int) and bins >= 1):
        raise ValueError(f"a spline needs at least 1 bin, got bins={bins!r}; pass --nsf_bins 8")
    if not (bound > 0 and math.isfinite(bound)):
        raise ValueError(f"the spline interval [-B, B] needs B > 0, got {bound!r}; "
                         f"pass --nsf_bound 5")
