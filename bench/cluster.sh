#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# cluster.sh — one chat room of 600 clients at 1 packet/s (360,000
# deliveries a second), on one cport-server, and over 3 cport-servers joined
# by a NATS bus (200 clients each, tools/run-cluster.sh), alternating.
#
#   bench/cluster.sh [BUILD_DIR] [ROUNDS]      (defaults: build, 3)
#
# For each: the servers' CPU per delivery (user + system from /proc, summed
# over the servers, divided by the deliveries the dummies verified) and the
# dummies' p99 delivery latency. Everything shares this machine's CPUs (no
# pinning: three servers, a broker and three dummies on two cores), so the
# numbers say what the bus costs beside one server, not what a cluster of
# machines would do. Prints one line per run and the medians.
set -u
BUILD=${1:-build}
ROUNDS=${2:-3}
CLIENTS=600 DURATION=10
one_rows=() three_rows=()

median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
field() { sed -n "s/.*[ ,]$1=\([^ ,]*\).*/\1/p" <<<"$2"; }

run_one() {
    local out port pid ticks result cpu p99
    out=$(mktemp)
    "$BUILD/cport-server" --mode chat --host 127.0.0.1 --port 0 --rate-limit 0 >"$out" 2>&1 &
    pid=$!
    for _ in $(seq 100); do grep -q 'listening on' "$out" && break; sleep 0.05; done
    port=$(sed -n 's/.*listening on [^ ]*:\([0-9]*\) .*/\1/p' "$out")
    result=$("$BUILD/cport-dummy" --mode chat --port "$port" --sessions $CLIENTS --rate 1 \
        --duration $DURATION --quiet 2>/dev/null | grep '^RESULT ')
    ticks=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
    kill -INT "$pid"; wait "$pid" 2>/dev/null; rm -f "$out"
    cpu=$(awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" -v n="$(field received "$result")" \
        'BEGIN { printf "%.3f", t / hz * 1e6 / n }')
    p99=$(field p99_ms "$result")
    echo "one server:    cpu_us_per_delivery=$cpu p99_ms=$p99 ($(field received "$result")/$(field expected "$result"))"
    one_rows+=("$cpu $p99")
}

run_three() {
    local line cpu p99
    line=$(SESSIONS=$((CLIENTS / 3)) RATE=1 DURATION=$DURATION tools/run-cluster.sh "$BUILD" nats 2>/dev/null |
        grep '^run-cluster: \(PASS\|FAIL\)')
    cpu=$(field server_cpu_us_per_delivery "$line")
    p99=$(sed -n 's/.* p99=\([0-9.]*\)ms.*/\1/p' <<<"$line")
    echo "three servers: cpu_us_per_delivery=$cpu p99_ms=$p99 (${line%%:*}: $(cut -c1-60 <<<"${line#run-cluster: }"))"
    three_rows+=("$cpu $p99")
}

for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) -eq 1 ]; then run_one; run_three; else run_three; run_one; fi
done
printf '%s\n' "${one_rows[@]}" >/tmp/cluster.one.$$
printf '%s\n' "${three_rows[@]}" >/tmp/cluster.three.$$
echo "median one server:    cpu_us_per_delivery=$(cut -d' ' -f1 /tmp/cluster.one.$$ | median) p99_ms=$(cut -d' ' -f2 /tmp/cluster.one.$$ | median)"
echo "median three servers: cpu_us_per_delivery=$(cut -d' ' -f1 /tmp/cluster.three.$$ | median) p99_ms=$(cut -d' ' -f2 /tmp/cluster.three.$$ | median)"
rm -f /tmp/cluster.one.$$ /tmp/cluster.three.$$
