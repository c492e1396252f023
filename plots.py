"""Figures shared by every script: rows of square panels of 2D densities and samples.

    save_panels("images/run/epoch_0007.png",
                [("data", samples(x)), ("flow q", density(flow.log_prob)),
                 ("EBM p", density(lambda x: -ebm(x), normalise=True))],
                title="epoch 7")

Figures have a fixed size (no tight bounding box), so frames of a gif line up.
"""
import glob
import math
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402  (Pillow comes with matplotlib)

import datasets  # noqa: E402
from gridmath import on_grid  # noqa: E402


def density(log_p_fn, bound=datasets.BOUND, n=150, device="cpu", normalise=True, log=False,
            cmap="viridis"):
    """Panel drawer: exp(log_p) on an n x n grid (normalised on the grid when `normalise`,
    which turns exp(-f) into the EBM's density); `log=True` shows log-density instead."""
    values, area = on_grid(log_p_fn, bound, n, device)
    if normalise:
        values = values - torch.logsumexp(values, 0) - torch.log(torch.tensor(area, dtype=values.dtype))
    return grid_image(values, bound, n, log, cmap)


def grid_image(log_values, bound=datasets.BOUND, n=150, log=False, cmap="viridis"):
    """Panel drawer for log-density values already on the n x n grid: exp(values), or the
    values themselves with `log=True` (clamped to 20 nats below the maximum, so the colour
    scale stays readable)."""
    img = log_values.clamp_min(log_values.max() - 20) if log else log_values.exp()

    def draw(ax):
        ax.imshow(img.reshape(n, n).numpy(), origin="lower", cmap=cmap,
                  extent=[-bound, bound, -bound, bound], interpolation="nearest")
    return draw


def samples(x, bound=datasets.BOUND, bins=150, cmap="viridis"):
    """Panel drawer: a 2D histogram of samples x (N, 2) (reads better than a scatter at N=10^4)."""
    x = x.detach().float().cpu().numpy()

    def draw(ax):
        ax.hist2d(x[:, 0], x[:, 1], bins=bins, range=[[-bound, bound], [-bound, bound]],
                  cmap=cmap)
    return draw


def images(x, shape, nrow=10):
    """Panel drawer: flattened images x (N, C*H*W) in [-1, 1] tiled nrow to a row, grey."""
    import image_data  # image runs only

    grid = image_data.grid_array(x, shape, nrow)

    def draw(ax):
        ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    return draw


def save_panels(path, panels, title=None, size=3.0, rows=1):
    """Draw `panels` [(title, drawer), ...] side by side (in `rows` rows) and save to `path`."""
    cols = -(-len(panels) // rows)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + (0.4 if title else 0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (name, draw) in zip(axes.flat, panels):
        draw(ax)
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title, fontsize=10)
    height = fig.get_size_inches()[1]
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02,
                        top=1 - (0.55 if title else 0.3) / height, wspace=0.06, hspace=0.15)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    _close(fig)
    return path


def _close(fig):
    """Close a saved figure, its artists cleared first: they form reference cycles that
    only Python's rarely-run full collection would free, so a run drawing a figure per
    epoch would otherwise keep growing (about 6 MB per training figure)."""
    fig.clear()
    plt.close(fig)


def save_curves(path, curves, xlabel="iteration", title=None, size=(4.0, 3.0), logy=False):
    """Line plots: `curves` is {panel title: {label: (x, y)}}, one panel per entry; `xlabel`
    is one label for all panels or a list with one per panel."""
    xlabels = list(xlabel) if isinstance(xlabel, (list, tuple)) else [xlabel] * len(curves)
    fig, axes = plt.subplots(1, len(curves), figsize=(size[0] * len(curves), size[1]),
                             squeeze=False)
    for ax, (name, lines), xl in zip(axes.flat, curves.items(), xlabels):
        for label, (x, y) in lines.items():
            ax.plot(x, y, label=label, lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xl)
        if logy:
            ax.set_yscale("log")
        if len(lines) > 1:
            ax.legend(fontsize=7)
    return _save(fig, path, title)


def _save(fig, path, title=None):
    """Title, tight layout, save (creating the folder) and close; returns the path."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    _close(fig)
    return path


LOG4 = math.log(4)


def running_fraction(steps, fractions, window=None):
    """The share of the last `window` iterations in which a model stepped, at each row:
    rows (step_i, f_i) each carry the fraction f_i of the iterations since the previous row,
    so with n_i = step_i - step_(i-1) it is sum f_j n_j / sum n_j over the rows in
    (step_i - window, step_i] (all rows so far while the run is shorter than the window).
    Default window: a tenth of the run, at least 200 iterations."""
    if not steps:
        return []
    window = window or max(200, steps[-1] / 10)
    done, seen = [0.0], [0.0]  # cumulative steps taken and iterations at each row
    prev = 0
    for s, f in zip(steps, fractions):
        done.append(done[-1] + f * (s - prev))
        seen.append(seen[-1] + (s - prev))
        prev = s
    out, j = [], 0
    for i, s in enumerate(steps, start=1):
        while steps[j] <= s - window:  # first row inside the window is j + 1 (1-based)
            j += 1
        it = seen[i] - seen[j]
        out.append((done[i] - done[j]) / it if it else math.nan)
    return out


def training_curves(path, runs, title=None):
    """The training figure of FCE/NCE/MLE runs from their metrics.jsonl rows, several runs
    overlaid: `runs` is {label: (rows, threshold or None)}. Panels: -V with the optimum log 4
    (or the training NLL of a flow fit alone), accuracy (solid, dashed on the flow's own
    samples), the flow-step fraction as a running fraction (dotted, `running_fraction`) and
    the threshold (dash-dot: the rows' `threshold` when it moves, else the constant),
    KL(p_data || model) of the EBM (solid) and the flow (dashed) when the density is known
    (else test NLL), and c - log Z."""
    panels = ["-V (dashed: log 4) / training NLL",
              "accuracy: all noise (solid), flow's samples (dashed);\nflow-step fraction, "
              "running (dotted); threshold (dash-dot)",
              "KL(p_data || model): EBM solid, flow dashed", "c - log Z"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    log_kl = False  # KL panel on a log scale when any run has a positive KL
    for (label, (rows, threshold)), color in zip(runs.items(), plt.cm.tab10.colors * 10):
        def series(key):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            return ([p[0] for p in pts], [p[1] for p in pts]) if pts else None
        for key, ax, style in (("value", 0, "-"), ("nll_train", 0, "-"), ("accuracy", 1, "-"),
                               ("accuracy_flow", 1, "--"), ("threshold", 1, "-."),
                               ("c_gap", 3, "-")):
            s = series(key)
            if s:
                axes[ax].plot(*s, style, color=color, lw=1 if key != "threshold" else 0.8,
                              label=label if key in ("value", "nll_train") else None)
        s = series("flow_step_fraction")
        if s:
            axes[1].plot(s[0], running_fraction(*s), ":", color=color, lw=1.2)
        if threshold and series("accuracy") and not series("threshold"):
            axes[1].axhline(threshold, color=color, ls="-.", lw=0.8)
        kl = series("kl_ebm") or series("kl_flow")
        for key, style in ((("kl_ebm", "-"), ("kl_flow", "--")) if kl else
                           (("nll_ebm", "-"), ("nll_flow", "--"))):
            s = series(key)
            if s:
                axes[2].plot(*s, style, marker=".", color=color, lw=1)
                log_kl = log_kl or (kl is not None and any(v > 0 for v in s[1]))
    axes[0].axhline(LOG4, color="k", ls="--", lw=0.8)
    if log_kl:
        axes[2].set_yscale("log")
    for ax, name in zip(axes, panels):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(5, integer=True))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(_short_count))
    if any(ax.get_legend_handles_labels()[0] for ax in axes[:1]):
        axes[0].legend(fontsize=7)
    return _save(fig, path, title)


def _short_count(v, _pos=None):
    """Tick label of an iteration count that stays short at any run length: 800, 12k, 1.5M."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.0f}"


# ----------------------------------------------------------------------------- gifs
def frame_number(path):
    """The last integer in the file name (the epoch), or -1 when there is none."""
    nums = re.findall(r"\d+", os.path.basename(path))
    return int(nums[-1]) if nums else -1


def make_gif(folder, out=None, fps=5):
    """Write the gif and return its path; raises FileNotFoundError when no PNG is found."""
    frames = sorted(glob.glob(os.path.join(folder, "*.png")), key=lambda p: (frame_number(p), p))
    if not frames:
        raise FileNotFoundError(f"no .png frames in {folder!r}; run a training script first "
                                f"or pass the folder that holds its figures")
    out = out or os.path.normpath(folder) + ".gif"
    images = [Image.open(p).convert("RGB") for p in frames]
    size = images[0].size
    images = [im if im.size == size else im.resize(size) for im in images]
    images[0].save(out, save_all=True, append_images=images[1:],
                   duration=int(1000 / fps), loop=0)
    return out
