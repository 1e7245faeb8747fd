"""The web page in headless Chromium: upload a photo, see the result grid (image, title, price, link)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["bot_fixtures"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture
async def browser_page():
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent: install Debian's chromium (scripts/test-deps.sh) for this test")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = await browser.new_page()
            yield page
        finally:
            await browser.close()


async def test_upload_a_photo_and_see_the_grid(bot_app, browser_page, tmp_path):
    page = browser_page
    engine = bot_app.stack.engine
    photo = tmp_path / "my-shoe.jpg"
    photo.write_bytes(engine.image_bytes("demo-013"))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(str(bot_app.make_url("/")))
    assert "Find shoes by photo" in await page.inner_text("h1")

    await page.set_input_files("#file", str(photo))
    await page.wait_for_selector("#results .card", timeout=30_000)
    cards = page.locator("#results .card")
    assert await cards.count() == 3
    first = cards.nth(0)
    product = engine.searcher.product("demo-013")
    assert product.title in await first.locator(".title").inner_text()
    assert await first.locator(".price").inner_text() == f"{product.price} {product.currency}"
    assert await first.locator("a").get_attribute("href") == product.url
    # The product picture is served by the app and really loads in the browser.
    image = first.locator("img")
    assert await image.get_attribute("src") == "/images/demo-013/0"
    await page.wait_for_function("document.querySelector('#results .card img').naturalWidth > 0", timeout=10_000)
    assert "products found" in await page.inner_text("#status")
    assert errors == []


async def test_a_bad_file_shows_the_reason(bot_app, browser_page, tmp_path):
    page = browser_page
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is a text file, not a photo")
    await page.goto(str(bot_app.make_url("/")))
    await page.set_input_files("#file", str(bad))
    await page.wait_for_selector("#status.error", timeout=30_000)
    assert "not an image" in (await page.inner_text("#status")).lower()
    assert await page.locator("#results .card").count() == 0
