"""Searcher: image bytes -> the most similar catalog products, over the current index version."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from engine.errors import IndexNotReady, ReindexRequired
from engine.features import FeatureExtractor
from engine.images import load_image
from engine.index import IndexStore, LoadedIndex
from engine.ranking import (
    RERANK_POOL,
    angular_to_cosine,
    best_per_product,
    category_rerank,
    category_vote_rerank,
    category_vote_with_silhouettes,
)
from engine.settings import EngineSettings
from engine.types import Match, Product, SearchResult

log = logging.getLogger(__name__)

# Annoy nodes inspected per query; bench shows recall@10 against brute force at these settings.
SEARCH_K_PER_ITEM = 100
MIN_SEARCH_K = 7500
# Whitened vectors (the engine's default index) have a flat spectrum, which Annoy's random splits handle
# badly: `vsearch bench` at 100k synthetic vectors (50 trees then), recall@10 0.78 at 8500 and 0.97 at
# 40000 (p50 1.6 vs 6.9 ms, two runs); with today's 100 trees 0.985 at 40000: a few ms on a search of
# ~45 ms, for recall on large catalogs.
MIN_SEARCH_K_WHITENED = 40000


def annoy_search_k(n: int, whitened: bool) -> int:
    """Annoy's search_k for `n` neighbours: recall first, more of it for whitened indexes."""
    return max(MIN_SEARCH_K_WHITENED if whitened else MIN_SEARCH_K, SEARCH_K_PER_ITEM * n)


def check_compatible(index: LoadedIndex, extractor: FeatureExtractor, pooling: str) -> None:
    """Vectors of other weights, pooling, input size or conv block are not comparable: say so instead of answering."""
    m = index.manifest
    wanted = (extractor.weights_id, pooling, extractor.image_size, extractor.framing, extractor.feature_block)
    built = (m.weights, m.pooling, m.image_size, m.framing, m.feature_block)
    if wanted != built:
        raise ReindexRequired(
            f"The index {m.version} was built with weights {m.weights}, pooling {m.pooling}, "
            f"size {m.image_size}, framing {m.framing}, conv block {m.feature_block}; this engine runs weights "
            f"{wanted[0]}, pooling {wanted[1]}, size {wanted[2]}, framing {wanted[3]} (VSEARCH_LOCALIZE), "
            f"conv block {wanted[4]} (VSEARCH_FEATURE_BLOCK).",
            "Rebuild it with `vsearch index CATALOG` (or /reindex in the chat).",
        )


class Searcher:
    """Thread-safe: the loaded index is swapped as a whole; searches hold a reference to one version."""

    def __init__(self, settings: EngineSettings, extractor: FeatureExtractor | None = None) -> None:
        self.settings = settings
        self.extractor = extractor or FeatureExtractor.from_settings(settings)
        self.store = IndexStore(settings.index_dir)
        self._index: LoadedIndex | None = None
        self._swap_lock = threading.Lock()
        try:
            self.reload_if_changed()
        except ReindexRequired as exc:
            log.warning("%s", exc)  # searches raise it too, until a compatible index is built

    # -- index lifecycle -------------------------------------------------------------------------

    def reload_if_changed(self) -> bool:
        """Re-read the CURRENT pointer; load and swap in the new version if it moved."""
        version = self.store.current_version()
        if version is None:
            return False
        with self._swap_lock:
            if self._index is not None and self._index.version == version:
                return False
            loaded = self.store.load(version)
            check_compatible(loaded, self.extractor, self.settings.pooling)
            self._index = loaded
        log.info("serving index %s (%d products)", version, len(loaded.products))
        return True

    def _current(self) -> LoadedIndex:
        index = self._index
        if index is None:
            self.reload_if_changed()
            index = self._index
        if index is None:
            raise IndexNotReady("No index has been built yet.", "Run `vsearch index CATALOG` first.")
        return index

    @property
    def index_version(self) -> str | None:
        return self._index.version if self._index else None

    @property
    def product_count(self) -> int:
        return len(self._index.products) if self._index else 0

    @property
    def manifest(self):
        return self._current().manifest

    def product(self, product_id: str) -> Product | None:
        return self._index.products.get(product_id) if self._index else None

    def local_image_path(self, product: Product) -> Path | None:
        if product.image.startswith(("http://", "https://")):
            return None
        path = Path(product.image)
        return path if path.is_file() else None

    # -- search ----------------------------------------------------------------------------------

    @property
    def draft_size(self) -> int:
        """Side to decode query JPEGs at (see FeatureExtractor.query_draft_size)."""
        return self.extractor.query_draft_size

    def embed_images(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """Query photos -> vectors (localised first where the weights have a mask head) and each photo's
        silhouette where the extractor draws them (masked pooling), else None."""
        vectors, shapes = self.extractor.embed_queries_with_shapes(images, self.settings.pooling)
        return vectors, list(shapes) if shapes is not None else [None] * len(vectors)

    def search(self, image_bytes: bytes, top_k: int) -> SearchResult:
        start = time.perf_counter()
        index = self._current()
        image = load_image(image_bytes, draft_size=self.draft_size)
        vectors, shapes = self.embed_images([image])
        return self._search_vector(index, vectors[0], top_k, start, shapes[0])

    def search_images(self, images: Sequence[Image.Image], top_k: int) -> list[SearchResult]:
        """One batch through the model; each result's took_ms is the batch's time."""
        if not images:
            return []
        start = time.perf_counter()
        index = self._current()
        vectors, shapes = self.embed_images(images)
        return [self._search_vector(index, v, top_k, start, shape) for v, shape in zip(vectors, shapes, strict=True)]

    def similar(self, product_id: str, top_k: int) -> SearchResult:
        """Products like a catalog product: its images' vectors are the queries; with the category boost, its
        own category comes first (the products of the top RERANK_POOL re-ranked as the vote would re-rank them
        if every voter had that category)."""
        start = time.perf_counter()
        index = self._current()
        if product_id not in index.product_images:
            raise KeyError(product_id)
        boost = self.settings.category_boost
        pool = self._pool_size(top_k)
        hits: list[tuple[int, float]] = []
        for item in index.product_images[product_id]:
            vector = np.asarray(index.annoy.get_item_vector(item), dtype=np.float32)
            hits.extend(self._nearest(index, vector, pool + len(index.product_images[product_id])))
        ranked = best_per_product(hits, index.image_products, pool, exclude=frozenset([product_id]))
        if boost:
            # The product's own category is known: it takes the place of the neighbours' vote.
            category = index.category_of(product_id)
            ranked = (category_rerank(ranked, index.category_of, {category: 1.0}, boost) if category
                      else category_vote_rerank(ranked, index.category_of, boost))
        return self._result(index, ranked[:top_k], start)

    def _pool_size(self, top_k: int) -> int:
        """Products to rank before cutting to `top_k`: with the category boost, the vote's RERANK_POOL."""
        return max(top_k, RERANK_POOL) if self.settings.category_boost else top_k

    def _nearest(self, index: LoadedIndex, vector: np.ndarray, n: int) -> list[tuple[int, float]]:
        total = index.annoy.get_n_items()
        n = min(n, total)
        search_k = annoy_search_k(n, index.whitening is not None)
        ids, dists = index.annoy.get_nns_by_vector(vector.tolist(), n, search_k=search_k, include_distances=True)
        return [(i, angular_to_cosine(d)) for i, d in zip(ids, dists, strict=True)]

    def _search_vector(
        self, index: LoadedIndex, vector: np.ndarray, top_k: int, start: float, shape: np.ndarray | None = None
    ) -> SearchResult:
        if index.whitening is not None:
            vector = index.whitening.apply(vector[None])[0]
        total = index.annoy.get_n_items()
        pool = self._pool_size(top_k)
        want = min(pool, len(index.products))
        n = pool * 4
        while True:
            ranked = best_per_product(self._nearest(index, vector, n), index.image_products, pool)
            # Multi-image products can crowd the list: widen until enough distinct products are found.
            if len(ranked) >= want or n >= total:
                break
            n *= 2
        if self.settings.category_boost:
            query_shape = (index.shape_space.apply(shape[None])[0]
                           if shape is not None and index.shape_space is not None else None)
            ranked = category_vote_with_silhouettes(ranked, index.category_of, self.settings.category_boost,
                                                    index.shapes, query_shape, self.settings.shape_weight)
        return self._result(index, ranked[:top_k], start)

    def _result(self, index: LoadedIndex, ranked, start: float) -> SearchResult:
        matches = [
            Match(product=index.products[h.product_id], score=h.score, image=index.image_sources[h.image_index])
            for h in ranked
        ]
        return SearchResult(matches, (time.perf_counter() - start) * 1000, index.version)
