"""The whitening `vsearch train` ships beside its weights, learned from pairs of images of the same product.

Each pair is a training product's catalog image, embedded as the index embeds it, and a phone-photo-like view
of it (training augmentations, on a cluttered or on its own background), embedded as `Searcher.search` embeds a
shopper's photo. `engine.pooling.learned_projection` turns the pairs into a projection that damps what differs
between the two; the index centres its catalog and applies it instead of a PCA whitening of the catalog.
Where the catalog labels its products with categories, the directions that tell the categories apart
(`engine.pooling.category_directions` on training products' catalog images, embedded as the index embeds
them and projected) are then stretched by 1 + `category_stretch`, so that the nearest products share the
query's category more often. The file lies beside the weights (`weights.whitening.npz` for `weights.pth`) and
records the settings it was fitted with: it only fits vectors embedded the same way.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from engine.augment import TRAIN_PARAMS, photo_like
from engine.errors import CatalogError, SettingsError, WeightsError
from engine.features import FeatureExtractor
from engine.images import ImageRejected, load_image_file
from engine.pooling import Whitening, category_directions, l2n, learned_projection, stretch_directions
from engine.settings import EngineSettings, learned_whitening_file

log = logging.getLogger(__name__)

POOLING = "gem"  # the pooling `vsearch train` trains and its model card gives
SHRINKAGE = 0.1
# The query views of each product: the shopper's photo on a busy background, and on the product's own.
PAIR_VIEWS = (("cluttered", True), ("plain", False))
MAX_SIDE = 512  # larger catalog images are shrunk to this before augmenting (bounds the time per pair)
CATEGORY_REGULARISATION = 0.1  # of the within-class covariance, x its mean variance
MIN_CATEGORY_PRODUCTS = 10  # a category with fewer readable products is left out of the category directions


@dataclass(frozen=True)
class LearnedWhiteningInfo:
    """What a learned whitening was fitted with; vectors embedded otherwise do not fit it."""

    weights_id: str
    image_size: int
    feature_block: int
    framing: str
    pooling: str
    products: int
    pairs: int
    shrinkage: float
    seed: int
    # Files written before the category stretch existed load with these defaults: no stretch.
    category_stretch: float = 0.0  # the category directions scaled by 1 + this (0: none)
    categories: str = ""  # the categories those directions tell apart, comma-separated
    category_products: int = 0  # labelled products they were found on

    def mismatch(self, weights_id: str, image_size: int, feature_block: int, framing: str, pooling: str) -> str | None:
        """Why vectors of these settings do not fit this whitening; None when they do."""
        wanted = {"weights": weights_id, "image size": image_size, "conv block": feature_block, "framing": framing,
                  "pooling": pooling}
        fitted = {"weights": self.weights_id, "image size": self.image_size, "conv block": self.feature_block,
                  "framing": self.framing, "pooling": self.pooling}
        same = {k: wanted[k] == fitted[k] for k in wanted}
        # The weights' content counts, not their file name ("file:NAME:SHA256PREFIX").
        same["weights"] = weights_id.rsplit(":", 1)[-1] == self.weights_id.rsplit(":", 1)[-1]
        diffs = [f"{k} {fitted[k]} (now {wanted[k]})" for k in wanted if not same[k]]
        return "fitted with " + ", ".join(diffs) if diffs else None


@dataclass(frozen=True)
class LearnedWhitening:
    projection: np.ndarray  # (D, D)
    info: LearnedWhiteningInfo


def _read(source: str) -> Image.Image | None:
    try:
        img = load_image_file(source, draft_size=MAX_SIDE)
    except (ImageRejected, OSError) as exc:
        log.warning("learned whitening: %s left out (%s)", source, exc)
        return None
    img.thumbnail((MAX_SIDE, MAX_SIDE))
    return img.convert("RGB")


def _readable_batches(
    sources: Sequence[str], batch_size: int, desc: str, progress: bool
) -> Iterator[list[tuple[int, Image.Image]]]:
    """Batches of (position in `sources`, image), unreadable images left out, under a progress bar."""
    with tqdm(total=len(sources), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(sources), batch_size):
            chunk = sources[start : start + batch_size]
            batch = [(n, img) for n, source in enumerate(chunk, start) if (img := _read(source)) is not None]
            if batch:
                yield batch
            bar.update(len(chunk))


def pair_vectors(
    extractor: FeatureExtractor, sources: Sequence[str], seed: int, batch_size: int = 16, progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(anchors, positives): one pair per image and query view; unreadable images are left out."""
    anchors: list[np.ndarray] = []
    positives: list[np.ndarray] = []
    for batch in _readable_batches(sources, batch_size, "learned whitening", progress):
        catalog = extractor.embed([extractor.frame_catalog_image(img) for _, img in batch], POOLING)
        for kind, clutter in PAIR_VIEWS:
            views = [photo_like(img, TRAIN_PARAMS.rng(seed, f"whiten:{kind}:{n}:{sources[n]}"), clutter=clutter,
                                params=TRAIN_PARAMS) for n, img in batch]
            anchors.append(catalog)
            positives.append(extractor.embed_queries(views, POOLING))
    if not anchors:
        raise CatalogError(f"none of the {len(sources)} images chosen for the learned whitening could be read",
                           "Check the catalog's image files, or train with --whitening-products 0.")
    return np.concatenate(anchors), np.concatenate(positives)


@dataclass(frozen=True)
class CategoryDirections:
    directions: np.ndarray  # (D, k) orthonormal, in the projected space
    categories: list[str]
    products: int


def find_category_directions(
    extractor: FeatureExtractor, projection: np.ndarray, labelled: Sequence[tuple[str, str]], batch_size: int = 16,
    progress: bool = True,
) -> CategoryDirections | None:
    """The directions that tell apart the categories of `labelled` (catalog image, category) once projected;
    None where fewer than 2 categories have MIN_CATEGORY_PRODUCTS readable images."""
    vectors: list[np.ndarray] = []
    labels: list[str] = []
    for batch in _readable_batches([source for source, _ in labelled], batch_size, "category directions", progress):
        vectors.append(extractor.embed([extractor.frame_catalog_image(img) for _, img in batch], POOLING))
        labels += [labelled[n][1] for n, _ in batch]
    counts = Counter(labels)
    kept = [n for n, category in enumerate(labels) if counts[category] >= MIN_CATEGORY_PRODUCTS]
    categories = sorted({labels[n] for n in kept})
    if len(categories) < 2:
        log.info("learned whitening: no category directions (%d categories with %d or more readable products)",
                 len(categories), MIN_CATEGORY_PRODUCTS)
        return None
    x = np.concatenate(vectors)[kept].astype(np.float64)
    projected = l2n((x - x.mean(axis=0)) @ np.asarray(projection, dtype=np.float64))
    directions = category_directions(projected, [labels[n] for n in kept], CATEGORY_REGULARISATION)
    return CategoryDirections(directions, categories, len(kept))


def fit_learned_whitening(
    extractor: FeatureExtractor, sources: Sequence[str], products: int, seed: int, progress: bool = True,
    labelled: Sequence[tuple[str, str]] = (), category_stretch: float = 0.0,
) -> LearnedWhitening:
    """Fit on `sources` (catalog images of `products` training products) embedded by `extractor`; then, where
    `category_stretch` > 0, stretch the directions that tell apart the categories of `labelled`
    ((catalog image, category) of training products)."""
    anchors, positives = pair_vectors(extractor, sources, seed, progress=progress)
    projection = learned_projection(anchors, positives, SHRINKAGE)
    info = LearnedWhiteningInfo(
        weights_id=extractor.weights_id, image_size=extractor.image_size, feature_block=extractor.feature_block,
        framing=extractor.framing, pooling=POOLING, products=products, pairs=len(anchors), shrinkage=SHRINKAGE,
        seed=seed,
    )
    found = find_category_directions(extractor, projection, labelled, progress=progress) if (
        category_stretch > 0 and labelled) else None
    if found is not None:
        projection = stretch_directions(projection, found.directions, category_stretch)
        info = replace(info, category_stretch=category_stretch, categories=",".join(found.categories),
                       category_products=found.products)
    return LearnedWhitening(projection, info)


def save_learned_whitening(learned: LearnedWhitening, path: Path) -> str:
    """Write atomically; returns the file's sha256."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, projection=learned.projection, **{k: np.asarray(v) for k, v in asdict(learned.info).items()})
    tmp.replace(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


_REDO = ("Fit it again (`benchmarks/learned_whitening.py`, or train again), or delete the file: the index then "
         "uses PCA whitening.")


def load_learned_whitening(weights: str) -> LearnedWhitening | None:
    """The learned whitening beside a weights file; None for "imagenet", "random" or weights without one."""
    if weights in ("imagenet", "random"):
        return None
    path = learned_whitening_file(weights)
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            stored = {f.name: data[f.name].item() for f in fields(LearnedWhiteningInfo) if f.name in data.files}
            projection = data["projection"].astype(np.float32)
        info = LearnedWhiteningInfo(**stored)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise WeightsError(f"the learned whitening {path} cannot be read ({exc})", _REDO) from None
    if projection.ndim != 2 or projection.shape[0] != projection.shape[1]:
        raise WeightsError(f"the learned whitening {path} holds no square projection", _REDO)
    return LearnedWhitening(projection, info)


def index_whitening(
    matrix: np.ndarray, settings: EngineSettings, extractor: FeatureExtractor
) -> tuple[Whitening | None, str]:
    """The whitening an index build applies, and which ("learned", "pca" or "off"): the learned one where
    VSEARCH_WHITENING allows it and the weights carry one fitted with the engine's settings, else PCA."""
    if not settings.whitening or len(matrix) < 2:
        return None, "off"
    dims = settings.index_dims or None
    if settings.whitening_method in ("auto", "learned"):
        learned, why = matching_learned_whitening(settings.weights, extractor, settings.pooling)
        if learned is not None:
            return Whitening.fit(matrix, dims=dims, learned=learned.projection), "learned"
        if why is not None and settings.whitening_method == "learned":
            raise SettingsError("VSEARCH_WHITENING", f"'learned', but the learned whitening was {why}; "
                                "set the engine back to those settings, or VSEARCH_WHITENING=pca")
        if why is not None:
            log.warning("the learned whitening beside the weights was %s: PCA whitening instead", why)
    return Whitening.fit(matrix, dims=dims), "pca"


def matching_learned_whitening(
    weights: str, extractor: FeatureExtractor, pooling: str
) -> tuple[LearnedWhitening | None, str | None]:
    """(the weights' learned whitening, None) where it fits what `extractor` embeds with `pooling`;
    (None, why not) where it does not; (None, None) where the weights have none."""
    learned = load_learned_whitening(weights)
    if learned is None:
        return None, None
    why = learned.info.mismatch(extractor.weights_id, extractor.image_size, extractor.feature_block,
                                extractor.framing, pooling)
    return (None, why) if why else (learned, None)
