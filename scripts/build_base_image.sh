#!/usr/bin/env bash
# Build a Debian base image with Python 3 for machines that cannot pull python:3.11-slim (no registry).
#   scripts/build_base_image.sh [TAG] [SUITE] [MIRROR]
# Needs root, debootstrap and a Debian mirror (apt's own, or a local one). About 2 minutes; the image is
# ~150 MB. The Dockerfiles then take it as their base: --build-arg BASE_IMAGE=sfllm-base:bookworm.
# An image already there is kept; FORCE=1 rebuilds it.
set -euo pipefail
TAG=${1:-sfllm-base:bookworm}
SUITE=${2:-bookworm}
MIRROR=${3:-http://deb.debian.org/debian}

if [ -z "${FORCE:-}" ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG is already built (FORCE=1 rebuilds it)"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "needs debootstrap: apt-get install -y debootstrap" >&2; exit 1; }

root=$(mktemp -d /tmp/sfllm-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
start=$(date +%s)
# minbase: only the essential packages and apt. python3-venv brings ensurepip, which the images use to
# make their own venv (Debian's python3 refuses pip installs into the system, PEP 668).
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$root" "$MIRROR"
# What an image needs none of: downloaded packages, apt lists, docs, man pages.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
  "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$TAG" >/dev/null
echo "built $TAG from Debian $SUITE in $(($(date +%s) - start)) s: $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1 / 1e6}')"
