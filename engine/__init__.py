"""vsearch engine: safe image loading, VGG16 features, pooling, versioned Annoy index, searcher."""

from engine.errors import (
    BuildFailed,
    CatalogError,
    ImageRejected,
    IndexNotReady,
    ReindexRequired,
    SettingsError,
    VsearchError,
    WeightsError,
)
from engine.types import Match, Product, SearchResult

__all__ = [
    "BuildFailed",
    "CatalogError",
    "ImageRejected",
    "IndexNotReady",
    "Match",
    "Product",
    "ReindexRequired",
    "SearchResult",
    "SettingsError",
    "VsearchError",
    "WeightsError",
]
