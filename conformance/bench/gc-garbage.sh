#!/usr/bin/env bash
# Garbage left by mvps-s3-gc under sustained writes (docs/PERFORMANCE.md, *Garbage
# collector*): mvps-te on a local image store takes random 4 KiB writes at a fixed rate
# (fio, QD32) while mvps-s3-gc runs every INTERVAL seconds with prompt thresholds (count 1,
# days 0). After each pass it prints the bytes in blobs/, the bytes the newest manifest
# references, and the difference (garbage). Time is scaled down with the test-only
# MVPS_MIN_BLOB_AGE_SECS (MIN_AGE, also the manifest retention), so the expected steady
# garbage is about (bytes written to blobs per second) x (MIN_AGE + INTERVAL).
# Everything lives in a temp directory, removed at the end.
#
#   conformance/bench/gc-garbage.sh        # RUNTIME=240 MIN_AGE=60 INTERVAL=30 RATE=4m
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

RUNTIME=${RUNTIME:-240}
MIN_AGE=${MIN_AGE:-60}
INTERVAL=${INTERVAL:-30}
RATE=${RATE:-4m}
target=${CARGO_TARGET_DIR:-target}/release
cargo build --release --quiet -p mvps-te -p mvps-s3-gc --bins

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

export MVPS_MIN_BLOB_AGE_SECS=$MIN_AGE MVPS_TE_JWT_SECRET=gc-garbage-bench
port=$((20000 + RANDOM % 20000))
store=$work/data/image-store
image=gcbench.mvps-image
"$target/mvps-te" --listen "127.0.0.1:$port" --data-dir "$work/data" \
  --checkpoint-interval-ms 5000 --log-level warn 2>"$work/mvps-te.log" &
pids+=($!)
sleep 1
tok=$("$target/mvpsctl" token --image-id "$image" --size 256M)
fio --name=gc --ioengine=nbd "--uri=nbd://127.0.0.1:$port/$tok" --rw=randwrite --bs=4k \
  --iodepth=32 --size=256M --norandommap --time_based "--runtime=$RUNTIME" \
  "--rate=,$RATE" --output="$work/fio.out" &
fio_pid=$!
pids+=($fio_pid)

referenced() {
  python3 - "$store/images/$image" <<'EOF'
import json, os, sys
d = sys.argv[1]
names = sorted(n for n in os.listdir(d) if n.endswith(".json")) if os.path.isdir(d) else []
m = json.load(open(os.path.join(d, names[0]))) if names else {"layers": []}
print(sum(l["size_bytes"] for l in m["layers"]))
EOF
}

printf '%6s %12s %14s %12s %10s\n' seconds blobs_MiB referenced_MiB garbage_MiB deleted
start=$SECONDS
while kill -0 "$fio_pid" 2>/dev/null || [ $((SECONDS - start)) -lt $((RUNTIME + 2 * INTERVAL)) ]; do
  sleep "$INTERVAL"
  deleted=$("$target/mvps-s3-gc" --image-store-local-path "$store" --threshold-inactive-days 0 \
    --threshold-inactive-count 1 --manifest-retention "${MIN_AGE}s" --json --log-level warn |
    tail -1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["blobs_deleted"])')
  total=$(find "$store/blobs" -type f -printf '%s\n' 2>/dev/null | awk '{s+=$1} END {print s+0}')
  ref=$(referenced)
  printf '%6d %12.1f %14.1f %12.1f %10s\n' $((SECONDS - start)) \
    "$(echo "$total/1048576" | bc -l)" "$(echo "$ref/1048576" | bc -l)" \
    "$(echo "($total-$ref)/1048576" | bc -l)" "$deleted"
done
grep -E 'WRITE: bw' "$work/fio.out" || true
