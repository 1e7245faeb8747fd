"""Pure ranking helpers: image hits -> product matches (a product appears once, at its best image)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# The category vote (`category_vote_rerank`): the products re-ranked and, of them, the top ones that vote.
RERANK_POOL = 20
RERANK_NEIGHBOURS = 10


@dataclass(frozen=True)
class ProductHit:
    product_id: str
    score: float
    image_index: int


def angular_to_cosine(distance: float) -> float:
    """Annoy's angular distance is sqrt(2 - 2 cos) of the normalised vectors."""
    return 1.0 - distance * distance / 2.0


def best_per_product(
    image_hits: Iterable[tuple[int, float]],
    image_products: Sequence[str],
    limit: int,
    exclude: frozenset[str] = frozenset(),
) -> list[ProductHit]:
    """`image_hits` are (image index, cosine score); keep each product's best image, highest first."""
    best: dict[str, ProductHit] = {}
    for index, score in image_hits:
        pid = image_products[index]
        if pid in exclude:
            continue
        current = best.get(pid)
        if current is None or score > current.score:
            best[pid] = ProductHit(pid, score, index)
    ranked = sorted(best.values(), key=lambda h: (-h.score, h.product_id))
    return ranked[:limit]


def alpha_query_expansion(queries: np.ndarray, index: np.ndarray, neighbours: int = 3, alpha: float = 3.0) -> np.ndarray:
    """Alpha query expansion (Radenović et al.): each query plus its top index vectors weighted by
    similarity**alpha, re-normalised. Rows are L2-normalised; the output is too."""
    sims = queries @ index.T
    n = min(neighbours, index.shape[0])
    top = np.argpartition(-sims, n - 1, axis=1)[:, :n]
    weights = np.clip(np.take_along_axis(sims, top, axis=1), 0, None) ** alpha
    expanded = queries + np.einsum("qn,qnd->qd", weights, index[top])
    return expanded / np.maximum(np.linalg.norm(expanded, axis=1, keepdims=True), 1e-12)


def category_vote_rerank(
    hits: Sequence[ProductHit],
    category_of: Callable[[str], str | None],
    boost: float,
    neighbours: int = RERANK_NEIGHBOURS,
    voters: Sequence[ProductHit] | None = None,
) -> list[ProductHit]:
    """Re-rank product hits (best first) so that the photo's likely category comes first: the top
    `neighbours` of `voters` (by default the hits themselves; see `shape_voters`) vote for their products'
    categories (a product without a category does not vote), and `category_rerank` raises each hit by its
    category's share of the vote."""
    if neighbours < 1:
        raise ValueError(f"neighbours must be at least 1, got {neighbours}")
    voting = hits if voters is None else voters
    votes = [c for c in (category_of(h.product_id) for h in voting[:neighbours]) if c]
    share = {c: n / len(votes) for c, n in Counter(votes).items()}
    return category_rerank(hits, category_of, share, boost)


def category_rerank(
    hits: Sequence[ProductHit],
    category_of: Callable[[str], str | None],
    share: Mapping[str, float],
    boost: float,
) -> list[ProductHit]:
    """Raise each hit's score by `boost` times its category's `share` (0 to 1) times the spread of the hits'
    scores (so that one boost means the same whatever the pooling and whitening: at 1, a category with a
    share of 1 lifts the last hit level with the first) and re-sort, ties keeping their order; a product
    without a category gets nothing. `boost=inf` puts the categories in share order, each one's hits in
    score order. Without shares, or with boost 0, the hits stay as they are.
    """
    if boost < 0:
        raise ValueError(f"boost must be 0 or more, got {boost}")
    if not share or boost == 0 or not hits:
        return list(hits)
    categories = [category_of(h.product_id) for h in hits]
    spread = max(h.score for h in hits) - min(h.score for h in hits)

    def key(i: int) -> tuple[float, ...]:
        vote, score = share.get(categories[i] or "", 0.0), hits[i].score
        return (-vote, -score) if math.isinf(boost) else (-(score + boost * spread * vote),)

    return [hits[i] for i in sorted(range(len(hits)), key=key)]


def shape_voters(hits: Sequence[ProductHit], shape_similarity: Sequence[float], weight: float) -> list[ProductHit]:
    """The hits ordered by (1 - weight) x their similarity + weight x `shape_similarity` (each hit's image's
    silhouette against the query's, engine.shape): who votes first in `category_vote_rerank`. The silhouette
    tells a boot from a sandal better than features trained to ignore crops and perspective; ranking by it
    would bury another photo of the same product from another side, so it only chooses the voters."""
    if not 0 <= weight <= 1 or len(shape_similarity) != len(hits):
        raise ValueError(f"weight must be within 0..1 and one silhouette similarity given per hit, got {weight} and "
                         f"{len(shape_similarity)} for {len(hits)}")
    combined = [(1 - weight) * h.score + weight * s for h, s in zip(hits, shape_similarity, strict=True)]
    return [hits[i] for i in sorted(range(len(hits)), key=lambda i: -combined[i])]


def category_vote_with_silhouettes(
    hits: Sequence[ProductHit],
    category_of: Callable[[str], str | None],
    boost: float,
    image_shapes: np.ndarray | None,
    query_shape: np.ndarray | None,
    shape_weight: float,
) -> list[ProductHit]:
    """`category_vote_rerank` of the hits, its voters chosen by `shape_voters` where the silhouettes are known
    (`image_shapes[h.image_index]` of each hit and `query_shape`, both in the index's shape space) and
    `shape_weight` is not 0; otherwise the plain vote. `Searcher.search` and `vsearch eval` both rank this way."""
    voters = None
    if shape_weight and image_shapes is not None and query_shape is not None:
        voters = shape_voters(hits, [float(image_shapes[h.image_index] @ query_shape) for h in hits], shape_weight)
    return category_vote_rerank(hits, category_of, boost, voters=voters)
