"""Command-line flags shared by every entry script, and `--config FILE`.

A config file is JSON whose keys are flag names (`{"dataset": "rings", "epoch": 50}`); its
values become the defaults and explicit flags still win. Unknown keys and invalid values end
the program with a one-line error that names the fix and exit status 2, never a traceback.

    parser = config.parser("FCE / NCE on 2D toy data")
    parser.add_argument("--batch", type=config.positive_int, default=1000)
    args = config.parse(parser, argv)
"""
import argparse
import json
import os
import sys
import time


def cli(main):
    """Run an entry script's `main` and return its exit status; Ctrl-C outside a run's loop
    (while loading data, sampling, reporting) ends with one line and status 130, not a
    traceback. Use: `sys.exit(config.cli(main))`."""
    try:
        return main()
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{os.path.basename(sys.argv[0])}: interrupted\n")
        return 130


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def fail(message, prog=None):
    """Stop with a one-line error and exit status 2 (bad input, not a bug)."""
    prog = prog or os.path.basename(sys.argv[0])
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(2)


def _number(cast, ok, expected):
    """A flag type: `cast` the text, then require `ok(value)`; errors say `expected`."""
    def parse(s):
        try:
            v = cast(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
        return v
    parse.expected = expected
    return parse


SEED_MAX = 2 ** 32 - 1  # NumPy's legacy seed range, the narrowest of Python, NumPy and torch
INF = float("inf")
positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
seed = _number(int, lambda v: 0 <= v <= SEED_MAX, f"a seed in [0, {SEED_MAX}]")
positive_float = _number(float, lambda v: 0 < v < INF, "a positive number")
nonnegative_float = _number(float, lambda v: 0 <= v < INF, "a number >= 0")
unit_interval = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
open_unit = _number(float, lambda v: 0 < v < 1, "a number in (0, 1)")  # e.g. the threshold
decay = _number(float, lambda v: 0 < v <= 1, "a decay in (0, 1] (1: no decay)")  # per iteration


def boolean(s):
    """A boolean flag value: true/false, yes/no, on/off, 1/0 in any case (a wandb agent passes
    `--flag=True` / `--flag=False`)."""
    if isinstance(s, bool):
        return s
    v = str(s).strip().lower()
    if v in ("true", "1", "yes", "y", "on"):
        return True
    if v in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


class Flag(argparse.Action):
    """A boolean flag in the forms a person or a sweep agent writes it: `--flag` (true),
    `--flag=true|false|1|0` or `--flag false`; `config.add_flag` adds `--no-flag` (false)."""

    def __init__(self, option_strings, dest, default=False, help=None, **kwargs):
        super().__init__(option_strings, dest, nargs="?", const=None, type=boolean,
                         default=default, metavar="{true,false}", help=help)

    def __call__(self, parser_, namespace, values, option_string=None):
        setattr(namespace, self.dest, True if values is None else values)


class _NoFlag(argparse.Action):
    """`--no-flag`: sets the flag false (hidden from --help; takes no value)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)

    def __call__(self, parser_, namespace, values, option_string=None):
        setattr(namespace, self.dest, False)


def add_flag(parser_, name, default=False, help=None):
    """A boolean flag `--name` (and `--no-name`) that also takes `--name=True/False`, which
    store_true and BooleanOptionalAction reject:

        config.add_flag(p, "--maf_bn", help="BatchNorm between MAF blocks")"""
    off = f"off: --no-{name[2:]}"
    action = parser_.add_argument(name, action=Flag, default=default,
                                  help=f"{help} ({off})" if help else off)
    parser_.add_argument(f"--no-{name[2:]}", dest=action.dest, action=_NoFlag)
    return action


def parser(description):
    """A Parser with the flags every script shares: --config, --seed, --device, --wandb,
    --project, --out_dir, --image_dir, --resume, --overwrite, --threads."""
    p = Parser(description=description,
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help="JSON file whose keys are flag names; explicit flags override it")
    p.add_argument("--seed", type=seed, default=42, help="fixes data, initialisation, sampling")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    p.add_argument("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"],
                   help="auto: online when logged in, else offline (sync later)")
    p.add_argument("--project", default="ebm-flows", help="wandb project")
    p.add_argument("--out_dir", default=None,
                   help="run directory (config, metrics, checkpoint); default runs/<run name>")
    p.add_argument("--image_dir", default=None,
                   help="the run's figure folder (default images/<run folder name>)")
    p.add_argument("--resume", default=None,
                   help="run directory (or its checkpoint.pt) to continue from")
    add_flag(p, "--overwrite", help="reuse an existing --out_dir: delete the old run's files "
                                    "first (without it a used folder is refused)")
    p.add_argument("--threads", type=nonnegative_int, default=1,
                   help="torch CPU threads (0: torch's default). The networks here are small, "
                        "so one thread is fastest and does not oversubscribe a shared CPU")
    return p


def check_memory(sizes):
    """Fail with one line when the arrays a run would allocate cannot fit in physical memory
    (not checked where the OS does not say): `sizes` maps a flag ("--samples") to the bytes
    its value asks for."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return
    need = sum(sizes.values())
    if need > total:
        flag = max(sizes, key=sizes.get)
        fail(f"{flag} asks for {need / 2 ** 30:.1f} GiB but this machine has "
             f"{total / 2 ** 30:.1f} GiB of memory; lower {flag}")


def apply_threads(args):
    """torch.set_num_threads(--threads) unless it is 0 (torch's default)."""
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)


def _convert(action, value, source):
    """Apply a flag's type and choices to a value read from a config file. JSON types must
    match the flag: `null` only where the flag's default is None, a list only for a flag that
    takes several values (or whose default is a sequence), true/false only for a boolean flag
    (a string such as "no" goes through the flag's own parser)."""
    key = f"{source}: key {action.dest!r}"
    boolean_flag = isinstance(action, Flag)
    sequence = action.nargs not in (None, "?") or isinstance(action.default, (list, tuple))

    def one(v):
        if v is None:
            if action.default is not None:
                raise SystemExit(f"{key}: null is not a value; give one or drop the key")
            return v
        if isinstance(v, (list, dict)):
            raise SystemExit(f"{key}: expected one value, got {json.dumps(v)}")
        if isinstance(v, bool) and not boolean_flag:
            raise SystemExit(f"{key}: expected {_kind(action)}, got {json.dumps(v)}")
        if action.type is not None and not isinstance(v, bool):
            try:
                v = action.type(v if isinstance(v, str) else str(v))
            except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                raise SystemExit(f"{key}: {e}")
        elif action.type is None and not isinstance(v, str):
            raise SystemExit(f"{key}: expected a string, got {json.dumps(v)}")
        if action.choices is not None and v not in action.choices:
            raise SystemExit(f"{key}: {v!r} is not one of "
                             f"{', '.join(map(str, action.choices))}")
        return v

    if isinstance(value, list):
        if not sequence:
            raise SystemExit(f"{key}: expected one value, got the list {json.dumps(value)}")
        if action.nargs in (None, "?"):  # a sequence-valued one-word flag (--hidden 32,64)
            return one(",".join(map(str, value)))
        if not value and action.nargs == "+":
            raise SystemExit(f"{key}: the list is empty; give at least one value")
        return [one(v) for v in value]
    if action.nargs not in (None, "?") and value is not None:
        raise SystemExit(f"{key}: expected a list, got {json.dumps(value)}; write [{json.dumps(value)}]")
    return one(value)


def _kind(action):
    """What a flag's type expects, in words."""
    return {int: "an integer", float: "a number"}.get(
        action.type, getattr(action.type, "expected", "a string"))


def load_config_file(path, parser_):
    """Read a JSON config and check it against the parser: unknown keys are an error."""
    if not os.path.isfile(path):
        fail(f"config file {path!r} not found; pass an existing JSON file to --config")
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except UnicodeDecodeError:
        fail(f"config file {path!r} is not UTF-8 text; save it as UTF-8 JSON")
    except json.JSONDecodeError as e:
        fail(f"config file {path!r} is not valid JSON ({e})")
    except OSError as e:
        fail(f"config file {path!r} cannot be read ({e.strerror})")
    if not isinstance(cfg, dict):
        fail(f"config file {path!r} must hold a JSON object of flag names")
    # a run's saved config.json names the file it was made from: its values are already in
    # it, so the key is dropped and a saved configuration works as --config (sweep runs)
    cfg.pop("config", None)
    actions = {a.dest: a for a in reversed(parser_._actions)  # first declared wins (--no-x)
               if a.dest not in ("help", "config")}
    unknown = sorted(set(cfg) - set(actions))
    if unknown:
        fail(f"unknown key(s) {', '.join(unknown)} in {path}; valid keys are the flag names: "
             f"{', '.join(sorted(actions))}")
    try:
        return {k: _convert(actions[k], v, path) for k, v in cfg.items()}
    except SystemExit as e:
        fail(str(e))


def parse(parser_, argv=None):
    """Parse argv with an optional --config file supplying defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser_.set_defaults(**load_config_file(known.config, parser_))
    args = parser_.parse_args(argv)
    if getattr(args, "out_dir", "") is None and not getattr(args, "resume", None):
        args.out_dir = agent_out_dir()
    return args


def agent_out_dir():
    """runs/sweep-<sweep id>/<run id> for a run started by a wandb sweep agent (which sets
    WANDB_SWEEP_ID and WANDB_RUN_ID), else None. The scripts' default folder names end in a
    time stamp to the second, or (train_mcmc.py with a --config) in none at all: two agents
    on one machine would write into the same folder; the run id cannot collide, and
    `python gather.py runs/sweep-<id>` collects one sweep."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep and run:
        return os.path.join("runs", f"sweep-{sweep}", run)
    return None


def given_flags(argv=None):
    """Names of the flags typed on the command line (not defaults, not --config values)."""
    argv = sys.argv[1:] if argv is None else argv
    names = {a.split("=")[0][2:] for a in argv if a.startswith("--")}
    return {n[3:] if n.startswith("no-") else n for n in names}  # --no-flag of config.add_flag


def resumed_args(args, ckpt, path, argv=None, overridable=None):
    """The configuration of a resumed run: the one saved in its checkpoint, with the
    `overridable` flags (all, when None) that were typed on this command line on top; a typed
    flag that a resume cannot change is an error (it would silently be ignored). out_dir is
    the checkpoint's folder."""
    typed = given_flags(argv) - {"resume", "config"}
    if overridable is not None:
        fixed = sorted(typed - set(overridable))
        if fixed:
            fail(f"--resume continues the saved run; {', '.join('--' + f for f in fixed)} "
                 f"cannot change (only {', '.join('--' + f for f in overridable)} can); "
                 f"start a new run instead")
    saved = dict(ckpt["config"])
    for k in typed:
        saved[k] = getattr(args, k)
    saved["resume"] = args.resume
    saved["out_dir"] = os.path.dirname(os.path.abspath(path))
    saved.setdefault("overwrite", False)
    return argparse.Namespace(**saved)


def run_name(*parts):
    """A default run name: the given parts and a timestamp, e.g. fce-maf-8gaussians-s42-<time>."""
    return "-".join(str(p) for p in parts) + time.strftime("-%Y%m%d-%H%M%S")


def to_dict(args):
    """The resolved configuration as a JSON-ready dict."""
    return {k: v for k, v in sorted(vars(args).items())}
