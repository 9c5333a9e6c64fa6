# dbops-bot in HTTP mode (set SLACK_APP_TOKEN to run Socket Mode instead).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PORT=3000 WEB_CONCURRENCY=2
WORKDIR /app

COPY pyproject.toml README.md ./
COPY bot ./bot
COPY commands ./commands
RUN pip install . && useradd --system --uid 10001 --home-dir /app dbops

USER dbops
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"3000\")}/healthz', timeout=2)" || exit 1

CMD ["python", "-m", "bot"]
