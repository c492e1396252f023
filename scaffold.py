"""The run scaffold every training script uses: folders, logger, checkpoint, Ctrl-C, exit codes.

    args, ckpt = scaffold.parse(parser, argv, "train.py", overridable=("epoch", ...))
    device = scaffold.device(args)
    ...                                         # data and models: bad input fails here,
    with scaffold.Run(args, "train.py", ("fce", "maf", "8gaussians", "s42"), ckpt) as run:
        run.save(state)                         # before the first iteration
        while step < n and not run.stop_requested:   # Ctrl-C: stop at an iteration boundary
            ...; run.log.log(row, step)
        if run.stop_requested:
            run.save(state); return run.interrupted(f"at iteration {step}")   # status 130
        if not finite: return run.nonfinite("loss is nan ...")   # exit status 1
        return run.done()                                        # exit status 0

The conventions, the same for every script:
- the run folder is `--out_dir`, default runs/<name>-<time>; its figures go to `--image_dir`,
  default images/<run folder name>. Two runs started in the same second get different folders
  (the folder is created atomically, a suffix -2, -3, ... is added). A folder that already
  holds files is refused unless the run resumes (`--resume`) or `--overwrite` clears it.
- a folder that cannot be written, a device this machine lacks and a bad or foreign
  checkpoint are one-line errors with exit status 2, before any work; a start that fails
  after the folders were made removes them again.
- checkpoints are written atomically and carry the script's name, the resolved config, every
  RNG state and the wandb run id; Ctrl-C sets a flag that the loop reads between iterations
  (a second Ctrl-C stops at once, keeping the last checkpoint).
- exit status: 0 done, 1 non-finite loss (the last good checkpoint is kept), 2 bad input
  (`config.fail`), 130 interrupted.

Benchmarks start these scripts through bench/runs.py.
"""
import os
import shlex
import shutil
import signal
import sys

import checkpoint
import config
import util
from logger import RunLogger

DONE, NONFINITE, BAD_INPUT, INTERRUPTED = 0, 1, 2, 130


def parse(parser, argv, script, overridable=None, resumable=True, keys=("step", "rng")):
    """Parse the command line (and --config); for --resume, load and check the checkpoint
    (written by `script`, holding the entries `keys` the script reads) and return the run's
    saved configuration with the `overridable` flags typed now on top. A script whose runs
    are short says `resumable=False`: --resume is then refused.
    Returns (args, checkpoint or None)."""
    args = config.parse(parser, argv)
    for folder in (args.out_dir or "runs", getattr(args, "image_dir", None) or "images"):
        Run._writable(folder)  # before any work: data and models come after parse
    if not args.resume:
        return args, None
    if not resumable:
        config.fail(f"{script} has no --resume (its runs are short); start the run again with "
                    f"the same --seed")
    if getattr(args, "overwrite", False):
        config.fail("--overwrite starts a run afresh and --resume continues one: pass one")
    path = args.resume if args.resume.endswith(".pt") else os.path.join(args.resume,
                                                                         "checkpoint.pt")
    try:
        ckpt = checkpoint.load_checkpoint(path, script=script, keys=keys)
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        config.fail(f"--resume: {e}")
    return config.resumed_args(args, ckpt, path, argv, overridable), ckpt


def device(args):
    """torch.device of --device, or a one-line error naming the devices this machine has."""
    try:
        return util.get_device(args.device)
    except ValueError as e:
        config.fail(str(e))


class Run:
    """One run's folders, logger (`run.log`, a RunLogger), checkpoint and exit codes.

    Use it as a context manager around the training: a start that fails inside it (bad input
    found late, an exception) removes the folders it created, and the Ctrl-C handler is
    installed only inside it."""

    def __init__(self, args, script, name_parts, ckpt=None, figures=True, resumable=True):
        self.args, self.script, self.ckpt, self.resumable = args, script, ckpt, resumable
        self.stop_requested = False
        self._created, self._saved, self._old_handler = [], ckpt is not None, None
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
            self.image_dir = self._claim(explicit_image or os.path.join(
                "images", os.path.basename(os.path.normpath(self.out_dir))), figures=True)

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
            image = os.path.join("images", os.path.basename(path))
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

    # -- context: Ctrl-C and failed starts --------------------------------------------------
    def __enter__(self):
        try:
            self._old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: Ctrl-C keeps its default behaviour
            self._old_handler = None
        return self

    def _on_sigint(self, signum, frame):
        if self.stop_requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        print("\nCtrl-C: stopping after this iteration (press again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, exc_type, exc, tb):
        if self._old_handler is not None:
            signal.signal(signal.SIGINT, self._old_handler)
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

    # -- checkpoints and endings ---------------------------------------------------------------
    def save(self, state):
        """Write `state` (tensors and plain types) atomically to <out_dir>/checkpoint.pt, with
        the script's name, the resolved config, every RNG state and the wandb run id."""
        checkpoint.save_checkpoint(self.checkpoint_path, {
            **state, "script": self.script, "config": config.to_dict(self.args),
            "rng": util.rng_state(), "wandb_id": self.log.run_id})
        self._saved = True

    def resume_hint(self):
        """How to go on from the checkpoint: the --resume command, or for a script without
        resume where the weights are."""
        if not self.resumable:
            return (f"the weights trained so far are in {self.checkpoint_path}; {self.script} "
                    f"has no --resume (its runs are short): start it again with the same flags")
        return f"continue with\n  python {self.script} --resume {shlex.quote(self.out_dir)}"

    def interrupted(self, where):
        """After Ctrl-C (the caller has saved): where it stopped ("at iteration 7"), the
        resume command; exit status 130."""
        self.log.finish()
        print(f"\ninterrupted {where}: checkpoint saved; {self.resume_hint()}",
              file=sys.stderr)
        return INTERRUPTED

    def nonfinite(self, message):
        """A non-finite loss or gradient: the message, where the last good checkpoint is;
        exit status 1."""
        self.log.finish()
        print(f"error: {message}; the last good checkpoint is kept in {self.checkpoint_path}. "
              f"Try a lower learning rate or another --seed.", file=sys.stderr)
        return NONFINITE

    def done(self, summary=None):
        """Write summary.json (when given), close the logger; exit status 0."""
        if summary:
            self.log.summary(summary)
        self.log.finish()
        return DONE


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


def gif_hint(folder):
    """The command that turns a folder of frames into a gif."""
    return f"python images/create_gif.py {shlex.quote(folder)}"

