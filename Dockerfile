# dbops-bot: HTTP mode, or Socket Mode when SLACK_APP_TOKEN is set; both serve /healthz and
# /metrics on $PORT, so the HEALTHCHECK below holds in either mode.
FROM python:3.11-slim

# Without a shared PostgreSQL (STATE_DATABASE_URL), the bot's own state (approvals, audit
# trail) is a SQLite file in /data: a volume the unprivileged user owns (it cannot write /app).
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PORT=3000 WEB_CONCURRENCY=2 \
    STATE_DATABASE_URL=sqlite:////data/dbops-state.sqlite3
WORKDIR /app

COPY pyproject.toml README.md ./
COPY bot ./bot
COPY commands ./commands
RUN pip install . \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin dbops \
 && mkdir -p /data \
 && chown 10001:10001 /data \
 && chmod 0700 /data

# Declared after the chown: a new named volume starts with this directory's owner and mode.
VOLUME ["/data"]
USER 10001:10001
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"3000\")}/healthz', timeout=2)" || exit 1

CMD ["python", "-m", "bot"]
