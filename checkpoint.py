"""Checkpoints: atomic writes (`save_checkpoint`), checked reads (`load_checkpoint`, which
raises `CheckpointError` with what it found), a run's checkpoints while it trains
(`RunCheckpoints`, the part of `scaffold.Run` that saves and resumes) and `load_run`, which
rebuilds a run's EBM and flow from its checkpoint: `run = load_run("runs/<name>")`.
"""
import os
from types import SimpleNamespace
from typing import Any, Callable

import torch

import util
from ebm import EBM


def save_checkpoint(path, state):
    """torch.save to a temporary file, then an atomic rename: a crash or Ctrl-C during the
    write never leaves a truncated checkpoint. Keep `state` to tensors and plain Python types
    (torch.load uses weights_only=True)."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, empty, truncated, not a checkpoint, written
    by another script or by an older version. The message names what was found."""


def load_checkpoint(path, map_location="cpu", script=None, keys=(), older=lambda ckpt: ()):
    """Read a checkpoint written by `save_checkpoint`. With `script` (e.g. "train.py"), one
    written by another script or without the entries `keys` is refused, and one from an older
    version (naming no script, or lacking what `older(ckpt)` lists) names migrate.py. Raises
    CheckpointError (or FileNotFoundError)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; check the path or train a run first")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the run never saved one")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, foreign objects: all one case
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not written "
                              f"by this toolkit: {first})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a run checkpoint of "
                              f"this toolkit (no saved config)")
    writer, run_dir = ckpt.get("script"), os.path.dirname(path) or "."
    if script is not None and writer is not None and writer != script:
        raise CheckpointError(f"{path} was written by {writer}; continue it with "
                              f"`python {writer} --resume {run_dir}`")
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(missing)}: it is not a "
                              f"{script or 'matching'} run; start a new run instead")
    lacks = [*older(ckpt), *(["script"] if script is not None and writer is None else [])]
    if lacks:
        raise CheckpointError(f"{path} is from an older version (it lacks {', '.join(lacks)}); "
                              f"update it with `python migrate.py {run_dir}`")
    return ckpt


class RunCheckpoints:
    """A training run's checkpoint at `path`: the tracked models and optimisers, the `loop`'s
    state and CPU clock (scaffold.Loop), every RNG state and `header()` (the script's name,
    config and wandb id); `resumed` is the checkpoint --resume loaded (None: a fresh run)."""

    def __init__(self, path: str, loop, header: Callable[[], dict], resumed: dict | None = None):
        self.path, self.loop, self.header, self.resumed = path, loop, header, resumed
        self.saved = resumed is not None  # a checkpoint of this run exists
        self._objects, self._extra = {}, None

    def load_or_save_first(self, extra: Callable[[], dict] | None = None, **objects: Any) -> None:
        """Track `objects` (state_dict holders; None is skipped) and `extra()` (more entries,
        read at each save). On --resume load them, the loop's state and clock and every RNG
        state; a fresh run saves its first checkpoint now (a NaN at the first iteration still
        leaves a loadable run)."""
        self._objects = {k: v for k, v in objects.items() if v is not None}
        self._extra = extra
        if self.resumed is None:
            return self.save()
        for key, obj in self._objects.items():
            obj.load_state_dict(self.resumed[key])
        self.loop.load(self.resumed)
        util.set_rng_state(self.resumed["rng"])
        print(f"resuming {os.path.dirname(self.path)} at iteration {self.loop.state['step']}")

    def save(self, extra: dict | None = None) -> None:
        """Write the checkpoint atomically (`save_checkpoint`), `extra` entries added."""
        state = {k: obj.state_dict() for k, obj in self._objects.items()}
        state.update(self.loop.state, **(self._extra() if self._extra else {}), **(extra or {}))
        save_checkpoint(self.path, {**state, "cpu_s": self.loop.cpu_s, **self.header(),
                                    "rng": util.rng_state()})
        self.saved = True


def load_run(run_dir, device="cpu", script=None):
    """Load a finished or interrupted run: `run = load_run("runs/<name>")`.

    Returns a namespace with .config (dict), .ebm (callable: f(x) for an (N, 2) tensor, or
    None), .flow (log_prob / sample, or None), .step and .checkpoint (the raw dict)."""
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"), map_location=device,
                           script=script)
    ebm = flow = None
    if "ebm" in ckpt:
        ebm = EBM(**ckpt["ebm_spec"]).to(device)
        ebm.load_state_dict(ckpt["ebm"])
        ebm.eval()
    if "flow" in ckpt:
        from vi_flows import flow_from_spec  # density and VI flows (imported only when needed)

        flow = flow_from_spec(ckpt["flow_spec"]).to(device)
        flow.load_state_dict(ckpt["flow"])
        flow.eval()
    if ckpt.get("tilt"):  # an EBM built on the run's flow: p = q0 exp(-g) / Z
        from tilt import FlowTilt
        ebm = FlowTilt(flow, ebm, **ckpt["tilt"])
    return SimpleNamespace(config=ckpt["config"], ebm=ebm, flow=flow, step=ckpt.get("step"),
                           checkpoint=ckpt)
