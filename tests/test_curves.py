"""The training figure stays readable at any run length: short iteration labels, and the
flow-step fraction and the accuracy on the flow's own samples drawn when a run logged them."""
import plots


def test_iteration_labels_stay_short_and_flow_series_are_drawn(tmp_path, monkeypatch):
    rows = [{"step": s, "value": 1.0, "accuracy": 0.7, "accuracy_flow": 0.6,
             "flow_step_fraction": 1 / 3, "ebm_step_fraction": 1.0} for s in
            range(20, 1_200_001, 20_000)]
    rows += [{"step": 1_200_000, "kl_ebm": 0.01, "kl_flow": 0.2, "c_gap": 0.0}]
    seen = {}

    def keep(fig, path, title=None):
        fig.canvas.draw()
        seen["fig"] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    plots.training_curves(str(tmp_path / "c.png"), {"run": (rows, None)})
    axes = seen["fig"].axes
    for ax in axes:
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert labels and all(len(t) <= 5 for t in labels), labels
    assert any(lab.endswith("M") for lab in (t.get_text() for t in axes[0].get_xticklabels()))
    styles = sorted(line.get_linestyle() for line in axes[1].get_lines())
    assert styles.count(":") >= 1 and styles.count("--") >= 1  # flow-step fraction, acc_flow
    assert plots._short_count(800) == "800" and plots._short_count(12_000) == "12k"
    assert plots._short_count(1_500_000) == "1.5M"


def test_flow_step_fraction_is_a_running_fraction_and_a_moving_threshold_is_drawn(tmp_path,
                                                                                   monkeypatch):
    """Rows of 20 iterations in which the flow stepped in all or none (a zig-zag between 0
    and 1) draw as a running fraction near 1/2; the threshold the rows carry is drawn as a
    line that moves, not as a constant."""
    rows = [{"step": s, "value": 1.0, "accuracy": 0.6, "accuracy_flow": 0.6,
             "flow_step_fraction": float(s % 40 == 0), "threshold": 0.55 + s / 40_000}
            for s in range(20, 4001, 20)]
    seen = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path, title=None: seen.update(fig=fig))
    plots.training_curves(str(tmp_path / "c.png"), {"run": (rows, 0.6)})
    lines = seen["fig"].axes[1].get_lines()
    frac = [ln for ln in lines if ln.get_linestyle() == ":"]
    assert len(frac) == 1
    x, y = frac[0].get_data()
    late = [v for s, v in zip(x, y) if s > 400]
    assert late and all(abs(v - 0.5) <= 0.06 for v in late)
    thr = [ln for ln in lines if ln.get_linestyle() == "-."]
    assert len(thr) == 1 and len(set(thr[0].get_ydata())) > 2
    assert plots.running_fraction([20, 40, 60, 80], [0, 1, 0, 1], window=40) == [0, 0.5, 0.5, 0.5]
