#!/usr/bin/env bash
# conformance/bench/cpu-per-io.sh — A/B pairs of servers on one fio job, for CPU per I/O:
# each argument is LABEL=DIR (an mvps-te build: DIR holds mvps-te and mvpsctl) or
# LABEL=nbdkit (`nbdkit file`). For REPS rounds, each server in turn (alternating, same
# machine, same run) gets a fresh 1 GiB image and one fio job of SECS seconds, while
# `perf stat` counts the server's CPU time, context switches, futex calls and syscalls and
# /proc gives its CPU per thread group. Prints, per run: the load average, IOPS, server CPU
# µs per I/O, context switches / futex calls / syscalls per I/O, fio's CPU, and CPU µs per
# I/O per thread group (conn-N: the connection's threads; ckpt, compact: background jobs).
# The syscall tracepoints make syscalls a little dearer: compare runs, not absolute costs.
#
# Knobs: SECS=60 REPS=2 RW=randwrite BS=4k QD=32 PREFILL= (set: write the image once first,
# for read jobs) OUT=DIR (default: out/ in a temp dir, kept; the images are deleted).
#   e.g. conformance/bench/cpu-per-io.sh A=/tmp/a B=target/release K=nbdkit
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
log() { printf '[cpu-per-io %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=common.sh
. "$HERE/common.sh"
for t in fio nbdkit nbdinfo jq perf python3 bc; do command -v $t >/dev/null || die "$t is missing"; done
[ $# -gt 0 ] || die "usage: $0 LABEL=DIR|LABEL=nbdkit ..."
SECS=${SECS:-60} REPS=${REPS:-2}
TMP=$(mktemp -d /tmp/mvps-cpu-per-io.XXXXXX)
OUT=${OUT:-$TMP/out}
mkdir -p "$OUT"
PIDS=()
trap 'stop_all; rm -rf "$TMP/img"; [ "$OUT" = "$TMP/out" ] || rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM
SECRET="bench-secret-$$-$RANDOM"

# CPU seconds per thread group (digits folded: conn-3-w2 -> conn-N-wN) of PID, sampled
# every 0.5 s until the file STOP exists (threads that ended keep their last sample).
thread_cpu() { # pid stop
    python3 - "$1" "$2" <<'PY'
import collections, os, re, sys, time
pid, stop = sys.argv[1], sys.argv[2]
hz = os.sysconf("SC_CLK_TCK")
first, last, names = {}, {}, {}
def sample():
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for t in tids:
        try:
            s = open(f"/proc/{pid}/task/{t}/stat").read()
        except OSError:
            continue
        f = s[s.rindex(")") + 2:].split()
        cpu = (int(f[11]) + int(f[12])) / hz
        first.setdefault(t, cpu if last else 0.0)
        last[t] = cpu
        names[t] = re.sub(r"[0-9]+", "N", s[s.index("(") + 1:s.rindex(")")])
    return True
sample()
while not os.path.exists(stop) and sample():
    time.sleep(0.5)
g = collections.Counter()
for t in last:
    g[names[t]] += last[t] - first[t]
for n, c in g.most_common():
    print(f"{n}\t{c:.3f}")
PY
}

run_one() { # label target round
    local label=$1 target=$2 round=$3 port pid uri o="$OUT/$1-$3"
    port=$(free_port)
    rm -rf "$TMP/img"; mkdir -p "$TMP/img"
    if [ "$target" = nbdkit ]; then
        truncate -s 1G "$TMP/img/nbdkit.img"
        nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$port" file "$TMP/img/nbdkit.img" >"$o.log" 2>&1 &
        pid=$!
        uri="nbd://127.0.0.1:$port"
    else
        [ -x "$target/mvps-te" ] && [ -x "$target/mvpsctl" ] || die "no mvps-te/mvpsctl in $target"
        MVPS_TE_JWT_SECRET=$SECRET "$target/mvps-te" --listen "127.0.0.1:$port" --data-dir "$TMP/img" >"$o.log" 2>&1 &
        pid=$!
        uri="nbd://127.0.0.1:$port/$(MVPS_TE_JWT_SECRET=$SECRET "$target/mvpsctl" token --image-id cpu.mvps-image --size 1G --ttl 1d)"
    fi
    PIDS+=("$pid")
    wait_ready "$uri" "$label"
    [ -z "${PREFILL:-}" ] || fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --size=1G >/dev/null
    local load; load=$(cut -d' ' -f1-3 /proc/loadavg)
    rm -f "$TMP/stop"
    thread_cpu "$pid" "$TMP/stop" >"$o.threads" &
    local th=$!
    perf stat -x, -e task-clock,context-switches,syscalls:sys_enter_futex,raw_syscalls:sys_enter -p "$pid" -o "$o.perf" &
    local pf=$!
    fio --name=job --ioengine=nbd --uri="$uri" --rw="${RW:-randwrite}" --bs="${BS:-4k}" --iodepth="${QD:-32}" \
        --size=1G --norandommap --randrepeat=0 --time_based --runtime="$SECS" --output-format=json --output="$o.json" >/dev/null
    kill -INT $pf; wait $pf || true
    touch "$TMP/stop"; wait $th || true
    kill "$pid"; wait "$pid" 2>/dev/null || true
    local ios
    ios=$(jq '.jobs[0].write.total_ios + .jobs[0].read.total_ios' "$o.json")
    ev() { awk -F, -v e="$1" -v n="$ios" '$3==e {printf "%.3f", $1 / n}' "$o.perf"; }
    printf '%s\tround %s\tload %s\tIOPS %.0f\tcpu_us/io %.2f\tcs/io %s\tfutex/io %s\tsyscalls/io %s\tfio_cpu%% %.0f\tthreads us/io: %s\n' \
        "$label" "$round" "$load" "$(jq '.jobs[0].write.iops + .jobs[0].read.iops' "$o.json")" \
        "$(echo "$(ev task-clock) * 1000" | bc -l)" "$(ev context-switches)" "$(ev syscalls:sys_enter_futex)" \
        "$(ev raw_syscalls:sys_enter)" "$(jq '.jobs[0].usr_cpu + .jobs[0].sys_cpu' "$o.json")" \
        "$(awk -v n="$ios" '{printf "%s=%.1f ", $1, $2 * 1e6 / n}' "$o.threads")" | tee -a "$OUT/summary.tsv"
    rm -rf "$TMP/img"
}

for round in $(seq 1 "$REPS"); do
    for arg in "$@"; do run_one "${arg%%=*}" "${arg#*=}" "$round"; done
done
log "results in $OUT/summary.tsv"
