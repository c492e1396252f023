"""util.py: seeds, devices, the random-number-generator state a checkpoint carries, module
modes, learning-rate schedules and the guarded optimiser step. (The evaluation's own stream,
`fixed_rng`, and `lr_factor`'s values are tested in test_scaffold.py.)"""
import math
import random

import numpy as np
import pytest
import torch

import util


# ----------------------------------------------------------------------------- seeds
def draws():
    """One draw from each stream a seed fixes: torch, NumPy's global state, Python."""
    return torch.rand(3), np.random.rand(3), random.random()


def same(a, b):
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_set_seed_fixes_every_stream_and_returns_the_data_generator():
    gen = util.set_seed(7)
    first, data = draws(), gen.random(4)
    gen = util.set_seed(7)
    assert same(draws(), first) and np.array_equal(gen.random(4), data)
    assert np.array_equal(util.set_seed(7).random(4), np.random.default_rng(7).random(4))
    util.set_seed(8)
    other = draws()
    assert not torch.equal(other[0], first[0]) and other[2] != first[2]


# ----------------------------------------------------------------------------- devices
def test_get_device_names_and_auto():
    assert util.get_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "mps" if util._mps_available() else "cpu"
    assert util.get_device("auto").type == want
    assert util.get_device().type == want


@pytest.mark.parametrize("name, match", [
    ("gpu0", "is not a device name"),
    ("meta", "is not supported"),
    pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param("cuda:3", "CUDA is not available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param("mps", "MPS", marks=pytest.mark.skipif(
        util._mps_available(), reason="this machine has MPS")),
])
def test_get_device_rejects_what_this_machine_lacks_in_one_line(name, match):
    with pytest.raises(ValueError, match=match) as e:
        util.get_device(name)
    assert "\n" not in str(e.value) and "use" in str(e.value)


def test_get_device_counts_cuda_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert util.get_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="2 CUDA device"):
        util.get_device("cuda:2")


# ----------------------------------------------------------------------------- RNG state
def test_rng_state_round_trip_through_a_checkpoint_file(tmp_path):
    """A resumed run draws exactly what the uninterrupted one would have: the state, saved
    with torch.save and loaded with weights_only=True (plain types and tensors only), puts
    torch, NumPy and Python back where they were."""
    util.set_seed(3)
    draws()
    state = util.rng_state()
    expected = draws()
    torch.save(state, tmp_path / "rng.pt")
    util.set_seed(99)
    draws()
    util.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert same(draws(), expected)
    np.random.standard_normal()  # NumPy's cached Gaussian (has_gauss) round-trips too
    state = util.rng_state()
    gauss = np.random.standard_normal(3)
    util.set_rng_state(state)
    assert np.array_equal(np.random.standard_normal(3), gauss)


def test_set_rng_state_accepts_a_state_without_numpy():
    """Checkpoints written before NumPy's state was saved still restore torch and Python."""
    state = util.rng_state()
    expected = draws()
    del state["numpy"]
    util.set_rng_state(state)
    got = draws()
    assert torch.equal(got[0], expected[0]) and got[2] == expected[2]


# ----------------------------------------------------------------------------- modes
def test_mode_sets_and_restores_each_submodules_own_mode():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    net.train()
    net[1].eval()  # a submodule kept in eval mode by its owner
    with util.mode(net, training=False) as m:
        assert m is net and not any(sub.training for sub in net.modules())
    assert net.training and net[0].training and not net[1].training
    net.eval()
    with pytest.raises(RuntimeError):
        with util.mode(net, training=True):
            assert all(sub.training for sub in net.modules())
            raise RuntimeError("restored even on an exception")
    assert not any(sub.training for sub in net.modules())


# ----------------------------------------------------------------------------- schedules
def test_lr_schedules_shapes_and_unknown_name():
    """Cosine falls monotonically from 1 to its floor and stays there past the end;
    exponential is decay^t until it meets the floor; an unknown name raises."""
    cos = [util.lr_factor("cosine", t, 100, floor=0.2) for t in range(0, 151, 5)]
    assert cos[0] == pytest.approx(1.0) and all(a >= b for a, b in zip(cos, cos[1:]))
    assert cos[20:] == pytest.approx([0.2] * len(cos[20:]))
    exp = [util.lr_factor("exponential", t, 100, floor=0.1, decay=0.9) for t in range(40)]
    assert exp[:21] == pytest.approx([0.9 ** t for t in range(21)])
    assert min(exp) == pytest.approx(0.1) and exp[-1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule 'linear'"):
        util.lr_factor("linear", 1, 10)


def test_set_lr_sets_every_parameter_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    util.set_lr(opt, 0.03)
    assert [g["lr"] for g in opt.param_groups] == [0.03, 0.03]


# ----------------------------------------------------------------------------- guarded step
def sgd_pair():
    a = torch.nn.Parameter(torch.tensor([1.0]))
    b = torch.nn.Parameter(torch.tensor([2.0]))
    unused = torch.nn.Parameter(torch.tensor([5.0]))
    return a, b, unused, torch.optim.SGD([a, unused], lr=0.1), torch.optim.SGD([b], lr=0.1)


def test_guarded_step_descends_ascends_and_skips_unused_parameters():
    """loss = a b: `opt` descends in a (a - 0.1 b), `ascend` climbs in b (b + 0.1 a); a
    parameter the loss does not use gets no gradient and stays where it is."""
    a, b, unused, opt, up = sgd_pair()
    assert util.guarded_step(opt, (a * b).sum(), ascend=up) is True
    assert a.item() == pytest.approx(1.0 - 0.1 * 2.0)
    assert b.item() == pytest.approx(2.0 + 0.1 * 1.0)
    assert unused.item() == 5.0 and unused.grad is None
    assert util.guarded_step(opt, (a * a).sum()) is True  # no ascending optimiser
    assert a.item() == pytest.approx(0.8 - 0.1 * 1.6)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_guarded_step_takes_no_step_on_a_non_finite_gradient(bad):
    a, b, unused, opt, up = sgd_pair()
    loss = (a * b * torch.tensor([bad])).sum()
    assert util.guarded_step(opt, loss, ascend=up) is False
    assert (a.item(), b.item(), unused.item()) == (1.0, 2.0, 5.0)
    assert a.grad is None and b.grad is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_guarded_step_sees_one_bad_entry_among_many(bad):
    """A single non-finite entry in one of several multi-entry gradients stops the step."""
    w = torch.ones(50, requires_grad=True)
    v = torch.ones(3, requires_grad=True)
    scale = torch.ones(50)
    scale[17] = bad
    opt = torch.optim.SGD([v, w], lr=0.1)
    assert util.guarded_step(opt, (v * v).sum() + (w * scale).sum()) is False
    assert torch.equal(w.detach(), torch.ones(50)) and torch.equal(v.detach(), torch.ones(3))
    assert util.guarded_step(opt, (v * v).sum() + w.sum()) is True
    assert torch.allclose(v.detach(), torch.full((3,), 0.8))
