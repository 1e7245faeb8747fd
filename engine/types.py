"""Plain data types shared by the engine, the indexer and the channels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Product:
    """One catalog product, as stored beside the index and returned with matches."""

    id: str
    title: str
    url: str
    image: str  # the product's first image (path relative to the catalog, absolute path or URL)
    price: str | None = None
    currency: str | None = None
    category: str | None = None
    brand: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "url": self.url,
            "image": self.image,
            "price": self.price,
            "currency": self.currency,
            "category": self.category,
            "brand": self.brand,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Product:
        return cls(
            id=data["id"],
            title=data["title"],
            url=data["url"],
            image=data["image"],
            price=data.get("price"),
            currency=data.get("currency"),
            category=data.get("category"),
            brand=data.get("brand"),
            extra=dict(data.get("extra") or {}),
        )


@dataclass(frozen=True)
class Match:
    """A product found for a query; `score` is the cosine similarity of its best image (1 = same)."""

    product: Product
    score: float
    image: str  # the product image that matched best

    def to_dict(self) -> dict[str, Any]:
        out = self.product.to_dict()
        out["matched_image"] = self.image
        out["score"] = round(self.score, 4)
        return out


@dataclass(frozen=True)
class SearchResult:
    matches: list[Match]
    took_ms: float
    index_version: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "results": [m.to_dict() for m in self.matches],
            "took_ms": round(self.took_ms, 1),
            "index_version": self.index_version,
        }
