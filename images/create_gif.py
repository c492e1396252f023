"""Turn the per-epoch figures of a run into a looping gif.

    python images/create_gif.py images/<run>            # writes images/<run>.gif
    python images/create_gif.py images/<run> --fps 8 --out my.gif

Frames are the PNGs in the folder, ordered by the number in their names (epoch_0002 before
epoch_0010, whatever the padding), converted to RGB at a fixed size.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402  (the repository root's one-line argument errors)
from plots import frame_number, make_gif  # noqa: E402,F401  (one home: plots.py)


def build_parser():
    p = config.Parser(description=__doc__.split("\n")[0])
    p.add_argument("folder", help="folder of PNG frames, e.g. images/<run>")
    p.add_argument("--out", default=None, help="gif path (default: <folder>.gif)")
    p.add_argument("--fps", type=config.positive_float, default=5.0)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.folder):
        config.fail(f"{args.folder!r} is not a folder; pass the folder of a run's figures "
                    f"(images/<run>)", prog="create_gif.py")
    try:
        out = make_gif(args.folder, args.out, args.fps)
    except FileNotFoundError as e:
        config.fail(str(e), prog="create_gif.py")
    except OSError as e:  # an unreadable frame, an unwritable output
        config.fail(f"{e.strerror or e}: {getattr(e, 'filename', '') or args.out}; check the "
                    f"frames and that --out can be written", prog="create_gif.py")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(config.cli(main))
