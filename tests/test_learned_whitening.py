"""The whitening learned from pairs: its maths on hand-made vectors, its file, its settings."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import SettingsError, WeightsError
from engine.learned_whitening import (
    LearnedWhitening,
    LearnedWhiteningInfo,
    load_learned_whitening,
    save_learned_whitening,
)
from engine.pooling import Whitening, l2n, learned_projection
from engine.settings import EngineSettings, learned_whitening_file


def nuisance_pairs(seed: int = 0, n: int = 300, dims: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(catalog vectors, photo vectors, a second set of photos): products differ in every direction a little;
    a photo adds a large nuisance along the first 3 directions (background, light) that carries no identity."""
    rng = np.random.default_rng(seed)
    products = rng.normal(size=(n, dims))
    scale = np.r_[np.full(3, 6.0), np.full(dims - 3, 0.3)]

    def photos() -> np.ndarray:
        return l2n(products + rng.normal(size=(n, dims)) * scale)

    return l2n(products), photos(), photos()


def recall_at_1(index: np.ndarray, queries: np.ndarray) -> float:
    return float(np.mean(np.argmax(queries @ index.T, axis=1) == np.arange(len(queries))))


def test_learned_whitening_damps_what_differs_between_a_product_and_its_photos():
    catalog, photos, fresh = nuisance_pairs()
    projection = learned_projection(catalog, photos)
    assert projection.shape == (16, 16) and projection.dtype == np.float32
    learned = Whitening.fit(catalog, learned=projection)
    pca = Whitening.fit(catalog)
    # Measured on photos the projection never saw: the nuisance directions no longer decide.
    plain = recall_at_1(catalog, fresh)
    with_pca = recall_at_1(pca.apply(catalog), pca.apply(fresh))
    with_learned = recall_at_1(learned.apply(catalog), learned.apply(fresh))
    assert with_learned > 0.9 and with_learned > plain + 0.3 and with_learned > with_pca + 0.3, (
        plain, with_pca, with_learned)


def test_learned_whitening_centres_on_the_catalog_and_keeps_the_requested_dims():
    catalog, photos, _ = nuisance_pairs(seed=1)
    projection = learned_projection(catalog, photos)
    full = Whitening.fit(catalog, learned=projection)
    np.testing.assert_allclose(full.mean, catalog.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(full.projection, projection, rtol=1e-6)
    reduced = Whitening.fit(catalog, dims=5, learned=projection)
    assert reduced.dims == 5 and reduced.apply(catalog).shape == (300, 5)
    # The kept directions are the leading principal ones of the projected catalog: most of its variance.
    projected = (catalog - full.mean) @ projection
    kept = (catalog - reduced.mean) @ reduced.projection
    assert kept.var(axis=0).sum() >= 5 / 16 * projected.var(axis=0).sum()
    with pytest.raises(ValueError, match="does not fit"):
        Whitening.fit(catalog[:, :8], learned=projection)
    with pytest.raises(ValueError, match="pairs"):
        learned_projection(catalog, photos[:10])


def info(**changes) -> LearnedWhiteningInfo:
    fields = {"weights_id": "file:weights.pth:0123456789ab", "image_size": 160, "feature_block": 4,
              "framing": "masked", "pooling": "gem", "products": 300, "pairs": 600, "shrinkage": 0.1, "seed": 0}
    return LearnedWhiteningInfo(**{**fields, **changes})


def test_a_learned_whitening_fits_only_vectors_embedded_as_it_was_fitted():
    fitted = info()
    assert fitted.mismatch("file:weights.pth:0123456789ab", 160, 4, "masked", "gem") is None
    assert fitted.mismatch("file:shop.pth:0123456789ab", 160, 4, "masked", "gem") is None  # renamed, same content
    why = fitted.mismatch("file:weights.pth:0123456789ab", 224, 4, "whole", "gem")
    assert why is not None and "image size 160 (now 224)" in why and "framing masked (now whole)" in why
    assert "weights" in (fitted.mismatch("file:weights.pth:ffffffffffff", 160, 4, "masked", "gem") or "")


def test_the_file_beside_the_weights_round_trips(tmp_path):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not read here")
    assert load_learned_whitening(str(weights)) is None and load_learned_whitening("random") is None
    projection = np.eye(4, dtype=np.float32) * 2
    path = learned_whitening_file(str(weights))
    assert path.name == "weights.whitening.npz"
    sha256 = save_learned_whitening(LearnedWhitening(projection, info()), path)
    assert len(sha256) == 64 and not list(tmp_path.glob("*.tmp*"))
    loaded = load_learned_whitening(str(weights))
    assert loaded is not None and loaded.info == info()
    np.testing.assert_array_equal(loaded.projection, projection)
    path.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="cannot be read"):
        load_learned_whitening(str(weights))


def test_whitening_setting_takes_yes_no_pca_or_learned(tmp_path):
    def parsed(value: str, weights: str = "random") -> tuple[bool, str]:
        settings = EngineSettings.from_env({"VSEARCH_WEIGHTS": weights, "VSEARCH_WHITENING": value})
        return settings.whitening, settings.whitening_method

    assert parsed("") == (True, "auto") and parsed("true") == (True, "auto") and parsed("no") == (False, "auto")
    assert parsed("PCA") == (True, "pca")
    with pytest.raises(SettingsError, match="VSEARCH_WHITENING.*no learned whitening"):
        parsed("learned")
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"x")
    save_learned_whitening(LearnedWhitening(np.eye(4, dtype=np.float32), info()), learned_whitening_file(str(weights)))
    assert parsed("learned", str(weights)) == (True, "learned")
    with pytest.raises(SettingsError, match="VSEARCH_WHITENING"):
        parsed("sometimes")
