"""Pooling and whitening on hand-made feature maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.pooling import POOLINGS, Whitening, l2n, pool, raw_flat, rmac_regions


def maps_2x2() -> torch.Tensor:
    # one image, two channels, 2x2 map: channel 0 = [[1, 3], [0, 0]], channel 1 = [[2, 2], [2, 2]]
    return torch.tensor([[[[1.0, 3.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]]]])


def test_max_avg_gem_by_hand():
    m = maps_2x2()
    np.testing.assert_allclose(pool(m, "max")[0], l2n(np.array([3.0, 2.0])), rtol=1e-5)
    np.testing.assert_allclose(pool(m, "avg")[0], l2n(np.array([1.0, 2.0])), rtol=1e-5)
    # GeM p=3: ((1 + 27 + 0 + 0) / 4) ** (1/3) = 7 ** (1/3); channel 1 stays 2
    np.testing.assert_allclose(pool(m, "gem")[0], l2n(np.array([7 ** (1 / 3), 2.0])), rtol=1e-4)


@pytest.mark.parametrize("method", POOLINGS)
def test_every_pooling_is_unit_length(method):
    maps = torch.rand(3, 512, 14, 14)
    vectors = pool(maps, method)
    assert vectors.shape == (3, 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_rmac_regions_cover_the_map():
    regions = rmac_regions(14, 14)
    covered = np.zeros((14, 14), bool)
    for y, x, h, w in regions:
        assert y >= 0 and y + h <= 14 and x >= 0 and x + w <= 14
        covered[y : y + h, x : x + w] = True
    assert covered.all() and len(regions) > 3


def test_raw_flat_is_the_seed_vector():
    maps = torch.rand(2, 512, 14, 14)
    assert raw_flat(maps).shape == (2, 512 * 7 * 7)


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(maps_2x2(), "median")


def test_whitening_decorrelates_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))  # correlated
    vectors = l2n(base)
    white = Whitening.fit(vectors, shrinkage=0.0)
    projected = (vectors - white.mean) @ white.projection
    cov = np.cov(projected, rowvar=False)
    np.testing.assert_allclose(cov, np.eye(8), atol=0.05)
    out = white.apply(vectors)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    white.save(tmp_path / "w.npz")
    again = Whitening.load(tmp_path / "w.npz")
    np.testing.assert_allclose(again.apply(vectors), out, rtol=1e-5)


def test_whitening_dims_keeps_the_leading_directions_whitened_as_at_full_dims():
    rng = np.random.default_rng(1)
    vectors = l2n(rng.normal(size=(300, 16)) * np.arange(16, 0, -1))  # falling variance spectrum
    full = Whitening.fit(vectors)
    reduced = Whitening.fit(vectors, dims=6)
    assert full.dims == 16 and reduced.dims == 6
    np.testing.assert_allclose(reduced.mean, full.mean)
    # The same first 6 columns (eigenvectors up to sign, same shrunk scale): truncation changes nothing else.
    np.testing.assert_allclose(np.abs(reduced.projection), np.abs(full.projection[:, :6]), rtol=1e-4, atol=1e-6)
    out = reduced.apply(vectors)
    assert out.shape == (300, 6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert Whitening.fit(vectors, dims=64).dims == 16  # more than there are: all of them


def test_whitening_refuses_zero_dims():
    with pytest.raises(ValueError, match="dims"):
        Whitening.fit(l2n(np.eye(4) + 0.1), dims=0)
