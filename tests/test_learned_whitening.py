"""The whitening learned from pairs: its maths on hand-made vectors, its file, its settings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.errors import SettingsError, WeightsError
from engine.features import FeatureExtractor
from engine.learned_whitening import (
    MIN_CATEGORY_PRODUCTS,
    LearnedWhitening,
    LearnedWhiteningInfo,
    find_category_directions,
    fit_learned_whitening,
    load_learned_whitening,
    save_learned_whitening,
)
from engine.pooling import Whitening, category_directions, l2n, learned_projection, stretch_directions
from engine.settings import EngineSettings, learned_whitening_file
from indexer.demo import make_demo_catalog


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


def categorised(seed: int = 0, per_class: int = 60, dims: int = 12) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(vectors, labels, the direction that tells the 3 classes apart): the classes differ by a small shift
    along one direction, while every vector also varies a lot along others (that a plain PCA would favour)."""
    rng = np.random.default_rng(seed)
    axis = np.zeros(dims)
    axis[5] = 1.0
    scale = np.r_[np.full(3, 3.0), np.full(dims - 3, 0.3)]
    vectors = np.concatenate([rng.normal(size=(per_class, dims)) * scale + shift * axis for shift in (-1.0, 0.0, 1.0)])
    labels = [name for name in ("boots", "sandals", "shoes") for _ in range(per_class)]
    return vectors, labels, axis


def precision_at_5(vectors: np.ndarray, labels: list[str]) -> float:
    similarity = l2n(vectors) @ l2n(vectors).T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argsort(-similarity, axis=1)[:, :5]
    of = np.asarray(labels)
    return float(np.mean(of[nearest] == of[:, None]))


def test_category_directions_find_what_tells_the_classes_apart():
    vectors, labels, axis = categorised()
    directions = category_directions(vectors, labels)
    assert directions.shape == (12, 2)  # classes - 1
    np.testing.assert_allclose(directions.T @ directions, np.eye(2), atol=1e-9)
    # The class axis lies in their span (a large share of it), the high-variance nuisance axes do not.
    assert np.linalg.norm(directions.T @ axis) > 0.9
    assert np.linalg.norm(directions[:3]) < 0.5
    # The same span as Fisher's eigenvectors of Sw^-1 Sb (with the same regularisation).
    x, of = np.asarray(vectors), np.asarray(labels)
    groups = [x[of == c] for c in sorted(set(labels))]
    within = sum(np.cov(g, rowvar=False) for g in groups) / 3
    within += 0.1 * np.trace(within) / 12 * np.eye(12)
    between = sum(np.outer(g.mean(0) - x.mean(0), g.mean(0) - x.mean(0)) for g in groups) / 3
    values, vectors_ = np.linalg.eig(np.linalg.solve(within, between))
    fisher, _ = np.linalg.qr(vectors_[:, np.argsort(-values.real)[:2]].real)
    np.testing.assert_allclose(directions @ directions.T, fisher @ fisher.T, atol=1e-6)
    with pytest.raises(ValueError, match="2 or more classes"):
        category_directions(vectors[:60], labels[:60])
    with pytest.raises(ValueError, match="one label per vector"):
        category_directions(vectors, labels[:10])


def test_stretching_the_category_directions_raises_category_precision():
    vectors, labels, _ = categorised(seed=1)
    projection = np.eye(12, dtype=np.float32)
    directions = category_directions(vectors, labels)
    assert stretch_directions(projection, directions, 0.0) == pytest.approx(projection)
    stretched = stretch_directions(projection, directions, 3.0)
    # Along the directions 4x, across them unchanged.
    np.testing.assert_allclose(directions.T @ stretched @ directions, 4 * np.eye(2), atol=1e-5)
    across = np.eye(12) - directions @ directions.T
    np.testing.assert_allclose(stretched @ across, across, atol=1e-5)
    fresh, fresh_labels, _ = categorised(seed=2)  # measured on vectors the directions were not found on
    before = precision_at_5(fresh - fresh.mean(0), fresh_labels)
    after = precision_at_5((fresh - fresh.mean(0)) @ stretched, fresh_labels)
    assert after > before + 0.15, (before, after)


def test_category_directions_of_catalog_images_and_a_stretched_fit(tmp_path):
    catalog = make_demo_catalog(tmp_path, products=2 * 4 * MIN_CATEGORY_PRODUCTS // 2, image_size=64)
    rows = [line.split(",") for line in catalog.read_text().splitlines()[1:]]
    labelled = [(str(tmp_path / row[3]), row[6]) for row in rows if row[6] in ("sneaker", "boot")]
    extractor = FeatureExtractor("random", "fp32", image_size=48)
    projection = np.eye(512, dtype=np.float32)
    found = find_category_directions(extractor, projection, labelled, progress=False)
    assert found is not None and found.categories == ["boot", "sneaker"] and found.products == len(labelled)
    assert found.directions.shape == (512, 1)
    # Too few products of a category: no directions, and a fit with a stretch is left unstretched.
    few = [item for item in labelled if item[1] == "sneaker"] + [item for item in labelled if item[1] == "boot"][:3]
    assert find_category_directions(extractor, projection, few, progress=False) is None
    sources = [source for source, _ in labelled[:6]]
    plain = fit_learned_whitening(extractor, sources, 6, seed=0, progress=False, labelled=few, category_stretch=2.0)
    assert (plain.info.category_stretch, plain.info.categories, plain.info.category_products) == (0.0, "", 0)
    stretched = fit_learned_whitening(extractor, sources, 6, seed=0, progress=False, labelled=labelled,
                                      category_stretch=2.0)
    assert (stretched.info.category_stretch, stretched.info.categories) == (2.0, "boot,sneaker")
    assert stretched.info.category_products == len(labelled)
    assert not np.allclose(stretched.projection, plain.projection)


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
    stretched = info(category_stretch=1.0, categories="boots,shoes", category_products=600)
    save_learned_whitening(LearnedWhitening(projection, stretched), path)
    assert load_learned_whitening(str(weights)).info == stretched
    # A file written before the category stretch existed: no stretch.
    old = {k: v for k, v in dataclasses.asdict(info()).items() if not k.startswith("categor")}
    np.savez(path, projection=projection, **old)
    assert load_learned_whitening(str(weights)).info == info()
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
