# syntax=docker/dockerfile:1
# The agent server as a slim, non-root image.
#   docker build -t agent-server .
#   docker run -p 8080:8080 -e AGENT_API_KEYS=... -e ANTHROPIC_API_KEY=... -e REDIS_URL=redis://... agent-server
# Open http://localhost:8080/ for the chat page; /health, /ready, /metrics, /openapi.json.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    WEB_CONCURRENCY=2

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

# The code, owned by root and read-only for the app user (it only writes to /tmp: the
# Prometheus multiprocess files).
COPY server ./server
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin app \
 && python -m compileall -q server

USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8080'), timeout=4)"]

# As in the Procfile. uvicorn reads WEB_CONCURRENCY (workers) and FORWARDED_ALLOW_IPS (which
# proxies' X-Forwarded-For/-Proto to trust) from the environment; `--http` names uvicorn's
# httptools protocol with a request-head deadline (HEADER_TIMEOUT_SECONDS). On SIGTERM the app
# drains turns for GRACEFUL_SHUTDOWN_SECONDS (25), then uvicorn closes the connections (its
# 30 s bound the streams still open); give the container more than that
# (docker stop -t 40, Kubernetes terminationGracePeriodSeconds: 40, fly.toml kill_timeout).
CMD ["sh", "-c", "exec uvicorn server.app:app --host \"$HOST\" --port \"$PORT\" --loop uvloop --http server.http_protocol:HeadDeadlineProtocol --ws-per-message-deflate false --ws-max-size 8388608 --timeout-graceful-shutdown 30 --proxy-headers --no-access-log"]
