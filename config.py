"""Command-line flags shared by every entry script, and `--config FILE`.

A config file is JSON whose keys are flag names (`{"dataset": "rings", "epoch": 50}`). Its
entries become argv words put before the command line (`--epoch=50`, a list `--hidden 64 64`
or `--hidden=32,64`, a boolean `--flag=true`), so argparse itself types and checks them and
explicit flags win. Unknown keys and bad values: one line naming the key and file, exit 2.

    parser = config.parser("FCE / NCE on 2D toy data")
    parser.add_argument("--batch", type=config.positive_int, default=1000)
    args = config.parse(parser, argv)
"""
import argparse
import json
import os
import sys
import time

RENAMED = {}  # old flag name -> new one, filled by `rename` (saved configs, given_flags)


def cli(main):
    """`sys.exit(config.cli(main))`: main's exit status; Ctrl-C outside a run's loop (loading
    data, sampling, reporting) ends with one line and status 130, not a traceback."""
    try:
        return main()
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{os.path.basename(sys.argv[0])}: interrupted\n")
        return 130


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message):
        fail(f"{message} (see --help)", self.prog)


def fail(message, prog=None):
    """Stop with a one-line error and exit status 2 (bad input, not a bug)."""
    prog = prog or os.path.basename(sys.argv[0])
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(2)


def _checked(cast, ok, expected):
    """A flag type: `cast` the text, then require `ok(value)`; errors say `expected`."""
    def parse(s):
        try:
            v = cast(s)
        except (TypeError, ValueError):
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
        return v
    parse.expected = expected
    return parse


SEED_MAX = 2 ** 32 - 1  # NumPy's legacy seed range, the narrowest of Python, NumPy and torch
INF = float("inf")
positive_int = _checked(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
seed = _checked(int, lambda v: 0 <= v <= SEED_MAX, f"a seed in [0, {SEED_MAX}]")
positive_float = _checked(float, lambda v: 0 < v < INF, "a positive number")
nonnegative_float = _checked(float, lambda v: 0 <= v < INF, "a number >= 0")
unit_interval = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
open_unit = _checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")  # e.g. the threshold
decay = _checked(float, lambda v: 0 < v <= 1, "a decay in (0, 1] (1: no decay)")  # per iteration
# true/false, yes/no, on/off, 1/0 in any case (a wandb agent passes --flag=True/False)
WORDS = {**dict.fromkeys(("true", "yes", "y", "on", "1"), True),
         **dict.fromkeys(("false", "no", "n", "off", "0"), False)}
boolean = _checked(lambda s: WORDS.get(str(s).strip().lower()), lambda v: True, "true or false")


def add_flag(parser_, name, default=False, help=None):
    """A boolean flag as a person or a sweep agent writes it (store_true rejects `--x=True`):
    `--name`, `--name=true|false|1|0`, `--name false`, `--no-name`. E.g.
    `config.add_flag(p, "--maf_bn", help="BatchNorm between MAF blocks")`."""
    off = f"off: --no-{name[2:]}"
    action = parser_.add_argument(name, nargs="?", const=True, type=boolean, default=default,
                                  metavar="{true,false}", help=f"{help} ({off})" if help else off)
    parser_.add_argument(f"--no-{name[2:]}", dest=action.dest, action="store_const", const=False,
                         default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return action


class _Renamed(argparse.Action):
    """A renamed flag's old name: a note on stderr, then the new flag's action."""

    def __init__(self, option_strings, dest, new=None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser_, namespace, values, option_string=None):
        sys.stderr.write(f"{option_string} is deprecated, use {self.new.option_strings[0]}\n")
        self.new(parser_, namespace, values, option_string)


def rename(parser_, old, new):
    """Keep flag `old` working for one release as the declared `new`, with a one-line note on
    stderr; saved configs and JSON files that use it are read as `new` (`resumed_args`), and
    `python migrate.py runs/<run>` rewrites old runs. One vocabulary: a name means one thing
    in every script. `--dataset` names the data (train_tilt.py's `--data`); `--steps` counts a
    loop's iterations, the `step` of the scaffold, checkpoints and metrics rows: optimiser
    steps in train_vi.py and train_mcmc.py (its `--n_iter`), as in train.py's `--max_steps` and
    train_tilt.py's `--tilt_steps`; sample_mcmc.py has no optimiser, its step is one sampler
    transition (train.py's `--epoch` counts epochs: a name of its own)."""
    a = parser_._option_string_actions[new]
    parser_.add_argument(old, dest=a.dest, action=_Renamed, new=a, nargs=a.nargs, const=a.const,
                         type=a.type, choices=a.choices, default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
    RENAMED[old[2:]] = new[2:]


def parser(description):
    """A Parser with the flags every script shares: --config, --seed, --device, --wandb,
    --project, --out_dir, --image_dir, --resume, --overwrite, --threads."""
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="JSON file whose keys are flag names; explicit flags win")
    p.add_argument("--seed", type=seed, default=42, help="fixes data, initialisation, sampling")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    p.add_argument("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"],
                   help="auto: online when logged in, else offline (sync later)")
    p.add_argument("--project", default="ebm-flows", help="wandb project")
    p.add_argument("--out_dir", help="run folder: config, metrics, checkpoint (runs/<name>)")
    p.add_argument("--image_dir", help="the run's figure folder (default images/<run folder name>)")
    p.add_argument("--resume", help="run folder (or its checkpoint.pt) to continue")
    add_flag(p, "--overwrite", help="reuse an existing --out_dir: delete the old run's files "
                                    "first (without it a used folder is refused)")
    p.add_argument("--threads", type=nonnegative_int, default=1,
                   help="torch CPU threads (0: torch's default). The networks here are small, "
                        "so one thread is fastest and does not oversubscribe a shared CPU")
    return p


def _words(parser_, action, key, value):
    """The argv words of one config entry, typed and checked by argparse (`_get_values`); an
    argparse.ArgumentError if bad. JSON types must fit the flag: null only where its default
    is None (no words), a list only for a flag of several values (or of one comma-separated
    word), true/false only for a boolean flag."""
    many = action.nargs not in (None, "?")
    listy = isinstance(value, list) and (many or isinstance(action.default, (list, tuple)))
    values = value if listy else [value]
    if value is None:
        if action.default is None:
            return []
        raise argparse.ArgumentError(None, "null is not a value; give one or drop the key")
    def fits(v):  # a JSON scalar of the flag's kind
        return not (v is None or isinstance(v, (list, dict))
                    or isinstance(v, bool) and action.type is not boolean)

    if (many and not (listy and value)) or not all(map(fits, values)):
        what = "a non-empty list" if many else getattr(action.type, "expected", "a string")
        raise argparse.ArgumentError(None, f"expected {what}, got "
                                     f"{'the list ' * isinstance(value, list)}{json.dumps(value)}")
    words = [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
    words = words if many else [",".join(words)]
    parser_._get_values(action, words)
    return [f"--{key}", *words] if many else [f"--{key}={words[0]}"]


def config_argv(path, parser_):
    """The argv words of JSON config `path`, each entry checked here (a known flag, a value
    that argparse accepts) so that an error names the key and the file. A run's saved
    config.json names the file it was made from: its values are in it, so that key is dropped."""
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except FileNotFoundError:
        fail(f"config file {path!r} not found; pass an existing JSON file to --config")
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError: ValueErrors
        fail(f"config file {path!r} is not readable UTF-8 JSON ({e}); fix or re-save it")
    if not isinstance(cfg, dict):
        fail(f"config file {path!r} must hold a JSON object of flag names")
    cfg.pop("config", None)
    flags = parser_._option_string_actions
    unknown = sorted(k for k in cfg if k == "help" or flags.get(f"--{k}") is None
                     or flags[f"--{k}"].dest != RENAMED.get(k, k))
    if unknown:
        known = ", ".join(sorted({a.dest for a in flags.values()} - {"help", "config"}))
        fail(f"unknown key(s) {', '.join(unknown)} in {path}; valid keys are the flag names: "
             f"{known}")
    argv = []
    for key, value in cfg.items():
        try:
            argv += _words(parser_, flags[f"--{key}"], key, value)
        except argparse.ArgumentError as e:
            fail(f"{path}: key {key!r}: {e.message}")
    return argv


def parse(parser_, argv=None):
    """Parse argv, after the words of an optional --config file (explicit flags win). Under a
    wandb sweep agent a run without --out_dir goes to `agent_out_dir`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    args = parser_.parse_args((config_argv(known.config, parser_) if known.config else []) + argv)
    if getattr(args, "out_dir", "") is None and not getattr(args, "resume", None):
        args.out_dir = agent_out_dir()
    return args


def agent_out_dir():
    """runs/sweep-<sweep id>/<run id> for a run started by a wandb sweep agent (it sets
    WANDB_SWEEP_ID and WANDB_RUN_ID), else None: the run id never collides, where default
    names (a time stamp, train_mcmc.py's --name) would for two agents on one machine."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    return os.path.join("runs", f"sweep-{sweep}", run) if sweep and run else None


def given_flags(argv=None):
    """Names of the flags typed on the command line (not defaults, not --config values), a
    renamed flag under its new name."""
    argv = sys.argv[1:] if argv is None else argv
    names = {a.split("=")[0][2:] for a in argv if a.startswith("--")}
    names = {n[3:] if n.startswith("no-") else n for n in names}  # --no-flag of add_flag
    return {RENAMED.get(n, n) for n in names}


def resumed_args(args, ckpt, path, argv=None, overridable=None):
    """A resumed run's configuration: the one saved in its checkpoint (renamed flags under their
    new names) with the `overridable` flags (None: all) typed now on top, out_dir the
    checkpoint's folder. One line, exit 2, for a typed flag a resume cannot change (it would
    be ignored) and for a saved config without a flag of this parser (migrate.py fills it)."""
    typed = given_flags(argv) - {"resume", "config"}
    if overridable is not None:
        fixed = sorted(typed - set(overridable))
        if fixed:
            fail(f"--resume continues the saved run; {', '.join('--' + f for f in fixed)} "
                 f"cannot change (only {', '.join('--' + f for f in overridable)} can); "
                 f"start a new run instead")
    saved = {RENAMED.get(k, k): v for k, v in ckpt["config"].items()}
    run_dir = os.path.dirname(os.path.abspath(path))
    missing = sorted(set(vars(args)) - set(saved))
    if missing:
        fail(f"--resume: {path} was saved before {', '.join('--' + f for f in missing)} "
             f"existed; update it with `python migrate.py {run_dir}`")
    for k in typed:
        saved[k] = getattr(args, k)
    saved["resume"] = args.resume
    saved["out_dir"] = run_dir
    return argparse.Namespace(**saved)


def run_name(*parts):
    """A default run name: the given parts and a timestamp, e.g. fce-maf-8gaussians-s42-<time>."""
    return "-".join(str(p) for p in parts) + time.strftime("-%Y%m%d-%H%M%S")


def to_dict(args):
    """The resolved configuration as a JSON-ready dict."""
    return dict(sorted(vars(args).items()))
