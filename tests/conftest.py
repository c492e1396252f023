"""Test settings: wandb never reaches a server, torch uses one thread (small ops are faster
and timings are steadier), the project root is importable, and Ctrl-C (SIGINT) has Python's
default handler even when the suite runs as a background job (which inherits SIGINT
ignored).

Two tiers: `python -m pytest -q tests` runs the fast tier (every kind of check, at small sizes);
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
    """Deselect the slow tier unless --all, or a -m expression, chooses the tests."""
    if config.getoption("all_tiers") or config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
