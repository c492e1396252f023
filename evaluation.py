"""Exact evaluation of 2D densities: an EBM normalised on a grid and a flow, against the
data's known density where it has one (`evaluate_2d`), one line of its numbers
(`format_metrics`), and the effective sample size of importance weights.

The grid integration itself (float64 log Z and KL on [-b, b]^2) is in gridmath.py.
"""
import math

import torch

import datasets
from gridmath import grid_kl, grid_log_Z, in_chunks, on_grid


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
    log_true = true_test = None
    if datasets.has_density(dataset):
        log_true = datasets.grid_log_density(dataset, bound, n)
        out["entropy"] = datasets.entropy(dataset)
        true_test = test_log_density(dataset, x_test)
    if ebm is not None:
        neg_f, area = on_grid(lambda x: -ebm(x), bound, n, device)
        log_Z = grid_log_Z(neg_f, area)
        out["log_Z"] = log_Z
        out["c_gap"] = float(ebm.c.detach()) - log_Z
        log_p_test = in_chunks(lambda v: -ebm(v), x_test) - log_Z
        out["nll_ebm"] = float(-log_p_test.mean())
        if log_true is not None:
            out["kl_ebm"] = grid_kl(log_true, neg_f - log_Z, area)
            ok = torch.isfinite(true_test)
            out["mse_logp"] = float(((log_p_test - true_test)[ok] ** 2).mean())
    if flow is not None:
        log_q_test = in_chunks(flow.log_prob, x_test)
        out["nll_flow"] = float(-log_q_test.mean())
        if log_true is not None:
            diff = true_test - log_q_test
            diff = diff[torch.isfinite(diff)]
            out["kl_flow_mc"] = float(diff.mean())
            out["kl_flow_mc_se"] = float(diff.std() / math.sqrt(len(diff)))
            log_q, area = on_grid(flow.log_prob, bound, n, device)
            out["kl_flow"] = grid_kl(log_true, log_q, area)
            hole = log_q < log_true - 10
            out["hole_mass"] = float(log_true[hole].exp().sum() * area)
    return out


_TEST_LOG_DENSITY: dict = {}


def test_log_density(dataset: str, x_test: torch.Tensor) -> torch.Tensor:
    """log p_data at the test points (float64, CPU), computed once per test set: a run
    evaluates the same points many times, and the quadrature densities (spiral, moons,
    swissroll) cost seconds per call. The key holds the points' sums, so another set of
    points is never served from the cache."""
    x = x_test.detach().cpu().double()
    key = (dataset, tuple(x.shape), float(x.sum()), float((x * x).sum()), float(x[:1].sum()))
    if key not in _TEST_LOG_DENSITY:
        if len(_TEST_LOG_DENSITY) >= 4:
            _TEST_LOG_DENSITY.clear()
        _TEST_LOG_DENSITY[key] = datasets.log_density(dataset, x)
    return _TEST_LOG_DENSITY[key]


def format_metrics(m):
    """One line of `evaluate_2d`'s numbers: NLLs, the entropy (the optimum), KLs, c - log Z,
    and the held-out score-matching loss where a run reports it."""
    parts = []
    for key, label in (("nll_ebm", "NLL ebm"), ("nll_flow", "NLL flow"), ("entropy", "H"),
                       ("kl_ebm", "KL ebm"), ("kl_flow", "KL flow"), ("c_gap", "c - log Z"),
                       ("sm_loss_test", "SM loss (test)")):
        if key in m:
            parts.append(f"{label} {m[key]:+.3f}" if key == "c_gap" else f"{label} {m[key]:.4f}")
    return " | ".join(parts)
