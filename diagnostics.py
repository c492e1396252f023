"""Diagnostics of MCMC maximum-likelihood learning (Nijkamp et al., AAAI 2020, Section 3).

- `d_t = mean F(x+) - mean F(x-)`: the energy difference between data and short-run samples.
  Its sign alternating around 0 is the learning "equilibrium"; the auto-correlation of d_t and
  its cross-correlation with r_t separate weak from strong oscillation.
- `r_t = mean |dF/dx|` along the Langevin chains: the gradient magnitude, which must stay of
  the order of eps for the noise and the gradient to balance.
- A Gaussian KDE of short-run samples on the evaluation grid (binned: samples are counted in
  the grid cells and the counts convolved with the separable Gaussian kernel, float64), so that
  KL(p_data || KDE) tells whether the *samples* match the data even when the EBM does not.
  Samples that leave the grid are not renormalised away: their mass is reported
  (`kde_kl(..., return_outside=True)`) and counts against the KL.
"""
import math
import warnings

import numpy as np
import torch

import datasets
import plots
from gridmath import grid_kl, grid_points


# ----------------------------------------------------------------------------- KDE on the grid
def kde_log_density(x, bw, bound=datasets.BOUND, n=datasets.GRID, return_outside=False):
    """log of a Gaussian KDE (bandwidth `bw`) of samples x (N, 2) at the centres of the n x n
    grid on [-bound, bound]^2, float64, shape (n*n,) in `gridmath.grid_points` order.

    Samples are binned to the grid (cell width 2 bound / n must be well below bw) and the
    histogram convolved with the Gaussian kernel truncated at 8 bw (any width, also wider than
    the grid). The KDE is that of all N samples: samples outside the square and the kernel
    mass that falls outside it are *not* renormalised away, so the values integrate on the grid
    to 1 - (the KDE's mass outside the square). With `return_outside` also that mass (float):
    the escaped samples plus the kernels' tails. Cells that no kernel reaches get log density
    log(1e-300) instead of -inf."""
    h = 2 * bound / n
    x = x.detach().double().cpu().numpy()
    n_all = len(x)
    x = x[np.all(np.abs(x) < bound, axis=1)]
    counts, _, _ = np.histogram2d(x[:, 1], x[:, 0], bins=n, range=[[-bound, bound]] * 2)
    half = int(math.ceil(8 * bw / h))
    t = np.arange(-half, half + 1) * h
    k = np.exp(-t * t / (2 * bw * bw))
    k /= k.sum()
    # full convolution, then the n cells aligned with the grid (np.convolve's mode="same"
    # returns max(n, len(k)) values: the wrong size once the kernel is wider than the grid)
    dens = np.apply_along_axis(lambda c: np.convolve(c, k)[half:half + n], 0, counts)
    dens = np.apply_along_axis(lambda c: np.convolve(c, k)[half:half + n], 1, dens)
    dens = dens / (max(n_all, 1) * h * h)
    out = torch.from_numpy(np.log(np.maximum(dens, 1e-300)).reshape(-1))
    if return_outside:
        return out, float(max(0.0, 1.0 - dens.sum() * h * h))
    return out


def kde_kl(dataset, x, bw, bound=datasets.BOUND, n=datasets.GRID, return_outside=False):
    """KL(p_data || KDE of x) in nats on the evaluation grid, or None without a known density.

    The KDE is not renormalised on the grid: samples that left the square count against it
    (KL grows by about -log(1 - their fraction)). With `return_outside`, returns
    (KL, the KDE's mass outside the square); a tenth or more outside also warns."""
    if not datasets.has_density(dataset):
        return (None, None) if return_outside else None
    grid, area = grid_points(bound, n)
    log_kde, outside = kde_log_density(x, bw, bound, n, return_outside=True)
    if outside > 0.1:
        warnings.warn(f"{outside:.1%} of the KDE's mass (short-run samples and kernel tails) "
                      f"is outside [-{bound}, {bound}]^2; it counts against KL(p_data || KDE)",
                      RuntimeWarning, stacklevel=2)
    kl = grid_kl(datasets.log_density(dataset, grid), log_kde, area)
    return (kl, outside) if return_outside else kl


# ----------------------------------------------------------------------------- correlations
def autocorr(y, max_lag):
    """Sample auto-correlation of the series y at lags 0..max_lag (numpy)."""
    y = np.asarray(y, dtype=np.float64)
    y = y - y.mean()
    v = (y * y).sum()
    if v == 0:
        return np.zeros(max_lag + 1)
    return np.array([(y[:len(y) - k] * y[k:]).sum() / v for k in range(max_lag + 1)])


def crosscorr(a, b, max_lag):
    """Cross-correlation corr(a_t, b_{t+k}) for k = -max_lag..max_lag; returns (lags, values)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = (a - a.mean()) / (a.std() or 1.0)
    b = (b - b.mean()) / (b.std() or 1.0)
    n = len(a)
    lags = np.arange(-max_lag, max_lag + 1)
    vals = np.array([(a[max(0, -k):n - max(0, k)] * b[max(0, k):n - max(0, -k)]).mean()
                     for k in lags])
    return lags, vals


# ----------------------------------------------------------------------------- figures
def save_diagnostics(path, d, r, max_lag=30, window=None, title=None):
    """d_t and r_t over the iterations, and over the last `window` iterations (default: the
    second half) the auto-correlations of both and their cross-correlation, lags <= max_lag."""
    d, r = np.asarray(d, np.float64), np.asarray(r, np.float64)
    it = np.arange(1, len(d) + 1)
    window = window or max(len(d) // 2, 2)
    dw, rw = d[-window:], r[-window:]
    max_lag = max(1, min(max_lag, len(dw) - 1))
    lags = np.arange(max_lag + 1)
    xl, xc = crosscorr(dw, rw, max_lag)
    curves = {
        "d_t = mean F(x+) - mean F(x-)": {"d_t": (it, d), "0": (it, np.zeros_like(d))},
        "r_t = mean |dF/dx| along chains": {"r_t": (it, r)},
        f"auto-correlation (last {window} it.)": {"d_t": (lags, autocorr(dw, max_lag)),
                                                  "r_t": (lags, autocorr(rw, max_lag))},
        "cross-corr(d_t, r_t+k)": {"corr": (xl, xc)},
    }
    return plots.save_curves(path, curves, title=title,
                             xlabel=["iteration", "iteration", "lag k", "lag k"])


def save_landscape(path, dataset, U, x_short, bw, bound=datasets.BOUND, n=150, title=None):
    """Rows density / log-density; columns: true density (when known), the EBM exp(-U)
    normalised on the grid, and the Gaussian KDE of the short-run samples x_short."""
    from gridmath import on_grid

    cols = []
    if datasets.has_density(dataset):
        true = on_grid(lambda x: datasets.log_density(dataset, x.double()), bound, n)[0]
        cols.append(("true", true))
    neg_u, area = on_grid(lambda x: -U(x), bound, n)
    cols.append(("EBM exp(-U)/Z", neg_u - torch.logsumexp(neg_u, 0) - math.log(area)))
    log_kde, outside = kde_log_density(x_short, bw, bound, n, return_outside=True)
    cols.append((f"short-run KDE (bw {bw}, {outside:.1%} outside)", log_kde))
    panels = [(f"{name}", plots.grid_image(v, bound, n)) for name, v in cols]
    panels += [(f"log {name}", plots.grid_image(v, bound, n, log=True)) for name, v in cols]
    return plots.save_panels(path, panels, title=title, rows=2)
