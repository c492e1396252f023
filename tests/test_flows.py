"""Flow maths: invertibility, log-dets against autograd Jacobians, MADE masks, normalisation."""

import pytest
import torch

import checkpoint
import flows
from flows import MADE, build_flow


def randomise(module, scale=0.3, seed=0):
    """Perturb every parameter (flows start at the identity, which would test little)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def make(name, **kw):
    torch.manual_seed(0)
    data = torch.randn(512, 2) * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -1.0])
    if name == "maf_bn":
        flow = build_flow("maf", data, batch_norm=True, **kw)
        flow.train()
        flow.log_prob(data)  # set running statistics away from their initial values
    else:
        flow = build_flow(name, data, **kw)
    if name != "gaussian":  # mild: 5-10 random layers compound quickly (cond(J) ~ e^25 at 0.3)
        randomise(flow, scale=0.1)
    return flow.eval()


ALL = ["maf", "maf_bn", "glow", "gaussian"]


def jacobian_logdet(fn, x):
    """log|det J| of fn at each row of x, from the autograd Jacobian and slogdet (float64)."""
    out = []
    for xi in x:
        J = torch.autograd.functional.jacobian(lambda v: fn(v[None])[0], xi)
        out.append(torch.linalg.slogdet(J)[1])
    return torch.stack(out)




@pytest.mark.parametrize("layer,dim", [
    (lambda: flows.MAFLayer(2, (16, 16)), 2), (lambda: flows.MAFLayer(3, (16,), reverse=True), 3),
    (lambda: flows.ActNorm(2), 2), (lambda: flows.InvertibleLinearLU(3), 3),
    (lambda: flows.AffineCoupling(3, (16,)), 3),
    (lambda: flows.AffineCoupling(3, (16,), swap=True), 3),
    (lambda: flows.AffineCoupling(2, (16,), affine=False), 2),
    (lambda: flows.BatchNormFlow(3).eval(), 3)])
def test_each_transform_logdet(layer, dim):
    torch.manual_seed(1)
    t = randomise(layer()).double()
    x = torch.randn(5, dim, dtype=torch.float64)
    z, ld = t(x)
    assert torch.allclose(ld, jacobian_logdet(lambda v: t(v)[0], x), atol=1e-8)
    x_back, _ = t.inverse(z)
    assert torch.allclose(x_back, x, atol=1e-8)


@pytest.mark.parametrize("dim,reverse", [(2, False), (4, False), (5, True)])
def test_made_is_autoregressive(dim, reverse):
    """d out_i / d x_j = 0 unless x_j comes strictly before x_i in the order."""
    made = randomise(MADE(dim, (32, 32), n_params=2, reverse=reverse), scale=0.5).double()
    x = torch.randn(1, dim, dtype=torch.float64)
    deg = made.input_degrees
    for out in range(2):
        J = torch.autograd.functional.jacobian(lambda v: made(v)[out][0], x)[:, 0, :]
        allowed = deg[None, :] < deg[:, None]
        assert (J[~allowed] == 0).all()
        assert (J[allowed] != 0).all()  # and the connections that may exist do




@pytest.mark.parametrize("name", ["maf", "glow"])
def test_extreme_inputs_stay_finite(name):
    flow = randomise(make(name), scale=0.3)
    x = torch.tensor([[1e4, -1e4], [0.0, 0.0], [-300.0, 50.0]])
    assert torch.isfinite(flow(x)[1]).all()
    z = torch.randn(1000, 2) * 10
    assert torch.isfinite(flow.inverse(z)[1]).all()


def test_actnorm_guards_zero_variance():
    layer = flows.ActNorm(2)
    x = torch.ones(100, 2)
    z, ld = layer(x)
    assert torch.isfinite(z).all() and torch.isfinite(ld).all()
    assert torch.allclose(layer.log_scale, torch.zeros(2))


def test_gaussian_noise_fits_data_and_is_fixed():
    data = torch.randn(20000, 2) @ torch.tensor([[2.0, 0.0], [1.0, 0.5]]) + 3
    flow = build_flow("gaussian", data)
    assert not any(p.requires_grad for p in flow.parameters())
    s = flow.sample(20000)
    assert torch.allclose(s.mean(0), data.mean(0), atol=0.1)
    assert torch.allclose(torch.cov(s.T), torch.cov(data.T), atol=0.15)



def test_unknown_flow_names_valid_ones():
    with pytest.raises(ValueError, match="maf, glow, nsf, nsf_coupling, gaussian"):
        build_flow("realnvp9")


@pytest.mark.slow
def test_train_py_checkpoint_loads_after_the_flows_split(tmp_path):
    """A tiny train.py run: its checkpoint names the flow by the spec and state_dict keys that
    the code before the split (flows.py holding every flow, commit b5ee95b) wrote, and
    checkpoint.load_run (through vi_flows.flow_from_spec) rebuilds it as the trained density flow."""
    import train

    out = tmp_path / "run"
    assert train.main(["--samples", "2000", "--batch", "200", "--test_samples", "2000",
                       "--ebm_hidden", "32", "--flow_hidden", "16", "--flow_layers", "2",
                       "--log_every", "5", "--epoch", "1", "--wandb", "disabled",
                       "--out_dir", str(out), "--image_dir", str(tmp_path / "img")]) == 0
    run = checkpoint.load_run(str(out))
    spec, state = run.checkpoint["flow_spec"], run.checkpoint["flow"]
    assert spec == {"name": "maf", "dim": 2, "n_blocks": 2, "hidden": [16], "act": "relu",
                    "batch_norm": False}
    layer = ["made.body.0.bias", "made.body.0.mask", "made.body.0.weight", "made.out.bias",
             "made.out.mask", "made.out.weight"]
    assert sorted(state) == ["_anchor"] + [f"transforms.{i}.{k}" for i in (0, 1) for k in layer]
    assert type(run.flow) is flows.Flow
    same = flows.flow_from_spec(spec)
    same.load_state_dict(state)
    x = torch.randn(50, 2)
    assert torch.equal(run.flow.log_prob(x), same.eval().log_prob(x))
