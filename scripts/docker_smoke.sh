#!/usr/bin/env bash
# The Dockerfile and docker-compose.yml, built and run for real:
#   1. a Docker engine (Debian's docker.io and docker-compose installed, dockerd started, when missing: needs root);
#   2. the base image python:3.11-slim (a Debian stand-in only when no registry serves it: scripts/docker_base.sh);
#   3. `docker build` of the project's Dockerfile, as a user runs it;
#   4. `indexer index` and `indexer search` in containers: a bind-mounted folder of test images (read-only), the
#      learned test model tests/fixtures/shapes-clip, the embedded store in a volume;
#   5. the compose file's serve service (with tests/docker-compose.smoke.yml: embedded store, test model; the
#      qdrant and watch services cannot run here and are not started) and, through its published loopback port,
#      /healthz, a search, a thumbnail and the API key check.
# Then it stops and removes everything it started or made (containers, network, volumes, temporary folders,
# dockerd when it started it), except the images: they are the build cache of the next run
# (--remove-images removes them too). Its last line is `SMOKE_RESULT {json}` with the timings and the image size.
#
#   sudo scripts/docker_smoke.sh [--remove-images]
#
# Environment: DOCKER (default Debian's /usr/bin/docker), SMOKE_IMAGE (default indexer:smoke),
# SMOKE_LOCAL_INDEXES (folders holding a PEP 503 simple/ index, served on loopback to the build as PyPI mirrors
# so that torch's ~3 GB come from the local disk; default: /opt/pypi-more and /opt/pypi when present; "" for none:
# then everything comes from PyPI), SMOKE_EXTRA_CA (a PEM file passed as EXTRA_CA_CERTS; default: the
# certificates in /usr/local/share/ca-certificates, the extra CAs this machine trusts).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s.%N)
REMOVE_IMAGES=0
[ "${1:-}" = "--remove-images" ] && REMOVE_IMAGES=1
SMOKE_IMAGE=${SMOKE_IMAGE:-indexer:smoke}
RUN_ID=smoke$$
PROJECT=indexer-$RUN_ID
DATA_VOLUME=indexer-$RUN_ID-data
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3

log() { printf '[docker-smoke %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
since() { python3 -c "import sys,time; print(round(time.time()-float(sys.argv[1]),1))" "$1"; }

# ---- 1. the engine ----------------------------------------------------------------------------------------
apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || fail "$* missing and cannot be installed (needs root and apt-get)"
  log "installing $* (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
}
if [ -z "${DOCKER:-}" ]; then
  # Debian's docker client (20.10) has the classic builder and BuildKit built in; a newer client without the
  # buildx plugin (e.g. a stray /usr/local/bin/docker) cannot build with BuildKit.
  [ -x /usr/bin/docker ] || apt_install docker.io
  DOCKER=/usr/bin/docker
fi
STARTED_DOCKERD=""
if ! "$DOCKER" info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || apt_install docker.io
  [ "$(id -u)" = 0 ] || fail "no Docker engine answers and starting dockerd needs root"
  log "starting dockerd"
  dockerd >/tmp/indexer-$RUN_ID-dockerd.log 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.5; done
  "$DOCKER" info >/dev/null 2>&1 || { tail -20 "/tmp/indexer-$RUN_ID-dockerd.log" >&2; fail "dockerd did not start"; }
fi
if "$DOCKER" compose version >/dev/null 2>&1; then
  COMPOSE=("$DOCKER" compose)
else
  command -v docker-compose >/dev/null || apt_install docker-compose
  COMPOSE=(docker-compose)
fi
log "engine $("$DOCKER" version -f '{{.Server.Version}}'), compose: $("${COMPOSE[@]}" version --short 2>/dev/null || echo '?')"

# ---- cleanup: everything made below ------------------------------------------------------------------------
DANGLING_BEFORE=$("$DOCKER" images -q --filter dangling=true | tr '\n' ' ')
WORK=$(mktemp -d /tmp/indexer-$RUN_ID.XXXXXX)
chmod 755 "$WORK"
SERVERS=()
compose() {
  PHOTOS_DIR=$WORK/photos QDRANT_API_KEY=smoke-not-used INDEXER_API_KEY_FILE=$WORK/api-key \
  INDEXER_PUBLISH=127.0.0.1:$PORT INDEXER_IMAGE=$SMOKE_IMAGE COMPOSE_PROJECT_NAME=$PROJECT \
  SMOKE_MODEL_DIR=$ROOT/tests/fixtures/shapes-clip SMOKE_DATA_VOLUME=$DATA_VOLUME \
    "${COMPOSE[@]}" --project-directory "$ROOT" -f "$ROOT/docker-compose.yml" \
    -f "$ROOT/tests/docker-compose.smoke.yml" "$@"
}
cleanup() {
  local rc=$?
  set +e
  if [ "$rc" != 0 ] && [ -n "${PORT:-}" ]; then compose logs --no-color serve 2>/dev/null | tail -40 >&2; fi
  [ -n "${PORT:-}" ] && compose down -v --remove-orphans >/dev/null 2>&1
  "$DOCKER" rm -f "indexer-$RUN_ID-cli" >/dev/null 2>&1
  "$DOCKER" volume rm -f "$DATA_VOLUME" >/dev/null 2>&1
  # Images left dangling by this build (the previous smoke image, the CA stage): not the layer cache (-a).
  for id in $("$DOCKER" images -q --filter dangling=true 2>/dev/null); do
    case " $DANGLING_BEFORE " in *" $id "*) ;; *) "$DOCKER" image rm "$id" >/dev/null 2>&1 ;; esac
  done
  if [ "$REMOVE_IMAGES" = 1 ]; then "$DOCKER" image rm -f "$SMOKE_IMAGE" >/dev/null 2>&1; fi
  for pid in "${SERVERS[@]}"; do kill "$pid" 2>/dev/null; done
  rm -rf "$WORK"
  if [ -n "$STARTED_DOCKERD" ]; then
    kill "$STARTED_DOCKERD"; wait "$STARTED_DOCKERD" 2>/dev/null; rm -f "/tmp/indexer-$RUN_ID-dockerd.log"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ---- 2. the base image --------------------------------------------------------------------------------------
t=$(date +%s.%N)
BASE_KIND=$(DOCKER=$DOCKER bash scripts/docker_base.sh | tail -1)
BASE_S=$(since "$t")
log "base python:3.11-slim: $BASE_KIND (${BASE_S} s)"

# ---- 3. the build -------------------------------------------------------------------------------------------
BUILD_ARGS=()
if [ -z "${SMOKE_LOCAL_INDEXES+set}" ]; then
  SMOKE_LOCAL_INDEXES=""
  for d in /opt/pypi-more /opt/pypi; do [ -d "$d/simple" ] && SMOKE_LOCAL_INDEXES+="$d "; done
fi
urls=()
# Fixed ports when free: the mirror URLs are build arguments, part of the layer cache's key.
port=${SMOKE_INDEX_PORT:-38761}
for d in $SMOKE_LOCAL_INDEXES; do
  python3 -c 'import socket,sys; socket.create_server(("127.0.0.1", int(sys.argv[1]))).close()' "$port" 2>/dev/null \
    || port=$(free_port)
  python3 -m http.server --bind 127.0.0.1 --directory "$d" "$port" >/dev/null 2>&1 &
  SERVERS+=($!)
  urls+=("http://127.0.0.1:$port/simple/")
  port=$((port + 1))
done
if [ "${#urls[@]}" -gt 0 ]; then
  for _ in $(seq 40); do curl -fsS -o /dev/null "${urls[0]}" 2>/dev/null && break; sleep 0.25; done
  # Local indexes first: on a tie (same file on PyPI) pip takes the first index's copy.
  rest=("${urls[@]:1}" https://pypi.org/simple)
  BUILD_ARGS+=(--network host --build-arg "PIP_INDEX_URL=${urls[0]}" --build-arg "PIP_EXTRA_INDEX_URL=${rest[*]}")
  log "local PyPI mirrors for the build: $SMOKE_LOCAL_INDEXES"
fi
SMOKE_EXTRA_CA=${SMOKE_EXTRA_CA-$(ls /usr/local/share/ca-certificates/*.crt 2>/dev/null | tr '\n' ' ')}
if [ -n "${SMOKE_EXTRA_CA// /}" ]; then
  # shellcheck disable=SC2086
  BUILD_ARGS+=(--build-arg "EXTRA_CA_CERTS=$(cat $SMOKE_EXTRA_CA)")
  log "extra CA certificates: $SMOKE_EXTRA_CA"
fi
log "docker build -t $SMOKE_IMAGE . (log: $WORK/build.log)"
t=$(date +%s.%N)
if ! "$DOCKER" build --label indexer.smoke=1 "${BUILD_ARGS[@]}" -t "$SMOKE_IMAGE" . >"$WORK/build.log" 2>&1; then
  tail -40 "$WORK/build.log" >&2
  fail "docker build failed"
fi
BUILD_S=$(since "$t")
CACHED_STEPS=$(grep -c 'Using cache' "$WORK/build.log" || true)
IMAGE_BYTES=$("$DOCKER" image inspect -f '{{.Size}}' "$SMOKE_IMAGE")
IMAGE_USER=$("$DOCKER" image inspect -f '{{.Config.User}}' "$SMOKE_IMAGE")
log "built in ${BUILD_S} s ($CACHED_STEPS steps from cache), image $((IMAGE_BYTES / 1000000)) MB, user $IMAGE_USER"
[ "$IMAGE_USER" = indexer ] || fail "the image runs as '$IMAGE_USER', not the unprivileged user"
"$DOCKER" history --format '{{.Size}}\t{{.CreatedBy}}' "$SMOKE_IMAGE" | grep -v '^0B' >&2

# ---- 4. index and search in containers ---------------------------------------------------------------------
t=$(date +%s.%N)
mkdir -p "$WORK/photos"
PYTHONPATH=$ROOT "$PY" -c 'import sys; from pathlib import Path; from tests.fixtures.shapes import write_dataset
write_dataset(Path(sys.argv[1]), 36, seed=5)  # 3 images of each of the 12 classes' "$WORK/photos"
chmod -R a+rX "$WORK/photos"
COUNT=$(find "$WORK/photos" -type f | wc -l)
"$DOCKER" volume create "$DATA_VOLUME" >/dev/null
cli() {
  "$DOCKER" run --rm --name "indexer-$RUN_ID-cli" -e HF_HUB_OFFLINE=1 \
    -v "$WORK/photos:/photos:ro" -v "$ROOT/tests/fixtures/shapes-clip:/test-model:ro" -v "$DATA_VOLUME:/data" \
    "$SMOKE_IMAGE" "$@" --store /data/store --model /test-model/config.json --device cpu
}
cli index /photos --json >"$WORK/index.json" || fail "indexer index failed: $(cat "$WORK/index.json")"
python3 - "$WORK/index.json" "$COUNT" <<'EOF' || fail "indexer index did not index the folder"
import json, sys
summary = json.load(open(sys.argv[1]))
print("index:", {k: summary.get(k) for k in ("indexed", "failed", "skipped")}, file=sys.stderr)
assert summary["indexed"] == int(sys.argv[2]) and summary["failed"] == 0, summary
EOF
cli search "a red circle" --limit 3 --json >"$WORK/search.json" || fail "indexer search failed"
python3 - "$WORK/search.json" <<'EOF' || fail "indexer search did not rank red circles first"
import json, sys
hits = json.load(open(sys.argv[1]))
print("search:", [(h["path"], round(h["score"], 3)) for h in hits], file=sys.stderr)
assert len(hits) == 3 and all(h["path"].startswith("/photos/red-circle-") for h in hits), hits
EOF
CLI_S=$(since "$t")
log "index + search in containers: ${CLI_S} s"

# ---- 5. the serve service of the compose stack ------------------------------------------------------------
t=$(date +%s.%N)
PORT=$(free_port)
KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
printf '%s\n' "$KEY" >"$WORK/api-key"
chmod 644 "$WORK/api-key"
compose config -q || fail "compose rejects docker-compose.yml + tests/docker-compose.smoke.yml"
compose up -d --no-deps serve >"$WORK/compose.log" 2>&1 || { cat "$WORK/compose.log" >&2; fail "compose up serve"; }
BASE_URL=http://127.0.0.1:$PORT
for _ in $(seq 240); do curl -fsS -o "$WORK/healthz.json" "$BASE_URL/healthz" 2>/dev/null && break; sleep 0.5; done
[ -s "$WORK/healthz.json" ] || fail "serve did not answer /healthz on $BASE_URL within 120 s"
python3 - "$WORK/healthz.json" "$COUNT" <<'EOF' || fail "/healthz"
import json, sys
health = json.load(open(sys.argv[1]))
print("healthz:", health, file=sys.stderr)
assert health["status"] == "ok" and health["images"] == int(sys.argv[2]), health
EOF
code=$(curl -sS -o /dev/null -w '%{http_code}' "$BASE_URL/search?q=x")
[ "$code" = 401 ] || fail "a search without the API key got $code, not 401"
curl -fsS -H "Authorization: Bearer $KEY" "$BASE_URL/search?q=a%20blue%20square&limit=3" -o "$WORK/hits.json" \
  || fail "search through the published port"
THUMB_ID=$(python3 - "$WORK/hits.json" <<'EOF'
import json, sys
hits = json.load(open(sys.argv[1]))["hits"]
print("serve search:", [(h["path"], round(h["score"], 3)) for h in hits], file=sys.stderr)
assert len(hits) == 3 and all(h["path"].startswith("/photos/blue-square-") for h in hits), hits
print(hits[0]["id"])
EOF
) || fail "the service's search did not rank blue squares first"
curl -fsS -H "Authorization: Bearer $KEY" -D "$WORK/thumb.headers" "$BASE_URL/images/$THUMB_ID/thumbnail" \
  -o "$WORK/thumb.jpg" || fail "thumbnail through the published port"
grep -qi '^content-type: image/jpeg' "$WORK/thumb.headers" || fail "thumbnail is not image/jpeg"
PYTHONPATH=$ROOT "$PY" - "$WORK/thumb.jpg" <<'EOF' || fail "thumbnail is not a JPEG of at most 256 px"
import sys
from PIL import Image
with Image.open(sys.argv[1]) as im:
    print("thumbnail:", im.format, im.size, file=sys.stderr)
    assert im.format == "JPEG" and max(im.size) <= 256, (im.format, im.size)
EOF
SERVE_UID=$(compose exec -T serve id -u | tr -d '\r')
[ "$SERVE_UID" = 10001 ] || fail "serve runs as uid $SERVE_UID"
SERVE_S=$(since "$t")
log "compose serve: healthz, 401 without key, search, thumbnail, uid 10001: ${SERVE_S} s"

TOTAL_S=$(since "$START")
log "passed in ${TOTAL_S} s"
printf 'SMOKE_RESULT {"base": "%s", "base_s": %s, "build_s": %s, "cached_steps": %s, "image_bytes": %s, "cli_s": %s, "serve_s": %s, "total_s": %s, "compose": "%s", "engine": "%s"}\n' \
  "$BASE_KIND" "$BASE_S" "$BUILD_S" "$CACHED_STEPS" "$IMAGE_BYTES" "$CLI_S" "$SERVE_S" "$TOTAL_S" \
  "${COMPOSE[*]}" "$("$DOCKER" version -f '{{.Server.Version}}')"
