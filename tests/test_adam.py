"""adam.Adam: torch.optim.Adam's numbers and state_dict, without importing torch._dynamo."""
import copy
import subprocess
import sys

import pytest
import torch

import adam


def net(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1),
                               torch.nn.Linear(1, 1))


def train(model, opt, steps, start=0):
    """Steps with a changing learning rate; the last layer gets no gradient on odd steps."""
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    for i in range(start, start + steps):
        for g in opt.param_groups:
            g["lr"] = 3e-3 * (1 - i / 400)
        opt.zero_grad(set_to_none=True)
        out = model[:3](x) if i % 2 else model(x)
        (out ** 2).mean().backward()
        opt.step()


def same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_the_same_weights_as_torch_adam_bit_for_bit():
    a, b = net(), net()
    train(a, torch.optim.Adam(a.parameters(), 1e-3, betas=(0.8, 0.99)), 150)
    train(b, adam.Adam(b.parameters(), 1e-3, betas=(0.8, 0.99)), 150)
    assert same(a, b)
    assert not same(a, net())


def test_state_dicts_load_both_ways_and_continue_exactly():
    ref = net()
    opt = torch.optim.Adam(ref.parameters(), 1e-3)
    train(ref, opt, 40)
    mid = {k: v.clone() for k, v in ref.state_dict().items()}
    saved = copy.deepcopy(opt.state_dict())  # a snapshot, as a checkpoint file holds
    train(ref, opt, 40, start=40)
    ours = net()
    ours.load_state_dict(mid)
    o = adam.Adam(ours.parameters(), 5.0)
    o.load_state_dict(saved)  # torch's state_dict into ours
    assert o.param_groups[0]["lr"] == saved["param_groups"][0]["lr"]
    back = net()
    back.load_state_dict(mid)
    t = torch.optim.Adam(back.parameters(), 5.0)
    t.load_state_dict(copy.deepcopy(o.state_dict()))  # ours into torch's
    train(ours, o, 40, start=40)
    train(back, t, 40, start=40)
    assert same(ref, ours) and same(ref, back)


@pytest.mark.slow
def test_building_and_stepping_imports_no_dynamo():
    code = ("import sys, torch, adam\n"
            "m = torch.nn.Linear(2, 2); o = adam.Adam(m.parameters())\n"
            "m(torch.ones(1, 2)).sum().backward(); o.step()\n"
            "print('torch._dynamo' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "False", res.stderr
