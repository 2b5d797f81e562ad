#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# ws_reference_check.sh — the WebSocket test peers against the reference
# server (npm ws, as tests/ws_peer.js server runs it), to check the peers
# themselves: the client modes of tests/ws_peer.js, tests/ws_probe.js against
# tests/ws_probe.expected, and headless Chromium (tests/ws_browser.js) on
# tools/ws_chat.html (?check=100), each over ws:// and wss://.
#
#   tests/ws_reference_check.sh [--no-browser]
#
# Needs node with tests/node installed and chromium (make test-deps), and
# openssl; --no-browser leaves chromium out. Loopback only; about 20 s. Prints one
# line per check and "N passed, M failed"; exit 0 only if all passed.
set -u
cd "$(dirname "$0")/.." || exit 1

browser=1
[ "${1:-}" = "--no-browser" ] && browser=0

tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

bench/tls_cert.sh "$tmp/cert" >/dev/null || exit 1
ca=$tmp/cert/cert.pem

# server NAME ARGS...: starts a reference server; its port is in $port.
server() {
    local name=$1
    shift
    node tests/ws_peer.js server 0 "$@" >"$tmp/$name.out" 2>&1 &
    pids+=("$!")
    for _ in $(seq 100); do
        port=$(awk '/^LISTENING/ {print $2}' "$tmp/$name.out")
        [ -n "$port" ] && return 0
        sleep 0.05
    done
    echo "the reference server $name did not start:"
    cat "$tmp/$name.out"
    exit 1
}

passed=0
failed=0
# check NAME COMMAND...: runs it, keeps its output, reports its last line.
check() {
    local name=$1
    shift
    local t0=$SECONDS
    if "$@" >"$tmp/check.out" 2>&1; then
        passed=$((passed + 1))
        echo "ok   $name ($((SECONDS - t0)) s): $(tail -n 1 "$tmp/check.out")"
    else
        failed=$((failed + 1))
        echo "FAIL $name:"
        grep -v '^CASE ' "$tmp/check.out" | sed 's/^/     /'
    fi
}

server ws max=4096 page=tools/ws_chat.html
ws=$port
server wss max=4096 page=tools/ws_chat.html cert="$ca" key="$tmp/cert/key.pem"
wss=$port
server chat mode=chat
chat=$port

for scheme in ws wss; do
    if [ $scheme = ws ]; then p=$ws; else p=$wss; fi
    url=$scheme://127.0.0.1:$p/
    check "$scheme burst" node tests/ws_peer.js burst "$url" ca="$ca"
    check "$scheme ping" node tests/ws_peer.js ping "$url" ca="$ca"
    check "$scheme close" node tests/ws_peer.js close "$url" ca="$ca"
    check "$scheme big (1009)" node tests/ws_peer.js big "$url" ca="$ca"
    if [ $scheme = ws ]; then probe_ca=(); else probe_ca=(ca="$ca"); fi
    check "$scheme probe" node tests/ws_probe.js "$p" "${probe_ca[@]}" expect=tests/ws_probe.expected target=reference
done
check "ws chat 50x20" node tests/ws_peer.js chat "ws://127.0.0.1:$chat/" clients=50 packets=20

if [ $browser = 1 ]; then
    check "chromium ws://" node tests/ws_browser.js "http://127.0.0.1:$ws/?check=100"
    check "chromium wss://" node tests/ws_browser.js "https://127.0.0.1:$wss/?check=100" ca="$ca"
fi

echo "$passed passed, $failed failed"
[ $failed = 0 ]
