#!/usr/bin/env bash
# Installs the system packages sov needs to build (and, with --test, to run its tests), only
# those missing. Debian/Ubuntu with apt-get; run as root or with sudo available.
set -euo pipefail

pkgs=(clang libclang-dev curl ca-certificates)
if [[ "${1:-}" == "--test" ]]; then
  # promtool (from prometheus) checks /metrics; mount/umount come with util-linux; etcd is
  # the baseline of the metad benchmark, whose quick run is part of the tests.
  pkgs+=(prometheus util-linux etcd-server)
fi
if [[ "${1:-}" == "--bench" ]]; then
  pkgs+=(etcd-server)
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y --no-install-recommends "${missing[@]}" \
    || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends "${missing[@]}"; }
fi

if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust (rustup) first" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
if [[ "${1:-}" == "--test" ]] && ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
