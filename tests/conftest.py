"""Test settings: wandb never reaches a server, torch uses one thread (small ops are faster
and timings are steadier), the project root is importable, and Ctrl-C (SIGINT) has Python's
default handler even when the suite runs as a background job (which inherits SIGINT
ignored)."""
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
