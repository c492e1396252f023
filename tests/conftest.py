"""Test settings: wandb never reaches a server, torch uses one thread (small ops are faster
and timings are steadier), the project root is importable, and Ctrl-C (SIGINT) has Python's
default handler even when the suite runs as a background job (which inherits SIGINT
ignored).

Two tiers: `python -m pytest -q -n 2 tests` runs the fast tier (every kind of check, at small
sizes; `-n 2`: pytest-xdist on two cores);
`--all` adds the tests marked `@pytest.mark.slow` (long trainings, sweeps over every set,
benchmarks end to end); `-m slow` runs the slow tier alone."""
import os
import signal
import sys

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(1)
signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", dest="all_tiers",
                     help="run the slow tier too (tests marked slow; README's test command)")


def pytest_collection_modifyitems(config, items):
    """Deselect the slow tier unless --all, or a -m expression, chooses the tests; a test
    named on the command line (tests/test_x.py::test_y, as planted_breaks.py runs them) runs
    whatever its tier."""
    if config.getoption("all_tiers") or config.getoption("markexpr"):
        return
    named = _named(config)
    slow = [item for item in items if item.get_closest_marker("slow")
            and not any(item.nodeid == n or item.nodeid.startswith((n + "[", n + "::"))
                        for n in named)]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in slow]


def _named(config):
    """The node ids (path::name) given on the command line, relative to the root folder."""
    out = []
    for arg in config.args:
        path, sep, name = arg.partition("::")
        if sep:
            rel = os.path.relpath(os.path.abspath(path), config.rootpath)
            out.append(rel.replace(os.sep, "/") + "::" + name)
    return out
