"""The continuous density of the images and its units (dequantize.py)."""
import math

import pytest
import torch

import dequantize as dq


def test_levels_round_trip_and_dequantised_points_stay_in_their_cell():
    L = 17
    k = torch.randint(0, L, (50, 64)).float()
    x = 2 * k / (L - 1) - 1
    assert torch.equal(dq.levels(x, L), k)
    y = dq.dequantize(x, L, torch.Generator().manual_seed(1))
    v = (y + 1) * L / 2          # back on the [0, L) scale
    assert ((v >= k) & (v < k + 1)).all()


def test_off_lattice_images_are_refused():
    with pytest.raises(ValueError, match="lattice"):
        dq.levels(torch.tensor([[0.01, 0.5]]), 17)


def test_uniform_density_scores_log2_L_bits_per_dim():
    """The uniform density on [-1, 1]^D, log p_y = -D log 2, is uniform on [0, L)^D:
    log p_v = -D log L, i.e. log2(L) bits per dimension."""
    D, L = 64, 17
    log_p_y = torch.tensor(-D * math.log(2.0))
    assert float(dq.to_nats(log_p_y, D, L)) == pytest.approx(-D * math.log(L))
    assert float(dq.bits_per_dim(log_p_y, D, L)) == pytest.approx(math.log2(L))


def test_dequantised_log_likelihood_bounds_the_discrete_one():
    """For a product density p_y, E_u log p_v(k + u) <= log P(k) where P(k) is the mass of
    the cell: checked on a 1-pixel Gaussian with the mass integrated exactly."""
    L = 5
    normal = torch.distributions.Normal(torch.tensor(0.2, dtype=torch.float64), 0.4)
    k = torch.arange(L, dtype=torch.float64)
    lo, hi = 2 * k / L - 1, 2 * (k + 1) / L - 1
    log_P = torch.log(normal.cdf(hi) - normal.cdf(lo))
    u = torch.linspace(0.0005, 0.9995, 1000, dtype=torch.float64)
    y = 2 * (k[:, None] + u) / L - 1
    mean_log_pv = dq.to_nats(normal.log_prob(y), 1, L).mean(1)
    assert (mean_log_pv <= log_P + 1e-9).all()
    # and tight to within the curvature of log p over a cell (0.24 nats at the far tail
    # cell here): a Jacobian off by log 2 per pixel breaks one of the two
    assert (log_P - mean_log_pv).max() < 0.3


def test_the_test_set_is_the_same_draw_every_time():
    x = 2 * torch.randint(0, 17, (10, 64)).float() / 16 - 1
    assert torch.equal(dq.test_set(x, 17), dq.test_set(x, 17))
