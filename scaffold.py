"""The run scaffold every training script uses: folders, logger, checkpoint and restore, the
loop's CPU clock and progress, the non-finite guard, Ctrl-C and SIGTERM, exit codes.

    SCRIPT = scaffold.Script("train.py", overridable=("epoch", ...), keys=("step", "rng"))
    args, ckpt = scaffold.parse(parser, argv, SCRIPT)
    device = scaffold.device(args)
    ...                                         # data and models: bad input fails here,
    with scaffold.Run(args, SCRIPT, ("fce", "maf", "8gaussians", "s42"), ckpt) as run:
        return run.execute(lambda: train(args, run))

    def train(args, run):                       # the experiment only
        loop = run.restore(dict(step=0), model=model, opt=opt)   # or loaded from --resume
        for step in run.iterations(loop["step"], n):  # stops at a boundary on Ctrl-C/SIGTERM
            ...; loss.backward(); run.check(loss, params); opt.step()
            loop["step"] = step + 1
        return summary                          # summary.json, exit status 0

The conventions, the same for every script:
- the run folder is `--out_dir`, default runs/<name>-<time>; its figures go to `--image_dir`,
  default images/<run folder name> for a folder in ./runs and images/<run folder name>-<8 hex
  digits of its absolute path> for any other (`default_image_dir`: two runs whose folders
  differ only in their parent never share a figure folder). Two runs started in the same second get different folders
  (the folder is created atomically, a suffix -2, -3, ... is added). A folder that already
  holds files is refused unless the run resumes (`--resume`) or `--overwrite` clears it.
- a folder that cannot be written, a device this machine lacks and a bad or foreign
  checkpoint are one-line errors with exit status 2, before any work; a start that fails
  after the folders were made removes them again.
- checkpoints are written atomically and carry the script's name, the resolved config, the
  tracked models and optimisers, the loop's position, the CPU clock `cpu_s`, every RNG state
  and the wandb run id. `cpu_s` is the process CPU time spent inside `run.iterations`.
- Ctrl-C and SIGTERM (a scheduler, a stopped sweep agent) set a flag that `run.iterations`
  reads between iterations: the run saves, prints the `--resume` command and exits 130 (for
  SIGTERM too); a second signal stops at once, keeping the last checkpoint.
- exit status: 0 done, 1 non-finite loss or gradient (one line; the last good checkpoint is
  kept), 2 bad input (`config.fail`), 130 interrupted.

Benchmarks start these scripts through bench/runner.py.
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
CPU_KEYS = ("cpu_s", "cpu_sec", "seconds")  # the CPU clock in checkpoints, then older names


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
    (written by `script`, holding its `keys`) and return the run's saved configuration with
    the `script.overridable` flags typed now on top; a script that is not resumable refuses
    --resume. Returns (args, checkpoint or None)."""
    args = config.parse(parser, argv)
    for folder in (args.out_dir or "runs", getattr(args, "image_dir", None) or "images"):
        Run._writable(folder)  # before any work: data and models come after parse
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
    return config.resumed_args(args, ckpt, path, argv, script.overridable), ckpt


def device(args):
    """torch.device of --device, or a one-line error naming the devices this machine has."""
    try:
        return util.get_device(args.device)
    except ValueError as e:
        config.fail(str(e))


class Signals:
    """Ctrl-C and SIGTERM (a scheduler, a stopped sweep agent) as a flag, `stop_requested`,
    that a loop reads at its boundaries (`boundary`); installed only inside `with`. A second
    signal stops at once (KeyboardInterrupt: `config.cli` ends it with exit status 130)."""

    stop_requested = False

    def __enter__(self):
        self._old_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
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

    def __exit__(self, exc_type, exc, tb):
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        return False

    def boundary(self, where: str) -> None:
        """Raise Interrupted(where) once Ctrl-C or SIGTERM came."""
        if self.stop_requested:
            raise Interrupted(where)


class Run(Signals):
    """One run: folders, logger (`run.log`, a RunLogger), checkpoint and restore, the loop's
    CPU clock and progress, the non-finite guard, Ctrl-C and SIGTERM, exit codes.

    Use it as a context manager around the training: a start that fails inside it (bad input
    found late, an exception) removes the folders it created, and the signal handlers are
    installed only inside it."""

    def __init__(self, args, script: Script | str, name_parts: Iterable[Any],
                 ckpt: dict | None = None, figures: bool = True):
        script = script if isinstance(script, Script) else Script(script)
        self.args, self.script, self.ckpt = args, script.name, ckpt
        self.resumable = script.resumable
        self.loop: dict = {}
        self.step = 0  # the iteration under way (then the next one)
        self._objects, self._extra, self._bar, self._cpu, self._t0 = {}, None, None, 0.0, None
        self._rate_at = None
        self._created, self._saved = [], ckpt is not None
        try:
            if ckpt is None:
                self._make_folders(name_parts, figures)
            else:
                self.out_dir = args.out_dir
                self.image_dir = getattr(args, "image_dir", None) if figures else None
                for d in (self.out_dir, self.image_dir):
                    if d:
                        self._writable(d)
                if self.image_dir:
                    self._mkdir(self.image_dir)
            args.out_dir = self.out_dir
            if figures:
                args.image_dir = self.image_dir
            self.name = os.path.basename(os.path.normpath(self.out_dir))
            self.checkpoint_path = os.path.join(self.out_dir, "checkpoint.pt")
            step = ckpt.get("step", 0) if ckpt is not None else None
            self.log = RunLogger(self.out_dir, config.to_dict(args), args.wandb, args.project,
                                 self.name, run_id=ckpt.get("wandb_id") if ckpt else None,
                                 resume_step=step)
        except BaseException:
            self._remove_created()
            raise

    def _remove_created(self):
        for path in self._created:
            shutil.rmtree(path, ignore_errors=True)

    # -- folders --------------------------------------------------------------------------
    def _make_folders(self, name_parts, figures):
        """Create the run folder (and the figure folder) for a fresh run."""
        args = self.args
        explicit_image = getattr(args, "image_dir", None) if figures else None
        if args.out_dir:
            self.out_dir = self._claim(args.out_dir)
        else:
            base = os.path.join("runs", config.run_name(*name_parts))
            self.out_dir = self._unique(base, figures and not explicit_image)
        self.image_dir = None
        if figures:
            self.image_dir = self._claim(explicit_image or default_image_dir(self.out_dir),
                                         figures=True)

    def _claim(self, path, figures=False):
        """An explicit folder: created if new; a used one is refused unless --overwrite, which
        empties it only when it holds a run (or, for figures, only images)."""
        self._writable(path)
        if os.path.isdir(path) and os.listdir(path):
            if not self.args.overwrite:
                resume = (f"continue it with --resume {shlex.quote(path)}, "
                          if self.resumable else "")
                config.fail(f"{path} already holds files of another run; {resume}clear it "
                            f"with --overwrite, or choose another --out_dir/--image_dir")
            if not _holds_run(path, figures):
                config.fail(f"--overwrite: {path} does not look like a run's folder (no "
                            f"config.json or checkpoint.pt{'; or files other than images' if figures else ''}); "
                            f"refusing to empty it, choose another folder")
            for entry in os.listdir(path):
                full = os.path.join(path, entry)
                shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) \
                    else os.remove(full)
        elif not os.path.isdir(path):
            self._mkdir(path)
        return path

    def _unique(self, base, with_images):
        """base, base-2, base-3, ...: the first name whose run folder (and default figure
        folder) does not exist yet, claimed by an atomic mkdir."""
        for k in range(1, 1000):
            path = base if k == 1 else f"{base}-{k}"
            image = default_image_dir(path)
            if with_images and os.path.exists(image):
                continue
            try:
                self._mkdir(path, exist_ok=False)
                return path
            except FileExistsError:
                continue
        config.fail(f"no free run folder next to {base}; pass --out_dir")

    def _mkdir(self, path, exist_ok=True):
        """makedirs that remembers the highest folder it created (removed on a failed start)."""
        top = path
        while True:
            parent = os.path.dirname(os.path.normpath(top))
            if not parent or os.path.exists(parent):
                break
            top = parent
        existed = os.path.exists(top)
        try:
            os.makedirs(path, exist_ok=exist_ok)
        except FileExistsError:
            raise
        except OSError as e:
            config.fail(f"cannot create {path} ({e.strerror}); choose a writable folder")
        if not existed:
            self._created.append(top)

    @staticmethod
    def _writable(path):
        """A one-line error, before any work, when `path` or the folder it would be made in
        cannot be written."""
        probe = os.path.abspath(path)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            config.fail(f"{path}: {probe} is a file, not a folder; choose another folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            config.fail(f"cannot write to {probe}; choose a writable folder")

    # -- context: Ctrl-C, SIGTERM (Signals) and failed starts --------------------------------
    def __exit__(self, exc_type, exc, tb):
        super().__exit__(exc_type, exc, tb)
        self._close_bar()
        if exc_type is None:
            return False
        self.log.finish()
        if not self._saved:  # nothing worth keeping: leave no folders behind
            self._remove_created()
        if exc_type is KeyboardInterrupt:
            where = ("no checkpoint was written" if not self._saved else
                     f"the last checkpoint is kept; {self.resume_hint()}")
            print(f"\nstopped at once: {where}", file=sys.stderr)
            raise SystemExit(INTERRUPTED)
        return False

    # -- restore, checkpoints --------------------------------------------------------------
    def restore(self, loop: dict, extra: Callable[[], dict] | None = None,
                **objects: Any) -> dict:
        """Track `objects` (models, optimisers: state_dict holders; None is skipped), the
        loop's position `loop` (plain values and tensors) and `extra()` (more checkpoint
        entries). On --resume load them, the CPU clock and every RNG state from the
        checkpoint; a fresh run saves its first checkpoint now. Returns `loop`."""
        self._objects = {k: v for k, v in objects.items() if v is not None}
        self.loop, self._extra = loop, extra
        if self.ckpt is None:
            self.save()  # a NaN at the first iteration still leaves a loadable run
            return loop
        for key, obj in self._objects.items():
            obj.load_state_dict(self.ckpt[key])
        for key, old in loop.items():
            if key in self.ckpt:
                new = self.ckpt[key]
                loop[key] = new.to(old.device) if torch.is_tensor(old) and torch.is_tensor(new) \
                    else new
        self._cpu = float(next((self.ckpt[k] for k in CPU_KEYS if k in self.ckpt), 0.0))
        util.set_rng_state(self.ckpt["rng"])
        print(f"resuming {self.out_dir} at iteration {loop.get('step', 0)}")
        return loop

    def save(self, extra: dict | None = None) -> None:
        """Write atomically to <out_dir>/checkpoint.pt the tracked objects' state_dicts, the
        loop's position, `extra`, the CPU clock `cpu_s`, the script's name, the resolved
        config, every RNG state and the wandb run id."""
        state = {k: obj.state_dict() for k, obj in self._objects.items()}
        state.update(self.loop, **(self._extra() if self._extra else {}), **(extra or {}))
        checkpoint.save_checkpoint(self.checkpoint_path, {
            **state, "cpu_s": self.cpu_s, "script": self.script,
            "config": config.to_dict(self.args), "rng": util.rng_state(),
            "wandb_id": self.log.run_id})
        self._saved = True

    # -- the loop: iterations, CPU clock, progress, non-finite guard ---------------------------
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

    def iterations(self, start: int, stop: int, total: int | None = None,
                   until: Callable[[], bool] | None = None) -> Iterator[int]:
        """The iterations start, ..., stop - 1, each timed by `clock` and shown by the
        progress bar (of `total` iterations, default `stop`); ends early once `until()`, and
        raises Interrupted at the boundary after Ctrl-C or SIGTERM."""
        if self._bar is None:
            self._bar = progress_bar(total or stop, start, self.name)
            self._rate_at = (time.perf_counter(), self.cpu_s, start)
        for i in range(start, stop):
            if until is not None and until():
                return
            self.boundary(f"at iteration {i}")
            self.step = i
            with self.clock():
                yield i
            self.step = i + 1
            self._bar.update(1)

    def rate(self) -> tuple[float, float]:
        """(iterations per second, CPU seconds per iteration) since the last call (called
        inside iteration i, iteration i counts as done)."""
        done = self.step + (1 if self._t0 is not None else 0)
        now, (t, cpu, step) = time.perf_counter(), self._rate_at
        self._rate_at = (now, self.cpu_s, done)
        n = max(done - step, 1)
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
            raise NonFinite(f"non-finite loss or gradient at iteration {self.step}")

    def _close_bar(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- endings ------------------------------------------------------------------------------
    def execute(self, train: Callable[[], dict | None]) -> int:
        """Run the experiment `train`, end the run and return its exit status: the summary
        (or None) -> summary.json with `cpu_s`, 0; NonFinite -> one line naming the last good
        checkpoint, 1; Interrupted -> save, one line with the resume command, 130."""
        summary, status, message = None, DONE, None
        try:
            summary = train()
        except NonFinite as e:
            status, message = NONFINITE, (
                f"error: {e}; the last good checkpoint is kept in {self.checkpoint_path}. "
                f"Try a lower learning rate or another --seed.")
        except Interrupted as e:
            self.save()
            status = INTERRUPTED
            message = f"\ninterrupted {e}: checkpoint saved; {self.resume_hint()}"
        self._close_bar()
        if summary:
            self.log.summary({**summary, "cpu_s": self.cpu_s})
        self.log.finish()
        if message:
            print(message, file=sys.stderr)
        return status

    def resume_hint(self) -> str:
        """How to go on from the checkpoint: the --resume command, or for a script without
        resume where the weights are."""
        if not self.resumable:
            return (f"the weights trained so far are in {self.checkpoint_path}; {self.script} "
                    f"has no --resume (its runs are short): start it again with the same flags")
        return f"continue with\n  python {self.script} --resume {shlex.quote(self.out_dir)}"


def default_image_dir(out_dir):
    """The figure folder of run folder `out_dir` when --image_dir is not given: images/<name>
    for runs/<name> (the default run folders), else images/<name>-<first 8 hex digits of
    sha1(absolute path)>, one folder per run folder."""
    path = os.path.abspath(out_dir)
    name = os.path.basename(path)
    if os.path.dirname(path) == os.path.abspath("runs"):
        return os.path.join("images", name)
    return os.path.join("images", f"{name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}")


def _holds_run(path, figures):
    """Whether --overwrite may empty `path`: a run folder (config.json or checkpoint.pt in
    it), or for figures a folder of images and their metadata only."""
    names = set(os.listdir(path))
    if {"config.json", "checkpoint.pt"} & names:
        return True
    if not figures:
        return False
    allowed = (".png", ".gif", ".json", ".jpg", ".pdf", ".svg")
    return all(f.endswith(allowed) for _, _, files in os.walk(path) for f in files)


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

