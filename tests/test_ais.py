"""The command line `python ais.py runs/<run>`: what a run is scored on (its data through
tasks.py), the report (log Z, ESS, the bracket in nats or nats per image and bits/dim, the
warnings), and bad input as one line with exit 2. AIS itself: test_annealing.py."""
import argparse
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import ais
import annealing
import checkpoint
import flows
import image_data
import tasks
import train
from ebm import EBM, ConvEBM
from tilt import FlowTilt
from test_annealing import gaussian_energy, std_gaussian

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- command line
@pytest.mark.slow
def test_cli_missing_run_is_one_line_and_exit_2(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "ais.py"), str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = p.stderr.strip()
    assert p.returncode == 2 and err and "\n" not in err and "Traceback" not in err, err
    assert "nope" in err


@pytest.mark.parametrize("script,sizes", [("train.py", ("samples", "test_samples")),
                                          ("train_mcmc.py", ("n_train", "n_test"))])
def test_cli_prints_log_Z_grid_and_bracket(tmp_path, capsys, script, sizes):
    """A 2D checkpoint of train.py or train_mcmc.py (config, EBM): the report has both AIS
    log Z, the grid log Z and the bracket (plumbing only: an untrained EBM need not be
    normalisable)."""
    torch.manual_seed(6)
    ebm = EBM(2, (16, 16))
    cfg = {"dataset": "8gaussians", "seed": 0, sizes[0]: 500, sizes[1]: 500}
    checkpoint.save_checkpoint(str(tmp_path / "checkpoint.pt"),
                         {"config": cfg, "ebm": ebm.state_dict(), "ebm_spec": ebm.spec(),
                          "script": script})
    assert ais.main([str(tmp_path), "--chains", "50", "--temps", "20", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "log Z  forward" in out and "log Z  grid" in out and "test log-likelihood in" in out


def image_run(tmp_path, scale=1.0, name="img"):
    """A train_mcmc.py-shaped digits checkpoint: a small random ConvEBM as U ("image_ebm"),
    its last layer times `scale` (small: U nearly flat on the box, an easy AIS target)."""
    torch.manual_seed(9)
    U = ConvEBM("conv8", (1, 8, 8), n_f=4)
    with torch.no_grad():
        U.net[-1].weight.mul_(scale)
    cfg = {"dataset": "digits", "eps": 0.03, "seed": 0, "n_train": 1348}
    path = tmp_path / name
    path.mkdir()
    F = {k: v * (cfg["eps"] ** 2 / 2 if k.startswith("net.6") else 1)  # U = (2 / eps^2) F
         for k, v in U.state_dict().items()}
    checkpoint.save_checkpoint(str(path / "checkpoint.pt"), {
        "config": cfg, "image_ebm": U.state_dict(), "image_ebm_spec": U.spec(),
        "F": F, "script": "train_mcmc.py"})
    return str(path), U


@pytest.mark.slow
def test_run_target_of_an_image_run(tmp_path):
    """run_target of a train_mcmc.py digits run: the energy is U (not F), the held-out points
    are image_data.test_set of the test split and the box map's fit points are tasks.Images'
    x_fit (the training images less the validation split, dequantised with the run's seed:
    the one definition train.py evaluates on), and the chains stay in [-1, 1]^64 (R^64 is
    refused: the energy provably has no normaliser there)."""
    path, U = image_run(tmp_path)
    t = ais.run_target(checkpoint.load_run(path), path)
    _, _, x_test, _ = image_data.load_images("digits")
    assert torch.equal(t.x_test, image_data.test_set(x_test, 17))
    task = tasks.Images(SimpleNamespace(dataset="digits", seed=0, ais_chains=None,
                                        ais_temps=None), "cpu")
    assert torch.equal(t.x_test, task.x_test) and torch.equal(t.x_fit, task.x_fit)
    assert t.x_fit.shape == (1214, 64) and (t.x_fit.abs() <= 1).all()
    with pytest.raises(ValueError):  # dequantised: off the pixel lattice
        image_data.levels(t.x_fit, 17)
    x = torch.rand(5, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(t.energy(x), U(x))
    assert t.levels == 17 and t.box == (-1.0, 1.0) and t.flow is None
    with pytest.raises(SystemExit):  # this ConvNet energy falls along a ray: no Z on R^64
        ais.run_target(checkpoint.load_run(path), path, "free")


@pytest.mark.parametrize("script,sizes", [("train.py", ("samples", "test_samples")),
                                          ("train_mcmc.py", ("n_train", "n_test"))])
def test_run_target_of_a_2d_run_is_tasks_held_out_set(tmp_path, script, sizes):
    """A 2D run's held-out set and base points are tasks.Toy2D's test set of the run's seed
    and sizes (train_mcmc.py's n_train / n_test as train.py's samples / test_samples): the
    training set drawn first, then the 300 test points."""
    ebm = EBM(2, (8,))
    cfg = {"dataset": "moons", "seed": 3, sizes[0]: 200, sizes[1]: 300}
    checkpoint.save_checkpoint(str(tmp_path / "checkpoint.pt"), {
        "config": cfg, "ebm": ebm.state_dict(), "ebm_spec": ebm.spec(), "script": script})
    t = ais.run_target(checkpoint.load_run(str(tmp_path)), str(tmp_path))
    toy = tasks.Toy2D(SimpleNamespace(dataset="moons", seed=3, samples=200, test_samples=300),
                      "cpu")
    assert t.x_test.shape == (300, 2) and torch.equal(t.x_test, toy.x_test)
    assert t.x_fit is t.x_test and t.levels is None and t.box is None


def numbers(line):
    """The floats after '[' in a report line: [a, b] -> (a, b)."""
    a, b = line.split("[", 1)[1].split("]")[0].split(", ")
    return float(a), float(b)


@pytest.mark.slow
def test_cli_image_run_in_nats_and_bits(tmp_path, capsys):
    """A digits run: the bracket in nats per image on the dequantised [0, 17) scale is
    mean(-U(test)) - log Z + 64 log(2/17) (image_data.to_nats, test points image_data.test_set),
    and its bits/dim are -nats / (64 ln 2), the ends swapped."""
    run, U = image_run(tmp_path, scale=0.01)
    argv = [run, "--chains", "40", "--temps", "30", "--repeats", "2"]
    assert ais.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "density on [-1, 1]^64" in lines[0]
    log_Z_low = float(lines[1].split("(lower)")[1].split("+-")[0])
    nats = numbers(next(x for x in lines if x.startswith("test log-likelihood")))
    bits = numbers(next(x for x in lines if x.startswith("bits/dim")))
    x_test = image_data.test_set(image_data.load_images("digits")[2], 17).double()
    with torch.no_grad():
        mean_neg_U = float(-U.double()(x_test).mean())
    assert nats[1] == pytest.approx(mean_neg_U - log_Z_low + 64 * math.log(2 / 17), abs=2e-4)
    for n, b in zip(nats, reversed(bits)):
        assert b == pytest.approx(-n / (64 * math.log(2)), abs=1e-4)


@pytest.mark.slow
def test_cli_warns_beside_degenerate_weights(tmp_path, capsys):
    """One temperature (plain importance sampling from the base in 64 dimensions) leaves a
    handful of chains carrying the weight: the report says so beside the ESS and flags the
    bracket."""
    run, _ = image_run(tmp_path, scale=0.01)
    assert ais.main([run, "--chains", "40", "--temps", "1", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "weights degenerate: ESS" in out and "of 40 chains" in out, out
    assert "use more --temps" in out and "UNRELIABLE" in out


@pytest.mark.parametrize("temps,degenerate", [(1, True), (50, False)])
def test_report_warns_only_beside_degenerate_weights(capsys, temps, degenerate):
    """The 64-d Gaussian bracket from exact samples (case_bracket): with 50 temperatures the
    ESS is near half the chains and nothing is flagged; with one, the weights are degenerate
    and the AISResult, the Bracket and the printed report all say so."""
    torch.manual_seed(4)
    f, _, sample = gaussian_energy(64)
    x_test = sample(512)
    br = annealing.loglik_bracket(f, std_gaussian(64, 1.5), x_test, n_chains=128, n_temps=temps,
                                  repeats=2)
    assert br.forward.degenerate == degenerate and br.reliable != degenerate
    args = argparse.Namespace(run="gauss", transition="hmc", repeats=2, chains=128, temps=temps,
                              schedule="sigmoid", base="gaussian")
    ais.report(args, br, f, ais.Target(f, x_test, x_test, None, 17, None), torch.float64)
    out = capsys.readouterr().out
    assert ("weights degenerate: ESS" in out) == degenerate, out
    assert ("UNRELIABLE" in out) == degenerate


def linear_digits_run(tmp_path, slope=-0.5):
    """A train.py-shaped digits checkpoint whose EBM is f(y) = slope * sum(y): on the box
    log Z = 64 log((e^-slope - e^slope) / -slope) (47.02 for slope -0.5), on R^64 none."""
    ebm = EBM(64, (1,), "relu")
    with torch.no_grad():
        ebm.net[0].weight.fill_(1.0)
        ebm.net[0].bias.fill_(64.0)  # sum(y) + 64 >= 0 on and near the box: relu is linear
        ebm.net[2].weight.fill_(slope)
        ebm.net[2].bias.fill_(-64.0 * slope)
    checkpoint.save_checkpoint(str(tmp_path / "checkpoint.pt"), {
        "config": {"dataset": "digits", "seed": 0}, "ebm": ebm.state_dict(),
        "ebm_spec": ebm.spec(), "script": "train.py"})
    return str(tmp_path), 64 * math.log((math.exp(-slope) - math.exp(slope)) / -slope)


@pytest.mark.slow
def test_cli_train_py_digits_run_on_the_box(tmp_path, capsys):
    """A train.py digits run is scored on the box its summary uses: f(y) = -0.5 sum(y) has
    log Z 47.02 there, and both ends of AIS find it; on R^64 it has no normaliser, and
    --domain free is refused in one line (exit 2)."""
    run, exact = linear_digits_run(tmp_path)
    assert ais.main([run, "--chains", "40", "--temps", "400", "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "density on [-1, 1]^64" in lines[0] and "learned c of the EBM" in "\n".join(lines)
    low = float(lines[1].split("(lower)")[1].split("+-")[0])
    up = float(lines[1].split("(upper)")[1].split("+-")[0])
    assert low - 0.3 < exact < up + 0.3 and up - low < 1.5  # a bracket around 47.02
    with pytest.raises(SystemExit) as e:
        ais.main([run, "--domain", "free", "--chains", "4", "--temps", "2"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "no normaliser on R^D" in err and "\n" not in err


def bad_runs(tmp_path):
    """Run folders: an image run, a checkpoint without a model, a 2D run."""
    img, _ = image_run(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    checkpoint.save_checkpoint(str(empty / "checkpoint.pt"), {
        "config": {"dataset": "digits"}, "script": "train.py"})
    flat = tmp_path / "flat"
    flat.mkdir()
    ebm = EBM(2, (8,))
    checkpoint.save_checkpoint(str(flat / "checkpoint.pt"), {
        "config": {"dataset": "8gaussians", "seed": 0, "samples": 50, "test_samples": 50},
        "ebm": ebm.state_dict(), "ebm_spec": ebm.spec(), "script": "train.py"})
    unsigned = tmp_path / "unsigned"
    unsigned.mkdir()
    checkpoint.save_checkpoint(str(unsigned / "checkpoint.pt"), {
        "config": {"dataset": "8gaussians", "seed": 0, "samples": 50, "test_samples": 50},
        "ebm": ebm.state_dict(), "ebm_spec": ebm.spec()})  # from before scripts signed theirs
    return {"img": img, "empty": str(empty), "flat": str(flat), "missing": str(tmp_path / "nope"),
            "unsigned": str(unsigned)}


@pytest.mark.parametrize("run,flags,says", [
    ("img", ["--temps", "0"], "--temps"),
    ("img", ["--eps", "0"], "--eps"),
    ("img", ["--eps", "-0.1"], "--eps"),
    ("empty", [], "has no EBM"),
    ("flat", ["--domain", "box"], "--domain box is for image runs"),
    ("img", ["--base", "flow"], "has no flow"),
    ("missing", [], "nope"),
    ("unsigned", [], "migrate.py"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, run, flags, says):
    runs = bad_runs(tmp_path)
    with pytest.raises(SystemExit) as e:
        ais.main([runs[run], "--chains", "4", "--temps", "2", *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err and "\n" not in err, err
    assert says in err, err


def tilt_digits_run(tmp_path):
    """A digits tilt run (train.py's default on images): base q0 a Gaussian of sd 0.3 per pixel
    fitted to draws, g = 0, on the box, so p = q0 restricted to [-1, 1]^64 and its test
    log-likelihood is mean log q0(x_test) - log P_q0(box), in closed form but for the share."""
    torch.manual_seed(0)
    base = flows.gaussian_fit(0.3 * torch.randn(20_000, 64))
    g = EBM(64, (8,))
    torch.nn.init.zeros_(g.net[-1].weight)
    torch.nn.init.zeros_(g.net[-1].bias)
    tilt = FlowTilt(base, g, box=True, bound=4.0)
    checkpoint.save_checkpoint(str(tmp_path / "checkpoint.pt"), {
        "config": {"dataset": "digits", "seed": 0}, "script": "train.py",
        "ebm": g.state_dict(), "flow": base.state_dict(), **train.specs(tilt, base)})
    x_test = tasks.Images(SimpleNamespace(dataset="digits", seed=0, ais_chains=None,
                                          ais_temps=None), "cpu").x_test
    with torch.no_grad():
        y = base.sample(400_000)
        share = float((y.abs() <= 1).all(1).double().mean())
        exact = float(base.log_prob(x_test).double().mean()) - math.log(share)
    return str(tmp_path), image_data.to_nats(exact, 64, 17)


@pytest.mark.slow
def test_cli_tilt_run_is_annealed_from_its_own_base_on_the_box(tmp_path, capsys):
    """--base flow on a tilt run anneals from the tilt's base along q0 exp(-b g) on the box,
    as the run's summary does: the bracket holds the closed form within its 0.06-nat width
    (the forward end's share of chains inside the box has sd 0.012 nats here; from the
    whitened-atanh Gaussian of the other image runs, 10 temperatures give no such bracket),
    no learned c is printed and the chains' energy is read where it is finite; a flow that is
    not a tilt's base is still refused on the box."""
    run, exact = tilt_digits_run(tmp_path)
    assert ais.main([run, "--base", "flow", "--chains", "200", "--temps", "10",
                     "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "AIS independence" in out.splitlines()[0]  # --transition auto on a tilt's base
    assert "base flow, density on [-1, 1]^64" in out.splitlines()[0]
    f_line = next(ln for ln in out.splitlines() if ln.startswith("f "))
    assert "inf" not in f_line and "nan" not in f_line  # chains left outside the box: +inf
    assert "learned c" not in out  # a tilt's g carries no learned log Z
    line = next(ln for ln in out.splitlines() if ln.startswith("test log-likelihood"))
    lo, hi = (float(v) for v in line.split("[")[1].split("]")[0].split(", "))
    assert lo - 0.01 <= exact <= hi + 0.05 and hi - lo < 0.2, (lo, exact, hi)  # 4 sd
    ckpt = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)
    del ckpt["tilt"]  # the same flow, not a tilt's base: a density on R^64
    checkpoint.save_checkpoint(os.path.join(run, "checkpoint.pt"), ckpt)
    with pytest.raises(SystemExit) as e:
        ais.main([run, "--base", "flow", "--chains", "4", "--temps", "2"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "not on the box" in err and "\n" not in err
