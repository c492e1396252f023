"""The run scaffold every training script uses, as small parts a trainer names: the run's
`Folder`, its checkpoints (`checkpoint.RunCheckpoints`), its `Loop` (iterations and epochs,
the CPU clock, progress, the position and running sums a resume needs), its `Signals` and its
logger (`logger.RunLogger`); `Run` holds them and `Run.execute` ends the run.

    SCRIPT = scaffold.Script("train.py", overridable=("epoch", ...), keys=("step", "rng"))
    args, ckpt = scaffold.parse(parser, argv, SCRIPT)
    device = scaffold.device(args)
    ...                                         # data and models: bad input fails here,
    with scaffold.Run(args, SCRIPT, ("fce", "maf", "8gaussians", "s42"), ckpt) as run:
        return run.execute(lambda: train(args, run))

    def train(args, run):                       # the experiment only
        checkpoints, loop = run.checkpoints, run.loop
        state = loop.track(best=0.0)            # the position beyond `step`, in checkpoints
        checkpoints.load_or_save_first(model=model, opt=opt)   # --resume loads, else saves
        for step in loop.iterations(n):         # stops at a boundary on Ctrl-C/SIGTERM
            ...; loss.backward(); loop.check(loss, params); opt.step()
        return summary                          # summary.json, exit status 0

The conventions, the same for every script:
- the run folder is `--out_dir`, default runs/<name>-<time>; its figures go to `--image_dir`,
  default `default_image_dir`. Two runs started in the same second get different folders
  (made atomically, a suffix -2, -3, ... added). A folder that already holds files is refused
  unless the run resumes (`--resume`) or `--overwrite` clears it.
- a folder that cannot be written, a device this machine lacks and a bad or foreign
  checkpoint are one-line errors with exit status 2, before any work; a start that fails
  after the folders were made removes them again.
- checkpoints are written atomically and carry the script's name, the resolved config, the
  tracked models and optimisers, the loop's state, the CPU clock `cpu_s` (the process CPU time
  spent inside `loop.iterations`), every RNG state and the wandb run id.
- Ctrl-C and SIGTERM set a flag that `loop.iterations` reads between iterations: the run
  saves, prints the `--resume` command and exits 130; a second signal stops at once, keeping
  the last checkpoint.
- exit status: 0 done, 1 non-finite loss or gradient (one line; the last good checkpoint is
  kept), 2 bad input (`config.fail`), 130 interrupted.
"""
import hashlib
import math
import os
import shlex
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm import tqdm

import checkpoint
import config
import util
from logger import RunLogger

DONE, NONFINITE, BAD_INPUT, INTERRUPTED = 0, 1, 2, 130


@dataclass(frozen=True)
class Script:
    """An entry script, declared once: its file name, whether `--resume` continues its runs,
    the flags a resumed run may change (None: all) and the checkpoint entries it reads."""

    name: str
    resumable: bool = True
    overridable: tuple[str, ...] | None = None
    keys: tuple[str, ...] = ("step", "rng")


class NonFinite(Exception):
    """A non-finite loss or gradient: the run ends with exit status 1 (`Run.execute`)."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM, seen at a boundary; the message says where (`Run.execute`)."""


def parse(parser, argv, script: Script):
    """Parse the command line (and --config); for --resume, load and check the checkpoint
    (written by `script`, holding its `keys` and the clock `cpu_s`) and return the run's saved
    configuration with the `script.overridable` flags typed now on top; a script that is not
    resumable refuses --resume. Returns (args, checkpoint or None)."""
    args = config.parse(parser, argv)
    for folder in (args.out_dir or "runs", getattr(args, "image_dir", None) or "images"):
        check_writable(folder)  # before any work: data and models come after parse
    if not args.resume:
        return args, None
    if not script.resumable:
        config.fail(f"{script.name} has no --resume (its runs are short); start the run again with "
                    f"the same --seed")
    if getattr(args, "overwrite", False):
        config.fail("--overwrite starts a run afresh and --resume continues one: pass one")
    path = args.resume if args.resume.endswith(".pt") else os.path.join(args.resume,
                                                                         "checkpoint.pt")
    try:
        ckpt = checkpoint.load_checkpoint(path, script=script.name, keys=script.keys)
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        config.fail(f"--resume: {e}")
    if "cpu_s" not in ckpt:
        config.fail(f"--resume: {path} has no CPU clock cpu_s (an older run); rewrite it with "
                    f"`python migrate.py {shlex.quote(os.path.dirname(path) or '.')}` first")
    return config.resumed_args(args, ckpt, path, argv, script.overridable), ckpt


def device(args):
    """torch.device of --device, or a one-line error naming the devices this machine has."""
    try:
        return util.get_device(args.device)
    except ValueError as e:
        config.fail(str(e))


def check_writable(path):
    """A one-line error (exit 2), before any work, when `path` or the folder it would be made
    in cannot be written."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        config.fail(f"{path}: {probe} is a file, not a folder; choose another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        config.fail(f"cannot write to {probe}; choose a writable folder")


# ----------------------------------------------------------------------------- folders
class Folder:
    """The run's folders, `out_dir` and `image_dir` (None without figures), written back into
    `args`. A fresh run claims them (`_claim`, `_unique`); a resumed one reuses its own.
    `remove_created` takes back what a failed start made."""

    def __init__(self, args, name_parts, figures=True, resumable=True, resume=False):
        self.args, self.resumable, self._created = args, resumable, []
        image_dir = getattr(args, "image_dir", None) if figures else None
        try:
            if resume:
                self.out_dir, self.image_dir = args.out_dir, image_dir
                for d in filter(None, (self.out_dir, self.image_dir)):
                    check_writable(d)
                if self.image_dir:
                    self._mkdir(self.image_dir)
            else:
                self.out_dir = self._claim(args.out_dir) if args.out_dir else self._unique(
                    os.path.join("runs", config.run_name(*name_parts)), figures and not image_dir)
                self.image_dir = self._claim(image_dir or default_image_dir(self.out_dir),
                                             figures=True) if figures else None
        except BaseException:
            self.remove_created()
            raise
        args.out_dir = self.out_dir
        if figures:
            args.image_dir = self.image_dir
        self.name = os.path.basename(os.path.normpath(self.out_dir))
        self.checkpoint_path = os.path.join(self.out_dir, "checkpoint.pt")

    def _claim(self, path, figures=False):
        """An explicit folder: created if new; a used one is refused unless --overwrite, which
        empties it only when it holds a run (or, for figures, only images)."""
        check_writable(path)
        if not os.path.isdir(path):
            self._mkdir(path)
            return path
        entries = [os.path.join(path, e) for e in os.listdir(path)]
        if entries and not self.args.overwrite:
            resume = f"continue it with --resume {shlex.quote(path)}, " if self.resumable else ""
            config.fail(f"{path} already holds files of another run; {resume}clear it with "
                        f"--overwrite, or choose another --out_dir/--image_dir")
        if entries and not _holds_run(path, figures):
            config.fail(f"--overwrite: {path} does not look like a run's folder (no config.json "
                        f"or checkpoint.pt{'; or files other than images' if figures else ''}); "
                        f"refusing to empty it, choose another folder")
        for entry in entries:
            shutil.rmtree(entry) if os.path.isdir(entry) and not os.path.islink(entry) \
                else os.remove(entry)
        return path

    def _unique(self, base, with_images):
        """base, base-2, base-3, ...: the first name whose run folder (and default figure
        folder) does not exist yet, claimed by an atomic mkdir."""
        for path in (base if k == 1 else f"{base}-{k}" for k in range(1, 1000)):
            if with_images and os.path.exists(default_image_dir(path)):
                continue
            try:
                self._mkdir(path, exist_ok=False)
                return path
            except FileExistsError:
                continue
        config.fail(f"no free run folder next to {base}; pass --out_dir")

    def _mkdir(self, path, exist_ok=True):
        """makedirs that remembers the highest folder it created (for `remove_created`)."""
        top = os.path.normpath(path)
        while os.path.dirname(top) and not os.path.exists(os.path.dirname(top)):
            top = os.path.dirname(top)
        new = not os.path.exists(top)
        try:
            os.makedirs(path, exist_ok=exist_ok)
        except FileExistsError:
            raise
        except OSError as e:
            config.fail(f"cannot create {path} ({e.strerror}); choose a writable folder")
        if new:
            self._created.append(top)

    def remove_created(self):
        """Remove the folders this run created (a start that failed leaves none behind)."""
        for path in self._created:
            shutil.rmtree(path, ignore_errors=True)


def default_image_dir(out_dir):
    """The figure folder of run folder `out_dir` when --image_dir is not given: images/<name>
    for runs/<name> (the default run folders), else images/<name>-<first 8 hex digits of
    sha1(absolute path)>: two runs whose folders differ only in their parent never share one."""
    path = os.path.abspath(out_dir)
    name = os.path.basename(path)
    if os.path.dirname(path) == os.path.abspath("runs"):
        return os.path.join("images", name)
    return os.path.join("images", f"{name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}")


def _holds_run(path, figures):
    """Whether --overwrite may empty `path`: a run folder (config.json or checkpoint.pt in
    it), or for figures a folder of images and their metadata only."""
    if {"config.json", "checkpoint.pt"} & set(os.listdir(path)):
        return True
    allowed = (".png", ".gif", ".json", ".jpg", ".pdf", ".svg")
    return figures and all(f.endswith(allowed) for _, _, files in os.walk(path) for f in files)


# ----------------------------------------------------------------------------- signals
class Signals:
    """Ctrl-C and SIGTERM (a scheduler, a stopped sweep agent) as a flag, `stop_requested`,
    that a loop reads at its boundaries (`boundary`); installed only inside `with`. A second
    signal stops at once (KeyboardInterrupt: `config.cli` ends it with exit status 130)."""

    def __init__(self):
        self.stop_requested, self._old = False, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: signals keep their default behaviour
                pass
        return self

    def _on_signal(self, signum, frame):
        if self.stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this iteration (again: stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False

    def boundary(self, where: str) -> None:
        """Raise Interrupted(where) once Ctrl-C or SIGTERM came."""
        if self.stop_requested:
            raise Interrupted(where)


# ----------------------------------------------------------------------------- the loop
class Loop:
    """The training loop: its `state` (the iterations done, `step`, and what the trainer
    `track`s: in every checkpoint, so that a resumed run goes on bit for bit), `iterations` and
    `epochs` (ending at `until` and, after Ctrl-C or SIGTERM, at a boundary), the CPU clock
    `cpu_s`, progress and rate, running sums of the metrics row and the non-finite guard."""

    def __init__(self, name: str, signals: Signals):
        self.name, self.signals, self.state = name, signals, {"step": 0}
        self._sums, self._per_epoch, self._bar, self._rate_at = (), None, None, None
        self._cpu, self._t0 = 0.0, None

    def track(self, epochs: bool = False, sums: Iterable[str] = (), **entries: Any) -> dict:
        """Add `entries` to the state; with `epochs` the epoch position (epoch, it: the
        iterations done in it, perm: its permutation), with `sums` running sums at 0 and their
        count n_rows (`add`, `means`). Returns the state."""
        self._sums = tuple(sums)
        self.state.update(entries, **dict.fromkeys(self._sums, 0.0))
        self.state.update(dict(n_rows=0) if self._sums else {})
        self.state.update(dict(epoch=0, it=0, perm=None) if epochs else {})
        return self.state

    def iterations(self, stop: int, total: int | None = None,
                   until: Callable[[], bool] | None = None) -> Iterator[int]:
        """The iterations state["step"], ..., stop - 1, each counted in `step` as it starts
        (the body sees it done), timed by `clock` and shown by the progress bar (of `total`
        iterations, default `stop`); ends early once `until()`, and raises Interrupted at the
        boundary after Ctrl-C or SIGTERM."""
        start = self.state["step"]
        if self._bar is None:
            self._bar = progress_bar(total or stop, start, self.name)
            self._rate_at = (time.perf_counter(), self.cpu_s, start)
        for i in range(start, stop):
            if until is not None and until():
                return
            self.signals.boundary(f"at iteration {i}")
            self.state["step"] = i + 1
            with self.clock():
                yield i
            self._bar.update(1)

    def epochs(self, n_epochs: int, per_epoch: int, n_items: int, device, total=None,
               until=None) -> Iterator[Iterator[int]]:
        """Epochs up to `n_epochs` (ending early once `until()`), each `per_epoch` iterations
        (`iterations`) over a fresh permutation of `n_items` (`rows`); an epoch cut short
        (`until`, Ctrl-C) continues where it stopped."""
        self._per_epoch = per_epoch
        while self.state["epoch"] < n_epochs and not (until is not None and until()):
            yield self._epoch(n_items, device, total, until)

    def _epoch(self, n_items, device, total, until):
        s = self.state
        if s["perm"] is None:
            s["perm"] = torch.randperm(n_items, device=device)
        for i in self.iterations(s["step"] - s["it"] + self._per_epoch, total, until):
            s["it"] += 1
            yield i
        if s["it"] == self._per_epoch:
            s.update(epoch=s["epoch"] + 1, it=0, perm=None)

    def rows(self, step: int, size: int) -> torch.Tensor | None:
        """The permutation's `size` rows of iteration `step` of the epoch under way (None past
        its end): step's place in the epoch is `it - 1 + step - (state["step"] - 1)`."""
        i = self.state["it"] + step - self.state["step"]
        return self.state["perm"][i * size:(i + 1) * size] if i < self._per_epoch else None

    def add(self, **values: Any) -> None:
        """Add one iteration's values (None: 0) to the running sums and count it."""
        for k, v in values.items():
            self.state[k] += float(v) if v is not None else 0.0
        self.state["n_rows"] += 1

    def means(self) -> dict:
        """The running sums over their count (the iterations added since the last call); the
        sums start again."""
        n = self.state["n_rows"]
        out = {k: self.state[k] / n for k in self._sums}
        self.state.update(dict.fromkeys(self._sums, 0.0), n_rows=0)
        return out

    @property
    def cpu_s(self) -> float:
        """Process CPU seconds spent inside `iterations` (and `clock`), over all sessions."""
        return self._cpu + (time.process_time() - self._t0 if self._t0 is not None else 0.0)

    @contextmanager
    def clock(self) -> Iterator[None]:
        """Count the process CPU time spent inside the block in `cpu_s`."""
        self._t0 = time.process_time()
        try:
            yield
        finally:
            self._cpu, self._t0 = self.cpu_s, None

    def rate(self) -> tuple[float, float]:
        """(iterations per second, CPU seconds per iteration) since the last call (called
        inside an iteration, it counts as done)."""
        now, (t, cpu, done) = time.perf_counter(), self._rate_at
        self._rate_at = (now, self.cpu_s, self.state["step"])
        n = max(self.state["step"] - done, 1)
        return n / max(now - t, 1e-9), (self.cpu_s - cpu) / n

    def print(self, line: str | None, postfix: dict | None = None) -> None:
        """A progress line printed above the bar, and values shown on the bar."""
        if line is not None:
            tqdm.write(line)
        if postfix and self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)

    def check(self, loss: Any, params: Iterable[torch.Tensor] = ()) -> None:
        """The non-finite guard: raise NonFinite when `loss` (None: a step that reported
        failure) or a gradient of `params` is not finite."""
        loss = loss.detach() if torch.is_tensor(loss) else loss
        if loss is None or not math.isfinite(float(loss)) or not all(
                torch.isfinite(p.grad).all() for p in params if p.grad is not None):
            raise NonFinite(f"non-finite loss or gradient at iteration {self.state['step'] - 1}")

    def load(self, ckpt: dict) -> None:
        """The state (tensors onto the device of the state's own) and `cpu_s` of a checkpoint."""
        for key, old in self.state.items():
            new = ckpt.get(key, old)
            self.state[key] = new.to(old.device) if torch.is_tensor(old) and torch.is_tensor(
                new) else new
        self._cpu = float(ckpt["cpu_s"])

    def close(self) -> None:
        """Close the progress bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ----------------------------------------------------------------------------- the run
class Run:
    """One run, as the parts a trainer names: `folder`, `log` (RunLogger), `signals`, `loop`,
    `checkpoints` (checkpoint.RunCheckpoints; `.resumed` is the --resume checkpoint or None);
    `execute` ends it. Use it as a context manager around the training: the signal handlers
    are installed only inside it, and a start that fails inside it (bad input found late, an
    exception) before a checkpoint was written removes the folders it created."""

    def __init__(self, args, script: Script | str, name_parts: Iterable[Any],
                 ckpt: dict | None = None, figures: bool = True):
        self.script = script if isinstance(script, Script) else Script(script)
        self.folder = Folder(args, name_parts, figures, self.script.resumable, ckpt is not None)
        self.name = self.folder.name
        try:
            self.log = RunLogger(self.folder.out_dir, config.to_dict(args), args.wandb,
                                 args.project, self.name, run_id=(ckpt or {}).get("wandb_id"),
                                 resume_step=ckpt.get("step", 0) if ckpt is not None else None)
        except BaseException:
            self.folder.remove_created()
            raise
        self.signals = Signals()
        self.loop = Loop(self.name, self.signals)
        self.checkpoints = checkpoint.RunCheckpoints(self.folder.checkpoint_path, self.loop, lambda: {
            "script": self.script.name, "config": config.to_dict(args),
            "wandb_id": self.log.run_id}, resumed=ckpt)

    def __enter__(self):
        self.signals.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.signals.__exit__(exc_type, exc, tb)
        self.loop.close()
        if exc_type is None:
            return False
        self.log.finish()
        if not self.checkpoints.saved:  # nothing worth keeping: leave no folders behind
            self.folder.remove_created()
        if exc_type is KeyboardInterrupt:
            where = ("no checkpoint was written" if not self.checkpoints.saved else
                     f"the last checkpoint is kept; {self.resume_hint()}")
            print(f"\nstopped at once: {where}", file=sys.stderr)
            raise SystemExit(INTERRUPTED)
        return False

    def execute(self, train: Callable[[], dict | None]) -> int:
        """Run the experiment `train`, end the run and return its exit status: the summary
        (or None) -> summary.json with `cpu_s`, 0; NonFinite -> one line naming the last good
        checkpoint, 1; Interrupted -> save, one line with the resume command, 130."""
        summary, status, message = None, DONE, None
        try:
            summary = train()
        except NonFinite as e:
            status, message = NONFINITE, (
                f"error: {e}; the last good checkpoint is kept in {self.folder.checkpoint_path}. "
                f"Try a lower learning rate or another --seed.")
        except Interrupted as e:
            self.checkpoints.save()
            status = INTERRUPTED
            message = f"\ninterrupted {e}: checkpoint saved; {self.resume_hint()}"
        self.loop.close()
        if summary:
            self.log.summary({**summary, "cpu_s": self.loop.cpu_s})
        self.log.finish()
        if message:
            print(message, file=sys.stderr)
        return status

    def resume_hint(self) -> str:
        """How to go on from the checkpoint: the --resume command, or for a script without
        resume where the weights are."""
        if not self.script.resumable:
            return (f"the weights trained so far are in {self.folder.checkpoint_path}; "
                    f"{self.script.name} has no --resume (its runs are short): start it again "
                    f"with the same flags")
        return f"continue with\n  python {self.script.name} --resume {shlex.quote(self.folder.out_dir)}"


# ----------------------------------------------------------------------------- printing
class _Lines:
    """A stream for tqdm off a terminal: each refresh becomes one plain line (no carriage
    returns piling up in log files)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s):
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self):
        self.stream.flush()


def progress_bar(total: int, initial: int, desc: str) -> tqdm:
    """tqdm on a terminal; off one (CI, nohup, redirected logs), a plain line every 30 s."""
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, dynamic_ncols=True, desc=desc[:40])
    return tqdm(total=total, initial=initial, ncols=100, mininterval=30, ascii=True,
                desc=desc[:30], file=_Lines(sys.stderr))


def gif_hint(folder: str) -> str:
    """The command that turns a folder of frames into a gif."""
    return f"python images/create_gif.py {shlex.quote(folder)}"
