#!/usr/bin/env python3
"""Summarizes a `perf record --call-graph dwarf` profile of mvps-te by what the CPU did.

    perf script -i perf-rand-read-mvps-1.data | python3 conformance/bench/perf-categories.py

Each sample goes to the first category (in the order below) that matches any frame of its
stack, so e.g. CRC work inside a checkpoint counts as CRC, not as checkpoint.
"""
import collections
import re
import sys

CATEGORIES = [
    ("fdatasync (WAL flush)", r"fdatasync|sync_data"),
    ("crc32c (software, crc crate)", r"crc::crc32|crc32c"),
    ("compaction", r"compaction|compact_step"),
    ("WAL rewrite (checkpoint)", r"maybe_rewrite_wal"),
    ("layer write (checkpoint)", r"upload_layer|write_layer"),
    ("socket send (reply)", r"__libc_send|sendto|sendmsg"),
    ("socket recv (request/payload)", r"__libc_recv|recvfrom"),
    ("WAL append (writev)", r"WalFile::append|writev"),
    ("pread (WAL/layer data)", r"pread64|read_exact_at|read_at"),
    ("futex / thread handoff", r"futex|lock_contended|Condvar|Parker|mpmc|threadpool::ThreadPool::execute"),
    ("page faults / memset / malloc", r"exc_page_fault|memset|malloc|_int_free|cfree|realloc|clear_page"),
    ("extent index (BTreeMap)", r"btree|ExtentMap|gaps|resolve"),
]


def main():
    comp = [(n, re.compile(p)) for n, p in CATEGORIES]
    counts = collections.Counter()
    total = 0
    stack = []

    def flush():
        nonlocal total
        if not stack:
            return
        total += 1
        for name, pat in comp:
            if any(pat.search(f) for f in stack):
                counts[name] += 1
                return
        counts["other (scheduler, idle, misc)"] += 1

    for line in sys.stdin:
        if not line.strip():
            flush()
            stack.clear()
            continue
        if line[0] in "\t ":
            parts = line.strip().split(None, 1)
            if len(parts) == 2:
                stack.append(parts[1])
    flush()
    print(f"{total} samples")
    for name, n in counts.most_common():
        print(f"  {100 * n / max(total, 1):5.1f}%  {name}")


if __name__ == "__main__":
    main()
