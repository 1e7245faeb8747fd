"""Reply content: cards carry the product url, prices read well, callback data round-trips and rejects forgeries."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot import replies
from bot.replies import DownloadFailed, decode_callback, encode_callback, format_price, make_card
from engine.errors import ImageRejected, IndexNotReady
from engine.types import Match, Product


def product(**kw) -> Product:
    base = dict(id="p-1", title="Red Sneaker", url="https://shop.example/p-1", image="images/p-1.jpg",
                price="49.9", currency="EUR")
    base.update(kw)
    return Product(**base)


@pytest.mark.parametrize(
    ("price", "currency", "expected"),
    [
        ("49.9", "EUR", "49.90 EUR"),
        ("49", "USD", "49.00 USD"),
        ("49,5", "EUR", "49.50 EUR"),
        ("1299.999", None, "1300.00"),
        ("call us", "EUR", "call us EUR"),
        (None, "EUR", None),
        ("", "EUR", None),
    ],
)
def test_format_price(price, currency, expected):
    assert format_price(price, currency) == expected


def test_card_text_contains_the_url_title_and_price():
    card = make_card(2, Match(product(), 0.87, "images/p-1.jpg"), Path("/cat/images/p-1.jpg"))
    assert card.rank == 2 and card.product_id == "p-1"
    assert "https://shop.example/p-1" in card.caption
    assert "Red Sneaker" in card.caption and "49.90 EUR" in card.caption
    assert "https://shop.example/p-1" not in card.short_caption and "49.90 EUR" in card.short_caption
    assert card.image_path == Path("/cat/images/p-1.jpg") and card.image_url is None


def test_remote_image_becomes_image_url():
    p = product(image="https://cdn.shop.example/p-1.jpg")
    card = make_card(1, Match(p, 0.5, "https://cdn.shop.example/p-1-side.jpg"), None)
    assert card.image_url == "https://cdn.shop.example/p-1-side.jpg" and card.image_path is None
    # A local image that is missing on disk gives neither (the card is text only).
    assert make_card(1, Match(product(), 0.5, "images/p-1.jpg"), None).image_url is None


def test_public_url_gives_local_images_a_url_of_the_web_app():
    local = Match(product(id="step up/1"), 0.5, "images/p-1.jpg")
    card = make_card(1, local, Path("/cat/images/p-1.jpg"), "https://shop.example/vsearch")
    assert card.image_url == "https://shop.example/vsearch/images/step%20up%2F1/0"
    assert card.image_path == Path("/cat/images/p-1.jpg")  # Telegram still uploads the file
    assert replies.image_path_url("step up/1") == "/images/step%20up%2F1/0"  # the path bot/web.py serves
    # Remote images keep their own URL; a local image missing on disk still gets none.
    remote = Match(product(image="https://cdn.shop.example/p-1.jpg"), 0.5, "https://cdn.shop.example/p-1.jpg")
    assert make_card(1, remote, None, "https://shop.example").image_url == "https://cdn.shop.example/p-1.jpg"
    assert make_card(1, Match(product(), 0.5, "images/p-1.jpg"), None, "https://shop.example").image_url is None


def test_callback_round_trip_and_size():
    data = encode_callback("more", "AbCdEf123_-x", 15)
    assert len(data.encode()) <= 64
    assert decode_callback(data) == ("more", "AbCdEf123_-x", 15)
    assert decode_callback(encode_callback("like", "AbCdEf123_-x", 1)) == ("like", "AbCdEf123_-x", 1)


@pytest.mark.parametrize(
    "data",
    ["", "more", "more:tok", "drop:AbCdEf123_-x:1", "more:AbCdEf123_-x:-1", "more:AbCdEf123_-x:1e3",
     "more:short:1", "more:AbC/Ef123_-x:1", "more:AbCdEf123_-x:1:extra", "more:AbCdEf123_-x:99999999",
     "like:" + "A" * 60 + ":1", "more:AbCdEf123_-x: 1"],
)
def test_forged_callbacks_are_rejected(data):
    assert decode_callback(data) is None


@given(st.text(max_size=80))
def test_decode_never_raises(data):
    out = decode_callback(data)
    assert out is None or encode_callback(*out) == data


def test_encode_refuses_bad_input():
    with pytest.raises(ValueError):
        encode_callback("delete", "AbCdEf123_-x", 1)
    with pytest.raises(ValueError):
        encode_callback("more", "bad token!", 1)


def test_friendly_errors_name_the_reason_and_hide_internals():
    text = replies.friendly_error(ImageRejected("not_an_image", "x", "y"))
    assert "not an image" in text
    assert replies.friendly_error(IndexNotReady("no index")) == replies.INDEX_NOT_READY
    assert replies.friendly_error(DownloadFailed("timeout at https://secret")) == replies.DOWNLOAD_FAILED
    internal = replies.friendly_error(RuntimeError("CUDA out of memory at 0xdeadbeef"))
    assert internal == replies.SEARCH_FAILED and "0xdeadbeef" not in internal
    for reason in ImageRejected.REASONS:  # every reason the engine can give has its own words
        assert "could not be read" not in replies.friendly_error(ImageRejected(reason, "m"))


def test_progress_and_summary_texts():
    assert replies.progress_text(5, 20, 3.25) == "Reindexing: 25% (5/20 images, 3.2 images/s)"
    done = replies.reindex_done_text("v2", 10, 12, 1, 4.0)
    assert "10 products" in done and "12 images" in done and "1 failures" in done
