"""Value function, datasets, grid evaluation, and NCE's recovery of log Z."""
import math

import pytest
import torch

import datasets
import evaluation
import gridmath
from flows import build_flow
import fce


# ----------------------------------------------------------------------------- value function
def test_value_is_two_log_half_when_p_equals_q():
    lp = torch.randn(1000)
    V, _ = fce.value_function(lp, lp, lp, lp)
    assert V.item() == pytest.approx(2 * math.log(0.5), abs=1e-6)


def test_value_is_monotone_in_the_right_direction():
    """V grows when p rises on data and falls when p rises on noise samples."""
    zero = torch.zeros(100)
    values = [fce.value_function(zero + d, zero, zero, zero)[0].item() for d in (-2, 0, 2)]
    assert values[0] < values[1] < values[2]
    values = [fce.value_function(zero, zero, zero + d, zero)[0].item() for d in (-2, 0, 2)]
    assert values[0] > values[1] > values[2]


def test_value_is_finite_for_huge_log_ratios():
    big = torch.tensor([1e4, -1e4])
    V, acc = fce.value_function(big, -big, -big, big)
    assert torch.isfinite(V) and V.item() < -1e3  # log sigmoid(-2e4) = -2e4, no underflow
    assert acc.item() == 0.5


# ----------------------------------------------------------------------------- data
def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="8gaussians.*checkerboard"):
        datasets.sample("nope", 10, 0)


@pytest.mark.parametrize("name", datasets.NAMES)
def test_samples_are_seeded_and_inside_the_box(name):
    a, b = datasets.sample(name, 5000, 3), datasets.sample(name, 5000, 3)
    assert torch.equal(a, b) and a.shape == (5000, 2) and a.dtype == torch.float32
    assert (a.abs() < datasets.BOUND).all(1).float().mean() > 0.998


def test_entropies_match_closed_forms():
    assert datasets.entropy("checkerboard") == pytest.approx(math.log(32), abs=1e-9)
    assert datasets.entropy("8gaussians") == pytest.approx(2.8319, abs=1e-3)


# ----------------------------------------------------------------------------- grid evaluation
def test_grid_log_Z_of_a_gaussian_energy_is_exact():
    s = 0.7
    neg_f, area = gridmath.on_grid(lambda x: -(x * x).sum(1) / (2 * s * s), 6.0, 400,
                              dtype=torch.float64)
    assert gridmath.grid_log_Z(neg_f, area) == pytest.approx(math.log(2 * math.pi * s * s), abs=1e-9)


def test_grid_kl_of_two_gaussians_is_exact():
    x, area = gridmath.grid_points(8.0, 500)
    lp = -(x * x).sum(1) / 2 - math.log(2 * math.pi)
    lq = -((x - torch.tensor([1.0, 0.0], dtype=x.dtype)) ** 2).sum(1) / 2 - math.log(2 * math.pi)
    assert gridmath.grid_kl(lp, lq, area) == pytest.approx(0.5, abs=1e-6)


def test_evaluate_2d_reports_true_model_as_optimal():
    """The data's own log-density as an 'EBM' has KL 0, NLL = entropy up to sampling error."""
    class TrueEnergy(torch.nn.Module):
        c = torch.tensor(0.0)

        def forward(self, x):
            return -datasets.log_density("8gaussians", x)

    x_test = datasets.sample("8gaussians", 50_000, 1)
    m = evaluation.evaluate_2d("8gaussians", x_test, TrueEnergy())
    assert abs(m["kl_ebm"]) < 1e-4 and abs(m["log_Z"]) < 1e-4 and m["mse_logp"] < 1e-8
    assert m["nll_ebm"] == pytest.approx(m["entropy"], abs=0.02)


# ----------------------------------------------------------------------------- NCE
class GaussianEBM(torch.nn.Module):
    """f(x) = 0.5 (x - m)^T A (x - m) with A = L L^T: a Gaussian family whose log Z is known,
    log Z = log(2 pi) - log det A / 2 (D = 2)."""

    def __init__(self):
        super().__init__()
        self.m = torch.nn.Parameter(torch.zeros(2))
        self.L = torch.nn.Parameter(torch.eye(2))
        self.c = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        d = (x - self.m) @ self.L
        return 0.5 * (d * d).sum(1)

    def log_prob(self, x):
        return -self(x) - self.c

    def log_Z(self):
        A = self.L @ self.L.T
        return math.log(2 * math.pi) - 0.5 * torch.logdet(A).item()


@pytest.mark.slow
def test_nce_recovers_log_Z_of_a_gaussian_ebm():
    torch.manual_seed(0)
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]])
    data = torch.randn(50_000, 2) @ torch.linalg.cholesky(cov).T + torch.tensor([1.0, -0.5])
    noise = build_flow("gaussian", data)
    with torch.no_grad():  # a broader noise than the data
        noise.transforms[0].chol.mul_(1.5)
    model = GaussianEBM()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    contrast = fce.Contrast(noise, 1000, seed=0, window=1)
    for i in range(1500):
        x = data[torch.randint(0, len(data), (1000,))]
        fce.fce_step(model, contrast, i, x, lambda s, x=x: x, opt, None, fce.Rule())
    true_log_Z = math.log(2 * math.pi) + 0.5 * torch.logdet(cov).item()
    assert model.c.item() == pytest.approx(model.log_Z(), abs=0.05)
    assert model.c.item() == pytest.approx(true_log_Z, abs=0.05)
    assert torch.allclose(model.m, torch.tensor([1.0, -0.5]), atol=0.05)


def test_test_log_density_is_cached_per_test_set_and_never_mixes_sets():
    import evaluation

    a = datasets.sample("spiral", 300, 0)
    b = datasets.sample("spiral", 300, 1)
    first = evaluation.test_log_density("spiral", a)
    assert evaluation.test_log_density("spiral", a) is first  # computed once
    assert torch.allclose(evaluation.test_log_density("spiral", b),
                          datasets.log_density("spiral", b.double()))
    assert torch.allclose(first, datasets.log_density("spiral", a.double()))
