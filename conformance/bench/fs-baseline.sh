#!/usr/bin/env bash
# conformance/bench/fs-baseline.sh — what the local filesystem itself does for the two write
# patterns the servers use: nbdkit file overwrites blocks in place; the mvps WAL appends to a
# growing file. Plain fio on a file (no NBD, no server), ~1 minute, in BENCH_TMPDIR (/tmp).
#
#   1. buffered 1 MiB writes: overwrite a resident 2 GiB file vs append to a new file
#   2. 4 KiB writes + fdatasync after each: overwrite an allocated file vs append
#
# Prints one line per case. Used by docs/PERFORMANCE.md to explain the WAL's costs.
set -euo pipefail
command -v fio >/dev/null && command -v jq >/dev/null || {
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq fio jq >/dev/null
}
DIR=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/mvps-fsbase.XXXXXX")
trap 'rm -rf "$DIR"' EXIT
f() { fio --name=b --output-format=json "$@" 2>/dev/null; }

f --filename="$DIR/ow" --size=2G --rw=write --bs=1M --end_fsync=1 >/dev/null
f --filename="$DIR/ow" --size=2G --rw=write --bs=1M --time_based --runtime=8 |
    jq -r '"buffered 1M, overwrite resident 2G file: \(.jobs[0].write.bw_bytes / 1e6 | floor) MB/s"'
f --filename="$DIR/ap" --size=6G --rw=write --bs=1M --runtime=8 |
    jq -r '"buffered 1M, append to a new file:       \(.jobs[0].write.bw_bytes / 1e6 | floor) MB/s"'
rm -f "$DIR/ap"
sync

f --filename="$DIR/ow" --size=256M --rw=write --bs=4k --fdatasync=1 --io_size=40M |
    jq -r '"4k write + fdatasync, overwrite allocated: \(.jobs[0].write.iops | floor) IOPS, fdatasync \(.jobs[0].sync.lat_ns.mean / 1000 | floor) µs"'
f --filename="$DIR/ap" --size=256M --rw=write --bs=4k --fdatasync=1 --io_size=40M |
    jq -r '"4k write + fdatasync, append (file grows):  \(.jobs[0].write.iops | floor) IOPS, fdatasync \(.jobs[0].sync.lat_ns.mean / 1000 | floor) µs"'
