"""One battery for every flow in `flows.BUILDERS` (zuko-style): a flow added to the registry
is tested here without being named. Small architectures keep the whole file fast; parameters
are randomised away from the identity initialisation, which would test little."""
import math

import pytest
import torch

import flows
import util

# `stack` holds T flows of the registry (tested here one by one) behind another interface
NOT_A_SINGLE_FLOW = {"stack"}
SMALL = {"maf": {"n_blocks": 2, "hidden": (16, 16)}, "glow": {"n_steps": 2, "hidden": (16, 16)},
         "nsf": {"n_blocks": 2, "hidden": (16, 16)},
         "nsf_coupling": {"n_blocks": 2, "hidden": (16, 16)}, "planar": {"K": 4},
         "radial": {"K": 4}, "iaf": {"K": 2, "hidden": (16, 16)},
         "realnvp": {"K": 2, "hidden": (16, 16)}, "nice": {"K": 2, "hidden": (16, 16)},
         "spline": {"K": 2, "hidden": (16, 16)}}
FLOWS = sorted(set(flows.BUILDERS) - NOT_A_SINGLE_FLOW) + ["maf_bn"]
AUTOREGRESSIVE = (flows.MAFLayer, flows.SplineAutoregressive)  # IAFLayer is a MAFLayer


def make(name, scale=0.1, seed=0):
    """A float64 flow with randomised parameters, data-initialised where it applies."""
    torch.manual_seed(seed)
    data = torch.randn(512, 2) * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -1.0])
    if name == "maf_bn":
        flow = flows.build_flow("maf", data, batch_norm=True, **SMALL["maf"])
        flow.train()
        flow.log_prob(data)  # running statistics away from their initial values
    else:
        flow = flows.build_flow(name, data, **SMALL.get(name, {}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return flow.double().eval()


def jacobian(fn, x):
    """The autograd Jacobians of fn at each row of x, shape (N, D, D)."""
    return torch.stack([torch.autograd.functional.jacobian(lambda v: fn(v[None])[0], xi)
                        for xi in x])


def test_every_registered_flow_is_in_the_battery():
    for name in flows.BUILDERS:
        assert name in FLOWS or name in NOT_A_SINGLE_FLOW
        assert name in SMALL or name in NOT_A_SINGLE_FLOW or name == "gaussian"


@pytest.mark.parametrize("name", FLOWS)
def test_log_prob_shape_and_sampling_agree(name):
    flow = make(name)
    x = torch.randn(37, 2, dtype=torch.float64)
    lp = flow.log_prob(x)
    assert lp.shape == (37,) and torch.isfinite(lp).all()
    y, lq = flow.sample_and_log_prob(64)
    assert y.shape == (64, 2) and lq.shape == (64,)
    assert torch.allclose(lq, flow.log_prob(y), atol=1e-8)


@pytest.mark.parametrize("name", FLOWS)
def test_inverse_of_forward_is_identity(name):
    flow = make(name)
    x = torch.randn(200, 2, dtype=torch.float64) * 2
    z, ld = flow(x)
    x_back, ld_inv = flow.inverse(z)
    assert torch.allclose(x_back, x, atol=1e-8)
    assert torch.allclose(ld, -ld_inv, atol=1e-8)


@pytest.mark.parametrize("name", FLOWS)
def test_log_det_equals_slogdet_of_autograd_jacobian(name):
    flow = make(name, seed=1)
    x = torch.randn(5, 2, dtype=torch.float64) * 2
    _, ld = flow(x)
    assert torch.allclose(ld, torch.linalg.slogdet(jacobian(lambda v: flow(v)[0], x))[1],
                          atol=1e-8)
    z = torch.randn(5, 2, dtype=torch.float64)
    _, ld_inv = flow.inverse(z)
    J = jacobian(lambda v: flow.inverse(v)[0], z)
    assert torch.allclose(ld_inv, torch.linalg.slogdet(J)[1], atol=1e-8)


@pytest.mark.parametrize("name", FLOWS)
def test_autoregressive_layers_have_triangular_jacobians(name):
    """In the layer's variable order, output i depends on inputs j <= i only (and on x_i)."""
    flow = make(name, scale=0.3)
    layers = [t for t in flow.transforms if isinstance(t, AUTOREGRESSIVE)]
    if not layers:
        pytest.skip(f"{name} has no autoregressive layer")
    x = torch.randn(3, 2, dtype=torch.float64)
    for t in layers:
        order = torch.argsort(t.made.input_degrees)
        for direction in (t.forward, t.inverse):
            J = jacobian(lambda v: direction(v)[0], x)[:, order][:, :, order]
            assert (J.triu(1) == 0).all()
            assert (J.diagonal(dim1=1, dim2=2) != 0).all()
            assert (J.tril(-1) != 0).any()  # and it is not merely diagonal


@pytest.mark.parametrize("name", FLOWS)
def test_density_integrates_to_one(name):
    """The grid integral of q over a box equals the mass of q's samples inside it."""
    flow = make(name).float()
    bound = 12.0
    with torch.no_grad():
        values, area = util.on_grid(flow.log_prob, bound, 400)
        inside = float((flow.sample(100_000).abs() < bound).all(1).double().mean())
    integral = math.exp(torch.logsumexp(values, 0)) * area
    assert inside > 0.95
    assert abs(integral - inside) < 5e-3


@pytest.mark.parametrize("name", FLOWS)
def test_every_parameter_receives_a_gradient(name):
    flow = make(name)
    params = [p for p in flow.parameters() if p.requires_grad]
    if not params:
        pytest.skip(f"{name} has no trainable parameters")
    x = torch.randn(64, 2, dtype=torch.float64)
    y, lq = flow.sample_and_log_prob(64)  # reparameterised samples
    (flow.log_prob(x).sum() + y.sum() + lq.sum()).backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad != 0).any()


@pytest.mark.parametrize("name", FLOWS)
def test_train_and_eval_mode_agree(name):
    flow = make(name)
    x = torch.randn(100, 2, dtype=torch.float64)
    flow.train()
    lp_train = flow.log_prob(x)
    flow.eval()
    assert torch.allclose(lp_train, flow.log_prob(x), atol=1e-10)


@pytest.mark.parametrize("name", FLOWS)
def test_save_and_load_round_trip(name, tmp_path):
    flow = make(name)
    path = tmp_path / "flow.pt"
    torch.save({"spec": flow.spec(), "state": flow.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    copy = flows.flow_from_spec(ckpt["spec"]).double()
    copy.load_state_dict(ckpt["state"])
    x = torch.randn(20, 2, dtype=torch.float64)
    assert torch.allclose(copy.eval().log_prob(x), flow.log_prob(x), atol=1e-12)


@pytest.mark.parametrize("name", ["nsf", "nsf_coupling"])
def test_splines_start_at_the_identity_and_reject_bad_settings(name):
    flow = flows.build_flow(name)
    x = torch.randn(50, 2) * 3
    z, ld = flow(x)
    assert torch.allclose(z, x, atol=1e-5) and ld.abs().max() < 1e-5
    with pytest.raises(ValueError, match="bins"):
        flows.build_flow(name, bins=0)
    with pytest.raises(ValueError, match="B > 0"):
        flows.build_flow(name, bound=-1.0)


def test_spline_tails_are_the_identity_and_inside_is_monotone():
    torch.manual_seed(0)
    params = torch.randn(1, 1, 23, dtype=torch.float64).expand(2001, 1, 23) * 2
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)[:, None]
    y, ld = flows.rational_quadratic_spline(x, params, 5.0)
    out = x.abs() >= 5
    assert torch.equal(y[out], x[out]) and (ld[out] == 0).all()
    assert (y[1:] > y[:-1]).all()
    assert (y[~out].abs() < 5).all()


@pytest.mark.parametrize("name", ["planar", "radial"])
def test_deep_vi_flows_start_near_the_identity(name):
    """32 layers at initialisation keep N(0, I) (a collapsing initialisation gives log-dets
    of many nats and samples of tiny spread)."""
    torch.manual_seed(0)
    flow = flows.build_flow(name, K=32, base="fixed")
    with torch.no_grad():
        x, ld = flow.inverse(torch.randn(5000, 2))
    assert ld.abs().mean() < 0.5
    assert torch.allclose(x.std(0), torch.ones(2), atol=0.15)
