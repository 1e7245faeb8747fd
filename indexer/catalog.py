"""Reads a product catalog (CSV or JSON Lines) into products and image references, reporting bad rows."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from engine.errors import CatalogError
from engine.types import Product

REQUIRED_FIELDS = ("id", "title", "url", "image")
OPTIONAL_FIELDS = ("price", "currency", "category", "brand")
CORE_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS

JSONL_SUFFIXES = (".jsonl", ".ndjson")
MAX_CATALOG_BYTES = 1 << 30
MAX_URL_CHARS = 2048
MAX_PATH_CHARS = 4096
MAX_CHARS = {"id": 256, "title": 500, "price": 64, "currency": 16, "category": 200, "brand": 200}

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_PRICE_RE = re.compile(r"^(\d+(\.\d*)?|\.\d+)$")
_PRICE_SPACES = str.maketrans("", "", " \u00a0\u202f\u2009'")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_URL_FORBIDDEN_RE = re.compile(r"[\x00-\x20\x7f]")
_PLAIN_URL_RE = re.compile(r"https?://[A-Za-z0-9.\-]+(?:[/?#][^\x00-\x20\x7f]*)?\Z", re.IGNORECASE)


@dataclass(frozen=True)
class ImageRef:
    """One image of a product: one good catalog row."""

    product_id: str
    source: str  # absolute local path or http(s) URL
    line: int


@dataclass(frozen=True)
class RowError:
    """A catalog row that was skipped, with the 1-based line where it starts."""

    line: int
    product_id: str | None
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}"
        if self.product_id is not None:
            where += f" (id {self.product_id})"
        what = f"{self.field}: {self.reason}" if self.field else self.reason
        return f"{where}: {what}"


@dataclass
class Catalog:
    """A parsed catalog.

    `products` is in first-seen order; `Product.image` is the resolved source of its first good image.
    `rows` counts the data rows read (blank lines not counted), so `len(images) + len(errors) == rows`.
    """

    path: Path
    sha256: str
    format: str  # "csv" or "jsonl"
    products: dict[str, Product]
    images: list[ImageRef]
    errors: list[RowError]
    rows: int


class _BadRow(Exception):
    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


def parse_column_map(items: Iterable[str]) -> dict[str, str]:
    """Turn `["id=product_id", "url=link"]` (the CLI's repeated `--map FIELD=COLUMN`) into a column map."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, column = item.partition("=")
        name, column = name.strip().lower(), column.strip()
        if not sep or not name or not column:
            raise CatalogError(
                f"column mapping {item!r} is not FIELD=COLUMN", "Write it like --map id=product_id."
            )
        out[name] = column
    _check_column_map(out)
    return out


def read_catalog(
    path: str | os.PathLike[str],
    *,
    column_map: Mapping[str, str] | None = None,
    default_url_template: str | None = None,
    max_rows: int | None = None,
) -> Catalog:
    """Read a catalog file; bad rows are collected in `Catalog.errors`, never raised.

    Format: JSON Lines when the name ends in .jsonl/.ndjson or the first non-blank character is `{`,
    otherwise CSV with a header row (delimiter `,`, `;`, tab or `|`, picked from the header line).
    UTF-8, with or without a BOM. Header names and JSON keys match case-insensitively.

    Fields: `id`, `title`, `url` (absolute http/https product page), `image` (path relative to the
    catalog's folder, absolute path, or http/https URL) are required; `price`, `currency`, `category`,
    `brand` are optional; every other column is kept as `Product.extra` (str -> str).

    A product with several images repeats its `id` on several rows, one image each. The product's
    metadata comes from its first good row; later rows may leave `title`/`url` empty, but a different
    non-empty title makes that later row bad. Other differing fields on later rows are ignored.

    `price` accepts "12.5", "12,50", "1 299.00", "1.299,00", "1,299.00" and is stored as a plain decimal
    string ("12.50", "1299.00"); a single separator is the decimal point. The original text is not kept.

    `column_map` maps a vsearch field to the catalog's column, e.g. `{"id": "product_id"}` for the shared
    shoe datasets (`parse_column_map` builds it from CLI `--map id=product_id`). `default_url_template`
    (e.g. "https://shop.example/p/{id}") supplies `url` for catalogs without a url column or rows with
    an empty url; `{id}` is replaced by the URL-quoted product id. `max_rows` stops after that many data
    rows.

    Raises CatalogError when the file as a whole cannot be used: missing, not UTF-8, binary, empty,
    no data rows, or required columns absent from the CSV header.
    """
    catalog_path = Path(path).absolute()
    mapping = {str(k).strip().lower(): v for k, v in (column_map or {}).items()}
    _check_column_map(mapping)
    mapping = {k: v.strip() for k, v in mapping.items()}
    if default_url_template is not None:
        _check_url_template(default_url_template)
    if max_rows is not None and max_rows < 1:
        raise CatalogError(f"max_rows must be at least 1, got {max_rows}", "Pass a positive number.")

    data = _read_bytes(catalog_path)
    text = _decode(catalog_path, data)
    stripped = text.lstrip()
    if not stripped:
        raise CatalogError(f"catalog {catalog_path} is empty", "Add a header row and one row per image.")
    is_jsonl = catalog_path.suffix.lower() in JSONL_SUFFIXES or stripped[0] == "{"
    if not is_jsonl and stripped[0] == "[":
        raise CatalogError(
            f"catalog {catalog_path} looks like a JSON array",
            "Write one JSON object per line (JSON Lines, .jsonl) instead of one array.",
        )

    builder = _Builder(catalog_path, mapping, default_url_template)
    if is_jsonl:
        records = _jsonl_records(text, mapping)
    else:
        records = _csv_records(catalog_path, text, mapping, default_url_template is not None)
    for line, record in records:
        builder.add(line, record)
        if max_rows is not None and builder.rows >= max_rows:
            break
    if builder.rows == 0:
        raise CatalogError(f"catalog {catalog_path} has no product rows", "Add one row per product image.")
    return Catalog(
        path=catalog_path,
        sha256=hashlib.sha256(data).hexdigest(),
        format="jsonl" if is_jsonl else "csv",
        products=builder.products,
        images=builder.images,
        errors=builder.errors,
        rows=builder.rows,
    )


def write_errors_file(errors: Sequence[RowError], path: str | os.PathLike[str]) -> Path:
    """Write the bad rows as CSV (`line,product_id,field,reason`) and return the path."""
    out = Path(path)
    with out.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["line", "product_id", "field", "reason"])
        for err in errors:
            writer.writerow([err.line, err.product_id or "", err.field or "", err.reason])
    return out


def format_error_summary(errors: Sequence[RowError], limit: int = 10) -> str:
    """A few lines for the terminal: how many rows were skipped and the first `limit` of them.

    Returns "" when there are no errors.
    """
    if not errors:
        return ""
    noun = "row" if len(errors) == 1 else "rows"
    lines = [f"{len(errors)} catalog {noun} skipped:"]
    lines += [f"  {err}" for err in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"  ... and {len(errors) - limit} more (see the errors file)")
    return "\n".join(lines)


# --- reading and decoding -------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    hint = "Check the catalog path (VSEARCH_CATALOG or the command's argument)."
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise CatalogError(f"catalog {path} is a folder, not a file", hint)
        if size > MAX_CATALOG_BYTES:
            raise CatalogError(
                f"catalog {path} is {size / 2**20:.0f} MiB, over the {MAX_CATALOG_BYTES >> 20} MiB limit",
                "Split the catalog into smaller files.",
            )
        return path.read_bytes()
    except FileNotFoundError:
        raise CatalogError(f"catalog {path} does not exist", hint) from None
    except OSError as exc:
        raise CatalogError(f"catalog {path} cannot be read: {exc.strerror or exc}", hint) from None


def _decode(path: Path, data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise CatalogError(f"catalog {path} is UTF-16 text", "Save it as UTF-8 (in Excel: 'CSV UTF-8').")
    if b"\x00" in data:
        raise CatalogError(
            f"catalog {path} looks like a binary file, not CSV or JSON Lines text",
            "Export the catalog as UTF-8 CSV or JSON Lines.",
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CatalogError(
            f"catalog {path} is not UTF-8 text (bad byte at offset {exc.start})",
            "Save it as UTF-8 (in Excel: 'CSV UTF-8').",
        ) from None


def _check_column_map(mapping: Mapping[str, str]) -> None:
    for name, column in mapping.items():
        if name not in CORE_FIELDS:
            raise CatalogError(
                f"cannot map unknown field {name!r}",
                f"Map one of {', '.join(CORE_FIELDS)}; other columns are kept as they are.",
            )
        if not isinstance(column, str) or not column.strip():
            raise CatalogError(f"the column mapped to {name!r} is empty", "Write it like id=product_id.")


def _check_url_template(template: str) -> None:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        example = template.format(id="x") if names <= {"id"} else None
    except (ValueError, IndexError):
        example = None
        names = set()
    if example is None or names - {"id"}:
        raise CatalogError(
            f"url template {template!r} can only contain the placeholder {{id}}",
            "Write it like https://shop.example/p/{id}.",
        )
    if _url_problem(example) is not None:
        raise CatalogError(
            f"url template {template!r} does not give an absolute http(s) URL",
            "Write it like https://shop.example/p/{id}.",
        )


# --- record sources: each yields (line, {field-or-column: raw value}) -------------------------------

_Record = dict[str, Any]


def _csv_records(
    path: Path, text: str, mapping: Mapping[str, str], has_url_template: bool
) -> Iterator[tuple[int, _Record | _BadRow]]:
    first_line = text.lstrip("\r\n").split("\n", 1)[0]
    delimiter = max((",", ";", "\t", "|"), key=first_line.count) if first_line else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    while header is None:
        try:
            row = next(reader)
        except StopIteration:
            raise CatalogError(f"catalog {path} has no header row", "Add a header row.") from None
        except csv.Error as exc:
            raise CatalogError(f"catalog {path} has an unreadable header row: {exc}", "Fix the header.") from None
        if any(cell.strip() for cell in row):
            header = [cell.strip() for cell in row]
    columns = _map_header(path, header, mapping, has_url_template)

    last_line = reader.line_num
    while True:
        start = last_line + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield start, _BadRow(None, f"unreadable CSV: {exc}")
            last_line = reader.line_num
            continue
        last_line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield start, _BadRow(None, f"has {len(row)} columns, the header has {len(header)}")
            continue
        yield start, {key: row[i] for key, i in columns}


def _map_header(
    path: Path, header: list[str], mapping: Mapping[str, str], has_url_template: bool
) -> list[tuple[str, int]]:
    """Return (key, column index) pairs: core fields by name, other columns as `extra:<header name>`."""
    by_name: dict[str, int] = {}
    for i, name in enumerate(header):
        if not name:
            continue
        folded = name.casefold()
        if folded in by_name:
            raise CatalogError(f"catalog {path} has the column {name!r} twice", "Rename one of the columns.")
        by_name[folded] = i
    pairs: list[tuple[str, int]] = []
    used: set[int] = set()
    missing: list[str] = []
    for name in CORE_FIELDS:
        column = mapping.get(name, name)
        index = by_name.get(column.casefold())
        if index is None:
            if name in mapping or (name in REQUIRED_FIELDS and not (name == "url" and has_url_template)):
                missing.append(f"{name}" if column == name else f"{name} (mapped to {column!r})")
            continue
        pairs.append((name, index))
        used.add(index)
    if missing:
        hint = "Rename the columns or map them, e.g. --map id=product_id"
        if any(m.startswith("url") for m in missing):
            hint += "; a catalog without product pages needs a url template"
        raise CatalogError(
            f"catalog {path} lacks the column(s) {', '.join(missing)}; its header is: {', '.join(header)}",
            hint + ".",
        )
    pairs += [(f"extra:{header[i]}", i) for i in range(len(header)) if header[i] and i not in used]
    return pairs


def _jsonl_records(text: str, mapping: Mapping[str, str]) -> Iterator[tuple[int, _Record | _BadRow]]:
    wanted = {mapping.get(name, name).casefold(): name for name in CORE_FIELDS}
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            yield number, _BadRow(None, f"not valid JSON: {str(exc)[:200]}")
            continue
        if not isinstance(obj, dict):
            yield number, _BadRow(None, f"a JSON {type(obj).__name__} where a JSON object was expected")
            continue
        record: _Record = {}
        for key, value in obj.items():
            name = wanted.get(key.strip().casefold())
            if name is None:
                record[f"extra:{key}"] = value
            elif name not in record:
                record[name] = value
        yield number, record


# --- validation -------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, path: Path, mapping: Mapping[str, str], url_template: str | None) -> None:
        self.folder = os.path.join(str(path.parent), "")  # ends with a separator
        self.mapping = mapping
        self.url_template = url_template
        self.products: dict[str, Product] = {}
        self.first_line: dict[str, int] = {}
        self.seen_images: dict[tuple[str, str], int] = {}
        self.images: list[ImageRef] = []
        self.errors: list[RowError] = []
        self.rows = 0

    def add(self, line: int, record: _Record | _BadRow) -> None:
        self.rows += 1
        if isinstance(record, _BadRow):
            self.errors.append(RowError(line, None, record.field, record.reason))
            return
        product_id: str | None = None
        try:
            product_id = self._id(record)
            self._add_valid(line, product_id, record)
        except _BadRow as bad:
            self.errors.append(RowError(line, product_id, bad.field, bad.reason))

    def _id(self, record: _Record) -> str:
        product_id = _text(record, "id", required=True)
        assert product_id is not None
        if _CONTROL_RE.search(product_id):
            raise _BadRow("id", "contains control characters (tabs, line breaks)")
        return product_id

    def _add_valid(self, line: int, product_id: str, record: _Record) -> None:
        known = self.products.get(product_id)
        title = _text(record, "title", required=known is None)
        url = _text(record, "url", required=False, limit=MAX_URL_CHARS)
        if url is None and self.url_template is not None:
            url = self.url_template.format(id=quote(product_id, safe=""))
        if url is not None:
            problem = _url_problem(url)
            if problem:
                raise _BadRow("url", problem)
        elif known is None:
            raise _BadRow("url", "is missing or empty")
        source = self._image(record)
        price = _price(record)
        optional = {name: _text(record, name, required=False) for name in ("currency", "category", "brand")}
        extra = _extra(record)

        if known is not None and title is not None and title != known.title:
            raise _BadRow(
                "title",
                f"differs from the title {_short(known.title)!r} given for this id on line "
                f"{self.first_line[product_id]}; use one title per product or another id",
            )
        first = self.seen_images.get((product_id, source))
        if first is not None:
            raise _BadRow("image", f"the same image is already listed for this product on line {first}")

        if known is None:
            assert title is not None and url is not None
            self.products[product_id] = Product(
                id=product_id, title=title, url=url, image=source, price=price, extra=extra, **optional
            )
            self.first_line[product_id] = line
        self.seen_images[(product_id, source)] = line
        self.images.append(ImageRef(product_id=product_id, source=source, line=line))

    def _image(self, record: _Record) -> str:
        raw = _text(record, "image", required=True, limit=MAX_PATH_CHARS)
        assert raw is not None
        match = _SCHEME_RE.match(raw)
        if match and len(match.group(1)) > 1:  # one letter is a Windows drive, not a scheme
            scheme = match.group(1).lower()
            if scheme not in ("http", "https"):
                raise _BadRow("image", f"the {scheme}: scheme is not supported; use a file path or http(s) URL")
            problem = _url_problem(raw)
            if problem:
                raise _BadRow("image", problem)
            return raw
        if _CONTROL_RE.search(raw):
            raise _BadRow("image", "the path contains control characters (tabs, line breaks)")
        path = raw if os.path.isabs(raw) else self.folder + raw
        # normpath only when needed: it is a large share of the time on big catalogs
        return os.path.normpath(path) if "/." in path or "//" in path else path


def _text(record: _Record, name: str, *, required: bool, limit: int | None = None) -> str | None:
    value = record.get(name)
    if type(value) is str:  # the common case, kept fast for large catalogs
        text = value.strip()
        if text and len(text) <= (limit or MAX_CHARS.get(name, 1000)):
            return text
    if value is None or isinstance(value, bool):
        text = "" if value is None else None
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int | float):
        text = _number_text(value)
    else:
        text = None
    if text is None:
        raise _BadRow(name, f"must be text or a number, not a JSON {type(value).__name__}")
    text = text.strip()
    if not text:
        if required:
            raise _BadRow(name, "is missing or empty")
        return None
    limit = limit or MAX_CHARS.get(name, 1000)
    if len(text) > limit:
        raise _BadRow(name, f"is {len(text)} characters long, over the limit of {limit}")
    return text


def _number_text(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _price(record: _Record) -> str | None:
    raw = _text(record, "price", required=False)
    if raw is None:
        return None
    text = raw.translate(_PRICE_SPACES)
    if "," in text and "." in text:
        decimal_sep = "," if text.rfind(",") > text.rfind(".") else "."
        thousands = "." if decimal_sep == "," else ","
        text = text.replace(thousands, "").replace(decimal_sep, ".")
    elif text.count(",") == 1:
        text = text.replace(",", ".")
    elif text.count(",") > 1 or text.count(".") > 1:
        text = text.replace(",", "").replace(".", "")
    if not _PRICE_RE.match(text):
        raise _BadRow("price", f"{_short(raw)!r} is not a number (write it like 12.50)")
    try:
        return str(Decimal(text))
    except InvalidOperation:
        raise _BadRow("price", f"{_short(raw)!r} is not a number (write it like 12.50)") from None


def _extra(record: _Record) -> dict[str, str]:
    extra: dict[str, str] = {}
    for key, value in record.items():
        if not key.startswith("extra:") or value is None:
            continue
        if isinstance(value, str):
            extra[key[6:]] = value
        elif isinstance(value, bool):
            extra[key[6:]] = "true" if value else "false"
        elif isinstance(value, int | float):
            extra[key[6:]] = _number_text(value)
        else:
            extra[key[6:]] = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return extra


def _url_problem(url: str) -> str | None:
    """Why `url` is not an absolute http(s) URL with a host, or None when it is fine."""
    if len(url) <= MAX_URL_CHARS and _PLAIN_URL_RE.match(url):
        return None
    if len(url) > MAX_URL_CHARS:
        return f"is {len(url)} characters long, over the limit of {MAX_URL_CHARS}"
    if _URL_FORBIDDEN_RE.search(url):
        return "contains spaces or control characters (encode spaces as %20)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme.lower() not in ("http", "https"):
        return f"must start with http:// or https://, got {_short(url)!r}"
    if not parts.hostname:
        return "has no host name"
    return None


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "Catalog",
    "CatalogError",
    "ImageRef",
    "RowError",
    "format_error_summary",
    "parse_column_map",
    "read_catalog",
    "write_errors_file",
]
