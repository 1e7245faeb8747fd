"""Bot settings: every environment variable of `vsearch serve`, validated once at start."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from engine.errors import SettingsError
from engine.settings import EngineSettings, load_dotenv_file

CHANNELS = ("telegram", "viber", "whatsapp")
WHATSAPP_VARIABLES = (
    "WHATSAPP_ACCESS_TOKEN",
    "WHATSAPP_APP_SECRET",
    "WHATSAPP_VERIFY_TOKEN",
    "WHATSAPP_PHONE_NUMBER_ID",
)
_HOST_RE = re.compile(r"^[A-Za-z0-9.\-:\[\]]+$")
# Telegram accepts 1-256 characters A-Z, a-z, 0-9, _ and - as a webhook secret token.
_TELEGRAM_SECRET_RE = re.compile(r"^[A-Za-z0-9_\-]{1,256}$")


@dataclass(frozen=True)
class BotSettings:
    engine: EngineSettings = field(default_factory=EngineSettings)
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    public_url: str | None = None  # public base URL of the HTTP app, no trailing slash (VSEARCH_PUBLIC_URL)
    admin_ids: frozenset[str] = frozenset()
    redis_url: str | None = field(default=None, repr=False)
    telegram_bot_token: str | None = field(default=None, repr=False)
    telegram_api_base_url: str = "https://api.telegram.org/bot"
    telegram_file_base_url: str = "https://api.telegram.org/file/bot"
    telegram_webhook_url: str | None = None
    telegram_webhook_secret: str | None = field(default=None, repr=False)
    viber_auth_token: str | None = field(default=None, repr=False)
    viber_api_base_url: str = "https://chatapi.viber.com/pa"
    whatsapp_access_token: str | None = field(default=None, repr=False)
    whatsapp_app_secret: str | None = field(default=None, repr=False)
    whatsapp_verify_token: str | None = field(default=None, repr=False)
    whatsapp_phone_number_id: str | None = None
    whatsapp_api_base_url: str = "https://graph.facebook.com/v21.0"
    media_allow_hosts: frozenset[str] = frozenset()
    # Reverse proxies whose X-Forwarded-For names the real client (VSEARCH_TRUSTED_PROXIES).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @property
    def telegram_enabled(self) -> bool:
        return self.telegram_bot_token is not None

    @property
    def viber_enabled(self) -> bool:
        return self.viber_auth_token is not None

    @property
    def whatsapp_enabled(self) -> bool:
        return self.whatsapp_access_token is not None  # from_env makes sure all four are set together

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BotSettings:
        """Read the settings; with no mapping given, `.env` in the cwd is read first (the environment wins)."""
        if environ is None:
            load_dotenv_file(Path(".env"))
            environ = os.environ
        env = environ

        def opt(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        telegram_token = opt("TELEGRAM_BOT_TOKEN")
        if telegram_token is not None and not re.fullmatch(r"[A-Za-z0-9:_\-]+", telegram_token):
            raise SettingsError("TELEGRAM_BOT_TOKEN", "contains characters a bot token never has (copy it again from @BotFather)")
        webhook_url = _url(env, "TELEGRAM_WEBHOOK_URL", None)
        webhook_secret = opt("TELEGRAM_WEBHOOK_SECRET")
        if webhook_secret is not None and not _TELEGRAM_SECRET_RE.fullmatch(webhook_secret):
            raise SettingsError("TELEGRAM_WEBHOOK_SECRET", "use 1-256 characters from A-Z, a-z, 0-9, _ and -")
        if webhook_url is not None and telegram_token is None:
            raise SettingsError("TELEGRAM_WEBHOOK_URL", "is set but TELEGRAM_BOT_TOKEN is not; set the token too")

        whatsapp = {name: opt(name) for name in WHATSAPP_VARIABLES}
        if any(whatsapp.values()) and not all(whatsapp.values()):
            missing = [name for name, value in whatsapp.items() if not value]
            raise SettingsError(missing[0], "is missing; the WhatsApp adapter needs all of " + ", ".join(WHATSAPP_VARIABLES))
        phone_id = whatsapp["WHATSAPP_PHONE_NUMBER_ID"]
        if phone_id is not None and not phone_id.isdigit():
            raise SettingsError("WHATSAPP_PHONE_NUMBER_ID", f"{phone_id!r} is not a numeric phone number id")

        return cls(
            engine=EngineSettings.from_env(env),
            http_host=_host(env),
            http_port=_port(env),
            public_url=_public_url(env),
            trusted_proxies=_trusted_proxies(env),
            admin_ids=_admin_ids(env),
            redis_url=_redis_url(env),
            telegram_bot_token=telegram_token,
            telegram_api_base_url=_url(env, "TELEGRAM_API_BASE_URL", cls.telegram_api_base_url),
            telegram_file_base_url=_url(env, "TELEGRAM_FILE_BASE_URL", cls.telegram_file_base_url),
            telegram_webhook_url=webhook_url,
            telegram_webhook_secret=webhook_secret,
            viber_auth_token=opt("VIBER_AUTH_TOKEN"),
            viber_api_base_url=_url(env, "VIBER_API_BASE_URL", cls.viber_api_base_url).rstrip("/"),
            whatsapp_access_token=whatsapp["WHATSAPP_ACCESS_TOKEN"],
            whatsapp_app_secret=whatsapp["WHATSAPP_APP_SECRET"],
            whatsapp_verify_token=whatsapp["WHATSAPP_VERIFY_TOKEN"],
            whatsapp_phone_number_id=phone_id,
            whatsapp_api_base_url=_url(env, "WHATSAPP_API_BASE_URL", cls.whatsapp_api_base_url).rstrip("/"),
            media_allow_hosts=_allow_hosts(env),
        )

    def secrets(self) -> list[str]:
        """Every token and secret that is set, for redaction from logs and answers."""
        values = [
            self.telegram_bot_token,
            self.telegram_webhook_secret,
            self.viber_auth_token,
            self.whatsapp_access_token,
            self.whatsapp_app_secret,
            self.whatsapp_verify_token,
        ]
        if self.redis_url:
            password = urlsplit(self.redis_url).password
            values.append(password)
        return [v for v in values if v]


def _url(env: Mapping[str, str], name: str, default: str | None) -> str:
    raw = env.get(name, "").strip()
    if not raw:
        return default  # type: ignore[return-value]
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(name, f"{raw!r} is not an http(s) URL such as https://example.com/path")
    return raw


def _host(env: Mapping[str, str]) -> str:
    raw = env.get("VSEARCH_HTTP_HOST", "").strip() or "127.0.0.1"
    if not _HOST_RE.fullmatch(raw):
        raise SettingsError("VSEARCH_HTTP_HOST", f"{raw!r} is not a host name or IP address (e.g. 0.0.0.0)")
    return raw


def _port(env: Mapping[str, str]) -> int:
    raw = env.get("VSEARCH_HTTP_PORT", "").strip()
    if not raw:
        return 8080
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise SettingsError("VSEARCH_HTTP_PORT", f"{raw!r} is not a port number between 1 and 65535")
    return int(raw)


def _trusted_proxies(env: Mapping[str, str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in (part.strip() for part in env.get("VSEARCH_TRUSTED_PROXIES", "").split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise SettingsError(
                "VSEARCH_TRUSTED_PROXIES", f"{item!r} is not an IP address or network such as 10.0.0.2 or 172.16.0.0/12"
            ) from None
    return tuple(networks)


def _public_url(env: Mapping[str, str]) -> str | None:
    """VSEARCH_PUBLIC_URL: an absolute https base URL (http only for loopback), without query or fragment."""
    raw = env.get("VSEARCH_PUBLIC_URL", "").strip()
    if not raw:
        return None
    example = "https://shop.example/vsearch"
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018  (raises ValueError on a non-numeric port)
    except ValueError:
        raise SettingsError("VSEARCH_PUBLIC_URL", f"{raw!r} is not a URL such as {example}") from None
    if any(c.isspace() for c in raw):
        raise SettingsError("VSEARCH_PUBLIC_URL", f"{raw!r} contains spaces; write it as a URL such as {example}")
    host = (parts.hostname or "").lower()
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if not host or not _HOST_RE.fullmatch(host) or parts.scheme not in ("http", "https"):
        raise SettingsError("VSEARCH_PUBLIC_URL", f"{raw!r} is not an absolute https URL such as {example}")
    if parts.scheme == "http" and not loopback:
        raise SettingsError("VSEARCH_PUBLIC_URL", f"{raw!r} must use https (Viber and WhatsApp fetch images only over "
                            "https; http is accepted for 127.0.0.1 and localhost only)")
    if "?" in raw or "#" in raw or parts.username is not None:
        raise SettingsError("VSEARCH_PUBLIC_URL", f"{raw!r} must be a plain base URL without user, query or fragment, "
                            f"such as {example}")
    return raw.rstrip("/")


def _admin_ids(env: Mapping[str, str]) -> frozenset[str]:
    raw = env.get("VSEARCH_ADMIN_IDS", "").strip()
    ids = set()
    for item in filter(None, (part.strip() for part in raw.split(","))):
        channel, sep, user = item.partition(":")
        if not sep or channel not in CHANNELS or not user.strip():
            raise SettingsError(
                "VSEARCH_ADMIN_IDS",
                f"{item!r} is not channel-qualified; write e.g. telegram:123,viber:AbC=,whatsapp:15551234567",
            )
        ids.add(f"{channel}:{user.strip()}")
    return frozenset(ids)


def _redis_url(env: Mapping[str, str]) -> str | None:
    raw = env.get("REDIS_URL", "").strip()
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("redis", "rediss", "unix") or (parts.scheme != "unix" and not parts.hostname):
        raise SettingsError("REDIS_URL", "is not a Redis URL such as redis://localhost:6379/0 (or unset it for embedded Redis)")
    try:
        parts.port  # noqa: B018  (raises ValueError on a non-numeric port)
    except ValueError:
        raise SettingsError("REDIS_URL", "has a port that is not a number") from None
    return raw


def _allow_hosts(env: Mapping[str, str]) -> frozenset[str]:
    raw = env.get("VSEARCH_MEDIA_ALLOW_HOSTS", "").strip()
    hosts = set()
    for item in filter(None, (part.strip().lower() for part in raw.split(","))):
        if "/" in item or not _HOST_RE.fullmatch(item):
            raise SettingsError("VSEARCH_MEDIA_ALLOW_HOSTS", f"{item!r} is not a host name; list hosts like 127.0.0.1,cdn.shop.local")
        hosts.add(item)
    return frozenset(hosts)
