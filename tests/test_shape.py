"""Silhouettes from the mask head (engine.shape) and the category vote they choose the voters of."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from engine.augment import clean_crop
from engine.localize import MASK_PREFIX, CleanupParams, MaskHead, block_outputs
from engine.ranking import ProductHit, category_vote_rerank, shape_voters
from engine.shape import SHAPE_CELLS, SHAPE_GRID, ShapeSpace, silhouette, silhouettes
from engine.weights import random_features

PARAMS = CleanupParams()


def rectangle(rows: slice, cols: slice, side: int = 40, p: float = 0.9) -> np.ndarray:
    prob = np.full((side, side), 0.02, np.float32)
    prob[rows, cols] = p
    return prob


def test_a_silhouette_is_the_products_outline_cropped_padded_and_shrunk() -> None:
    wide = silhouette(rectangle(slice(12, 20), slice(4, 36)), PARAMS).reshape(SHAPE_GRID, SHAPE_GRID)
    # 32 x 8 cells with a 10% margin: a flat band across the middle of a square grid
    assert wide.shape == (8, 8)
    assert wide[3:5, 1:-1].min() > 0.6 and wide[0].max() < 0.1 and wide[-1].max() < 0.1
    assert np.allclose(wide[:, 0], wide[:, -1])  # centred
    # where the product lies and how large it is do not matter; its outline does
    moved = silhouette(rectangle(slice(25, 29), slice(10, 26)), PARAMS)
    assert np.allclose(silhouette(rectangle(slice(2, 6), slice(20, 36)), PARAMS), moved, atol=1e-6)
    tall = silhouette(rectangle(slice(4, 36), slice(12, 20)), PARAMS).reshape(SHAPE_GRID, SHAPE_GRID)
    assert np.allclose(tall, wide.T, atol=0.05)


def test_an_untrusted_mask_has_no_silhouette() -> None:
    tiny = rectangle(slice(0, 2), slice(0, 2))  # 0.25% of the map
    everything = np.full((40, 40), 0.99, np.float32)
    both = silhouettes(np.stack([tiny, everything]), PARAMS)
    assert both.shape == (2, SHAPE_CELLS) and not both.any()
    assert silhouettes(np.zeros((0, 40, 40), np.float32), PARAMS).shape == (0, SHAPE_CELLS)


def test_shape_space_centres_on_the_trusted_silhouettes_and_keeps_untrusted_ones_at_zero(tmp_path) -> None:
    shapes = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    space = ShapeSpace.fit(shapes)
    assert np.allclose(space.mean, [0.5, 0.5, 0.0])  # the all-zero row is not a silhouette
    applied = space.apply(shapes)
    assert np.allclose(np.linalg.norm(applied[:2], axis=1), 1.0) and not applied[2].any()
    assert applied[0] @ applied[1] == pytest.approx(-1.0)
    space.save(tmp_path / "shapes.npz", applied)
    loaded, catalog = ShapeSpace.load(tmp_path / "shapes.npz")
    assert np.array_equal(loaded.mean, space.mean) and np.array_equal(catalog, applied)


def test_shape_voters_choose_who_votes_not_the_order_of_the_results() -> None:
    category = {"a": "shoes", "b": "shoes", "c": "boots", "d": "boots", "e": "boots"}
    hits = [ProductHit("a", 0.90, 0), ProductHit("b", 0.88, 1), ProductHit("c", 0.80, 2),
            ProductHit("d", 0.79, 3), ProductHit("e", 0.70, 4)]
    outline = [0.0, 0.1, 0.9, 0.8, 0.9]  # the photo's outline is a boot's
    assert [h.product_id for h in shape_voters(hits, outline, 0.0)] == ["a", "b", "c", "d", "e"]
    assert [h.product_id for h in shape_voters(hits, outline, 0.5)] == ["c", "e", "d", "b", "a"]
    # 3 voters: by similarity shoes 2/3; by similarity and outline boots 3/3
    plain = category_vote_rerank(hits, category.get, float("inf"), neighbours=3)
    shaped = category_vote_rerank(hits, category.get, float("inf"), neighbours=3,
                                  voters=shape_voters(hits, outline, 0.5))
    assert [h.product_id for h in plain] == ["a", "b", "c", "d", "e"]
    assert [h.product_id for h in shaped] == ["c", "d", "e", "a", "b"]
    assert {h.product_id: h.score for h in shaped} == {h.product_id: h.score for h in hits}
    with pytest.raises(ValueError):
        shape_voters(hits, outline[:2], 0.5)
    with pytest.raises(ValueError):
        shape_voters(hits, outline, 1.5)


class NotWhiteHead(torch.nn.Module):
    """A stand-in mask head: the product is whatever does not look like a blank white canvas to conv block 3
    (`reference`: block 3's output for an all-white image of the same size)."""

    image_size = torch.tensor(128)

    def __init__(self, reference: torch.Tensor) -> None:
        super().__init__()
        self.reference = reference

    def forward(self, block3: torch.Tensor, block4: torch.Tensor, block5: torch.Tensor) -> torch.Tensor:
        distance = (block3.float() - self.reference).abs().mean(1, keepdim=True)
        return 20 * (distance / (distance.amax(dim=(2, 3), keepdim=True) + 1e-6) - 0.1)


@pytest.fixture(scope="module")
def styles_catalog(tmp_path_factory):
    """10 products of each of the demo's 4 styles: enough for 10 voters of one style."""
    from indexer.demo import make_demo_catalog

    return make_demo_catalog(tmp_path_factory.mktemp("styles"), products=40, image_size=256)


@pytest.fixture(scope="module")
def shaped_index(styles_catalog, tmp_path_factory):
    """An index built with masked pooling: the catalog's silhouettes drawn by the stand-in head."""
    from engine.features import FeatureExtractor, preprocess
    from engine.settings import EngineSettings
    from indexer.build import build_index

    folder = tmp_path_factory.mktemp("shaped")
    state = dict(random_features("vgg16_bn").state_dict())
    state.update({MASK_PREFIX + k: v for k, v in MaskHead(image_size=128).state_dict().items()})
    torch.save(state, folder / "trained.pth")
    extractor = FeatureExtractor(str(folder / "trained.pth"), "fp32", image_size=128, localize="mask", feature_block=4)
    white = torch.from_numpy(preprocess(Image.new("RGB", (128, 128), "white"), 128)[None])
    with torch.inference_mode():
        extractor.mask_head = NotWhiteHead(block_outputs(extractor.model, white)[2].float())
    settings = EngineSettings(data_dir=folder / "data", weights=str(folder / "trained.pth"), image_size=128,
                              localize="mask", feature_block=4, pooling="gem", shape_weight=1.0,
                              category_boost=float("inf"))
    build_index(styles_catalog, settings, extractor=extractor)
    return settings, extractor


def test_an_index_built_with_masked_pooling_keeps_silhouettes_that_tell_the_styles_apart(shaped_index) -> None:
    from engine.index import IndexStore

    settings, extractor = shaped_index
    assert extractor.gives_shapes
    index = IndexStore(settings.index_dir).load()
    assert index.manifest.shapes and index.shapes is not None and index.shape_space is not None
    assert index.shapes.shape == (len(index.image_products), SHAPE_CELLS)
    assert np.allclose(np.linalg.norm(index.shapes, axis=1), 1.0, atol=1e-5)  # every demo mask is trusted
    # boots are tall, sandals flat: each image's nearest outline is of its own style
    styles = np.array([index.products[p].category for p in index.image_products])
    similarity = index.shapes @ index.shapes.T
    np.fill_diagonal(similarity, -np.inf)
    assert (styles[similarity.argmax(axis=1)] == styles).mean() >= 0.9


def test_a_photos_outline_chooses_the_voters_of_the_search(shaped_index, styles_catalog) -> None:
    import random

    from engine.ranking import RERANK_POOL
    from engine.search import Searcher

    settings, extractor = shaped_index
    source = styles_catalog.parent / "images" / "demo-002-1.jpg"
    photo = clean_crop(Image.open(source), random.Random(3))
    data = io.BytesIO()
    photo.save(data, format="JPEG", quality=90)
    searcher = Searcher(settings, extractor=extractor)  # shape weight 1, boost inf
    index = searcher._current()
    _, shapes = searcher.embed_images([Image.open(io.BytesIO(data.getvalue()))])
    assert shapes[0] is not None and shapes[0].shape == (SHAPE_CELLS,)
    query_shape = index.shape_space.apply(shapes[0][None])[0]
    own_row = index.image_sources.index(str(source))
    assert float(query_shape @ index.shapes[own_row]) > 0.6  # the photo and its catalog image are framed alike

    # the same 20 products as without the vote, the photo's outline against each one's image choosing the voters
    unvoted = dataclasses.replace(settings, category_boost=0.0)
    pool = Searcher(unvoted, extractor=extractor).search(data.getvalue(), RERANK_POOL).matches
    hits = [ProductHit(m.product.id, m.score, index.image_sources.index(m.image)) for m in pool]
    outline = [float(index.shapes[h.image_index] @ query_shape) for h in hits]
    expected = category_vote_rerank(hits, lambda pid: index.products[pid].category, float("inf"),
                                     voters=shape_voters(hits, outline, 1.0))
    found = searcher.search(data.getvalue(), 8).matches
    assert [(m.product.id, m.score) for m in found] == [(h.product_id, h.score) for h in expected[:8]]
    plain_vote = Searcher(dataclasses.replace(settings, shape_weight=0.0), extractor=extractor)
    assert [m.product.id for m in plain_vote.search(data.getvalue(), 8).matches] != [m.product.id for m in found]


def test_shape_weight_setting_validates() -> None:
    from engine.errors import SettingsError
    from engine.settings import DEFAULT_SHAPE_WEIGHT, EngineSettings

    assert EngineSettings.from_env({}).shape_weight == DEFAULT_SHAPE_WEIGHT
    assert EngineSettings.from_env({"VSEARCH_SHAPE_WEIGHT": "0"}).shape_weight == 0.0
    assert EngineSettings.from_env({"VSEARCH_SHAPE_WEIGHT": " 1 "}).shape_weight == 1.0
    for bad in ("-0.1", "1.5", "inf", "nan", "half"):
        with pytest.raises(SettingsError, match="VSEARCH_SHAPE_WEIGHT"):
            EngineSettings.from_env({"VSEARCH_SHAPE_WEIGHT": bad})


def test_eval_measures_the_vote_with_voters_chosen_by_silhouette(shaped_index, styles_catalog) -> None:
    from engine.evaluate import run_eval

    _, extractor = shaped_index
    report = run_eval(styles_catalog, extractor=extractor, poolings=("gem",), whitening=(False,), queries=("clean",),
                      include_seed_baseline=False, localize=True, category_boosts=(float("inf"),),
                      shape_weights=(1.0,), progress=False)
    metrics = {m.method: m.metrics for m in report.methods}
    assert set(metrics) == {"gem", "gem+catinf", "gem+catinf+shape1"}
    # the demo's styles differ in outline: voters chosen by it alone find the query's style more often
    assert metrics["gem+catinf+shape1"]["category_p5"] > metrics["gem+catinf"]["category_p5"]
    with pytest.raises(ValueError, match="shape_weights"):
        run_eval(styles_catalog, extractor=extractor, shape_weights=(0.0,), progress=False)
