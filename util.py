"""Seeds, devices, threads, memory and random-number-generator state (`set_seed`,
`get_device`, `apply_threads`, `check_memory`, `fixed_rng`, `rng_state`, `set_rng_state`), and
learning-rate schedules (`lr_factor`, `set_lr`).
"""
import contextlib
import math
import os
import random

import numpy as np
import torch


# ----------------------------------------------------------------------------- runtime
def set_seed(seed):
    """Seed Python, NumPy and torch (all devices); returns a NumPy Generator for the data."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def get_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; otherwise cpu, cuda, cuda:<i> or mps. A device
    this machine does not have raises ValueError with the fix."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device={name!r} is not a device name; use auto, cpu, cuda, "
                         f"cuda:<index> or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device={name!r} is not supported; use auto, cpu, cuda or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device={name} but CUDA is not available on this machine; "
                             f"use --device=auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device={name} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not _mps_available():
        raise ValueError(f"--device={name} but MPS (Apple GPU) is not available on this "
                         f"machine; use --device=auto or cpu")
    return dev


def apply_threads(args):
    """torch.set_num_threads(--threads) unless it is 0 (torch's default)."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)


def check_memory(sizes):
    """Fail with one line when the arrays a run would allocate cannot fit in physical memory
    (not checked where the OS does not say): `sizes` maps a flag ("--samples") to the bytes
    its value asks for."""
    import config

    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return
    need = sum(sizes.values())
    if need > total:
        flag = max(sizes, key=sizes.get)
        config.fail(f"{flag} asks for {need / 2 ** 30:.1f} GiB but this machine has "
                    f"{total / 2 ** 30:.1f} GiB of memory; lower {flag}")


@contextlib.contextmanager
def fixed_rng(seed):
    """Run a block (an evaluation) from its own seed and restore every random stream
    afterwards (torch CPU, CUDA, MPS, NumPy, Python): evaluating never changes training, on
    any device, so a resumed run continues exactly."""
    saved = rng_state()
    try:
        set_seed(seed)
        yield
    finally:
        set_rng_state(saved)


@contextlib.contextmanager
def mode(module, training: bool):
    """`module` (and every submodule) in training or eval mode for the duration; each
    submodule's own mode is restored afterwards."""
    before = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield module
    finally:
        for m, was in before:
            m.training = was


def rng_state():
    """All random-number-generator states as tensors and plain types (for checkpoints)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2],
             "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _mps_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def _mps_available():
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and _mps_available():
        torch.mps.set_rng_state(state["mps"])
    if "numpy" in state:
        keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


# ----------------------------------------------------------------------------- schedules
def lr_factor(schedule, t, total, floor=0.0, decay=1.0):
    """Multiplier of a base learning rate at time t of total (iterations, or any measure of
    progress such as spent CPU-seconds):

        constant     1
        cosine       floor + (1 - floor) (1 + cos(pi min(t / total, 1))) / 2
        exponential  max(floor, decay^t)"""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t / total, 1.0)))
    if schedule == "exponential":
        return max(floor, decay ** t)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def set_lr(opt, lr):
    """Set every parameter group of `opt` to learning rate `lr`."""
    for group in opt.param_groups:
        group["lr"] = lr


def guarded_step(opt, loss, ascend=None) -> bool:
    """One backward pass of `loss`: `opt` steps on its gradient with respect to its own
    parameters, the optimizer `ascend` (if any) on the negative of the gradient with respect
    to its parameters. No step at all, and False, when a gradient is not finite. A parameter
    the loss does not depend on (a score's view of the energy's last bias) gets no gradient
    and is not moved."""
    groups = [(opt, 1.0)] + ([(ascend, -1.0)] if ascend is not None else [])
    params = [[p for g in o.param_groups for p in g["params"]] for o, _ in groups]
    grads = iter(torch.autograd.grad(loss, [p for ps in params for p in ps], allow_unused=True))
    grads = [[None if (g := next(grads)) is None else sign * g for _ in ps]
             for (_, sign), ps in zip(groups, params)]
    present = [g for gs in grads for g in gs if g is not None]
    # one check for all: the largest |g| of each (NaN if any entry is NaN)
    if present and not torch.isfinite(torch.stack(torch._foreach_norm(present, math.inf))).all():
        return False
    for (o, _), ps, gs in zip(groups, params, grads):
        for p, g in zip(ps, gs):
            p.grad = g
        o.step()
    return True
