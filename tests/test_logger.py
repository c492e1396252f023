"""logger.py: the run's own files (config.json, metrics.jsonl, summary.json), a fresh run
starting them anew and a resumed one keeping its rows, and wandb that never stops a run
(offline, disabled, not installed, no key, a failing server, an error mid-run)."""
import json
import math
import sys
import types

import pytest
import torch

from logger import RunLogger, read_metrics


def test_the_runs_files(tmp_path):
    """config.json (sorted, anything not JSON as text), one metrics row per log with its step,
    tensors as numbers and non-finite values as text (valid JSON), summary.json."""
    log = RunLogger(str(tmp_path), {"seed": 1, "device": torch.device("cpu"), "a": [1, 2]},
                    mode="disabled")
    assert log.run is None and log.run_id is None
    log.log({"value": torch.tensor(1.5), "kl": math.nan}, step=3)
    log.log({"value": 2}, step=torch.tensor(5))
    log.log_image("density", "no-such.png", step=5)  # without wandb: nothing to do
    log.summary({"loss": torch.tensor(0.25), "kl": -math.inf, "steps": 5})
    log.finish()
    log.finish()  # again: nothing
    assert (tmp_path / "config.json").read_text() == json.dumps(
        {"a": [1, 2], "device": "cpu", "seed": 1}, indent=2)
    assert read_metrics(str(tmp_path)) == [{"step": 3, "value": 1.5, "kl": "nan"},
                                           {"step": 5, "value": 2}]
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "loss": 0.25, "kl": "-inf", "steps": 5}


def test_a_fresh_run_starts_anew_and_a_resumed_one_keeps_its_rows(tmp_path):
    out = str(tmp_path)
    log = RunLogger(out, {}, mode="disabled")
    for step in range(1, 6):
        log.log({"x": step}, step)
    log.summary({"x": 5})
    log.finish()
    log = RunLogger(out, {}, mode="disabled", resume_step=3)  # rows after 3 are done again
    log.log({"x": 40}, 4)
    log.finish()
    assert [(r["step"], r["x"]) for r in read_metrics(out)] == [(1, 1), (2, 2), (3, 3), (4, 40)]
    assert (tmp_path / "summary.json").exists()
    RunLogger(out, {}, mode="disabled").finish()  # a fresh run in the same folder
    assert read_metrics(out) == [] and not (tmp_path / "summary.json").exists()


def test_without_wandb_installed_the_files_are_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    log = RunLogger(str(tmp_path), {}, mode="online")
    log.log({"x": 1}, 1)
    log.finish()
    assert "not installed" in capsys.readouterr().err and log.run is None
    assert read_metrics(str(tmp_path)) == [{"step": 1, "x": 1}]


class FakeWandb(types.SimpleNamespace):
    """wandb's calls the logger makes: `login` (a key or not), `init` (recording the mode;
    failing for the modes in `fails`), runs whose `log` raises once `broken` is set."""

    def __init__(self, key=False, fails=()):
        super().__init__(key=key, fails=fails, modes=[], broken=False, Settings=dict,
                         Image=lambda path: path)

    def login(self, **kw):
        return self.key

    def init(self, mode, **kw):
        self.modes.append(mode)
        if mode in self.fails:
            raise ConnectionError("server unreachable")
        fake = self

        class Run:
            id, dir, summary, rows = "abc123", "/somewhere/wandb/offline-run-1/files", {}, []

            def log(self, row, step):
                if fake.broken:
                    raise RuntimeError("disk full")
                self.rows.append((step, row))

            def finish(self):
                pass

        return Run()


@pytest.mark.parametrize("mode,key,env,fails,modes,message", [
    ("auto", False, None, (), ["offline"], None),
    ("auto", True, None, (), ["online"], None),
    ("auto", True, "disabled", (), [], None),  # WANDB_MODE decides for auto
    ("online", False, None, (), ["offline"], "no API key"),
    ("online", True, None, ("online",), ["online", "offline"], "online failed to start"),
    ("offline", True, None, ("offline",), ["offline"], "to metrics.jsonl only"),
    ("disabled", True, None, (), [], None),
])
def test_wandb_modes_and_fallbacks(tmp_path, monkeypatch, capsys, mode, key, env, fails, modes,
                                   message):
    fake = FakeWandb(key, fails)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    if env:
        monkeypatch.setenv("WANDB_MODE", env)
    log = RunLogger(str(tmp_path), {"seed": 0}, mode=mode, run_id=None)
    assert fake.modes == modes
    started = bool(modes) and modes[-1] not in fails
    assert (log.run_id == "abc123") == started
    log.log({"x": 1}, 1)
    log.finish()
    err = capsys.readouterr().err
    assert message is None or message in err
    assert ("wandb sync /somewhere/wandb/offline-run-1" in err) == (started and
                                                                    modes[-1] == "offline")
    assert read_metrics(str(tmp_path)) == [{"step": 1, "x": 1}]


def test_a_wandb_error_mid_run_switches_wandb_off_and_the_files_go_on(tmp_path, monkeypatch,
                                                                      capsys):
    fake = FakeWandb(key=True)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = RunLogger(str(tmp_path), {}, mode="online")
    run = log.run
    log.log({"x": 1}, 1)
    fake.broken = True
    log.log({"x": 2}, 2)
    log.log({"x": 3}, 3)
    log.summary({"x": 3})
    log.finish()
    assert capsys.readouterr().err.count("wandb switched off") == 1
    assert run.rows == [(1, {"x": 1})] and log.run is None
    assert [r["x"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]


def test_wandb_offline_for_real(tmp_path, capsys):
    """The installed wandb, offline: a run id (kept in checkpoints), its files under the run
    folder, and the `wandb sync` command at the end."""
    pytest.importorskip("wandb")
    log = RunLogger(str(tmp_path), {"seed": 0}, mode="offline", name="t")
    assert log.offline and log.run_id
    log.log({"x": 1.0}, 1)
    log.summary({"x": 1.0})
    log.finish()
    assert "wandb sync" in capsys.readouterr().err
    assert (tmp_path / "wandb").is_dir() and read_metrics(str(tmp_path)) == [{"step": 1, "x": 1.0}]
