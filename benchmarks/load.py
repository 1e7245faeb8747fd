"""Load benchmark: the real `vsearch serve` answering simulated users on every channel, with bad inputs and a /reindex.

Run: .venv/bin/python benchmarks/load.py [--users 100] [--duration 60] [--rate 5] [--reindex-at 20] [--quick]
     [--json FILE]

Everything runs on 127.0.0.1: the fake Telegram, Viber and WhatsApp (Graph) servers of tests/ run in this
process; `vsearch serve` runs as a subprocess (VSEARCH_WEIGHTS=random, a generated demo catalog) with all
three channels pointed at them. Each simulated user sticks to one channel (Telegram through the fake's
getUpdates queue, Viber and WhatsApp through signed webhook POSTs, or the HTTP API) and has at most one photo
in flight; photos start at a fixed total rate on a random idle user (none idle: the start is counted as
"skipped", a sign of saturation). 5% of the inputs are bad (corrupt bytes or text). An answer is the reply's
last message as recorded by the fake (or the HTTP response); latency runs from the send to that record.

It reports answered, lost (accepted but never answered; must be 0), duplicated answers, errors by class,
latency percentiles, throughput, and the serve process's RSS (ready, after warm-up, peak, end). With
--reindex-at an admin sends /reindex (to a catalog with other product ids) during the load: every answer
must come from one fully published index version. Exit status 1 when something was lost or inconsistent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import aiohttp  # noqa: E402
import fake_telegram as tg  # noqa: E402
import fake_viber as vb  # noqa: E402
import fake_whatsapp as wa  # noqa: E402
import psutil  # noqa: E402

from bot import replies  # noqa: E402
from indexer.demo import make_demo_catalog  # noqa: E402

CHANNEL_MIX = (("telegram", 0.35), ("viber", 0.25), ("whatsapp", 0.25), ("http", 0.15))
BAD_SHARE = 0.05
TOP_K = 3
ADMIN_CHAT = 1001
PRODUCT_RE = re.compile(r"/products/((?:demo|new)-\d+)")
INTRO_TEXTS = {replies.results_text(1, n) for n in range(1, TOP_K + 1)}


# -- what was sent and what came back ----------------------------------------------------------------


@dataclass
class Send:
    user: User
    kind: str  # "photo", "corrupt" or "text"
    at: float
    answered_at: float | None = None
    outcome: str | None = None  # "results", "bad_image", "hint", "rate_limited", "download_failed", ...
    products: set[str] = field(default_factory=set)
    index_version: str | None = None  # the HTTP API says which version answered


@dataclass
class User:
    n: int
    channel: str
    address: str  # chat id, Viber receiver, WhatsApp number, or "http-N"
    pending: Send | None = None
    cards: list[str] = field(default_factory=list)  # WhatsApp: cards of the answer being received
    unexpected: int = 0  # answers that arrived with nothing pending: duplicates


class TimedList(list):
    """A fake's `sent` list that also notes when each item arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: Any) -> None:
        self.times.append(time.monotonic())
        super().append(item)


def classify_text(text: str) -> str:
    if text == replies.photo_hint() or text == replies.PHOTO_HINT:
        return "hint"
    for name in ("RATE_LIMITED", "DOWNLOAD_FAILED", "SEARCH_FAILED", "INDEX_NOT_READY", "NO_RESULTS"):
        if text == getattr(replies, name):
            return name.lower()
    if text.startswith("I could not use that picture"):
        return "bad_image"
    return "other_text"


class Recorder:
    """Matches the fakes' recorded sends to the users' pending photos."""

    def __init__(self, users: dict[tuple[str, str], User], telegram: tg.FakeTelegram, viber: vb.FakeViber,
                 graph: wa.FakeGraph) -> None:
        self.users = users
        self.telegram, self.viber, self.graph = telegram, viber, graph
        self.seen = {"telegram": 0, "viber": 0, "whatsapp": 0}
        self.sends: list[Send] = []
        self.admin_texts: list[tuple[float, str]] = []

    def finish(self, user: User, at: float, outcome: str, products: set[str], version: str | None = None) -> None:
        send = user.pending
        if send is None:
            user.unexpected += 1
            return
        send.answered_at, send.outcome, send.products, send.index_version = at, outcome, products, version
        user.pending = None
        user.cards = []

    def scan(self) -> None:
        calls = self.telegram.calls
        for call in calls[self.seen["telegram"]:]:
            chat = call.params.get("chat_id")
            text = str(call.params.get("text") or "")
            if chat == ADMIN_CHAT and call.method in ("sendMessage", "editMessageText"):
                self.admin_texts.append((call.at, text))
                continue
            if call.method != "sendMessage" or call.status != 200:
                continue
            user = self.users.get(("telegram", str(chat)))
            if user is None:
                continue
            urls = " ".join(b.get("url", "") for b in tg.buttons(call))
            products = set(PRODUCT_RE.findall(urls))
            self.finish(user, call.at, "results" if products else classify_text(text), products)
        self.seen["telegram"] = len(calls)

        sent = self.viber.sent
        for i in range(self.seen["viber"], len(sent)):
            message, at = sent[i], sent.times[i]
            user = self.users.get(("viber", str(message.get("receiver"))))
            if user is None:
                continue
            if message.get("type") == "rich_media":
                self.finish(user, at, "results", set(PRODUCT_RE.findall(json.dumps(message))))
            elif message.get("type") == "text" and message.get("text") not in INTRO_TEXTS:
                self.finish(user, at, classify_text(message.get("text", "")), set())
        self.seen["viber"] = len(sent)

        sent = self.graph.sent
        for i in range(self.seen["whatsapp"], len(sent)):
            message, at = sent[i], sent.times[i]
            user = self.users.get(("whatsapp", str(message.get("to"))))
            if user is None:
                continue
            kind = message.get("type")
            text = json.dumps(message)
            body = (message.get("text") or {}).get("body", "")
            if kind == "interactive" or body in INTRO_TEXTS:
                user.cards = []
            elif kind == "image" or PRODUCT_RE.search(body):
                user.cards.extend(PRODUCT_RE.findall(text)[:1])
                if len(user.cards) >= TOP_K:
                    self.finish(user, at, "results", set(user.cards))
            else:
                self.finish(user, at, classify_text(body), set())
        self.seen["whatsapp"] = len(sent)


# -- the serve process ---------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env(work: Path, port: int, catalog_b: Path, fakes: tuple[tg.FakeTelegram, vb.FakeViber, wa.FakeGraph],
              image_size: int) -> dict[str, str]:
    telegram, viber, graph = fakes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VSEARCH_", "TELEGRAM_", "VIBER_", "WHATSAPP_"))}
    env.pop("REDIS_URL", None)
    env.update(
        PYTHONPATH=str(ROOT), VSEARCH_DATA_DIR=str(work / "data"), VSEARCH_WEIGHTS="random",
        VSEARCH_IMAGE_SIZE=str(image_size), VSEARCH_TOP_K=str(TOP_K), VSEARCH_HTTP_HOST="127.0.0.1",
        VSEARCH_HTTP_PORT=str(port), VSEARCH_CATALOG=str(catalog_b), VSEARCH_ADMIN_IDS=f"telegram:{ADMIN_CHAT}",
        VSEARCH_MEDIA_ALLOW_HOSTS="127.0.0.1",
        TELEGRAM_BOT_TOKEN=tg.TOKEN, TELEGRAM_API_BASE_URL=telegram.base_url,
        TELEGRAM_FILE_BASE_URL=telegram.file_base_url,
        VIBER_AUTH_TOKEN=vb.VIBER_TOKEN, VIBER_API_BASE_URL=viber.base_url,
        WHATSAPP_ACCESS_TOKEN=wa.ACCESS_TOKEN, WHATSAPP_APP_SECRET=wa.APP_SECRET,
        WHATSAPP_VERIFY_TOKEN=wa.VERIFY_TOKEN, WHATSAPP_PHONE_NUMBER_ID=wa.PHONE_NUMBER_ID,
        WHATSAPP_API_BASE_URL=graph.base_url,
    )
    return env


def build_first_index(work: Path, catalog_a: Path, env: dict[str, str]) -> None:
    code = "import sys; from vsearch_cli.main import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "index", str(catalog_a)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"vsearch index failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


async def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"vsearch serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                async with http.get(url + "/healthz") as resp:
                    health = await resp.json()
                    if "Stop with Ctrl-C" in log_path.read_text():
                        return health
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("vsearch serve did not start in time")


# -- the load ------------------------------------------------------------------------------------------


def channel_of(n: int, users: int) -> str:
    """Users split over the channels in the CHANNEL_MIX shares (100 users: 35, 25, 25, 15)."""
    position, cumulative = (n + 0.5) / users, 0.0
    for channel, share in CHANNEL_MIX:
        cumulative += share
        if position < cumulative:
            return channel
    return CHANNEL_MIX[-1][0]


class Load:
    def __init__(self, args: argparse.Namespace, url: str, fakes: tuple[tg.FakeTelegram, vb.FakeViber, wa.FakeGraph],
                 photos: list[bytes], rng: random.Random) -> None:
        self.args = args
        self.url = url
        self.telegram, self.viber, self.graph = fakes
        self.photos = photos
        self.rng = rng
        self.users: list[User] = []
        for n in range(args.users):
            channel = channel_of(n, args.users)
            address = {"telegram": str(200_000 + n), "viber": f"vu{n:05d}=", "whatsapp": f"1555{n:07d}",
                       "http": f"http-{n}"}[channel]
            self.users.append(User(n, channel, address))
        self.recorder = Recorder({(u.channel, u.address): u for u in self.users}, *fakes)
        self.skipped = 0
        self.transport_errors: Counter[str] = Counter()
        self.counter = 0
        # Each HTTP API user connects from its own loopback address: the API's rate limit is per client
        # address, and 15 simulated shoppers are 15 clients, not one.
        self.api_sessions: dict[str, aiohttp.ClientSession] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.health: list[tuple[float, str | None, str]] = []
        self.sigterm_sent: float | None = None
        self.proc: subprocess.Popen | None = None
        self.update_ids: dict[int, Send] = {}  # Telegram update id -> its send

    def input_for(self) -> tuple[str, bytes]:
        roll = self.rng.random()
        if roll < BAD_SHARE / 2:
            photo = self.rng.choice(self.photos)
            return "corrupt", photo[: len(photo) // 3] if self.rng.random() < 0.5 else os.urandom(2000)
        if roll < BAD_SHARE:
            return "text", b"hello, do you have this in red?"
        return "photo", self.rng.choice(self.photos)

    async def send(self, http: aiohttp.ClientSession, user: User, kind: str, data: bytes) -> None:
        self.counter += 1
        n = self.counter
        send = Send(user, kind, time.monotonic())
        user.pending = send
        self.recorder.sends.append(send)
        try:
            if user.channel == "telegram":
                chat = int(user.address)
                update = (tg.text_update(chat, data.decode()) if kind == "text"
                          else tg.photo_update(self.telegram, chat, data))
                send.at = time.monotonic()
                self.update_ids[self.telegram.enqueue(update)] = send
            elif user.channel == "viber":
                if kind == "text":
                    event = vb.text_event(user.address, 10**12 + n, data.decode())
                else:
                    self.viber.media[f"p{n}.jpg"] = data
                    event = vb.picture_event(user.address, 10**12 + n, self.viber.media_url(f"p{n}.jpg"))
                body = vb.encode(event)
                await self.post(http, send, "/webhooks/viber", body, "X-Viber-Content-Signature", vb.sign_viber(body))
            elif user.channel == "whatsapp":
                if kind == "text":
                    message = wa.text_message(user.address, f"wamid.L{n}", data.decode())
                else:
                    self.graph.media[f"m{n}"] = (data, "image/jpeg")
                    message = wa.image_message(user.address, f"wamid.L{n}", f"m{n}")
                body = wa.encode(wa.messages_payload(user.address, message))
                await self.post(http, send, "/webhooks/whatsapp", body, "X-Hub-Signature-256", wa.sign_whatsapp(body))
            else:
                await self.api_search(self.api_session(user), send, data)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.transport_errors[f"{user.channel}: {type(exc).__name__}"] += 1
            send.outcome = "not_accepted"
            user.pending = None

    async def post(self, http: aiohttp.ClientSession, send: Send, path: str, body: bytes, header: str,
                   signature: str) -> None:
        async with http.post(self.url + path, data=body,
                             headers={header: signature, "Content-Type": "application/json"}) as resp:
            await resp.read()
            if resp.status != 200:
                self.transport_errors[f"{send.user.channel}: HTTP {resp.status}"] += 1
                send.outcome = "not_accepted"
                send.user.pending = None

    def api_session(self, user: User) -> aiohttp.ClientSession:
        session = self.api_sessions.get(user.address)
        if session is None:
            local = f"127.0.0.{10 + len(self.api_sessions)}"
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                            connector=aiohttp.TCPConnector(local_addr=(local, 0)))
            self.api_sessions[user.address] = session
        return session

    async def api_search(self, http: aiohttp.ClientSession, send: Send, data: bytes) -> None:
        async with http.post(self.url + "/api/search", data=data, headers={"Content-Type": "image/jpeg"}) as resp:
            body = await resp.json(content_type=None)
            at = time.monotonic()
        if resp.status == 200:
            products = {r["id"] for r in body.get("results", [])}
            self.recorder.finish(send.user, at, "results", products, body.get("index_version"))
        elif resp.status == 400:
            self.recorder.finish(send.user, at, "bad_image", set())
        else:
            self.recorder.finish(send.user, at, f"http_{resp.status}", set())

    async def run(self, duration: float, reindex_at: float | None, sigterm_at: float | None = None,
                  on_sigterm=None) -> tuple[float, float, float | None]:
        """Start photos for `duration` seconds (or until SIGTERM is sent); returns (start, end of sending, /reindex time)."""
        interval = 1.0 / self.args.rate
        reindex_sent = None
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=200)) as http:
            start = time.monotonic()
            tick = 0
            while True:
                now = time.monotonic()
                if now - start >= duration:
                    break
                if sigterm_at is not None and now - start >= sigterm_at:
                    self.sigterm_sent = time.monotonic()
                    on_sigterm()
                    break
                if reindex_at is not None and reindex_sent is None and now - start >= reindex_at:
                    self.telegram.enqueue(tg.command_update(ADMIN_CHAT, "/reindex"))
                    reindex_sent = time.monotonic()
                idle = [u for u in self.users if u.pending is None]
                if not idle:
                    self.skipped += 1
                else:
                    user = self.rng.choice(idle)
                    kind, data = self.input_for()
                    if kind == "text" and user.channel == "http":
                        kind = "corrupt"  # the HTTP API takes images only: text bytes are a bad image there
                    task = asyncio.create_task(self.send(http, user, kind, data))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                tick += 1
                await asyncio.sleep(max(0.0, start + tick * interval - time.monotonic()))
            end = time.monotonic()
            drain_until = end + self.args.drain
            while time.monotonic() < drain_until:
                if not self.tasks and all(u.pending is None for u in self.users):
                    break
                if self.sigterm_sent is not None and self.proc is not None and self.proc.poll() is not None:
                    break  # serve has exited: whatever it was going to answer, it has answered
                await asyncio.sleep(0.1)
        for session in self.api_sessions.values():
            await session.close()
        return start, end, reindex_sent

    async def watch(self, stop: asyncio.Event) -> None:
        """Match answers every 10 ms; note /healthz once a second."""
        last_health = 0.0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while not stop.is_set():
                self.recorder.scan()
                if time.monotonic() - last_health >= 1.0:
                    last_health = time.monotonic()
                    try:
                        async with http.get(self.url + "/healthz") as resp:
                            body = await resp.json()
                            self.health.append((last_health, body.get("index_version"), body.get("status")))
                    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                        self.health.append((last_health, None, f"healthz failed: {type(exc).__name__}"))
                await asyncio.sleep(0.01)
        self.recorder.scan()


async def sample_rss(pid: int, samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            rss = proc.memory_info().rss
        except psutil.Error:
            return
        if rss == 0:  # exited (a zombie until it is reaped)
            return
        samples.append((time.monotonic(), rss))
        await asyncio.sleep(0.25)


# -- report --------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def published_versions(index_dir: Path) -> dict[str, set[str]]:
    """Every version folder that was fully written and published, with its product ids."""
    versions = {}
    for folder in index_dir.iterdir():
        if folder.is_dir() and not folder.name.startswith(".") and (folder / "manifest.json").is_file():
            versions[folder.name] = set(json.loads((folder / "products.json").read_text(encoding="utf-8")))
    return versions


EXPECTED = {"photo": {"results"}, "corrupt": {"bad_image"}, "text": {"hint"}}


def report(load: Load, start: float, end: float, reindex_sent: float | None, rss: list[tuple[float, int]],
           rss_ready: int, versions: dict[str, set[str]], warmup: float, loadavg: tuple[tuple[float, ...], ...],
           serve_log: str, secrets: list[str]) -> dict[str, Any]:
    sends = load.recorder.sends
    accepted = [s for s in sends if s.outcome != "not_accepted"]
    answered = [s for s in accepted if s.answered_at is not None]
    unanswered = [s for s in accepted if s.answered_at is None]
    still_queued = {id(load.update_ids[u["update_id"]]) for u in load.telegram._updates
                    if u["update_id"] in load.update_ids}
    left_at_telegram = [s for s in unanswered if id(s) in still_queued]
    lost = [s for s in unanswered if id(s) not in still_queued]
    latencies = [s.answered_at - s.at for s in answered]
    photo_latencies = [s.answered_at - s.at for s in answered if s.kind == "photo"]
    outcomes = Counter(f"{s.kind} -> {s.outcome}" for s in answered)
    unexpected = Counter(f"{s.kind} -> {s.outcome}" for s in answered if s.outcome not in EXPECTED[s.kind])
    duplicates = sum(u.unexpected for u in load.users)
    inconsistent = []
    for s in answered:
        if not s.products:
            continue
        homes = [v for v, ids in versions.items() if s.products <= ids]
        if not homes or (s.index_version is not None and s.index_version not in versions):
            inconsistent.append(s)
    catalogs = Counter("new" if all(p.startswith("new-") for p in s.products) else
                       "demo" if all(p.startswith("demo-") for p in s.products) else "mixed"
                       for s in answered if s.products)
    warm = [b for t, b in rss if t >= start + warmup]
    rss_warm = warm[0] if warm else rss_ready
    rss_end = rss[-1][1] if rss else rss_ready
    timeline = []  # RSS every tenth of the load, to tell a plateau from steady growth
    for k in range(11):
        at = start + k * (end - start) / 10
        later = [b for t, b in rss if t >= at]
        if later:
            timeline.append(_mb(later[0]))
    last_answer = max((s.answered_at for s in answered), default=end)
    reindex = None
    if reindex_sent is not None:
        done = [(t, text) for t, text in load.recorder.admin_texts if text.startswith(("Reindex finished", "Reindex failed"))]
        switches = []
        previous = None
        for t, version, _status in load.health:
            if version != previous:
                switches.append({"at_s": round(t - start, 1), "version": version})
                previous = version
        finished = done[0][0] if done else end
        phases = {"before": [], "during": [], "after": []}
        for s in answered:
            if s.kind == "photo":
                phase = "before" if s.at < reindex_sent else "during" if s.at < finished else "after"
                phases[phase].append(s.answered_at - s.at)
        reindex = {
            "photo_latency_by_phase_s": {
                name: {"photos": len(v), "p50": _r(percentile(v, 0.5)), "p95": _r(percentile(v, 0.95))}
                for name, v in phases.items()},
            "sent_at_s": round(reindex_sent - start, 1),
            "result": done[0][1] if done else "no answer",
            "took_s": round(done[0][0] - reindex_sent, 1) if done else None,
            "healthz_versions": switches,
            "answers_by_catalog": dict(catalogs),
        }
    by_channel = {}
    for channel, _ in CHANNEL_MIX:
        ch = [s.answered_at - s.at for s in answered if s.user.channel == channel and s.kind == "photo"]
        by_channel[channel] = {"answered": sum(1 for s in answered if s.user.channel == channel),
                               "p50_s": _r(percentile(ch, 0.5)), "p95_s": _r(percentile(ch, 0.95))}
    return {
        "users": load.args.users, "duration_s": load.args.duration, "rate_per_s": load.args.rate,
        "sent": len(sends), "accepted": len(accepted), "answered": len(answered), "lost": len(lost),
        "left_queued_at_telegram": len(left_at_telegram),
        "lost_detail": Counter(f"{s.user.channel} {s.kind}" for s in lost),
        "duplicate_answers": duplicates, "skipped_all_users_busy": load.skipped,
        "not_accepted": dict(load.transport_errors),
        "outcomes": dict(outcomes), "unexpected_outcomes": dict(unexpected),
        "answers_not_from_a_published_version": len(inconsistent), "published_versions": sorted(versions),
        "latency_all_s": {"p50": _r(percentile(latencies, 0.5)), "p95": _r(percentile(latencies, 0.95)),
                          "p99": _r(percentile(latencies, 0.99)), "max": _r(max(latencies, default=None))},
        "latency_photos_s": {"p50": _r(percentile(photo_latencies, 0.5)), "p95": _r(percentile(photo_latencies, 0.95)),
                             "p99": _r(percentile(photo_latencies, 0.99)), "mean": _r(statistics.fmean(photo_latencies)
                                                                                       if photo_latencies else None)},
        "by_channel": by_channel,
        "throughput_answers_per_s": round(len(answered) / max(last_answer - start, 1e-6), 2),
        "rss_mb": {"ready": _mb(rss_ready), "after_warmup": _mb(rss_warm), "peak": _mb(max((b for _, b in rss), default=0)),
                   "end": _mb(rss_end), "growth_after_warmup_pct": round(100.0 * (rss_end - rss_warm) / rss_warm, 1),
                   "every_tenth_of_the_load": timeline},
        "reindex": reindex,
        "loadavg_start_end": loadavg,
        "secrets_in_serve_output": sum(serve_log.count(s) for s in secrets),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _mb(value: int) -> float:
    return round(value / 2**20, 1)


def print_report(r: dict[str, Any]) -> None:
    print(f"\n== load: {r['users']} users, {r['duration_s']} s at {r['rate_per_s']} starts/s ==")
    print(f"sent {r['sent']}, accepted {r['accepted']}, answered {r['answered']}, LOST {r['lost']}, "
          f"duplicate answers {r['duplicate_answers']}, skipped (all users busy) {r['skipped_all_users_busy']}")
    if r["lost"]:
        print(f"lost: {dict(r['lost_detail'])}")
    if r["left_queued_at_telegram"]:
        print(f"never fetched from Telegram (kept there for the next start, not lost): {r['left_queued_at_telegram']}")
    if r.get("sigterm"):
        print(f"SIGTERM: {r['sigterm']}")
    print(f"not accepted: {r['not_accepted'] or 'none'}")
    print(f"outcomes: {r['outcomes']}")
    print(f"unexpected outcomes (errors by class): {r['unexpected_outcomes'] or 'none'}")
    lat, ph = r["latency_all_s"], r["latency_photos_s"]
    print(f"latency, all answers: p50 {lat['p50']} s, p95 {lat['p95']} s, p99 {lat['p99']} s, max {lat['max']} s")
    print(f"latency, photos: p50 {ph['p50']} s, p95 {ph['p95']} s, p99 {ph['p99']} s")
    for channel, c in r["by_channel"].items():
        print(f"  {channel:9s} answered {c['answered']:4d}  photo p50 {c['p50_s']} s  p95 {c['p95_s']} s")
    print(f"throughput: {r['throughput_answers_per_s']} answers/s")
    m = r["rss_mb"]
    print(f"serve RSS: ready {m['ready']} MB, after warm-up {m['after_warmup']} MB, peak {m['peak']} MB, "
          f"end {m['end']} MB (growth after warm-up {m['growth_after_warmup_pct']}%)")
    print(f"  RSS every tenth of the load (MB): {m['every_tenth_of_the_load']}")
    print(f"answers not from a published index version: {r['answers_not_from_a_published_version']} "
          f"(published: {', '.join(r['published_versions'])})")
    if r["reindex"]:
        ri = r["reindex"]
        print(f"reindex: sent at {ri['sent_at_s']} s, took {ri['took_s']} s: {ri['result']}")
        print(f"  answers by catalog: {ri['answers_by_catalog']}; /healthz versions: {ri['healthz_versions']}")
        print(f"  photo latency (sent before / during / after the reindex): {ri['photo_latency_by_phase_s']}")
    print(f"load average (1/5/15 min) at start {r['loadavg_start_end'][0]}, at end {r['loadavg_start_end'][1]}")
    print(f"secrets found in the serve process output: {r['secrets_in_serve_output']}")


# -- main ----------------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> int:
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vsearch-load-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    catalog_a = make_demo_catalog(work / "catalog-a", products=args.products, image_size=320)
    # Other pixel sizes, so no image of it is in the feature cache: the reindex runs the model on every one.
    catalog_b = make_demo_catalog(
        work / "catalog-b",
        products=args.reindex_products,
        image_size=352,
        id_prefix="new",
        url_template="https://new-shop.example/products/{id}",
    )
    photos = [p.read_bytes() for p in sorted((work / "catalog-a" / "images").glob("*.jpg"))]

    telegram, viber, graph = tg.FakeTelegram(), vb.FakeViber(), wa.FakeGraph()
    await telegram.start()
    await viber.start()
    await graph.start()
    viber.sent = TimedList()
    graph.sent = TimedList()
    fakes = (telegram, viber, graph)
    port = free_port()
    env = serve_env(work, port, catalog_b, fakes, args.image_size)
    print(f"work dir {work}; indexing {args.products} demo products ...", flush=True)
    await asyncio.to_thread(build_first_index, work, catalog_a, env)
    log_path = work / "serve.log"
    log_file = log_path.open("w")
    code = "import sys; from vsearch_cli.main import main; sys.exit(main(['serve']))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=work, env=env, stdout=log_file,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    exit_status = None
    try:
        health = await wait_ready(url, proc, log_path)
        print(f"vsearch serve (pid {proc.pid}) is up: {health}", flush=True)
        rss_ready = psutil.Process(proc.pid).memory_info().rss
        rss: list[tuple[float, int]] = []
        load = Load(args, url, fakes, photos, rng)
        load.proc = proc
        loadavg_start = tuple(round(x, 2) for x in os.getloadavg())
        watchers = [asyncio.create_task(load.watch(stop)), asyncio.create_task(sample_rss(proc.pid, rss, stop))]
        print(f"load: {args.users} users, {args.duration} s at {args.rate} photos/s"
              + (f", /reindex at {args.reindex_at} s" if args.reindex_at is not None else ""), flush=True)
        start, end, reindex_sent = await load.run(args.duration, args.reindex_at, args.sigterm_at,
                                                  lambda: proc.send_signal(signal.SIGTERM))
        if load.sigterm_sent is not None:
            exit_status = await asyncio.to_thread(proc.wait, 120)
            exited = time.monotonic()
        if reindex_sent is not None:  # let the reindex end (it may outlast the load) before judging versions
            deadline = time.monotonic() + args.drain
            while time.monotonic() < deadline and not any(
                    t.startswith(("Reindex finished", "Reindex failed")) for _, t in load.recorder.admin_texts):
                await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*watchers)
        loadavg_end = tuple(round(x, 2) for x in os.getloadavg())
        versions = published_versions(work / "data" / "index")
    finally:
        stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_status = await asyncio.to_thread(proc.wait, 90)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_status = proc.wait()
        log_file.close()
        await telegram.close()
        await viber.stop()
        await graph.stop()
    serve_log = log_path.read_text(errors="replace")
    secrets = [tg.TOKEN, vb.VIBER_TOKEN, wa.ACCESS_TOKEN, wa.APP_SECRET, wa.VERIFY_TOKEN]
    result = report(load, start, end, reindex_sent, rss, rss_ready, versions, args.warmup,
                    (loadavg_start, loadavg_end), serve_log, secrets)
    result["serve_exit_status_after_sigterm"] = exit_status
    if load.sigterm_sent is not None:
        in_flight = sum(1 for snd in load.recorder.sends if snd.at <= load.sigterm_sent and snd.outcome != "not_accepted"
                        and (snd.answered_at is None or snd.answered_at > load.sigterm_sent))
        result["sigterm"] = {"sent_at_s": round(load.sigterm_sent - start, 1), "exit_status": exit_status,
                             "exit_after_s": round(exited - load.sigterm_sent, 1),
                             "in_flight_when_sent": in_flight}
    result["command"] = " ".join([".venv/bin/python", "benchmarks/load.py", *sys.argv[1:]])
    print_report(result)
    print(f"serve exit status after SIGTERM: {exit_status}; log: {log_path}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=dict) + "\n", encoding="utf-8")
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    bad = result["lost"] or result["answers_not_from_a_published_version"] or result["duplicate_answers"]
    return 1 if bad else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=100, help="simulated users (default 100)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--rate", type=float, default=5.0, help="photo starts per second, all users together (default 5)")
    p.add_argument("--reindex-at", type=float, default=None, metavar="SECONDS",
                   help="an admin sends /reindex this many seconds into the load")
    p.add_argument("--sigterm-at", type=float, default=None, metavar="SECONDS",
                   help="send SIGTERM to serve this many seconds into the load and stop sending: every photo "
                        "accepted before must still be answered")
    p.add_argument("--quick", action="store_true", help="a 15 s smoke run (20 users, 3 photos/s)")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before the RSS baseline (default 10)")
    p.add_argument("--drain", type=float, default=90.0, help="seconds to wait for answers after the load")
    p.add_argument("--products", type=int, default=24, help="products in the served demo catalog")
    p.add_argument("--reindex-products", type=int, default=60, help="products in the catalog /reindex builds")
    p.add_argument("--image-size", type=int, default=224, help="VSEARCH_IMAGE_SIZE of the serve process")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--workdir", help="keep everything in this folder (default: a temporary one, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.users, args.rate, args.warmup = 15.0, 20, 3.0, 5.0
    if args.users < 1 or args.duration <= 0 or args.rate <= 0:
        p.error("--users, --duration and --rate must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
