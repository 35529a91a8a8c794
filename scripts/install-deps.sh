#!/usr/bin/env bash
# Installs the system packages sov needs to build (and, with --test, to run its tests), only
# those missing. Debian/Ubuntu with apt-get; run as root or with sudo available.
set -euo pipefail

pkgs=(clang libclang-dev curl ca-certificates)
if [[ "${1:-}" == "--test" ]]; then
  # promtool (from prometheus) checks /metrics; mount/umount come with util-linux; etcd is
  # the baseline of the metad benchmark, whose quick run is part of the tests; rclone and
  # s3cmd are S3 clients the gateway tests drive.
  pkgs+=(prometheus util-linux etcd-server rclone s3cmd)
  # Block volumes are tested with real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio's
  # nbd engine) and a real vhost-user-blk frontend: QEMU (TCG) booting Debian's cloud kernel
  # with a busybox initramfs built by vhost-blk/guest/make-initramfs.sh.
  pkgs+=(qemu-utils libnbd-bin fio qemu-system-x86 linux-image-cloud-amd64 busybox-static cpio kmod gcc libc6-dev)
  # chaos/ builds hosts from network namespaces and veth pairs (iproute2) and gives a storage
  # node a small ext4 disk on a loop device to fill up (e2fsprogs, mount).
  pkgs+=(iproute2 e2fsprogs mount)
  # bench-smoke runs the benchmark suite in quick form: its plots draw text with this font,
  # and its S3 and block steps start a single-host Ceph (benchmarks/ceph/ceph.sh) as the peer.
  pkgs+=(fonts-dejavu-core ceph-mon ceph-osd ceph-mgr radosgw ceph-common)
fi
if [[ "${1:-}" == "--bench" ]]; then
  # Peers and tools of `make bench`: etcd (metad's peer), fio and qemu-storage-daemon (block),
  # a single-host Ceph for RGW and RBD (benchmarks/ceph/ceph.sh), the plots' font.
  pkgs+=(etcd-server qemu-utils libnbd-bin fio fonts-dejavu-core python3)
  pkgs+=(ceph-mon ceph-osd ceph-mgr radosgw ceph-common)
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

# QEMU's system emulator and a qemu-utils from elsewhere (a backport) cannot be installed side
# by side: apt removes qemu-utils to install qemu-system-x86. Put back the distribution's.
if [[ "${1:-}" == "--test" || "${1:-}" == "--bench" ]] && ! command -v qemu-io >/dev/null; then
  SUDO=""; if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends qemu-utils \
    || { $SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends qemu-utils; }
fi

if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust (rustup) first" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
if [[ "${1:-}" == "--test" ]] && ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
# The S3 benchmark's baseline (its quick run is part of the tests): a single-node S3 server.
if [[ "${1:-}" == "--test" || "${1:-}" == "--bench" ]] && ! command -v s3s-fs >/dev/null && [[ ! -x "$HOME/.cargo/bin/s3s-fs" ]]; then
  cargo install s3s-fs@0.14.1 --features binary --locked
fi
# The S3 tests drive the gateway with the aws cli and boto3 (from PyPI, into the python3 on
# PATH; Debian's own python3 gets pip first).
if [[ "${1:-}" == "--test" ]] && ! python3 -c "import boto3, awscli" >/dev/null 2>&1; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    SUDO=""; if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends python3-pip
  fi
  python3 -m pip install --quiet awscli boto3 \
    || python3 -m pip install --quiet --break-system-packages awscli boto3
fi
