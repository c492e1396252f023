"""Training curves of FCE / NCE / MLE runs from their metrics.jsonl, without wandb.

    python curves.py runs/<run>                       # writes runs/<run>/curves.png
    python curves.py runs/a runs/b -o compare.png     # several runs overlaid

Panels (plots.training_curves): -V against its optimum log 4 (or a flow's training NLL),
accuracy and the running flow-step fraction against the threshold, KL(p_data || model) of the
EBM and the flow (test NLL when the density is unknown), and c - log Z. train.py draws
runs/<run>/curves.png at its last evaluation (and at others a minute apart); this command
draws the same figure for any run.
"""
import json
import os
import sys

import config
import plots
from logger import read_metrics


def load(run_dir):
    """(rows, threshold) of a run folder; a one-line error (exit 2) if it is not a run."""
    if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        config.fail(f"{run_dir!r} has no metrics.jsonl; pass a run folder (runs/<name>)")
    threshold = None
    cfg_path = os.path.join(run_dir, "config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path) as fh:
                cfg = json.load(fh)
            if (cfg.get("estimator") == "fce" and cfg.get("flow") != "gaussian"
                    and cfg.get("rule") == "threshold"):  # train.py's threshold rule
                threshold = cfg.get("threshold")
        except ValueError:
            pass
    try:
        return read_metrics(run_dir), threshold
    except ValueError as e:
        config.fail(f"{run_dir}/metrics.jsonl is not JSON lines ({e})")


def build_parser():
    p = config.Parser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("-o", "--out", default=None,
                   help="figure path (default: <run>/curves.png for one run, curves.png else)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    runs = {os.path.basename(os.path.normpath(r)): load(r) for r in args.runs}
    out = args.out or (os.path.join(args.runs[0], "curves.png") if len(args.runs) == 1
                       else "curves.png")
    print(f"wrote {plots.training_curves(out, runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(config.cli(main))
