"""Reference densities of dequantised images: the rungs of the digits ladder that every
learned model must beat (docs/digits.md). Each is fitted on the training images only and
scored in nats per image on the [0, L) scale of image_data.py, so its numbers sit in the same
column as the flows' and the EBMs'.

- uniform on [0, L)^D:                    log p = -D log L
- independent per-pixel categorical over the L levels, with pseudo-count a (chosen on the
  validation split), dequantised uniformly: each unit cell [k, k + 1) carries P(k), so

      log p_v(k + u) = sum_i log P_i(k_i),   P_i(k) = (n_ik + a) / (n + L a),

  an exact discrete likelihood and the same number as a continuous density;
- one full-covariance Gaussian fitted (maximum likelihood, a small ridge) to the dequantised
  training images on the model scale y = 2 v / L - 1 (a density on R^D, not the box).
"""
import math

import torch

import image_data

PSEUDO_COUNTS = (0.01, 0.03, 0.1, 0.3, 1.0)


def uniform(D: int, L: int) -> float:
    """log p of the uniform density on [0, L)^D, nats per image."""
    return -D * math.log(L)


def categorical_log_probs(x_train, L: int, a: float) -> torch.Tensor:
    """(D, L) log P_i(k) of the independent per-pixel categorical with pseudo-count a, from
    lattice images x_train (N, D) in [-1, 1] (image_data.levels)."""
    k = image_data.levels(x_train, L).long()
    counts = torch.zeros(k.shape[1], L, dtype=torch.float64)
    counts.scatter_add_(1, k.T, torch.ones(k.T.shape, dtype=torch.float64))
    return torch.log(counts + a) - math.log(len(k) + L * a)


def categorical(x_train, x_eval, L: int, a: float) -> float:
    """Mean log-likelihood of lattice images x_eval (N, D) under the categorical fitted to
    x_train, nats per image (= the dequantised density's, cells of width 1)."""
    log_p = categorical_log_probs(x_train, L, a)
    k = image_data.levels(x_eval, L).long()
    return float(log_p.gather(1, k.T).sum(0).mean())


def best_categorical(x_train, x_val, L: int) -> float:
    """The pseudo-count of PSEUDO_COUNTS that scores best on the validation images."""
    return max(PSEUDO_COUNTS, key=lambda a: categorical(x_train, x_val, L, a))


def gaussian(y_fit, y_eval, L: int, ridge: float = 1e-4) -> float:
    """Mean log-likelihood, nats per image on the [0, L) scale, of dequantised images y_eval
    (model scale) under N(mean, cov + ridge I) fitted to dequantised training images y_fit."""
    y = y_fit.double()
    cov = torch.cov(y.T) + ridge * torch.eye(y.shape[1], dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(y.mean(0), covariance_matrix=cov)
    return float(image_data.to_nats(dist.log_prob(y_eval.double()).mean(), y.shape[1], L))


def ladder(task) -> dict:
    """The closed-form rungs of a tasks.Images task, fitted on its training images (the
    categorical's pseudo-count chosen on its validation images), scored on its test images
    in nats per image."""
    L, D = task.L, task.dim
    a = best_categorical(task.x_train, task.x_val_lattice, L)
    return {"uniform": uniform(D, L),
            "categorical": categorical(task.x_train, task.x_test_lattice, L, a),
            "categorical_pseudo_count": a,
            "gaussian": gaussian(task.x_fit, task.x_test, L)}
