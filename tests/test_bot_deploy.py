"""docker-compose.yml and Dockerfile, checked by parsing (there is no Docker engine on these machines)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from bot.config import BotSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def test_services_healthchecks_and_restart(compose):
    services = compose["services"]
    assert set(services) == {"redis", "vsearch"}
    for name, service in services.items():
        assert service["restart"] in ("unless-stopped", "always"), name
        check = service["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and check["retries"] >= 1, name
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    assert any("/healthz" in part for part in services["vsearch"]["healthcheck"]["test"])
    assert services["vsearch"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["vsearch"]["build"] == "."


def test_vsearch_env_volumes_and_env_file(compose):
    vsearch = compose["services"]["vsearch"]
    env = vsearch["environment"]
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert env["VSEARCH_HTTP_HOST"] == "0.0.0.0"
    mounts = {m.split(":")[1]: m.split(":")[0] for m in vsearch["volumes"]}
    assert mounts[env["VSEARCH_DATA_DIR"]] in compose["volumes"]
    assert mounts[env["TORCH_HOME"]] in compose["volumes"]
    assert [entry["path"] for entry in vsearch["env_file"]] == [".env"]
    # The compose environment is a valid configuration for the app itself.
    settings = BotSettings.from_env({k: str(v) for k, v in env.items()} | {"VSEARCH_WEIGHTS": "random"})
    assert settings.redis_url == "redis://redis:6379/0" and settings.http_host == "0.0.0.0"
    assert any(p.endswith(f":{settings.http_port}") for p in vsearch["ports"])


def test_dockerfile_references_existing_files_and_is_safe():
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert f"torch=={pins['torch']}" in text and f"torchvision=={pins['torchvision']}" in text
    assert "-r requirements.txt" in text
    assert re.search(r"^USER (?!root)\w+", text, re.M), "the image must not run as root"
    assert "HEALTHCHECK" in text and "/healthz" in text
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repo"
    assert (ROOT / ".env.example").is_file()


def test_env_example_names_every_setting():
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    for name in ["VSEARCH_DATA_DIR", "VSEARCH_WEIGHTS", "VSEARCH_PRECISION", "VSEARCH_CATALOG", "VSEARCH_TOP_K",
                 "VSEARCH_HTTP_HOST", "VSEARCH_HTTP_PORT", "VSEARCH_ADMIN_IDS", "REDIS_URL", "TELEGRAM_BOT_TOKEN",
                 "TELEGRAM_API_BASE_URL", "TELEGRAM_FILE_BASE_URL", "TELEGRAM_WEBHOOK_URL",
                 "TELEGRAM_WEBHOOK_SECRET", "VIBER_AUTH_TOKEN", "VIBER_API_BASE_URL", "WHATSAPP_ACCESS_TOKEN",
                 "WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN", "WHATSAPP_PHONE_NUMBER_ID",
                 "WHATSAPP_API_BASE_URL", "VSEARCH_MEDIA_ALLOW_HOSTS", "VSEARCH_CATEGORY_BOOST"]:
        assert name in text, name
    # The example as written (empty channel values) is a valid configuration.
    values = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    settings = BotSettings.from_env(values | {"VSEARCH_WEIGHTS": "random"})
    assert not (settings.telegram_enabled or settings.viber_enabled or settings.whatsapp_enabled)


def test_docker_compose_config_where_the_client_can():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` client here; the file is checked by parsing above")
    out = subprocess.run([docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
