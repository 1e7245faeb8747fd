"""What the fake platform servers share: an aiohttp app on 127.0.0.1 and a wait for recorded sends."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web


class LoopbackServer:
    """Subclasses add their routes in `routes(app)` and append accepted bodies to `sent`, then call `_changed.set()`."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Event()

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self):
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_sent(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """The first `count` accepted messages, waiting for them to arrive."""
        async with asyncio.timeout(timeout):
            while len(self.sent) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.sent[:count]
