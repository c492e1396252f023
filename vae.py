"""Variational autoencoder p_phi(x) = int p_phi(x | z) N(z; 0, I) dz (Kingma & Welling 2014).

Encoder and decoder are MLPs with SiLU (ebm.mlp). The encoder gives q(z | x) =
N(mu(x), diag exp(logvar(x))); the decoder gives Bernoulli logits or Gaussian means with one
learned noise scale. The evidence lower bound, per example,

    ELBO(x) = E_q log p_phi(x | z) - KL(q(z | x) || N(0, I))  <=  log p_phi(x),

is estimated with one reparameterised sample z = mu + exp(logvar / 2) eps.

    vae = VAE(64, z_dim=2)
    history = fit(vae, x_train, x_val, epochs=500, patience=30)   # restores the best weights
    x = vae.decode(torch.randn(1000, 2))                          # mean images in [0, 1]
"""
import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from ebm import mlp
from flows import soft_clamp

LIKELIHOODS = ("bernoulli", "gaussian")


class VAE(nn.Module):
    """MLP VAE: x_dim - hidden - 2 z_dim encoder, z_dim - reversed(hidden) - x_dim decoder."""

    def __init__(self, x_dim, z_dim=2, hidden=(256, 256), likelihood="bernoulli", act="silu"):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose one of: "
                             f"{', '.join(LIKELIHOODS)}")
        self.x_dim, self.z_dim, self.hidden = x_dim, z_dim, tuple(hidden)
        self.likelihood, self.act = likelihood, act
        self.encoder = mlp([x_dim, *hidden, 2 * z_dim], act)
        self.decoder = mlp([z_dim, *reversed(hidden), x_dim], act)
        # Gaussian likelihood: one learned log sigma, kept >= log 0.05 so the density of the
        # always-blank border pixels cannot grow without bound.
        self.log_sigma = nn.Parameter(torch.tensor(-1.0)) if likelihood == "gaussian" else None

    def encode(self, x):
        """mu(x), logvar(x) of q(z | x); logvar soft-clamped to [-10, 10]."""
        mu, logvar = self.encoder(x).chunk(2, -1)
        return mu, soft_clamp(logvar, 10.0)

    def sigma(self):
        return 0.05 + F.softplus(self.log_sigma)

    def log_px_given_z(self, x, z):
        """log p_phi(x | z) summed over pixels, shape (N,)."""
        out = self.decoder(z)
        if self.likelihood == "bernoulli":
            # The continuous-valued pixels in [0, 1] are used as Bernoulli targets (standard
            # practice for grey-scale MNIST; the density is then not normalised in x).
            return -F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)
        s = self.sigma()
        return (-0.5 * ((x - out) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)

    def elbo(self, x, eps=None):
        """One-sample ELBO(x), shape (N,). `eps` fixes the reparameterisation noise (common
        random numbers make validation ELBOs comparable from epoch to epoch)."""
        mu, logvar = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
        kl = 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar).sum(-1)
        return self.log_px_given_z(x, z) - kl

    def decode(self, z):
        """Mean image E[x | z] in [0, 1]."""
        out = self.decoder(z)
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out.clamp(0, 1)

    @torch.no_grad()
    def sample(self, n):
        """Mean images of n prior draws z ~ N(0, I), and the z's."""
        z = torch.randn(n, self.z_dim, device=self.encoder[0].weight.device)
        return self.decode(z), z

    def spec(self):
        """Keyword arguments that rebuild this module (stored in checkpoints)."""
        return {"x_dim": self.x_dim, "z_dim": self.z_dim, "hidden": list(self.hidden),
                "likelihood": self.likelihood, "act": self.act}


def fit(vae, x_train, x_val, epochs=500, batch=64, lr=1e-3, patience=30, n_val_eps=4,
        on_epoch=None):
    """Maximise the ELBO with Adam; early stopping on the validation ELBO.

    The validation ELBO uses the same `n_val_eps` noise draws every epoch, so it changes only
    when the weights do. The best weights are kept as a deep copy (a bare state_dict() would
    be a live view of the parameters and "restoring" it would restore the last epoch) and
    loaded back at the end (and before FloatingPointError is raised at a non-finite loss).
    `on_epoch(epoch, train_loss, val_elbo)` is called every epoch;
    when it returns True training stops there (Ctrl-C), with the best weights so far.
    Returns a dict: train (mean -ELBO per epoch), val (validation ELBO per epoch), best_epoch,
    best_val, stopped_early, stopped (by on_epoch), val_eps (the fixed noise, to recompute val
    exactly).
    """
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    val_eps = torch.randn(n_val_eps, len(x_val), vae.z_dim, device=x_val.device)
    hist = {"train": [], "val": [], "best_epoch": -1, "best_val": -math.inf,
            "stopped_early": False, "stopped": False, "val_eps": val_eps}
    best_state = copy.deepcopy(vae.state_dict())
    for epoch in range(epochs):
        vae.train()
        perm = torch.randperm(len(x_train), device=x_train.device)
        total = 0.0
        for i in range(0, len(x_train), batch):
            xb = x_train[perm[i:i + batch]]
            loss = -vae.elbo(xb).mean()
            if not torch.isfinite(loss):
                vae.load_state_dict(best_state)  # the caller may save the last good weights
                raise FloatingPointError(f"VAE loss is {float(loss)} at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
        val = validation_elbo(vae, x_val, val_eps)
        hist["train"].append(total / len(x_train))
        hist["val"].append(val)
        stop = on_epoch is not None and on_epoch(epoch, hist["train"][-1], val)
        if val > hist["best_val"]:
            hist["best_val"], hist["best_epoch"] = val, epoch
            best_state = copy.deepcopy(vae.state_dict())
        if stop:
            hist["stopped"] = True
            break
        if epoch - hist["best_epoch"] >= patience:
            hist["stopped_early"] = True
            break
    vae.load_state_dict(best_state)
    vae.eval()
    return hist


@torch.no_grad()
def validation_elbo(vae, x_val, val_eps):
    """Mean ELBO of x_val averaged over the fixed noise draws val_eps (K, N, z_dim)."""
    vae.eval()
    return float(torch.stack([vae.elbo(x_val, eps=e) for e in val_eps]).mean())
