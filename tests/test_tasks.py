"""tasks.py's 2D task (tasks.Toy2D): the data are fixed by the seed, a batch is the training
rows asked for (whatever the iteration), it is scored on the grid and drawn; and the fixed
validation split the image task holds out. (tasks.Images is tested in test_reported.py,
test_tilt_flow.py and test_train_density.py.)"""
import argparse
import os

import pytest
import torch
from PIL import Image

import datasets
import flows
import tasks
import util
from ebm import EBM


def toy(seed=0, dataset="rings", samples=300, test_samples=200):
    args = argparse.Namespace(seed=seed, dataset=dataset, samples=samples,
                              test_samples=test_samples)
    return tasks.make_task(args, "cpu")


# ----------------------------------------------------------------------------- data
def test_toy_data_are_fixed_by_the_seed():
    """The same seed gives the same training and held-out sets (a resumed or repeated run
    sees the same data); another seed other data; the held-out set is not the training
    set; a Gaussian or a flow is fitted on the training rows."""
    a, b, c = toy(0), toy(0), toy(1)
    assert isinstance(a, tasks.Toy2D) and a.dim == 2 and a.n_train == 300
    assert a.x_train.shape == (300, 2) and a.x_test.shape == (200, 2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.x_train, c.x_train) and not torch.equal(a.x_test, c.x_test)
    assert not torch.equal(a.x_train[:200], a.x_test)
    assert a.x_fit is a.x_train
    want = datasets.sample("rings", 300, util.set_seed(0))  # the set's own sampler, seeded
    assert torch.equal(a.x_train, want)


@pytest.mark.parametrize("name", ["8gaussians", "checkerboard", "moons"])
def test_every_toy_set_is_a_toy_task(name):
    t = toy(dataset=name, samples=50, test_samples=40)
    assert isinstance(t, tasks.Toy2D) and t.dataset == name and t.x_train.shape == (50, 2)


def test_a_batch_is_the_training_rows_asked_for_at_any_step():
    t = toy()
    idx = torch.tensor([5, 0, 299, 5])
    x = t.batch(idx, step=0)
    assert torch.equal(x, t.x_train[idx])
    assert all(torch.equal(t.batch(idx, step), x) for step in (1, 2, 1234))


# ----------------------------------------------------------------------------- scores, figure
def test_evaluate_scores_on_the_grid_and_drops_c_gap_without_a_learned_c():
    """Toy2D.evaluate is evaluation.evaluate_2d on the held-out rows; an EBM whose c is not
    learned (score matching) reports no c_gap."""
    torch.manual_seed(0)
    t = toy(test_samples=500)
    ebm, flow = EBM(2, (16,)), flows.build_flow("gaussian", t.x_fit)
    m = t.evaluate(ebm, flow)
    assert {"nll_flow", "nll_ebm", "kl_ebm", "kl_flow", "c_gap", "log_Z"} <= set(m)
    assert m["nll_flow"] == pytest.approx(float(-flow.log_prob(t.x_test).mean()), rel=1e-5)
    assert m["c_gap"] == pytest.approx(-m["log_Z"])  # c starts at 0
    ebm.c.requires_grad_(False)
    assert "c_gap" not in t.evaluate(ebm, None) and "nll_flow" not in t.evaluate(ebm, None)


def test_figure_draws_data_flow_and_ebm_panels(tmp_path):
    torch.manual_seed(0)
    t = toy()
    flow = flows.build_flow("gaussian", t.x_fit)
    three = t.figure(str(tmp_path / "f" / "epoch_0001.png"), EBM(2, (8,)), flow, "epoch 1")
    one = t.figure(str(tmp_path / "data.png"), None, None, "data only")
    assert os.path.getsize(three) > 0 and os.path.getsize(one) > 0
    assert Image.open(three).size[0] == 3 * Image.open(one).size[0]  # one panel each


# ----------------------------------------------------------------------------- validation split
def test_validation_split_is_fixed_and_disjoint():
    x = torch.arange(100.0)[:, None]
    tr, va = tasks.validation_split(x)
    tr2, va2 = tasks.validation_split(x)
    assert len(va) == 10 and len(tr) == 90 and torch.equal(va, va2)
    assert not set(tr[:, 0].tolist()) & set(va[:, 0].tolist())


@pytest.mark.parametrize("n, fraction, n_val", [(1348, 0.1, 134), (5, 0.1, 1), (50, 0.3, 15)])
def test_validation_split_sizes_cover_every_row(n, fraction, n_val):
    """int(n * fraction) rows held out (at least one), the rest kept, every row in exactly
    one part, the same rows whatever the global seed."""
    x = torch.arange(float(n))[:, None]
    torch.manual_seed(123)
    tr, va = tasks.validation_split(x, fraction)
    torch.manual_seed(7)
    assert torch.equal(tasks.validation_split(x, fraction)[1], va)
    assert len(va) == n_val and len(tr) == n - n_val
    assert sorted(torch.cat([tr, va])[:, 0].tolist()) == list(range(n))
