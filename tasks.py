"""What train.py fits and how a fit is scored: a 2D toy set (exact, on a grid) or images as a
continuous density (dequantised, scored in nats per image by the flow's exact likelihood and
the EBM's annealed-importance-sampling bracket).

    task = make_task(args, device)          # Toy2D or Images
    task.dim, task.n_train
    x = task.batch(idx, step)               # the training rows idx, as iteration `step` sees them
    task.x_fit                              # what a Gaussian / a flow is fitted / initialised on
    m = task.evaluate(ebm, flow, final)     # a dict of numbers (format_metrics prints it)
    task.figure(path, ebm, flow, title)     # the epoch's figure

Images (image_data.py has the maths): the training rows stay on their grey-level lattice and
are dequantised afresh for every batch, from a generator seeded by (seed, step), so a batch is
the same numbers whenever it is asked for (FCE's cache asks ahead) and after a resume. The
held-out images are dequantised once (image_data.test_set). Scores, in nats per image on the
[0, L) scale and bits per dimension:

    ll_flow              mean log q(y_test) + D log(2 / L)               (exact)
    ll_ebm_c             mean (-f(y_test) - c) + D log(2 / L)     (c: NCE/FCE's own log Z guess)
    ll_ebm_lower/_upper  the AIS bracket (annealing.loglik_bracket) at the final evaluation, with
                         ais_gap, log_Z_ais (forward) and ais_ess (forward ESS of the chains)

An image EBM is a density on the box the dequantised images live in, [-1, 1]^D:
p(y) = exp(-f(y)) / Z with Z = int_box exp(-f). (On all of R^D an MLP energy that falls
linearly in some direction has no normaliser at all, and NCE's Gaussian noise never shows the
EBM the far corners.) AIS runs in unconstrained coordinates z = atanh(y), whitened
(`annealing.BoxEnergy`, `annealing.box_bracket`), where

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

# the image sets (image_data.LEVELS's keys), named here so that a 2D run imports none of the
# image modules (annealing, image_data, tilt: imported where Images uses them)
IMAGES = ("digits", "mnist")


VAL_FRACTION = 0.1  # of the training images, held out for early stopping (validation_split)
VAL_SEED = 1  # the validation images are dequantised once, with this seed
VAL_IS = 20_000  # base samples of a tilt's log Z before the final evaluation
TILT_AIS_TEMPS = 50  # a tilt is a short path from its base: AIS temperatures at most
IS_ESS_FLOOR = 0.01  # an importance-sampling log Z on fewer effective samples than this share warns
TRUST_NATS = 1.0  # two estimates of an EBM's test log-likelihood agreeing within this are trusted
TRUST_ESS = 0.1  # ... or a bracket that narrow with a forward ESS of this share of the chains


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
        import image_data

        x_train, _, x_test, _ = image_data.load_images(  # DataError is a ValueError
            args.dataset, getattr(args, "mnist_images", None), getattr(args, "mnist_labels", None))
        self.dataset, self.device, self.seed = args.dataset, device, args.seed
        self.L, self.shape = image_data.LEVELS[args.dataset], image_data.image_shape(args.dataset)
        x_train, x_val = validation_split(x_train)
        self.dim, self.n_train = x_train.shape[1], len(x_train)
        self.x_train = x_train.to(device)
        self.x_val = image_data.dequantize(x_val, self.L, torch.Generator().manual_seed(
            VAL_SEED)).to(device)
        self.x_test = image_data.test_set(x_test, self.L).to(device)
        self.x_val_lattice, self.x_test_lattice = x_val, x_test  # grey levels (references.py)
        self.x_fit = image_data.dequantize(x_train, self.L,
                                           torch.Generator().manual_seed(args.seed)).to(device)
        self.ais = dict(n_chains=args.ais_chains, n_temps=args.ais_temps, repeats=2)
        self.is_samples = getattr(args, "is_samples", 100_000)

    def batch(self, idx, step):
        """Training rows idx dequantised with the draws of iteration `step`."""
        import image_data

        gen = torch.Generator().manual_seed(((self.seed + 7919) * 1_000_003 + step) % 2 ** 63)
        return image_data.dequantize(self.x_train[idx], self.L, gen)

    def nats(self, log_p_y):
        import image_data

        return float(image_data.to_nats(log_p_y, self.dim, self.L))

    @torch.no_grad()
    def evaluate(self, ebm, flow, final=False):
        m = {}
        if flow is not None:
            m["ll_flow"] = self.nats(flow.log_prob(self.x_test).double().mean())
            m["bpd_flow"] = -m["ll_flow"] / (self.dim * math.log(2))
            if final:
                m["ll_flow_box"] = m["ll_flow"] - math.log(self.box_share(flow))
        if ebm is not None and is_tilt(ebm):
            m.update(self.tilt_scores(ebm, final))
        elif ebm is not None:
            if learns_c(ebm):
                m["ll_ebm_c"] = self.nats(-ebm(self.x_test).double().mean() - ebm.c.double())
            if final:
                m.update(self.bracket(ebm))
                m["ll_ebm"] = m["ll_ebm_upper"]
                m.update(trust(m["ll_ebm_upper"], m["ll_ebm_lower"], m["ais_gap"], m["ais_ess"],
                               self.ais["n_chains"], m.get("ll_ebm_c")))
        return m

    @torch.no_grad()
    def validate(self, ebm, flow, log_Z=None):
        """The validation log-likelihood in nats per image that early stopping and model
        selection read: a flow's exact one; a tilt's with its log Z (the caller's importance-
        sampling estimate on fixed base samples, `tilt.log_Z_is`); an EBM's with its learned c
        (NCE, FCE: only as good as c); None for score matching (no normaliser: the last
        iterate is kept)."""
        if ebm is None:
            return self.nats(flow.log_prob(self.x_val).double().mean())
        if is_tilt(ebm):
            import tilt
            return self.nats(tilt.tilt_log_prob(ebm, self.x_val, log_Z).mean())
        if learns_c(ebm):
            return self.nats(-ebm(self.x_val).double().mean() - ebm.c.double())
        return None

    def tilt_scores(self, tilt_ebm, final, n_is=None):
        """A tilted EBM p = q0 exp(-g) / Z (tilt.FlowTilt): its test log-likelihood with log Z
        by importance sampling from the base (`ll_ebm_is`, `is_ess`, `is_se` in nats), its gain
        over the base on the same footing (`tilt_gain`: against the base renormalised to the
        box by the share of the same samples inside it), and at
        the final evaluation the AIS bracket from the base to the tilt (a second estimate: on
        the box from the base given the box, tilt.BaseOnBox, by independence moves that
        propose fresh base draws) and the verdict `ll_ebm_trusted` (`trust`)."""
        import annealing
        import tilt
        n_is = n_is or (self.is_samples if final else VAL_IS)
        gen = torch.Generator().manual_seed(self.seed * 7919 + 17)
        y = tilt.base_samples(tilt_ebm.base, n_is, gen)
        log_Z, ess, se = tilt.log_Z_is(tilt_ebm.g_box, y)
        ll = self.nats(tilt.tilt_log_prob(tilt_ebm, self.x_test, log_Z).mean())
        share = share_in_box(y)
        base_box = self.nats(tilt_ebm.base.log_prob(self.x_test).double().mean()) \
            - math.log(share)  # the base restricted and renormalised to the box, as the tilt
        m = {"ll_ebm": ll, "ll_ebm_is": ll, "log_Z_is": log_Z, "is_ess": ess,
             "is_ess_fraction": ess / n_is, "is_se": se, "tilt_gain": ll - base_box}
        if final:  # AIS from q0 (on the box: q0 given the box) to q0 exp(-g), weights float64
            kw = dict(self.ais, n_temps=min(self.ais["n_temps"], TILT_AIS_TEMPS),
                      transition="independence")
            base = tilt.BaseOnBox(tilt_ebm.base) if tilt_ebm.box else tilt_ebm.base
            with torch.no_grad():
                br = annealing.loglik_bracket(tilt_ebm, base, self.x_test, **kw)
            lower, upper = self.nats(br.lower), self.nats(br.upper)
            m.update(ll_ebm_lower=lower, ll_ebm_upper=upper, ais_gap=br.gap,
                     ais_ess=float(br.forward.ess.min()), ais_acceptance=br.forward.acceptance,
                     ais_temps=kw["n_temps"], bpd_ebm_lower=-upper / (self.dim * math.log(2)),
                     bpd_ebm_upper=-lower / (self.dim * math.log(2)),
                     **trust(upper, lower, br.gap, float(br.forward.ess.min()),
                             self.ais["n_chains"], ll))
        return m

    def box_share(self, flow, n=10000):
        """Q(box): the share of n samples of the flow inside [-1, 1]^D (`share_in_box`)."""
        with torch.no_grad():
            return share_in_box(torch.cat([flow.sample(1000) for _ in range(n // 1000)]))

    def bracket(self, ebm):
        """The EBM's test log-likelihood bracket by AIS on the box (annealing.box_bracket: whitened
        atanh coordinates fitted to x_fit, float64 chains), in nats per image and bits per
        dimension (module docstring)."""
        import annealing

        br = annealing.box_bracket(_float64(ebm), self.x_fit, self.x_test, **self.ais)
        lower, upper = self.nats(br.lower), self.nats(br.upper)
        bits = self.dim * math.log(2)
        return {"ll_ebm_lower": lower, "ll_ebm_upper": upper, "ais_gap": br.gap,
                "bpd_ebm_lower": -upper / bits, "bpd_ebm_upper": -lower / bits,
                "log_Z_ais": br.log_Z_lower, "log_Z_ais_reverse": br.log_Z_upper,
                "ais_ess": float(br.forward.ess.min()), "ais_acceptance": br.forward.acceptance,
                **({"c_gap": float(ebm.c.detach()) - br.log_Z_lower} if learns_c(ebm) else {})}

    def samples(self, ebm, n=100, n_temps=100):
        """n samples of the EBM on the box: for a tilt, importance resampling of 100 n base
        samples with weights exp(-g) (tilt.snir); else annealing.box_samples: forward-AIS chains in
        the whitened atanh coordinates after n_temps annealing steps, mapped back to y
        (approximate unless n_temps is large)."""
        if is_tilt(ebm):
            import tilt
            with torch.no_grad():
                y = ebm.base.sample(100 * n)
                return y[tilt.snir(-ebm.g_box(y), n)[0]]
        import annealing

        return annealing.box_samples(_float64(ebm), self.x_fit, n, n_temps).float()

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


def validation_split(x_train, fraction=VAL_FRACTION):
    """(training rows, validation rows): a fixed share of the training images, the same for
    every seed and estimator (a permutation seeded with 0), held out for early stopping and
    model selection; the test images are never used for either."""
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
    n_val = max(1, int(len(x_train) * fraction))
    return x_train[perm[n_val:]], x_train[perm[:n_val]]


def share_in_box(y):
    """The share of the rows y inside [-1, 1]^D (tilt.in_box), at least 1 / len(y)."""
    import tilt

    return max(float(tilt.in_box(y).double().mean()), 1.0 / len(y))


def trust(upper, lower, gap, ess, n_chains, second=None, tol=TRUST_NATS):
    """Whether an EBM's test log-likelihood can be cited: trusted when
    a second, independent estimate (`second`: importance sampling from a tilt's base, or the
    learned c) agrees with the forward-AIS end `upper` within `tol` nats, or when the AIS
    bracket is at most `tol` nats wide (either sign) with a forward ESS of at least
    TRUST_ESS of the chains. (The best estimate, `ll_ebm`, is the importance-sampling one for
    a tilt, else the forward-AIS end: both unbiased for Z.)"""
    agree = second is not None and abs(second - upper) <= tol
    tight = abs(gap) <= tol and ess >= TRUST_ESS * n_chains
    return {"ll_ebm_trusted": bool(agree or tight)}


def is_tilt(ebm):
    """Whether the EBM is a tilt of a base flow (tilt.FlowTilt)."""
    return hasattr(ebm, "base") and hasattr(ebm, "g")


def learns_c(ebm):
    """Whether the EBM carries a learned log-normaliser c (NCE, FCE; not score matching, not
    the short-run image EBMs)."""
    return getattr(ebm, "c", None) is not None and ebm.c.requires_grad


def _float64(module):
    """A float64 copy (AIS weights and chains in double precision; the model is untouched)."""
    return copy.deepcopy(module).double()


def format_metrics(m):
    """One line of a task's numbers."""
    if "ll_flow" in m or "ll_ebm_c" in m or "ll_ebm_lower" in m or "ll_ebm_is" in m:
        parts = [f"{label} {m[k]:.2f}" for k, label in (
            ("ll_flow", "LL flow"), ("ll_ebm_c", "LL ebm (c)"), ("ll_ebm_lower", "LL ebm >="),
            ("ll_ebm_upper", "<="), ("ais_gap", "gap")) if k in m]
        if "ll_ebm_is" in m:
            parts.append(f"LL ebm (IS) {m['ll_ebm_is']:.2f} (ESS {m['is_ess']:.0f}, tilt "
                         f"{m['tilt_gain']:+.2f})")
        if m.get("is_ess_fraction", 1.0) < IS_ESS_FLOOR:
            parts.append(f"WARNING: IS ESS {m['is_ess_fraction']:.2%} of the samples, below "
                         f"{IS_ESS_FLOOR:.0%}")
        if "ll_ebm_trusted" in m:
            parts.append("trusted" if m["ll_ebm_trusted"] else "NOT TRUSTED")
        if "ais_ess" in m:
            parts.append(f"AIS ESS {m['ais_ess']:.0f}")
        return " | ".join(parts) + " (nats per image)"
    return evaluation.format_metrics(m)
