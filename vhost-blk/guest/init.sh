#!/bin/sh
# Guest /init for the vhost-user-blk test: exercises /dev/vda and prints one
# "SOV-GUEST-RESULT: PASS|FAIL ..." line, then powers off.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp && mount -t tmpfs tmp /tmp

fail() {
    echo "SOV-GUEST-RESULT: FAIL $*"
    poweroff -f
    sleep 5
    exit 1
}

for m in $(cat /modules.order); do
    insmod "/lib/modules/$m.ko" || echo "SOV-GUEST: insmod $m failed"
done

i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -gt 300 ] && fail "no /dev/vda after 30s"
    sleep 0.1
done
echo "SOV-GUEST: uptime at /dev/vda: $(cut -d' ' -f1 /proc/uptime)s"

SIZE=$(cat /sys/block/vda/size)
LBS=$(cat /sys/block/vda/queue/logical_block_size)
SERIAL=$(cat /sys/block/vda/serial 2>/dev/null)
NQ=$(ls -d /sys/block/vda/mq/* 2>/dev/null | wc -l)
DMAX=$(cat /sys/block/vda/queue/discard_max_bytes)
WZMAX=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)
echo "SOV-GUEST: vda size=$SIZE sectors lbs=$LBS serial=$SERIAL hw_queues=$NQ discard_max=$DMAX write_zeroes_max=$WZMAX"

MIB=1048576
# 1. Read what the host pre-filled at 32 MiB (1 MiB of "SOVPREFILL\n").
yes SOVPREFILL | head -c $MIB > /tmp/pre
dd if=/dev/vda of=/tmp/rd bs=4096 skip=8192 count=256 iflag=direct 2>/dev/null || fail "read prefill"
cmp -s /tmp/pre /tmp/rd || fail "prefill mismatch"

# 2. Write 4 MiB of "SOVPATTERN\n" at 1 MiB (block 256), read back with O_DIRECT.
yes SOVPATTERN | head -c $((4 * MIB)) > /tmp/p
dd if=/tmp/p of=/dev/vda bs=4096 seek=256 conv=fsync oflag=direct 2>/dev/null || fail "write pattern"
dd if=/dev/vda of=/tmp/back bs=4096 skip=256 count=1024 iflag=direct 2>/dev/null || fail "read back"
cmp -s /tmp/p /tmp/back || fail "pattern mismatch"

# 3. Two concurrent writers pinned to CPU 0 and CPU 1 (one hw queue each), 2 MiB each at
#    8 MiB and 12 MiB, then read both back.
yes SOVCPU0 | head -c $((2 * MIB)) > /tmp/c0
yes SOVCPU1 | head -c $((2 * MIB)) > /tmp/c1
taskset 1 dd if=/tmp/c0 of=/dev/vda bs=65536 seek=128 conv=fsync oflag=direct 2>/dev/null &
P0=$!
taskset 2 dd if=/tmp/c1 of=/dev/vda bs=65536 seek=192 conv=fsync oflag=direct 2>/dev/null &
P1=$!
wait $P0 || fail "cpu0 writer"
wait $P1 || fail "cpu1 writer"
taskset 2 dd if=/dev/vda of=/tmp/r0 bs=65536 skip=128 count=32 iflag=direct 2>/dev/null || fail "read c0"
taskset 1 dd if=/dev/vda of=/tmp/r1 bs=65536 skip=192 count=32 iflag=direct 2>/dev/null || fail "read c1"
cmp -s /tmp/c0 /tmp/r0 || fail "cpu0 data mismatch"
cmp -s /tmp/c1 /tmp/r1 || fail "cpu1 data mismatch"

# 4. Discard 1 MiB at 16 MiB (host pre-filled it with 0x5a); must read back as zeroes.
head -c $MIB /dev/zero > /tmp/z
DISCARD=skipped
if [ "$DMAX" -gt 0 ]; then
    blkdiscard -o $((16 * MIB)) -l $MIB /dev/vda || fail "blkdiscard"
    dd if=/dev/vda of=/tmp/d bs=4096 skip=4096 count=256 iflag=direct 2>/dev/null || fail "read discarded"
    cmp -s /tmp/z /tmp/d || fail "discarded range not zero"
    DISCARD=ok
fi

# 5. Write zeroes (BLKZEROOUT) 1 MiB at 20 MiB (host pre-filled 0x5a).
WZ=skipped
if [ -x /bin/zeroout ] && [ "$WZMAX" -gt 0 ]; then
    /bin/zeroout /dev/vda $((20 * MIB)) $MIB || fail "zeroout"
    dd if=/dev/vda of=/tmp/w bs=4096 skip=5120 count=256 iflag=direct 2>/dev/null || fail "read zeroed"
    cmp -s /tmp/z /tmp/w || fail "zeroed range not zero"
    WZ=ok
fi

# 6. Reading past the end must fail cleanly (the guest kernel stops it; nothing hangs).
dd if=/dev/vda of=/dev/null bs=4096 skip=$((SIZE / 8)) count=1 iflag=direct 2>/dev/null

sync
echo "SOV-GUEST-RESULT: PASS size=$SIZE lbs=$LBS serial=$SERIAL hw_queues=$NQ discard=$DISCARD write_zeroes=$WZ"
poweroff -f
sleep 5
