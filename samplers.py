"""Langevin samplers for energies U: R^D -> R, target p(x) ∝ exp(-U(x) / T).

Unadjusted Langevin (ULA), step size eps:

    x <- x - (eps^2 / 2) grad U(x) / T + eps * N(0, I)

With U = (2 / eps^2) F this is the update of Nijkamp et al. (AAAI 2020),
`x <- x - dF/dx + eps N(0, I)`.

MALA (Metropolis-adjusted Langevin) makes the same proposal and accepts it with probability
min(1, exp(H - H')), H = U(x) / T + |p|^2 / 2, where (x', p') is one leapfrog step of
Hamiltonian dynamics from (x, p), p ~ N(0, I). This equals the standard MALA ratio
p(x') q(x | x') / (p(x) q(x' | x)) exactly; the H form is the one computed here.

    x = langevin(U, x0, n_steps=100, eps=0.1)                 # detached final states
    x, r = langevin(U, x0, 100, 0.1, return_grad_norm=True)   # r[t] = mean |(eps^2/2) grad U|
    x, acc = mala(U, x0, n_steps=1000, eps=0.1)               # acc[t]: acceptance rate, step t

Speed: for small MLPs the per-op overhead dominates. The loop updates x in place and draws
all the noise up front. An energy with a `.grad(x)` method (see `Energy`) is differentiated
by that method: for exactly the architecture it knows (an `ebm.EBM`, or a bare nn.Sequential,
of Linear layers and elementwise activations, without hooks), `Energy` runs the forward pass
and the backward pass w.r.t. x by hand (one matmul and one activation-backward kernel per
layer, no autograd graph). The activation kernels are private torch calls: each is checked
once per process against autograd, and any that is missing or disagrees sends `Energy` back to
autograd (with a warning). Anything else (a subclass, another module that has a `.net`, a
function) gets one `autograd.grad` w.r.t. x only per step, with the network parameters frozen
so that no parameter-gradient work is done.

    U = Energy(ebm, scale=2 / eps**2)      # U(x) = scale * ebm(x), with a fast U.grad(x)
    x = langevin(U, x0, 100, eps)
"""
import contextlib
import copy
import math
import warnings

from typing import Callable, Sequence, Union

import torch
from torch import Tensor, nn

import ebm as _ebm

EnergyFn = Callable[[Tensor], Tensor]  # U: (N, D) -> (N,)
Modules = Union[nn.Module, Sequence[nn.Module], None]


@contextlib.contextmanager
def frozen(*modules: nn.Module | None):
    """Set requires_grad=False on every parameter of `modules` (None entries are skipped)
    and restore the previous flags on exit, also on error."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


# Each supported activation as (forward, backward) C-level calls, for a module m:
# forward(a) -> h, backward(grad_h, a, h) -> grad_a (one ATen kernel each, no Python wrapper).
_aten = torch.ops.aten
_ACTIVATIONS = {
    nn.LeakyReLU: lambda m: (
        lambda a: torch._C._nn.leaky_relu(a, m.negative_slope),
        lambda g, a, h: _aten.leaky_relu_backward.default(g, a, m.negative_slope, False)),
    nn.ReLU: lambda m: (torch.relu, lambda g, a, h: _aten.threshold_backward.default(g, a, 0.0)),
    nn.SiLU: lambda m: (torch._C._nn.silu, lambda g, a, h: _aten.silu_backward.default(g, a)),
    nn.Tanh: lambda m: (torch.tanh, lambda g, a, h: _aten.tanh_backward.default(g, h)),
    nn.Softplus: lambda m: (
        lambda a: torch._C._nn.softplus(a, m.beta, m.threshold),
        lambda g, a, h: _aten.softplus_backward.default(g, a, m.beta, m.threshold)),
    nn.ELU: lambda m: (
        lambda a: torch._C._nn.elu(a, m.alpha),
        lambda g, a, h: _aten.elu_backward.default(g, m.alpha, 1.0, 1.0, False, a)),
}


def _mlp_layers(module):
    """The layers of `module` when the hand-written gradient computes exactly its forward pass:
    `module` is an `ebm.EBM` (f(x) = net(x).squeeze(-1)) or a bare nn.Sequential, of exactly
    these types (a subclass may override forward), with no hooks, and the Sequential is
    Linear, activation, ..., Linear to 1 output (exact nn.Linear with a bias, activations of
    the supported types). None for anything else: the caller then uses autograd."""
    if type(module) is _ebm.EBM and "forward" not in vars(module):
        net = module.net
    elif type(module) is nn.Sequential:
        net = module
    else:
        return None
    if type(net) is not nn.Sequential or len(net) % 2 == 0:
        return None
    layers = list(net)
    for i, m in enumerate(layers):
        if i % 2 == 0 and (type(m) is not nn.Linear or m.bias is None):
            return None
        if i % 2 == 1 and type(m) not in _ACTIVATIONS:
            return None
    if layers[-1].out_features != 1:
        return None
    for m in {module, net, *layers}:
        if m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m):
            return None
    return layers


_KERNELS_OK = {}  # (activation repr, dtype, device type) -> whether its fast kernels are right


def _kernels_ok(act, dtype, device):
    """Whether the private forward/backward kernels of activation module `act` exist in this
    torch and agree with autograd on `act` itself (checked once per process and setting)."""
    key = (type(act), repr(act), dtype, torch.device(device).type)
    if key not in _KERNELS_OK:
        try:
            fwd, bwd = _ACTIVATIONS[type(act)](act)
            a = torch.linspace(-5, 5, 101, dtype=dtype, device=device).reshape(-1, 1)
            g_out = torch.linspace(0.5, 1.5, 101, dtype=dtype, device=device).reshape(-1, 1)
            with torch.no_grad():
                h = fwd(a)
                g = bwd(g_out, a, h)
            with torch.enable_grad():
                a_ref = a.clone().requires_grad_(True)
                h_ref = act(a_ref)
                (g_ref,) = torch.autograd.grad(h_ref, a_ref, grad_outputs=g_out)
            tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
            ok = bool(torch.allclose(h, h_ref.detach(), rtol=tol, atol=tol)
                      and torch.allclose(g, g_ref, rtol=tol, atol=tol))
        except Exception:  # a private call renamed or removed in this torch version
            ok = False
        if not ok:
            warnings.warn(f"samplers.Energy: the fast gradient kernels of {act!r} are missing or "
                          f"wrong in torch {torch.__version__}; using autograd (slower, same "
                          f"result)", RuntimeWarning, stacklevel=3)
        _KERNELS_OK[key] = ok
    return _KERNELS_OK[key]


def _chain_grad(plan, g_last, dtype=None):
    """x -> grad_x U(x) of a chain of dense layers, without autograd. `plan` lists per hidden
    layer (A, A_back, b, fwd, bwd): forward a = b + h A, h = fwd(a); backward
    g <- bwd(g, a, h) A_back, starting from g_last = dU/dh of the last hidden layer. With
    `dtype`, the pass runs in that precision and the gradient returns in x's dtype."""
    addmm = torch.addmm

    def grad(x):
        h = x if dtype is None else x.to(dtype)
        saved = []
        for A, _, b, fwd, _ in plan:
            a = addmm(b, h, A)
            h = fwd(a)
            saved.append((a, h))
        g = g_last.expand(x.shape[0], -1)
        for (_, A_back, _, _, bwd), (a, h) in zip(reversed(plan), reversed(saved)):
            g = bwd(g, a, h).mm(A_back)
        return g if dtype is None else g.to(x.dtype)
    return grad


class Energy:
    """U(x) = scale * f(x) for an energy network f ((N, D) -> (N,)), with a fast `grad(x)`.

    When f is exactly an `ebm.EBM` or an nn.Sequential MLP of Linear layers and LeakyReLU,
    ReLU, SiLU, Tanh, Softplus or ELU (see `_mlp_layers`) and this torch's kernels pass their
    check, `grad` is the hand-written backward pass w.r.t. x (`self.fast` is True; checked
    against autograd in tests/test_mcmc.py and tests/test_directions.py); otherwise it is autograd
    with f's parameters frozen. Calling U(x) is differentiable as usual (training losses).

        U = Energy(ebm, scale=2 / eps**2)   # U(x) = scale * ebm(x)
        U(x), U.grad(x)                     # (N,) energies, (N, D) detached gradients
    """

    def __init__(self, f: EnergyFn, scale: float = 1.0):
        self.f, self.scale = f, float(scale)
        self.layers = _mlp_layers(f) if isinstance(f, nn.Module) else None

    def __call__(self, x: Tensor) -> Tensor:
        """U(x) = scale * f(x), shape (N,); differentiable."""
        return self.f(x) * self.scale

    @property
    def fast(self) -> bool:
        """Whether `grad` uses the hand-written backward pass (else autograd)."""
        if self.layers is None:
            return False
        w = self.layers[0].weight
        return all(_kernels_ok(m, w.dtype, w.device) for m in self.layers[1::2])

    def grad_fn(self) -> Callable[[Tensor], Tensor]:
        """A function x -> grad_x U(x) for the current weights, with everything that does not
        depend on x (transposed weights, scaled last layer, activation kernels) prepared once:
        call it once per sampling run, not once per step."""
        if not self.fast:
            return self._autograd_grad
        linears = self.layers[0::2]
        acts = [_ACTIVATIONS[type(m)](m) for m in self.layers[1::2]]
        plan = [(lin.weight.detach().t(), lin.weight.detach(), lin.bias.detach(), fwd, bwd)
                for lin, (fwd, bwd) in zip(linears[:-1], acts)]
        w_last = linears[-1].weight.detach() * self.scale  # dU/dh of the last hidden layer
        return _chain_grad(plan, w_last)

    def _autograd_grad(self, x):
        with frozen(self.f if isinstance(self.f, nn.Module) else None), torch.enable_grad():
            y = x.detach().requires_grad_(True)
            return torch.autograd.grad(self(y).sum(), y)[0]

    @torch.no_grad()
    def grad(self, x: Tensor) -> Tensor:
        """grad_x U(x), shape (N, D), detached."""
        return self.grad_fn()(x)


def _modules(U, freeze):
    mods = [U] if isinstance(U, nn.Module) else []
    if freeze is not None:
        mods += list(freeze) if isinstance(freeze, (list, tuple)) else [freeze]
    return mods


def langevin(U: EnergyFn, x: Tensor, n_steps: int, eps: float, temperature: float = 1.0,
             return_grad_norm: bool = False,
             freeze: Modules = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """n_steps of unadjusted Langevin dynamics on exp(-U / temperature) from x (N, D).

    U maps (N, D) -> (N,) energies. `freeze`: module(s) whose parameters U uses (an nn.Module
    U is frozen anyway); freezing them skips all parameter-gradient work. Returns the final
    states (detached, a new tensor; x is not modified), and with `return_grad_norm` also
    r (n_steps,): r[t] = mean_i |(eps^2 / 2) grad U(x_i) / T| before step t, which is the
    paper's mean |dF/dx| when U = (2 / eps^2) F."""
    step = eps * eps / (2.0 * temperature)
    x = x.detach().clone()
    noise = torch.randn((n_steps, *x.shape), dtype=x.dtype, device=x.device).mul_(eps)
    # per-chain gradient norms, written by one kernel per step and averaged after the loop
    norms = torch.empty((n_steps, x.shape[0]), dtype=x.dtype, device=x.device) \
        if return_grad_norm else None
    ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    fast = U.grad_fn() if hasattr(U, "grad_fn") else getattr(U, "grad", None)
    if fast is not None:  # no autograd at all: x never requires grad
        with torch.no_grad():
            for t in range(n_steps):
                g = fast(x)
                if norms is not None:
                    torch.linalg.vector_norm(g, dim=1, out=norms[t])
                x.add_(g, alpha=-step).add_(noise[t])
    else:
        with frozen(*_modules(U, freeze)), torch.enable_grad():
            x.requires_grad_(True)
            for t in range(n_steps):
                (g,) = torch.autograd.grad(U(x), x, grad_outputs=ones)
                with torch.no_grad():
                    if norms is not None:
                        torch.linalg.vector_norm(g, dim=1, out=norms[t])
                    x.add_(g, alpha=-step).add_(noise[t])
    x = x.detach()
    if return_grad_norm:
        return x, norms.mean(1).mul_(step)
    return x


def mala(U: EnergyFn, x: Tensor, n_steps: int, eps: float, temperature: float = 1.0,
         freeze: Modules = None, return_energy: bool = False,
         ) -> Union[tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """n_steps of MALA on exp(-U / temperature) from x (N, D).

    Each step: p ~ N(0, I); one leapfrog step of size eps,
        p_half = p - (eps / 2) grad V(x),  x' = x + eps p_half,  p' = p_half - (eps / 2) grad V(x'),
    with V = U / T (x' is the ULA proposal); accept per chain when log u < H - H',
    H = V(x) + |p|^2 / 2. Returns (final states, acceptance rate of each step (n_steps,)),
    plus the final energies U(x) (N,) with `return_energy`."""
    inv_t = 1.0 / temperature
    x = x.detach().clone()
    n = x.shape[0]
    noise = torch.randn((n_steps, *x.shape), dtype=x.dtype, device=x.device)
    log_u = torch.rand((n_steps, n), dtype=x.dtype, device=x.device).log_()
    acc = torch.empty(n_steps, dtype=x.dtype, device=x.device)
    ones = torch.ones(n, dtype=x.dtype, device=x.device)

    fast = U.grad_fn() if hasattr(U, "grad_fn") else getattr(U, "grad", None)

    def energy_grad(y):
        if fast is not None:
            with torch.no_grad():
                return U(y) * inv_t, fast(y) * inv_t
        y = y.detach().requires_grad_(True)
        u = U(y)
        (g,) = torch.autograd.grad(u, y, grad_outputs=ones)
        return u.detach() * inv_t, g * inv_t

    with frozen(*_modules(U, freeze)), torch.enable_grad():
        v, g = energy_grad(x)
        for t in range(n_steps):
            p = noise[t]
            p_half = p - 0.5 * eps * g
            x_new = x + eps * p_half
            v_new, g_new = energy_grad(x_new)
            p_new = p_half - 0.5 * eps * g_new
            log_ratio = (v + 0.5 * (p * p).sum(1)) - (v_new + 0.5 * (p_new * p_new).sum(1))
            ok = log_u[t] < log_ratio  # NaN energies are never accepted
            acc[t] = ok.to(x.dtype).mean()
            x = torch.where(ok[:, None], x_new, x)
            v = torch.where(ok, v_new, v)
            g = torch.where(ok[:, None], g_new, g)
    x = x.detach()
    if return_energy:
        return x, acc, v * temperature
    return x, acc


def chain_starts(init: str, n: int, dim: int, scale: float = 1.0, bank: Tensor | None = None,
                 data: Tensor | None = None, device: torch.device | str | None = None,
                 ) -> tuple[Tensor, Tensor | None]:
    """n chain starts (n, dim) and, from a bank, their indices (to update it in place): init
    "uniform" U[-scale, scale]^dim, "gaussian" N(0, scale^2 I), "data" rows of `data` (with
    replacement, drawn on data's device), "persistent" chains of `bank` (distinct while n fits).

        x0, idx = chain_starts("uniform", 500, 2, scale=2.0)
    """
    if init == "persistent":
        idx = (torch.randperm(len(bank), device=device)[:n] if n <= len(bank) else
               torch.randint(len(bank), (n,), device=device))
        return bank[idx], idx
    if init == "uniform":
        return scale * (2 * torch.rand(n, dim, device=device) - 1), None
    if init == "gaussian":
        return scale * torch.randn(n, dim, device=device), None
    return data[torch.randint(len(data), (n,), device=data.device)].to(device), None


# ----------------------------------------------------------------------------- images
def _conv_layers(module):
    """The nn.Sequential of Conv2d layers and supported activations in `module.net` (conv,
    act, conv, ..., conv with one output channel), for a module that reads flattened images
    through `module.shape` (C, H, W) and an optional constant padding `module.pad` with -1;
    None if it is anything else."""
    net = getattr(module, "net", None)
    if not isinstance(net, nn.Sequential) or len(net) == 0 or not hasattr(module, "shape"):
        return None
    layers = list(net)
    for i, m in enumerate(layers):
        if i % 2 == 0:
            if not isinstance(m, nn.Conv2d) or m.padding_mode != "zeros" \
                    or isinstance(m.padding, str):
                return None
        elif type(m) not in _ACTIVATIONS:
            return None
    if not isinstance(layers[-1], nn.Conv2d) or layers[-1].out_channels != 1:
        return None
    return layers


class ConvEnergy(Energy):
    """U(x) = scale * f(x) for a ConvNet energy f of flattened images x (N, C*H*W) -> (N,)
    (e.g. ebm.ConvEBM), with a fast `grad(x)`: the image counterpart of `Energy`.

    Images travel flattened, so `langevin` and `mala` run on them unchanged (r_t is then the
    mean per-image norm of dF/dx over all pixels). When f.net is an nn.Sequential of Conv2d
    layers and supported activations, `grad_fn()` prepares the detached weights once and each
    call runs the forward pass and the backward pass w.r.t. the input only, without autograd
    and without weight or bias gradients, in one of two ways (`mode`):
      "dense": each convolution of these tiny images as the dense matrix it is (built once per
          grad_fn call from the weights by one gather through an index map computed once per
          instance), so a step is the MLP fast path of `Energy`: one addmm + activation per
          layer forward, one activation-backward + mm per layer back. On the 16-32-64 digit
          net (8x8, 0.7M matrix elements) it measured 1.2-1.4x faster than the convolution
          kernels on one idle-ish core, and level with them (within +-7%) in
          bench/mcmc_images.py on a loaded machine; for bigger layers (the 32-64-128 net,
          2.8M) the matrices outgrow the caches and it is 2x slower.
      "conv": the convolutions, and one ATen `convolution_backward` with output_mask
          (input, -, -) plus one activation-backward kernel per layer on the way back.
      "auto" (default): dense when the matrices hold at most DENSE_MAX elements and the input
          is not padded, else conv.
    Otherwise (other layers, or a forward that does something else: checked once against
    autograd) it falls back to autograd with f's parameters frozen.

    `dtype` (e.g. torch.bfloat16) runs the gradient in that precision (weights cast once, x
    cast per call, the gradient returned in x's dtype); the chains themselves stay in x's
    dtype. None: x's dtype."""

    DENSE_MAX = 1_000_000  # matrix elements; the 32-64-128 digit net (2.75M) is faster as conv

    def __init__(self, f: EnergyFn, scale: float = 1.0, dtype: torch.dtype | None = None,
                 mode: str = "auto"):
        if mode not in ("auto", "dense", "conv"):
            raise ValueError(f"mode must be auto, dense or conv, got {mode!r}")
        self.f, self.scale, self.dtype = f, float(scale), dtype
        self.layers = _conv_layers(f) if isinstance(f, nn.Module) else None
        self._checked = None  # whether the hand-written gradient matched autograd on f
        self._maps = None  # per conv layer: weight index of each (input, output) pair, 0: none
        self.mode = mode
        if self.layers is not None and mode == "auto":
            self.mode = "dense" if self._dense_ok() else "conv"

    def _dense_ok(self):
        if getattr(self.f, "pad", 0):
            return False
        shape, total = tuple(self.f.shape), 0
        for c in self.layers[0::2]:
            out = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                   zip(shape[1:], c.padding, c.dilation, c.kernel_size, c.stride)]
            n_in, shape = math.prod(shape), (c.out_channels, *out)
            total += n_in * math.prod(shape)
        return total <= self.DENSE_MAX

    def _dense_maps(self):
        """For each conv layer, a (n_in, n_out) long tensor: 1 + the flat index of the weight
        that multiplies input unit i in output unit j, 0 where none does (found by convolving
        the identity with weights 1, 2, ..., exact in float64). Computed once per instance."""
        if self._maps is None:
            maps, shape = [], tuple(self.f.shape)
            for c in self.layers[0::2]:
                n_in = math.prod(shape)
                ids = torch.arange(1, c.weight.numel() + 1, dtype=torch.float64)
                eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *shape)
                out = torch.conv2d(eye, ids.reshape(c.weight.shape), None, c.stride,
                                   c.padding, c.dilation, c.groups)
                shape = tuple(out.shape[1:])
                maps.append((out.reshape(n_in, -1).round().long().to(c.weight.device),
                             shape[1] * shape[2]))
            self._maps = maps
        return self._maps

    @property
    def fast(self) -> bool:
        """Whether `grad` uses the hand-written backward pass: f has the supported layers and,
        checked once per instance on two random images, the hand-written gradient equals
        autograd's (a subclass whose forward does something else fails the check: autograd).

        The check runs on a float64 copy of f on the CPU, so it tests the maths and not the
        rounding: in float32 the two gradients of a trained digit net differ by about 1e-3
        relative on small components, which a fixed tolerance cannot tell from an error."""
        if self.layers is None:
            return False
        if self._checked is None:
            g0 = torch.Generator().manual_seed(0)  # its own stream: no global RNG is touched
            x = 2 * torch.rand(2, math.prod(self.f.shape), generator=g0,
                               dtype=torch.float64) - 1
            try:
                ref = ConvEnergy(copy.deepcopy(self.f).to("cpu", torch.float64), self.scale,
                                 None, self.mode)
                with torch.no_grad():
                    g = ref._hand_grad_fn()(x)
                g_ref = ref._autograd_grad(x)
                ok = torch.allclose(g, g_ref, rtol=1e-8, atol=1e-10 * float(g_ref.abs().max()))
            except Exception:
                ok = False
            if not ok:
                warnings.warn(f"samplers.ConvEnergy: the hand-written gradient does not match "
                              f"autograd for {type(self.f).__name__}; using autograd",
                              RuntimeWarning, stacklevel=3)
            self._checked = bool(ok)
        return self._checked

    def grad_fn(self) -> Callable[[Tensor], Tensor]:
        """A function x (N, D) -> grad_x U(x) (N, D) for the current weights, everything that
        does not depend on x prepared once: call it once per sampling run."""
        if not self.fast:
            return self._autograd_grad
        return self._hand_grad_fn()

    def _hand_grad_fn(self):
        return self._dense_grad_fn() if self.mode == "dense" else self._conv_grad_fn()

    def _dense_grad_fn(self):
        convs = self.layers[0::2]
        acts = [_ACTIVATIONS[type(m)](m) for m in self.layers[1::2]]
        dt = self.dtype
        mats = []
        for c, (idx, n_pos) in zip(convs, self._dense_maps()):
            w = c.weight.detach()
            M = torch.cat([w.new_zeros(1), w.reshape(-1)])[idx]  # x_flat @ M = conv(x)_flat
            b = (c.bias.detach() if c.bias is not None else w.new_zeros(c.out_channels))
            b = b.repeat_interleave(n_pos)
            if dt is not None:
                M, b = M.to(dt), b.to(dt)
            mats.append((M, M.t().contiguous(), b))
        if mats[-1][0].shape[1] != 1:
            return self._conv_grad_fn()
        g_last = mats[-1][1] * self.scale  # (1, n_in) = dU/dh of the last hidden layer
        plan = [(M, Mt, b, fwd, bwd) for (M, Mt, b), (fwd, bwd) in zip(mats[:-1], acts)]
        return _chain_grad(plan, g_last, dt)

    def _conv_grad_fn(self):
        convs = self.layers[0::2]
        acts = [_ACTIVATIONS[type(m)](m) for m in self.layers[1::2]] + [None]
        dt = self.dtype
        plan = [(c.weight.detach().to(dt) if dt else c.weight.detach(),
                 None if c.bias is None else (c.bias.detach().to(dt) if dt else c.bias.detach()),
                 c.stride, c.padding, c.dilation, c.groups, act)
                for c, act in zip(convs, acts)]
        shape, pad, scale = tuple(self.f.shape), int(getattr(self.f, "pad", 0) or 0), self.scale
        conv2d, conv_bwd = torch.conv2d, _aten.convolution_backward.default
        mask = [True, False, False]  # gradient w.r.t. the input only

        def grad(x):
            n = x.shape[0]
            h = x.reshape(n, *shape)
            if dt is not None:
                h = h.to(dt)
            if pad:
                h = torch.constant_pad_nd(h, [pad] * 4, -1.0)
            saved = []
            for W, b, s, p, d, groups, act in plan:
                a = conv2d(h, W, b, s, p, d, groups)
                h_out = act[0](a) if act is not None else a
                saved.append((h, a, h_out))
                h = h_out
            g = torch.full_like(h, scale)  # dU/d(output) = scale
            for (W, _, s, p, d, groups, act), (h_in, a, h_out) in zip(reversed(plan),
                                                                      reversed(saved)):
                if act is not None:
                    g = act[1](g, a, h_out)
                g = conv_bwd(g, h_in, W, None, s, p, d, False, [0, 0], groups, mask)[0]
            if pad:
                g = g[:, :, pad:-pad, pad:-pad]
            return g.reshape(n, -1).to(x.dtype)
        return grad
