"""Frechet distance, per-sample errors, the reference-statistics cache, and the Inception path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edm_sampling.evaluation import metrics
from edm_sampling.evaluation.features import InceptionFeatures, PixelFeatures
from edm_sampling.evaluation.inception import FEATURE_DIM, FIDInceptionV3, load_fid_inception


def test_fid_of_a_set_against_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(300, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    assert metrics.frechet_distance_from_features(features, features) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_direct_matrix_square_root():
    from scipy import linalg

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)
    # symmetric in its arguments
    assert metrics.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(direct, rel=1e-9)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="sigma1 and sigma2"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="features"):
        metrics.feature_statistics(np.zeros((1, 3)))


def test_per_sample_rmse_and_summary():
    reference = torch.zeros(4, 1, 2, 2)
    samples = torch.stack([torch.full((1, 2, 2), v) for v in (0.0, 1.0, 2.0, 10.0)])
    errors = metrics.per_sample_rmse(samples, reference)
    assert errors.tolist() == [0.0, 1.0, 2.0, 10.0]
    summary = metrics.summarize_errors(errors)
    assert summary["error_mean"] == pytest.approx(3.25) and summary["error_median"] == pytest.approx(1.5)
    assert metrics.loglog_slope([1, 10, 100], [1, 1e-2, 1e-4]) == pytest.approx(-2.0)


def test_reference_statistics_are_cached_once(tmp_path):
    calls = []
    data = np.random.default_rng(0).normal(size=(50, 4))

    def compute():
        calls.append(1)
        return data

    path = tmp_path / "stats.npz"
    mu, sigma, cached = metrics.load_or_compute_statistics(path, compute, {"data": "x"})
    mu2, sigma2, cached2 = metrics.load_or_compute_statistics(path, compute, {"data": "x"})
    assert (cached, cached2, len(calls)) == (False, True, 1)
    np.testing.assert_allclose(mu, mu2)
    np.testing.assert_allclose(sigma, sigma2)
    with pytest.raises(ValueError, match="was made for"):
        metrics.load_or_compute_statistics(path, compute, {"data": "other"})


def test_pixel_features_pool_to_at_most_max_dim():
    features = PixelFeatures(max_dim=256)
    assert features(torch.zeros(2, 1, 8, 8)).shape == (2, 64)
    assert features(torch.zeros(2, 3, 32, 32)).shape == (2, 192)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    path = tmp_path_factory.mktemp("inception") / "pt_inception_random.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_inception_loads_a_local_state_dict_and_gives_2048_features(inception_file):
    path, model = inception_file
    loaded = load_fid_inception(path)
    images = torch.rand(2, 3, 16, 16)
    out = loaded(images)
    assert out.shape == (2, FEATURE_DIM)
    torch.testing.assert_close(out, model(images))
    # the extractor takes [-1, 1] images, 1 or 3 channels
    features = InceptionFeatures(path, batch_size=2)
    assert features(torch.rand(3, 1, 8, 8) * 2 - 1).shape == (3, FEATURE_DIM)


def test_inception_file_of_the_wrong_shape_is_rejected(tmp_path):
    path = tmp_path / "wrong.pth"
    state = FIDInceptionV3().state_dict()
    state["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(10, 2048, 1, 1)
    torch.save(state, path)
    with pytest.raises(ValueError, match="wrong shape.*Mixed_7c.branch_pool.conv.weight"):
        load_fid_inception(path)
    small = tmp_path / "small.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, small)
    with pytest.raises(ValueError, match="missing keys"):
        load_fid_inception(small)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        load_fid_inception(garbage)


def test_inception_features_name_their_weights_file_by_size_and_time(inception_file):
    """The cached reference statistics are keyed on the features' description: other weights
    saved at the same path must give another key."""
    import os

    path, _ = inception_file
    before = InceptionFeatures(path).describe((3, 8, 8))
    status = path.stat()
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))
    after = InceptionFeatures(path).describe((3, 8, 8))
    assert before["weights"] == after["weights"] and before != after
