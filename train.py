"""EBMs and flows on 2D toy data and on digits: flow contrastive estimation (FCE), noise
contrastive estimation (NCE), score matching (DSM, SSM) and the flow alone (MLE).

    python train.py                                  # FCE with the default flow, 8gaussians
    python train.py --flow=maf --dataset=spiral      # FCE with a MAF
    python train.py --estimator=nce                  # NCE: fixed Gaussian noise, learned log Z
    python train.py --estimator=mle --flow=nsf       # the flow alone, by maximum likelihood
    python train.py --estimator=dsm                  # denoising score matching (no flow)
    python train.py --estimator=ssm                  # sliced score matching (no flow)
    python train.py --estimator=tilt                 # a flow, then an EBM tilt of it (p = q0 e^-g)
    python train.py --dataset=digits --budget=120    # 8x8 digits as a 64-D density
    python train.py --budget=60                      # stop after 60 CPU-seconds of training

An EBM p_theta(x) = exp(-f_theta(x) - c) and a noise model q play the value function
V = E_data log p/(p+q) + E_q log q/(p+q) (Gao et al. 2020, eq. 5): the EBM ascends it, the
flow descends it plus likelihood terms, at the iterations --rule names (fce.py has the maths).
NCE is the EBM against the fixed Gaussian fitted to the data; mle the flow alone; dsm / ssm
fit the EBM's score alone (score_matching.py; no flow, no learned log Z); tilt trains a base
flow q0 by maximum likelihood, freezes it, then an energy g so that p = q0 exp(-g) / Z
(tilt.FlowTilt; log Z by importance sampling from q0). On images the flows and the tilt stop
early on a validation split of the training digits (tasks.validation_split).
The 2D sets are scored exactly on a grid, the digits in nats per image of their dequantised
density, the EBM by an annealed-importance-sampling bracket at the end (tasks.py).

Outputs: runs/<run>/{config.json, metrics.jsonl, summary.json, checkpoint.pt, curves.png}, one
figure per epoch in images/<run>/, wandb (online when logged in, else offline).
"""
import copy
import json
import math
import os
import shlex
import sys
import time

import torch

import config
import datasets
import fce
import plots
import score_matching
import tasks
import util
from adam import Adam  # torch.optim.Adam's numbers without importing torch._dynamo
from ebm import EBM
from flows import FlowMixture, build_flow
import scaffold
from logger import read_metrics

# a resumed run may change the `overridable` flags; everything else comes from the checkpoint
SCRIPT = scaffold.Script("train.py", keys=("epoch", "it", "step", "rng"), overridable=(
    "epoch", "budget", "max_steps", "eval_every", "plot_every", "log_every", "wandb", "device",
    "project", "image_dir", "threads"))
ESTIMATORS = ("fce", "nce", "mle", "dsm", "ssm", "tilt")
SCORE_MATCHING = ("dsm", "ssm")
LEARNED_FLOWS = ("maf", "glow", "nsf", "nsf_coupling")
DEFAULT_FLOW = {"fce": "maf", "nce": "gaussian", "mle": "nsf", "dsm": None, "ssm": None,
                "tilt": "nsf_coupling"}
# learning rates where the flags are not given: FCE in 2D under the threshold rule (its
# default there; each model steps in only part of the iterations, docs/fce.md "Who steps"),
# and every other case (FCE under --rule every, FCE on images, the other estimators)
THRESHOLD_LRS = {"lr_ebm": 5e-3, "lr_flow": 1e-2}
OTHER_LRS = {"lr_ebm": 2e-3, "lr_flow": 3e-3}
# --rule threshold: iterations of the flow's noise computed in one pass between flow steps
THRESHOLD_WINDOW = 4
# sizes for the 64-dimensional images where a flag is not given (2D: the flag defaults)
IMAGE_DEFAULTS = {"ebm_hidden": [256, 256], "flow_hidden": [128, 128], "eval_every": 100,
                  "lr_flow": 1e-3, "epoch": 1000, "plot_every": 100,  # an epoch: 4 iterations
                  "base_flows": 5, "base_share": 0.7, "bank": 100_000}
# the flow where --flow is not given on images: FCE's coupling spline flow (a 64-D MAF samples
# one pixel at a time: 298 iterations in 120 CPU-s against 624, and an EBM 23 nats per image
# lower); a tilt of the autoregressive NSF, the best flow alone (docs/digits.md)
IMAGE_FLOW = {"fce": "nsf_coupling", "tilt": "nsf"}
TILT_2D = {"base_flows": 1, "base_share": 0.5, "bank": 50_000}  # a tilt's base in 2D
# a tilt's g on images: wider than the MLP EBM and bounded closer (docs/digits.md, "The g")
TILT_IMAGE = {"ebm_hidden": [512, 512], "tilt_bound": 3.0}
TILT_LOSSES = ("ml", "nce")


def build_parser():
    p = config.parser(__doc__.split("\n")[0])
    p.add_argument("--dataset", default="8gaussians", choices=[*datasets.NAMES, *tasks.IMAGES],
                   help="a 2D toy set, or digits (8x8, 64-D) / mnist (--mnist_images)")
    p.add_argument("--estimator", default=None, choices=ESTIMATORS,
                   help="fce: EBM + learned flow; nce: EBM + fixed Gaussian; mle: flow alone; "
                        "dsm / ssm: denoising / sliced score matching of the EBM alone; tilt: "
                        "an EBM tilt of a flow (default: fce; on images tilt)")
    p.add_argument("--flow", default=None, choices=[*LEARNED_FLOWS, "gaussian"],
                   help="noise model (fce) or model (mle); default: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_FLOW.items()))
    p.add_argument("--epoch", type=config.positive_int, default=None,
                   help="number of epochs (default 12; images 1000, an epoch of the digits "
                        "being 4 iterations)")
    p.add_argument("--budget", type=config.positive_float, default=None,
                   help="CPU-seconds of training after which the run ends (default: none); "
                        "the learning-rate schedule then follows the spent fraction")
    p.add_argument("--max_steps", type=config.positive_int, default=None,
                   help="iterations after which the run ends (default: all the epochs); the "
                        "learning-rate schedule then ends there")
    p.add_argument("--samples", type=config.positive_int, default=100_000,
                   help="training set size; an epoch is samples/batch iterations")
    p.add_argument("--test_samples", type=config.positive_int, default=20_000,
                   help="held-out samples for the test NLL")
    p.add_argument("--batch", type=config.positive_int, default=256)
    p.add_argument("--rule", default=None, choices=fce.RULES,
                   help="who steps (fce): threshold: the EBM while the accuracy against the "
                        "flow's own samples is below --threshold, else the flow; every: the "
                        "EBM at every iteration and the flow at every --flow_every-th too "
                        "(default: threshold; images every)")
    p.add_argument("--flow_every", type=config.positive_int, default=3,
                   help="--rule every: the flow steps at every k-th iteration (1: always)")
    p.add_argument("--threshold", type=config.open_unit, default=0.6,
                   help="--rule threshold: the accuracy in (0.5, 1) at which the flow steps "
                        "(with --flow_target: its starting value)")
    p.add_argument("--flow_target", type=config.unit_interval, default=0.33,
                   help="--rule threshold: the share of iterations in which the flow steps, "
                        "tracked by moving the threshold (0: the threshold stays fixed)")
    p.add_argument("--lr_ebm", type=config.positive_float, default=None,
                   help="EBM learning rate (default: FCE in 2D 5e-3, else 2e-3)")
    p.add_argument("--lr_flow", type=config.positive_float, default=None,
                   help="flow learning rate (default: FCE in 2D 1e-2, images 1e-3, else 3e-3)")
    p.add_argument("--b1", type=config.open_unit, default=0.9, help="Adam beta1")
    p.add_argument("--b2", type=config.open_unit, default=0.999, help="Adam beta2")
    p.add_argument("--lr_schedule", default="cosine", choices=["constant", "cosine"],
                   help="cosine: both learning rates decay to lr_min_factor * lr at the end")
    p.add_argument("--lr_min_factor", type=config.unit_interval, default=0.05,
                   help="the cosine schedule's final fraction of each learning rate")
    p.add_argument("--sm_sigma", type=config.positive_float, default=0.1,
                   help="dsm: std of the Gaussian noise added to the data")
    p.add_argument("--sm_projections", type=config.positive_int, default=1,
                   help="ssm: random projections per data point")
    p.add_argument("--ebm_hidden", type=config.positive_int, nargs="+", default=None,
                   help="EBM MLP widths (default 128 128 128; images 256 256, a tilt's g 512 512)")
    p.add_argument("--ebm_act", default="silu", choices=["silu", "softplus", "tanh", "elu",
                                                         "leakyrelu", "relu"])
    p.add_argument("--flow_mle", type=config.nonnegative_float, default=1.0,
                   help="weight of -E_data log q added to the flow's loss at its steps (fce)")
    p.add_argument("--flow_cover", type=config.nonnegative_float, default=0.01,
                   help="weight of -E_g log q_flow on the fixed Gaussian's samples in the "
                        "flow's loss (fce with --noise_mix > 0): keeps the flow free of holes")
    p.add_argument("--noise_mix", type=config.unit_interval, default=0.5,
                   help="fraction of FCE's noise drawn from a fixed Gaussian fitted to the data "
                        "(q = (1 - mix) q_flow + mix N(mean, cov)); 0: the flow alone")
    p.add_argument("--flow_layers", type=config.positive_int, default=None,
                   help="blocks: maf/nsf 5, nsf_coupling 8; glow steps 10")
    p.add_argument("--flow_hidden", type=config.positive_int, nargs="+", default=None,
                   help="flow network widths (default 64 64; images 128 128)")
    p.add_argument("--nsf_bins", type=config.positive_int, default=8, help="spline bins")
    p.add_argument("--nsf_bound", type=config.positive_float, default=5.0,
                   help="splines act on [-B, B], identity outside")
    config.add_flag(p, "--maf_bn", help="BatchNorm between MAF blocks")
    p.add_argument("--mnist_images", default=None, help="--dataset mnist: images IDX file")
    p.add_argument("--mnist_labels", default=None, help="--dataset mnist: labels IDX file")
    p.add_argument("--tilt_loss", default="ml", choices=TILT_LOSSES,
                   help="tilt: how g learns against the frozen base q0: ml (mean g(data) + log Z "
                        "by importance sampling on base samples) or nce (logistic, logit -g - c)")
    p.add_argument("--base_share", type=config.open_unit, default=None,
                   help="tilt: share of the run (iterations or --budget) for the base flow; it "
                        "ends sooner when its validation score stops improving (images); "
                        "default 0.5, images 0.7")
    config.add_flag(p, "--ebm_on_flow", help="fce: the EBM is a tilt of FCE's own flow, "
                    "p = q_flow exp(-g - c) (tilt.FlowTilt), scored like a tilt")
    p.add_argument("--tilt_bound", type=config.positive_float, default=None,
                   help="tilt: |g| < B (B tanh(g / B)): the tilt reweights its base by at most "
                        "e^(2B); default 4, a tilt on images 3")
    p.add_argument("--base_flows", type=config.positive_int, default=None,
                   help="tilt: the base is an equal mixture of this many flows trained one "
                        "after another (flows.FlowMixture), each early-stopped; default 1, "
                        "images 5")
    p.add_argument("--base_schedule", default="constant", choices=["constant", "share"],
                   help="tilt: constant: each base flow at --lr_flow until it stops early or "
                        "the base's share is spent; share: one base flow on --lr_schedule over "
                        "the base's share, as a flow alone over its run")
    p.add_argument("--base_run", default=None,
                   help="tilt: a finished train.py run whose flow is the frozen base (its "
                        "training CPU-s count in this run's --budget); default: train one")
    p.add_argument("--bank", type=config.positive_int, default=None,
                   help="tilt: base samples drawn once, when the base freezes (the noise); "
                        "default 50,000, images 100,000; fewer when a --budget is short (the "
                        "drawing stops after half of what is left, the validation samples "
                        "counted)")
    p.add_argument("--is_samples", type=config.positive_int, default=100_000,
                   help="tilt: base samples of the final importance-sampling log Z")
    p.add_argument("--val_every", type=config.positive_int, default=50,
                   help="images: iterations between validation scores (early stopping of flows "
                        "and tilts)")
    p.add_argument("--patience", type=config.positive_int, default=6,
                   help="images: validation scores without improvement that end a flow's or a "
                        "tilt's training (the best weights are kept)")
    p.add_argument("--ais_chains", type=config.positive_int, default=200,
                   help="images: AIS chains per repeat (2 repeats) for the final EBM bracket")
    p.add_argument("--ais_temps", type=config.positive_int, default=500,
                   help="images: AIS temperatures for the final EBM bracket")
    p.add_argument("--eval_every", type=config.positive_int, default=None,
                   help="epochs between evaluations (and the last epoch); default 2, images 100")
    p.add_argument("--plot_every", type=config.positive_int, default=None,
                   help="epochs between figures; default 1, images 100")
    p.add_argument("--log_every", type=config.positive_int, default=20,
                   help="iterations between metric rows")
    return p


def get_args(argv=None):
    """The parsed and resolved command line (without --resume handling)."""
    return resolve_estimator(config.parse(build_parser(), argv))


def resolve_estimator(args):
    """Fill in the default flow of the estimator and the sizes of the dataset, and reject
    combinations that mean nothing."""
    image = args.dataset in tasks.IMAGES
    # images: the tilt of a flow (the best EBM of the digits comparison, docs/digits.md)
    args.estimator = args.estimator or ("tilt" if image else "fce")
    args.rule = args.rule or ("every" if image else "threshold")
    if image and args.lr_flow is None:
        args.lr_flow = IMAGE_DEFAULTS["lr_flow"]
    threshold_2d = (args.estimator == "fce" and args.flow != "gaussian" and not image
                    and args.rule == "threshold")
    for key, value in (THRESHOLD_LRS if threshold_2d else OTHER_LRS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    tilt_image = image and args.estimator == "tilt"
    if args.ebm_hidden is None:
        args.ebm_hidden = (TILT_IMAGE if tilt_image else IMAGE_DEFAULTS)["ebm_hidden"] \
            if image else [128, 128, 128]
    if args.tilt_bound is None:
        args.tilt_bound = TILT_IMAGE["tilt_bound"] if tilt_image else 4.0
    if args.flow_hidden is None:
        args.flow_hidden = IMAGE_DEFAULTS["flow_hidden"] if image else [64, 64]
    for key in TILT_2D:
        if getattr(args, key) is None:
            setattr(args, key, (IMAGE_DEFAULTS if image else TILT_2D)[key])
    if args.epoch is None:
        args.epoch = IMAGE_DEFAULTS["epoch"] if image else 12
    if args.eval_every is None:
        args.eval_every = IMAGE_DEFAULTS["eval_every"] if image else 2
    if args.plot_every is None:
        args.plot_every = IMAGE_DEFAULTS["plot_every"] if image else 1
    if args.estimator in SCORE_MATCHING:
        if args.flow is not None:
            config.fail(f"--estimator={args.estimator} trains the EBM alone; drop "
                        f"--flow={args.flow}")
        return args
    if args.flow == "gaussian" and args.estimator == "fce":
        args.estimator = "nce"  # a fixed Gaussian noise model is NCE
    args.flow = args.flow or (image and IMAGE_FLOW.get(args.estimator)
                              or DEFAULT_FLOW[args.estimator])
    if args.estimator == "nce" and args.flow != "gaussian":
        config.fail(f"--estimator=nce uses the fixed Gaussian noise; drop --flow={args.flow} "
                    f"or use --estimator=fce")
    if args.noise_mix >= 1:
        config.fail("--noise_mix must be below 1 (1 would be NCE: use --estimator=nce)")
    if args.estimator in ("mle", "tilt") and args.flow == "gaussian":
        config.fail(f"--estimator={args.estimator} needs a learned flow: pass --flow="
                    + "/".join(LEARNED_FLOWS))
    if args.base_schedule == "share" and args.base_flows > 1:
        config.fail(f"--base_schedule share decays one base flow over the base's share; "
                    f"drop it or use --base_flows 1 (not {args.base_flows})")
    if args.base_run and args.estimator != "tilt":
        config.fail("--base_run is the base of a tilt; drop it or use --estimator=tilt")
    if args.ebm_on_flow and args.estimator != "fce":
        config.fail("--ebm_on_flow tilts FCE's flow; drop it or use --estimator=fce")
    if args.estimator == "fce":
        why = rule(args).check()
        if why:
            config.fail(why)
    return args


def rule(args):
    """Who steps, from the flags (fce.Rule)."""
    return fce.Rule(args.rule, args.flow_every, args.threshold, args.flow_mle,
                    args.flow_cover, args.flow_target)


# ----------------------------------------------------------------------------- models
def flow_kwargs(args, dim=2):
    """build_flow keyword arguments of --flow from the flow flags; on images a density on the
    box [-1, 1]^D (flows.BoxLogit), where the dequantised images and the EBMs live."""
    if args.flow in ("gaussian", None):
        return {}
    kwargs = {"dim": dim, "hidden": args.flow_hidden, "box": args.dataset in tasks.IMAGES}
    if args.flow == "glow":
        kwargs["n_steps"] = args.flow_layers or 10
    else:
        kwargs["n_blocks"] = args.flow_layers or (8 if args.flow == "nsf_coupling" else 5)
    if args.flow == "maf":
        kwargs["batch_norm"] = args.maf_bn
    if args.flow.startswith("nsf"):
        kwargs.update(bins=args.nsf_bins, bound=args.nsf_bound)
    return kwargs


def make_models(args, x_fit, device):
    """The EBM (None for mle) and the flow (None for score matching): for nce the Gaussian
    fitted to the whole training set x_fit (N, D) (the same one FCE mixes into its noise),
    else initialised on its first batch. Score matching learns no log-normaliser c. For tilt
    the EBM is tilt.FlowTilt(flow, g), g starting at 0 (p = q0)."""
    ebm = flow = None
    if args.estimator != "mle":
        ebm = EBM(x_fit.shape[1], args.ebm_hidden, args.ebm_act).to(device)
        ebm.c.requires_grad_(args.estimator not in SCORE_MATCHING)
    if args.flow is not None:
        data = x_fit if args.flow == "gaussian" else x_fit[:args.batch]
        try:
            flows = [build_flow(args.flow, data, **flow_kwargs(args, x_fit.shape[1])).to(device)
                     for _ in range(args.base_flows if args.estimator == "tilt" else 1)]
        except ValueError as e:
            config.fail(str(e))
        flow = FlowMixture(flows).to(device) if args.estimator == "tilt" else flows[0]
        if args.estimator == "tilt":
            flow.n_active.fill_(0)  # none finished yet
    if args.base_run:
        flow = base_flow(args, x_fit.shape[1], device)
    if args.estimator == "tilt" or args.ebm_on_flow:
        import tilt
        torch.nn.init.zeros_(ebm.net[-1].weight)
        torch.nn.init.zeros_(ebm.net[-1].bias)
        ebm = tilt.FlowTilt(flow, ebm, box=args.dataset in tasks.IMAGES, bound=args.tilt_bound)
    return ebm, flow


def base_flow(args, dim, device):
    """The frozen base of --base_run: its flow (a FlowMixture), checked to be a flow of this
    dataset and dimension; bad input stops with one line."""
    import checkpoint

    try:
        run = checkpoint.load_run(args.base_run, device)
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        config.fail(f"--base_run: {e}; pass a finished train.py run with a flow")
    if run.flow is None or not hasattr(run.flow, "log_prob"):
        config.fail(f"--base_run {args.base_run} holds no flow; train one with "
                    f"`python train.py --estimator mle --dataset {args.dataset}`")
    if run.config.get("dataset") != args.dataset or run.flow.dim != dim:
        config.fail(f"--base_run {args.base_run} is a flow of {run.config.get('dataset')} "
                    f"(dimension {run.flow.dim}), not of {args.dataset} (dimension {dim})")
    flow = run.flow if isinstance(run.flow, FlowMixture) else FlowMixture([run.flow])
    summary = os.path.join(args.base_run, "summary.json")
    cpu = json.load(open(summary)).get("cpu_s", 0.0) if os.path.isfile(summary) else 0.0
    flow.base_cpu_s = float(cpu)
    return flow.to(device)


def make_contrast(args, flow, x_fit, device, window=8):
    """FCE's / NCE's noise q (fce.Contrast): the flow mixed with the Gaussian fitted to the
    training set (fce, --noise_mix), or the fixed Gaussian alone (nce). Under --rule every
    the cache window ends at the next flow step; under --rule threshold it is a few
    iterations (a flow step drops the rest)."""
    if args.estimator not in ("fce", "nce"):
        return None
    mix = args.noise_mix if args.estimator == "fce" else 0.0
    gauss = build_flow("gaussian", x_fit).to(device) if mix > 0 else None
    if args.estimator == "fce":
        window = max(1, args.flow_every - 1) if args.rule == "every" else THRESHOLD_WINDOW
    return fce.Contrast(flow, args.batch, args.seed, gauss, mix, window)


def make_optimizers(args, ebm, flow):
    betas = (args.b1, args.b2)
    energy = getattr(ebm, "g", ebm)  # a tilt learns g only, never its base
    opt_ebm = None if ebm is None else Adam(
        [p for p in energy.parameters() if p.requires_grad], lr=args.lr_ebm, betas=betas)
    flow_params = [p for p in flow.parameters() if p.requires_grad] if flow is not None else []
    opt_flow = Adam(flow_params, lr=args.lr_flow, betas=betas) if flow_params else None
    return opt_ebm, opt_flow


# ----------------------------------------------------------------------------- outputs
def save_figure(args, task, ebm, flow, epoch):
    """The epoch's figure (tasks.py: densities in 2D, sample grids for images)."""
    path = os.path.join(args.image_dir, f"epoch_{epoch:04d}.png")
    model = args.flow or args.estimator
    with evaluation_mode(flow):
        return task.figure(path, ebm, flow, f"{args.dataset}, {model}, epoch {epoch}")


class evaluation_mode:
    """The flow (if any) in eval mode for the duration (a BatchNormFlow uses its running
    statistics), its mode restored afterwards."""

    def __init__(self, flow):
        self.flow, self.mode = flow, flow.training if flow is not None else None

    def __enter__(self):
        if self.flow is not None:
            self.flow.eval()

    def __exit__(self, *exc):
        if self.flow is not None:
            self.flow.train(self.mode)


def specs(ebm, flow):
    """The architectures next to the weights (checkpoint.load_run rebuilds the models; a tilt
    is its g on the run's flow, `tilt` its FlowTilt arguments)."""
    energy = getattr(ebm, "g", ebm)
    return {**({"flow_spec": flow.spec()} if flow is not None else {}),
            **({"ebm_spec": energy.spec()} if ebm is not None else {}),
            **({"tilt": {"box": ebm.box, "bound": ebm.bound}} if energy is not ebm else {})}


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args, ckpt = scaffold.parse(build_parser(), argv, SCRIPT)
    if not args.resume:
        resolve_estimator(args)
    util.apply_threads(args)
    device = scaffold.device(args)
    if args.dataset in tasks.IMAGES:
        try:
            task = tasks.make_task(args, device)
        except ValueError as e:
            config.fail(str(e))
    else:
        util.check_memory({"--samples": args.samples * 2 * 4,
                           "--test_samples": args.test_samples * 2 * 4})
        task = None  # drawn inside the run, after the seed is set
    n_train = task.n_train if task else args.samples
    if n_train < args.batch:
        what = f"the {n_train} training images are" if task else f"--samples {n_train} is"
        config.fail(f"{what} smaller than --batch {args.batch}; an epoch needs at least one "
                    f"batch")
    name = (args.estimator, args.flow or "", args.dataset, f"s{args.seed}")
    with scaffold.Run(args, SCRIPT, name, ckpt) as run:
        return run.execute(lambda: train(args, run, device, task))


# the metrics row's running sums (run.loop's `add` and `means`)
ROW_SUMS = ("v_sum", "acc_sum", "acc_flow_sum", "n_ebm", "n_flow")
# who steps next: the threshold rule's current threshold and the last accuracy on the flow's
# own samples (NaN before the first iteration: the EBM steps first)
WHO = dict(threshold=None, accuracy_flow=math.nan)


def train(args, run, device, task=None):
    """Data, models, the update and evaluation; returns the summary (None before the first
    evaluation)."""
    # data: a fixed training set and a held-out test set (tasks.py), from the seed
    task = task or tasks.make_task(args, device)
    util.set_seed(args.seed)
    # models, optimisers and the noise
    ebm, flow = make_models(args, task.x_fit, device)
    opt_ebm, opt_flow = make_optimizers(args, ebm, flow)
    contrast = make_contrast(args, flow, task.x_fit, device)
    the_rule = rule(args) if args.estimator == "fce" else fce.Rule()
    iters = task.n_train // args.batch
    total = min(iters * args.epoch, args.max_steps or math.inf)
    # what the experiment adds to the loop's state (kept in checkpoints: a resumed run writes
    # the same rows as an uninterrupted one)
    checkpoints, loop = run.checkpoints, run.loop
    offset = getattr(flow, "base_cpu_s", 0.0)  # --base_run: its training counts too
    state = loop.track(epochs=True, sums=ROW_SUMS, flow_steps=0, ebm_steps=0,
                       flow_steps_at_eval=0, **SELECTION,
                       **{**WHO, "threshold": the_rule.threshold},
                       phase=("tilt" if args.base_run else "base")
                       if args.estimator == "tilt" else None)
    if args.base_run:  # g's stage, and its schedule, start with the run (a resume loads it)
        state["switch"] = offset / args.budget if args.budget else 0.0
    checkpoints.load_or_save_first(lambda: specs(ebm, flow), flow=flow, opt_flow=opt_flow,
                                   ebm=getattr(ebm, "g", ebm), opt_ebm=opt_ebm)
    bank = Bank(args, ebm, flow, state) if args.estimator == "tilt" else None
    base_lrs = [(opt, lr) for opt, lr in ((opt_ebm, args.lr_ebm), (opt_flow, args.lr_flow))
                if opt is not None]
    print_start(args, run, total, iters, device)

    def progress_at(step):
        return max(step / total, (loop.cpu_s + offset) / args.budget if args.budget else 0)

    def out_of_budget():
        return loop.spent(args.budget, offset) or state["step"] >= total or state["stopped"]

    def batch_at(s):
        """The data batch of iteration s of the current epoch (None past its end)."""
        rows = loop.rows(s, args.batch)
        return task.batch(rows, s) if rows is not None else None

    metrics = {}
    for epoch_steps in loop.epochs(args.epoch, iters, task.n_train, device, total,
                                   until=out_of_budget):
        for step in epoch_steps:
            progress = stage_progress(args, state, progress_at(step))
            for opt, lr in base_lrs:
                util.set_lr(opt, lr * util.lr_factor(args.lr_schedule, progress, 1,
                                                     args.lr_min_factor))
            if ebm is None or state["phase"] == "base":
                V = fce.mle_step(next(iter(selected(state, ebm, flow).values())),
                                 batch_at(step), opt_flow)
                r = fce.StepResult(V, None, None, False, True)
            elif state["phase"] == "tilt":
                loss = bank.step(batch_at(step), step, opt_ebm, args.tilt_loss)
                r = fce.StepResult(loss, None, None, True, False)
            elif args.estimator in SCORE_MATCHING:
                loss = score_matching.sm_step(ebm, batch_at(step), opt_ebm, args.estimator,
                                              args.sm_sigma, args.sm_projections)
                r = fce.StepResult(loss, None, None, True, False)
            else:
                turn = the_rule.flow_turn(step, state["accuracy_flow"], state["threshold"])
                r = fce.fce_step(ebm, contrast, step, batch_at(step), batch_at, opt_ebm,
                                 opt_flow, the_rule, turn)
                state.update(accuracy_flow=float(r.accuracy_flow), threshold=the_rule
                             .next_threshold(state["threshold"], r.flow))
            loop.check(r.V)  # not finite: a loss or gradient was, and nothing stepped
            loop.add(v_sum=r.V, acc_sum=r.accuracy, acc_flow_sum=r.accuracy_flow, n_ebm=r.ebm,
                     n_flow=r.flow)
            state.update(flow_steps=state["flow_steps"] + r.flow,
                         ebm_steps=state["ebm_steps"] + r.ebm)
            due = state["phase"] == "base" and progress_at(state["step"]) >= args.base_share
            if state["step"] % args.val_every == 0 or due:
                select(args, run, state, task, ebm, flow, bank, progress_at(state["step"]))
            if state["step"] % args.log_every == 0:
                log_row(run, state, args, opt_ebm, opt_flow)
        epoch, last = state["epoch"], state["epoch"] == args.epoch or out_of_budget()
        if last:
            restore_best(state, selected(state, ebm, flow))
        if epoch % args.eval_every == 0 or last:
            metrics = evaluate(args, run, state, task, ebm, flow, last)
        if epoch % args.plot_every == 0 or last:
            run.log.log_image("density", save_figure(args, task, ebm, flow, epoch),
                              state["step"])
        checkpoints.save()
    steps = {"steps": state["step"], "ebm_steps": state["ebm_steps"],
             "flow_steps": state["flow_steps"]}
    if state["step"]:
        steps["flow_step_fraction"] = state["flow_steps"] / state["step"]
    print(steps_line(args, steps))
    print(f"done: {args.out_dir} (curves: {os.path.join(args.out_dir, 'curves.png')}; gif: "
          f"{gif_hint(args.image_dir)})")
    stages = {"base_steps": state["base_steps"], "base_cpu_s": state["base_cpu_s"] + offset,
              "bank_draws": state["bank_draws"], "best_val": state["best_val"]} \
        if args.estimator == "tilt" else \
        {"best_val": state["best_val"]} if state["best_state"] else {}
    return {**metrics, **steps, **stages} if metrics else None

def steps_line(args, steps):
    """The run's iterations and who stepped in how many of them (the mechanism beside the
    numbers: a model that stopped stepping shows here)."""
    n = steps["steps"]
    line = f"{n} iterations"
    if n and args.estimator in ("fce", "nce", *SCORE_MATCHING):
        line += f"; the EBM stepped in {steps['ebm_steps']} ({steps['ebm_steps'] / n:.1%})"
    if n and args.estimator in ("fce", "mle"):
        line += (f"; the flow stepped in {steps['flow_steps']} "
                 f"({steps['flow_step_fraction']:.1%})")
    return line


# ----------------------------------------------------------------------------- selection
SELECTION = dict(best_val=-math.inf, best_state=None, since_best=0, stopped=False, switch=0.0,
                 base_steps=0, base_cpu_s=0.0, member=0, bank_draws=0)


def bank_drawn(drawn, cpu_s, cpu_s_left, n_val=tasks.VAL_IS):
    """Whether a bank whose `drawn` samples took `cpu_s` is drawn: it has then taken half of
    the `cpu_s_left` it started with, less what `n_val` validation samples will take at its
    rate, 2 cpu_s + n_val cpu_s / drawn >= cpu_s_left (g keeps the rest, as long again)."""
    return 2 * cpu_s + n_val * cpu_s / drawn >= cpu_s_left


class Bank:
    """A tilt's noise: --bank samples of its frozen base, drawn once when the base freezes (on
    images those inside the box, where the tilt lives), and tasks.VAL_IS more for the
    validation log Z; both from the seed, and as many as were drawn then (`bank_draws` in the
    run's state), so a resumed run redraws the same ones."""

    def __init__(self, args, ebm, flow, state):
        self.tilt, self.flow, self.n, self.seed = ebm, flow, args.bank, args.seed
        self.state, self.y, self.y_val = state, None, None

    def freeze(self, cpu_s_left=None):
        """Freeze the base (no gradient, eval mode) and draw the bank. With `cpu_s_left` (the
        budget left when the base froze) the drawing stops early once it has taken half of
        that less what the validation samples will take at the same rate: g then trains for
        at least as long as its bank took to draw."""
        import tilt
        self.flow.requires_grad_(False)
        self.flow.eval()
        gen = torch.Generator().manual_seed(self.seed * 7919 + 3)
        resumed = self.state["bank_draws"] > 0
        y = tilt.base_samples(self.flow, self.state["bank_draws"] if resumed else self.n, gen,
                              until=None if cpu_s_left is None or resumed else
                              lambda drawn, cpu_s: bank_drawn(drawn, cpu_s, cpu_s_left))
        self.state["bank_draws"] = len(y)
        self.y = y[tilt.in_box(y)] if self.tilt.box else y  # where the tilt lives
        if len(self.y) == 0:
            config.fail(f"the base flow put none of its {len(y)} samples inside the box, so the "
                        f"tilt has nothing to train against; train the base longer (a larger "
                        f"--budget or --max_steps) or raise --bank")
        self.y_val = tilt.base_samples(self.flow, tasks.VAL_IS, gen)
        return self

    def step(self, x, step, opt, loss):
        """One step of g on the data batch x against len(x) rows of the bank."""
        import tilt
        if self.y is None:
            self.freeze()  # resumed in the g stage
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rows = torch.randint(len(self.y), (len(x),), generator=gen).to(self.y.device)
        return tilt.tilt_step(self.tilt, x, self.y[rows], opt, loss)


def gif_hint(folder: str) -> str:
    """The command that turns a folder of frames into a gif."""
    return f"python images/create_gif.py {shlex.quote(folder)}"


def stage_progress(args, state, progress):
    """Where the learning-rate schedule stands: the run's progress, or for a tilt the
    progress within its stage (the base until --base_share of the run, then g)."""
    if args.estimator != "tilt":
        return progress
    if state["phase"] == "base":  # --base_schedule share: over the base's share of the run,
        # as a flow alone over its run; constant: at --lr_flow until it stops or the share ends
        return min(progress / args.base_share, 1.0) if args.base_schedule == "share" else 0.0
    return min((progress - state["switch"]) / max(1.0 - state["switch"], 1e-9), 1.0)


def selected(state, ebm, flow):
    """What early stopping watches now: the flow (mle, a tilt's base stage), g (a tilt's g
    stage), else nothing (FCE, NCE, score matching keep their last iterate)."""
    if ebm is None:
        return {"flow": flow}
    if state["phase"] == "base":
        return {"flow": flow.members[state["member"]]}
    return {"g": ebm.g} if state["phase"] == "tilt" else {}


def select(args, run, state, task, ebm, flow, bank, progress):
    """Early stopping and model selection on the validation split (images): keep a copy of
    the best weights of what trains now, and stop it after --patience scores without
    improvement. A tilt's base flows train one after another, each until it stops early;
    the base stage ends after --base_flows of them or at --base_share of the run (the flow
    then in training joins only if it improves the mixture). Then the base is frozen, its
    bank drawn, and g's selection starts from g = 0 (p = q0)."""
    modules = selected(state, ebm, flow)
    image = hasattr(task, "validate") and modules
    if image:
        score, ess_ok = tilt_validation(task, ebm, flow, bank) if state["phase"] == "tilt" \
            else (task.validate(None, modules["flow"]), True)  # the flow in training (base k)
        if score > state["best_val"] and ess_ok:
            state.update(best_val=score, best_state=copy.deepcopy(
                {k: m.state_dict() for k, m in modules.items()}), since_best=0)
        else:
            state["since_best"] += 1
        run.log.log({"ll_val": score, "ll_val_best": state["best_val"]}, state["step"])
    patience_out = image and state["since_best"] >= args.patience
    k, cut = state["member"], progress >= args.base_share
    if state["phase"] == "base" and (patience_out or cut):
        restore_best(state, modules)
        keep = join_mixture(flow, k, task if image and cut and k > 0 else None)
        run.loop.print(f"step {state['step']} | base flow {k + 1} of {args.base_flows} "
                       + ("done" if keep else "dropped: it does not improve the mixture yet")
                       + (f" (validation {state['best_val']:.2f}; the mixture of "
                          f"{int(flow.n_active)}: {task.validate(None, flow):.2f})"
                          if image else ""))
        state.update(member=k + 1, **{k: SELECTION[k] for k in (
            "best_val", "best_state", "since_best")})
        if state["member"] < args.base_flows and not cut:
            return
        bank.freeze(args.budget * (1 - progress) if args.budget else None)
        state.update(phase="tilt", switch=progress, base_steps=state["step"],
                     base_cpu_s=run.loop.cpu_s)
        run.loop.print(f"step {state['step']} | the base ({int(flow.n_active)} flows) is "
                       f"frozen; the tilt g trains against {len(bank.y)} of its "
                       f"{state['bank_draws']} samples (those where the tilt lives; --bank "
                       f"{args.bank})")
        if image:
            select(args, run, state, task, ebm, flow, bank, progress)  # g = 0 scores first
    elif patience_out:
        state["stopped"] = True


def tilt_validation(task, ebm, flow, bank, floor=tasks.IS_ESS_FLOOR):
    """A tilt's validation score with log Z by importance sampling on the bank's validation
    samples (one g pass), and whether that log Z rests on at least `floor` of them (ESS): a
    tilt whose weights degenerate is not selected, however well it scores."""
    import tilt

    log_Z, ess, _ = tilt.log_Z_is(ebm.g_box, bank.y_val)
    return task.validate(ebm, flow, log_Z), ess >= floor * len(bank.y_val)


def join_mixture(flow, k, task=None):
    """Base flow k joins the mixture (flow.n_active = k + 1); with `task` (a flow cut short
    by the base's share of the run) only if the mixture's validation score improves."""
    before = task.validate(None, flow) if task is not None else None
    flow.n_active.fill_(k + 1)
    if before is not None and task.validate(None, flow) < before:
        flow.n_active.fill_(k)
        return False
    return True


def restore_best(state, modules):
    """Load the selected weights (if any were kept) into the modules early stopping watched."""
    for k, weights in (state["best_state"] or {}).items():
        if k in modules:
            modules[k].load_state_dict(weights)


def print_start(args, run, total, iters, device):
    who = (f", rule {args.rule} " + (
        f"(flow every {args.flow_every})" if args.rule == "every" else
        f"(threshold {args.threshold:g}" + (f", moved to keep the flow at {args.flow_target:g} "
                                            f"of the steps)" if args.flow_target else ")"))
           if args.estimator == "fce" else "")
    print(f"run {run.name}: {args.estimator} on {args.dataset}, flow={args.flow}{who}, {total} "
          f"iterations ({args.epoch} epochs x {iters})" + (f", budget {args.budget:g} CPU-s"
          if args.budget else "") + f", device={device}; outputs in {args.out_dir}, figures "
          f"in {args.image_dir}")


def log_row(run, state, args, opt_ebm, opt_flow):
    """A metrics row: the averages of the iterations since the last one (run.loop.means: the
    sums start again) and their timing, and the threshold rule's current threshold."""
    m, estimator = run.loop.means(), args.estimator
    row = ({"nll_train": m["v_sum"]} if estimator == "mle" or state["phase"] == "base" else
           {"tilt_loss": m["v_sum"]} if state["phase"] == "tilt" else
           {"sm_loss": m["v_sum"]} if estimator in SCORE_MATCHING else
           {"value": -m["v_sum"], "accuracy": m["acc_sum"], "accuracy_flow": m["acc_flow_sum"],
            "ebm_step_fraction": m["n_ebm"], "flow_step_fraction": m["n_flow"]})
    if opt_ebm is not None and state["phase"] != "base":  # the EBM (or g) is training
        row["lr_ebm"] = opt_ebm.param_groups[0]["lr"]
    if estimator == "fce" and args.rule == "threshold":
        row["threshold"] = state["threshold"]
    row.update(epoch=state["epoch"], cpu_s=run.loop.cpu_s)
    if opt_flow is not None:
        row["lr_flow"] = opt_flow.param_groups[0]["lr"]
    row["it_per_s"], row["cpu_s_per_it"] = run.loop.rate()
    run.log.log(row, state["step"])
    run.loop.print(None, {k: f"{row[k]:.3f}" for k in ("value", "accuracy", "nll_train",
                                                        "sm_loss", "tilt_loss") if k in row})


def evaluate(args, run, state, task, ebm, flow, final=False):
    """The task's evaluation (printed, logged with the flow's notes) and the curves."""
    ep = state["epoch"]
    with evaluation_mode(flow):
        m = task.evaluate(ebm, flow, final)
    if args.estimator in SCORE_MATCHING:  # the loss it descends, on the held-out set
        m["sm_loss_test"] = score_matching.held_out_loss(ebm, task.x_test, args.estimator,
                                                         args.sm_sigma, args.sm_projections)
    run.loop.print(f"epoch {ep} | " + tasks.format_metrics(m))
    for note in flow_notes(args, m, state):
        run.loop.print(f"epoch {ep} | note: {note}")
    state["flow_steps_at_eval"] = state["flow_steps"]
    run.log.log({**m, "epoch": ep, "cpu_s": run.loop.cpu_s, "flow_steps": state["flow_steps"]},
                state["step"])
    draw_curves(args, run, final)
    return m


CURVES_EVERY_S = 60  # curves.png: redrawn at an evaluation this long after its last drawing
_curves_drawn = {}  # its path -> time.monotonic() of that drawing


def draw_curves(args, run, final):
    """curves.png from the run's metrics (plots.training_curves): at the last evaluation, and
    at the others when a minute has passed since it was drawn (a drawing costs about a
    CPU-second; wandb has the live curves)."""
    path = os.path.join(args.out_dir, "curves.png")
    if not final and time.monotonic() - _curves_drawn.get(path, -math.inf) < CURVES_EVERY_S:
        return
    threshold = args.threshold if args.estimator == "fce" and args.rule == "threshold" else None
    plots.training_curves(path, {run.name: (read_metrics(args.out_dir), threshold)})
    _curves_drawn[path] = time.monotonic()


def flow_notes(args, m, state):
    """What a reader of the flow's numbers must know: a flow that stopped stepping while far
    from the data (a failed FCE run), and a grid KL that disagrees with the Monte Carlo KL
    on the test set by more than 0.05 nats plus three standard errors, and where from."""
    notes = []
    gap = m.get("nll_flow", math.nan) - m.get("entropy", math.nan)
    if (args.estimator == "fce" and state["flow_steps"] == state["flow_steps_at_eval"]
            and state["step"] > 0 and gap > 0.1):
        notes.append(f"the flow took no step since the last evaluation while its test NLL is "
                     f"{gap:.3f} nats above the entropy: it has stopped learning (use --rule "
                     f"every, or a lower --threshold)")
    if "kl_flow" in m:
        diff = m["kl_flow"] - m["kl_flow_mc"]
        if abs(diff) > 0.05 + 3 * m["kl_flow_mc_se"]:
            where = ("grid cells where the flow has almost no mass but the data has some "
                     f"(holes; mass of p_data where log q < log p - 10: {m['hole_mass']:.2g})"
                     if diff > 0 else "spikes of q narrower than a grid cell")
            notes.append(f"the flow's grid KL {m['kl_flow']:.4f} and its Monte Carlo KL on "
                         f"the test set {m['kl_flow_mc']:.4f} disagree by {diff:+.4f} nats: "
                         f"{where}")
    return notes


if __name__ == "__main__":
    sys.exit(config.cli(main))
