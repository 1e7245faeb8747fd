"""Property tests: read_catalog raises only CatalogError and accounts for every row at its line."""

from __future__ import annotations

import csv
import io
import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import CatalogError
from indexer.catalog import read_catalog

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TEXT = st.characters(codec="utf-8", exclude_characters="\x00")
PLAUSIBLE = st.sampled_from(
    ["p1", "p2", "Shoe", "https://s.example/p", "https://cdn.example/i.jpg", "img/a.jpg", "/abs/b.jpg",
     "ftp://x/y", "12,50", "1 299.00", "", " ", "\n", '"', ",", "é"]
)
CELL = st.one_of(PLAUSIBLE, st.text(TEXT, max_size=12))
GOOD_ROW = st.tuples(
    st.sampled_from(["p1", "p2", "p3"]),
    st.sampled_from(["Shoe", "Boot"]),
    st.sampled_from(["https://s.example/p", "https://s.example/q"]),
    st.sampled_from(["a.jpg", "b.jpg", "https://cdn.example/i.jpg"]),
    st.sampled_from(["", "12,50", "9.99"]),
).map(list)
CSV_ROW = st.one_of(GOOD_ROW, st.lists(CELL, min_size=0, max_size=6))
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(TEXT, max_size=10) | PLAUSIBLE,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(TEXT, max_size=5), inner, max_size=3),
    max_leaves=8,
)
GOOD_JSON = st.fixed_dictionaries(
    {"id": st.sampled_from(["p1", "p2", 3]), "title": st.sampled_from(["Shoe", "Boot"]),
     "url": st.just("https://s.example/p"), "image": st.sampled_from(["a.jpg", "b.jpg"])},
    optional={"price": st.sampled_from([1.5, "2,50", "x"]), "extra": JSON_VALUE},
)
FIELD = st.sampled_from(["id", "title", "url", "image", "price", "brand", "ID", "colour"])
JSON_ROW = st.one_of(GOOD_JSON, JSON_VALUE, st.dictionaries(FIELD, JSON_VALUE | PLAUSIBLE, max_size=6))
LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _read_or_catalog_error(path):
    try:
        return read_catalog(path)
    except CatalogError:
        return None


@FAST
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".jsonl", ".txt"]))
def test_arbitrary_bytes_raise_only_catalog_error(tmp_path, data, suffix):
    path = tmp_path / f"catalog{suffix}"
    path.write_bytes(data)
    cat = _read_or_catalog_error(path)
    if cat is not None:
        assert len(cat.images) + len(cat.errors) == cat.rows > 0


@FAST
@given(text=st.text(TEXT, max_size=300))
def test_arbitrary_text_after_a_header_raises_only_catalog_error(tmp_path, text):
    path = tmp_path / "catalog.csv"
    path.write_text("id,title,url,image\n" + text, encoding="utf-8")
    cat = _read_or_catalog_error(path)
    if cat is not None:
        assert len(cat.images) + len(cat.errors) == cat.rows > 0
        assert all(e.line >= 2 for e in cat.errors)


@FAST
@given(rows=st.lists(CSV_ROW, min_size=1, max_size=12))
def test_every_csv_row_is_a_good_image_or_a_bad_row_at_its_line(tmp_path, rows):
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "title", "url", "image", "price"])
    expected_lines = []
    line = 2
    for row in rows:
        start = out.tell()
        writer.writerow(row)
        if any(cell.strip() for cell in row):
            expected_lines.append(line)
        line += len(LINE_BREAK.findall(out.getvalue()[start:]))
    path = tmp_path / "catalog.csv"
    path.write_text(out.getvalue(), encoding="utf-8", newline="")

    cat = _read_or_catalog_error(path)
    if not expected_lines:
        assert cat is None  # only blank rows: "no product rows"
        return
    assert cat is not None
    assert cat.rows == len(expected_lines)
    reported = sorted([r.line for r in cat.images] + [e.line for e in cat.errors])
    assert reported == expected_lines
    assert set(cat.products) == {r.product_id for r in cat.images}


@FAST
@given(rows=st.lists(JSON_ROW, min_size=1, max_size=12), ascii_only=st.booleans())
def test_every_jsonl_line_is_a_good_image_or_a_bad_row(tmp_path, rows, ascii_only):
    path = tmp_path / "catalog.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in rows), encoding="utf-8")
    cat = read_catalog(path)
    assert cat.rows == len(rows)
    reported = sorted([r.line for r in cat.images] + [e.line for e in cat.errors])
    assert reported == list(range(1, len(rows) + 1))
    for ref in cat.images:
        product = cat.products[ref.product_id]
        assert product.title and product.url.lower().startswith(("http://", "https://"))
        assert all(isinstance(v, str) for v in product.extra.values())
