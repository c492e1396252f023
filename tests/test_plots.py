"""plots.py: panel figures are written at a fixed size (so frames of a gif line up), frames
are numbered by the last number in their names, make_gif orders them by it, an empty folder
is a one-line error; the training figure stays readable at any run length."""
import math
import os

import pytest
import torch
from PIL import Image

import plots


# ----------------------------------------------------------------------------- panels
def test_panel_figures_are_written_at_one_fixed_size(tmp_path):
    """Frames of different content and titles have the same pixel size (no tight bounding
    box); the folder is created; the returned path is the file."""
    torch.manual_seed(0)
    x = torch.randn(500, 2)
    gauss = lambda v: -0.5 * (v ** 2).sum(1) - math.log(2 * math.pi)  # noqa: E731
    a = plots.save_panels(str(tmp_path / "new" / "epoch_0001.png"),
                          [("data", plots.samples(x)), ("q", plots.density(gauss, n=40))],
                          title="epoch 1")
    b = plots.save_panels(str(tmp_path / "new" / "epoch_0002.png"),
                          [("data", plots.samples(3 * x + 1)),
                           ("q", plots.density(lambda v: 5 * gauss(v), n=40, log=True))],
                          title="epoch 2, a longer title than the first")
    assert a == str(tmp_path / "new" / "epoch_0001.png")
    assert os.path.getsize(a) > 0 and Image.open(a).size == Image.open(b).size
    two_rows = plots.save_panels(str(tmp_path / "rows.png"), [("a", plots.samples(x))] * 4,
                                 rows=2)
    w, h = Image.open(two_rows).size
    assert (w, h) == (2 * 3 * 80, 2 * 3 * 80)  # two 3-inch panels a row at 80 dpi


def test_density_panel_normalises_on_the_grid():
    """`normalise` turns exp(-f) into a density: the drawn values sum to 1 / cell area over
    the grid whatever constant f carries."""
    drawn = {}

    class Ax:
        def imshow(self, img, **kw):
            drawn["img"] = img

    bound, n = 3.0, 30
    plots.density(lambda v: -(v ** 2).sum(1) + 7.0, bound=bound, n=n)(Ax())
    area = (2 * bound / n) ** 2
    assert drawn["img"].sum() * area == pytest.approx(1.0, rel=1e-4)
    plots.density(lambda v: -(v ** 2).sum(1) + 7.0, bound=bound, n=n, normalise=False)(Ax())
    nearest = 2 * (bound / n) ** 2  # r^2 of the cell centres nearest 0, (+-B/n, +-B/n)
    assert drawn["img"].max() == pytest.approx(math.exp(7.0 - nearest), rel=1e-4)


# ----------------------------------------------------------------------------- gifs
@pytest.mark.parametrize("name, number", [
    ("epoch_0007.png", 7), ("epoch_12.png", 12), ("run3_epoch_0010.png", 10),
    ("/a/b9/frame.png", -1), ("final.png", -1)])
def test_frame_number_is_the_last_number_in_the_file_name(name, number):
    assert plots.frame_number(name) == number


def test_gif_frames_in_epoch_order(tmp_path):
    """Frames go in the order of their numbers (epoch_2 before epoch_10, whatever the
    padding), a frame of another size is resized, the gif loops, and its default path is
    the folder's name with .gif."""
    frames = tmp_path / "frames"
    frames.mkdir()
    for epoch, shade in [(10, 200), (2, 100), (1, 50)]:
        Image.new("RGB", (20, 20), (shade, 0, 0)).save(frames / f"epoch_{epoch}.png")
    Image.new("RGB", (30, 10), (250, 0, 0)).save(frames / "epoch_0011.png")
    out = plots.make_gif(str(frames) + os.sep)
    assert out == str(tmp_path / "frames.gif")
    gif = Image.open(out)
    assert gif.n_frames == 4 and gif.info.get("loop") == 0 and gif.size == (20, 20)
    reds = []
    for i in range(4):
        gif.seek(i)
        reds.append(gif.convert("RGB").getpixel((5, 5))[0])
    assert reds == sorted(reds)
    assert plots.make_gif(str(frames), str(tmp_path / "x.gif"), fps=4) == str(tmp_path / "x.gif")
    assert Image.open(tmp_path / "x.gif").info["duration"] == 250


def test_gif_of_an_empty_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a frame")
    with pytest.raises(FileNotFoundError, match="no .png frames") as e:
        plots.make_gif(str(tmp_path / "empty"))
    assert "\n" not in str(e.value) and "pass the folder" in str(e.value)
    assert not os.path.exists(tmp_path / "empty.gif")


# ----------------------------------------------------------------------------- training figure
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


def test_training_figure_is_written(tmp_path):
    """The real writer: a PNG on disk, its folder created, from rows without any KL (the
    test-NLL panel instead)."""
    rows = [{"step": s, "value": 1.2, "accuracy": 0.6, "nll_ebm": 2.0 - s / 1e3,
             "nll_flow": 2.1} for s in range(10, 201, 10)]
    path = plots.training_curves(str(tmp_path / "sub" / "curves.png"), {"run": (rows, 0.6)},
                                 title="t")
    assert path == str(tmp_path / "sub" / "curves.png") and os.path.getsize(path) > 0
