"""Shared pieces of every training script: exact evaluation of 2D densities on a grid, seeding and devices, atomic checkpoints, and `load_run`.

Grid integration is in float64: on the square [-b, b]^2 with n x n cell centres of area dA,

    log Z = logsumexp_i(-f(x_i)) + log dA,
    KL(p || q) = sum_i p(x_i) (log p(x_i) - log q(x_i)) dA.
"""
import contextlib
import json
import math
import os
import random
from types import SimpleNamespace

import numpy as np
import torch

import datasets
from gridmath import grid_kl, grid_log_Z, grid_points, on_grid  # noqa: F401 (re-exported)


# ----------------------------------------------------------------------------- grid evaluation
def effective_sample_size(log_w):
    """ESS = (sum w)^2 / sum w^2 of unnormalised log importance weights, in log space
    (Kong 1992); between 1 and len(log_w)."""
    log_w = log_w.double()
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))


@torch.no_grad()
def evaluate_2d(dataset, x_test, ebm=None, flow=None, bound=datasets.BOUND, n=datasets.GRID,
                device="cpu"):
    """Exact 2D evaluation of an EBM (normalised on the grid) and a flow.

    Returns a dict with, where they apply:
      log_Z          grid log Z of exp(-f); c_gap = c - log_Z (the learned normaliser's error)
      nll_ebm        -mean log p_theta(x_test), log p_theta = -f - log_Z (nats)
      nll_flow       -mean log q(x_test)
      kl_flow_mc     mean log p_data(x) - log q(x) over x_test (a Monte Carlo KL, with its
                     standard error kl_flow_mc_se): what the grid KL should agree with
      entropy        H(p_data), the lowest NLL any model can reach (known densities only)
      kl_ebm/kl_flow KL(p_data || model) on the grid (known densities only)
      hole_mass      the mass of p_data on grid cells where log q < log p_data - 10
      mse_logp       mean over x_test of (log p_theta - log p_data)^2 (the fce-2d metric)
    """
    out = {}
    x_test = x_test.to(device)
    log_true = None
    if datasets.has_density(dataset):
        log_true = datasets.grid_log_density(dataset, bound, n)
        out["entropy"] = datasets.entropy(dataset)
    if ebm is not None:
        neg_f, area = on_grid(lambda x: -ebm(x), bound, n, device)
        log_Z = grid_log_Z(neg_f, area)
        out["log_Z"] = log_Z
        out["c_gap"] = float(ebm.c.detach()) - log_Z
        log_p_test = (-ebm(x_test)).cpu().double() - log_Z  # .cpu() first: no float64 on MPS
        out["nll_ebm"] = float(-log_p_test.mean())
        if log_true is not None:
            out["kl_ebm"] = grid_kl(log_true, neg_f - log_Z, area)
            true_test = datasets.log_density(dataset, x_test.cpu().double())
            ok = torch.isfinite(true_test)
            out["mse_logp"] = float(((log_p_test - true_test)[ok] ** 2).mean())
    if flow is not None:
        log_q_test = flow.log_prob(x_test).cpu().double()
        out["nll_flow"] = float(-log_q_test.mean())
        if log_true is not None:
            diff = datasets.log_density(dataset, x_test.cpu().double()) - log_q_test
            diff = diff[torch.isfinite(diff)]
            out["kl_flow_mc"] = float(diff.mean())
            out["kl_flow_mc_se"] = float(diff.std() / math.sqrt(len(diff)))
            log_q, area = on_grid(flow.log_prob, bound, n, device)
            out["kl_flow"] = grid_kl(log_true, log_q, area)
            hole = log_q < log_true - 10
            out["hole_mass"] = float(log_true[hole].exp().sum() * area)
    return out


def format_metrics(m):
    """One line of `evaluate_2d`'s numbers: NLLs, the entropy (the optimum), KLs, c - log Z."""
    parts = []
    for key, label in (("nll_ebm", "NLL ebm"), ("nll_flow", "NLL flow"), ("entropy", "H"),
                       ("kl_ebm", "KL ebm"), ("kl_flow", "KL flow"), ("c_gap", "c - log Z")):
        if key in m:
            parts.append(f"{label} {m[key]:+.3f}" if key == "c_gap" else f"{label} {m[key]:.4f}")
    return " | ".join(parts)


# ----------------------------------------------------------------------------- runtime
def set_seed(seed):
    """Seed Python, NumPy and torch (all devices); returns a NumPy Generator for the data."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def get_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; otherwise cpu, cuda, cuda:<i> or mps. A device
    this machine does not have raises ValueError with the fix."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device={name!r} is not a device name; use auto, cpu, cuda, "
                         f"cuda:<index> or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device={name!r} is not supported; use auto, cpu, cuda or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device={name} but CUDA is not available on this machine; "
                             f"use --device=auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device={name} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not _mps_available():
        raise ValueError(f"--device={name} but MPS (Apple GPU) is not available on this "
                         f"machine; use --device=auto or cpu")
    return dev


@contextlib.contextmanager
def fixed_rng(seed):
    """Run a block (an evaluation) from its own seed and restore every random stream
    afterwards (torch CPU, CUDA, MPS, NumPy, Python): evaluating never changes training, on
    any device, so a resumed run continues exactly."""
    saved = rng_state()
    try:
        set_seed(seed)
        yield
    finally:
        set_rng_state(saved)


# ----------------------------------------------------------------------------- schedules
def lr_factor(schedule, t, total, floor=0.0, decay=1.0):
    """Multiplier of a base learning rate at time t of total (iterations, or any measure of
    progress such as spent CPU-seconds):

        constant     1
        cosine       floor + (1 - floor) (1 + cos(pi min(t / total, 1))) / 2
        exponential  max(floor, decay^t)"""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t / total, 1.0)))
    if schedule == "exponential":
        return max(floor, decay ** t)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def set_lr(opt, lr):
    """Set every parameter group of `opt` to learning rate `lr`."""
    for group in opt.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, state):
    """torch.save to a temporary file, then an atomic rename: a crash or Ctrl-C during the
    write never leaves a truncated checkpoint. Keep `state` to tensors and plain Python types
    (torch.load uses weights_only=True)."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, empty, truncated, not a checkpoint, or
    written by another script. The message names what was found."""


def load_checkpoint(path, map_location="cpu", script=None, keys=()):
    """Read a checkpoint written by `save_checkpoint`. With `script` (e.g. "train.py"), one
    written by another script is refused; one without the entries `keys` (a checkpoint from
    before checkpoints named their script) too. Raises CheckpointError (or
    FileNotFoundError)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; check the path or train a run first")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the run never saved one")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, foreign objects: all one case
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not written "
                              f"by this toolkit: {first})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a run checkpoint of "
                              f"this toolkit (no saved config)")
    writer = ckpt.get("script")
    if script is not None and writer is not None and writer != script:
        raise CheckpointError(f"{path} was written by {writer}; continue it with "
                              f"`python {writer} --resume {os.path.dirname(path) or '.'}`")
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(missing)}: it is not a "
                              f"{script or 'matching'} run; start a new run instead")
    return ckpt


def rng_state():
    """All random-number-generator states as tensors and plain types (for checkpoints)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2],
             "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _mps_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def _mps_available():
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and _mps_available():
        torch.mps.set_rng_state(state["mps"])
    if "numpy" in state:
        keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def load_run(run_dir, device="cpu", script=None):
    """Load a finished or interrupted run: `run = load_run("runs/<name>")`.

    Returns a namespace with .config (dict), .ebm (callable: f(x) for an (N, 2) tensor, or
    None), .flow (log_prob / sample, or None), .step and .checkpoint (the raw dict)."""
    from ebm import EBM
    from vi_flows import flow_from_spec  # density flows (train.py) and VI flows (train_vi.py)

    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"), map_location=device,
                           script=script)
    ebm = flow = None
    if "ebm" in ckpt:
        ebm = EBM(**ckpt["ebm_spec"]).to(device)
        ebm.load_state_dict(ckpt["ebm"])
        ebm.eval()
    if "flow" in ckpt:
        flow = flow_from_spec(ckpt["flow_spec"]).to(device)
        flow.load_state_dict(ckpt["flow"])
        flow.eval()
    config = ckpt.get("config")
    if config is None:
        with open(os.path.join(run_dir, "config.json")) as fh:
            config = json.load(fh)
    return SimpleNamespace(config=config, ebm=ebm, flow=flow, step=ckpt.get("step"),
                           checkpoint=ckpt)
