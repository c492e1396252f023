"""checkpoint.py: atomic writes, checked reads (a bad or foreign checkpoint is a
CheckpointError naming what was found), a run's checkpoints while it trains (RunCheckpoints:
a fresh run writes its first one, a resumed run loads models, loop and RNG) and load_run."""
import os
import random

import pytest
import torch

import checkpoint
import scaffold
from ebm import EBM
from flows import build_flow


def test_save_is_atomic(tmp_path, monkeypatch):
    """A write that dies half way (Ctrl-C, a full disk) leaves the previous checkpoint whole."""
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save_checkpoint(path, {"config": {}, "step": 1})
    real_save = torch.save

    def dies(state, f):
        real_save(state, f)
        with open(f, "r+b") as fh:
            fh.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, {"config": {}, "step": 2})
    assert checkpoint.load_checkpoint(path)["step"] == 1
    monkeypatch.undo()
    checkpoint.save_checkpoint(path, {"config": {}, "step": 3})
    assert checkpoint.load_checkpoint(path)["step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # no temporary file left


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"),
    (b"not a checkpoint\n", "not a readable checkpoint"),
    (random.Random(0).randbytes(2000), "not a readable checkpoint"),  # fixed: one test id
])
def test_unreadable_files_are_refused(tmp_path, content, needle):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match=needle):
        checkpoint.load_checkpoint(str(path))


def test_foreign_and_incomplete_checkpoints_are_refused(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load_checkpoint(path)
    full = {"config": {"seed": 1}, "script": "train_mcmc.py", "step": 3, "rng": {}}
    torch.save(full, path)
    assert checkpoint.load_checkpoint(path, script="train_mcmc.py", keys=("step",))["step"] == 3
    with pytest.raises(checkpoint.CheckpointError, match="written by train_mcmc.py") as e:
        checkpoint.load_checkpoint(path, script="train.py")
    assert "python train_mcmc.py --resume" in str(e.value)  # the command that continues it
    with pytest.raises(checkpoint.CheckpointError, match="has no epoch"):
        checkpoint.load_checkpoint(path, script="train_mcmc.py", keys=("epoch", "step"))
    for not_a_run in ([1, 2], {"step": 3}, {"config": "seed=1"}):
        torch.save(not_a_run, path)
        with pytest.raises(checkpoint.CheckpointError, match="not a run checkpoint"):
            checkpoint.load_checkpoint(path)


def _run_checkpoints(path, resumed=None):
    loop = scaffold.Loop("test", scaffold.Signals())
    header = lambda: {"script": "x.py", "config": {"seed": 0}, "wandb_id": None}  # noqa: E731
    return checkpoint.RunCheckpoints(path, loop, header, resumed), loop


def test_a_fresh_run_writes_its_first_checkpoint_and_a_resumed_one_loads_it(tmp_path):
    """load_or_save_first: fresh -> a loadable checkpoint at once, holding the models, the
    loop's state, cpu_s, header and RNG; resumed -> the models, the loop's state and clock and
    the RNG streams as they were saved."""
    path = str(tmp_path / "checkpoint.pt")
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    ckpts, loop = _run_checkpoints(path)
    loop.track(best=torch.tensor([1.0]))
    ckpts.load_or_save_first(lambda: {"spec": [2, 1]}, model=model, unused=None)
    first = checkpoint.load_checkpoint(path, script="x.py", keys=("model", "step", "cpu_s"))
    assert ckpts.saved and first["spec"] == [2, 1] and first["config"] == {"seed": 0}
    assert "unused" not in first and torch.equal(first["best"], torch.tensor([1.0]))
    for _ in loop.iterations(3):
        with torch.no_grad():
            model.weight.add_(1.0)
    loop.state["best"] = torch.tensor([2.0])
    ckpts.save({"note": "after 3"})
    expected = torch.rand(4)  # what the run would draw next
    saved = checkpoint.load_checkpoint(path, script="x.py")
    assert saved["step"] == 3 and saved["note"] == "after 3" and saved["cpu_s"] == loop.cpu_s
    torch.rand(7)
    other = torch.nn.Linear(2, 1)
    resumed, loop2 = _run_checkpoints(path, resumed=saved)
    loop2.track(best=torch.tensor([0.0]))
    resumed.load_or_save_first(model=other)
    assert torch.equal(other.weight, model.weight) and loop2.state["step"] == 3
    assert torch.equal(loop2.state["best"], torch.tensor([2.0])) and loop2.cpu_s == loop.cpu_s
    assert torch.equal(torch.rand(4), expected)


def test_load_run_rebuilds_the_models(tmp_path):
    """An EBM and a flow saved with their specs come back in eval mode with the same outputs."""
    torch.manual_seed(0)
    x = torch.randn(64, 2)
    ebm, flow = EBM(2, (8,)), build_flow("maf", x, n_blocks=1, hidden=[8])
    checkpoint.save_checkpoint(str(tmp_path / "checkpoint.pt"), {
        "config": {"dataset": "spiral"}, "script": "train.py", "step": 7,
        "ebm": ebm.state_dict(), "ebm_spec": ebm.spec(),
        "flow": flow.state_dict(), "flow_spec": flow.spec()})
    run = checkpoint.load_run(str(tmp_path), script="train.py")
    assert run.step == 7 and run.config == {"dataset": "spiral"}
    assert not run.ebm.training and not run.flow.training
    flow.eval()
    assert torch.allclose(run.ebm(x), ebm(x)) and torch.allclose(run.flow.log_prob(x),
                                                                   flow.log_prob(x))
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_run(str(tmp_path), script="train_vi.py")


def test_a_checkpoint_that_names_no_script_is_from_an_older_version(tmp_path):
    """A checkpoint without the `script` entry (written before scripts signed theirs) is
    refused when a script asks for its own, naming migrate.py, which adds the entry."""
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save_checkpoint(path, {"config": {"seed": 1}, "step": 3, "rng": {}})
    with pytest.raises(checkpoint.CheckpointError, match=r"older version .*lacks script.*migrate\.py"):
        checkpoint.load_checkpoint(path, script="train.py", keys=("step",))
    assert checkpoint.load_checkpoint(path)["step"] == 3  # read as a file, not resumed
