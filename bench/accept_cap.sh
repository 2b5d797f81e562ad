#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# accept_cap.sh — cport-server's accept-rate cap under a connect storm.
#
#   bench/accept_cap.sh [BUILD_DIR] [ROUNDS]     (defaults build, 3)
#
# Each round runs two servers, in alternating order: A without a cap, B with
# --accept-rate RATE (200). bench/storm churns connections against each
# (--mode connect, 2 processes, as fast as they go, 5 s) while 20 neighbours
# echo every 10 ms. Per server: the connects the storm made, the sessions the
# server connected and refused (its final line), the neighbours' p99 round
# trip, and the server's CPU per storm connect. B must connect at most the
# neighbours + the burst (RATE) + RATE a second of the run: the cap holds.
set -u
here=$(cd "$(dirname "$0")" && pwd)
ME=accept_cap.sh
# shellcheck source=lib.sh
. "$here/lib.sh"
bench_args "$@"
need_built "" cport-server storm
LOG=$(mktemp -d /tmp/cport-acceptcap.XXXXXX)
T0=$(date +%s)
port=21000
RATE=${RATE:-200}
DUR=5
trap_cleanup
names=("A-nocap" "B-rate$RATE")
flags=("" "--accept-rate $RATE")
declare -A connected refused p99 us
for r in $(seq 1 "$ROUNDS"); do
    for i in $(order "$r" 2); do
        n=${names[$i]}
        start_server "$n.$r" "$B/cport-server --host 127.0.0.1 --port {PORT} --workers 1 --mode echo --max-sessions 20000 ${flags[$i]}" || continue
        c0=$(cpu_ticks "$SPID")
        t0=$(date +%s.%N)
        res=$(taskset -c "$LCPU" "$B/storm" --port "$P" --mode connect --procs 2 --neighbours 20 --duration "$DUR" 2>"$LOG/$n.$r.storm.log" | tail -1)
        secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
        c1=$(cpu_ticks "$SPID")
        stop_server
        fin=$(tail -1 "$LOG/$n.$r.server.log")
        conn=$(kv connected "$fin")
        ref=$(echo "$fin" | sed -n 's/.*accept rate=\([0-9]*\).*/\1/p')
        cpu=$(awk -v a="$c0" -v b="$c1" -v hz="$(getconf CLK_TCK)" -v c="$(kv connects "$res")" \
            'BEGIN { if (c + 0 == 0) print "nan"; else printf "%.1f\n", (b - a) / hz * 1e6 / c }')
        echo "$ME: round $r $n: storm $(kv connects "$res") connects in ${secs}s, server connected $conn refused ${ref:-0}, neighbours p99 $(kv p99_us "$res") us, server ${cpu} us per storm connect"
        connected[$n]+="$conn " refused[$n]+="${ref:-0} " p99[$n]+="$(kv p99_us "$res") " us[$n]+="$cpu "
        if [ "$i" = 1 ] && [ "$conn" -gt $((20 + RATE + RATE * (DUR + 1))) ]; then
            fail "$n: $conn sessions connected, above 20 + $RATE + $RATE/s"
        fi
    done
done
for n in "${names[@]}"; do
    echo "$ME: $n medians: connected $(echo "${connected[$n]}" | tr ' ' '\n' | median %.0f)," \
        "refused $(echo "${refused[$n]}" | tr ' ' '\n' | median %.0f)," \
        "neighbours p99 $(echo "${p99[$n]}" | tr ' ' '\n' | median %.0f) us," \
        "server $(echo "${us[$n]}" | tr ' ' '\n' | median %.1f) us per storm connect"
done
echo "$ME: logs: $LOG ($(elapsed) s)"
exit "$FAILED"
