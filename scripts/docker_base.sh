#!/usr/bin/env bash
# Make sure the Dockerfile's base image, python:3.11-slim, is there. Uses the real one when it is already present
# or can be pulled; only when no registry is reachable does it build a stand-in offline: a Debian bookworm
# rootfs (debootstrap --variant=minbase, from the machine's Debian mirror) with Debian's python3 (3.11) and a
# virtual environment on PATH (so `pip install` works as in the real image), imported and tagged
# python:3.11-slim. The stand-in carries the label indexer.stand-in=1 so the smoke test can say which it used.
#
#   scripts/docker_base.sh            # prints "real" or "stand-in" on its last line
#
# Environment: DOCKER (docker command, default: Debian's /usr/bin/docker when installed), BASE_IMAGE
# (default python:3.11-slim), DEBIAN_MIRROR (default: the first Debian URI in /etc/apt/sources.list*).
set -euo pipefail
DOCKER=${DOCKER:-$( [ -x /usr/bin/docker ] && echo /usr/bin/docker || command -v docker )}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}

if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  if [ "$("$DOCKER" image inspect -f '{{index .Config.Labels "indexer.stand-in"}}' "$BASE_IMAGE")" = 1 ]; then
    echo "stand-in"
  else
    echo "real"
  fi
  exit 0
fi
if timeout 120 "$DOCKER" pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "real"
  exit 0
fi

echo "cannot pull $BASE_IMAGE: building an offline stand-in from Debian bookworm" >&2
if [ -z "${DEBIAN_MIRROR:-}" ]; then
  DEBIAN_MIRROR=$(grep -hoE '(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/* \
    2>/dev/null | head -1 | awk '{print $2}' || true)
  DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  apt-get install -y -q debootstrap >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q debootstrap >/dev/null; }
fi
root=$(mktemp -d /tmp/indexer-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$root" \
  "$DEBIAN_MIRROR" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
# A venv in /usr/local (as python:3.11-slim's /usr/local/bin/python): Debian's own python3 refuses pip (PEP 668).
chroot "$root" /usr/bin/python3 -m venv /usr/local/python
chroot "$root" sh -c 'ln -sf /usr/local/python/bin/python /usr/local/bin/python; ln -sf /usr/local/python/bin/pip /usr/local/bin/pip'
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" -c . | "$DOCKER" import \
  --change 'ENV PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'LABEL indexer.stand-in=1' \
  --change 'CMD ["python3"]' \
  - "$BASE_IMAGE" >/dev/null
echo "stand-in"
