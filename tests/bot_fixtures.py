"""Shared bot fixtures: embedded Redis, a tiny index built once with random weights, the core stack, a running app.

Use them with `from bot_fixtures import bot_engine, redis_state, bot_stack, bot_app  # noqa: F401`
(they build on `extractor` and `demo_catalog` from conftest.py).
"""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ADMIN_IDS = frozenset({"telegram:1001", "viber:admin-viber=", "whatsapp:15550001111"})


@dataclass(frozen=True)
class BotEngine:
    """A built index (read-only: do not reindex into it) and a Searcher over it."""

    settings: Any  # EngineSettings
    searcher: Any  # engine.search.Searcher
    catalog: Path
    version: str
    images: dict[str, Path]  # product id -> its local photo, as built (stays valid after a reindex)

    def image_bytes(self, product_id: str) -> bytes:
        """The catalog photo of a product (a real JPEG), e.g. image_bytes("demo-003")."""
        return self.images[product_id].read_bytes()


@dataclass
class BotStack:
    settings: Any  # BotSettings
    state: Any  # State
    search: Any  # InProcessSearchClient
    admin: Any  # Admin
    core: Any  # ChatCore
    engine: BotEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_engine(catalog: Path, data_dir: Path, extractor: Any) -> BotEngine:
    from engine.search import Searcher
    from engine.settings import EngineSettings
    from engine.types import Product
    from indexer.build import build_index

    settings = EngineSettings(data_dir=data_dir, weights="random", image_size=extractor.image_size, top_k=3)
    report = build_index(catalog, settings, extractor=extractor)
    searcher = Searcher(settings, extractor)
    table = json.loads((settings.index_dir / report.version / "products.json").read_text(encoding="utf-8"))
    products = [Product.from_dict(data) for data in table.values()]
    images = {p.id: searcher.local_image_path(p) for p in products}
    return BotEngine(settings, searcher, Path(catalog), report.version, images)


@pytest.fixture(scope="session")
def bot_engine(tmp_path_factory, demo_catalog, extractor) -> BotEngine:
    """The demo catalog (16 products) indexed once per session; top_k is 3 so paging has several pages."""
    return build_engine(demo_catalog, tmp_path_factory.mktemp("bot-data"), extractor)


def make_bot_settings(engine_settings: Any, **changes: Any) -> Any:
    from bot.config import BotSettings

    base = BotSettings(engine=engine_settings, admin_ids=ADMIN_IDS, media_allow_hosts=frozenset({"127.0.0.1"}))
    return dataclasses.replace(base, **changes)


@pytest.fixture
async def redis_state(tmp_path) -> AsyncIterator[Any]:
    """A State over a fresh embedded Redis server in tmp_path (stopped afterwards)."""
    from bot.state import State

    state = await State.open(None, tmp_path / "redis-home")
    yield state
    await state.close()


async def open_stack(settings: Any, state: Any, engine: BotEngine, searcher: Any = None) -> BotStack:
    from bot.admin import Admin
    from bot.core import ChatCore
    from bot.search_client import InProcessSearchClient

    search = InProcessSearchClient(searcher or engine.searcher)
    admin = Admin(settings, state, search, extractor=(searcher or engine.searcher).extractor)
    return BotStack(settings, state, search, admin, ChatCore(settings, state, search, admin), engine)


@pytest.fixture
async def bot_stack(bot_engine, redis_state) -> AsyncIterator[BotStack]:
    """settings + State + InProcessSearchClient + Admin + ChatCore over the session index (admins: ADMIN_IDS)."""
    stack = await open_stack(make_bot_settings(bot_engine.settings), redis_state, bot_engine)
    yield stack
    await stack.admin.close()
    await stack.search.close()


@pytest.fixture
async def bot_app(bot_stack) -> AsyncIterator[Any]:
    """An aiohttp TestClient (127.0.0.1) of make_app over bot_stack, without chat channel routes."""
    from aiohttp.test_utils import TestClient, TestServer

    from bot.web import make_app

    s = bot_stack
    app = make_app(s.settings, s.core, s.search, s.state, channels=False)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    client.stack = s
    yield client
    await client.close()
