"""Short-run MCMC on images (ebm.ConvEBM, samplers.ConvEnergy, train_mcmc.py --dataset
digits|mnist, sample_mcmc.py on image runs, bench/mcmc_images.py): gradients, tiny runs of both
regimes, bad input. The data are tested in test_image_data.py, the metric in
test_image_metrics.py."""
import gzip
import json
import os

import numpy as np
import pytest
import torch

import sample_mcmc
import train_mcmc
from ebm import ConvEBM, load_image_ebm
from image_data import write_idx
from samplers import ConvEnergy, langevin, mala
from test_image_data import fake_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--wandb", "disabled", "--steps", "3", "--L", "4", "--eval_every", "3",
        "--log_every", "1", "--n_eval", "60", "--n_f", "4"]


# ----------------------------------------------------------------------------- energy gradient
@pytest.mark.parametrize("arch,shape", [("conv8", (1, 8, 8)), ("vanilla", (1, 28, 28)),
                                        ("vanilla", (3, 32, 32))])
def test_conv_energy_grad_matches_autograd(arch, shape):
    torch.manual_seed(0)
    F = ConvEBM(arch, shape, n_f=4)
    x = 2 * torch.rand(5, int(np.prod(shape))) - 1
    U = ConvEnergy(F, scale=3.0)
    assert U.fast
    y = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(U(y).sum(), y)
    assert U.grad(x).shape == x.shape
    assert torch.allclose(U.grad(x), ref, rtol=1e-5, atol=1e-7)
    # bfloat16 gradient: same direction, a few per cent off
    g16 = ConvEnergy(F, scale=3.0, dtype=torch.bfloat16).grad(x)
    assert g16.dtype == torch.float32
    assert float((g16 - ref).norm() / ref.norm()) < 0.2


def test_conv_energy_falls_back_to_autograd_for_other_forwards():
    class Shifted(ConvEBM):  # same layers, another forward: the hand-written pass is wrong
        def forward(self, x):
            return super().forward(x) + (x ** 2).sum(1)

    torch.manual_seed(0)
    F = Shifted("conv8", (1, 8, 8), n_f=4)
    x = 2 * torch.rand(4, 64) - 1
    with pytest.warns(RuntimeWarning, match="autograd"):
        U = ConvEnergy(F, 2.0)
        assert not U.fast
    y = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(U(y).sum(), y)
    assert torch.allclose(U.grad(x), ref, atol=1e-6)


def test_fast_image_chain_equals_autograd_chain():
    """langevin / mala with ConvEnergy run the same chain as with autograd (same noise)."""
    torch.manual_seed(0)
    F = ConvEBM("conv8", (1, 8, 8), n_f=4)
    x0 = 2 * torch.rand(20, 64) - 1
    scale = 2 / 0.05 ** 2
    slow = lambda x: F(x) * scale  # noqa: E731  (a plain function: autograd path)
    outs = []
    for U in (ConvEnergy(F, scale), slow):
        torch.manual_seed(1)
        x, r = langevin(U, x0, 10, 0.05, return_grad_norm=True)
        torch.manual_seed(2)
        xm, acc = mala(U, x0, 5, 0.05)
        outs.append((x, r, xm, acc))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5)
    assert all(p.requires_grad for p in F.parameters())  # sampling left the parameters alone


@pytest.mark.parametrize("case", ["missing", "malformed", "truncated_gz", "wrong_shape",
                                  "bad_net", "bad_flag", "bad_save_at", "sample_missing_run"])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    imgs, labels = fake_mnist(tmp_path)
    train = ["--out_dir", str(tmp_path / "run"), "--image_dir", str(tmp_path / "img"), *TINY]
    main = train_mcmc.main
    if case == "missing":
        args = train + ["--dataset", "mnist", "--mnist_images", str(tmp_path / "nope"),
                        "--mnist_labels", labels]
        hint = "--mnist_images"
    elif case == "malformed":
        bad = tmp_path / "bad-idx"
        bad.write_bytes(b"\x01\x02\x03\x04 not an idx file")
        args = train + ["--dataset", "mnist", "--mnist_images", str(bad), "--mnist_labels", labels]
        hint = "IDX"
    elif case == "truncated_gz":
        with open(imgs, "rb") as fh:
            data = gzip.compress(fh.read())
        (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
        args = train + ["--dataset", "mnist", "--mnist_images", str(tmp_path / "cut.gz"),
                        "--mnist_labels", labels]
        hint = "IDX"
    elif case == "wrong_shape":
        write_idx(str(tmp_path / "small"), np.zeros((60, 8, 8), np.uint8))
        args = train + ["--dataset", "mnist", "--mnist_images", str(tmp_path / "small"),
                        "--mnist_labels", labels]
        hint = "28x28"
    elif case == "bad_net":
        args = train + ["--dataset", "digits", "--net", "vanilla"]
        hint = "conv8"
    elif case == "bad_flag":
        args = train + ["--dataset", "digits", "--langevin_dtype", "float8"]
        hint = "bfloat16"
    elif case == "bad_save_at":
        main, args = sample_mcmc.main, ["--run", str(tmp_path), "--save_at", "x"]
        hint = "0,100,1000"
    else:
        main, args = sample_mcmc.main, ["--run", str(tmp_path / "none")]
        hint = "checkpoint"
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and hint in lines[0], lines


# ----------------------------------------------------------------------------- training / sampling
def tiny_run(tmp_path, config, *extra):
    out = str(tmp_path / "run")
    train_mcmc.main(["--config", os.path.join(ROOT, "configs", config), "--out_dir", out,
                     "--image_dir", str(tmp_path / "img"), *TINY, *extra])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("config", ["mcmc_digits_nonconvergent.json",
                                    "mcmc_digits_convergent.json"])
def test_tiny_digit_run_of_each_regime(tmp_path, config):
    out = tiny_run(tmp_path, config)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    last = rows[-1]
    assert last["step"] == 3 and np.isfinite(last["fd"]) and 0 <= last["label_tv"] <= 1
    assert last["fd_floor"] < last["fd"]  # 3 iterations do not make digits
    assert os.path.isfile(tmp_path / "img" / "negatives" / "step_000003.png")
    assert os.path.isfile(tmp_path / "img" / "negatives.gif")
    assert os.path.isfile(os.path.join(out, "diagnostics.png"))
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert "image_ebm" in ckpt and "ebm" not in ckpt
    cfg = json.load(open(os.path.join(ROOT, "configs", config)))
    if cfg["init"] == "persistent":  # one chain per training image
        assert ckpt["bank"].shape == (1348, 64)
    # the stored U is 2 / eps^2 times the trained F
    U, F = load_image_ebm(ckpt), load_image_ebm(ckpt, "F")
    x = torch.rand(3, 64)
    assert torch.allclose(U(x), F(x) * 2 / cfg["eps"] ** 2, rtol=1e-4)


@pytest.mark.slow
def test_image_run_resumes_and_samples_long_run(tmp_path):
    out = tiny_run(tmp_path, "mcmc_digits_convergent.json")
    assert train_mcmc.main(["--resume", out, "--steps", "4"]) == 0
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"] == 4
    for sampler in ("ula", "mala"):
        assert sample_mcmc.main(["--run", out, "--sampler", sampler, "--init", "data",
                                 "--steps", "12", "--chunk", "5", "--save_at", "0,10",
                                 "--n", "60", "--image_dir", str(tmp_path / "img")]) == 0
        stem = tmp_path / "img" / f"longrun_{sampler}_data"
        with open(f"{stem}.json") as fh:
            rec = json.load(fh)
        assert [r["step"] for r in rec["results"]] == [0, 10, 12]
        assert (rec["acceptance_mean"] is None) == (sampler == "ula")
        for suffix in (".json", ".png", "_curves.png"):
            assert os.path.isfile(f"{stem}{suffix}")
        assert os.path.isfile(stem / "step_000010.png")
    # step 0 of chains from data is the data: its FD is that of real digits
    assert rec["results"][0]["fd"] < 1.5 * rec["floor"]["fd"]


@pytest.mark.slow
def test_vanilla_net_on_tiny_mnist(tmp_path):
    imgs, labels = fake_mnist(tmp_path)
    out = str(tmp_path / "run")
    train_mcmc.main(["--dataset", "mnist", "--mnist_images", imgs, "--mnist_labels", labels,
                     "--out_dir", out, "--image_dir", str(tmp_path / "img"), "--init", "uniform",
                     "--batch", "20", *TINY, "--n_eval", "40"])
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["image_ebm_spec"] == {"arch": "vanilla", "shape": [1, 28, 28], "n_f": 4}


def test_bench_without_finished_runs_writes_no_figure(tmp_path, capsys):
    """bench/mcmc_images.py --no_train on a folder without finished runs: exit 1, one line,
    the docs figures left as they are."""
    from bench import mcmc_images as bench_mcmc_images

    runs, figs = tmp_path / "runs", tmp_path / "figs"
    os.makedirs(runs / "mcmc-digits-convergent-s0")  # started, never finished
    os.makedirs(figs)
    (figs / "mcmc_digits_longrun.png").write_bytes(b"old figure")
    capsys.readouterr()
    assert bench_mcmc_images.main(["--no_train", "--no_speed", "--figures", "--runs_dir",
                                   str(runs), "--figure_dir", str(figs)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no finished runs" in err, err
    assert os.listdir(figs) == ["mcmc_digits_longrun.png"]
    assert (figs / "mcmc_digits_longrun.png").read_bytes() == b"old figure"


def test_fast_gradient_passes_its_self_check_on_a_net_with_large_activations():
    """Large pre-activations, as in a trained digit net: float32 rounding makes the hand-
    written gradient differ from autograd's by more than a fixed tolerance on small
    components (the old self-check then fell back to autograd); the float64 self-check
    accepts it and the fast gradient is as accurate as float32 allows."""
    torch.manual_seed(0)
    F = ConvEBM("conv8", (1, 8, 8), n_f=16)
    ps = list(F.parameters())
    with torch.no_grad():
        for p in (ps[0], ps[1], ps[-2]):
            p.mul_(100.0)
    x = 2 * torch.rand(8, 64) - 1
    U = ConvEnergy(F, scale=1.0, mode="dense")
    y = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(U(y).sum(), y)
    assert U.fast
    assert float((U.grad(x) - ref).abs().max() / ref.abs().max()) < 1e-4


def test_bench_table_judges_fd_against_the_floor(capsys):
    """The benchmark's table prints the floor with its sd and every FD as a ratio to the
    floor at its n, starred beyond floor + 3 sd."""
    from bench import mcmc_images as bench_mcmc_images

    floor, sd = {"fd": 4.0, "fd_pixels": 0.4, "label_tv": 0.07}, {"fd": 1.0}
    long = {"n": 1000, "n_floor": 20, "init": "data", "floor": floor, "floor_sd": sd,
            "cpu_s": 10.0, "results": [{"step": 0, "fd": 4.5, "label_tv": 0.05},
                                       {"step": 100, "fd": 8.0, "label_tv": 0.08}]}
    ev = {"fd": 6.0, "fd_floor": 4.0, "fd_floor_sd": 1.0, "label_tv": 0.09, "cpu_s": 5.0,
          "n_eval": 1000}
    bench_mcmc_images.table([{"regime": "convergent", "seed": 0, "eval": ev, "long": long}], 100)
    out = capsys.readouterr().out
    assert "4.00 +- 1.00" in out and "n = 1000" in out
    assert "6.0 (1.50x) |" in out and "4.5 (1.12x) |" in out and "8.0 (2.00x)* |" in out
