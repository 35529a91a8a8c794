#!/bin/bash
# run-guest.sh SOCKET OUT_DIR: boots the test guest under TCG against the vhost-user-blk
# socket; prints the serial log and exits 0 iff the guest printed "SOV-GUEST-RESULT: PASS".
# Env: GUEST_TIMEOUT (s, default 120), GUEST_QUEUES (default 2), GUEST_SMP (default 2).
set -uo pipefail
SOCK=${1:?usage: run-guest.sh SOCKET OUT_DIR}
OUT=${2:?usage: run-guest.sh SOCKET OUT_DIR}
LOG=$OUT/serial.log
: >"$LOG"
timeout --kill-after=5 "${GUEST_TIMEOUT:-120}" qemu-system-x86_64 \
    -M pc,memory-backend=mem -accel tcg -smp "${GUEST_SMP:-2}" \
    -object memory-backend-memfd,id=mem,size=512M,share=on -m 512M \
    -kernel "$OUT/vmlinuz" -initrd "$OUT/initramfs.cpio.gz" \
    -append 'console=ttyS0 quiet panic=-1' \
    -chardev socket,id=c,path="$SOCK" \
    -device vhost-user-blk-pci,chardev=c,num-queues="${GUEST_QUEUES:-2}" \
    -nographic -no-reboot -nic none </dev/null >"$LOG" 2>&1
RC=$?
cat "$LOG"
echo "qemu exit code $RC"
grep -q '^SOV-GUEST-RESULT: PASS' <(tr -d '\r' <"$LOG")
