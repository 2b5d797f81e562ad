#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The end-to-end run behind `make run`: a chat server and 500 chat clients.
#
#   tools/run-main.sh [BUILD_DIR]        (default: build)
#
# 1. starts BUILD_DIR/cport-server in chat mode on 127.0.0.1 with a free port
#    (--port 0; the port is read back from its "listening on" line), with its
#    metrics on another free port (--metrics 127.0.0.1:0): the live page's
#    address is printed, and it is up while the run lasts;
# 2. runs BUILD_DIR/cport-dummy: 500 sessions, each sending one 64-byte chat
#    packet per second for 10 s, all of them verified by every session
#    (250,000 deliveries per second), with a progress line each second:
#    sessions, packets out/in per second, p99 delivery latency, server memory;
# 3. stops the server with SIGTERM; it must exit 0 within 3 s;
# 4. prints a summary. Exit status 0 only if the dummy and the server both
#    succeeded. Every step is bounded in time, and the server is killed if
#    this script ends early for any reason.
set -u

BUILD=${1:-build}
SERVER=$BUILD/cport-server
DUMMY=$BUILD/cport-dummy
SESSIONS=500
DURATION=10
STARTUP_TIMEOUT=5     # seconds for the server to print its listening line
DUMMY_TIMEOUT=60      # connect (<= 10) + send (10) + drain (<= 2) + stop, with margin
STOP_TIMEOUT=3        # seconds the server may take to exit after SIGTERM

for prog in "$SERVER" "$DUMMY"; do
    if [ ! -x "$prog" ]; then
        echo "run-main: $prog not found; build first (cmake --build $BUILD)" >&2
        exit 1
    fi
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cport-run.XXXXXX")
server_pid=""
dummy_pid=""
# On any exit: ask the children still running to stop, give them a moment,
# then kill them, so that nothing outlives this script.
# shellcheck disable=SC2317  # (called through the EXIT trap)
cleanup() {
    local pid running=()
    for pid in $dummy_pid $server_pid; do
        kill -TERM "$pid" 2>/dev/null && running+=("$pid")
    done
    for _ in $(seq 40); do
        local alive=0
        for pid in "${running[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [ "$alive" -eq 0 ] && break
        sleep 0.05
    done
    for pid in "${running[@]}"; do
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'echo "run-main: interrupted" >&2; exit 130' INT TERM

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# --- 1. server -------------------------------------------------------------
# stdout (the listening line and the final stats line) goes to a file we
# parse; stderr (log messages) goes straight to the terminal.
"$SERVER" --host 127.0.0.1 --port 0 --mode chat --metrics 127.0.0.1:0 >"$tmp/server.out" &
server_pid=$!

port=""
deadline=$(( $(date +%s) + STARTUP_TIMEOUT ))
while [ -z "$port" ]; do
    port=$(sed -n 's/^cport-server listening on .*:\([0-9][0-9]*\) mode=.*/\1/p' "$tmp/server.out")
    [ -n "$port" ] && break
    if ! kill -0 "$server_pid" 2>/dev/null; then
        wait "$server_pid"; rc=$?
        echo "run-main: cport-server exited with status $rc before listening" >&2
        server_pid=""
        exit 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "run-main: cport-server did not start listening within ${STARTUP_TIMEOUT}s" >&2
        exit 1
    fi
    sleep 0.05
done
head -n 1 "$tmp/server.out"
# The metrics line is printed with the listening line, in the same write.
page=$(sed -n 's|^cport-server: metrics on \(http://[^ ]*\) .*|\1|p' "$tmp/server.out")
if [ -n "$page" ]; then
    echo "run-main: live metrics page: $page (Prometheus: ${page}metrics), up while the run lasts"
fi

# --- 2. dummy clients ------------------------------------------------------
# Progress lines arrive on stderr, live; the RESULT line on stdout is kept.
# Run in the background and wait for it: bash runs a trap (Ctrl-C, SIGTERM)
# only after a foreground command ends, but interrupts `wait` at once.
timeout -k 5 "$DUMMY_TIMEOUT" "$DUMMY" --host 127.0.0.1 --port "$port" --mode chat \
    --sessions "$SESSIONS" --rate 1 --size 64 --duration "$DURATION" \
    --server-pid "$server_pid" >"$tmp/dummy.out" &
dummy_pid=$!
wait "$dummy_pid"; dummy_rc=$?
dummy_pid=""
if [ "$dummy_rc" -eq 124 ] || [ "$dummy_rc" -eq 137 ]; then
    echo "run-main: cport-dummy did not finish within ${DUMMY_TIMEOUT}s" >&2
fi

# --- 3. graceful server stop ----------------------------------------------
server_rc=""
stop_start=$(now)
if kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid"
    deadline=$(awk -v t="$stop_start" -v d="$STOP_TIMEOUT" 'BEGIN { printf "%.3f", t + d }')
    while kill -0 "$server_pid" 2>/dev/null &&
          awk -v n="$(now)" -v d="$deadline" 'BEGIN { exit !(n < d) }'; do
        sleep 0.02
    done
    if kill -0 "$server_pid" 2>/dev/null; then
        echo "run-main: cport-server still running ${STOP_TIMEOUT}s after SIGTERM; killing it" >&2
        kill -KILL "$server_pid" 2>/dev/null
    fi
fi
wait "$server_pid"; server_rc=$?
stop_time=$(elapsed "$stop_start" "$(now)")
server_pid=""

# --- 4. summary ------------------------------------------------------------
result=$(grep '^RESULT ' "$tmp/dummy.out" || true)
stats=$(grep '^cport-server stopped' "$tmp/server.out" || true)
echo
echo "== run-main summary =="
echo "dummy : exit $dummy_rc  ${result:-no RESULT line}"
echo "server: exit $server_rc, stopped ${stop_time}s after SIGTERM"
echo "        ${stats:-no final stats line}"
if [ "$dummy_rc" -eq 0 ] && [ "$server_rc" -eq 0 ]; then
    echo "run-main: PASS"
    exit 0
fi
echo "run-main: FAIL"
exit 1
