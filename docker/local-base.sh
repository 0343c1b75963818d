#!/usr/bin/env bash
# docker/local-base.sh TAG: make a Python base image from Debian packages, for machines that
# reach Debian's package mirror but no image registry (so no `docker pull python:3.11-slim`).
#
#   DOCKER_HOST=... bash docker/local-base.sh shoal-base:local
#   docker build --build-arg PYTHON_IMAGE=shoal-base:local -f docker/Dockerfile ...
#
# debootstrap (as root) a minimal Debian bookworm with python3, pip, venv, tini, iproute2 and
# ca-certificates into a folder, make it behave like the python:3.11-slim image where the
# Dockerfile relies on it (`python` and `pip` on PATH; pip may install into the system Python:
# Debian's EXTERNALLY-MANAGED marker is removed, as it is in the official image), and
# `docker import` it. The root file system is cached as a tarball under SHOAL_BASE_CACHE
# (/var/cache/shoal-docker), so a second run skips debootstrap; delete the folder to rebuild.
# SHOAL_DEBIAN_MIRROR picks another mirror (default http://deb.debian.org/debian).
set -euo pipefail

tag=${1:?usage: local-base.sh TAG}
cache=${SHOAL_BASE_CACHE:-/var/cache/shoal-docker}
mirror=${SHOAL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-pip,python3-venv,tini,iproute2,ca-certificates
tarball=$cache/bookworm-python3-base.tar

log() { printf 'local-base: %s\n' "$*" >&2; }

if [[ ! -s $tarball ]]; then
  command -v debootstrap >/dev/null 2>&1 ||
    { log "debootstrap not found (Debian: apt-get install debootstrap)"; exit 2; }
  [[ $(id -u) == 0 ]] || { log "debootstrap needs root"; exit 2; }
  mkdir -p "$cache"
  root=$(mktemp -d "$cache/rootfs.XXXXXX")
  # shellcheck disable=SC2064  # expand now: the folder to remove is this one
  trap "rm -rf '$root' '$tarball.tmp'" EXIT
  log "debootstrap bookworm ($packages) into $root"
  debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >&2
  rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
  ln -sf python3 "$root/usr/bin/python"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/*
  tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  rm -rf "$root"
  trap - EXIT
else
  log "using the cached root file system $tarball"
fi

docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  "$tarball" "$tag" >/dev/null
log "imported $tag"
