# vsearch: `vsearch serve` (web page, HTTP API, Telegram/Viber/WhatsApp) on CPU.
# Build: docker compose build   Run: docker compose up -d   (see docker-compose.yml and .env.example)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# CPU-only torch from the PyTorch CPU index (the default wheels carry CUDA, gigabytes we do not use);
# then every other pin from requirements.txt (torch and torchvision are already satisfied).
COPY requirements.txt ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1 \
 && pip install -r requirements.txt

COPY pyproject.toml README.md ./
COPY engine ./engine
COPY indexer ./indexer
COPY bot ./bot
COPY vsearch_cli ./vsearch_cli
RUN pip install --no-deps .

RUN useradd --create-home --uid 10001 vsearch \
 && mkdir -p /data /cache/torch \
 && chown -R vsearch:vsearch /data /cache
USER vsearch

# Index versions, feature cache and (without REDIS_URL) the embedded Redis live in /data;
# the ImageNet weights are downloaded once into TORCH_HOME.
ENV VSEARCH_DATA_DIR=/data \
    TORCH_HOME=/cache/torch \
    VSEARCH_HTTP_HOST=0.0.0.0 \
    VSEARCH_HTTP_PORT=8080
VOLUME ["/data", "/cache/torch"]
EXPOSE 8080

# Healthy once the HTTP server answers; the first start indexes the catalog before it listens.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]

# SIGTERM (docker stop) is a graceful stop: searches in flight are answered first.
STOPSIGNAL SIGTERM
CMD ["vsearch", "serve"]
