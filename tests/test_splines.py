"""splines.py: the monotonic rational-quadratic spline (Durkan et al. 2019) against its
definition: inverse(forward) = id, log|dy/dx| against autograd, the identity (log-det 0)
outside [-B, B] and at all-zero parameters, strictly monotone inside, the knots it passes
through, and one-line errors for bad settings."""
import pytest
import torch

import splines

B, K = 5.0, 8


def random_params(n, d=1, scale=2.0, seed=0):
    """(n, d, 3K - 1) parameters far from the identity (float64)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, 3 * K - 1, generator=gen, dtype=torch.float64) * scale


def test_spline_tails_are_the_identity_and_inside_is_monotone():
    torch.manual_seed(0)
    params = torch.randn(1, 1, 23, dtype=torch.float64).expand(2001, 1, 23) * 2
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)[:, None]
    y, ld = splines.rational_quadratic_spline(x, params, 5.0)
    out = x.abs() >= 5
    assert torch.equal(y[out], x[out]) and (ld[out] == 0).all()
    assert (y[1:] > y[:-1]).all()
    assert (y[~out].abs() < 5).all()


def test_inverse_round_trip_both_ways():
    """x -> y -> x and y -> x -> y to float64 precision, and the two log-dets cancel, for
    parameters far from the identity and points in every bin and both tails."""
    params = random_params(4000, 2)
    x = torch.empty(4000, 2, dtype=torch.float64).uniform_(-1.2 * B, 1.2 * B)
    y, ld = splines.rational_quadratic_spline(x, params, B)
    x2, ld_inv = splines.rational_quadratic_spline(y, params, B, inverse=True)
    assert torch.allclose(x2, x, atol=1e-9)
    assert torch.allclose(ld + ld_inv, torch.zeros_like(ld), atol=1e-9)
    x3, _ = splines.rational_quadratic_spline(x, params, B, inverse=True)
    y3, _ = splines.rational_quadratic_spline(x3, params, B)
    assert torch.allclose(y3, x, atol=1e-9)


@pytest.mark.parametrize("inverse", [False, True])
def test_log_det_matches_autograd(inverse):
    """Elementwise map: log|dy/dx| of each coordinate equals the log of autograd's
    derivative, inside the interval and (0) in the tails."""
    params = random_params(500, 2, seed=1)
    x = torch.empty(500, 2, dtype=torch.float64).uniform_(-1.1 * B, 1.1 * B).requires_grad_()
    y, ld = splines.rational_quadratic_spline(x, params, B, inverse=inverse)
    (dy,) = torch.autograd.grad(y.sum(), x)
    assert (dy > 0).all()
    assert torch.allclose(ld, dy.log(), atol=1e-8)


def test_zero_params_are_the_identity_and_the_knots_are_passed_through():
    """All-zero parameters give y = x, log-det 0 (d = 1 at every knot); any parameters map
    the x-knots to the y-knots and the interval onto itself."""
    x = torch.linspace(-B, B, 101, dtype=torch.float64)[:, None]
    y, ld = splines.rational_quadratic_spline(x, torch.zeros(101, 1, 3 * K - 1,
                                                             dtype=torch.float64), B)
    assert torch.allclose(y, x, atol=1e-12) and ld.abs().max() < 1e-12
    params = random_params(1, 1, seed=2)
    xk, _ = splines._rq_knots(params[..., :K], B, splines.RQ_MIN_BIN)
    yk, _ = splines._rq_knots(params[..., K:2 * K], B, splines.RQ_MIN_BIN)
    y, _ = splines.rational_quadratic_spline(xk[0, 0][:, None], params.expand(K + 1, 1, -1), B)
    assert torch.allclose(y[:, 0], yk[0, 0], atol=1e-10)
    assert yk[0, 0, 0] == -B and yk[0, 0, -1] == B


def test_bins_keep_their_minimum_size():
    """A softmax that sends one bin almost all the width still leaves every bin
    RQ_MIN_BIN of the interval."""
    unnorm = torch.tensor([[50.0] + [-50.0] * (K - 1)], dtype=torch.float64)
    knots, sizes = splines._rq_knots(unnorm, B, splines.RQ_MIN_BIN)
    assert knots[0, 0] == -B and knots[0, -1] == B
    assert sizes.min() >= 2 * B * splines.RQ_MIN_BIN * (1 - 1e-9)


@pytest.mark.parametrize("bins, bound, match", [
    (0, 5.0, "--nsf_bins"), (2.5, 5.0, "--nsf_bins"), (8, 0.0, "--nsf_bound"),
    (8, float("inf"), "--nsf_bound"), (8, float("nan"), "--nsf_bound")])
def test_check_spline_names_the_flag(bins, bound, match):
    with pytest.raises(ValueError, match=match) as e:
        splines.check_spline(bins, bound)
    assert "\n" not in str(e.value)
    splines.check_spline(8, 5.0)  # good settings pass
