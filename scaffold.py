"""The run scaffold every training script uses: `Run` holds the parts a trainer names (its
`Folder`, `checkpoint.RunCheckpoints`, `Loop`, `Signals`, `logger.RunLogger`); the conventions
are in docs/architecture.md, "The run scaffold"."""
import argparse
import hashlib
import math
import os
import shlex
import shutil
import signal
import sys
import time
import types
from contextlib import contextmanager, suppress
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
    """An entry script: its name, whether it resumes, the flags a resume may change (None:
    all) and the checkpoint entries it reads."""
    name: str
    resumable: bool = True
    overridable: tuple[str, ...] | None = None
    keys: tuple[str, ...] = ("step", "rng")


class NonFinite(Exception):
    """A non-finite loss or gradient: exit status 1 (`Run.execute`)."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM, seen at a boundary named by the message: exit status 130."""


def parse(parser, argv, script: Script):
    """(args, the --resume checkpoint or None), the output folders checked writable. A resumed
    run's args are its saved config (renamed flags under their new names) with the flags typed
    now on top, only `script.overridable` ones (None: all); a checkpoint of an older version
    (its config lacks a flag of `parser`, or it has no `cpu_s`) is refused naming migrate.py."""
    args, ckpt = config.parse(parser, argv), None
    if args.resume:
        if not script.resumable:
            config.fail(f"{script.name} has no --resume (its runs are short); start the run "
                        f"again with the same --seed")
        if args.overwrite:
            config.fail("--overwrite starts a run afresh and --resume continues one: pass one")
        path = args.resume if args.resume.endswith(".pt") else os.path.join(args.resume,
                                                                             "checkpoint.pt")
        def older(ckpt):  # what a checkpoint from before the current flags and clock lacks
            saved = {config.RENAMED.get(k, k) for k in ckpt["config"]}
            return [f"--{f}" for f in sorted(set(vars(args)) - saved)] + [
                "cpu_s"] * ("cpu_s" not in ckpt)

        try:
            ckpt = checkpoint.load_checkpoint(path, script=script.name, keys=script.keys,
                                              older=older)
        except (FileNotFoundError, checkpoint.CheckpointError) as e:
            config.fail(f"--resume: {e}")
        typed, allowed = config.given_flags(argv) - {"resume", "config"}, script.overridable
        fixed = sorted(typed - set(allowed)) if allowed is not None else []
        if fixed:
            config.fail(f"--resume continues the saved run; {', '.join('--' + f for f in fixed)}"
                        f" cannot change (only {', '.join('--' + f for f in allowed)} can); "
                        f"start a new run instead")
        saved = {config.RENAMED.get(k, k): v for k, v in ckpt["config"].items()}
        saved.update({k: getattr(args, k) for k in typed}, resume=args.resume,
                     out_dir=os.path.dirname(os.path.abspath(path)))
        args = argparse.Namespace(**saved)
    for folder in (args.out_dir or "runs", args.image_dir or "images"):
        check_writable(folder)  # before any work: data and models come after parse
    return args, ckpt


def device(args):
    """torch.device of --device, or a one-line error naming the devices this machine has."""
    try:
        return util.get_device(args.device)
    except ValueError as e:
        config.fail(str(e))


def check_writable(path):
    """Exit 2 in one line when `path` (or the folder it would be made in) is not writable."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        config.fail(f"{path}: {probe} is a file, not a folder; choose another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        config.fail(f"cannot write to {probe}; choose a writable folder")


class Folder:
    """The run's `out_dir` and `image_dir`, written back into `args` by `claim` (a resumed run
    reuses its own); `remove_created` removes the folders it made."""

    def __init__(self, args, resumable=True):
        self.args, self.resumable, self._created = args, resumable, []

    def claim(self, name_parts, resume=False):
        """A fresh run: --out_dir (or runs/<parts>-<time>) and its figure folder, claimed."""
        args = self.args
        if not resume:
            args.out_dir = self._claim(args.out_dir) if args.out_dir else self._unique(
                os.path.join("runs", run_name(*name_parts)), not args.image_dir)
        image_dir = args.image_dir or default_image_dir(args.out_dir)
        args.image_dir = self._mkdir(image_dir) if resume else self._claim(image_dir, True)

    def _claim(self, path, images=False):
        """An explicit folder; a used one only with --overwrite, and only if it holds a run
        (config.json or checkpoint.pt) or, for `images`, only images."""
        entries = os.listdir(path) if os.path.isdir(path) else []
        if entries and not self.args.overwrite:
            resume = f"continue it with --resume {shlex.quote(path)}, " if self.resumable \
                and not images else ""  # a figure folder is not a run to continue
            config.fail(f"{path} already holds files of another run; {resume}clear it with "
                        f"--overwrite, or choose another --out_dir/--image_dir")
        kinds = (".png", ".gif", ".json", ".jpg", ".pdf", ".svg")
        if entries and not ({"config.json", "checkpoint.pt"} & set(entries) or images and all(
                f.endswith(kinds) for _, _, files in os.walk(path) for f in files)):
            config.fail(f"--overwrite: {path} does not look like a run's folder (no config.json "
                        f"or checkpoint.pt{'; or files other than images' if images else ''}); "
                        f"refusing to empty it, choose another folder")
        for entry in (os.path.join(path, e) for e in entries):
            shutil.rmtree(entry) if os.path.isdir(entry) and not os.path.islink(entry) \
                else os.remove(entry)
        return self._mkdir(path)

    def _unique(self, base, with_images):
        """The first free of base, base-2, ..., claimed by an atomic mkdir."""
        self._mkdir(os.path.dirname(base))
        for path in (base if k == 1 else f"{base}-{k}" for k in range(1, 1000)):
            if not (with_images and os.path.exists(default_image_dir(path))):
                with suppress(FileExistsError):
                    os.mkdir(path)
                    self._created.append(path)
                    return path
        config.fail(f"no free run folder next to {base}; pass --out_dir")

    def _mkdir(self, path):
        """makedirs, remembering the highest folder it made (`remove_created`); returns path."""
        top = os.path.abspath(path)
        while not os.path.exists(os.path.dirname(top)):
            top = os.path.dirname(top)
        self._created += [top] * (not os.path.exists(top))
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:  # parse checked the folders are writable: a file in the way
            config.fail(f"cannot create {path} ({e.strerror}); choose another folder")
        return path

    def remove_created(self):
        for path in self._created:
            shutil.rmtree(path, ignore_errors=True)


def run_name(*parts):
    """The parts and a time stamp, e.g. fce-maf-8gaussians-s42-20260101-120000."""
    return "-".join(map(str, parts)) + time.strftime("-%Y%m%d-%H%M%S")


def default_image_dir(out_dir):
    """images/<name> for runs/<name>, else images/<name>-<sha1 of the absolute path, 8 hex>."""
    path = os.path.abspath(out_dir)
    name = os.path.basename(path)
    if os.path.dirname(path) == os.path.abspath("runs"):
        return os.path.join("images", name)
    return os.path.join("images", f"{name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}")


class Signals:
    """Inside `with`, Ctrl-C and SIGTERM set `stop_requested` (read at `boundary`); a second
    one raises KeyboardInterrupt."""

    stop_requested = False

    def __enter__(self):
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with suppress(ValueError):  # not the main thread: signals keep their default
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this iteration (again: stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def boundary(self, where: str) -> None:
        """Raise Interrupted(where) once Ctrl-C or SIGTERM came."""
        if self.stop_requested:
            raise Interrupted(where)


# tqdm's stream off a terminal: each refresh one plain line on stderr (no carriage returns)
_LINES = types.SimpleNamespace(write=lambda s: s.strip() and print(s.strip(), file=sys.stderr),
                               flush=lambda: sys.stderr.flush())


class Meter:
    """`Loop`'s clock and bar: `cpu_s`, the process CPU seconds spent inside `clock` blocks
    over all sessions; the tqdm bar (off a terminal a plain line every 30 s) with lines printed
    above it; the `rate` of the loop's `state["step"]`."""

    def __init__(self, name: str):
        self.name, self.bar, self._cpu, self._t0 = name, None, 0.0, None

    @property
    def cpu_s(self) -> float:
        return self._cpu + (time.process_time() - self._t0 if self._t0 is not None else 0.0)

    @contextmanager
    def clock(self) -> Iterator[None]:
        """Count the process CPU time spent inside the block in `cpu_s`."""
        self._t0 = time.process_time()
        try:
            yield
        finally:
            self._cpu, self._t0 = self.cpu_s, None

    def spent(self, budget: float | None, offset: float = 0.0) -> bool:
        """Whether a CPU budget (None: none) is spent: cpu_s + offset >= budget."""
        return bool(budget) and self.cpu_s + offset >= budget

    def start(self, total: int, done: int) -> None:
        """Open the bar at `done` of `total` iterations (once), and the rate's first interval."""
        if self.bar is None:
            tty = sys.stderr.isatty()
            self.bar = tqdm(total=total, initial=done, desc=self.name[:40 if tty else 30], **(
                dict(dynamic_ncols=True) if tty else dict(ncols=100, mininterval=30, ascii=True,
                                                          file=_LINES)))
            self._at = (time.perf_counter(), self.cpu_s, done)

    def rate(self) -> tuple[float, float]:
        """(iterations per second, CPU seconds per iteration) since the last call, the
        iteration under way counted as done."""
        now, (t, cpu, before), done = time.perf_counter(), self._at, self.state["step"]
        self._at, n = (now, self.cpu_s, done), max(done - before, 1)
        return n / max(now - t, 1e-9), (self.cpu_s - cpu) / n

    def print(self, line: str | None, postfix: dict | None = None) -> None:
        """A line printed above the bar, and values shown on the bar."""
        if line is not None:
            tqdm.write(line)
        if postfix and self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Loop(Meter):
    """`state` (`step`, what the trainer `track`s: checkpointed), iterations, sums, `check`."""

    def __init__(self, name: str, signals: Signals):
        super().__init__(name)
        self.signals, self.state, self._sums, self._per_epoch = signals, {"step": 0}, (), None

    def track(self, epochs: bool = False, sums: Iterable[str] = (), **entries: Any) -> dict:
        """Add `entries`, the epoch position (epoch, it, perm) and running sums (+ n_rows)."""
        self._sums, sums = tuple(sums), dict.fromkeys(sums, 0.0)
        self.state.update(entries, **sums, **(dict(n_rows=0) if sums else {}),
                          **(dict(epoch=0, it=0, perm=None) if epochs else {}))
        return self.state

    def iterations(self, stop: int, total=None, until=None) -> Iterator[int]:
        """step, ..., stop - 1, counted as each starts; ends at `until()` or a signal."""
        self.start(total or stop, self.state["step"])
        for i in range(self.state["step"], stop):
            if until is not None and until():
                return
            self.signals.boundary(f"at iteration {i}")
            self.state["step"] = i + 1
            with self.clock():
                yield i
            self.bar.update(1)

    def epochs(self, n_epochs, per_epoch, n_items, device, total=None, until=None) -> Iterator:
        """Epochs of `per_epoch` iterations over a fresh permutation of `n_items` (`rows`); one
        cut short goes on where it stopped."""
        self._per_epoch, s = per_epoch, self.state

        def epoch():
            if s["perm"] is None:
                s["perm"] = torch.randperm(n_items, device=device)
            for i in self.iterations(s["step"] - s["it"] + per_epoch, total, until):
                s["it"] += 1
                yield i
            if s["it"] == per_epoch:
                s.update(epoch=s["epoch"] + 1, it=0, perm=None)

        while s["epoch"] < n_epochs and not (until is not None and until()):
            yield epoch()

    def rows(self, step: int, size: int) -> torch.Tensor | None:
        """The permutation's `size` rows of iteration `step` of this epoch (None past its end)."""
        i = self.state["it"] + step - self.state["step"]
        return self.state["perm"][i * size:(i + 1) * size] if i < self._per_epoch else None

    def add(self, **values: Any) -> None:
        """Add one iteration's values (None: 0) to the running sums and count it."""
        for k, v in values.items():
            self.state[k] += float(v) if v is not None else 0.0
        self.state["n_rows"] += 1

    def means(self) -> dict:
        """The running sums over their count; they start again."""
        n = self.state["n_rows"]
        out = {k: self.state[k] / n for k in self._sums}
        self.state.update(dict.fromkeys(self._sums, 0.0), n_rows=0)
        return out

    def check(self, loss: Any, params: Iterable[torch.Tensor] = ()) -> None:
        """Raise NonFinite when `loss` (None: a failed step) or a gradient is not finite."""
        loss = loss.detach() if torch.is_tensor(loss) else loss
        if loss is None or not math.isfinite(float(loss)) or not all(
                torch.isfinite(p.grad).all() for p in params if p.grad is not None):
            raise NonFinite(f"non-finite loss or gradient at iteration {self.state['step'] - 1}")

    def load(self, ckpt: dict) -> None:
        """A checkpoint's state (tensors onto the state's devices) and `cpu_s`."""
        for key, old in self.state.items():
            new = ckpt.get(key, old)
            self.state[key] = new.to(old.device) if torch.is_tensor(new) and torch.is_tensor(
                old) else new
        self._cpu = float(ckpt["cpu_s"])


class Run:
    """One run: `folder`, `log`, `signals`, `loop`, `checkpoints`; `execute` ends it. Signal
    handlers live inside `with`; a start that fails before a checkpoint leaves no folders."""

    def __init__(self, args, script: Script | str, name_parts: Iterable[Any],
                 ckpt: dict | None = None):
        self.script = script if isinstance(script, Script) else Script(script)
        self.folder = Folder(args, self.script.resumable)
        try:
            self.folder.claim(name_parts, resume=ckpt is not None)
            self.out_dir, self.checkpoint_path = args.out_dir, os.path.join(args.out_dir,
                                                                            "checkpoint.pt")
            self.name = os.path.basename(os.path.normpath(args.out_dir))
            self.log = RunLogger(args.out_dir, dict(sorted(vars(args).items())), args.wandb,
                                 args.project, self.name, run_id=(ckpt or {}).get("wandb_id"),
                                 resume_step=None if ckpt is None else ckpt.get("step", 0))
        except BaseException:
            self.folder.remove_created()
            raise
        self.signals = Signals()
        self.loop = Loop(self.name, self.signals)
        self.checkpoints = checkpoint.RunCheckpoints(self.checkpoint_path, self.loop, lambda: {
            "script": self.script.name, "config": dict(sorted(vars(args).items())),
            "wandb_id": self.log.run_id}, resumed=ckpt)

    def __enter__(self):
        self.signals.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.signals.__exit__()
        self.loop.close()
        self.log.finish()
        if exc_type is not None and not self.checkpoints.saved:  # nothing worth keeping
            self.folder.remove_created()
        if exc_type is KeyboardInterrupt:  # the second Ctrl-C
            where = (f"the last checkpoint is kept; {self.resume_hint()}"
                     if self.checkpoints.saved else "no checkpoint was written")
            print(f"\nstopped at once: {where}", file=sys.stderr)
            raise SystemExit(INTERRUPTED)

    def execute(self, train: Callable[[], dict | None]) -> int:
        """Run `train`; its summary -> summary.json, 0; NonFinite 1; Interrupted 130."""
        summary, status, message = None, DONE, None
        try:
            summary = train()
        except NonFinite as e:
            status, message = NONFINITE, (f"error: {e}; the last good checkpoint is kept in "
                                          f"{self.checkpoint_path}. Try a lower learning rate "
                                          f"or another --seed.")
        except Interrupted as e:
            self.checkpoints.save()
            status, message = INTERRUPTED, f"\ninterrupted {e}: checkpoint saved; " + \
                self.resume_hint()
        self.loop.close()
        if summary:
            self.log.summary({**summary, "cpu_s": self.loop.cpu_s})
        if message:
            print(message, file=sys.stderr)
        return status

    def resume_hint(self) -> str:
        """The --resume command, or where the weights are."""
        if self.script.resumable:
            return (f"continue with\n  python {self.script.name} --resume "
                    f"{shlex.quote(self.out_dir)}")
        return (f"the weights trained so far are in {self.checkpoint_path}; {self.script.name} "
                f"has no --resume (its runs are short): start it again with the same flags")
