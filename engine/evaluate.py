"""The `vsearch eval` runner: compares poolings, whitening and the seed article's method on a catalog."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from engine.augment import EVAL_PARAMS, AugmentParams, clean_crop, photo_like
from engine.errors import CatalogError, ImageRejected
from engine.images import load_image_file
from engine.metrics import exact_knn, map_at_k, precision_at_k, rank_products, recall_at_k
from engine.pooling import POOLINGS, Whitening, pool, raw_flat
from engine.ranking import (
    RERANK_POOL,
    alpha_query_expansion,
    best_per_product,
    category_vote_with_silhouettes,
)
from engine.shape import ShapeSpace
from indexer.catalog import Catalog, read_catalog

# photo: photo_like pasted on a cluttered background; plain: photo_like on the catalog's own background;
# clean: clean_crop (a mild crop of the catalog shot).
QUERY_KINDS = ("photo", "plain", "clean")
METRICS = (
    "same_r1",
    "same_r5",
    "same_map10",
    "photo_r1",
    "photo_r5",
    "plain_r1",
    "plain_r5",
    "clean_r1",
    "clean_r5",
    "category_p5",
)
METRIC_LABELS = {
    "same_r1": "same R@1",
    "same_r5": "same R@5",
    "same_map10": "same mAP@10",
    "photo_r1": "cluttered R@1",
    "photo_r5": "cluttered R@5",
    "plain_r1": "photo-like R@1",
    "plain_r5": "photo-like R@5",
    "clean_r1": "clean R@1",
    "clean_r5": "clean R@5",
    "category_p5": "category P@5",
}
SEED_BASELINE = "seed baseline"
# Catalog rows without a product page still need a URL to be valid products; eval never uses it.
PLACEHOLDER_URL = "https://eval.invalid/p/{id}"
MAX_EVAL_SIDE = 640  # larger photos are shrunk before augmenting, so augmentation time stays bounded
PRODUCTS_RANKED = 10  # enough for mAP@10, recall@5 and precision@5


class ConvExtractor(Protocol):
    """What run_eval needs from `engine.features.FeatureExtractor`."""

    weights_id: str
    precision: str
    image_size: int

    def conv_maps(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def localize(self, images: Sequence[Image.Image]) -> list[Image.Image]: ...

    def frame_catalog_image(self, image: Image.Image) -> Image.Image: ...


@dataclass
class MethodResult:
    """One row of the report: a way of turning images into vectors, and its metrics (None = n/a)."""

    method: str  # "gem", "gem+white" or SEED_BASELINE
    pooling: str | None  # None for the seed baseline
    whitening: bool
    distance: str  # "cosine" or "euclidean"
    dims: int
    metrics: dict[str, float | None]


@dataclass
class EvalReport:
    catalog: str
    weights_id: str
    precision: str
    image_size: int
    limit: int | None
    seed: int
    category_field: str
    split: dict[str, Any] | None  # {"train_products": n, "eval_products": n} when a split was used
    localized: bool  # query images went through the mask head first
    products: int  # products evaluated (in the index)
    images: int  # images in the index
    queries: dict[str, int]  # per metric group: same, photo, clean, category
    methods: list[MethodResult]
    skipped: list[str] = field(default_factory=list)  # images that could not be loaded, with the reason
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per pass

    def best_pooling(self) -> MethodResult:
        """The best pooling configuration by cluttered photo-like recall@5; ties go to same-product mAP@10.

        The seed baseline is not a candidate. Missing metrics count as lowest; if no configuration has
        any of cluttered R@5, same mAP@10, clean R@5 or category P@5, ValueError.
        """
        keys = ("photo_r5", "same_map10", "clean_r5", "category_p5")
        candidates = [m for m in self.methods if m.pooling is not None]
        if not any(m.metrics.get(key) is not None for m in candidates for key in keys):
            raise ValueError("no pooling configuration has a metric to rank by")

        def score(m: MethodResult) -> tuple[float, ...]:
            return tuple(-1.0 if m.metrics.get(key) is None else float(m.metrics[key]) for key in keys)

        return max(candidates, key=score)  # max keeps the first of equals: the order of `methods`

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        try:
            out["best"] = self.best_pooling().method
        except ValueError:
            out["best"] = None
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def to_markdown(self) -> str:
        q = self.queries
        split = (
            f"product-disjoint split ({self.split['train_products']} train / {self.split['eval_products']} eval "
            "products; whitening fitted on train)"
            if self.split
            else "none (whitening fitted on the evaluated catalog itself)"
        )
        lines = [
            f"## vsearch eval: {self.catalog}",
            "",
            f"- products {self.products}, images {self.images}, skipped images {len(self.skipped)}",
            f"- weights `{self.weights_id}`, precision {self.precision}, image size {self.image_size}, "
            f"limit {self.limit if self.limit is not None else 'none'}, seed {self.seed}, "
            f"queries localised: {'yes (mask head)' if self.localized else 'no'}",
            f"- split: {split}",
            f"- queries: same-product {q.get('same', 0)}, cluttered photo-like {q.get('photo', 0)}, "
            f"photo-like {q.get('plain', 0)}, "
            f"clean {q.get('clean', 0)}, category {q.get('category', 0)} (field `{self.category_field}`)",
            "- search: brute force, cosine on L2-normalised vectors; the seed baseline uses Euclidean distance "
            "on raw flattened conv features. Metrics are per product: a query's own image is never a result.",
            "",
        ]
        header = ["method", "dims"] + [f"{METRIC_LABELS[m]} (n={q.get(m.split('_')[0], 0)})" for m in METRICS]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for m in self.methods:
            cells = [m.method, str(m.dims)] + [_fmt(m.metrics.get(key)) for key in METRICS]
            lines.append("| " + " | ".join(cells) + " |")
        try:
            best = self.best_pooling().method
        except ValueError:
            best = "n/a"
        lines += ["", f"Best configuration (cluttered R@5, then same mAP@10): **{best}**"]
        if self.seconds:
            lines.append("Time: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in self.seconds.items()))
        if self.notes:
            lines += ["", "Notes:"] + [f"- {note}" for note in self.notes]
        if self.skipped:
            lines += ["", f"Skipped images ({len(self.skipped)}):"] + [f"- {s}" for s in self.skipped[:20]]
            if len(self.skipped) > 20:
                lines.append(f"- ... and {len(self.skipped) - 20} more")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Entry:
    """One catalog image taking part in the evaluation."""

    product_id: str
    source: str
    key: str  # stable across machines: product id and the image's position within the product
    label: str | None  # the category_field value of its product


@dataclass
class _Vectors:
    pooled: dict[str, np.ndarray]  # pooling -> (N, C) L2-normalised
    raw: np.ndarray | None  # (N, F) seed-baseline vectors
    shapes: np.ndarray | None = None  # (N, SHAPE_CELLS) silhouettes where the extractor draws them (engine.shape)


def split_products(
    product_ids: Iterable[str], eval_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """A seeded, product-disjoint split: (train ids, eval ids), each in first-seen order.

    The eval share is round(eval_fraction * n), at least 1, and at least one product stays in train.
    The result depends only on the set of ids, the fraction and the seed.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    unique = list(dict.fromkeys(product_ids))
    if len(unique) < 2:
        raise ValueError(f"a split needs at least 2 products, got {len(unique)}")
    n_eval = min(len(unique) - 1, max(1, round(eval_fraction * len(unique))))
    chosen = set(random.Random(f"split:{seed}").sample(sorted(unique), n_eval))
    return [p for p in unique if p not in chosen], [p for p in unique if p in chosen]


def sample_products(product_ids: Iterable[str], limit: int | None, seed: int = 0) -> list[str]:
    """`limit` products drawn with a seeded sample (all of them when limit is None), in first-seen order."""
    unique = list(dict.fromkeys(product_ids))
    if limit is None or limit >= len(unique):
        return unique
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    chosen = set(random.Random(f"limit:{seed}").sample(sorted(unique), limit))
    return [p for p in unique if p in chosen]


def run_eval(
    catalog_path: str | Path,
    *,
    extractor: ConvExtractor,
    column_map: Mapping[str, str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    poolings: Sequence[str] = POOLINGS,
    whitening: Sequence[bool] = (False, True),
    white_dims: Sequence[int | None] = (None,),
    include_seed_baseline: bool = True,
    category_field: str = "category",
    split: float | tuple[Collection[str], Collection[str]] | None = None,
    queries: Sequence[str] = QUERY_KINDS,
    batch_size: int = 16,
    params: AugmentParams = EVAL_PARAMS,
    localize: bool = False,
    query_expansion: bool = False,
    category_boosts: Sequence[float] = (),
    shape_weights: Sequence[float] = (),
    learned_whitening: np.ndarray | None = None,
    progress: bool = True,
) -> EvalReport:
    """Evaluate every pooling x whitening configuration (and the seed baseline) on one catalog.

    Conv maps are computed once per catalog image and once per query image; every method is derived
    from them. `split` is an eval fraction (see `split_products`) or a ready (train ids, eval ids) pair:
    whitening is then fitted on the train products and everything is measured on the eval products.
    Without a split, whitening is fitted on the evaluated catalog itself (as the engine does at index time).
    `localize`: query images go through `extractor.localize` first, as in `Searcher.search`.
    `query_expansion`: every cosine method gets a "+aqe" twin that re-ranks with alpha query expansion.
    `category_boosts`: every cosine method gets a "+catB" twin per boost B that re-ranks its top RERANK_POOL
    products by the category vote of the top ones (`engine.ranking.category_vote_rerank`, labels
    from `category_field`), as `Searcher.search` can. `shape_weights`: where the extractor draws silhouettes
    (masked pooling), each "+catB" twin gets a "+catB+shapeW" twin per weight W whose voters are chosen by
    silhouette too (`engine.ranking.shape_voters`), as `Searcher.search` does with VSEARCH_SHAPE_WEIGHT=W.
    `white_dims`: the whitened methods are measured at each of these dims (None: all of the pooled vector's),
    as `Whitening.fit(dims=...)` keeps them; a reduced one is named like "avg+white256".
    `learned_whitening`: a projection learned from pairs of GeM vectors (engine.learned_whitening); the
    whitened GeM methods then also get a "+lwhite" twin that uses it, centred on the same vectors the PCA
    whitening is fitted on.
    """
    unknown = [p for p in poolings if p not in POOLINGS]
    if unknown or not poolings:
        raise ValueError(f"poolings must be a non-empty subset of {POOLINGS}, got {list(poolings)}")
    if not whitening or any(not isinstance(w, bool) for w in whitening):
        raise ValueError(f"whitening must list True and/or False, got {list(whitening)}")
    if not white_dims or any(d is not None and (not isinstance(d, int) or d < 1) for d in white_dims):
        raise ValueError(f"white_dims must list positive whole numbers and/or None, got {list(white_dims)}")
    bad_kinds = [k for k in queries if k not in QUERY_KINDS]
    if bad_kinds:
        raise ValueError(f"query kinds must be among {QUERY_KINDS}, got {bad_kinds}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if any(not 0 < w <= 1 for w in shape_weights):
        raise ValueError(f"shape_weights must be within 0..1 (0 excluded: the plain vote), got {list(shape_weights)}")
    if isinstance(split, tuple):
        if set(split[0]) & set(split[1]):
            raise ValueError("the split's train and eval products overlap; a split must be product-disjoint")
    elif split is not None and not 0 < split < 1:
        raise ValueError(f"split must be an eval fraction between 0 and 1 or a (train, eval) pair, got {split}")

    notes: list[str] = []
    seconds: dict[str, float] = {}
    catalog = _read(catalog_path, column_map, notes)
    entries, skipped = _entries(catalog, category_field)
    if not entries:
        raise CatalogError(
            f"catalog {catalog.path} has no local image files to evaluate",
            "vsearch eval reads images from disk; give a catalog whose image column holds file paths.",
        )
    selected = set(sample_products([e.product_id for e in entries], limit, seed))
    entries = [e for e in entries if e.product_id in selected]

    started = time.perf_counter()
    # With localised queries the index frames each catalog image as `vsearch index` does (cropped to its product).
    frame = (lambda img, e: extractor.frame_catalog_image(img)) if localize else (lambda img, e: img)
    loaded, vectors, load_skipped = _extract(
        entries, extractor, frame, poolings, include_seed_baseline, batch_size, "catalog", progress
    )
    seconds["catalog pass"] = time.perf_counter() - started
    skipped += load_skipped
    entries = loaded
    if len(entries) < 2:
        raise CatalogError(
            f"only {len(entries)} image(s) of catalog {catalog.path} could be loaded; evaluation needs at least 2",
            "Check the image paths (see the skipped list) or raise --limit.",
        )

    product_ids = list(dict.fromkeys(e.product_id for e in entries))
    split_info = None
    if split is None:
        eval_ids = set(product_ids)
        train_ids = eval_ids
    else:
        if isinstance(split, tuple):
            train_ids = set(split[0]) & set(product_ids)
            eval_ids = set(split[1]) & set(product_ids)
        else:
            train_list, eval_list = split_products(product_ids, float(split), seed)
            train_ids, eval_ids = set(train_list), set(eval_list)
        if not train_ids or not eval_ids:
            raise ValueError("the split leaves no train or no eval products among the loaded ones")
        split_info = {"train_products": len(train_ids), "eval_products": len(eval_ids)}
    is_eval = np.array([e.product_id in eval_ids for e in entries])
    is_train = np.array([e.product_id in train_ids for e in entries])
    eval_entries = [e for e, keep in zip(entries, is_eval, strict=True) if keep]
    if len(eval_entries) < 2:
        raise ValueError(f"only {len(eval_entries)} image(s) to evaluate; use a larger catalog, limit or eval share")

    methods = _methods(vectors, is_train, is_eval, poolings, whitening, include_seed_baseline, notes, white_dims,
                       learned_whitening)
    cosine = [m for m in methods if m.distance == "cosine"]
    if query_expansion:
        methods += [_with_query_expansion(m) for m in cosine]
    # Silhouettes in the space the index keeps them in: centred on the catalog's (train products') mean.
    shape_space = ShapeSpace.fit(vectors.shapes[is_train]) if vectors.shapes is not None else None
    index_shapes = shape_space.apply(vectors.shapes[is_eval]) if shape_space is not None else None
    weights = (0.0, *shape_weights) if index_shapes is not None else (0.0,)
    methods += [_with_category_vote(m, boost, w, index_shapes) for boost in category_boosts for w in weights
                for m in cosine]
    image_products = [e.product_id for e in eval_entries]
    label_of = {e.product_id: e.label for e in eval_entries}
    per_product = Counter(image_products)
    pool = RERANK_POOL if category_boosts else PRODUCTS_RANKED
    k_images = min(len(eval_entries), (pool + 1) * max(per_product.values()) + 1)
    queries_count: dict[str, int] = {}

    multi = np.array([per_product[p] >= 2 for p in image_products])
    queries_count["same"] = int(multi.sum())
    if not multi.any():
        notes.append("same-product: n/a, no evaluated product has 2 or more images")
    labels = [e.label for e in eval_entries]
    distinct = {label for label in labels if label}
    has_label = np.array([bool(label) for label in labels])
    category_ok = len(distinct) >= 2
    queries_count["category"] = int(has_label.sum()) if category_ok else 0
    if not category_ok:
        notes.append(
            f"category P@5: n/a, field {category_field!r} has {len(distinct)} distinct value(s) among the "
            "evaluated products (choose another field, e.g. subcategory)"
        )

    for method in methods:
        base = method.index
        if multi.any():
            rows = np.flatnonzero(multi)
            own_shapes = index_shapes[rows] if index_shapes is not None else None
            ranked = _product_rankings(method, base[rows], k_images, image_products, label_of, rows,
                                       query_shapes=own_shapes)
            truth = [image_products[i] for i in rows]
            method.result.metrics["same_r1"] = recall_at_k(ranked, truth, 1)
            method.result.metrics["same_r5"] = recall_at_k(ranked, truth, 5)
            method.result.metrics["same_map10"] = map_at_k(ranked, [{t} for t in truth], 10)
        if category_ok:
            rows = np.flatnonzero(has_label)
            own = [image_products[i] for i in rows]
            own_shapes = index_shapes[rows] if index_shapes is not None else None
            ranked = _product_rankings(method, base[rows], k_images, image_products, label_of, rows, own,
                                       query_shapes=own_shapes)
            method.result.metrics["category_p5"] = float(
                np.mean([precision_at_k([label_of[p] for p in r], labels[i], 5) for r, i in zip(ranked, rows, strict=True)])
            )

    for kind in queries:
        transform = _transform(kind, seed, params)
        started = time.perf_counter()
        kept, qvectors, lost = _extract(
            eval_entries, extractor, transform, poolings, include_seed_baseline, batch_size, f"{kind} queries", progress,
            localize=localize,
        )
        if len(kept) != len(eval_entries):
            raise CatalogError(
                f"{len(lost)} image(s) could not be read again during the {kind} pass (first: {lost[0]})",
                "Do not change the catalog's images while vsearch eval runs, then run it again.",
            )
        seconds[f"{kind} queries"] = time.perf_counter() - started
        queries_count[kind] = len(eval_entries)
        query_shapes = shape_space.apply(qvectors.shapes) if shape_space and qvectors.shapes is not None else None
        for method in methods:
            ranked = _product_rankings(method, method.project(qvectors), k_images, image_products, label_of,
                                       query_shapes=query_shapes)
            method.result.metrics[f"{kind}_r1"] = recall_at_k(ranked, image_products, 1)
            method.result.metrics[f"{kind}_r5"] = recall_at_k(ranked, image_products, 5)

    return EvalReport(
        catalog=str(catalog.path),
        weights_id=extractor.weights_id,
        precision=extractor.precision,
        image_size=extractor.image_size,
        limit=limit,
        seed=seed,
        category_field=category_field,
        split=split_info,
        localized=localize,
        products=len(eval_ids),
        images=len(eval_entries),
        queries=queries_count,
        methods=[m.result for m in methods],
        skipped=skipped,
        notes=notes,
        seconds={k: round(v, 2) for k, v in seconds.items()},
    )


def _read(catalog_path: str | Path, column_map: Mapping[str, str] | None, notes: list[str]) -> Catalog:
    try:
        catalog = read_catalog(catalog_path, column_map=column_map, default_url_template=PLACEHOLDER_URL)
    except CatalogError:
        # The shared shoe datasets name their id column product_id; accept that without --map.
        if column_map is not None:
            raise
        try:
            catalog = read_catalog(
                catalog_path, column_map={"id": "product_id"}, default_url_template=PLACEHOLDER_URL
            )
        except CatalogError:
            pass
        else:
            notes.append("the catalog has no id column; product_id was used (as with --map id=product_id)")
            return _note_row_errors(catalog, notes)
        raise
    return _note_row_errors(catalog, notes)


def _note_row_errors(catalog: Catalog, notes: list[str]) -> Catalog:
    if catalog.errors:
        notes.append(f"{len(catalog.errors)} catalog row(s) were skipped as invalid (first: {catalog.errors[0]})")
    return catalog


def _entries(catalog: Catalog, category_field: str) -> tuple[list[_Entry], list[str]]:
    entries: list[_Entry] = []
    skipped: list[str] = []
    position: Counter[str] = Counter()
    for ref in catalog.images:
        position[ref.product_id] += 1
        if ref.source.startswith(("http://", "https://")):
            skipped.append(f"{ref.source}: remote image (eval reads local files only)")
            continue
        product = catalog.products[ref.product_id]
        entries.append(
            _Entry(
                product_id=ref.product_id,
                source=ref.source,
                key=f"{ref.product_id}#{position[ref.product_id]}",
                label=product_label(product, category_field),
            )
        )
    return entries, skipped


def product_label(product: Any, category_field: str) -> str | None:
    """The value of `category_field` (a core field or an extra column, case-insensitive) or None."""
    if category_field in ("category", "brand"):
        value = getattr(product, category_field)
    else:
        value = product.extra.get(category_field)
        if value is None:
            folded = category_field.casefold()
            value = next((v for k, v in product.extra.items() if k.casefold() == folded), None)
    value = (value or "").strip()
    return value or None


def _load(entry: _Entry) -> Image.Image:
    img = load_image_file(entry.source, draft_size=MAX_EVAL_SIDE)
    if max(img.size) > MAX_EVAL_SIDE:
        img.thumbnail((MAX_EVAL_SIDE, MAX_EVAL_SIDE), Image.Resampling.BILINEAR)
    return img


def _transform(kind: str, seed: int, params: AugmentParams) -> Callable[[Image.Image, _Entry], Image.Image]:
    def apply(img: Image.Image, entry: _Entry) -> Image.Image:
        rng = params.rng(seed, f"{kind}:{entry.key}")
        if kind in ("photo", "plain"):
            return photo_like(img, rng, clutter=kind == "photo", params=params)
        return clean_crop(img, rng, params=params)

    return apply


def _extract(
    entries: Sequence[_Entry],
    extractor: ConvExtractor,
    transform: Callable[[Image.Image, _Entry], Image.Image],
    poolings: Sequence[str],
    with_raw: bool,
    batch_size: int,
    desc: str,
    progress: bool,
    localize: bool = False,
) -> tuple[list[_Entry], _Vectors, list[str]]:
    """Load (and transform, and localise) images batch by batch, run the conv stack once, pool every way."""
    kept: list[_Entry] = []
    skipped: list[str] = []
    pooled: dict[str, list[np.ndarray]] = {p: [] for p in poolings}
    raw: list[np.ndarray] = []
    shapes: list[np.ndarray] = []
    both = getattr(extractor, "maps_and_shapes", None)  # engine.features.FeatureExtractor: silhouettes too
    with tqdm(total=len(entries), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(entries), batch_size):
            images: list[Image.Image] = []
            for entry in entries[start : start + batch_size]:
                try:
                    img = _load(entry)
                except ImageRejected as exc:
                    skipped.append(f"{entry.source}: {exc}")
                    continue
                except OSError as exc:
                    skipped.append(f"{entry.source}: cannot read the file ({exc.strerror or exc})")
                    continue
                images.append(transform(img, entry))
                kept.append(entry)
            if images:
                shown = extractor.localize(images) if localize else images
                maps, batch_shapes = both(shown) if both is not None else (extractor.conv_maps(shown), None)
                if batch_shapes is not None:
                    shapes.append(batch_shapes)
                for p in poolings:
                    pooled[p].append(pool(maps, p))
                if with_raw:
                    raw.append(raw_flat(maps))
            bar.update(min(batch_size, len(entries) - start))
    vectors = _Vectors(
        pooled={p: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for p, v in pooled.items()},
        raw=np.concatenate(raw) if raw else None,
        shapes=np.concatenate(shapes) if shapes else None,
    )
    return kept, vectors, skipped


@dataclass
class _Method:
    result: MethodResult
    index: np.ndarray  # vectors of the evaluated images
    project: Callable[[_Vectors], np.ndarray]  # query vectors -> this method's space
    distance: str
    expand: Callable[[np.ndarray], np.ndarray] | None = None  # re-ranking of projected queries (alpha QE)
    category_boost: float | None = None  # re-ranking of the product hits by their categories' vote
    shape_weight: float = 0.0  # the silhouette's share in choosing the voters (needs index_shapes)
    index_shapes: np.ndarray | None = None  # silhouettes of the evaluated images, in the shape space

    def queries(self, projected: np.ndarray) -> np.ndarray:
        return self.expand(projected) if self.expand is not None else projected


def _methods(
    vectors: _Vectors,
    is_train: np.ndarray,
    is_eval: np.ndarray,
    poolings: Sequence[str],
    whitening: Sequence[bool],
    include_seed_baseline: bool,
    notes: list[str],
    white_dims: Sequence[int | None] = (None,),
    learned: np.ndarray | None = None,
) -> list[_Method]:
    methods: list[_Method] = []
    for p in poolings:
        vecs = vectors.pooled[p]
        for white in whitening:
            if not white:

                def project(v: _Vectors, p: str = p) -> np.ndarray:
                    return v.pooled[p]

                result = MethodResult(p, p, False, "cosine", int(vecs.shape[1]), dict.fromkeys(METRICS))
                methods.append(_Method(result, vecs[is_eval], project, "cosine"))
                continue
            if is_train.sum() < 2:
                notes.append(f"{p}+white: skipped, whitening needs at least 2 training images")
                continue
            full = int(vecs.shape[1])
            for dims in dict.fromkeys(None if d is None or d >= full else d for d in white_dims):
                kinds = [("white", None)] + ([("lwhite", learned)] if learned is not None and p == "gem" else [])
                for kind, projection in kinds:
                    fitted = Whitening.fit(vecs[is_train], dims=dims, learned=projection)

                    def project_white(v: _Vectors, p: str = p, w: Whitening = fitted) -> np.ndarray:
                        return w.apply(v.pooled[p])

                    index = fitted.apply(vecs[is_eval])
                    name = f"{p}+{kind}" if dims is None else f"{p}+{kind}{dims}"
                    result = MethodResult(name, p, True, "cosine", int(index.shape[1]), dict.fromkeys(METRICS))
                    methods.append(_Method(result, index, project_white, "cosine"))
    if include_seed_baseline and vectors.raw is not None:
        index = vectors.raw[is_eval]
        result = MethodResult(SEED_BASELINE, None, False, "euclidean", int(index.shape[1]), dict.fromkeys(METRICS))

        def project_raw(v: _Vectors) -> np.ndarray:
            assert v.raw is not None
            return v.raw

        methods.append(_Method(result, index, project_raw, "euclidean"))
    return methods


def _with_query_expansion(method: _Method) -> _Method:
    r = method.result
    result = MethodResult(f"{r.method}+aqe", r.pooling, r.whitening, r.distance, r.dims, dict.fromkeys(METRICS))
    index = method.index
    return _Method(result, index, method.project, method.distance, lambda q: alpha_query_expansion(q, index))


def _with_category_vote(
    method: _Method, boost: float, shape_weight: float = 0.0, index_shapes: np.ndarray | None = None
) -> _Method:
    r = method.result
    name = f"{r.method}+cat{boost:g}" + (f"+shape{shape_weight:g}" if shape_weight else "")
    result = MethodResult(name, r.pooling, r.whitening, r.distance, r.dims, dict.fromkeys(METRICS))
    return _Method(result, method.index, method.project, method.distance, category_boost=boost,
                   shape_weight=shape_weight, index_shapes=index_shapes)


def _product_rankings(
    method: _Method,
    projected: np.ndarray,
    k_images: int,
    image_products: Sequence[str],
    label_of: Mapping[str, str | None],
    self_rows: np.ndarray | None = None,
    exclude_products: Sequence[str] | None = None,
    query_shapes: np.ndarray | None = None,
) -> list[list[str]]:
    """Top PRODUCTS_RANKED products per query of `projected` (in `method`'s space, before its query re-ranking);
    `self_rows[i]` (the query's own image) is never a result, nor `exclude_products[i]`; `query_shapes` (in the
    shape space) choose the voters of a method with a `shape_weight`."""
    extra = 1 if self_rows is not None else 0
    idx, dist = exact_knn(method.queries(projected), method.index, min(len(method.index), k_images + extra),
                          method.distance)
    boost = method.category_boost
    out = []
    for i, (row, row_dist) in enumerate(zip(idx, dist, strict=True)):
        if self_rows is not None:
            keep = row != self_rows[i]
            row, row_dist = row[keep], row_dist[keep]
        exclude = (exclude_products[i],) if exclude_products is not None else ()
        if boost is None:
            out.append(rank_products(row.tolist(), image_products, PRODUCTS_RANKED, exclude=exclude))
            continue
        hits = [(int(j), 1.0 - float(d)) for j, d in zip(row, row_dist, strict=True)]
        pool = best_per_product(hits, image_products, RERANK_POOL, exclude=frozenset(exclude))
        query_shape = query_shapes[i] if query_shapes is not None else None
        reranked = category_vote_with_silhouettes(pool, label_of.get, boost, method.index_shapes, query_shape,
                                                  method.shape_weight)
        out.append([h.product_id for h in reranked[:PRODUCTS_RANKED]])
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
