"""One battery for every flow in `flows.BUILDERS` and `vi_flows.VI_BUILDERS` (zuko-style), in
D = 2, 8 and 64: a flow added to either registry is tested here without being named. The VI
stacks (`vi_flows.stack`, one flow per target) have their own checks at the end. Small
architectures (fewer, narrower layers at D = 64) keep the whole file fast; parameters are
randomised away from the identity initialisation, which would test little."""
import math

import pytest
import torch

import flows
import gridmath
import vi_flows

DIMS = (2, 8, 64)
# `stack` holds T flows of the registry behind another interface: tested by the stack checks
NOT_A_SINGLE_FLOW = {"stack"}
NET = {"hidden": (16, 16)}
SMALL = {"maf": {"n_blocks": 2, **NET}, "glow": {"n_steps": 2, **NET},
         "nsf": {"n_blocks": 2, **NET}, "nsf_coupling": {"n_blocks": 2, **NET},
         "gaussian": {}, "planar": {"K": 4}, "radial": {"K": 4}, "iaf": {"K": 2, **NET},
         "realnvp": {"K": 2, **NET}, "nice": {"K": 2, **NET}, "spline": {"K": 2, **NET}}
# D = 64: one hidden layer of 8, as few layers as still alternate (every coordinate moves)
SMALL_64 = {"maf": {"n_blocks": 2, "hidden": (8,)}, "glow": {"n_steps": 2, "hidden": (8,)},
            "nsf": {"n_blocks": 2, "hidden": (8,), "bins": 4},
            "nsf_coupling": {"n_blocks": 2, "hidden": (8,), "bins": 4},
            "gaussian": {}, "planar": {"K": 2}, "radial": {"K": 2},
            "iaf": {"K": 2, "hidden": (8,)}, "realnvp": {"K": 2, "hidden": (8,)},
            "nice": {"K": 2, "hidden": (8,)}, "spline": {"K": 2, "hidden": (8,), "bins": 4}}
DENSITY = sorted(flows.BUILDERS) + ["maf_bn"]
VI = sorted(set(vi_flows.VI_BUILDERS) - NOT_A_SINGLE_FLOW)
FLOWS = DENSITY + VI
SLOW_AT = {8: pytest.mark.slow, 64: pytest.mark.slow}  # the fast tier: D = 2
CASES = [pytest.param(name, dim, id=f"{name}-D{dim}", marks=SLOW_AT.get(dim, ()))
         for name in FLOWS for dim in DIMS]
AUTOREGRESSIVE = (flows.MAFLayer, flows.SplineAutoregressive)  # IAFLayer is a MAFLayer
# stacks: the batched PlanarStack and the FlowStack loop (planar unbatched, a coupling flow)
STACKS = {"planar": ({"name": "planar", "K": 3, "base": "learned"}, True),
          "planar_loop": ({"name": "planar", "K": 2, "base": "learned"}, False),
          "realnvp": ({"name": "realnvp", "K": 2, "hidden": [8], "base": "learned"}, True)}
STACK_CASES = [pytest.param(name, dim, id=f"stack-{name}-D{dim}", marks=SLOW_AT.get(dim, ()))
               for name in STACKS for dim in DIMS]
N_TARGETS = 2


def _sizes(name, dim):
    return (SMALL_64 if dim == 64 else SMALL)["maf" if name == "maf_bn" else name]


def _data(dim, n=512):
    """Data with a scale and a shift per coordinate (for ActNorm, BatchNorm and the Gaussian)."""
    scale = torch.linspace(0.5, 2.0, dim)
    return torch.randn(n, dim) * scale + torch.linspace(-1.0, 1.0, dim)


def _randomise(module, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def make(name, dim=2, scale=0.1, seed=0):
    """A float64 flow with randomised parameters, data-initialised where it applies.
    The perturbation shrinks as 1 / sqrt(D / 2) so that layers stay well conditioned at D = 64
    (a fixed 0.1 on every entry of a 64 x 64 LU factor gives cond(W) ~ 1e4)."""
    torch.manual_seed(seed)
    data = _data(dim)
    kw = _sizes(name, dim)
    if name == "maf_bn":
        flow = flows.build_flow("maf", data, dim=dim, batch_norm=True, **kw)
        flow.train()
        flow.log_prob(data)  # running statistics away from their initial values
    elif name in flows.BUILDERS:
        flow = flows.build_flow(name, data, dim=dim, **kw)
    else:
        flow = vi_flows.build_flow(name, dim=dim, **kw)
    _randomise(flow, scale / math.sqrt(max(dim / 2, 1)), seed)
    return flow.double().eval()


def make_stack(name, dim, seed=0):
    torch.manual_seed(seed)
    flow_spec, batched = STACKS[name]
    s = vi_flows.stack({**flow_spec, "dim": dim}, N_TARGETS, batched=batched)
    _randomise(s, 0.3 / math.sqrt(max(dim / 2, 1)), seed)
    return s.double()


def jacobian(fn, x):
    """The autograd Jacobians of fn at each row of x, shape (N, D, D) (the D backward passes
    of a row batched into one: vectorize)."""
    return torch.stack([torch.autograd.functional.jacobian(lambda v: fn(v[None])[0], xi,
                                                           vectorize=True) for xi in x])


def randn(n, dim, scale=1.0, seed=0):
    return scale * torch.randn(n, dim, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(seed))


def test_every_registered_flow_is_in_the_battery():
    for name in [*flows.BUILDERS, *vi_flows.VI_BUILDERS]:
        assert name in FLOWS or name in NOT_A_SINGLE_FLOW
        assert name in SMALL and name in SMALL_64 or name in NOT_A_SINGLE_FLOW
    assert set(vi_flows.VI_FLOWS) <= set(VI)
    assert not set(flows.BUILDERS) & set(vi_flows.VI_BUILDERS)  # one registry per name


@pytest.mark.parametrize("name, dim", CASES)
def test_log_prob_shape_and_sampling_agree(name, dim):
    flow = make(name, dim)
    x = randn(37, dim)
    lp = flow.log_prob(x)
    assert lp.shape == (37,) and torch.isfinite(lp).all()
    y, lq = flow.sample_and_log_prob(64)
    assert y.shape == (64, dim) and lq.shape == (64,)
    assert torch.allclose(lq, flow.log_prob(y), atol=1e-8)


@pytest.mark.parametrize("name, dim", CASES)
def test_inverse_of_forward_is_identity(name, dim):
    flow = make(name, dim)
    x = randn(200, dim, scale=2.0)
    z, ld = flow(x)
    x_back, ld_inv = flow.inverse(z)
    assert torch.allclose(x_back, x, atol=1e-8)
    assert torch.allclose(ld, -ld_inv, atol=1e-8)


@pytest.mark.parametrize("name, dim", CASES)
def test_log_det_equals_slogdet_of_autograd_jacobian(name, dim):
    flow = make(name, dim, seed=1)
    n = 2 if dim == 64 else 5
    x = randn(n, dim, scale=2.0, seed=1)
    _, ld = flow(x)
    assert torch.allclose(ld, torch.linalg.slogdet(jacobian(lambda v: flow(v)[0], x))[1],
                          atol=1e-8)
    z = randn(n, dim, seed=2)
    _, ld_inv = flow.inverse(z)
    J = jacobian(lambda v: flow.inverse(v)[0], z)
    assert torch.allclose(ld_inv, torch.linalg.slogdet(J)[1], atol=1e-8)


@pytest.mark.parametrize("name, dim", CASES)
def test_autoregressive_layers_have_triangular_jacobians(name, dim):
    """In the layer's variable order, output i depends on inputs j <= i only (and on x_i)."""
    flow = make(name, dim, scale=0.3)
    layers = [t for t in flow.transforms if isinstance(t, AUTOREGRESSIVE)]
    if not layers:
        pytest.skip(f"{name} has no autoregressive layer (nothing triangular to check)")
    x = randn(2 if dim == 64 else 3, dim)
    for t in layers:
        order = torch.argsort(t.made.input_degrees)
        for direction in (t.forward, t.inverse):
            J = jacobian(lambda v: direction(v)[0], x)[:, order][:, :, order]
            assert (J.triu(1) == 0).all()
            assert (J.diagonal(dim1=1, dim2=2) != 0).all()
            assert (J.tril(-1) != 0).any()  # and it is not merely diagonal


@pytest.mark.parametrize("name, dim", CASES)
def test_density_integrates_to_one(name, dim):
    """The grid integral of q over a box equals the mass of q's samples inside it."""
    if dim != 2:
        pytest.skip(f"a grid integral needs 400^D points (D = {dim}); normalisation in D > 2 "
                    f"rests on the log-det checks against autograd")
    flow = make(name, dim).float()
    bound = 12.0
    with torch.no_grad():
        values, area = gridmath.on_grid(flow.log_prob, bound, 400)
        inside = float((flow.sample(100_000).abs() < bound).all(1).double().mean())
    integral = math.exp(torch.logsumexp(values, 0)) * area
    assert inside > 0.95
    assert abs(integral - inside) < 5e-3


@pytest.mark.parametrize("name, dim", CASES)
def test_every_parameter_receives_a_gradient(name, dim):
    flow = make(name, dim)
    params = [p for p in flow.parameters() if p.requires_grad]
    if not params:
        pytest.skip(f"{name} has no trainable parameters (a fixed Gaussian)")
    x = randn(64, dim)
    y, lq = flow.sample_and_log_prob(64)  # reparameterised samples
    (flow.log_prob(x).sum() + y.sum() + lq.sum()).backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad != 0).any()


@pytest.mark.parametrize("name, dim", CASES)
def test_train_and_eval_mode_agree(name, dim):
    flow = make(name, dim)
    x = randn(100, dim)
    flow.train()
    lp_train = flow.log_prob(x)
    flow.eval()
    assert torch.allclose(lp_train, flow.log_prob(x), atol=1e-10)


@pytest.mark.parametrize("name, dim", CASES)
def test_save_and_load_round_trip(name, dim, tmp_path):
    """Through the checkpoint route (vi_flows.flow_from_spec takes both registries' specs)
    and, for density flows, flows.flow_from_spec as well."""
    flow = make(name, dim)
    path = tmp_path / "flow.pt"
    torch.save({"spec": flow.spec(), "state": flow.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    rebuild = [vi_flows.flow_from_spec] + ([flows.flow_from_spec] if name in DENSITY else [])
    x = randn(20, dim)
    for from_spec in rebuild:
        copy = from_spec(ckpt["spec"]).double()
        copy.load_state_dict(ckpt["state"])
        assert type(copy) is flows.Flow
        assert torch.allclose(copy.eval().log_prob(x), flow.log_prob(x), atol=1e-12)


# ----------------------------------------------------------------------------- VI stacks
def test_every_stack_kind_is_in_the_battery():
    kinds = {type(make_stack(name, 2)) for name in STACKS}
    assert kinds == {vi_flows.PlanarStack, vi_flows.FlowStack}


@pytest.mark.parametrize("name, dim", STACK_CASES)
def test_stack_samples_are_its_flows_samples(name, dim):
    """Target t's samples and log q from the stack equal those of `flow(t)` on the same base
    draws, and log q equals the density direction at those samples (`log_prob`)."""
    s = make_stack(name, dim)
    z = torch.randn(N_TARGETS, 16, dim, dtype=torch.float64)
    x, lq = s.sample_and_log_prob(16, z)
    assert x.shape == (N_TARGETS, 16, dim) and lq.shape == (N_TARGETS, 16)
    assert len(s) == N_TARGETS
    for t in range(N_TARGETS):
        xt, lqt = s.flow(t).sample_and_log_prob(16, z[t])
        assert torch.allclose(xt, x[t], atol=1e-10) and torch.allclose(lqt, lq[t], atol=1e-10)
        assert torch.allclose(s.log_prob(x[t])[t], lq[t], atol=1e-8)


@pytest.mark.parametrize("name, dim", STACK_CASES)
def test_stack_log_q_equals_slogdet_of_autograd_jacobian(name, dim):
    """log q(x) = log N(z) - log|det dx/dz| with the Jacobian of the stack's own batched
    sampling path (not of the per-target flows)."""
    s = make_stack(name, dim, seed=1)
    n = 2
    z = torch.randn(N_TARGETS, n, dim, dtype=torch.float64)
    _, lq = s.sample_and_log_prob(n, z)
    for t in range(N_TARGETS):
        for i in range(n):
            def x_of(v, t=t, i=i):
                zz = z.clone()
                zz[t, i] = v
                return s.sample_and_log_prob(n, zz)[0][t, i]
            J = torch.autograd.functional.jacobian(x_of, z[t, i])
            expected = flows.std_normal_log_prob(z[t, i]) - torch.linalg.slogdet(J)[1]
            assert torch.allclose(lq[t, i], expected, atol=1e-8)


@pytest.mark.parametrize("name, dim", STACK_CASES)
def test_stack_every_parameter_receives_a_gradient(name, dim):
    s = make_stack(name, dim)
    x, lq = s.sample_and_log_prob(32)
    (x.sum() + lq.sum()).backward()
    for p in s.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad != 0).any()


@pytest.mark.parametrize("name, dim", STACK_CASES)
def test_stack_save_and_load_round_trip(name, dim, tmp_path):
    s = make_stack(name, dim)
    path = tmp_path / "stack.pt"
    torch.save({"spec": s.spec(), "state": s.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    copy = vi_flows.flow_from_spec(ckpt["spec"]).double()
    copy.load_state_dict(ckpt["state"])
    assert type(copy) is type(s)
    z = torch.randn(N_TARGETS, 8, dim, dtype=torch.float64)
    x, lq = s.sample_and_log_prob(8, z)
    x2, lq2 = copy.sample_and_log_prob(8, z)
    assert torch.equal(x, x2) and torch.equal(lq, lq2)


# ----------------------------------------------------------------------------- splines
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


@pytest.mark.parametrize("name", ["planar", "radial"])
def test_deep_vi_flows_start_near_the_identity(name):
    """32 layers at initialisation keep N(0, I) (a collapsing initialisation gives log-dets
    of many nats and samples of tiny spread)."""
    torch.manual_seed(0)
    flow = vi_flows.build_flow(name, K=32, base="fixed")
    with torch.no_grad():
        x, ld = flow.inverse(torch.randn(5000, 2))
    assert ld.abs().mean() < 0.5
    assert torch.allclose(x.std(0), torch.ones(2), atol=0.15)
