"""Channel-neutral reply content: results and errors turned into text and product cards; all wording lives here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from urllib.parse import quote

from engine.errors import ImageRejected, IndexNotReady, ReindexRequired
from engine.types import Match

HELP_TEXT = (
    "Hi! I find shoes that look like the one in your photo.\n"
    "Send me a photo of a shoe (as a photo or as an image file) and I answer with the most similar "
    "products from our shop: picture, price and a link to each.\n"
    "Under the answer, \"Show more\" gives the next products and \"More like #1\" finds products "
    "similar to the best match."
)
GREETING = "Hi! Send me a photo of a shoe and I show you the most similar products from our shop."
PHOTO_HINT = "Please send a photo of a shoe; I search our catalog for products that look like it."
RATE_LIMITED = "You are sending photos faster than I can look at them. Please wait a minute and try again."
PAGE_EXPIRED = "These results have expired. Please send the photo again."
NO_MORE = "That was everything I found for this photo. Send another photo to search again."
NO_RESULTS = "I found nothing similar in our catalog. Try another photo, with the shoe filling the frame."
DOWNLOAD_FAILED = "I could not download your photo. Please send it again."
INDEX_NOT_READY = "The catalog is still being prepared. Please try again in a few minutes."
SEARCH_FAILED = "Something went wrong while searching. Please try again in a moment."
NOT_ADMIN = "Sorry, only the shop's administrators can use that command."
REINDEX_RUNNING = "A reindex is already running; I will not start another one. Use /status to follow it."
SHOW_MORE_LABEL = "Show more"
UNKNOWN_PRODUCT = "I could not find that product any more. Please send the photo again."

_IMAGE_REASONS = {
    "empty": "the file is empty",
    "too_large": "the file is too large",
    "too_many_pixels": "the picture is too large",
    "not_an_image": "it is not an image",
    "unsupported_format": "its image format is not supported (JPEG, PNG, WebP, GIF and HEIC are)",
    "truncated": "the image is incomplete",
    "corrupt": "the image is damaged",
}

ACTIONS = ("more", "like")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-]{8,32}$")
_MAX_ARG = 10_000


@dataclass(frozen=True)
class ProductCard:
    rank: int  # 1-based position in the full result list
    product_id: str
    title: str
    price_text: str | None  # e.g. "49.90 EUR"
    url: str  # product page URL: every answer must contain it
    image_url: str | None  # http(s) URL of the picture (remote, or this server's with VSEARCH_PUBLIC_URL), or None
    image_path: Path | None  # local image file, or None
    caption: str  # title, price and url (for channels without URL buttons)

    @property
    def short_caption(self) -> str:
        """Title and price only, for channels that carry the url in a button."""
        return card_caption(self.rank, self.title, self.price_text, None)


@dataclass(frozen=True)
class Reply:
    text: str  # message text (may be "" when only cards)
    cards: tuple[ProductCard, ...] = ()
    page_token: str | None = None  # opaque id of the stored result list, bound to the user
    next_offset: int | None = None  # offset for "Show more", None when there are no more
    is_error: bool = False

    @property
    def similar_label(self) -> str | None:
        """Label of the "More like #N" button for the first card, or None without cards."""
        return similar_label(self.cards[0].rank) if self.cards else None


def photo_hint() -> str:
    return PHOTO_HINT


def similar_label(rank: int) -> str:
    return f"More like #{rank}"


def format_price(price: str | None, currency: str | None) -> str | None:
    """"49.9", "EUR" -> "49.90 EUR"; a price that is not a number is shown as written."""
    if price is None or not str(price).strip():
        return None
    raw = str(price).strip()
    try:
        amount = Decimal(raw.replace(",", ".")) if raw.count(",") <= 1 and "." not in raw else Decimal(raw)
        text = f"{amount.quantize(Decimal('0.01')):f}" if amount.is_finite() else raw
    except (InvalidOperation, ValueError):
        text = raw
    return f"{text} {currency.strip()}" if currency and currency.strip() else text


def card_caption(rank: int, title: str, price_text: str | None, url: str | None) -> str:
    lines = [f"{rank}. {title}"]
    if price_text:
        lines.append(price_text)
    if url:
        lines.append(url)
    return "\n".join(lines)


def image_cache_key(path: Path) -> str | None:
    """Names this exact file version, so an edited image is uploaded again; None when it cannot be read.

    Keys the uploads that channels cache (Telegram file ids, WhatsApp media ids)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def image_path_url(product_id: str, n: int = 0) -> str:
    """The web app's path of a product's n-th local image (served by bot/web.py): /images/<quoted id>/<n>."""
    return f"/images/{quote(product_id, safe='')}/{n}"


def make_card(rank: int, match: Match, image_path: Path | None, public_url: str | None = None) -> ProductCard:
    """A product card; with `public_url` (VSEARCH_PUBLIC_URL) a local image also gets a public image_url."""
    product = match.product
    price_text = format_price(product.price, product.currency)
    image_url = None
    if image_path is not None:
        if public_url:  # image_path is the product's own (first) image, which /images/<id>/0 serves
            image_url = public_url.rstrip("/") + image_path_url(product.id)
    else:
        for candidate in (match.image, product.image):
            if candidate and candidate.lower().startswith(("https://", "http://")):
                image_url = candidate
                break
    return ProductCard(
        rank=rank,
        product_id=product.id,
        title=product.title,
        price_text=price_text,
        url=product.url,
        image_url=image_url,
        image_path=image_path,
        caption=card_caption(rank, product.title, price_text, product.url),
    )


def results_text(first_rank: int, count: int, similar_to: int | None = None) -> str:
    if similar_to is not None:
        return f"Products like #{similar_to}:"
    if first_rank == 1:
        return "Here is what I found:" if count else NO_RESULTS
    return f"More results ({first_rank}-{first_rank + count - 1}):"


def friendly_error(exc: BaseException) -> str:
    """One sentence a shopper understands, for any error raised while answering."""
    if isinstance(exc, ImageRejected):
        reason = _IMAGE_REASONS.get(exc.reason, "it could not be read")
        return f"I could not use that picture: {reason}. Please send a JPEG or PNG photo of a shoe."
    if isinstance(exc, IndexNotReady | ReindexRequired):
        return INDEX_NOT_READY
    if isinstance(exc, DownloadFailed):
        return DOWNLOAD_FAILED
    return SEARCH_FAILED


class DownloadFailed(Exception):
    """An adapter could not fetch the user's photo from its platform."""


def encode_callback(action: str, page_token: str, arg: int) -> str:
    """Button data such as "more:Ab3dEf9h:5" (well under Telegram's 64 bytes)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown callback action {action!r}")
    if not _TOKEN_RE.fullmatch(page_token) or not 0 <= arg < _MAX_ARG:
        raise ValueError("bad page token or argument for a callback")
    return f"{action}:{page_token}:{arg}"


def decode_callback(data: str) -> tuple[str, str, int] | None:
    """The inverse of encode_callback; None for anything it did not produce."""
    if not isinstance(data, str) or len(data) > 64:
        return None
    parts = data.split(":")
    if len(parts) != 3:
        return None
    action, token, arg = parts
    if action not in ACTIONS or not _TOKEN_RE.fullmatch(token) or not arg.isdigit() or len(arg) > 5:
        return None
    value = int(arg)
    return (action, token, value) if value < _MAX_ARG else None


def status_text(version: str | None, products: int, redis_ok: bool, reindex: str | None) -> str:
    lines = [
        f"Index version: {version or 'none yet'}",
        f"Products: {products}",
        f"Redis: {'ok' if redis_ok else 'unavailable (degraded mode)'}",
        f"Reindex: {reindex or 'not running'}",
    ]
    return "\n".join(lines)


def stats_text(counters: dict[str, int]) -> str:
    if not counters:
        return "No queries counted yet."
    lines = ["Queries (channel / outcome: count):"]
    lines += [f"{key.replace(':', ' / ')}: {value}" for key, value in sorted(counters.items())]
    return "\n".join(lines)


def progress_text(done: int, total: int, images_per_s: float) -> str:
    percent = 100.0 * done / total if total else 0.0
    return f"Reindexing: {percent:.0f}% ({done}/{total} images, {images_per_s:.1f} images/s)"


def reindex_started_text(catalog: str) -> str:
    return f"Reindex started from {catalog}. I will post progress here."


def reindex_done_text(version: str, products: int, images: int, failures: int, seconds: float) -> str:
    return (
        f"Reindex finished in {seconds:.0f} s: version {version}, {products} products, "
        f"{images} images indexed, {failures} failures. Searches now use the new index."
    )


def reindex_failed_text(message: str) -> str:
    return f"Reindex failed: {message} The current index stays in use."


NO_CATALOG = (
    "I do not know which catalog to rebuild from: set VSEARCH_CATALOG, or build an index once with "
    "`vsearch index CATALOG`."
)
