#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# metrics.sh — what metrics cost cport-server in chat 1000 (issue 19: at most 2%).
#
#   bench/metrics.sh [BUILD_DIR] [ROUNDS]     (defaults: build, 5)
#   BASE_SERVER=PATH bench/metrics.sh ...     adds a cport-server built without
#                                             the metrics counters as the baseline
#
# The load: loadgen --mode chat --conns 1000 --rate 1 --size 64 --duration 5
# --drain 10 (each packet to all 1000: a million deliveries a second), on
# CPU 1, against cport-server --mode chat --workers 1 on CPU 0. Contenders,
# alternated (A B C, C B A, ...):
#   base  BASE_SERVER (if given): the library before the metrics counters
#   off   BUILD_DIR's cport-server: counters on (always), no endpoint
#   on    the same with --metrics, /metrics fetched every second during the
#         load (by bash on CPU 1: the fetch's own cost is the client's)
# The figure is the server's CPU microseconds per delivery over the load
# window (loadgen --server-pid: srv_us_per_msg). Prints every run, then per
# contender the median and its ratio to the first contender's median.
set -u
here=$(cd "$(dirname "$0")" && pwd)
ME=metrics.sh
# shellcheck source=lib.sh
. "$here/lib.sh"
bench_args "${1:-build}" "${2:-5}"
need_built "" cport-server loadgen
LOG=$(mktemp -d /tmp/cport-bench-metrics.XXXXXX)
T0=$(date +%s)
port=$((20000 + RANDOM % 20000))
trap_cleanup
LOAD="--mode chat --conns 1000 --rate 1 --size 64 --duration 5 --drain 10"

names=() cmds=()
if [ -n "${BASE_SERVER:-}" ]; then
    names+=(base)
    cmds+=("$BASE_SERVER --host 127.0.0.1 --port {PORT} --mode chat --workers 1")
fi
names+=(off on)
cmds+=("$B/cport-server --host 127.0.0.1 --port {PORT} --mode chat --workers 1"
    "$B/cport-server --host 127.0.0.1 --port {PORT} --mode chat --workers 1 --metrics 127.0.0.1:{WSPORT}")

# GET /metrics on port $1 every second until killed; counts the answers.
scrape() {
    local n=0
    while :; do
        if exec 3<>"/dev/tcp/127.0.0.1/$1"; then
            printf 'GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
            cat <&3 >/dev/null
            exec 3<&-
            n=$((n + 1))
            echo "$n" >"$LOG/scrapes"
        fi
        sleep 1
    done
}

# one NAME CMD: a run; appends the server's us per delivery to US[NAME].
declare -A US
one() {
    local name=$1 log=$LOG/$1.$2.loadgen.log spid_scr="" rl us
    start_server "$name" "$3" || return 1
    if [ -n "$WP" ]; then
        rm -f "$LOG/scrapes"
        taskset -c "$LCPU" bash -c "$(declare -f scrape); LOG=$LOG; scrape $WP" &
        spid_scr=$!
        track "$spid_scr"
    fi
    # shellcheck disable=SC2086
    timeout -k 5 120 taskset -c "$LCPU" "$B/loadgen" $LOAD --port "$P" --server-pid "$SPID" >"$log" 2>&1 </dev/null
    local rc=$?
    if [ -n "$spid_scr" ]; then
        kill "$spid_scr" 2>/dev/null
        wait "$spid_scr" 2>/dev/null
        forget "$spid_scr"
    fi
    stop_server
    rl=$(grep '^RESULT ' "$log" | tail -1)
    us=$(kv srv_us_per_msg "$rl")
    if [ $rc -ne 0 ] || [ -z "$us" ]; then
        fail "$name: loadgen exit $rc (see $log)"
        return 1
    fi
    US[$name]+="$us "
    printf '%-5s round %s: %s us/delivery, deliveries=%s lost=%s%s\n' "$name" "$2" "$us" \
        "$(kv deliveries "$rl")" "$(kv lost "$rl")" \
        "$([ -n "$spid_scr" ] && echo ", scrapes=$(cat "$LOG/scrapes" 2>/dev/null || echo 0)")"
}

for r in $(seq "$ROUNDS"); do
    for i in $(order "$r" "${#names[@]}"); do
        one "${names[i]}" "$r" "${cmds[i]}"
    done
done
first=$(tr ' ' '\n' <<<"${US[${names[0]}]:-}" | median %.4f)
for n in "${names[@]}"; do
    m=$(tr ' ' '\n' <<<"${US[$n]:-}" | median %.4f)
    printf 'median %-5s %s us/delivery (%s x %s; runs: %s)\n' "$n" "$m" "$(div "$m" "$first")" "${names[0]}" "${US[$n]:-}"
done
echo "logs: $LOG"
exit "$FAILED"
