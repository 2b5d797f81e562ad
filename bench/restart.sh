#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# restart.sh [BUILD] [ROUNDS] — a rolling restart of cport-server under
# clients that keep connecting (issue 19), from outside, once per backend
# and round:
#
#   1. an old cport-server (--reuseport --drain) listens; rolling opens
#      RESTART_RATE connections a second (default 200), each sending a
#      packet every 250 ms and checking its echoes, held 2 s;
#   2. after 3 s a new cport-server starts on the same port; once it
#      listens, the old one gets SIGTERM and drains (5 s at most);
#   3. rolling stops opening connections after RESTART_SECONDS (default 8)
#      and the new server is stopped once they are done.
#
# Pass: no connect refused, no reset, no echo owed or wrong (rolling's
# refused, reset, stuck, bad_echo all 0), and every session the old server
# still had at the stop ended by the drain: its final line's reasons are
# only "peer closed" (clients whose hold ended) and "service stopping", with
# drain_cut=0 (none cut by the drain's deadline).
#
# Everything runs in a network namespace of the script's own (ip netns;
# root), with net.ipv4.tcp_migrate_req=1 there: connections the kernel queued
# to the old listener when it closes move to the new one. RESTART_MIGRATE=0
# runs without it, to show what it is for. Servers on CPU 0, rolling on
# CPU 1. About 12 s a round.
#
# Environment: RESTART_RATE (200), RESTART_SECONDS (8), RESTART_MIGRATE (1),
# RESTART_BACKENDS ("epoll uring").
set -u

here=$(cd "$(dirname "$0")" && pwd)
ME=restart.sh
# shellcheck source=lib.sh
. "$here/lib.sh"
bench_args "$@"
RATE=${RESTART_RATE:-200}
SECS=${RESTART_SECONDS:-8}
MIGRATE=${RESTART_MIGRATE:-1}
BACKENDS=${RESTART_BACKENDS:-epoll uring}
need_built "" cport-server rolling
need_tools ip taskset timeout
if [ "$(id -u)" != 0 ]; then
    echo "$ME: needs root (ip netns)" >&2
    exit 2
fi

LOG=$(mktemp -d /tmp/cport-restart.XXXXXX)
T0=$(date +%s)
NS=cport_rr$$
trap_cleanup
trap 'kill_tracked; ip netns del $NS 2>/dev/null' EXIT
ip netns add $NS || { echo "$ME: cannot make a network namespace" >&2; exit 2; }
# Not a function: "$IN cmd &" must leave $! the command's own pid (ip netns
# exec execs it), which a function run in the background would not.
IN="ip netns exec $NS"
$IN ip link set lo up
$IN sh -c "echo $MIGRATE > /proc/sys/net/ipv4/tcp_migrate_req" ||
    { echo "$ME: no net.ipv4.tcp_migrate_req (Linux before 5.14)" >&2; exit 2; }
PORT=7790
SRV=("$B/cport-server" --mode packet --workers 2 --port "$PORT" --host 127.0.0.1 --reuseport --drain 5000)

# wait_line FILE TEXT: true once FILE has a line with TEXT (10 s at most).
wait_line() {
    local i
    for ((i = 0; i < 200; i++)); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

declare -A R
bad=0
for ((k = 1; k <= ROUNDS; k++)); do
    for b in $BACKENDS; do
        tag="$b.$k"
        $IN taskset -c $SCPU "${SRV[@]}" --backend "$b" >"$LOG/old.$tag.log" 2>&1 &
        old=$!
        track $old
        wait_line "$LOG/old.$tag.log" "listening on" || { fail "$tag: the old server did not start"; continue; }
        $IN taskset -c $LCPU "$B/rolling" --port $PORT --rate "$RATE" --duration "$SECS" >"$LOG/rolling.$tag.log" 2>&1 &
        load=$!
        track $load
        sleep 3
        $IN taskset -c $SCPU "${SRV[@]}" --backend "$b" >"$LOG/new.$tag.log" 2>&1 &
        new=$!
        track $new
        wait_line "$LOG/new.$tag.log" "listening on" || fail "$tag: the new server did not start"
        kill -TERM $old
        wait $old
        forget $old
        wait $load
        forget $load
        kill -TERM $new
        wait $new
        forget $new
        line=$(grep '^rolling:' "$LOG/rolling.$tag.log")
        fin=$(grep 'stopped after' "$LOG/old.$tag.log")
        reasons=$(echo "$fin" | sed -n 's/.*reasons={\(.*\)}.*/\1/p')
        others=$(echo "$reasons" | tr ',' '\n' | grep -v '^peer closed=\|^service stopping=\|^$' || true)
        stopping=$(echo "$reasons" | tr ',' '\n' | sed -n 's/^service stopping=//p')
        cut=$(kv drain_cut "$fin")
        [ -n "$cut" ] || { fail "$tag: the old server printed no final line"; cut=0; }
        echo "[$(elapsed) s] $tag: $line | old server: reasons={$reasons} drain_cut=$cut"
        for key in attempts refused reset sent_away drained completed stuck bad_echo; do
            R[$key,$tag]=$(kv $key "$line")
        done
        R[stopping,$tag]=${stopping:-0}
        R[cut,$tag]=$cut
        R[others,$tag]=${others:-none}
        for key in refused reset stuck bad_echo; do
            [ "${R[$key,$tag]:-x}" = 0 ] || bad=1
        done
        [ "${R[cut,$tag]}" = 0 ] && [ "${R[others,$tag]}" = none ] || bad=1
    done
done

for b in $BACKENDS; do
    tags=()
    for ((k = 1; k <= ROUNDS; k++)); do tags+=("$b.$k"); done
    # colsum KEY: KEY summed over this backend's rounds.
    colsum() { local s=0 t; for t in "${tags[@]}"; do s=$((s + ${R[$1,$t]:-0})); done; echo $s; }
    a=$(colsum attempts) rf=$(colsum refused) rs=$(colsum reset) sw=$(colsum sent_away)
    dr=$(colsum drained) st=$(colsum stuck) be=$(colsum bad_echo) so=$(colsum stopping)
    cu=$(colsum cut)
    oth=$(for t in "${tags[@]}"; do echo "${R[others,$t]}"; done | grep -vc '^none$' || true)
    row "cport_$b: connects refused / reset (of $a)" "$rf / $rs" "0 / 0" "$([ "$rf$rs" = 00 ] && echo ok || echo MISSED)"
    row "cport_$b: echoes owed or wrong" "$st / $be" "0 / 0" "$([ "$st$be" = 00 ] && echo ok || echo MISSED)"
    row "cport_$b: old sessions ended by the drain" "$so (clients saw $dr drained, $sw sent away)" "all" "-"
    row "cport_$b: old sessions cut at the deadline / other reasons" "$cu / $oth rounds" "0 / 0" "$([ "$cu$oth" = 00 ] && echo ok || echo MISSED)"
done

echo
echo "== [$(elapsed) s] summary: a rolling restart under $RATE connects/s ($ROUNDS rounds, sums;"
echo "   tcp_migrate_req=$MIGRATE; servers on CPU $SCPU, clients on CPU $LCPU)"
summary_table 60 48
[ $FAILED = 1 ] && exit 1
[ $bad = 1 ] && exit 1
exit 0
