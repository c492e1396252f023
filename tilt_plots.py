"""Figures of the tilting experiments: label histograms side by side, the 2-d latent space
coloured by label with energy contours and re-weighted samples, grids of decoded images.
Fixed figure sizes, dpi 80 (as plots.py)."""
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import image_data  # noqa: E402
from gridmath import grid_points  # noqa: E402


def _save(fig, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def label_histograms(path, hists, title=None, target=None):
    """One bar chart per entry of `hists` {panel title: fractions per label}; `target` (a
    histogram) is drawn as a dashed outline in every panel."""
    n = len(hists)
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.4 + (0.3 if title else 0)), squeeze=False,
                             sharey=True)
    for ax, (name, h) in zip(axes.flat, hists.items()):
        h = np.asarray(h, float)
        ax.bar(np.arange(len(h)), h, color=["C0"] * 5 + ["C3"] * (len(h) - 5))
        if target is not None:
            ax.step(np.arange(len(target) + 1) - 0.5, np.r_[target, target[-1]], where="post",
                    color="k", ls="--", lw=0.8)
        ax.set_xticks(np.arange(len(h)))
        ax.tick_params(labelsize=7)
        ax.set_title(name, fontsize=8)
    axes.flat[0].set_ylabel("fraction", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


@torch.no_grad()
def latent_panels(path, z_data, labels, tilts, bound=3.0, n=120, title=None):
    """2-d latent space: encoder means z_data coloured by label and, per entry of `tilts`
    {panel title: (E or None, re-weighted samples z (M, 2) or None)}, contours of the tilted
    prior log density -E(z) + log N(z) and the samples as black dots."""
    k = len(tilts)
    fig, axes = plt.subplots(1, k, figsize=(3.0 * k + 0.8, 3.2 + (0.3 if title else 0)),
                             squeeze=False, layout="constrained")
    g, _ = grid_points(bound, n, torch.float32)
    log_n = -0.5 * (g * g).sum(1)
    zd = np.asarray(z_data)
    for ax, (name, (E, zs)) in zip(axes.flat, tilts.items()):
        lp = log_n - (E(g) if E is not None else 0.0)
        lp = (lp - lp.max()).clamp_min(-12).reshape(n, n).numpy()
        ax.contour(np.linspace(-bound, bound, n), np.linspace(-bound, bound, n), lp, levels=10,
                   cmap="Greys", linewidths=0.7)
        sc = ax.scatter(zd[:, 0], zd[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5, s=6,
                        alpha=0.8)
        if zs is not None:
            zs = np.asarray(zs)
            ax.scatter(zs[:, 0], zs[:, 1], c="k", s=1.5, alpha=0.5)
        ax.set_xlim(-bound, bound)
        ax.set_ylim(-bound, bound)
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
    fig.colorbar(sc, ax=list(axes.flat), ticks=range(10), shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def image_grids(path, grids, rows=8, title=None):
    """Square grids of images side by side: `grids` {panel title: images (N, H*W) in [0, 1]}
    (the first rows^2 of each), tiled by image_data.grid_array, ink dark on white."""
    k = len(grids)
    fig, axes = plt.subplots(1, k, figsize=(2.6 * k, 2.6 + (0.3 if title else 0)), squeeze=False)
    for ax, (name, x) in zip(axes.flat, grids.items()):
        x = torch.as_tensor(np.asarray(x)[: rows * rows], dtype=torch.float32)
        side = math.isqrt(x.shape[1])
        grid = image_data.grid_array(2 * x - 1, (1, side, side), nrow=rows)
        ax.imshow(grid, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def mixture_figure(path, panels, bars, title=None, size=2.6):
    """Square 2D panels [(title, plots drawer), ...] and a bar chart of component histograms
    `bars` {label: fractions per component}."""
    k = len(panels) + 1
    fig, axes = plt.subplots(1, k, figsize=(size * k, size + (0.3 if title else 0)),
                             squeeze=False)
    for ax, (name, draw) in zip(axes.flat, panels):
        draw(ax)
        ax.set_aspect("equal")
        ax.set_axis_off()
        ax.set_title(name, fontsize=8)
    ax = axes.flat[-1]
    width = 0.8 / len(bars)
    for i, (label, h) in enumerate(bars.items()):
        h = np.asarray(h, float)
        ax.bar(np.arange(len(h)) + (i - (len(bars) - 1) / 2) * width, h, width, label=label)
    ax.set_xticks(range(len(h)))
    ax.set_xlabel("component", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
    ax.set_title("component histogram", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
