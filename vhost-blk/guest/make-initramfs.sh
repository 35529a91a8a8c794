#!/bin/bash
# make-initramfs.sh OUT_DIR: builds OUT_DIR/vmlinuz and OUT_DIR/initramfs.cpio.gz for the
# vhost-user-blk guest test from Debian's cloud kernel, busybox-static and the virtio modules.
# Needs: linux-image-cloud-amd64 busybox-static cpio gzip kmod (modinfo); optional gcc+libc6-dev
# (static BLKZEROOUT helper), xz-utils/zstd for compressed modules.
set -euo pipefail
OUT=${1:?usage: make-initramfs.sh OUT_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"

KIMG=$(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$KIMG" ] || ! [ -x /bin/busybox ] || ! command -v cpio >/dev/null; then
    echo "installing linux-image-cloud-amd64 busybox-static cpio kmod" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=900 update -q >&2
    apt-get -o DPkg::Lock::Timeout=900 install -y -q linux-image-cloud-amd64 busybox-static cpio kmod >&2
    KIMG=$(ls /boot/vmlinuz-*-cloud-amd64 | sort -V | tail -n1)
fi
KVER=${KIMG#/boot/vmlinuz-}
MODDIR=/lib/modules/$KVER
cp "$KIMG" "$OUT/vmlinuz"

ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT"/{bin,sbin,proc,sys,dev,tmp,lib/modules}
cp /bin/busybox "$ROOT/bin/busybox"
for applet in $("$ROOT/bin/busybox" --list); do
    [ -e "$ROOT/bin/$applet" ] || ln -s busybox "$ROOT/bin/$applet"
done

# Modules in dependency order (only those built as modules; built-ins need nothing).
declare -A SEEN=()
ORDER=()
add_mod() {
    local m=$1 f dep
    [ -n "${SEEN[$m]:-}" ] && return 0
    SEEN[$m]=1
    f=$(modinfo -k "$KVER" -n "$m" 2>/dev/null) || return 0
    case "$f" in /*) ;; *) return 0 ;; esac # "(builtin)"
    for dep in $(modinfo -k "$KVER" -F depends "$m" | tr ',' ' '); do
        add_mod "$dep"
    done
    case "$f" in
        *.ko.xz) xz -dc "$f" >"$ROOT/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$ROOT/lib/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$ROOT/lib/modules/$m.ko" ;;
        *) cp "$f" "$ROOT/lib/modules/$m.ko" ;;
    esac
    ORDER+=("$m")
}
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    add_mod "$m"
done
printf '%s\n' "${ORDER[@]}" >"$ROOT/modules.order"

if command -v gcc >/dev/null && gcc -static -O2 -o "$ROOT/bin/zeroout" "$HERE/zeroout.c" 2>/dev/null; then
    :
else
    echo "note: no static gcc; write-zeroes step will be skipped in the guest" >&2
fi

install -m 0755 "$HERE/init.sh" "$ROOT/init"
(cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -1) >"$OUT/initramfs.cpio.gz"
echo "kernel $KVER, modules: ${ORDER[*]}"
