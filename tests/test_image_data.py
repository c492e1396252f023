"""Images as data (image_data.py): the fixed train / test split, IDX files, the grey levels and
the dequantised images' continuous density and its units, image grids."""
import gzip
import math

import numpy as np
import pytest
import torch

import image_data


@pytest.fixture(scope="module")
def digits():
    return image_data.load_images("digits")


# ----------------------------------------------------------------------------- files and split
def test_digits_split_and_range(digits):
    x_train, y_train, x_test, y_test = digits
    assert x_train.shape == (1348, 64) and x_test.shape == (449, 64)
    assert float(x_train.min()) == -1.0 and float(x_train.max()) == 1.0
    assert set(y_test.tolist()) == set(range(10))
    # the split is fixed, whatever the global seed
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(image_data.load_images("digits")[2], x_test)


def fake_mnist(tmp_path, n=60, gz=False):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    paths = []
    for name, arr in (("images", images), ("labels", labels)):
        p = str(tmp_path / f"{name}-idx")
        image_data.write_idx(p, arr)
        if gz:
            with open(p, "rb") as fh, gzip.open(p + ".gz", "wb") as out:
                out.write(fh.read())
            p += ".gz"
        paths.append(p)
    return paths


def test_mnist_idx_loads_gz(tmp_path):
    imgs, labels = fake_mnist(tmp_path, gz=True)
    x_train, y_train, x_test, y_test = image_data.load_images("mnist", imgs, labels)
    assert x_train.shape == (54, 784) and x_test.shape == (6, 784)
    assert -1.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0


def test_mnist_idx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 30).astype(np.uint8)
    image_data.write_idx(tmp_path / "img", images)
    image_data.write_idx(tmp_path / "lab", labels)
    X, y = image_data.load_mnist_idx(str(tmp_path / "img"), str(tmp_path / "lab"))
    assert X.shape == (30, 784) and X.dtype == np.float32
    np.testing.assert_allclose(X, images.reshape(30, -1) / 255.0, atol=1e-7)
    assert np.array_equal(y, labels)
    with pytest.raises(FileNotFoundError):
        image_data.load_mnist_idx(str(tmp_path / "missing"), str(tmp_path / "lab"))


# ----------------------------------------------------------------------------- dequantisation
def test_levels_round_trip_and_dequantised_points_stay_in_their_cell():
    L = 17
    k = torch.randint(0, L, (50, 64)).float()
    x = 2 * k / (L - 1) - 1
    assert torch.equal(image_data.levels(x, L), k)
    y = image_data.dequantize(x, L, torch.Generator().manual_seed(1))
    v = (y + 1) * L / 2          # back on the [0, L) scale
    assert ((v >= k) & (v < k + 1)).all()


def test_off_lattice_images_are_refused():
    with pytest.raises(ValueError, match="lattice"):
        image_data.levels(torch.tensor([[0.01, 0.5]]), 17)


def test_uniform_density_scores_log2_L_bits_per_dim():
    """The uniform density on [-1, 1]^D, log p_y = -D log 2, is uniform on [0, L)^D:
    log p_v = -D log L, i.e. log2(L) bits per dimension."""
    D, L = 64, 17
    log_p_y = torch.tensor(-D * math.log(2.0))
    assert float(image_data.to_nats(log_p_y, D, L)) == pytest.approx(-D * math.log(L))
    assert float(image_data.bits_per_dim(log_p_y, D, L)) == pytest.approx(math.log2(L))


def test_dequantised_log_likelihood_bounds_the_discrete_one():
    """For a product density p_y, E_u log p_v(k + u) <= log P(k) where P(k) is the mass of
    the cell: checked on a 1-pixel Gaussian with the mass integrated exactly."""
    L = 5
    normal = torch.distributions.Normal(torch.tensor(0.2, dtype=torch.float64), 0.4)
    k = torch.arange(L, dtype=torch.float64)
    lo, hi = 2 * k / L - 1, 2 * (k + 1) / L - 1
    log_P = torch.log(normal.cdf(hi) - normal.cdf(lo))
    u = torch.linspace(0.0005, 0.9995, 1000, dtype=torch.float64)
    y = 2 * (k[:, None] + u) / L - 1
    mean_log_pv = image_data.to_nats(normal.log_prob(y), 1, L).mean(1)
    assert (mean_log_pv <= log_P + 1e-9).all()
    # and tight to within the curvature of log p over a cell (0.24 nats at the far tail
    # cell here): a Jacobian off by log 2 per pixel breaks one of the two
    assert (log_P - mean_log_pv).max() < 0.3


def test_the_test_set_is_the_same_draw_every_time():
    x = 2 * torch.randint(0, 17, (10, 64)).float() / 16 - 1
    assert torch.equal(image_data.test_set(x, 17), image_data.test_set(x, 17))


# ----------------------------------------------------------------------------- grids
def test_grid_tiles_images_row_by_row_between_grey_pads():
    """Image i sits at row i // nrow, column i % nrow of the grid, one grey (128) pixel
    around each; pixel values -1 and 1 are 0 and 255; missing cells stay grey."""
    x = torch.stack([torch.full((6,), -1.0 + 2 * i / 4) for i in range(5)])  # 5 flat 2x3
    g = image_data.grid_array(x, (1, 2, 3), nrow=3)
    assert g.shape == (2 * 3 + 1, 3 * 4 + 1) and g.dtype == np.uint8
    for i in range(5):
        r, c = divmod(i, 3)
        cell = g[1 + 3 * r: 3 + 3 * r, 1 + 4 * c: 4 + 4 * c]
        assert (cell == round((x[i, 0].item() + 1) * 127.5)).all(), (i, cell)
    assert g[1 + 3, 1 + 4 * 2] == 128 and (g[0] == 128).all() and (g[:, 4] == 128).all()
    assert image_data.to_uint8(torch.tensor([[-3.0, 1.0]]), (1, 1, 2)).tolist() == [[[0, 255]]]
