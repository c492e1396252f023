"""Exact densities of every toy set: normalised, equal to what the sampler draws (a chi-square
test on a million samples), and quadratures converged in their number of nodes."""
import math

import numpy as np
import pytest
import torch

import datasets

# the sets whose densities are the slowest on the grid (quadratures, root scans): slow tier
SLOWEST = ("2spirals", "spiral", "pinwheel", "swissroll")
SETS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOWEST else n for n in datasets.NAMES]


def test_every_dataset_has_an_exact_density():
    assert all(datasets.has_density(n) for n in datasets.NAMES)


@pytest.mark.parametrize("name", SETS)
def test_density_integrates_to_one(name):
    # the deficit of the most spread set (rings4) is 1.6e-5 of mass outside the square
    lp = datasets.grid_log_density(name)
    area = (2 * datasets.BOUND / datasets.GRID) ** 2
    assert lp.dtype == torch.float64 and not torch.isnan(lp).any()
    assert float(lp.exp().sum()) * area == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize("name", SETS)
def test_density_matches_a_million_samples(name):
    """Pearson's chi-square of a 30 x 30 histogram of 10^6 samples against the bin masses of
    the exact density (12 x 12 grid cells per bin) stays within 5 sd of its expectation (the
    degrees of freedom). A density off by a few percent anywhere fails by far."""
    n, bins = 1_000_000, 30
    x = datasets.sample(name, n, 7).numpy()
    edges = np.linspace(-datasets.BOUND, datasets.BOUND, bins + 1)
    counts = np.histogram2d(x[:, 1], x[:, 0], [edges, edges])[0]  # rows: y, as the grid
    k = datasets.GRID // bins
    p = datasets.grid_log_density(name).exp().reshape(datasets.GRID, datasets.GRID).numpy()
    mass = p.reshape(bins, k, bins, k).sum((1, 3)) * (2 * datasets.BOUND / datasets.GRID) ** 2
    expected = n * mass
    used = expected > 20
    chi2 = float((((counts - expected) ** 2)[used] / expected[used]).sum())
    dof = int(used.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)
    assert counts[~used].sum() < 25 * (~used).sum() + 50  # and nothing hides in unused bins


@pytest.mark.slow
@pytest.mark.parametrize("name,fn", [("spiral", datasets._log_spiral),
                                     ("moons", datasets._log_moons),
                                     ("swissroll", datasets._log_swissroll)])
def test_quadratures_have_converged(name, fn):
    """Against 4x the nodes: mean error of log p over samples below 1e-5 nats, below 1e-3 where
    log p > -5 (98% of samples; the error grows in the far tails beyond the curves' ends)."""
    x = datasets.sample(name, 3000, 1).double()
    default = fn(x)
    err = (default - fn(x, m=4 * fn.__defaults__[0])).abs()
    assert err.mean() < 1e-5
    assert err[default > -5].max() < 1e-3


def test_pinwheel_root_scan_has_converged():
    x = datasets.sample("pinwheel", 3000, 1).double()
    assert (datasets._log_pinwheel(x) - datasets._log_pinwheel(x, scan=512, bisections=60)
            ).abs().max() < 1e-6


@pytest.mark.slow
def test_noisy_circle_closed_form_against_quadrature():
    """The Bessel closed form equals the quadrature over the angle."""
    x = datasets.sample("rings", 2000, 2).double()
    a = torch.linspace(0, 2 * math.pi, 2001, dtype=torch.float64)[:-1]
    logs = []
    for r in (3.0, 2.25, 1.5, 0.75):
        c = r * torch.stack([torch.cos(a), torch.sin(a)], 1)
        d2 = ((x[:, None] - c[None]) ** 2).sum(-1)
        logs.append(torch.logsumexp(-d2 / (2 * 0.08 ** 2), 1) - math.log(2000)
                    - math.log(2 * math.pi * 0.08 ** 2))
    quad = torch.logsumexp(torch.stack(logs), 0) - math.log(4)
    assert torch.allclose(datasets.log_density("rings", x), quad, atol=1e-9)


@pytest.mark.slow
def test_entropies_are_cross_entropies_of_samples():
    """H from the grid equals the Monte Carlo -E log p over 100k samples (within 4 sd)."""
    for name in datasets.NAMES:
        s = datasets.sample(name, 100_000, 0).double()
        lp = datasets.log_density(name, s)
        assert -float(lp.mean()) == pytest.approx(
            datasets.entropy(name), abs=4 * float(lp.std()) / math.sqrt(1e5) + 1e-9)
