"""Score a run's EBM by annealed importance sampling (annealing.py): log Z forward (a
stochastic lower bound) and reverse from the held-out data (upper), and the test
log-likelihood bracket between them.

    python ais.py runs/<run> [--chains 500 --temps 500 --repeats 4 --seed 0 --base flow
                              --eps 0.1 --domain auto|box|free]

What a run is scored on (`run_target`) is its data as tasks.py defines it, the one definition
train.py evaluates on (`run_task`): a 2D train.py or train_mcmc.py run's held-out set as
tasks.Toy2D draws it (base: a Gaussian fitted to it, or the run's flow); a digits / MNIST run
of train.py or train_mcmc.py as tasks.Images holds it (held-out: image_data.test_set of the
fixed split; the box map's fit: the dequantised training images, `Images.x_fit`), with the
bracket in nats per image on the [0, L) scale and bits/dim. The energy of an image run is a
density on the data box [-1, 1]^D (`--domain box`, annealing.box_bracket), where exp(-U) is
always integrable; on R^D a ConvNet energy, piecewise linear in x, need not be. A tilt run
(p = q0 exp(-g) / Z, the digits default) with `--base flow` is annealed from its own base q0
along q0 exp(-b g) on the box, the bracket its summary holds (tasks.Images), here with the
chains and temperatures asked for. A repeat whose
ESS falls below annealing.ESS_FLOOR of its chains is flagged, and the report says so beside
it.
"""
import argparse
import math
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor, nn

import checkpoint
import config
import datasets
import gridmath
import image_data
import tasks
import tilt
import util
from annealing import (ADAPT, SCHEDULES, TARGET_ACCEPTANCE, box_bracket, loglik_bracket,
                       unbounded_ray)
from ebm import load_image_ebm
from flows import gaussian_fit


def build_parser():
    p = config.Parser(description="log Z of a run's EBM (train.py, or a train_mcmc.py image run) "
                                  "by annealed importance sampling, and its test "
                                  "log-likelihood bracket",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="run folder (with checkpoint.pt)")
    p.add_argument("--chains", type=config.positive_int, default=500, help="chains per repeat")
    p.add_argument("--temps", type=config.positive_int, default=500, help="annealing steps K")
    p.add_argument("--repeats", type=config.positive_int, default=4,
                   help="independent AIS runs (mean and sd of log Z-hat)")
    p.add_argument("--seed", type=config.seed, default=0, help="seeds the chains")
    p.add_argument("--base", choices=["gaussian", "flow"], default="gaussian",
                   help="q0: a Gaussian fitted to data (2D: the held-out set; images: the "
                        "dequantised training images), or the run's flow")
    p.add_argument("--transition", choices=["auto", *TARGET_ACCEPTANCE], default="auto",
                   help="the Markov kernel at each temperature: hmc, mala, or independence "
                        "(independent Metropolis-Hastings proposing fresh draws of the base); "
                        "auto: independence for a tilt annealed from its own base (--base "
                        "flow), else hmc")
    p.add_argument("--leapfrog", type=config.positive_int, default=5, help="HMC leapfrog steps")
    p.add_argument("--eps", type=config.positive_float, default=0.1,
                   help="initial HMC / MALA step size (then adapted, see --adapt)")
    p.add_argument("--schedule", choices=SCHEDULES, default="sigmoid")
    p.add_argument("--adapt", choices=ADAPT, default="global", help="step-size adaptation")
    p.add_argument("--domain", choices=DOMAINS, default="auto",
                   help="box: the density exp(-f) on the data box [-1, 1]^D (AIS in "
                        "whitened atanh coordinates w, y = tanh(mu + L w), base N(0, I); "
                        "annealing.box_bracket); free: on R^D (refused for an image energy that "
                        "provably has no normaliser there); auto: box for image runs (where "
                        "their own summaries score them), free in 2D")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64",
                   help="precision of the chains and networks (weights are always float64)")
    p.add_argument("--threads", type=config.nonnegative_int, default=1,
                   help="torch CPU threads (0: torch's default)")
    return p


DOMAINS = ("auto", "box", "free")
IMAGE_BOX = (-1.0, 1.0)  # the dequantised images' domain on the model scale


@dataclass
class Target:
    """What a run is scored on: `energy` f (the density is exp(-f) / Z), the held-out points
    `x_test`, the points `x_fit` a Gaussian base is fitted to, the run's `flow` (or None),
    the grey levels `levels` of an image run (None in 2D: no dequantisation) and the `box`
    the density lives on (None: R^D; else `box_bracket` scores it, its map fitted to x_fit)."""
    energy: nn.Module
    x_test: Tensor
    x_fit: Tensor
    flow: Optional[nn.Module]
    levels: Optional[int]
    box: Optional[tuple]


def run_target(run, path: str, domain: str = "auto") -> Target:
    """The energy and the held-out set of a run, in one place:

    train.py, 2D      ebm (f); held-out set: tasks.Toy2D's (`run_task`); base fitted to it
    train.py, images  ebm (f, an EBM(D, ...)); held-out and fit points: tasks.Images' x_test
                      (image_data.test_set) and x_fit (the dequantised training images)
    train_mcmc.py     image_ebm: U = (2 / eps^2) F itself (ebm.load_image_ebm), the images as
                      for train.py; 2D: ebm (U), held-out set as for train.py
    Bad runs stop with one line (config.fail)."""
    cfg, ckpt = run.config, run.checkpoint
    writer = ckpt.get("script")
    if writer is None:
        config.fail(f"{path} is from an older version (its checkpoint names no script); "
                    f"update it with `python migrate.py {path}`")
    if writer not in ("train.py", "train_mcmc.py"):
        config.fail(f"{path} was written by {writer}; ais.py reads train.py and train_mcmc.py "
                    f"runs")
    image = cfg.get("dataset") in tasks.IMAGES
    energy = run.ebm
    if writer == "train_mcmc.py" and "image_ebm" in ckpt:
        energy = load_image_ebm(ckpt)
    if energy is None:
        config.fail(f"{path} has no EBM in its checkpoint (a flow-only run?); train one with "
                    f"train.py (an EBM estimator) or train_mcmc.py")
    box = IMAGE_BOX if domain == "box" or (domain == "auto" and image) else None
    if box is not None and not image:
        config.fail("--domain box is for image runs (their data live in [-1, 1]^D); drop it")
    if image and box is None and (ray := unbounded_ray(energy, cfg_dim(run))) is not None:
        config.fail(f"{path}: exp(-f) has no normaliser on R^D (f falls without bound along "
                    f"a ray, {ray}); score it on the box the run lives on: --domain box")
    task = run_task(cfg, writer)
    if not image:
        return Target(energy, task.x_test, task.x_test, run.flow, None, None)
    return Target(energy, task.x_test, task.x_fit, run.flow, task.L, box)


def cfg_dim(run) -> int:
    """The data dimension of a run's models."""
    spec = run.checkpoint.get("ebm_spec") or run.checkpoint["image_ebm_spec"]
    return int(spec["dim"]) if "dim" in spec else int(math.prod(spec["shape"]))


def run_task(cfg: dict, writer: str = "train.py"):
    """A run's data as tasks.py defines it (what train.py evaluates on): tasks.Toy2D for a 2D
    run (its held-out set drawn as the run drew it: training set first, same seed; a
    train_mcmc.py run's n_train / n_test are train.py's samples / test_samples), tasks.Images
    for an image run (held-out: image_data.test_set of the fixed split; x_fit: the training
    images less the validation split, dequantised with the run's seed). A config without what
    the task needs, or missing image files, stops with one line (config.fail)."""
    sizes = {"samples": "n_train", "test_samples": "n_test"} if writer == "train_mcmc.py" \
        else {}
    args = dict(cfg, **{k: cfg[v] for k, v in sizes.items() if v in cfg})
    needed = ("dataset", "seed") + (() if cfg.get("dataset") in tasks.IMAGES
                                    else ("samples", "test_samples"))
    missing = [sizes.get(k, k) for k in needed if k not in args]
    if missing:
        config.fail(f"the run's config has no {', '.join(missing)}; is it a {writer} run?")
    args.setdefault("ais_chains", None)  # tasks.Images' own AIS settings, unused here
    args.setdefault("ais_temps", None)
    try:
        return tasks.make_task(SimpleNamespace(**args), "cpu")
    except ValueError as e:  # image files missing or malformed
        config.fail(str(e))


def make_base(args, target: Target, dtype):
    """q0: the run's flow or a Gaussian fitted to target.x_fit. In the box, None
    (`box_bracket` brings its own: N(0, I) in the map's coordinates), except for a tilt's own
    base with --base flow: AIS along q0 exp(-b g) as the run's summary does (tasks.Images), the
    tilt being +inf outside the box; any other flow lives on R^D and is refused there."""
    if args.base == "flow":
        if target.flow is None:
            config.fail(f"{args.run} has no flow; use --base gaussian")
        if target.box is not None and not tasks.is_tilt(target.energy):
            config.fail("a flow is a density on R^D, not on the box; use --domain free with "
                        "--base flow, or --base gaussian")
        flow = target.flow.to(dtype)
        return tilt.BaseOnBox(flow) if target.box is not None else flow
    if target.box is not None:
        return None
    return gaussian_fit(target.x_fit).to(dtype)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        run = checkpoint.load_run(args.run)
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        config.fail(str(e))
    target = run_target(run, args.run, args.domain)
    dtype = getattr(torch, args.dtype)
    x_test = target.x_test.to(dtype)
    base = make_base(args, target, dtype)
    ebm = target.energy.to(dtype)
    util.set_seed(args.seed)
    if args.transition == "auto":
        args.transition = "independence" if args.base == "flow" and tasks.is_tilt(
            target.energy) else "hmc"
    kw = dict(schedule_kind=args.schedule, transition=args.transition,
              n_leapfrog=args.leapfrog, eps=args.eps, adapt=args.adapt)
    if base is None:  # the box, from N(0, I) in the map's coordinates
        br = box_bracket(ebm, target.x_fit, x_test, args.chains, args.temps, args.repeats,
                         dtype=dtype, **kw)
    else:
        br = loglik_bracket(ebm, base, x_test, args.chains, args.temps, args.repeats, **kw)
    report(args, br, ebm, target, dtype)
    return 0


@torch.no_grad()
def where_the_mass_is(br, ebm, target) -> str:
    """f on the held-out points against f at the forward chains' end (plain and weighted by
    w: an estimate of E_p[f]), and for images the share of coordinates within 0.02 of the
    walls |x| = 1: a model whose mass lies away from the data shows here (and then the reverse
    bound, started at the data, fails)."""
    fwd = br.forward
    f_end = ebm(fwd.x).double()
    w = torch.softmax(fwd.log_w.flatten(), 0)
    inside = torch.isfinite(f_end)  # a tilt on the box: +inf at chains left outside it
    line = (f"f      held-out mean {-br.mean_neg_f:.4f} | forward chains' end: mean "
            f"{float(f_end[inside].mean()):.4f}, weighted by w "
            f"{float((w[inside] * f_end[inside]).sum()):.4f}")
    if not inside.all():
        line += f" (the {int(inside.sum())} of {len(f_end)} chains where f is finite)"
    if target.levels is not None:
        share = [float((x.abs() > 0.98).double().mean()) for x in (target.x_test, fwd.x)]
        line += f" | coordinates at the walls: held-out {share[0]:.3f}, chains {share[1]:.3f}"
    return line


def gap_note(br) -> str:
    """'' for a positive gap; for a negative one, whether it lies within 2 sd of the repeats'
    spread, 2 sqrt(sd_fwd^2 + sd_rev^2) (Monte Carlo noise), or beyond it (a failed bound)."""
    if br.gap >= 0:
        return ""
    if -br.gap <= 2 * math.hypot(br.forward.log_Z_sd, br.reverse.log_Z_sd):
        return "; negative within 2 sd of the repeats: the bounds agree within their noise"
    return ("; negative beyond 2 sd of the repeats: the reverse bound fails, the held-out "
            "points are not samples of the model or the weights are degenerate")


def report(args, br, ebm, target, dtype):
    """Print log Z (mean +- sd over repeats), ESS and acceptance (with a warning beside
    degenerate weights), the grid log Z (2D), the learned c (an EBM with one), and the
    bracket: in nats (2D), or for images in nats per image on the dequantised [0, L) scale and
    in bits/dim (image_data.to_nats, bits_per_dim)."""
    f, r = br.forward, br.reverse
    dim = target.x_test.shape[1]
    where = "R^D" if target.box is None else f"[{target.box[0]:g}, {target.box[1]:g}]^{dim}"
    base = (args.base if target.box is None or args.base == "flow"
            else "N(0, I) in w, y = tanh(mu + L w) (whitened atanh)")
    print(f"{args.run}: AIS {args.transition}, {args.repeats} x {args.chains} chains, "
          f"{args.temps} temperatures ({args.schedule}), base {base}, density on {where}")
    print(f"log Z  forward (lower) {f.log_Z:.4f} +- {f.log_Z_sd:.4f} | reverse from data "
          f"(upper) {r.log_Z:.4f} +- {r.log_Z_sd:.4f}")
    for res, n in ((f, args.chains), (r, r.log_w.shape[1])):
        warn = f"   WARNING: {res.warning()}" if res.degenerate else ""
        print(f"ESS    {res.direction} {float(res.ess.mean()):.1f} / {n} (min over repeats "
              f"{float(res.ess.min()):.1f}), acceptance {res.acceptance:.3f}{warn}")
    if dim == 2:
        neg_f, area = gridmath.on_grid(lambda x: -ebm(x), datasets.BOUND, datasets.GRID,
                                       dtype=dtype)
        print(f"log Z  grid [-{datasets.BOUND}, {datasets.BOUND}]^2, {datasets.GRID}^2 cells: "
              f"{gridmath.grid_log_Z(neg_f, area):.4f}")
    print(where_the_mass_is(br, ebm, target))
    if isinstance(getattr(ebm, "c", None), Tensor) and not tasks.is_tilt(ebm):
        print(f"log Z  learned c of the EBM: {float(ebm.c.detach()):.4f}")
    note = gap_note(br)
    flag = "" if br.reliable else " UNRELIABLE (degenerate weights, see above)"
    if target.levels is None:
        print(f"test log-likelihood in [{br.lower:.4f}, {br.upper:.4f}] (gap {br.gap:.4f} nats"
              f"{note}; mean -f = {br.mean_neg_f:.4f}){flag}")
        return
    L = target.levels
    lo, hi = (image_data.to_nats(v, dim, L) for v in (br.lower, br.upper))
    bpd_hi, bpd_lo = (image_data.bits_per_dim(v, dim, L) for v in (br.lower, br.upper))
    print(f"test log-likelihood in [{lo:.4f}, {hi:.4f}] nats per image on the dequantised "
          f"[0, {L}) scale (gap {br.gap:.4f}{note}; {target.x_test.shape[0]} held-out images){flag}")
    print(f"bits/dim in [{bpd_lo:.4f}, {bpd_hi:.4f}] (uniform on [0, {L})^{dim}: "
          f"{math.log2(L):.4f}){flag}")


if __name__ == "__main__":
    sys.exit(config.cli(main))
