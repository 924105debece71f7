#!/usr/bin/env bash
# conformance/bench/sustained.sh — write debt measured, not borrowed: long fio jobs over NBD
# against mvps-te (server defaults) and `nbdkit file`, same machine, same run.
#
# Jobs (each on both servers, nbdkit first):
#   rand   random 4 KiB writes, queue depth 32, SUSTAIN_SECONDS long, over a SUSTAIN_SIZE
#          image. Reports IOPS per minute, p99 and max latency (the longest stall), and for
#          mvps the debt sampled every 10 s with `mvpsctl inspect` (layers, read depth,
#          stored ÷ live, the worst of each), the server's RSS (peak and end), the peak size
#          of the blobs directory, and write amplification: bytes the disk wrote
#          (/proc/diskstats of the device under the temp dir) ÷ bytes fio wrote, counted until
#          the server has checkpointed and compacted what the job left (the debt is paid inside
#          the measurement).
#   seq    one pass of sequential 1 MiB writes over SEQ_SIZE (larger than the page cache's
#          dirty limit), then FLUSH, timed together; write amplification as above.
# If an `mvps-s3-gc` binary sits beside mvps-te, it runs every GC_INTERVAL seconds during the
# mvps jobs (local image store, thresholds 0/1) and the garbage left in blobs/ is reported.
# Everything it starts it stops, and it deletes what it wrote.
#
# Knobs (environment):
#   SUSTAIN_SECONDS=600  SUSTAIN_SIZE=1G  SUSTAIN_PATTERN=repeats|permutation
#       (repeats: uniform random with repeats, fio --norandommap, as a database writes;
#        permutation: fio's default random map, each block once per pass)
#   SEQ_SIZE=8G  JOBS="rand seq"  BENCH_TMPDIR=/tmp  BENCH_OUT=DIR  MVPS_BIN_DIR=DIR
#   DISK_FREE_FLOOR_GB=8  (a job is stopped, and says so, if free space falls below it)
#   GC_INTERVAL=20  GC_MIN_BLOB_AGE_SECS=30  (test-only lower bound of the collector, see
#       mvps-s3-gc(8); garbage peaks near the blob write rate × (age + interval): at ~320 MB/s
#       the collector's default 15 minutes, or even 120 s and 60 s, hold more than this disk
#       has free)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SUSTAIN_SECONDS=${SUSTAIN_SECONDS:-600}
SUSTAIN_SIZE=${SUSTAIN_SIZE:-1G}
SUSTAIN_PATTERN=${SUSTAIN_PATTERN:-repeats}
SEQ_SIZE=${SEQ_SIZE:-8G}
JOBS=${JOBS:-"rand seq"}
FLOOR_GB=${DISK_FREE_FLOOR_GB:-8}
GC_INTERVAL=${GC_INTERVAL:-20}
SECRET="bench-secret-$$-$RANDOM"
IMAGE=sustain.mvps-image

log() { printf '[sustained %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=common.sh
. "$HERE/common.sh"

for t in fio nbdkit nbdinfo jq ss bc; do command -v $t >/dev/null || die "$t is missing (see run.sh)"; done

if [ -n "${MVPS_BIN_DIR:-}" ]; then
    BIN=$MVPS_BIN_DIR
else
    log "building (release)"
    (cd "$ROOT" && cargo build --release -q --workspace --bins)
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
fi
[ -x "$BIN/mvps-te" ] && [ -x "$BIN/mvpsctl" ] || die "no mvps-te/mvpsctl in $BIN"
GC_BIN=
[ -x "$BIN/mvps-s3-gc" ] && GC_BIN=$BIN/mvps-s3-gc

TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/mvps-sustained.XXXXXX")
OUT=${BENCH_OUT:-$TMP/out}
mkdir -p "$OUT"
PIDS=()
cleanup() {
    stop_all
    rm -rf "$TMP/mvps" "$TMP"/*.img
    [ "$OUT" = "$TMP/out" ] || rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM


# The block device under TMP, for /proc/diskstats (a partition's parent counts the same).
DEV=$(basename "$(df --output=source "$TMP" | tail -1)")
sectors_written() { awk -v d="$DEV" '$3==d {print $10}' /proc/diskstats; }
[ -n "$(sectors_written)" ] || die "no /proc/diskstats line for $DEV"
free_gb() { df --output=avail -BG "$TMP" | tail -1 | tr -dc 0-9; }

NBDKIT_PORT=$(free_port)
MVPS_PORT=$(free_port)
SEQ_BYTES=$(numfmt --from=iec "$SEQ_SIZE")
SIZE_BYTES=$(numfmt --from=iec "$SUSTAIN_SIZE")

start_nbdkit() { # size
    rm -f "$TMP/nbdkit.img"
    truncate -s "$1" "$TMP/nbdkit.img"
    nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$NBDKIT_PORT" file "$TMP/nbdkit.img" >"$OUT/nbdkit.log" 2>&1 &
    NBDKIT_PID=$!
    PIDS+=($NBDKIT_PID)
    wait_ready "nbd://127.0.0.1:$NBDKIT_PORT" nbdkit
}
stop_nbdkit() { kill "$NBDKIT_PID"; wait "$NBDKIT_PID" 2>/dev/null || true; rm -f "$TMP/nbdkit.img"; }

start_mvps() { # size -> sets MVPS_URI
    rm -rf "$TMP/mvps"
    mkdir -p "$TMP/mvps"
    MVPS_TE_JWT_SECRET=$SECRET "$BIN/mvps-te" --listen "127.0.0.1:$MVPS_PORT" --data-dir "$TMP/mvps" \
        >"$OUT/mvps-te-$JOB.log" 2>&1 &
    MVPS_PID=$!
    PIDS+=($MVPS_PID)
    local tok
    tok=$(MVPS_TE_JWT_SECRET=$SECRET "$BIN/mvpsctl" token --image-id $IMAGE --size "$1" --ttl 1d)
    MVPS_URI="nbd://127.0.0.1:$MVPS_PORT/$tok"
    wait_ready "$MVPS_URI" mvps-te
}
stop_mvps() { kill "$MVPS_PID"; wait "$MVPS_PID" 2>/dev/null || true; }
inspect() { "$BIN/mvpsctl" inspect --image-id $IMAGE --image-store-local-path "$TMP/mvps/image-store" 2>/dev/null || echo '{}'; }
# mvps has paid its debt when the session closed as idle (checkpointed, compacted).
wait_mvps_idle() {
    local t0=$SECONDS
    until grep -E "image $IMAGE: (took over|resumed|idle, closed)" "$OUT/mvps-te-$JOB.log" | tail -n 1 | grep -q "idle, closed"; do
        [ $((SECONDS - t0)) -lt 900 ] || die "mvps-te did not settle within 900 s"
        sleep 1
    done
    echo $((SECONDS - t0))
}

# Samples every 10 s while fio runs: mvps debt, RSS, blobs size, free space; stops fio if the
# disk runs low. Writes $OUT/samples-$JOB.jsonl.
sampler() { # fio-pid server
    local fio=$1 srv=$2 t0=$SECONDS n=0
    while kill -0 "$fio" 2>/dev/null; do
        sleep 1
        n=$((n + 1))
        if [ $(( $(free_gb) )) -lt "$FLOOR_GB" ]; then
            log "free space below ${FLOOR_GB} GB: stopping fio (the result says so)"
            echo '{"stopped_low_disk":true}' >>"$OUT/samples-$JOB-$srv.jsonl"
            kill "$fio" 2>/dev/null || true
            return
        fi
        [ $((n % 10)) = 0 ] || continue
        if [ "$srv" = mvps ]; then
            local rss blobs
            # (No blobs directory before the first checkpoint.)
            rss=$(awk '/VmRSS/{print $2}' "/proc/$MVPS_PID/status" || true)
            blobs=$(du -sb "$TMP/mvps/image-store/blobs" 2>/dev/null | cut -f1 || true)
            inspect | jq -c --argjson t $((SECONDS - t0)) --argjson rss "${rss:-0}" --argjson blobs "${blobs:-0}" \
                '. + {t: $t, rss_kb: $rss, blobs_bytes: $blobs}' >>"$OUT/samples-$JOB-$srv.jsonl"
        fi
    done
}

gc_loop() { # runs the collector every GC_INTERVAL s until killed
    while sleep "$GC_INTERVAL"; do
        MVPS_MIN_BLOB_AGE_SECS=${GC_MIN_BLOB_AGE_SECS:-30} "$GC_BIN" --image-store-local-path "$TMP/mvps/image-store" \
            --threshold-inactive-days 0 --threshold-inactive-count 1 --manifest-retention 0s --json \
            >>"$OUT/gc-$JOB.jsonl" 2>>"$OUT/gc-$JOB.log" || true
    done
}

run_job() { # srv uri fio-args...
    local srv=$1 uri=$2; shift 2
    local w0 t0
    w0=$(sectors_written)
    t0=$(date +%s.%N)
    fio --name=sustain --ioengine=nbd --uri="$uri" --group_reporting --output-format=json \
        --output="$OUT/$JOB-$srv.json" --write_iops_log="$OUT/$JOB-$srv" --log_avg_msec=1000 "$@" \
        >/dev/null 2>"$OUT/$JOB-$srv.stderr" &
    local fio=$!
    local gc=
    if [ "$srv" = mvps ] && [ -n "$GC_BIN" ]; then gc_loop & gc=$!; fi
    sampler "$fio" "$srv"
    wait "$fio" || log "fio on $srv: $(tail -2 "$OUT/$JOB-$srv.stderr")"
    local t1 settle=0
    t1=$(date +%s.%N)
    if [ "$srv" = mvps ]; then
        settle=$(wait_mvps_idle)
        RSS_END=$(awk '/VmRSS/{print $2}' "/proc/$MVPS_PID/status")
        RSS_PEAK=$(awk '/VmHWM/{print $2}' "/proc/$MVPS_PID/status")
        FINAL=$(inspect)
    fi
    [ -z "$gc" ] || { kill "$gc"; wait "$gc" 2>/dev/null || true; }
    sync
    local w1
    w1=$(sectors_written)
    DISK_BYTES=$(( (w1 - w0) * 512 ))
    CLIENT_BYTES=$(jq '.jobs[0].write.io_bytes' "$OUT/$JOB-$srv.json")
    SECS=$(echo "$t1 - $t0" | bc)
    SETTLE=$settle
}

row() { # srv
    local j="$OUT/$JOB-$1.json"
    local iops mbs p99 maxms wa
    iops=$(jq '.jobs[0].write.iops' "$j")
    mbs=$(echo "scale=1; $CLIENT_BYTES / $SECS / 1000000" | bc)
    p99=$(jq '.jobs[0].write.clat_ns.percentile["99.000000"] / 1000000' "$j")
    maxms=$(jq '.jobs[0].write.clat_ns.max / 1000000' "$j")
    wa=$(echo "scale=2; $DISK_BYTES / $CLIENT_BYTES" | bc)
    printf '%s\t%s\t%.0f\t%s\t%.1f\t%.0f\t%s\t%s\n' "$JOB" "$1" "$iops" "$mbs" "$p99" "$maxms" "$wa" "$SETTLE" | tee -a "$OUT/table.tsv"
}

count() { grep -cE "$1" "$OUT/mvps-te-$JOB.log" || true; } # (grep -c exits 1 on none)

per_minute() { # srv: IOPS per minute from the 1 s iops log
    awk -F, '{m=int($1/60000); s[m]+=$2; n[m]++} END{for(i=0;i in s;i++) printf "%d%s", s[i]/n[i], (i+1 in s ? " " : "\n")}' \
        "$OUT/$JOB-$1_iops.1.log"
}

printf 'job\tserver\tIOPS\tMB/s(incl. flush)\tp99 ms\tmax ms\tdisk bytes/client bytes\tsettle s\n' | tee "$OUT/table.tsv"
for JOB in $JOBS; do
    case $JOB in
        rand)
            args=(--rw=randwrite --bs=4k --iodepth=32 --size="$SIZE_BYTES" --time_based --runtime="$SUSTAIN_SECONDS")
            [ "$SUSTAIN_PATTERN" = repeats ] && args+=(--norandommap --randrepeat=0)
            size=$SIZE_BYTES ;;
        seq)
            args=(--rw=write --bs=1M --iodepth=8 --size="$SEQ_BYTES" --end_fsync=1)
            size=$SEQ_BYTES ;;
        *) die "unknown job $JOB" ;;
    esac
    log "$JOB: nbdkit"
    start_nbdkit "$size"
    run_job nbdkit "nbd://127.0.0.1:$NBDKIT_PORT" "${args[@]}"
    row nbdkit
    [ "$JOB" = rand ] && echo "  nbdkit IOPS per minute: $(per_minute nbdkit)" | tee -a "$OUT/table.tsv"
    stop_nbdkit
    log "$JOB: mvps-te"
    start_mvps "$size"
    run_job mvps "$MVPS_URI" "${args[@]}"
    row mvps
    {
        [ "$JOB" = rand ] && echo "  mvps IOPS per minute: $(per_minute mvps)"
        echo "  mvps end: $FINAL"
        echo "  mvps RSS: end $((RSS_END / 1024)) MiB, peak $((RSS_PEAK / 1024)) MiB"
        if [ -s "$OUT/samples-$JOB-mvps.jsonl" ]; then
            jq -s -r '"  mvps worst sample: layers \(map(.layers // 0) | max), read depth \(map(.read_depth // 0) | max), stored/live \(map(if (.live_bytes // 0) > 0 then .stored_bytes / .live_bytes else 0 end) | max * 100 | round / 100), RSS \(map(.rss_kb // 0) | max / 1024 | round) MiB, blobs dir peak \(map(.blobs_bytes // 0) | max / 1073741824 * 10 | round / 10) GiB\(if any(.stopped_low_disk) then ", STOPPED: disk low" else "" end)"' \
                "$OUT/samples-$JOB-mvps.jsonl"
        fi
        [ -z "$GC_BIN" ] || echo "  collector passes: $(grep -c "^{" "$OUT/gc-$JOB.jsonl" 2>/dev/null || echo 0)"
        # Layer bytes: checkpoint pages (4 KiB) plus what merges wrote.
        # (grep finds nothing when nothing was merged: not an error.)
        ck=$( (grep -oE "checkpoint: [0-9]+ pages" "$OUT/mvps-te-$JOB.log" || true) | awk '{s+=$2} END{printf "%.0f", s*4096}')
        mg=$( (grep -oE "\([0-9]+ MiB written" "$OUT/mvps-te-$JOB.log" || true) | tr -d '(' | awk '{s+=$1} END{printf "%.0f", s*1048576}')
        echo "  layer bytes / client bytes: $(echo "scale=2; ($ck + $mg) / $CLIENT_BYTES" | bc) (checkpoints $(echo "scale=2; $ck / $CLIENT_BYTES" | bc), merges $(echo "scale=2; $mg / $CLIENT_BYTES" | bc))"
        echo "  compaction steps: $(count "compaction:")"
        echo "  checkpoints: $(count ": checkpoint: ")"
        echo "  pacing episodes: $(count "writes (stalled|slowed)")"
    } | tee -a "$OUT/table.tsv"
    stop_mvps
    rm -rf "$TMP/mvps"
done
log "results in $OUT/table.tsv"
