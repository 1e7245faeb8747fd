"""catalog -> fetch -> decode -> embed (with the feature cache) -> a new index version, switched atomically."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.cache import FeatureCache, content_key
from engine.errors import BuildFailed, ImageRejected
from engine.features import FeatureExtractor
from engine.images import load_image
from engine.index import IndexStore, Manifest, write_version_files
from engine.learned_whitening import index_whitening
from engine.settings import EngineSettings
from engine.shape import SHAPE_CELLS, ShapeSpace
from engine.types import Product
from indexer.catalog import Catalog, ImageRef, RowError, read_catalog, write_errors_file
from indexer.fetch import FetchError, FetchSettings, iter_fetched

log = logging.getLogger(__name__)

# Images per model call. With the conv weights prepacked the model is as fast or faster per image at batch 1
# as at 4 on this 2-core CPU (interleaved, 2026-11-27: 21.0 vs 19.1 images/s at 224 px, 24.9 vs 25.1 for
# trained weights at 160 px; eager convolutions peaked at 4), and a search waits for at most one image of
# a background rebuild.
BATCH_SIZE = 1
DECODE_WORKERS = 2


@dataclass(frozen=True)
class BuildProgress:
    done: int
    total: int
    images_per_s: float

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0


@dataclass
class BuildReport:
    version: str
    products: int
    images_indexed: int
    images_failed: int
    errors: list[RowError]
    seconds: float
    extracted: int  # images run through the model (cache misses)
    cache_hits: int
    index_dir: Path = field(default_factory=Path)

    def summary(self) -> str:
        return (
            f"index {self.version}: {self.products} products, {self.images_indexed} images indexed, "
            f"{self.images_failed} images failed, {len(self.errors)} bad rows in all, "
            f"{self.extracted} extracted / {self.cache_hits} from cache, {self.seconds:.1f} s"
        )


def annoy_trees(n_items: int) -> int:
    """More trees, better recall for the same search_k; bench measures recall@10 at 100k items with this rule.

    100 rather than 50 trees from 10k images: at 100k, recall@10 0.954 at search_k 7500 against 0.953 at 8500
    with 50 (plain vectors; whitened, as the engine's index is, 0.985 against 0.970 at 40000), for about 3 s
    more build and 40% more index file (README, Performance)."""
    return 100 if n_items >= 10_000 else 20


def _decode(data: bytes, extractor: FeatureExtractor) -> np.ndarray:
    return extractor.preprocess(extractor.frame_catalog_image(load_image(data, draft_size=extractor.image_size)))


def embed_catalog_images(
    refs: list[ImageRef],
    extractor: FeatureExtractor,
    pooling: str,
    cache: FeatureCache | None,
    fetch_settings: FetchSettings,
    progress: Callable[[BuildProgress], None] | None = None,
) -> tuple[dict[int, np.ndarray], dict[int, str], int]:
    """Vectors for the images that could be indexed (each followed by its silhouette's SHAPE_CELLS values where
    the extractor `gives_shapes`), reasons for those that could not, and the count extracted.

    Downloads stream in from a background thread, decoding runs in a small thread pool, and the model
    runs on full batches in this thread, so decoding overlaps inference.
    """
    vectors: dict[int, np.ndarray] = {}
    failures: dict[int, str] = {}
    pending: deque[tuple[int, str, Future]] = deque()
    extracted = 0
    start = time.perf_counter()
    total = len(refs)

    def report() -> None:
        if progress:
            done = len(vectors) + len(failures)
            elapsed = max(time.perf_counter() - start, 1e-6)
            progress(BuildProgress(done, total, done / elapsed))

    def run_batch(count: int) -> None:
        nonlocal extracted
        ready: list[tuple[int, str, np.ndarray]] = []
        for _ in range(min(count, len(pending))):
            i, key, fut = pending.popleft()
            try:
                ready.append((i, key, fut.result()))
            except ImageRejected as exc:
                failures[i] = f"{exc.reason}: {exc.message}"
        if ready:
            out, shapes = extractor.embed_arrays_with_shapes([arr for _, _, arr in ready], pooling, background=True)
            if shapes is not None:
                out = np.concatenate([out, shapes], axis=1)
            for (i, _, _), vec in zip(ready, out, strict=True):
                vectors[i] = vec
            if cache is not None:
                cache.put_many({key: vec for (_, key, _), vec in zip(ready, out, strict=True)})
            extracted += len(ready)
        report()

    with ThreadPoolExecutor(DECODE_WORKERS, thread_name_prefix="decode") as pool:
        for i, fetched in iter_fetched([r.source for r in refs], fetch_settings):
            if isinstance(fetched, FetchError):
                failures[i] = f"{fetched.reason}: {fetched}"
                continue
            key = content_key(fetched)
            cached = cache.get_many([key]).get(key) if cache is not None else None
            if cached is not None:
                vectors[i] = cached
                if (len(vectors) + len(failures)) % BATCH_SIZE == 0:
                    report()
                continue
            pending.append((i, key, pool.submit(_decode, fetched, extractor)))
            # Keep a second batch decoding while the model runs on the first.
            if len(pending) >= 2 * BATCH_SIZE:
                run_batch(BATCH_SIZE)
        while pending:
            run_batch(BATCH_SIZE)
    report()
    return vectors, failures, extracted


def build_index(
    catalog_path: str | Path,
    settings: EngineSettings,
    *,
    extractor: FeatureExtractor | None = None,
    progress: Callable[[BuildProgress], None] | None = None,
    column_map: Mapping[str, str] | None = None,
    url_template: str | None = None,
    fetch_settings: FetchSettings | None = None,
    use_cache: bool = True,
) -> BuildReport:
    """Build a new index version from a catalog and make it current. Bad rows are reported, not fatal.

    Raises CatalogError when the catalog cannot be read, BuildFailed when no image at all could be
    indexed; the current index then stays as it was.
    """
    start = time.perf_counter()
    catalog: Catalog = read_catalog(catalog_path, column_map=column_map, default_url_template=url_template)
    extractor = extractor or FeatureExtractor.from_settings(settings)
    pooling = settings.pooling
    cache = None
    if use_cache:
        namespace = f"{extractor.weights_id}|{pooling}|{extractor.image_size}"
        if extractor.framing != "whole":
            namespace += f"|{extractor.framing}"  # unchanged for whole images: existing caches stay valid
        if extractor.feature_block != 5:
            namespace += f"|block{extractor.feature_block}"
        if extractor.gives_shapes:
            namespace += "|shapes"  # the cached rows carry the silhouette too
        cache = FeatureCache(settings.cache_dir, namespace)
    try:
        vectors_by_ref, failures, extracted = embed_catalog_images(
            catalog.images, extractor, pooling, cache, fetch_settings or FetchSettings(), progress
        )
    finally:
        if cache is not None:
            cache.close()

    errors = list(catalog.errors)
    for i, reason in sorted(failures.items()):
        ref = catalog.images[i]
        errors.append(RowError(line=ref.line, product_id=ref.product_id, field="image", reason=reason))
    errors.sort(key=lambda e: e.line)
    if not vectors_by_ref:
        raise BuildFailed(
            f"No image of {catalog.path} could be indexed ({len(failures)} failed, {len(catalog.errors)} bad rows).",
            "Check the image paths or URLs in the catalog; the first errors are: "
            + "; ".join(str(e) for e in errors[:3]),
        )

    order = sorted(vectors_by_ref)
    matrix = np.stack([vectors_by_ref[i] for i in order]).astype(np.float32)
    shapes = None
    if extractor.gives_shapes:
        matrix, raw_shapes = matrix[:, :-SHAPE_CELLS], matrix[:, -SHAPE_CELLS:]
        space = ShapeSpace.fit(raw_shapes)
        shapes = (space, space.apply(raw_shapes))
    image_rows = [(catalog.images[i].product_id, catalog.images[i].source) for i in order]
    products = _indexed_products(catalog, image_rows)
    whitening, whitening_method = index_whitening(matrix, settings, extractor)
    if whitening is not None:
        matrix = whitening.apply(matrix)

    store = IndexStore(settings.index_dir)
    version, tmp = store.start_build()
    try:
        manifest = Manifest(
            version=version,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            weights=extractor.weights_id,
            arch=extractor.arch,
            pooling=pooling,
            whitening=whitening is not None,
            whitening_method=whitening_method,
            shapes=shapes is not None,
            image_size=extractor.image_size,
            dims=int(matrix.shape[1]),
            products=len(products),
            images=len(image_rows),
            images_failed=len(failures),
            catalog_path=str(catalog.path),
            catalog_sha256=catalog.sha256,
            n_trees=annoy_trees(len(image_rows)),
            build_seconds=round(time.perf_counter() - start, 2),
            framing=extractor.framing,
            feature_block=extractor.feature_block,
            extra={"precision": extractor.precision, "bad_rows": len(errors)},
        )
        write_version_files(tmp, manifest, matrix, image_rows, products, whitening, shapes)
        write_errors_file(errors, tmp / "errors.csv")
        store.publish(version, tmp)
    except BaseException:
        store.abandon(tmp)
        raise
    store.prune()
    return BuildReport(
        version=version,
        products=len(products),
        images_indexed=len(image_rows),
        images_failed=len(failures),
        errors=errors,
        seconds=time.perf_counter() - start,
        extracted=extracted,
        cache_hits=len(vectors_by_ref) - extracted,
        index_dir=store.index_dir / version,
    )


def _indexed_products(catalog: Catalog, image_rows: list[tuple[str, str]]) -> dict[str, Product]:
    """Products with at least one indexed image; the shown image is the first one that was indexed."""
    first_image: dict[str, str] = {}
    for pid, source in image_rows:
        first_image.setdefault(pid, source)
    return {
        pid: dataclasses.replace(product, image=first_image[pid])
        for pid, product in catalog.products.items()
        if pid in first_image
    }
