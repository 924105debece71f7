# conformance/bench/common.sh — helpers the bench scripts share (sourced, not run).
# Callers define log() and die(), and keep the processes they start in the array PIDS.

# A free TCP port on 127.0.0.1.
free_port() {
    local p
    for _ in $(seq 1 100); do
        p=$((20000 + RANDOM % 30000))
        if ! ss -Htln "sport = :$p" | grep -q .; then echo "$p"; return; fi
    done
    die "no free port"
}

# Waits until an NBD server answers at URI: wait_ready URI WHAT
wait_ready() {
    for _ in $(seq 1 100); do
        nbdinfo --size "$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$2 did not come up"
}

# Stops (and reaps) every process in PIDS.
stop_all() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
