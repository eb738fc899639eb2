# Sourced by the scripts in this folder: a venv with the requirements, and a Redis when asked.
# Idempotent and quiet when everything is already in place; works on a fresh machine.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

# ensure_venv <requirements file>: create the venv and (re)install when the file changed.
ensure_venv() {
  local req="$1" stamp
  if [ ! -x "$PY" ]; then
    echo "[bootstrap] creating virtualenv in $VENV" >&2
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  stamp="$VENV/.installed-$(basename "$req")"
  local want
  want="$(cat "$ROOT/requirements.txt" "$ROOT/$req" | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[bootstrap] installing $req" >&2
    "$PY" -m pip install --disable-pip-version-check -q --upgrade pip >&2
    "$PY" -m pip install --disable-pip-version-check -q -r "$ROOT/$req" >&2
    echo "$want" > "$stamp"
  fi
}

redis_answers() {
  # PING over a raw TCP socket: no redis-cli needed.
  (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3) 2>/dev/null | grep -q PONG
}

# ensure_redis_server: the redis-server program (the tests start Redis Clusters and a Redis
# of their own with it), installed with apt-get if missing.
ensure_redis_server() {
  if command -v redis-server >/dev/null 2>&1; then return 0; fi
  echo "[bootstrap] installing redis-server (apt-get)" >&2
  local sudo=""
  [ "$(id -u)" = "0" ] || sudo="sudo"
  $sudo apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >&2
}

# ensure_redis: a Redis on 127.0.0.1:6379, installed with apt-get and started if none answers.
ensure_redis() {
  if redis_answers; then return 0; fi
  ensure_redis_server
  echo "[bootstrap] starting redis-server on 127.0.0.1:6379" >&2
  mkdir -p /tmp/agent-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/agent-redis --logfile /tmp/agent-redis/redis.log >&2
  for _ in $(seq 1 50); do
    if redis_answers; then return 0; fi
    sleep 0.1
  done
  echo "[bootstrap] Redis did not start; see /tmp/agent-redis/redis.log" >&2
  return 1
}
