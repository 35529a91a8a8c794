#!/usr/bin/env bash
# A real single-host Ceph cluster (Ceph 16.2 from Debian) under one folder, for the benchmarks:
# one mon, one mgr, N bluestore OSDs on sparse files, radosgw (beast) and an RBD image.
#
#   benchmarks/ceph/ceph.sh up DIR [--mon-port 6789] [--rgw-port 7480]
#                                  [--access-key A --secret-key S] [--osds 3]
#                                  [--osd-size-gib 4] [--rbd-image-mib 1024]
#                                  [--osd-memory-mib 1024] [--rbd-cache true|false]
#                                  [--timeout 300]
#   benchmarks/ceph/ceph.sh down DIR
#
# `up` prints one JSON line on stdout when the cluster is ready (every PG active+clean, RGW
# answering, the RGW user, pool `rbd` and image `rbd/img` made); everything else goes to stderr.
# On failure it stops the daemons it started, leaves DIR (logs under DIR/log) and exits 1.
# `down` stops every daemon recorded under DIR/pids and removes DIR; it is safe to call twice
# and after a failed `up`.
#
# Nothing outside DIR is touched: no /etc/ceph, no systemd unit. Clients need the config:
#   CEPH_CONF=DIR/ceph.conf fio --ioengine=rbd --clientname=admin --pool=rbd --rbdname=img ...
#   rbd -c DIR/ceph.conf ...; ceph -c DIR/ceph.conf -s; radosgw-admin -c DIR/ceph.conf ...
# Authentication is off (auth ... required = none) and messenger v2 is not bound: with auth
# none, clients that try msgr2 first fail to authenticate.
#
# Packages (Debian 12): ceph-mon ceph-osd ceph-mgr radosgw ceph-common.
set -euo pipefail

PROG=ceph.sh
# Messages go to fd 3, a copy of the caller's stderr, so that they are not lost when a trap
# fires inside a command whose stderr is redirected to a log.
exec 3>&2
log() { echo "$PROG: $*" >&3; }
die() { echo "$PROG: error: $*" >&3; exit 1; }

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[ $# -ge 2 ] || usage
CMD=$1
DIR=$2
shift 2
case "$DIR" in
    /*) ;;
    *) DIR="$(pwd)/$DIR" ;;
esac
DIR=${DIR%/}
[ -n "$DIR" ] && [ "$DIR" != / ] || die "refusing DIR '/'"
CONF="$DIR/ceph.conf"
PIDS="$DIR/pids"

MON_PORT=6789
RGW_PORT=7480
ACCESS_KEY=sovbench
SECRET_KEY=sovbench-secret
OSDS=3
OSD_SIZE_GIB=4
RBD_MIB=1024
OSD_MEM_MIB=1024
RBD_CACHE= # empty: librbd's default (cache on, policy writearound)
TIMEOUT=300 # seconds, for each wait (PGs clean, RGW up, ...)

# Runs a command with a time limit; a client that cannot reach the mon would retry for minutes.
t() { local s=$1; shift; timeout --kill-after=5 "$s" "$@"; }
c() { t 60 ceph -c "$CONF" --connect-timeout 30 "$@"; }

# Runs a setup command up to 3 times (a mon command can fail while the maps settle); prints
# its stdout; on the last failure, dies with its output.
try() {
    local what=$1 i out
    shift
    for i in 1 2 3; do
        if out=$("$@" 2>"$DIR/log/try.err"); then
            printf '%s' "$out"
            return 0
        fi
        log "$what failed (try $i): $(tail -c 500 "$DIR/log/try.err")"
        [ $i -eq 3 ] || sleep 2
    done
    die "$what failed 3 times; gave up"
}

# Every daemon runs in the foreground in its own session, its pid recorded in DIR/pids.
spawn() {
    local name=$1
    shift
    mkdir -p "$PIDS" "$DIR/log"
    setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 3>&- &
    echo $! >"$PIDS/$name.pid"
    log "started $name (pid $!): $*"
}

# The pid in a pid file if that process is alive and is ours (its command line names our
# config), so a recycled pid is never signalled.
ours() {
    local f=$1 pid cmd
    pid=$(cat "$f" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
    [[ "$cmd" == *" $CONF "* ]] || return 1
    echo "$pid"
}

# Whether a process is running (a zombie, exited but not yet reaped by its parent, is not).
alive() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

stop_all() {
    [ -d "$PIDS" ] || return 0
    local f pid pids=() end
    # radosgw and the OSDs first, then mgr, the mon last.
    for f in "$PIDS"/rgw*.pid "$PIDS"/osd*.pid "$PIDS"/mgr*.pid "$PIDS"/mon*.pid; do
        [ -e "$f" ] || continue
        if pid=$(ours "$f"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    end=$((SECONDS + 30))
    for pid in "${pids[@]}"; do
        while alive "$pid" && [ $SECONDS -lt $end ]; do sleep 0.2; done
        if alive "$pid"; then
            log "pid $pid still running after 30 s; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for pid in "${pids[@]}"; do
        local e=$((SECONDS + 10))
        while alive "$pid" && [ $SECONDS -lt $e ]; do sleep 0.2; done
        ! alive "$pid" || log "warning: pid $pid survived SIGKILL"
    done
    [ ${#pids[@]} -eq 0 ] || log "stopped ${#pids[@]} daemon(s)"
    rm -f "$PIDS"/*.pid
}

# The pid of an `up` still running on DIR (recorded in DIR/up.pid), if any.
up_running() {
    local pid cmd
    pid=$(cat "$DIR/up.pid" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && [ "$pid" != $$ ] || return 1
    cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
    [[ "$cmd" == *"ceph.sh up "* ]] || return 1
    echo "$pid"
}

down() {
    [ $# -eq 0 ] || die "down takes no option"
    if [ ! -e "$DIR" ]; then
        log "$DIR does not exist; nothing to do"
        return 0
    fi
    local pid end
    # An `up` still under way would go on starting daemons: stop it first (it then stops
    # what it started).
    if pid=$(up_running); then
        log "stopping the 'up' still running on $DIR (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        end=$((SECONDS + 90))
        while alive "$pid" && [ $SECONDS -lt $end ]; do sleep 0.5; done
        ! alive "$pid" || kill -KILL "$pid" 2>/dev/null || true
    fi
    stop_all
    # Only what `up` makes, then DIR itself if that leaves it empty.
    rm -rf "$DIR/mon" "$DIR/mgr" "$DIR/osd" "$DIR/rgw" "$DIR/run" "$DIR/log" "$PIDS" \
        "$CONF" "$DIR/keyring" "$DIR/monmap" "$DIR/up.pid"
    if rmdir "$DIR" 2>/dev/null; then
        log "down: $DIR removed"
    else
        log "down: removed the cluster's files; left $DIR (it holds files that are not ours)"
    fi
}

# Waits until `cond` succeeds, at most `secs` seconds; `what` names it in the error.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local end=$((SECONDS + secs))
    until "$@"; do
        revive
        check_daemons
        [ $SECONDS -lt $end ] || die "timed out after ${secs} s waiting for $what"
        sleep 1
    done
}

check_daemons() {
    local f name
    for f in "$PIDS"/*.pid; do
        [ -e "$f" ] || continue
        name=$(basename "$f" .pid)
        ours "$f" >/dev/null || die "$name exited; last lines of its log:
$(tail -n 25 "$DIR/log/$name.out" 2>/dev/null; tail -n 25 "$DIR/log/$name.log" 2>/dev/null)"
    done
}

# Starts daemon NAME (mon.a, mgr.x, osd.N, rgw.x).
launch() {
    local name=$1
    case "$name" in
        mon.*) spawn "$name" ceph-mon -c "$CONF" -f -i "${name#mon.}" ;;
        mgr.*) spawn "$name" ceph-mgr -c "$CONF" -f -i "${name#mgr.}" ;;
        osd.*) spawn "$name" ceph-osd -c "$CONF" -f -i "${name#osd.}" ;;
        rgw.*) spawn "$name" radosgw -c "$CONF" -f -n "client.$name" --no-mon-config \
            --rgw-frontends "beast endpoint=127.0.0.1:$RGW_PORT" ;;
        *) die "launch: unknown daemon $name" ;;
    esac
}

# A daemon other than the mon that exited during `up` is started again, at most twice: with
# auth none, a daemon's (or the ceph CLI's) first mon command sometimes goes out before it has
# the monmap, with fsid 0; the mon answers EPERM 'wrong fsid' and an OSD or radosgw that gets
# this while booting exits (seen here on about one OSD start in ten until the OSDs' device
# class update was turned off; the CLI still meets it now and then, hence `try`).
declare -A RESTARTS=()
revive() {
    local f name
    for f in "$PIDS"/*.pid; do
        [ -e "$f" ] || continue
        name=$(basename "$f" .pid)
        [ "${name%%.*}" != mon ] || continue
        ours "$f" >/dev/null && continue
        [ "${RESTARTS[$name]:-0}" -lt 2 ] || continue
        RESTARTS[$name]=$((${RESTARTS[$name]:-0} + 1))
        log "$name exited: $(grep -E 'fail|error|rror:' "$DIR/log/$name.log" 2>/dev/null | tail -n 1 | tail -c 200); restarting it"
        launch "$name"
    done
}

mon_up() { c mon stat >/dev/null 2>&1; }
mgr_up() { c mgr stat -f json 2>/dev/null | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin).get("available") else 1)' 2>/dev/null; }
osds_up() {
    c osd stat -f json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
s = s.get("osdmap", s)
sys.exit(0 if s["num_up_osds"] == s["num_osds"] == int(sys.argv[1]) and s["num_in_osds"] == s["num_osds"] else 1)' "$OSDS" 2>/dev/null
}
# Every PG active+clean: the PGs of every pool (pg stat can lag a pool creation).
pgs_settled() {
    local want have
    want=$(c osd pool ls detail -f json 2>/dev/null | python3 -c '
import json, sys
print(sum(p["pg_num"] for p in json.load(sys.stdin)))' 2>/dev/null) || return 1
    have=$(c pg stat -f json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
s = s.get("pg_summary", s)
states = {x["name"]: x["num"] for x in s.get("num_pg_by_state", [])}
print(states.get("active+clean", 0))' 2>/dev/null) || return 1
    [ -n "$want" ] && [ "$want" = "$have" ]
}
port_open() { python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$1" 2>/dev/null; }
port_free() { ! port_open "$1"; }

on_up_failure() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [ $rc -ne 0 ]; then
        log "up failed (exit $rc); stopping what was started; logs stay in $DIR/log"
        stop_all || true
    fi
    rm -f "$DIR/up.pid"
    exit $rc
}

up() {
    while [ $# -gt 0 ]; do
        [ $# -ge 2 ] || die "$1 needs a value"
        case "$1" in
            --mon-port) MON_PORT=$2 ;;
            --rgw-port) RGW_PORT=$2 ;;
            --access-key) ACCESS_KEY=$2 ;;
            --secret-key) SECRET_KEY=$2 ;;
            --osds) OSDS=$2 ;;
            --osd-size-gib) OSD_SIZE_GIB=$2 ;;
            --rbd-image-mib) RBD_MIB=$2 ;;
            --osd-memory-mib) OSD_MEM_MIB=$2 ;;
            --rbd-cache) RBD_CACHE=$2 ;;
            --timeout) TIMEOUT=$2 ;;
            *) die "unknown option $1" ;;
        esac
        shift 2
    done
    for v in MON_PORT RGW_PORT OSDS OSD_SIZE_GIB RBD_MIB OSD_MEM_MIB TIMEOUT; do
        [[ "${!v}" =~ ^[0-9]+$ ]] && [ "${!v}" -gt 0 ] || die "$v must be a positive integer"
    done
    case "$RBD_CACHE" in
        "" | true | false) ;;
        *) die "--rbd-cache takes true or false" ;;
    esac
    [ "$(id -u)" -eq 0 ] || die "must run as root"
    local tool
    for tool in ceph ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin rbd monmaptool \
        ceph-authtool python3 setsid timeout uuidgen; do
        command -v "$tool" >/dev/null ||
            die "$tool not found; apt-get install --no-install-recommends ceph-mon ceph-osd ceph-mgr radosgw ceph-common"
    done
    ! up_running >/dev/null || die "an 'up' is already running on $DIR"
    if [ -d "$PIDS" ]; then
        local f
        for f in "$PIDS"/*.pid; do
            [ -e "$f" ] && ours "$f" >/dev/null && die "a cluster is already running in $DIR (ceph.sh down $DIR first)"
        done
    fi
    [ ! -e "$DIR/mon" ] || die "$DIR already holds a cluster's data (ceph.sh down $DIR first)"
    port_free "$MON_PORT" || die "port $MON_PORT (mon) is in use"
    port_free "$RGW_PORT" || die "port $RGW_PORT (radosgw) is in use"

    local start=$SECONDS
    mkdir -p "$PIDS"
    echo $$ >"$DIR/up.pid"
    trap on_up_failure EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP

    mkdir -p "$DIR"/{mon,mgr/ceph-x,osd,rgw/ceph-rgw.x,run,log} "$PIDS"
    local fsid
    fsid=$(uuidgen)
    cat >"$CONF" <<EOF
# Made by benchmarks/ceph/ceph.sh; single host, no authentication, every file under $DIR.
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$MON_PORT
mon initial members = a
ms bind msgr2 = false
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = false
keyring = $DIR/keyring
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
mon cluster log file = $DIR/log/cluster-\$channel.log
crash dir = $DIR/log/crash
mon data = $DIR/mon/\$cluster-\$id
mgr data = $DIR/mgr/\$cluster-\$id
osd data = $DIR/osd/\$cluster-\$id
rgw data = $DIR/rgw/\$cluster-\$id
# One host: replicas go to distinct OSDs, not hosts.
osd crush chooseleaf type = 0
osd crush update on start = false
# With auth none an OSD can send its first mon command before it has the monmap (fsid 0: the
# mon answers 'wrong fsid' and the OSD exits); the device class update is such a command.
osd class update on start = false
osd pool default size = 3
osd pool default min size = 2
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 500
mon allow pool delete = true
# The host's disk is shared with everything else: do not warn below 30 % free.
mon data avail warn = 5
mon data avail crit = 2
mon warn on pool no redundancy = false
osd objectstore = bluestore
bluestore block create = true
bluestore block size = $((OSD_SIZE_GIB * 1024 * 1024 * 1024))
osd memory target = $((OSD_MEM_MIB * 1024 * 1024))
mgr initial modules = iostat
# RGW frees a deleted object's data by garbage collection, by default two hours later. The S3
# benchmark deletes what it wrote after every case; without prompt collection three rounds
# fill the OSDs and RGW stops answering writes.
rgw gc obj min wait = 0
rgw gc processor period = 10
rgw gc processor max time = 10
EOF
    if [ -n "$RBD_CACHE" ]; then
        # librbd's default cache (policy writearound) acknowledges a write before any OSD has
        # it; with the cache off a write completes once every replica has committed it.
        printf '\n[client]\nrbd cache = %s\n' "$RBD_CACHE" >>"$CONF"
    fi
    log "config $CONF (fsid $fsid, mon 127.0.0.1:$MON_PORT)"

    t 30 ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    t 30 ceph-authtool "$DIR/keyring" --gen-key -n client.admin --cap mon 'allow *' \
        --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    t 30 monmaptool --create --addv a "[v1:127.0.0.1:$MON_PORT]" --fsid "$fsid" "$DIR/monmap" >/dev/null
    t 60 ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring" \
        >>"$DIR/log/mon.a.out" 2>&1 || die "ceph-mon --mkfs failed: $(tail -n 20 "$DIR/log/mon.a.out")"
    launch mon.a
    wait_for 60 "the mon" mon_up
    log "mon up after $((SECONDS - start)) s"

    launch mgr.x

    local i id uuid
    for ((i = 0; i < OSDS; i++)); do
        uuid=$(uuidgen)
        id=$(try "ceph osd create" c osd create "$uuid") || exit 1
        [ "$id" = "$i" ] || die "ceph osd create gave id $id, expected $i"
        mkdir -p "$DIR/osd/ceph-$id"
        t 300 ceph-osd -c "$CONF" -i "$id" --mkfs --osd-uuid "$uuid" >>"$DIR/log/osd.$id.out" 2>&1 ||
            die "ceph-osd -i $id --mkfs failed: $(tail -n 20 "$DIR/log/osd.$id.out")"
        try "ceph osd crush add osd.$id" c osd crush add "osd.$id" 1 root=default host=localhost >/dev/null || exit 1
        launch "osd.$id"
    done
    wait_for "$TIMEOUT" "$OSDS OSDs up and in" osds_up
    log "$OSDS OSDs up after $((SECONDS - start)) s"
    wait_for "$TIMEOUT" "the mgr" mgr_up

    launch rgw.x
    try "ceph osd pool create rbd" c osd pool create rbd 32 32 >/dev/null || exit 1
    try "rbd pool init rbd" t 120 rbd -c "$CONF" pool init rbd >/dev/null || exit 1
    try "rbd create rbd/img" t 120 rbd -c "$CONF" create --size "${RBD_MIB}M" rbd/img >/dev/null ||
        exit 1
    wait_for "$TIMEOUT" "radosgw on 127.0.0.1:$RGW_PORT" port_open "$RGW_PORT"
    log "radosgw up after $((SECONDS - start)) s"
    try "radosgw-admin user create" t 120 radosgw-admin -c "$CONF" user create --uid=main \
        --display-name=main --access-key="$ACCESS_KEY" --secret="$SECRET_KEY" >/dev/null || exit 1
    wait_for "$TIMEOUT" "every PG active+clean" pgs_settled
    check_daemons
    port_open "$RGW_PORT" || die "radosgw stopped answering on 127.0.0.1:$RGW_PORT"
    local health= i
    for i in 1 2 3; do
        health=$(c health 2>/dev/null) && break
    done
    log "ready after $((SECONDS - start)) s; health: ${health:-?}"

    local version
    version=$(ceph --version 2>/dev/null | awk '{print $3}')
    trap - EXIT INT TERM HUP
    rm -f "$DIR/up.pid"
    python3 -c '
import json, sys
conf, port, ak, sk, version, secs = sys.argv[1:]
print(json.dumps({"conf": conf, "s3_endpoint": f"http://127.0.0.1:{port}", "access_key": ak,
                  "secret_key": sk, "rbd_pool": "rbd", "rbd_image": "img",
                  "ceph_version": version, "seconds": int(secs)}))' "$CONF" "$RGW_PORT" \
        "$ACCESS_KEY" "$SECRET_KEY" "${version:-16.2}" "$((SECONDS - start))"
}

case "$CMD" in
    up) up "$@" ;;
    down) down "$@" ;;
    *) usage ;;
esac
