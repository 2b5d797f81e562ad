#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# bus.sh — the bus's publishing beside the minimal pipelined NATS publisher
# (bench/peers/nats_pub.c), against one nats-server pinned to CPU 0, the
# publishers pinned to CPU 1, alternating (A B C, C B A, ...).
#
#   bench/bus.sh [BUILD_DIR] [ROUNDS] [SIZE] [COUNT]   (defaults: build, 5, 64, 1000000)
#
# Contenders: nats_pub; bench_bus publishing from its worker; bench_bus
# publishing from a thread of its own; each on the backend CP_BACKEND names
# (default: the library's choice). Prints every run and, per contender, the
# median messages a second and its ratio to nats_pub's median.
set -u
BUILD=${1:-build}
ROUNDS=${2:-5}
SIZE=${3:-64}
COUNT=${4:-1000000}
NATS=$(command -v nats-server || echo /usr/sbin/nats-server)
port=$((20000 + RANDOM % 20000))
taskset -c 0 "$NATS" -a 127.0.0.1 -p "$port" >/dev/null 2>&1 &
nats=$!
trap 'kill $nats 2>/dev/null; wait $nats 2>/dev/null' EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
backend=()
[ -n "${CP_BACKEND:-}" ] && backend=(--backend "$CP_BACKEND")
names=(nats_pub bus_worker bus_thread)
cmds=("$BUILD/nats_pub --port $port --count $COUNT --size $SIZE"
      "$BUILD/bench_bus --port $port --count $COUNT --size $SIZE --from worker ${backend[*]}"
      "$BUILD/bench_bus --port $port --count $COUNT --size $SIZE --from thread ${backend[*]}")
declare -A rates
for r in $(seq "$ROUNDS"); do
    order=(0 1 2)
    [ $((r % 2)) -eq 0 ] && order=(2 1 0)
    for i in "${order[@]}"; do
        line=$(taskset -c 1 ${cmds[i]} | grep '^RESULT')
        rate=$(sed -n 's/.*msgs_per_s=\([0-9]*\).*/\1/p' <<<"$line")
        echo "round $r ${names[i]}: $line"
        rates[$i]+="$rate "
    done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
base=$(median <<<"${rates[0]}")
for i in 0 1 2; do
    m=$(median <<<"${rates[$i]}")
    echo "median ${names[i]}: $m msgs/s ($(awk -v a="$m" -v b="$base" 'BEGIN { printf "%.2f", a / b }')x nats_pub; runs: ${rates[$i]})"
done
