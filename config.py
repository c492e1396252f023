"""The flags every entry script shares, one-line errors, and `--config FILE`: JSON entries
become argv words that argparse types (docs/architecture.md, "The run scaffold")."""
import argparse
import json
import os
import sys

RENAMED = {}  # old flag name -> new one, filled by `rename` (saved configs, given_flags)


def cli(main):
    """`sys.exit(config.cli(main))`: Ctrl-C outside a run's loop is one line, status 130."""
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
    sys.stderr.write(f"{prog or os.path.basename(sys.argv[0])}: error: {message}\n")
    sys.exit(2)


def checked(cast, ok, expected):
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
positive_int = checked(int, lambda v: v > 0, "a positive integer")
nonnegative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
seed = checked(int, lambda v: 0 <= v <= SEED_MAX, f"a seed in [0, {SEED_MAX}]")
positive_float = checked(float, lambda v: 0 < v < INF, "a positive number")
nonnegative_float = checked(float, lambda v: 0 <= v < INF, "a number >= 0")
unit_interval = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
open_unit = checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")
# true/false, yes/no, on/off, 1/0 in any case (a wandb agent passes --flag=True/False)
WORDS = {**dict.fromkeys(("true", "yes", "y", "on", "1"), True),
         **dict.fromkeys(("false", "no", "n", "off", "0"), False)}
boolean = checked(lambda s: WORDS.get(str(s).strip().lower()), lambda v: True, "true or false")


def add_flag(parser_, name, default=False, help=None):
    """A boolean flag: `--name`, `--name=true|false|1|0` (a sweep agent), `--no-name`."""
    off = f"off: --no-{name[2:]}"
    action = parser_.add_argument(name, nargs="?", const=True, type=boolean, default=default,
                                  metavar="{true,false}", help=f"{help} ({off})" if help else off)
    parser_.add_argument(f"--no-{name[2:]}", dest=action.dest, action="store_const", const=False,
                         default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return action


def rename(parser_, old, new):
    """Keep flag `old` working for one release as `new` (saved configs too), with a note."""
    parser_._option_string_actions[old] = parser_._option_string_actions[new]
    RENAMED[old[2:]] = new[2:]


def parser(description):
    """A Parser with the flags every script shares."""
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
    add_flag(p, "--overwrite", help="empty a used --out_dir first (else it is refused)")
    p.add_argument("--threads", type=nonnegative_int, default=1,
                   help="torch CPU threads (0: torch's default); one is fastest for small nets")
    return p


def config_argv(path, parser_):
    """The argv words of JSON config `path`, each checked by argparse: null only for a default
    of None, a list only for several values, a bool only for add_flag; a bad key or value is
    one line naming itself and the file."""
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
        action, listy = flags[f"--{key}"], isinstance(value, list)
        if value is None and action.default is None:
            continue  # null: the flag's default
        many = action.nargs not in (None, "?")
        values = value if listy and (many or isinstance(action.default, (list, tuple))) else [value]
        words = [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
        if many and not (listy and value) or not all(isinstance(v, (str, int, float)) and (
                action.type is boolean or not isinstance(v, bool)) for v in values):
            what = "a non-empty list" if many else getattr(action.type, "expected", "a string")
            fail(f"{path}: key {key!r}: expected {what}, got {'the list ' * listy}"
                 f"{json.dumps(value)}")
        try:  # argparse types and checks the words as it would on the command line
            parser_._get_values(action, words if many else [",".join(words)])
        except argparse.ArgumentError as e:
            fail(f"{path}: key {key!r}: {e.message}")
        argv += [f"--{key}", *words] if many else [f"--{key}={','.join(words)}"]
    return argv


def parse(parser_, argv=None):
    """Parse --config's words, then argv; under a sweep agent out_dir is runs/sweep-<id>/<run>."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    words = (config_argv(known.config, parser_) if known.config else []) + argv
    for old in {w.split("=")[0] for w in words} & set(parser_._option_string_actions):
        if old[2:] in RENAMED:
            sys.stderr.write(f"{old} is deprecated, use --{RENAMED[old[2:]]}\n")
    args = parser_.parse_args(words)
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if getattr(args, "out_dir", "") is None and not getattr(args, "resume", None) and sweep and run:
        args.out_dir = os.path.join("runs", f"sweep-{sweep}", run)
    return args


def given_flags(argv=None):
    """Names of the flags typed on the command line, a renamed flag under its new name."""
    argv = sys.argv[1:] if argv is None else argv
    names = {a.split("=")[0][2:] for a in argv if a.startswith("--")}
    return {RENAMED.get(n, n) for n in (n[3:] if n.startswith("no-") else n for n in names)}
