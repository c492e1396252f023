"""Every number a run reports, against an independent closed form: the 2D evaluation
(summary.json, metrics.jsonl, bench/fce.py's table), train.py's metrics rows, who steps under
each rule, the digits task's numbers (tasks.Images) and bench/digits.py's columns.

The models are chosen so that a wrong sign, a swapped argument or a dropped term cannot
cancel: c differs from log Z, the EBM from the flow, the box share from 1, the two ends of a
bracket from each other, the accuracy on the flow's own samples from the accuracy on the whole
noise. docs/architecture.md lists every key beside the test that pins it."""
import json
import math
import time

import pytest
import torch
from torch import nn

import datasets
import image_data
import evaluation
import fce
import flows
import score_matching
import tasks
import train
from bench import digits as bench_digits
from bench import fce as bench_fce
from bench import gather
from ebm import EBM
from logger import read_metrics

TINY = ["--samples", "2000", "--batch", "200", "--test_samples", "2000", "--ebm_hidden", "8",
        "--flow_hidden", "8", "--flow_layers", "1", "--log_every", "5", "--epoch", "1",
        "--eval_every", "1", "--wandb", "disabled"]


def normal_log_prob(x, mean, var):
    """log N(x; mean, var I) in float64, x (N, D)."""
    x = x.double()
    d = x.shape[1]
    return -0.5 * ((x - torch.as_tensor(mean, dtype=torch.float64)) ** 2).sum(1) / var \
        - 0.5 * d * math.log(2 * math.pi * var)


def normal_kl(m1, v1, m2, v2, d=2):
    """KL(N(m1, v1 I) || N(m2, v2 I)) in d dimensions."""
    sq = sum((a - b) ** 2 for a, b in zip(m1, m2))
    return 0.5 * (d * v1 / v2 + sq / v2 - d + d * math.log(v2 / v1))


# ============================================================================= 2D evaluation
VP = 0.25                        # the data: N(0, VP I)
A, S2, C = (0.3, -0.2), 0.5, 0.7  # the EBM: f = |x - A|^2 / (2 S2), c = 0.7 (log Z = log 2 pi S2)
T2 = 0.03                        # the flow: N(0, T2 I), far narrower than the data (holes)


class QuadraticEnergy(nn.Module):
    def __init__(self, mean, var, c):
        super().__init__()
        self.mean, self.var = torch.tensor(mean), var
        self.c = torch.tensor(c)

    def forward(self, x):
        return ((x - self.mean.to(x.dtype)) ** 2).sum(1) / (2 * self.var)


class NormalFlow:
    def __init__(self, var):
        self.var = var

    def log_prob(self, x):
        return normal_log_prob(x, (0.0, 0.0), self.var).to(x.dtype)


@pytest.fixture
def gaussian_data(monkeypatch):
    monkeypatch.setattr(datasets, "has_density", lambda name: True)
    monkeypatch.setattr(datasets, "log_density", lambda name, x: normal_log_prob(x, (0, 0), VP))
    monkeypatch.setattr(datasets, "entropy", lambda name: math.log(2 * math.pi * math.e * VP))
    return (VP ** 0.5) * torch.randn(20_000, 2, generator=torch.Generator().manual_seed(5))


def test_evaluate_2d_every_key_against_its_closed_form(gaussian_data):
    x = gaussian_data
    m = evaluation.evaluate_2d("gauss-reported", x, QuadraticEnergy(A, S2, C), NormalFlow(T2))
    log_Z = math.log(2 * math.pi * S2)
    log_p = normal_log_prob(x, A, S2)          # the EBM normalised exactly
    log_q = normal_log_prob(x, (0, 0), T2)     # the flow
    log_d = normal_log_prob(x, (0, 0), VP)     # the data
    assert m["log_Z"] == pytest.approx(log_Z, abs=1e-6)
    assert m["c_gap"] == pytest.approx(C - log_Z, abs=1e-6)
    assert m["nll_ebm"] == pytest.approx(float(-log_p.mean()), abs=1e-5)
    assert m["kl_ebm"] == pytest.approx(normal_kl((0, 0), VP, A, S2), abs=1e-4)
    assert m["mse_logp"] == pytest.approx(float(((log_p - log_d) ** 2).mean()), rel=1e-5)
    assert m["nll_flow"] == pytest.approx(float(-log_q.mean()), abs=1e-5)
    assert m["kl_flow_mc"] == pytest.approx(float((log_d - log_q).mean()), abs=1e-5)
    assert m["kl_flow_mc_se"] == pytest.approx(float((log_d - log_q).std() / math.sqrt(len(x))),
                                               rel=1e-4)
    assert m["kl_flow"] == pytest.approx(normal_kl((0, 0), VP, (0, 0), T2), abs=1e-4)
    # holes: log q < log p - 10 outside the radius R, where p_data has mass exp(-R^2 / 2 VP)
    R2 = (10 - math.log(T2 / VP)) / (1 / (2 * T2) - 1 / (2 * VP))
    assert m["hole_mass"] == pytest.approx(math.exp(-R2 / (2 * VP)), abs=2e-3)
    assert m["entropy"] == pytest.approx(math.log(2 * math.pi * math.e * VP))
    line = evaluation.format_metrics(m)
    assert f"c - log Z {C - log_Z:+.3f}" in line and f"KL flow {m['kl_flow']:.4f}" in line


def test_ebm_log_prob_is_minus_f_minus_c():
    """The EBM's normalised log-density log p = -f(x) - c: with c = log Z of a Gaussian energy
    it integrates to one on the grid, and it moves by -delta when c moves by delta."""
    ebm = EBM(2, [4])
    with torch.no_grad():
        ebm.c.fill_(0.4)
    x = torch.randn(7, 2)
    assert torch.allclose(ebm.log_prob(x), -ebm(x) - 0.4)
    assert float(ebm(x).detach().abs().min()) > 0  # f is not zero at the points: its sign matters


# ============================================================================= train.py's rows
def scripted(k):
    """What iteration k of a scripted estimator returns: V, accuracies, who stepped."""
    return (-1.0 - 0.01 * k, 0.5 + 0.003 * k, 0.6 - 0.002 * k, k % 2 == 0, k % 3 == 0)


def cosine(lr, t, floor=0.05):
    return lr * (floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2)


@pytest.fixture
def clock(monkeypatch):
    """The wall clock of train.py's rate: one second per reading."""
    ticks = iter(range(1, 10_000))
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))


def test_fce_metrics_rows_and_summary_are_the_averages_of_the_iterations(tmp_path, monkeypatch,
                                                                          clock):
    calls = []

    def step(ebm, contrast, k, *a, **kw):
        calls.append(k)
        V, acc, acc_f, e, f = scripted(k)
        return fce.StepResult(torch.tensor(V), torch.tensor(acc), torch.tensor(acc_f), e, f)

    monkeypatch.setattr(fce, "fce_step", step)
    out = tmp_path / "run"
    assert train.main([*TINY, "--lr_ebm", "2e-3", "--lr_flow", "3e-3", "--out_dir", str(out),
                       "--image_dir", str(tmp_path / "i")]) == 0
    assert calls == list(range(10))
    rows = [r for r in read_metrics(out) if "value" in r]
    assert [r["step"] for r in rows] == [5, 10]
    for r, ks in zip(rows, (range(0, 5), range(5, 10))):
        s = [scripted(k) for k in ks]
        assert r["value"] == pytest.approx(-sum(v[0] for v in s) / 5)
        assert r["accuracy"] == pytest.approx(sum(v[1] for v in s) / 5)
        assert r["accuracy_flow"] == pytest.approx(sum(v[2] for v in s) / 5)
        assert r["ebm_step_fraction"] == pytest.approx(sum(v[3] for v in s) / 5)
        assert r["flow_step_fraction"] == pytest.approx(sum(v[4] for v in s) / 5)
        # the learning rates set for the row's last iteration (cosine over 10 iterations)
        assert r["lr_ebm"] == pytest.approx(cosine(2e-3, (ks[-1]) / 10))
        assert r["lr_flow"] == pytest.approx(cosine(3e-3, (ks[-1]) / 10))
        assert r["it_per_s"] == pytest.approx(5.0)  # 5 iterations between two clock readings
        assert r["epoch"] == 0
    assert rows[1]["cpu_s_per_it"] == pytest.approx((rows[1]["cpu_s"] - rows[0]["cpu_s"]) / 5,
                                                    abs=1e-3)
    evals = [r for r in read_metrics(out) if "kl_ebm" in r]
    assert len(evals) == 1 and evals[0]["epoch"] == 1 and evals[0]["flow_steps"] == 4
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == 10 and summary["flow_steps"] == 4  # k = 0, 3, 6, 9
    assert summary["kl_ebm"] == evals[0]["kl_ebm"] and summary["cpu_s"] >= evals[0]["cpu_s"]


@pytest.mark.parametrize("estimator", ["mle", pytest.param("dsm", marks=pytest.mark.slow)])
def test_mle_and_score_matching_rows_are_the_mean_loss(tmp_path, monkeypatch, estimator):
    losses = iter([0.1 * (k + 1) for k in range(10)])
    if estimator == "mle":
        monkeypatch.setattr(fce, "mle_step", lambda *a: torch.tensor(next(losses)))
        key, argv = "nll_train", ["--estimator", "mle", "--flow", "maf"]
    else:
        monkeypatch.setattr(score_matching, "sm_step", lambda *a: torch.tensor(next(losses)))
        key, argv = "sm_loss", ["--estimator", "dsm"]
    out = tmp_path / "run"
    assert train.main([*TINY, *argv, "--out_dir", str(out), "--image_dir",
                       str(tmp_path / "i")]) == 0
    rows = [r for r in read_metrics(out) if key in r]
    assert [r[key] for r in rows] == pytest.approx([0.3, 0.8])  # means of 0.1..0.5, 0.6..1.0
    summary = json.load(open(out / "summary.json"))
    assert summary["flow_steps"] == (10 if estimator == "mle" else 0)


def test_held_out_score_matching_loss_has_its_closed_form():
    """For f(x) = |x|^2 / 2 (the model N(0, I)) and x ~ N(0, I) in D = 2:
    L_DSM = sigma^2 / 2 (E|x|^2 + D (1/sigma - sigma)^2), L_SSM = -D + E|x|^2 / 2 = -1."""
    x = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    energy = lambda v: 0.5 * (v * v).sum(1)  # noqa: E731
    sigma = 0.5
    dsm = score_matching.held_out_loss(energy, x, "dsm", sigma=sigma)
    assert dsm == pytest.approx(sigma ** 2 / 2 * (2 + 2 * (1 / sigma - sigma) ** 2), rel=0.03)
    assert score_matching.held_out_loss(energy, x, "ssm") == pytest.approx(-1.0, abs=0.05)
    assert dsm == score_matching.held_out_loss(energy, x, "dsm", sigma=sigma)  # fixed draws


# ============================================================================= who steps
class LinearEnergy(nn.Module):
    """f(x) = x_1, c = 0: log p = -x_1."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(0.0))
        self.w = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.w * x[:, 0]

    def log_prob(self, x):
        return -self(x) - self.c


class ScriptedContrast:
    """Noise whose classification is known: data x_1 = (-1, -1, -1, +1) against log q = 0
    (3 of 4 data points classified right), two flow samples and three Gaussian ones, the
    flow's classified right and the Gaussian's wrong (flow_right) or the other way round.
    log q carries 1e-3 alpha, alpha the flow's one parameter (0 at the start)."""

    def __init__(self, flow_right):
        self.alpha = nn.Parameter(torch.tensor(0.0))
        self.x = torch.tensor([[-1.0, 0], [-1, 0], [-1, 0], [1, 0]])
        # noise is classified right where log q > log p = -y_1, i.e. y_1 > 0
        right, wrong = 1.0, -1.0
        ys = [right] * 2 + [wrong] * 3 if flow_right else [wrong] * 2 + [right] * 3
        self.y = torch.tensor([[v, 0.0] for v in ys])

    def _noise(self):
        q = 1e-3 * self.alpha * torch.ones(5)
        return fce.Noise(self.y, q[:4], q, q[:4], 2, q[2:])

    def live(self, step, x):
        return self._noise()

    def cached(self, step, batch_at):
        return fce.Noise(*(t.detach() if torch.is_tensor(t) else t for t in self._noise()))

    def flow_changed(self):
        pass


def who(rule, contrast, step=0, flow_turn=None):
    """fce_step's result and who moved: "ebm", "flow" or "ebmflow" (parameters compared
    before and after, and the same as the result's flags)."""
    ebm = LinearEnergy()
    opt_e = torch.optim.SGD(ebm.parameters(), 0.1)
    opt_f = torch.optim.SGD([contrast.alpha], 0.1)
    before = [p.detach().clone() for p in [*ebm.parameters(), contrast.alpha]]
    r = fce.fce_step(ebm, contrast, step, contrast.x, lambda s: contrast.x, opt_e, opt_f, rule,
                     flow_turn)
    after = [*ebm.parameters(), contrast.alpha]
    moved_ebm = any(not torch.equal(a, b) for a, b in zip(before[:2], after[:2]))
    moved_flow = not torch.equal(before[2], after[2])
    assert (moved_ebm, moved_flow) == (r.ebm, r.flow)
    return r, ("ebm" if moved_ebm else "") + ("flow" if moved_flow else "")


@pytest.mark.parametrize("flow_right", [True, False])
def test_threshold_rule_reads_the_accuracy_on_the_flows_own_samples(flow_right):
    """Accuracy on the whole noise 1/2 (3/4 + 2/5) = 0.575 (or 1/2 (3/4 + 3/5) = 0.675); on
    data and the flow's own samples 1/2 (3/4 + 1) = 0.875 (or 1/2 (3/4 + 0) = 0.375). A
    threshold between the two steps the flow exactly when the flow's own accuracy reaches
    it."""
    c = ScriptedContrast(flow_right)
    own, whole = (0.875, 0.575) if flow_right else (0.375, 0.675)
    for threshold in (0.5, 0.7, 0.9):
        rule = fce.Rule("threshold", threshold=threshold)
        r, stepped = who(rule, c, 0, flow_turn=False)  # an iteration of the EBM: its accuracies
        assert stepped == "ebm"
        assert float(r.accuracy) == pytest.approx(whole)
        assert float(r.accuracy_flow) == pytest.approx(own)
        turn = rule.flow_turn(1, float(r.accuracy_flow), threshold)  # decides the next one
        _, stepped = who(rule, c, 1, flow_turn=turn)
        assert stepped == ("flow" if own >= threshold else "ebm"), threshold
    assert fce.Rule("threshold", threshold=own).flow_turn(1, own, own)  # reached: >=


def test_every_rule_steps_the_ebm_always_and_the_flow_at_every_kth_iteration():
    for k, flow_at in ((3, {2, 5, 8}), (1, set(range(9))), (4, {3, 7})):
        steps = [who(fce.Rule("every", flow_every=k), ScriptedContrast(True), s)[1]
                 for s in range(9)]
        assert steps == ["ebmflow" if s in flow_at else "ebm" for s in range(9)], k


def test_nce_never_steps_a_flow():
    c = ScriptedContrast(True)
    ebm = LinearEnergy()
    r = fce.fce_step(ebm, c, 2, c.x, lambda s: c.x, torch.optim.SGD(ebm.parameters(), 0.1),
                     None, fce.Rule("every", flow_every=1))
    assert r.ebm and not r.flow


# ============================================================================= dequantisation
def test_dequantisation_is_uniform_within_each_cell():
    """u = v - k of every grey level k is U[0, 1): 10 bins of 2,000 draws each per level,
    chi-square below its 1e-4 quantile (33.7 for 9 degrees of freedom)."""
    L, n = 17, 20_000
    k = torch.arange(L, dtype=torch.float32).expand(n, L)
    y = image_data.dequantize(2 * k / (L - 1) - 1, L, torch.Generator().manual_seed(2))
    u = (y.double() + 1) * L / 2 - k.double()
    assert (u > -1e-5).all() and (u < 1 + 1e-5).all()  # float32 rounding at the cell's edge
    for j in range(L):
        counts = torch.histc(u[:, j], bins=10, min=0, max=1)
        chi2 = float(((counts - n / 10) ** 2 / (n / 10)).sum())
        assert chi2 < 33.7, (j, chi2)


# ============================================================================= digits numbers
class GaussEnergy(EBM):
    """f(y) = |y|^2 / 2 with c = 3 (a learned c, not log Z)."""

    def __init__(self):
        super().__init__(64, [4])
        with torch.no_grad():
            self.c.fill_(3.0)

    def forward(self, x):
        return 0.5 * (x * x).sum(-1)


@pytest.fixture(scope="module")
def digits_task():
    return tasks.make_task(train.get_args(["--dataset", "digits"]), "cpu")


def test_digits_flow_and_ebm_numbers_against_closed_forms(digits_task):
    task, D, L = digits_task, 64, 17
    s = 0.392  # per-pixel N(0, s^2): the box [-1, 1]^64 holds Q = (2 Phi(1/s) - 1)^64, about 1/2
    flow = flows.gaussian(D, torch.zeros(D), s * s * torch.eye(D))
    torch.manual_seed(0)
    m = task.evaluate(GaussEnergy(), flow, final=False)
    jac = D * math.log(2 / L)
    ll_flow = float(normal_log_prob(task.x_test, torch.zeros(D), s * s).mean()) + jac
    assert m["ll_flow"] == pytest.approx(ll_flow, abs=1e-3)
    assert m["bpd_flow"] == pytest.approx(-ll_flow / (D * math.log(2)), abs=1e-4)
    y = task.x_test.double()
    assert m["ll_ebm_c"] == pytest.approx(float(-(0.5 * (y * y).sum(1)).mean()) - 3.0 + jac,
                                          abs=1e-4)
    assert "ll_flow_box" not in m and "ll_ebm_lower" not in m  # final evaluation only
    torch.manual_seed(0)
    Q = float(torch.special.ndtr(torch.tensor(1 / s, dtype=torch.float64)) * 2 - 1) ** D
    assert 0.3 < Q < 0.7
    share = task.box_share(flow)
    assert math.log(share) == pytest.approx(math.log(Q), abs=0.06)  # 10,000 samples
    assert tasks.format_metrics(m).startswith(f"LL flow {ll_flow:.2f}")


def test_digits_final_numbers_map_the_ais_bracket_end_to_end(digits_task, monkeypatch):
    """The final evaluation's keys from an AIS bracket with distinct ends, log Z's and ESS:
    which end is which, bits per dimension from the other end, c - log Z (forward)."""
    import annealing

    task, D = digits_task, 64
    fwd = type("R", (), {"ess": torch.tensor([7.0, 5.0]), "acceptance": 0.61})()
    br = annealing.Bracket(lower=-90.0, upper=-88.5, gap=1.5, log_Z_lower=-20.0,
                           log_Z_upper=-18.5, mean_neg_f=-110.0, forward=fwd, reverse=None)
    monkeypatch.setattr(annealing, "box_bracket", lambda *a, **kw: br)
    monkeypatch.setattr(tasks.Images, "box_share", lambda self, flow, n=10000: 0.25)
    flow = flows.gaussian(D, torch.zeros(D), 0.1 * torch.eye(D))
    m = task.evaluate(GaussEnergy(), flow, final=True)
    jac, bits = D * math.log(2 / 17), D * math.log(2)
    assert m["ll_flow_box"] == pytest.approx(m["ll_flow"] + math.log(4))
    assert m["ll_ebm_lower"] == pytest.approx(-90.0 + jac)
    assert m["ll_ebm_upper"] == pytest.approx(-88.5 + jac)
    assert m["ais_gap"] == 1.5
    assert m["bpd_ebm_lower"] == pytest.approx(-(-88.5 + jac) / bits)
    assert m["bpd_ebm_upper"] == pytest.approx(-(-90.0 + jac) / bits)
    assert m["log_Z_ais"] == -20.0 and m["log_Z_ais_reverse"] == -18.5
    assert m["ais_ess"] == 5.0 and m["ais_acceptance"] == 0.61
    assert m["c_gap"] == pytest.approx(3.0 - (-20.0))


# ============================================================================= benchmark tables
ROWS = [dict(label=lab, dataset="rings", seed=s, **vals) for lab, s, vals in (
    ("nce", 0, dict(kl_ebm=0.30, nll_ebm=3.1, c_gap=0.2, steps=400, cpu_s=4.0)),
    ("nce", 1, dict(kl_ebm=0.50, nll_ebm=3.3, c_gap=-0.1, steps=300, cpu_s=5.0)),
    ("fce-maf", 0, dict(kl_ebm=0.20, nll_flow=3.6, kl_flow=0.7, steps=100, cpu_s=4.0)),
    ("fce-maf", 1, dict(kl_ebm=0.25, nll_flow=3.4, kl_flow=0.5, steps=120, cpu_s=4.0)),
    ("mle-maf", 0, dict(kl_flow=0.1, nll_flow=3.0, steps=900, cpu_s=4.0)),
)]


def test_bench_fce_table_cells_are_mean_and_sd_over_seeds():
    agg = {a["label"]: a for a in gather.aggregate(ROWS, bench_fce.KEYS)}
    assert agg["nce"]["kl_ebm"] == pytest.approx(0.40)
    assert agg["nce"]["kl_ebm_sd"] == pytest.approx(math.sqrt(0.02))  # sample sd of 0.3, 0.5
    assert agg["nce"]["c_gap"] == pytest.approx(0.05) and agg["nce"]["n"] == 2
    assert "nll_flow" not in agg["nce"] and math.isnan(agg["mle-maf"]["kl_flow_sd"])
    table = gather.markdown(list(agg.values()), ["kl_ebm", "steps"])
    assert "| nce | rings | 2 | 0.4000 ± 0.1414 | 350 ± 71 |" in table


def test_bench_fce_summaries_difference_the_right_way_round():
    agg = gather.aggregate(ROWS, bench_fce.KEYS)
    pivot = bench_fce.kl_pivot(agg)
    assert "| fce-maf | **0.2250** |" in pivot and "| nce | 0.4000 |" in pivot
    assert "| mle-maf (flow) | 0.1000 |" in pivot  # its flow's KL, never the bold best
    tgt = "\n".join(bench_fce.targets(agg))
    # fce-maf - nce EBM KL (no equal-iteration run here), fce-maf - mle-maf flow NLL
    assert f"| rings | {0.225 - 0.4:+.4f} | n/a | | {3.5 - 3.0:+.3f} | missed |" in tgt
    speed = "\n".join(bench_fce.speed_lines(ROWS))
    # iterations per CPU-s: nce 100 and 60 (mean 80, sd 28.3), fce-maf 25 and 30
    assert "| nce | 80.0 ± 28.3 | 60.0 - 100.0 | 2 |" in speed
    assert "| fce-maf | 27.5 ± 3.5 | 25.0 - 30.0 | 2 |" in speed


def test_bench_digits_score_columns(tmp_path, monkeypatch):
    """score.json from a run's summary: the bracket's ends as they are, bits per dimension
    from the opposite ends, fd_ratio = fd / floor; a flow alone scores its box likelihood."""
    import image_metrics

    class Metric:
        floor = {"fd": 4.0}

        def __init__(self, *a, **kw):
            pass

        def __call__(self, x):
            return {"fd": 10.0, "label_tv": 0.3}

    summary = {"ll_ebm_lower": -95.0, "ll_ebm_upper": -92.0, "ais_gap": 3.0, "ais_ess": 9.0,
               "c_gap": -60.0, "ll_ebm": -92.0, "ll_ebm_trusted": False, "cpu_s": 12.0,
               "steps": 77, "ll_flow": -110.0, "ll_flow_box": -108.0}
    monkeypatch.setattr(image_metrics, "SampleMetric", Metric)
    monkeypatch.setattr(image_data, "load_images", lambda name: (None,) * 4)
    monkeypatch.setattr(bench_digits.runner, "finished", lambda out: dict(summary))
    sample = lambda n: torch.zeros(n, 64)  # noqa: E731
    bits = 64 * math.log(2)
    for energy, flow in ((object(), None), (None, object())):
        monkeypatch.setattr(bench_digits, "load_model",
                            lambda out, t, e=energy, f=flow: (e, f, sample,
                                                              type("Task", (), {})()))
        s = bench_digits.score(str(tmp_path))
        if energy is not None:
            assert (s["ll_lower"], s["ll_upper"], s["ais_gap"]) == (-95.0, -92.0, 3.0)
            assert s["ais_ess"] == 9.0 and s["c_gap"] == -60.0 and "ll_flow" not in s
            assert s["ll_ebm"] == -92.0 and s["trusted"] == 0.0
        else:
            assert s["ll_lower"] == s["ll_upper"] == -108.0 and s["ais_gap"] == 0.0
            assert s["ll_flow"] == -110.0 and s["ll_flow_box"] == -108.0
        assert s["bpd_lower"] == pytest.approx(-s["ll_upper"] / bits)
        assert s["bpd_upper"] == pytest.approx(-s["ll_lower"] / bits)
        assert s["fd"] == 10.0 and s["fd_ratio"] == 2.5 and s["label_tv"] == 0.3
        assert s["cpu_s"] == 12.0 and s["steps"] == 77
        assert json.load(open(tmp_path / "score.json")) == s


@pytest.mark.slow
def test_every_evaluation_line_of_a_digits_score_matching_run_prints_numbers(tmp_path, capsys,
                                                                              digits_task):
    """A score-matching EBM learns no c: each evaluation before the final AIS bracket reports
    its own loss on the held-out digits (sm_loss_test), that of the model it evaluates."""
    import checkpoint

    out = tmp_path / "run"
    assert train.main(["--dataset", "digits", "--estimator", "dsm", "--ebm_hidden", "16",
                       "--epoch", "2", "--eval_every", "1", "--ais_chains", "8",
                       "--ais_temps", "10", "--wandb", "disabled", "--out_dir", str(out),
                       "--image_dir", str(tmp_path / "i")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2 and all(any(ch.isdigit() for ch in ln.split("|", 1)[1])
                                   for ln in lines), lines
    evals = [r for r in read_metrics(out) if "sm_loss_test" in r]
    assert [r["epoch"] for r in evals] == [1, 2]
    ebm = checkpoint.load_run(str(out)).ebm
    assert evals[-1]["sm_loss_test"] == pytest.approx(
        score_matching.held_out_loss(ebm, digits_task.x_test, "dsm", sigma=0.1), rel=1e-5)
    assert f"SM loss (test) {evals[0]['sm_loss_test']:.4f}" in lines[0]
