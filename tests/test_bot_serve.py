"""`vsearch serve` end to end on 127.0.0.1: first-run indexing, graceful stop with searches in flight, SIGTERM, bad settings."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from bot_fixtures import free_port, make_bot_settings

from bot import serve as serve_module

ROOT = Path(__file__).resolve().parents[1]


async def test_serve_indexes_on_first_run_and_stops_gracefully(tmp_path, demo_catalog, extractor, capsys):
    from engine.settings import EngineSettings

    port = free_port()
    engine = EngineSettings(data_dir=tmp_path / "data", weights="random", image_size=extractor.image_size,
                            catalog=str(demo_catalog), top_k=4)
    settings = dataclasses.replace(make_bot_settings(engine), http_port=port)
    stop = asyncio.Event()
    server = asyncio.create_task(serve_module.serve(settings, stop))
    url = f"http://127.0.0.1:{port}"
    photo = (demo_catalog.parent / "images" / "demo-003-1.jpg").read_bytes()
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            if server.done():
                server.result()
            try:
                async with http.get(url + "/healthz") as resp:
                    health = await resp.json()
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
        assert health["status"] == "ok" and health["products"] == 16

        async def search() -> tuple[int, str]:
            async with http.post(url + "/api/search", data=photo, headers={"Content-Type": "image/jpeg"}) as resp:
                body = await resp.json()
                return resp.status, body["results"][0]["id"]

        in_flight = [asyncio.create_task(search()) for _ in range(6)]
        await asyncio.sleep(0.05)  # the requests are accepted ...
        stop.set()  # ... then the stop comes: every one of them is still answered
        answers = await asyncio.gather(*in_flight)
    assert answers == [(200, "demo-003")] * 6
    assert await asyncio.wait_for(server, timeout=60) == 0
    out = capsys.readouterr().out
    assert f"No index yet: indexing {demo_catalog}" in out
    assert "conv block 5, finding the product: off)" in out  # random weights: no mask head
    assert f"Web page and HTTP API: {url}/" in out and "Telegram bot: off" in out and "Stopped." in out
    assert (tmp_path / "data" / "index" / "CURRENT").is_file()


def test_main_exits_2_naming_a_bad_variable(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VSEARCH_HTTP_PORT", "eighty")
    assert serve_module.main() == 2
    assert "VSEARCH_HTTP_PORT" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_stops_the_real_process_with_exit_0(tmp_path):
    """The demo catalog path: no VSEARCH_CATALOG, no index; then SIGTERM; exit status 0."""
    port = free_port()
    env = dict(os.environ, VSEARCH_DATA_DIR=str(tmp_path / "data"), VSEARCH_WEIGHTS="random",
               VSEARCH_IMAGE_SIZE="64", VSEARCH_HTTP_PORT=str(port), VSEARCH_HTTP_HOST="127.0.0.1",
               PYTHONPATH=str(ROOT))
    for name in ("VSEARCH_CATALOG", "REDIS_URL", "TELEGRAM_BOT_TOKEN", "VIBER_AUTH_TOKEN", "WHATSAPP_ACCESS_TOKEN"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-c", "import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
                             "import bot.serve; sys.exit(bot.serve.main())"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "Stop with Ctrl-C" in line:
                break
        assert any("Stop with Ctrl-C" in line for line in lines), "".join(lines)
        assert any("generated a demo catalog" in line for line in lines)
        assert (tmp_path / "data" / "redis" / "redis.sock").exists()
        proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # dump every thread's stack, to see what the stop waits for
            time.sleep(2)
            proc.kill()
            rest, _ = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "Stopped." in rest
    # The embedded Redis it started is gone with it.
    assert not (tmp_path / "data" / "redis" / "redis.sock").exists() or _no_answer(tmp_path / "data" / "redis")


def _no_answer(folder: Path) -> bool:
    import redis

    try:
        redis.Redis(unix_socket_path=str(folder / "redis.sock"), socket_timeout=1).ping()
    except (redis.RedisError, OSError):
        return True
    return False
