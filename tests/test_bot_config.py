"""BotSettings.from_env: defaults, every variable read, and each bad value named in the error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bot.config import BotSettings
from engine.errors import SettingsError

FULL = {
    "VSEARCH_DATA_DIR": "/srv/vsearch",
    "VSEARCH_WEIGHTS": "random",
    "VSEARCH_PRECISION": "fp32",
    "VSEARCH_CATALOG": "/srv/catalog.csv",
    "VSEARCH_TOP_K": "7",
    "VSEARCH_HTTP_HOST": "0.0.0.0",
    "VSEARCH_HTTP_PORT": "9090",
    "VSEARCH_PUBLIC_URL": "https://shop.example/vsearch/",
    "VSEARCH_ADMIN_IDS": "telegram:123, viber:AbC=,whatsapp:15551234567",
    "REDIS_URL": "redis://:hunter2pass@redis:6379/0",
    "TELEGRAM_BOT_TOKEN": "123456:ABC-def_ghi",
    "TELEGRAM_API_BASE_URL": "http://127.0.0.1:8081/bot",
    "TELEGRAM_FILE_BASE_URL": "http://127.0.0.1:8081/file/bot",
    "TELEGRAM_WEBHOOK_URL": "https://shop.example/telegram",
    "TELEGRAM_WEBHOOK_SECRET": "s3cret_token-1",
    "VIBER_AUTH_TOKEN": "viber-token-xyz",
    "VIBER_API_BASE_URL": "http://127.0.0.1:8082/pa/",
    "WHATSAPP_ACCESS_TOKEN": "wa-access",
    "WHATSAPP_APP_SECRET": "wa-app-secret",
    "WHATSAPP_VERIFY_TOKEN": "wa-verify",
    "WHATSAPP_PHONE_NUMBER_ID": "1234567890",
    "WHATSAPP_API_BASE_URL": "http://127.0.0.1:8083/v21.0",
    "VSEARCH_MEDIA_ALLOW_HOSTS": "127.0.0.1, CDN.shop.local",
}


def test_defaults_from_an_empty_environment():
    s = BotSettings.from_env({})
    assert (s.http_host, s.http_port) == ("127.0.0.1", 8080)
    assert s.engine.data_dir == Path("vsearch-data") and s.engine.top_k == 5 and s.engine.weights == "imagenet"
    assert s.admin_ids == frozenset() and s.redis_url is None and s.public_url is None
    assert s.telegram_api_base_url == "https://api.telegram.org/bot"
    assert s.telegram_file_base_url == "https://api.telegram.org/file/bot"
    assert s.viber_api_base_url == "https://chatapi.viber.com/pa"
    assert s.whatsapp_api_base_url == "https://graph.facebook.com/v21.0"
    assert not (s.telegram_enabled or s.viber_enabled or s.whatsapp_enabled)
    assert s.secrets() == []


def test_every_variable_is_read():
    s = BotSettings.from_env(FULL)
    assert s.engine.data_dir == Path("/srv/vsearch") and s.engine.catalog == "/srv/catalog.csv"
    assert s.engine.top_k == 7 and s.engine.precision == "fp32"
    assert (s.http_host, s.http_port) == ("0.0.0.0", 9090)
    assert s.public_url == "https://shop.example/vsearch"  # trailing slash dropped
    assert s.admin_ids == {"telegram:123", "viber:AbC=", "whatsapp:15551234567"}
    assert s.redis_url == FULL["REDIS_URL"]
    assert s.telegram_bot_token == "123456:ABC-def_ghi" and s.telegram_webhook_secret == "s3cret_token-1"
    assert s.telegram_api_base_url == "http://127.0.0.1:8081/bot"
    assert s.telegram_webhook_url == "https://shop.example/telegram"
    assert s.viber_api_base_url == "http://127.0.0.1:8082/pa"  # trailing slash dropped
    assert s.whatsapp_phone_number_id == "1234567890" and s.whatsapp_enabled
    assert s.media_allow_hosts == {"127.0.0.1", "cdn.shop.local"}
    assert set(s.secrets()) == {"123456:ABC-def_ghi", "s3cret_token-1", "viber-token-xyz", "wa-access",
                                "wa-app-secret", "wa-verify", "hunter2pass"}
    # Secrets stay out of the repr, which may end up in a log line.
    assert not any(secret in repr(s) for secret in s.secrets())


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VSEARCH_HTTP_PORT", "eighty"),
        ("VSEARCH_HTTP_PORT", "70000"),
        ("VSEARCH_HTTP_HOST", "local host/x"),
        ("VSEARCH_ADMIN_IDS", "123"),
        ("VSEARCH_ADMIN_IDS", "telegram:1,icq:5"),
        ("VSEARCH_ADMIN_IDS", "telegram:"),
        ("VSEARCH_TOP_K", "many"),
        ("VSEARCH_TOP_K", "0"),
        ("VSEARCH_PRECISION", "fp64"),
        ("VSEARCH_WEIGHTS", "/no/such/weights.pth"),
        ("REDIS_URL", "localhost:6379"),
        ("REDIS_URL", "redis://redis:port/0"),
        ("TELEGRAM_API_BASE_URL", "api.telegram.org/bot"),
        ("TELEGRAM_FILE_BASE_URL", "ftp://files.example/bot"),
        ("TELEGRAM_WEBHOOK_URL", "not a url"),
        ("TELEGRAM_WEBHOOK_SECRET", "has spaces in it"),
        ("TELEGRAM_BOT_TOKEN", "123 456"),
        ("VIBER_API_BASE_URL", "chatapi.viber.com"),
        ("WHATSAPP_API_BASE_URL", "graph.facebook.com"),
        ("WHATSAPP_PHONE_NUMBER_ID", "+1 555"),
        ("VSEARCH_MEDIA_ALLOW_HOSTS", "http://127.0.0.1/"),
        ("VSEARCH_PUBLIC_URL", "shop.example/vsearch"),
        ("VSEARCH_PUBLIC_URL", "http://shop.example/vsearch"),
        ("VSEARCH_PUBLIC_URL", "ftp://shop.example/vsearch"),
        ("VSEARCH_PUBLIC_URL", "https://shop.example/vsearch?x=1"),
        ("VSEARCH_PUBLIC_URL", "https://shop.example/#top"),
        ("VSEARCH_PUBLIC_URL", "https://user:pw@shop.example/"),
        ("VSEARCH_PUBLIC_URL", "https://shop.example:port/"),
        ("VSEARCH_PUBLIC_URL", "https://shop.example/my shop"),
    ],
)
def test_a_bad_value_is_named(variable, value):
    env = dict(FULL, **{variable: value})
    with pytest.raises(SettingsError) as info:
        BotSettings.from_env(env)
    assert info.value.variable == variable
    assert variable in str(info.value)


def test_public_url_may_be_http_on_loopback_only():
    for raw in ("http://127.0.0.1:8080/", "http://localhost:8080/vsearch", "http://[::1]:8080"):
        assert BotSettings.from_env({"VSEARCH_PUBLIC_URL": raw}).public_url == raw.rstrip("/")
    with pytest.raises(SettingsError, match="https"):
        BotSettings.from_env({"VSEARCH_PUBLIC_URL": "http://10.0.0.5:8080"})


def test_webhook_without_token_and_partial_whatsapp_are_refused():
    with pytest.raises(SettingsError) as info:
        BotSettings.from_env({"TELEGRAM_WEBHOOK_URL": "https://shop.example/tg"})
    assert info.value.variable == "TELEGRAM_WEBHOOK_URL"
    with pytest.raises(SettingsError) as info:
        BotSettings.from_env({"WHATSAPP_ACCESS_TOKEN": "x", "WHATSAPP_APP_SECRET": "y"})
    assert info.value.variable == "WHATSAPP_VERIFY_TOKEN"


def test_dotenv_in_the_cwd_is_read_and_the_environment_wins(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("VSEARCH_HTTP_PORT=9191\nVSEARCH_TOP_K=9\nVIBER_AUTH_TOKEN=from-dotenv\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VSEARCH_TOP_K", "4")
    for name in ("VSEARCH_HTTP_PORT", "VIBER_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    try:
        s = BotSettings.from_env()
        assert s.http_port == 9191 and s.viber_auth_token == "from-dotenv"
        assert s.engine.top_k == 4
    finally:  # load_dotenv wrote into os.environ; leave no trace for other tests
        for name in ("VSEARCH_HTTP_PORT", "VIBER_AUTH_TOKEN"):
            os.environ.pop(name, None)


def test_trusted_proxies_are_networks_and_bad_ones_are_named():
    import ipaddress

    settings = BotSettings.from_env({"VSEARCH_TRUSTED_PROXIES": "10.0.0.2, 172.16.0.0/12,::1"})
    assert settings.trusted_proxies == (ipaddress.ip_network("10.0.0.2/32"), ipaddress.ip_network("172.16.0.0/12"),
                                        ipaddress.ip_network("::1/128"))
    assert BotSettings.from_env({}).trusted_proxies == ()
    with pytest.raises(SettingsError, match="VSEARCH_TRUSTED_PROXIES"):
        BotSettings.from_env({"VSEARCH_TRUSTED_PROXIES": "proxy.local"})
