#!/usr/bin/env bash
# conformance/bench/run.sh — fio over NBD: mvps-te against `nbdkit file`, same machine, same run.
#
# Builds mvps-te (release), starts it and nbdkit on free loopback ports with temp dirs on one
# filesystem, prefills both exports (so reads hit written data), runs each fio job against
# both back to back (BENCH_REPEAT times, alternating which goes first), and prints a table of
# IOPS, MB/s and the mvps/nbdkit ratio, plus each server's CPU time, context switches and
# syscalls per I/O (perf stat). Everything it starts it stops; it listens on 127.0.0.1 only.
# Results and their analysis: docs/PERFORMANCE.md.
#
# Knobs (environment):
#   BENCH_SIZE=2G          image / file size; every job covers all of it
#   BENCH_RUNTIME=12       seconds measured per job (after BENCH_RAMP seconds of ramp)
#   BENCH_RAMP=3
#   BENCH_REPEAT=2         runs of each job per server, alternating which server goes first
#   BENCH_JOBS="..."       subset of: seq-read seq-write seq-write-flush rand-read rand-write
#                          rand-write-fsync wal-rand-read (default: all, in that order)
#   BENCH_WAL_SIZE=96M     region of the wal-rand-read job (must stay below half the throttle
#                          threshold so no checkpoint moves it out of the WAL)
#   BENCH_TMPDIR=/tmp      parent of the temp dir (both servers' data live there)
#   BENCH_OUT=DIR          keep fio JSON, server logs and the table there (default: a temp dir,
#                          kept and printed at the end)
#   BENCH_MVPS_ARGS="..."  extra mvps-te flags (the defaults are the server's own: checkpoint
#                          every 60 s ± 10 s, write throttle at 50000 pages)
#   MVPS_BIN_DIR=DIR       use mvps-te/mvpsctl from DIR instead of building
#   BENCH_PERF=1           record `perf record --call-graph dwarf` (cpu-clock) of mvps-te per run
#                          into BENCH_OUT/perf-JOB-mvps-REP.data (slows mvps-te: ratios are then
#                          not valid). conformance/bench/perf-categories.py summarizes one.
#   BENCH_TRANSPORT=tcp    tcp (loopback) or unix (sockets in the temp dir) for both servers
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SIZE=${BENCH_SIZE:-2G}
RUNTIME=${BENCH_RUNTIME:-12}
RAMP=${BENCH_RAMP:-3}
REPEAT=${BENCH_REPEAT:-2}
JOBS=${BENCH_JOBS:-"seq-read seq-write seq-write-flush rand-read rand-write rand-write-fsync wal-rand-read"}
WAL_SIZE=${BENCH_WAL_SIZE:-96M}
TRANSPORT=${BENCH_TRANSPORT:-tcp}
SECRET="bench-secret-$$-$RANDOM"
IDLE_TIMEOUT=180   # seconds to wait for mvps-te to checkpoint and close an idle image

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=common.sh
. "$HERE/common.sh"

# ------------------------------------------------------------------ tools
need_pkgs=()
command -v fio >/dev/null || need_pkgs+=(fio)
command -v nbdkit >/dev/null || need_pkgs+=(nbdkit)
command -v nbdinfo >/dev/null || need_pkgs+=(libnbd-bin)
command -v jq >/dev/null || need_pkgs+=(jq)
command -v ss >/dev/null || need_pkgs+=(iproute2)
command -v bc >/dev/null || need_pkgs+=(bc)
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
# perf (for the per-I/O cost table, and BENCH_PERF=1) is optional: without it that table is 0.
if ! command -v perf >/dev/null; then
    log "installing linux-perf (optional)"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq linux-perf >/dev/null 2>&1 \
        || log "no perf: the per-I/O cost table will be empty"
fi
if [ "${BENCH_PERF:-0}" = 1 ] && ! command -v perf >/dev/null; then die "BENCH_PERF=1 needs perf"; fi
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (needs fio built with libnbd)"

# ------------------------------------------------------------------ binaries
if [ -n "${MVPS_BIN_DIR:-}" ]; then
    BIN=$MVPS_BIN_DIR
else
    log "building mvps-te (release)"
    (cd "$ROOT" && cargo build --release -q -p mvps-te --bins)
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
fi
[ -x "$BIN/mvps-te" ] && [ -x "$BIN/mvpsctl" ] || die "no mvps-te/mvpsctl in $BIN"

# ------------------------------------------------------------------ temp dir, cleanup
TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/mvps-bench.XXXXXX")
OUT=${BENCH_OUT:-$TMP/out}
mkdir -p "$OUT"
PIDS=()
cleanup() {
    stop_all
    # Keep only the results.
    rm -rf "$TMP/mvps" "$TMP"/*.img "$TMP"/*.sock
    [ "$OUT" = "$TMP/out" ] || rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM


# URIs: nbd://127.0.0.1:PORT/NAME or nbd+unix:///NAME?socket=PATH
uri_of() { # endpoint export-name
    case "$TRANSPORT" in
        tcp) echo "nbd://127.0.0.1:$1/$2" ;;
        unix) echo "nbd+unix:///$2?socket=$1" ;;
    esac
}


# ------------------------------------------------------------------ servers
SIZE_BYTES=$(numfmt --from=iec "$SIZE")
WAL_BYTES=$(numfmt --from=iec "$WAL_SIZE")

if [ "$TRANSPORT" = tcp ]; then
    NBDKIT_EP=$(free_port); MVPS_EP=$(free_port)
    while [ "$MVPS_EP" = "$NBDKIT_EP" ]; do MVPS_EP=$(free_port); done
    NBDKIT_LISTEN=(-i 127.0.0.1 -p "$NBDKIT_EP"); MVPS_LISTEN="127.0.0.1:$MVPS_EP"
else
    NBDKIT_EP=$TMP/nbdkit.sock; MVPS_EP=$TMP/mvps.sock
    NBDKIT_LISTEN=(-U "$NBDKIT_EP"); MVPS_LISTEN="unix:$MVPS_EP"
fi

truncate -s "$SIZE_BYTES" "$TMP/nbdkit.img"
truncate -s "$WAL_BYTES" "$TMP/nbdkit-wal.img"
# Two exports from one nbdkit: the big file, and a small one for the WAL-resident read job.
nbdkit -f --exit-with-parent "${NBDKIT_LISTEN[@]}" file dir="$TMP" >"$OUT/nbdkit.log" 2>&1 &
PIDS+=($!)
NBDKIT_PID=$!

mkdir -p "$TMP/mvps"
# shellcheck disable=SC2086
MVPS_TE_JWT_SECRET=$SECRET "$BIN/mvps-te" --listen "$MVPS_LISTEN" --data-dir "$TMP/mvps" \
    ${BENCH_MVPS_ARGS:-} >"$OUT/mvps-te.log" 2>&1 &
PIDS+=($!)
MVPS_PID=$!

TOKEN=$(MVPS_TE_JWT_SECRET=$SECRET "$BIN/mvpsctl" token --image-id bench.mvps-image \
    --size "$SIZE_BYTES" --page-size-bits 12 --ttl 1d)
WAL_TOKEN=$(MVPS_TE_JWT_SECRET=$SECRET "$BIN/mvpsctl" token --image-id bench-wal.mvps-image \
    --size "$WAL_BYTES" --page-size-bits 12 --ttl 1d)

NBDKIT_URI=$(uri_of "$NBDKIT_EP" nbdkit.img)
NBDKIT_WAL_URI=$(uri_of "$NBDKIT_EP" nbdkit-wal.img)
MVPS_URI=$(uri_of "$MVPS_EP" "$TOKEN")
MVPS_WAL_URI=$(uri_of "$MVPS_EP" "$WAL_TOKEN")
wait_ready "$NBDKIT_URI" nbdkit
wait_ready "$MVPS_URI" mvps-te
# wait_ready's probe opened (and left) the image; let that session close before we start.
# fio opens a probe connection before its real one, so counting "idle, closed" lines is not
# enough: the image is idle when the newest open/close line about it says "idle, closed".
mvps_idle() { # image
    grep -E "image $1.mvps-image: (took over|resumed|idle, closed)" "$OUT/mvps-te.log" \
        | tail -n 1 | grep -q "idle, closed"
}

NO_UPLOAD=0
case " ${BENCH_MVPS_ARGS:-} " in *" --disable-image-store-write "*) NO_UPLOAD=1 ;; esac

wait_mvps_idle() { # [image]; prints the seconds it waited for checkpoint + close
    local t0=$SECONDS
    # With uploads disabled the buffer never empties, so the session never closes.
    if [ "$NO_UPLOAD" = 1 ]; then echo 0; return; fi
    until mvps_idle "${1:-bench}"; do
        kill -0 "$MVPS_PID" 2>/dev/null || die "mvps-te exited; see $OUT/mvps-te.log"
        [ $((SECONDS - t0)) -lt $IDLE_TIMEOUT ] || die "mvps-te did not checkpoint/close within ${IDLE_TIMEOUT}s"
        sleep 0.1
    done
    echo $((SECONDS - t0))
}
wait_mvps_idle >/dev/null

# ------------------------------------------------------------------ fio
run_fio() { # out-json uri fio-args...
    local out=$1 uri=$2; shift 2
    fio --name=bench --ioengine=nbd --uri="$uri" --group_reporting \
        --output-format=json --output="$out" "$@" >/dev/null 2>"$out.stderr" \
        || die "fio failed: $(cat "$out.stderr")"
}

job_args() { # job -> fio args
    local common=(--size="$SIZE_BYTES" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP")
    case "$1" in
        seq-read) echo "${common[@]} --rw=read --bs=1M --iodepth=8" ;;
        seq-write) echo "${common[@]} --rw=write --bs=1M --iodepth=8" ;;
        # One pass over the image, then a FLUSH, timed together (fio counts end_fsync in the
        # runtime): both servers must make the data durable, which seq-write never asks.
        seq-write-flush) echo "--size=$SIZE_BYTES --rw=write --bs=1M --iodepth=8 --end_fsync=1" ;;
        rand-read) echo "${common[@]} --rw=randread --bs=4k --iodepth=32 --norandommap" ;;
        rand-write) echo "${common[@]} --rw=randwrite --bs=4k --iodepth=32 --norandommap" ;;
        rand-write-fsync) echo "${common[@]} --rw=randwrite --bs=4k --iodepth=32 --norandommap --fsync=1" ;;
        wal-rand-read) echo "--size=$WAL_BYTES --time_based --runtime=$RUNTIME --ramp_time=$RAMP --rw=randread --bs=4k --iodepth=32 --norandommap" ;;
        *) die "unknown job $1" ;;
    esac
}

# "iops MB/s p99-usec" of the job's main direction
summarize() { # json dir
    jq -r --arg d "$2" '.jobs[0][$d] | "\(.iops) \(.bw_bytes / 1e6) \((.clat_ns.percentile["99.000000"] // 0) / 1000)"' "$1"
}

perf_start() { # name
    PERF_PID=
    [ "${BENCH_PERF:-0}" = 1 ] || return 0
    perf record -e cpu-clock -F 499 --call-graph dwarf,16384 -p "$MVPS_PID" -o "$OUT/perf-$1.data" >/dev/null 2>&1 &
    PERF_PID=$!
    PIDS+=($PERF_PID)
    sleep 0.5
}
perf_stop() {
    [ -n "${PERF_PID:-}" ] || return 0
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    PERF_PID=
}

# Server cost over the measured window (after the ramp), via `perf stat` with software events
# and syscall tracepoints (these work in VMs without PMU access). stat_end prints
# "cpu-ms context-switches syscalls futex-calls fsync+fdatasync-calls".
STAT_EVENTS=task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_futex,syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync
stat_start() { # pid name
    STAT_PID=
    command -v perf >/dev/null || return 0
    (sleep "$RAMP"; exec perf stat -x, -e "$STAT_EVENTS" -p "$1" -o "$OUT/stat-$2.csv" -- sleep "$RUNTIME") \
        >/dev/null 2>&1 &
    STAT_PID=$!
}
stat_wait() { # must run in the main shell (not in a $(...) subshell) to reap perf
    [ -n "${STAT_PID:-}" ] && wait "$STAT_PID" 2>/dev/null || true
    STAT_PID=
}
stat_end() { # name
    if [ -s "$OUT/stat-$1.csv" ]; then
        awk -F, '$3=="task-clock"{c=$1} $3=="context-switches"{x=$1} $3=="raw_syscalls:sys_enter"{s=$1}
                 $3=="syscalls:sys_enter_futex"{f=$1} $3~/sys_enter_f(data)?sync$/{y+=$1}
                 END{printf "%.0f %.0f %.0f %.0f %.0f\n", c, x, s, f, y}' "$OUT/stat-$1.csv"
    else
        echo "0 0 0 0 0"
    fi
}


log "temp dir $TMP ($(df -T "$TMP" | awk 'NR==2{print $2}')); results in $OUT"
log "nbdkit $NBDKIT_URI"
log "mvps-te ${MVPS_URI%%/ey*}/<token> (pid $MVPS_PID)"

# Prefill both with sequential 1 MiB writes, so every read hits written data.
for srv in nbdkit mvps; do
    uri=$NBDKIT_URI; [ $srv = mvps ] && uri=$MVPS_URI
    t0=$(date +%s.%N)
    run_fio "$OUT/prefill-$srv.json" "$uri" --rw=write --bs=1M --iodepth=8 --size="$SIZE_BYTES"
    t1=$(date +%s.%N)
    w=0; [ $srv = mvps ] && w=$(wait_mvps_idle)
    sync
    log "prefill $srv: $SIZE in $(printf '%.1f' "$(echo "$t1 - $t0" | bc)") s ($(summarize "$OUT/prefill-$srv.json" write | awk '{printf "%.0f MB/s", $2}'))${w:+, then ${w}s to checkpoint and close}"
done

# What the disk itself takes (direct 1 MiB writes, queue depth 8, in the same directory), for
# the table: a server that makes every byte of a write stream durable cannot sustain much more.
fio --name=disk --filename="$TMP/disk-probe" --rw=write --bs=1M --iodepth=8 --ioengine=libaio \
    --direct=1 --size="$SIZE_BYTES" --output-format=json --output="$OUT/disk-probe.json" >/dev/null 2>&1 \
    || die "fio disk probe failed"
rm -f "$TMP/disk-probe"
DISK_MBS=$(jq -r '.jobs[0].write.bw_bytes / 1e6 | floor' "$OUT/disk-probe.json")
log "disk: $DISK_MBS MB/s (direct 1 MiB writes, qd8)"

RAW=$OUT/raw.tsv   # one line per (job, repetition, server)
printf 'job\trep\tserver\tiops\tmbs\tp99_us\tcpu_us_per_io\tctxsw_per_io\tsyscalls_per_io\tfutex_per_io\tfsyncs_per_io\tmvps_checkpoints\tmvps_data\n' >"$RAW"

per_io() { printf "%.2f" "$(echo "scale=4; $1 * $3 / ($2 * $RUNTIME)" | bc)"; }

layer_count() { # layers in the newest manifest of bench.mvps-image (names sort newest first)
    local d=$TMP/mvps/image-store/images/bench.mvps-image m
    m=$(find "$d" -maxdepth 1 -name '*.json' 2>/dev/null | sort | head -n 1)
    [ -n "$m" ] && jq '.layers | length' "$m" 2>/dev/null || echo "?"
}

run_one() { # job rep server uri dir
    local job=$1 rep=$2 srv=$3 uri=$4 dir=$5 pid=$NBDKIT_PID name="$1-$3-$2" c0 ck=- where=-
    [ "$srv" = mvps ] && pid=$MVPS_PID
    # shellcheck disable=SC2207
    local args=($(job_args "$job"))
    sync
    # "Warm" (the issue's condition for reads): one unmeasured pass over the data first, so
    # both servers read from the page cache. nbdkit's file is cached since its writes; the
    # local image store drops layers from the page cache once durable
    # (src/store/local.rs, drop_cached), so they start cold.
    if [ "$dir" = read ] && [ "$job" != wal-rand-read ]; then
        run_fio "$OUT/$name-warm.json" "$uri" --rw=read --bs=1M --iodepth=8 --size="$SIZE_BYTES"
    fi
    log "$job #$rep: $srv"
    if [ "$srv" = mvps ]; then
        c0=$(grep -c "image $MVPS_IMAGE.mvps-image: checkpoint:" "$OUT/mvps-te.log" || true)
        perf_start "$name"
    fi
    # perf stat measures a fixed window (ramp..ramp+runtime); the one-pass job has none.
    [ "$job" = seq-write-flush ] || stat_start "$pid" "$name"
    run_fio "$OUT/$name.json" "$uri" "${args[@]}"
    stat_wait
    perf_stop
    local cpu ctx sys fut syn iops mbs p99
    read -r cpu ctx sys fut syn < <(stat_end "$name")
    read -r iops mbs p99 < <(summarize "$OUT/$name.json" "$dir")
    if [ "$srv" = mvps ]; then
        ck=$(($(grep -c "image $MVPS_IMAGE.mvps-image: checkpoint:" "$OUT/mvps-te.log" || true) - c0))
        if [ "$NO_UPLOAD" = 1 ]; then where="WAL (uploads disabled)"
        elif [ "$job" = wal-rand-read ]; then where="WAL (session held open)"
        elif [ "$dir" = read ]; then where="layers (checkpointed, $(layer_count) layers)"
        else where="WAL, checkpointing meanwhile"; fi
        if [ "$job" != wal-rand-read ]; then
            local w; w=$(wait_mvps_idle)
            [ "$dir" = write ] && log "$job #$rep: mvps-te checkpointed and closed ${w}s after the job"
        fi
    fi
    printf '%s\t%s\t%s\t%.0f\t%.1f\t%.0f' "$job" "$rep" "$srv" "$iops" "$mbs" "$p99" >>"$RAW"
    printf '\t%s' "$(per_io "$cpu" "$iops" 1000)" "$(per_io "$ctx" "$iops" 1)" "$(per_io "$sys" "$iops" 1)" \
        "$(per_io "$fut" "$iops" 1)" "$(per_io "$syn" "$iops" 1)" "$ck" "$where" >>"$RAW"
    echo >>"$RAW"
}

for job in $JOBS; do
    dir=read; case $job in *write*) dir=write ;; esac
    MVPS_IMAGE=bench
    nbdk=$NBDKIT_URI; mv=$MVPS_URI
    if [ "$job" = wal-rand-read ]; then
        # A holder connection keeps the session open, so no idle checkpoint moves the freshly
        # written pages out of the WAL before the read job runs.
        fio --name=hold --ioengine=nbd --uri="$MVPS_WAL_URI" --rw=read --bs=4k --size=4k \
            --rate_iops=1 --time_based --runtime=3600 >/dev/null 2>&1 &
        HOLD_PID=$!; PIDS+=($HOLD_PID)
        run_fio "$OUT/walfill-nbdkit.json" "$NBDKIT_WAL_URI" --rw=write --bs=1M --iodepth=8 --size="$WAL_BYTES"
        run_fio "$OUT/walfill-mvps.json" "$MVPS_WAL_URI" --rw=write --bs=1M --iodepth=8 --size="$WAL_BYTES"
        nbdk=$NBDKIT_WAL_URI; mv=$MVPS_WAL_URI; MVPS_IMAGE=bench-wal
    fi
    for rep in $(seq 1 "$REPEAT"); do
        # Alternate who goes first, so drift in the machine's load hits both alike.
        if [ $((rep % 2)) = 1 ]; then
            run_one "$job" "$rep" nbdkit "$nbdk" "$dir"; run_one "$job" "$rep" mvps "$mv" "$dir"
        else
            run_one "$job" "$rep" mvps "$mv" "$dir"; run_one "$job" "$rep" nbdkit "$nbdk" "$dir"
        fi
    done
    if [ "$job" = wal-rand-read ]; then
        kill "$HOLD_PID" 2>/dev/null || true; wait "$HOLD_PID" 2>/dev/null || true
        wait_mvps_idle bench-wal >/dev/null
    fi
done

# Per job: means over the repetitions; ratio = mean mvps IOPS / mean nbdkit IOPS, and the
# range of the per-repetition ratios.
RESULTS=$OUT/results.tsv
awk -F'\t' -v OFS='\t' '
    NR == 1 { next }
    {
        k = $1 SUBSEP $3; n[k]++
        for (i = 4; i <= 11; i++) sum[k, i] += $i
        if ($3 == "mvps") { where[$1] = $13; ck[$1] = ck[$1] (ck[$1] == "" ? "" : "+") $12 }
        if (!($1 in seen)) { seen[$1] = 1; order[++jobs] = $1 }
        iops[$1, $2, $3] = $4; reps[$1] = ($2 > reps[$1] ? $2 : reps[$1])
    }
    END {
        print "job", "nbdkit_iops", "nbdkit_mbs", "nbdkit_p99_us", "mvps_iops", "mvps_mbs", "mvps_p99_us", "ratio", "ratio_min", "ratio_max", "mvps_data",
              "nbdkit_cpu_us_per_io", "mvps_cpu_us_per_io", "nbdkit_ctxsw_per_io", "mvps_ctxsw_per_io",
              "nbdkit_syscalls_per_io", "mvps_syscalls_per_io", "nbdkit_futex_per_io", "mvps_futex_per_io",
              "nbdkit_fsyncs_per_io", "mvps_fsyncs_per_io"
        for (j = 1; j <= jobs; j++) {
            job = order[j]; a = job SUBSEP "nbdkit"; b = job SUBSEP "mvps"
            lo = 1e9; hi = 0
            for (r = 1; r <= reps[job]; r++) {
                x = iops[job, r, "mvps"] / iops[job, r, "nbdkit"]
                if (x < lo) lo = x; if (x > hi) hi = x
            }
            line = sprintf("%s\t%.0f\t%.1f\t%.0f\t%.0f\t%.1f\t%.0f\t%.2f\t%.2f\t%.2f\t%s", job,
                sum[a, 4] / n[a], sum[a, 5] / n[a], sum[a, 6] / n[a],
                sum[b, 4] / n[b], sum[b, 5] / n[b], sum[b, 6] / n[b],
                (sum[b, 4] / n[b]) / (sum[a, 4] / n[a]), lo, hi, where[job] " [" ck[job] "]")
            for (i = 7; i <= 11; i++) line = line sprintf("\t%.2f\t%.2f", sum[a, i] / n[a], sum[b, i] / n[b])
            print line
        }
    }' "$RAW" >"$RESULTS"

# ------------------------------------------------------------------ table
describe_job() {
    case "$1" in
        seq-read) echo "seq read 1M qd8" ;;
        seq-write) echo "seq write 1M qd8" ;;
        seq-write-flush) echo "seq write 1M qd8, $SIZE once + FLUSH" ;;
        rand-read) echo "rand read 4k qd32" ;;
        rand-write) echo "rand write 4k qd32" ;;
        rand-write-fsync) echo "rand write 4k qd32 fsync=1" ;;
        wal-rand-read) echo "rand read 4k qd32 ($WAL_SIZE, in WAL)" ;;
    esac
}
goal() { # job ratio -> verdict
    local aim=0.9
    case "$1" in rand-write|rand-write-fsync) aim=1.0 ;; esac
    if (($(echo "$2 >= $aim" | bc))); then echo "aim met (>= $aim)"
    elif (($(echo "$2 >= 0.8" | bc))); then echo "floor met, aim $aim missed"
    else echo "BELOW FLOOR 0.8"; fi
}
{
    echo
    echo "fio nbd engine, $SIZE image, ${RUNTIME}s + ${RAMP}s ramp per job, $REPEAT repetition(s) (alternating order), transport $TRANSPORT;"
    echo "figures are means over the repetitions; ratio = mean mvps IOPS / mean nbdkit IOPS (range: per-repetition ratios)"
    echo "mvps-te flags: --listen --data-dir ${BENCH_MVPS_ARGS:-(defaults otherwise)}; $(uptime | sed 's/.*load/load/')"
    echo "machine: $(nproc) CPUs ($(lscpu | sed -n 's/^Model name: *//p' | head -1)), $(free -g | awk '/^Mem:/{print $2}') GiB RAM," \
        "kernel $(uname -r); $TMP on $(df -T "$TMP" | awk 'NR==2{print $2}'); $(fio --version), $(nbdkit --version | head -1)"
    echo "disk: $DISK_MBS MB/s (direct 1 MiB writes, qd8, once before the jobs): about the most a server can sustain when it makes every written byte durable"
    echo
    echo "| job | nbdkit IOPS | nbdkit MB/s | nbdkit p99 µs | mvps IOPS | mvps MB/s | mvps p99 µs | ratio (range) | verdict | mvps data [checkpoints per run] |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
    tail -n +2 "$RESULTS" | while IFS=$'\t' read -r job ni nm np mi mm mp ratio lo hi where _; do
        echo "| $(describe_job "$job") | $ni | $nm | $np | $mi | $mm | $mp | **$ratio** ($lo–$hi) | $(goal "$job" "$ratio") | $where |"
    done
    # Sustained writes must all become durable layers at the default throttle, so the disk
    # caps them; nbdkit's stay in its page cache. Print that cap next to the measured ratio.
    nbdkit_seq_write=$(awk -F'\t' '$1 == "seq-write" { print $3 }' "$RESULTS")
    if [ -n "$nbdkit_seq_write" ]; then
        echo
        echo "seq write ceiling for a server that makes every byte durable: disk $DISK_MBS MB/s / nbdkit" \
            "$nbdkit_seq_write MB/s = $(echo "scale=2; $DISK_MBS / $nbdkit_seq_write" | bc | sed 's/^\./0./')"
    fi
    echo
    echo "Server-side cost per I/O over the measured window (perf stat: task-clock, context switches,"
    echo "syscalls, futex calls, fsync+fdatasync calls), nbdkit / mvps:"
    echo
    echo "| job | CPU µs/IO | ctx switches/IO | syscalls/IO | futex/IO | fsyncs/IO |"
    echo "|---|---:|---:|---:|---:|---:|"
    tail -n +2 "$RESULTS" | while IFS=$'\t' read -r job _ _ _ _ _ _ _ _ _ _ nc mc nx mx ns ms nf mf ny my; do
        # (No fixed measuring window in a one-pass job: not sampled.)
        [ "$job" = seq-write-flush ] && continue
        echo "| $(describe_job "$job") | $nc / $mc | $nx / $mx | $ns / $ms | $nf / $mf | $ny / $my |"
    done
} | tee "$OUT/table.md"
log "results (fio JSON, server logs, table.md) kept in $OUT"
