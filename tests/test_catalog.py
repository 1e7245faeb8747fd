"""Catalog reading: CSV and JSON Lines, multi-image products, bad rows with line numbers, whole-file errors."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from engine.errors import CatalogError
from indexer.catalog import (
    RowError,
    format_error_summary,
    parse_column_map,
    read_catalog,
    write_errors_file,
)

HEADER = "id,title,url,image,price,currency,category,brand,color"
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_csv_happy_path_with_metadata_and_several_images(tmp_path):
    path = _write(
        tmp_path / "catalog.csv",
        f"{HEADER}\n"
        'A1,Trail Runner,https://shop.example/a1,img/a1-front.jpg,"1 299,00",EUR,sneakers,Acme,red\n'
        "A1,Trail Runner,https://shop.example/a1,img/a1-side.jpg,1299,EUR,sneakers,Acme,red\n"
        "B2,Chelsea Boot,https://shop.example/b2,https://cdn.example/b2.jpg,89.90,,boots,,\n",
    )
    cat = read_catalog(path)
    assert cat.errors == [] and cat.rows == 3 and cat.format == "csv"
    assert list(cat.products) == ["A1", "B2"]
    a1 = cat.products["A1"]
    assert (a1.title, a1.url, a1.price, a1.currency, a1.category, a1.brand) == (
        "Trail Runner", "https://shop.example/a1", "1299.00", "EUR", "sneakers", "Acme",
    )
    assert a1.extra == {"color": "red"}
    assert a1.image == str(tmp_path / "img" / "a1-front.jpg")
    b2 = cat.products["B2"]
    assert (b2.price, b2.currency, b2.brand, b2.extra) == ("89.90", None, None, {"color": ""})
    assert [(r.product_id, r.source, r.line) for r in cat.images] == [
        ("A1", str(tmp_path / "img" / "a1-front.jpg"), 2),
        ("A1", str(tmp_path / "img" / "a1-side.jpg"), 3),
        ("B2", "https://cdn.example/b2.jpg", 4),
    ]
    assert cat.path == path and len(cat.sha256) == 64


def test_image_references_resolve_against_the_catalog_folder(tmp_path):
    folder = tmp_path / "shop"
    folder.mkdir()
    path = _write(
        folder / "catalog.csv",
        "id,title,url,image\n"
        "p1,One,https://s.example/1,photos/1.jpg\n"
        "p2,Two,https://s.example/2,./photos/../2.jpg\n"
        "p3,Three,https://s.example/3,../elsewhere/3.jpg\n"
        "p4,Four,https://s.example/4,/srv/images/4.jpg\n"
        "p5,Five,https://s.example/5,HTTPS://cdn.example/5.jpg?size=big\n",
    )
    sources = [r.source for r in read_catalog(path).images]
    assert sources == [
        str(folder / "photos" / "1.jpg"),
        str(folder / "2.jpg"),
        str(tmp_path / "elsewhere" / "3.jpg"),
        "/srv/images/4.jpg",
        "HTTPS://cdn.example/5.jpg?size=big",
    ]
    assert all(os.path.isabs(s) for s in sources[:4])


def test_jsonl_happy_path_coerces_values(tmp_path):
    lines = [
        {"id": "A", "title": "Shoe A", "url": "https://s.example/a", "image": "a.jpg", "price": 12.5,
         "sizes": [40, 41], "in_stock": True, "rating": 4, "note": None},
        {"id": 17, "title": "Numbered", "url": "https://s.example/17", "image": "17.jpg", "price": "9,99"},
        {"ID": "E", "Title": "Upper Case Keys", "URL": "https://s.example/e", "Image": "e.jpg"},
        {"id": "A", "image": "a2.jpg"},
    ]
    path = _write(tmp_path / "c.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    cat = read_catalog(path)
    assert cat.errors == [] and cat.format == "jsonl" and cat.rows == 4
    assert list(cat.products) == ["A", "17", "E"]
    a = cat.products["A"]
    assert a.price == "12.5"
    assert a.extra == {"sizes": "[40,41]", "in_stock": "true", "rating": "4"}
    assert cat.products["17"].price == "9.99"
    assert [(r.product_id, Path(r.source).name, r.line) for r in cat.images] == [
        ("A", "a.jpg", 1), ("17", "17.jpg", 2), ("E", "e.jpg", 3), ("A", "a2.jpg", 4),
    ]


def test_jsonl_is_sniffed_from_content(tmp_path):
    path = _write(tmp_path / "catalog.txt", '\n  {"id": "x", "title": "X", "url": "https://s.example/x", "image": "x.jpg"}\n')
    cat = read_catalog(path)
    assert cat.format == "jsonl" and cat.images[0].line == 2


def test_every_kind_of_bad_csv_row_is_reported(tmp_path):
    long_url = "https://shop.example/" + "x" * 2100
    rows = [
        HEADER,  # 1
        "A,Shoe A,https://shop.example/a,img/a1.jpg,10,EUR,,,",  # 2 good
        "A,Shoe A,https://shop.example/a,img/a2.jpg,10,EUR,,,",  # 3 good: second image
        ",No Id,https://shop.example/x,img/x.jpg,,,,,",  # 4
        "B,,https://shop.example/b,img/b.jpg,,,,,",  # 5
        "C,Shoe C,ftp://shop.example/c,img/c.jpg,,,,,",  # 6
        "D,Shoe D,https:///d,img/d.jpg,,,,,",  # 7
        "E,Shoe E,https://shop.example/e f,img/e.jpg,,,,,",  # 8
        f"F,Shoe F,{long_url},img/f.jpg,,,,,",  # 9
        "G,Shoe G,https://shop.example/g,,,,,,",  # 10
        "H,Shoe H,https://shop.example/h,ftp://cdn.example/h.jpg,,,,,",  # 11
        'I,Shoe I,https://shop.example/i,"data:image/png;base64,AAAA",,,,,',  # 12
        "J,Shoe J,https://shop.example/j,file:///etc/passwd,,,,,",  # 13
        "K,Shoe K,https://shop.example/k,img/k.jpg,cheap,,,,",  # 14
        "A,Other Title,https://shop.example/a,img/a3.jpg,,,,,",  # 15
        "A,Shoe A,https://shop.example/a,img/a1.jpg,,,,,",  # 16
        f"L,{'t' * 501},https://shop.example/l,img/l.jpg,,,,,",  # 17
        "M,Shoe M,https://shop.example/m",  # 18
        "N,Shoe N,https://shop.example/n,https://cdn.example/n.jpg,12.5,USD,,,",  # 19 good
        "O,Shoe O,https://shop.example/o,/abs/o.jpg,,,,,",  # 20 good
        "P,Shoe P,https://shop.example:99999/p,img/p.jpg,,,,,",  # 21
        "Q,Shoe Q,shop.example/q,img/q.jpg,,,,,",  # 22
        "R,Shoe R,https://shop.example/r,img/r.jpg,-5,,,,",  # 23
    ]
    cat = read_catalog(_write(tmp_path / "catalog.csv", "\n".join(rows) + "\n"))
    assert list(cat.products) == ["A", "N", "O"]
    assert [r.line for r in cat.images] == [2, 3, 19, 20]
    assert cat.rows == len(rows) - 1 == len(cat.images) + len(cat.errors)
    got = {e.line: e for e in cat.errors}
    expected = {
        4: (None, "id", "missing"),
        5: ("B", "title", "missing"),
        6: ("C", "url", "http"),
        7: ("D", "url", "no host"),
        8: ("E", "url", "spaces"),
        9: ("F", "url", "over the limit of 2048"),
        10: ("G", "image", "missing"),
        11: ("H", "image", "ftp: scheme"),
        12: ("I", "image", "data: scheme"),
        13: ("J", "image", "file: scheme"),
        14: ("K", "price", "not a number"),
        15: ("A", "title", "line 2"),
        16: ("A", "image", "already listed for this product on line 2"),
        17: ("L", "title", "over the limit of 500"),
        18: (None, None, "has 3 columns, the header has 9"),
        21: ("P", "url", "not a valid URL"),
        22: ("Q", "url", "http"),
        23: ("R", "price", "not a number"),
    }
    assert set(got) == set(expected)
    for line, (product_id, field, words) in expected.items():
        err = got[line]
        assert (err.product_id, err.field) == (product_id, field), err
        assert words in err.reason, err


def test_every_kind_of_bad_jsonl_row_is_reported(tmp_path):
    good = {"id": "A", "title": "Shoe A", "url": "https://s.example/a", "image": "a.jpg"}
    lines = [
        json.dumps(good),  # 1
        "[1, 2]",  # 2
        "",  # 3 blank: not a row
        '{"id": "B", "title": "B", oops',  # 4
        json.dumps({**good, "id": "C", "title": {"en": "nested"}}),  # 5
        json.dumps({**good, "id": "D", "image": ["d.jpg"]}),  # 6
        json.dumps({**good, "id": None}),  # 7
        json.dumps({**good, "id": True}),  # 8
        json.dumps({**good, "id": "E", "url": 42}),  # 9
        '"just a string"',  # 10
        json.dumps({**good, "id": "F", "price": [1]}),  # 11
        json.dumps({**good, "id": "G", "image": "a.jpg"}),  # 12 good
    ]
    cat = read_catalog(_write(tmp_path / "c.ndjson", "\n".join(lines)))
    assert [(r.product_id, r.line) for r in cat.images] == [("A", 1), ("G", 12)]
    assert cat.rows == 11
    got = {e.line: (e.product_id, e.field) for e in cat.errors}
    assert got == {
        2: (None, None), 4: (None, None), 5: ("C", "title"), 6: ("D", "image"), 7: (None, "id"),
        8: (None, "id"), 9: ("E", "url"), 10: (None, None), 11: ("F", "price"),
    }
    reasons = {e.line: e.reason for e in cat.errors}
    assert "JSON object" in reasons[2] and "not valid JSON" in reasons[4] and "JSON dict" in reasons[5]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_multi_line_quoted_fields_keep_physical_line_numbers(tmp_path, newline):
    rows = [
        "id,title,url,image",  # 1
        '"A","Shoe',  # 2
        'on two lines",https://s.example/a,a.jpg',  # 3
        "B,Shoe B,ftp://s.example/b,b.jpg",  # 4
        '"C","multi',  # 5
        "",  # 6
        "line",  # 7
        '",https://s.example/c,c.jpg',  # 8
        "",  # 9 blank
        "D,,https://s.example/d,d.jpg",  # 10
    ]
    cat = read_catalog(_write(tmp_path / "c.csv", newline.join(rows) + newline))
    assert [(r.product_id, r.line) for r in cat.images] == [("A", 2), ("C", 5)]
    assert cat.products["A"].title == f"Shoe{newline}on two lines"
    assert [(e.line, e.product_id, e.field) for e in cat.errors] == [(4, "B", "url"), (10, "D", "title")]


def test_bom_and_semicolon_delimiter(tmp_path):
    text = "\ufeffid;title;url;image;price\np1;Sandale;https://s.example/p1;p1.jpg;12,50\n"
    cat = read_catalog(_write(tmp_path / "c.csv", text))
    assert cat.errors == []
    assert cat.products["p1"].price == "12.50" and cat.products["p1"].title == "Sandale"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("12.5", "12.5"), ("12,50", "12.50"), ("1 299.00", "1299.00"), ("1\u00a0299,00", "1299.00"),
     ("1,299.00", "1299.00"), ("1.299,00", "1299.00"), ("1,000,000", "1000000"), (".5", "0.5"), ("007", "7")],
)
def test_price_formats(tmp_path, raw, expected):
    cat = read_catalog(_write(tmp_path / "c.csv", f'id,title,url,image,price\np,P,https://s.example/p,p.jpg,"{raw}"\n'))
    assert cat.products["p"].price == expected


SHOES_HEADER = "product_id,title,category,subcategory,image,source_repo,source_path,source_commit"
SHOES_ROWS = [
    "myntra-10127,Rockport Brown Casual Shoes (Men),casual_shoes,men,images/myntra-10127/1.jpg,"
    "ab-orbit/phd-computing-vision,shoes-tranning/data/10127.png,690bdd93",
    "myntra-10142,Rockport Brown Casual Shoes (Men),casual_shoes,men,images/myntra-10142/1.jpg,"
    "ab-orbit/phd-computing-vision,shoes-tranning/data/10142.png,690bdd93",
    "step up/1,Adidas Campus,sneakers,adidas,images/step/1.jpg,x/y,front.png,aee29742",
    "step up/1,Adidas Campus,sneakers,adidas,images/step/2.jpg,x/y,left.png,aee29742",
]


def test_column_map_and_url_template_for_the_shoe_dataset_format(tmp_path):
    path = _write(tmp_path / "catalog.csv", "\n".join([SHOES_HEADER, *SHOES_ROWS]) + "\n")
    cat = read_catalog(
        path, column_map=parse_column_map(["id=product_id"]), default_url_template="https://example.invalid/p/{id}"
    )
    assert cat.errors == [] and len(cat.images) == 4
    assert list(cat.products) == ["myntra-10127", "myntra-10142", "step up/1"]
    shoe = cat.products["myntra-10127"]
    assert shoe.url == "https://example.invalid/p/myntra-10127"
    assert shoe.category == "casual_shoes"
    assert shoe.image == str(tmp_path / "images" / "myntra-10127" / "1.jpg")
    assert shoe.extra == {
        "subcategory": "men",
        "source_repo": "ab-orbit/phd-computing-vision",
        "source_path": "shoes-tranning/data/10127.png",
        "source_commit": "690bdd93",
    }
    assert cat.products["step up/1"].url == "https://example.invalid/p/step%20up%2F1"

    with pytest.raises(CatalogError, match="id") as info:
        read_catalog(path, default_url_template="https://example.invalid/p/{id}")
    assert "product_id" in str(info.value) and "--map" in info.value.hint
    with pytest.raises(CatalogError, match="url") as info:
        read_catalog(path, column_map={"id": "product_id"})
    assert "url template" in info.value.hint
    with pytest.raises(CatalogError, match="sku"):
        read_catalog(path, column_map={"id": "product_id", "brand": "sku"}, default_url_template="https://e.x/{id}")


def test_url_template_fills_empty_urls_only(tmp_path):
    path = _write(tmp_path / "c.csv", "id,title,url,image\na,A,,a.jpg\nb,B,https://s.example/b,b.jpg\n")
    cat = read_catalog(path, default_url_template="https://shop.example/item/{id}?ref=vs")
    assert cat.products["a"].url == "https://shop.example/item/a?ref=vs"
    assert cat.products["b"].url == "https://s.example/b"


@pytest.mark.parametrize("template", ["https://e.x/{sku}", "ftp://e.x/{id}", "/p/{id}", "https://e.x/{id"])
def test_bad_url_templates_are_refused(tmp_path, template):
    path = _write(tmp_path / "c.csv", "id,title,url,image\na,A,,a.jpg\n")
    with pytest.raises(CatalogError, match="url template"):
        read_catalog(path, default_url_template=template)


@pytest.mark.parametrize("items", [["id"], ["id="], ["=product_id"], ["sku=product_id"]])
def test_bad_column_maps_are_refused(items):
    with pytest.raises(CatalogError):
        parse_column_map(items)


@pytest.mark.dataset
def test_shared_multiview_dataset_reads_cleanly():
    folder = SHARED_DATASETS / "shoes_multiview"
    if not (folder / "catalog.csv").is_file():
        pytest.skip(f"shared dataset {folder} is absent; this test needs ../shared/datasets/shoes_multiview")
    cat = read_catalog(
        folder / "catalog.csv", column_map={"id": "product_id"}, default_url_template="https://example.invalid/p/{id}"
    )
    assert cat.errors == [] and cat.rows == len(cat.images)
    assert len(cat.products) < len(cat.images)  # several views per product
    assert all(Path(ref.source).is_file() for ref in cat.images)


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("empty.csv", b"", "empty"),
        ("blank.csv", b"  \n\n\t\n", "empty"),
        ("header.csv", b"id,title,url,image\n", "no product rows"),
        ("blank-rows.csv", b"id,title,url,image\n,,,\n\n", "no product rows"),
        ("nocols.csv", b"sku,name\n1,x\n", "lacks the column"),
        ("latin1.csv", "id,title,url,image\n1,Caf\u00e9,https://s.example/1,a.jpg\n".encode("latin-1"), "not UTF-8"),
        ("utf16.csv", "id,title,url,image\n".encode("utf-16"), "UTF-16"),
        ("binary.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        ("array.json", b'[{"id": "a"}]', "JSON array"),
        ("dupe.csv", b"id,title,url,image,Title\n", "twice"),
    ],
)
def test_unusable_catalogs_raise_catalog_error(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CatalogError, match=words) as info:
        read_catalog(path)
    assert info.value.hint


def test_missing_file_and_folder_raise_catalog_error(tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        read_catalog(tmp_path / "nope.csv")
    with pytest.raises(CatalogError, match="folder"):
        read_catalog(tmp_path)


def test_max_rows_stops_early(tmp_path):
    body = "".join(f"p{i},P{i},https://s.example/{i},{i}.jpg\n" for i in range(10))
    cat = read_catalog(_write(tmp_path / "c.csv", "id,title,url,image\n" + body), max_rows=3)
    assert cat.rows == 3 and list(cat.products) == ["p0", "p1", "p2"]


def test_errors_file_and_summary(tmp_path):
    errors = [RowError(4, None, "id", "is missing or empty"), RowError(7, "B, the 2nd", "url", 'bad "quoted" url')]
    out = write_errors_file(errors, tmp_path / "errors.csv")
    with out.open(newline="", encoding="utf-8") as fh:
        assert list(csv.reader(fh)) == [
            ["line", "product_id", "field", "reason"],
            ["4", "", "id", "is missing or empty"],
            ["7", "B, the 2nd", "url", 'bad "quoted" url'],
        ]
    summary = format_error_summary(errors * 6, limit=3)
    lines = summary.splitlines()
    assert lines[0] == "12 catalog rows skipped:"
    assert lines[1] == "  line 4: id: is missing or empty"
    assert lines[2] == "  line 7 (id B, the 2nd): url: bad \"quoted\" url"
    assert len(lines) == 5 and "9 more" in lines[-1]
    assert format_error_summary([]) == ""
