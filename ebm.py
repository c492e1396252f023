"""Energy-based models p_theta(x) = exp(-f_theta(x)) / Z_theta: the energy f_theta is an MLP
(`EBM`: 2D data, flattened images) or a ConvNet on images (`ConvEBM`: short-run MCMC). For
noise-/flow-contrastive estimation the normaliser is a learned scalar c ~ log Z (Gutmann &
Hyvarinen 2010), so that

    log p_theta(x) = -f_theta(x) - c.

Maximum-likelihood methods (MCMC) ignore c. In 2D the exact log Z comes from grid
integration (gridmath.grid_log_Z), so the gap c - log Z can be watched during training.
"""
from typing import Any, Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS = {"silu": nn.SiLU, "softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU,
               "leakyrelu": lambda: nn.LeakyReLU(0.05), "relu": nn.ReLU}


def mlp(sizes: Sequence[int], act: str = "silu") -> nn.Sequential:
    """Linear layers of the given sizes with `act` between them (none after the last).

        mlp([2, 64, 1], "tanh")   # Linear(2, 64), Tanh, Linear(64, 1)
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose one of: {', '.join(ACTIVATIONS)}")
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers)


class EBM(nn.Module):
    """Energy f_theta: R^D -> R, an MLP D-h1-...-hk-1, plus the learned log-normaliser c.

    Smooth activations give smooth densities, which is what the toy figures and the
    Langevin samplers want.

        ebm = EBM(2, (128, 128), "silu")
        f = ebm(torch.randn(5, 2))          # (5,) energies
        log_p = ebm.log_prob(x)             # (5,) -f(x) - c
    """

    def __init__(self, dim: int = 2, hidden: Sequence[int] = (128, 128), act: str = "silu",
                 c_init: float = 0.0):
        super().__init__()
        self.dim, self.hidden, self.act = dim, tuple(hidden), act
        self.net = mlp([dim, *hidden, 1], act)
        self.c = nn.Parameter(torch.tensor(float(c_init)))

    def forward(self, x: Tensor) -> Tensor:
        """f_theta(x) of x (N, D), shape (N,)."""
        return self.net(x).squeeze(-1)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p_theta(x) = -f_theta(x) - c (N,), normalised only as well as c ~ log Z."""
        return -self(x) - self.c

    def energy_params(self) -> list[nn.Parameter]:
        """The parameters of f_theta, without c."""
        return list(self.net.parameters())

    def spec(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this module (stored in checkpoints)."""
        return {"dim": self.dim, "hidden": list(self.hidden), "act": self.act}


class ConvEBM(nn.Module):
    """Energy F(x) of flattened images x (N, C*H*W) -> (N,): a ConvNet of Conv2d layers with
    LeakyReLU(0.05) between them (none after the last), as in the paper's code.

    arch "conv8" (8x8 images, 4 layers, n_f-2n_f-4n_f channels):
        conv3x3 s1 -> conv4x4 s2 -> conv4x4 s2 -> conv2x2 (8 -> 8 -> 4 -> 2 -> 1)
    arch "vanilla" (the paper's VanillaNet for 32x32; 28x28 MNIST is padded with -1 to 32):
        conv3x3 s1 -> conv4x4 s2 -> conv4x4 s2 -> conv4x4 s2 -> conv4x4 (32 -> ... -> 4 -> 1)

        F = ConvEBM("conv8", (1, 8, 8), n_f=16)
        F(torch.rand(5, 64) * 2 - 1)        # (5,) energies of five 8x8 images in [-1, 1]
    """

    ARCHS = ("conv8", "vanilla")

    def __init__(self, arch: str = "conv8", shape: Sequence[int] = (1, 8, 8), n_f: int = 16):
        super().__init__()
        if arch not in self.ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(self.ARCHS)}")
        self.arch, self.shape, self.n_f = arch, tuple(shape), int(n_f)
        c, h, w = self.shape
        act = lambda: nn.LeakyReLU(0.05)  # noqa: E731
        if arch == "conv8":
            if (h, w) != (8, 8):
                raise ValueError(f"arch conv8 is for 8x8 images, got {h}x{w}; use vanilla")
            self.pad = 0
            self.net = nn.Sequential(
                nn.Conv2d(c, n_f, 3, 1, 1), act(), nn.Conv2d(n_f, 2 * n_f, 4, 2, 1), act(),
                nn.Conv2d(2 * n_f, 4 * n_f, 4, 2, 1), act(), nn.Conv2d(4 * n_f, 1, 2, 1, 0))
        else:
            if h != w or h not in (28, 32):
                raise ValueError(f"arch vanilla is for 28x28 or 32x32 images, got {h}x{w}; "
                                 f"use conv8 for 8x8")
            self.pad = (32 - h) // 2
            self.net = nn.Sequential(
                nn.Conv2d(c, n_f, 3, 1, 1), act(), nn.Conv2d(n_f, 2 * n_f, 4, 2, 1), act(),
                nn.Conv2d(2 * n_f, 4 * n_f, 4, 2, 1), act(),
                nn.Conv2d(4 * n_f, 8 * n_f, 4, 2, 1), act(), nn.Conv2d(8 * n_f, 1, 4, 1, 0))

    def images(self, x: Tensor) -> Tensor:
        """Flattened rows (N, C*H*W) -> the padded (N, C, H', W') batch the convs see."""
        x = x.reshape(x.shape[0], *self.shape)
        if self.pad:
            x = nn.functional.pad(x, (self.pad,) * 4, value=-1.0)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """F(x) of flattened images x (N, C*H*W), shape (N,)."""
        return self.net(self.images(x)).reshape(x.shape[0])

    def energy_params(self) -> list[nn.Parameter]:
        """The parameters of F (all of them: a ConvEBM has no log-normaliser)."""
        return list(self.net.parameters())

    def spec(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this module (stored in checkpoints)."""
        return {"arch": self.arch, "shape": list(self.shape), "n_f": self.n_f}


def default_arch(dataset):
    """The ConvEBM architecture of an image set: conv8 for the 8x8 digits, else vanilla."""
    return "conv8" if dataset == "digits" else "vanilla"


def load_image_ebm(checkpoint, key="image_ebm", device="cpu"):
    """The ConvEBM stored in a train_mcmc.py image checkpoint under `key` ("image_ebm": U
    itself, the last layer scaled by 2 / eps^2; "F": the trained network)."""
    net = ConvEBM(**checkpoint["image_ebm_spec"]).to(device)
    net.load_state_dict(checkpoint[key])
    return net.eval()
