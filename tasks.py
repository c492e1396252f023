"""What train.py fits and how a fit is scored: a 2D toy set (exact, on a grid) or images as a
continuous density (dequantised, scored in nats per image by the flow's exact likelihood and
the EBM's annealed-importance-sampling bracket).

    task = make_task(args, device)          # Toy2D or Images
    task.dim, task.n_train
    x = task.batch(idx, step)               # the training rows idx, as iteration `step` sees them
    task.x_fit                              # what a Gaussian / a flow is fitted / initialised on
    m = task.evaluate(ebm, flow, final)     # a dict of numbers (format_metrics prints it)
    task.figure(path, ebm, flow, title)     # the epoch's figure

Images (dequantize.py has the maths): the training rows stay on their grey-level lattice and
are dequantised afresh for every batch, from a generator seeded by (seed, step), so a batch is
the same numbers whenever it is asked for (FCE's cache asks ahead) and after a resume. The
held-out images are dequantised once (dequantize.test_set). Scores, in nats per image on the
[0, L) scale and bits per dimension:

    ll_flow              mean log q(y_test) + D log(2 / L)               (exact)
    ll_ebm_c             mean (-f(y_test) - c) + D log(2 / L)     (c: NCE/FCE's own log Z guess)
    ll_ebm_lower/_upper  the AIS bracket (ais.loglik_bracket) at the final evaluation, with
                         ais_gap, log_Z_ais (forward) and ais_ess (forward ESS of the chains)

An image EBM is a density on the box the dequantised images live in, [-1, 1]^D:
p(y) = exp(-f(y)) / Z with Z = int_box exp(-f). (On all of R^D an MLP energy that falls
linearly in some direction has no normaliser at all, and NCE's Gaussian noise never shows the
EBM the far corners.) AIS runs in unconstrained coordinates z = atanh(y), whitened
(`ais.BoxEnergy`, `ais.box_bracket`), where

    f_z(z) = f(tanh z) - sum_i log(1 - tanh^2 z_i),   int_R^D exp(-f_z) dz = Z,

so the same Z comes out of an unconstrained sampler, and log p(y) = log p_z(z) - sum_i log(1 -
y_i^2). Its base is the Gaussian fitted to atanh of the dequantised training images. A flow is
a density on R^D; `ll_flow_box` adds -log Q(box), the log of the share of its samples that
fall in the box: the flow restricted and renormalised to the box, the EBM's footing.
"""
import copy
import math

import torch

import datasets
import evaluation
import plots
import util

# the image sets (dequantize.LEVELS's keys), named here so that a 2D run imports none of the
# image modules (ais, dequantize, mcmc_images: imported where Images uses them)
IMAGES = ("digits", "mnist")


AIS_COORDINATES = 2  # 1: atanh; 2: whitened atanh (ais.BoxEnergy); bench.digits rescores older


def make_task(args, device):
    """Toy2D for the toy sets, Images for digits / mnist."""
    if args.dataset in IMAGES:
        return Images(args, device)
    return Toy2D(args, device)


class Toy2D:
    """A toy set with a known density: a fixed training set and held-out set from the seed,
    scored exactly on the grid (evaluation.evaluate_2d)."""

    def __init__(self, args, device):
        rng = util.set_seed(args.seed)
        self.dataset, self.device, self.dim = args.dataset, device, 2
        self.x_train = datasets.sample(args.dataset, args.samples, rng).to(device)
        self.x_test = datasets.sample(args.dataset, args.test_samples, rng).to(device)
        self.x_fit, self.n_train = self.x_train, args.samples

    def batch(self, idx, step):
        return self.x_train[idx]

    def evaluate(self, ebm, flow, final=False):
        m = evaluation.evaluate_2d(self.dataset, self.x_test, ebm, flow, device=self.device)
        if ebm is not None and not learns_c(ebm):
            m.pop("c_gap", None)  # score matching learns no c
        return m

    def figure(self, path, ebm, flow, title):
        panels = [("data", plots.samples(self.x_test))]
        if flow is not None:
            panels.append((f"flow q ({flow.spec()['name']})",
                           plots.density(flow.log_prob, n=120, device=self.device,
                                         normalise=False)))
        if ebm is not None:
            panels.append(("EBM p = exp(-f) / Z", plots.density(lambda x: -ebm(x), n=120,
                                                                device=self.device)))
        return plots.save_panels(path, panels, title=title)


class Images:
    """8x8 digits (or MNIST from local files) as a continuous density on [-1, 1]^D."""

    def __init__(self, args, device):
        import dequantize
        import mcmc_images

        try:
            x_train, _, x_test, _ = mcmc_images.load_images(
                args.dataset, getattr(args, "mnist_images", None),
                getattr(args, "mnist_labels", None))
        except mcmc_images.DataError as e:
            raise ValueError(str(e)) from None
        self.dataset, self.device, self.seed = args.dataset, device, args.seed
        self.L, self.shape = dequantize.LEVELS[args.dataset], mcmc_images.image_shape(args.dataset)
        self.dim, self.n_train = x_train.shape[1], len(x_train)
        self.x_train = x_train.to(device)
        self.x_test = dequantize.test_set(x_test, self.L).to(device)
        self.x_fit = dequantize.dequantize(x_train, self.L,
                                           torch.Generator().manual_seed(args.seed)).to(device)
        self.ais = dict(n_chains=args.ais_chains, n_temps=args.ais_temps, repeats=2)

    def batch(self, idx, step):
        """Training rows idx dequantised with the draws of iteration `step`."""
        import dequantize

        gen = torch.Generator().manual_seed(((self.seed + 7919) * 1_000_003 + step) % 2 ** 63)
        return dequantize.dequantize(self.x_train[idx], self.L, gen)

    def nats(self, log_p_y):
        import dequantize

        return float(dequantize.to_nats(log_p_y, self.dim, self.L))

    @torch.no_grad()
    def evaluate(self, ebm, flow, final=False):
        m = {}
        if flow is not None:
            m["ll_flow"] = self.nats(flow.log_prob(self.x_test).double().mean())
            m["bpd_flow"] = -m["ll_flow"] / (self.dim * math.log(2))
            if final:
                m["ll_flow_box"] = m["ll_flow"] - math.log(self.box_share(flow))
        if ebm is not None:
            if learns_c(ebm):
                m["ll_ebm_c"] = self.nats(-ebm(self.x_test).double().mean() - ebm.c.double())
            if final:
                m.update(self.bracket(ebm))
        return m

    def box_share(self, flow, n=10000):
        """Q(box): the share of n samples of the flow inside [-1, 1]^D (at least 1/n)."""
        with torch.no_grad():
            x = torch.cat([flow.sample(1000) for _ in range(n // 1000)])
        return max(float(((x >= -1) & (x <= 1)).all(1).double().mean()), 1.0 / n)

    def bracket(self, ebm):
        """The EBM's test log-likelihood bracket by AIS on the box (ais.box_bracket: whitened
        atanh coordinates fitted to x_fit, float64 chains), in nats per image and bits per
        dimension (module docstring)."""
        import ais

        br = ais.box_bracket(_float64(ebm), self.x_fit, self.x_test, **self.ais)
        lower, upper = self.nats(br.lower), self.nats(br.upper)
        bits = self.dim * math.log(2)
        return {"ll_ebm_lower": lower, "ll_ebm_upper": upper, "ais_gap": br.gap,
                "bpd_ebm_lower": -upper / bits, "bpd_ebm_upper": -lower / bits,
                "log_Z_ais": br.log_Z_lower, "log_Z_ais_reverse": br.log_Z_upper,
                "ais_ess": float(br.forward.ess.min()), "ais_acceptance": br.forward.acceptance,
                "ais_coordinates": AIS_COORDINATES,
                **({"c_gap": float(ebm.c.detach()) - br.log_Z_lower} if learns_c(ebm) else {})}

    def samples(self, ebm, n=100, n_temps=100):
        """n samples of the EBM on the box (ais.box_samples: forward-AIS chains in the
        whitened atanh coordinates after n_temps annealing steps, mapped back to y;
        approximate unless n_temps is large)."""
        import ais

        return ais.box_samples(_float64(ebm), self.x_fit, n, n_temps).float()

    def figure(self, path, ebm, flow, title):
        panels = [("data (held out)", plots.images(self.x_test[:100], self.shape))]
        if flow is not None:
            with torch.no_grad():
                panels.append((f"flow q ({flow.spec()['name']})",
                               plots.images(flow.sample(100), self.shape)))
        if ebm is not None:
            panels.append(("EBM (100 AIS steps)",
                           plots.images(self.samples(ebm), self.shape)))
        return plots.save_panels(path, panels, title=title)


def learns_c(ebm):
    """Whether the EBM carries a learned log-normaliser c (NCE, FCE; not score matching, not
    the short-run image EBMs)."""
    return getattr(ebm, "c", None) is not None and ebm.c.requires_grad


def _float64(module):
    """A float64 copy (AIS weights and chains in double precision; the model is untouched)."""
    return copy.deepcopy(module).double()


def format_metrics(m):
    """One line of a task's numbers."""
    if "ll_flow" in m or "ll_ebm_c" in m or "ll_ebm_lower" in m:
        parts = [f"{label} {m[k]:.2f}" for k, label in (
            ("ll_flow", "LL flow"), ("ll_ebm_c", "LL ebm (c)"), ("ll_ebm_lower", "LL ebm >="),
            ("ll_ebm_upper", "<="), ("ais_gap", "gap")) if k in m]
        if "ais_ess" in m:
            parts.append(f"AIS ESS {m['ais_ess']:.0f}")
        return " | ".join(parts) + " (nats per image)"
    return evaluation.format_metrics(m)
