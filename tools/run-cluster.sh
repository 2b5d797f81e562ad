#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The end-to-end run behind `make run-cluster`: one chat room over three
# cport-server processes joined by a message bus.
#
#   tools/run-cluster.sh [BUILD_DIR] [nats|redis]   (default: build, then $BUS or nats)
#
# 1. starts a local broker on 127.0.0.1, on a free port: nats-server, or
#    redis-server with `redis` (a port taken meanwhile: another one is tried);
# 2. starts 3 BUILD_DIR/cport-server --mode chat --bus URL --room cluster on
#    127.0.0.1 with --port 0 (each port is read from its "listening on" line);
# 3. runs 3 BUILD_DIR/cport-dummy, one per server, 50 sessions each: one room
#    of 150 senders (--room-size 150, --first-index 0/50/100) that all start at
#    the same moment (--start-at, 3 s ahead), 2 packets/s each for 5 s; every
#    session verifies every packet of all 150 senders (225,000 deliveries),
#    and one progress line a second sums the three;
# 4. stops the servers with SIGINT (each prints its stats and its bus stats),
#    then the broker;
# 5. prints a summary and one PASS or FAIL line. Exit status 0 only if every
#    dummy passed, every server stopped cleanly and the bus counted no gap
#    and no reconnect. Every step is bounded in time, and everything started
#    here is stopped if this script ends early for any reason.
set -u

BUILD=${1:-build}
BUS_KIND=${2:-${BUS:-nats}}
SERVER=$BUILD/cport-server
DUMMY=$BUILD/cport-dummy
SERVERS=3
SESSIONS=${SESSIONS:-50}  # per dummy, one dummy per server
RATE=${RATE:-2}           # packets per second per session
DURATION=${DURATION:-5}   # seconds of sending
ROOM=cluster
START_LEAD_MS=3000    # the common start, this far after the dummies are launched
STARTUP_TIMEOUT=5     # seconds for the broker and for each server to be ready
DUMMY_TIMEOUT=$((DURATION + 20)) # start lead (3) + send + drain (<= 2), with margin
STOP_TIMEOUT=5        # seconds the servers and the broker may take to exit

case $BUS_KIND in
nats)  BROKER=$(command -v nats-server || echo /usr/sbin/nats-server)
       BROKER_READY='Server is ready' ;;
redis) BROKER=$(command -v redis-server || echo /usr/bin/redis-server)
       BROKER_READY='Ready to accept connections' ;;
*)     echo "run-cluster: unknown bus '$BUS_KIND' (nats or redis)" >&2; exit 2 ;;
esac
for prog in "$SERVER" "$DUMMY"; do
    if [ ! -x "$prog" ]; then
        echo "run-cluster: $prog not found; build first (cmake --build $BUILD)" >&2
        exit 1
    fi
done
if [ ! -x "$BROKER" ]; then
    echo "run-cluster: $BROKER not found; install it (make deps)" >&2
    exit 1
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cport-cluster.XXXXXX")
broker_pid=""
server_pids=()        # index k: server k, "" once it is waited for
dummy_pids=()
helper_pids=()        # the progress ticker (a sleep): ended with SIGKILL
main_shell=$BASHPID
# On any exit: ask every child still running to stop, give them a moment,
# then kill them, so that nothing outlives this script. Only in this shell: a
# child forked from it runs these traps too if a signal reaches it before it
# has reset them, and must then just go.
# shellcheck disable=SC2317  # (called through the EXIT trap)
cleanup() {
    [ "$BASHPID" = "$main_shell" ] || return 0
    local pid running=()
    for pid in "${helper_pids[@]}"; do
        kill -KILL "$pid" 2>/dev/null
    done
    for pid in "${dummy_pids[@]}" "${server_pids[@]}" $broker_pid; do
        [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && running+=("$pid")
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
# shellcheck disable=SC2317  # (called through the INT and TERM traps)
interrupted() {
    [ "$BASHPID" = "$main_shell" ] || exit 1
    echo "run-cluster: interrupted" >&2
    exit 130
}
trap cleanup EXIT
trap interrupted INT TERM

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
t0=$(now)
fails=()              # why the run failed, one reason each

# Waits until file $2 has a line matching $3, or process $1 ends, or
# STARTUP_TIMEOUT passes. 0 when the line came.
await_line() {
    local pid=$1 file=$2 pattern=$3
    local deadline=$(( $(date +%s) + STARTUP_TIMEOUT ))
    while ! grep -q -- "$pattern" "$file" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || return 1
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 0.05
    done
}

# --- 1. broker -------------------------------------------------------------
# A port below Linux's ephemeral range (32768-60999), so no outgoing
# connection holds it; if one is taken after all, the broker exits and the
# next attempt takes another.
start_broker() {
    local attempt
    for attempt in 1 2 3 4 5; do
        bport=$(( 20000 + RANDOM % 12000 ))
        if [ "$BUS_KIND" = nats ]; then
            "$BROKER" -a 127.0.0.1 -p "$bport" >"$tmp/broker.log" 2>&1 &
        else
            "$BROKER" --bind 127.0.0.1 --port "$bport" --save "" --appendonly no \
                --dir "$tmp" >"$tmp/broker.log" 2>&1 &
        fi
        broker_pid=$!
        await_line "$broker_pid" "$tmp/broker.log" "$BROKER_READY" && return 0
        kill -KILL "$broker_pid" 2>/dev/null
        wait "$broker_pid" 2>/dev/null
        broker_pid=""
        echo "run-cluster: $BUS_KIND broker attempt $attempt on port $bport failed:" >&2
        tail -n 3 "$tmp/broker.log" >&2
    done
    return 1
}
if ! start_broker; then
    echo "run-cluster: FAIL $BUS_KIND: the broker did not start"
    exit 1
fi
url="$BUS_KIND://127.0.0.1:$bport"
echo "run-cluster: $BROKER ($BUS_KIND) on 127.0.0.1:$bport, pid $broker_pid"

# --- 2. servers ------------------------------------------------------------
# stdout (the listening line and the final stats lines) goes to a file we
# parse; stderr (log messages) to another, shown in the summary.
ports=()
for k in $(seq 0 $((SERVERS - 1))); do
    "$SERVER" --host 127.0.0.1 --port 0 --mode chat --bus "$url" --room "$ROOM" \
        >"$tmp/server$k.out" 2>"$tmp/server$k.err" &
    server_pids[k]=$!
done
for k in $(seq 0 $((SERVERS - 1))); do
    if ! await_line "${server_pids[k]}" "$tmp/server$k.out" '^cport-server listening on'; then
        echo "run-cluster: cport-server $k did not start listening within ${STARTUP_TIMEOUT}s:" >&2
        cat "$tmp/server$k.err" >&2
        echo "run-cluster: FAIL $BUS_KIND: server $k did not start"
        exit 1
    fi
    ports[k]=$(sed -n 's/^cport-server listening on .*:\([0-9][0-9]*\) mode=.*/\1/p' "$tmp/server$k.out")
    echo "server $k: 127.0.0.1:${ports[k]}, pid ${server_pids[k]}, --bus $url --room $ROOM"
done

# --- 3. dummy clients ------------------------------------------------------
room=$((SERVERS * SESSIONS))
start_at=$(( $(date +%s%3N) + START_LEAD_MS ))
echo "run-cluster: $SERVERS dummies x $SESSIONS sessions, one room of $room, $RATE packets/s each" \
     "for ${DURATION}s, all sending from $(date -d "@$((start_at / 1000))" +%T)"
for k in $(seq 0 $((SERVERS - 1))); do
    timeout -k 2 "$DUMMY_TIMEOUT" "$DUMMY" --host 127.0.0.1 --port "${ports[k]}" --mode chat \
        --sessions "$SESSIONS" --room-size "$room" --first-index $((k * SESSIONS)) \
        --start-at "$start_at" --rate "$RATE" --size 64 --duration "$DURATION" \
        --server-pid "${server_pids[k]}" >"$tmp/dummy$k.out" 2>"$tmp/dummy$k.err" &
    dummy_pids[k]=$!
done

# One line a second from the dummies' latest progress lines: their phases
# (connect, room, send, drain, end; several while they move on), sessions,
# rates and errors summed, the worst p99, the least of the room heard.
progress() {
    local k lines=""
    for k in $(seq 0 $((SERVERS - 1))); do
        lines+=$(grep '^\[' "$tmp/dummy$k.err" 2>/dev/null | tail -n 1)$'\n'
    done
    local up=0
    for k in $(seq 0 $((SERVERS - 1))); do
        [ -n "${server_pids[k]}" ] && up=$((up + 1))
    done
    printf '%s' "$lines" | awk -v t="$(elapsed "$t0" "$(now)")" -v up="$up" -v n="$SERVERS" '
        /^\[/ {
            d++; if (index("/" phase "/", "/" $3 "/") == 0) phase = phase (phase == "" ? "" : "/") $3
            for (i = 4; i <= NF; i++) {
                split($i, kv, "=")
                if (kv[1] == "sessions") { split(kv[2], s, "/"); alive += s[1]; total += s[2] }
                else if (kv[1] == "out/s") out += kv[2]
                else if (kv[1] == "in/s") in_ += kv[2]
                else if (kv[1] == "errors") err += kv[2]
                else if (kv[1] == "p99") { v = kv[2] + 0; if (v > p99) p99 = v }
                else if (kv[1] == "heard") { split(kv[2], h, "/"); if (heard == "" || h[1] < heard) heard = h[1]; room = h[2] }
            }
        }
        END {
            if (d == 0) { printf "[%5ss] starting   servers=%d/%d\n", t, up, n; exit }
            printf "[%5ss] %-9s sessions=%d/%d heard=%s/%s out/s=%.0f in/s=%.0f p99=%.2fms errors=%d servers=%d/%d\n",
                   t, phase, alive, total, heard, room, out, in_, p99, err, up, n
        }'
}

# Wait for the dummies, waking each second for the progress line. A server
# that ends meanwhile is reported at once: that is a failure.
declare -A dummy_rc server_rc
ticker=""
pending=("${dummy_pids[@]}")
while [ "${#pending[@]}" -gt 0 ]; do
    if [ -z "$ticker" ]; then
        sleep 1 &
        ticker=$!
        helper_pids=("$ticker")
    fi
    watch=("${pending[@]}" "$ticker")
    for pid in "${server_pids[@]}"; do [ -n "$pid" ] && watch+=("$pid"); done
    done_pid=""
    wait -n -p done_pid "${watch[@]}"
    rc=$?
    if [ "$done_pid" = "$ticker" ]; then
        sleep 1 &   # the next tick counts from now, not from after the line
        ticker=$!
        helper_pids=("$ticker")
        progress
        continue
    fi
    for k in $(seq 0 $((SERVERS - 1))); do
        if [ "$done_pid" = "${server_pids[k]}" ]; then
            server_rc[$k]=$rc
            server_pids[k]=""
            echo "run-cluster: cport-server $k (port ${ports[k]}) ended during the run, status $rc" >&2
            fails+=("server $k ended during the run (status $rc)")
        fi
        if [ "$done_pid" = "${dummy_pids[k]}" ]; then
            dummy_rc[$k]=$rc
            dummy_pids[k]=""
            new=()
            for pid in "${pending[@]}"; do [ "$pid" != "$done_pid" ] && new+=("$pid"); done
            pending=("${new[@]}")
        fi
    done
done
[ -n "$ticker" ] && kill -KILL "$ticker" 2>/dev/null && wait "$ticker" 2>/dev/null
helper_pids=()
progress

# --- 4. graceful stop --------------------------------------------------------
# SIGINT to every server still running, then SIGTERM to the broker once they
# are done (so no server sees its broker vanish while it still serves).

# Waits until the processes given (already signalled) have ended, for at
# most STOP_TIMEOUT, then kills the rest. Their statuses are left to `wait`.
await_exit() {
    local deadline=$(( $(date +%s%3N) + STOP_TIMEOUT * 1000 )) pid alive
    while :; do
        alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" -eq 0 ] && return
        [ "$(date +%s%3N)" -ge "$deadline" ] && break
        sleep 0.02
    done
    for pid in "$@"; do
        kill -KILL "$pid" 2>/dev/null &&
            echo "run-cluster: pid $pid still running ${STOP_TIMEOUT}s after the signal: killed" >&2
    done
}
# The servers' CPU time (user + system, in clock ticks), read before the
# stop: with the deliveries, the CPU a delivery cost the cluster's servers.
server_ticks=0
for k in $(seq 0 $((SERVERS - 1))); do
    if [ -n "${server_pids[k]}" ] && [ -r "/proc/${server_pids[k]}/stat" ]; then
        server_ticks=$((server_ticks + $(awk '{ print $14 + $15 }' "/proc/${server_pids[k]}/stat")))
    fi
done
stop_start=$(now)
live=()
for k in $(seq 0 $((SERVERS - 1))); do
    [ -n "${server_pids[k]}" ] && kill -INT "${server_pids[k]}" 2>/dev/null && live+=("${server_pids[k]}")
done
await_exit "${live[@]}"
for k in $(seq 0 $((SERVERS - 1))); do
    [ -n "${server_pids[k]}" ] || continue
    wait "${server_pids[k]}"
    server_rc[$k]=$?
    server_pids[k]=""
    [ "${server_rc[$k]}" -eq 0 ] || fails+=("server $k exited with status ${server_rc[$k]} after SIGINT")
done
stop_time=$(elapsed "$stop_start" "$(now)")
if [ ! -d "$tmp" ]; then
    fails+=("this run's files in $tmp are gone (removed by someone else?)")
fi
kill -TERM "$broker_pid" 2>/dev/null
await_exit "$broker_pid"
wait "$broker_pid" 2>/dev/null
broker_pid=""

# --- 5. summary --------------------------------------------------------------
field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<"$1"; }
echo
echo "== run-cluster summary ($BUS_KIND, room '$ROOM') =="
sent=0 received=0 expected=0 lost=0 p99=0
for k in $(seq 0 $((SERVERS - 1))); do
    result=$(grep '^RESULT ' "$tmp/dummy$k.out" || true)
    rc=${dummy_rc[$k]:-none}
    echo "dummy $k (server $k, senders $((k * SESSIONS))..$(((k + 1) * SESSIONS - 1))): exit $rc"
    echo "        ${result:-no RESULT line}"
    # Its own words (errors, the verdict), without the progress lines.
    grep -v '^\[' "$tmp/dummy$k.err" | grep -v -e ' mode, ' -e ' one room of ' | sed 's/^/        /'
    if [ -n "$result" ]; then
        sent=$((sent + $(field "$result" sent)))
        received=$((received + $(field "$result" received)))
        expected=$((expected + $(field "$result" expected)))
        lost=$((lost + $(field "$result" lost)))
        p99=$(awk -v a="$p99" -v b="$(field "$result" p99_ms)" 'BEGIN { print (b > a ? b : a) }')
    fi
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        fails+=("dummy $k did not finish within ${DUMMY_TIMEOUT}s")
    elif [ "$rc" != 0 ]; then
        fails+=("dummy $k failed (exit $rc)${result:+: $(field "$result" errors) errors, lost=$(field "$result" lost)}")
    elif [ -z "$result" ]; then
        fails+=("dummy $k printed no RESULT line")
    fi
done
gaps=0 reconnects=0 published=0 delivered=0
for k in $(seq 0 $((SERVERS - 1))); do
    bus=$(grep '^cport-server bus:' "$tmp/server$k.out" || true)
    stats=$(grep '^cport-server stopped' "$tmp/server$k.out" || true)
    echo "server $k: exit ${server_rc[$k]:-?}"
    echo "        ${bus:-no bus stats line}"
    echo "        ${stats:-no final stats line}"
    grep -v 'received, stopping$' "$tmp/server$k.err" | sed 's/^/        /'
    if [ -n "$bus" ]; then
        gaps=$((gaps + $(field "$bus" gaps)))
        reconnects=$((reconnects + $(field "$bus" reconnects)))
        published=$((published + $(field "$bus" published)))
        delivered=$((delivered + $(field "$bus" delivered)))
    elif [ "${server_rc[$k]:-none}" = 0 ]; then
        fails+=("server $k printed no bus stats line")
    fi
done
echo "servers stopped ${stop_time}s after SIGINT"
# The dummies' own verdicts already say every session got what it was owed;
# this also holds them to the plan: every sender sent RATE x DURATION packets,
# and each went to every member of the room.
planned=$((room * room * RATE * DURATION))
if [ "$received" -ne "$planned" ] || [ "$expected" -ne "$planned" ]; then
    fails+=("$received of $expected deliveries, where the plan is $room x $room x $RATE x $DURATION = $planned")
fi
[ "$gaps" -eq 0 ] || fails+=("the bus counted $gaps messages lost between servers (gaps)")
[ "$reconnects" -eq 0 ] || fails+=("a server's bus link reconnected $reconnects times")

total=$(elapsed "$t0" "$(now)")
numbers="$SERVERS servers, $room clients, sent=$sent delivered=$received/$expected lost=$lost p99=${p99}ms,"
numbers+=" bus published=$published delivered=$delivered gaps=$gaps reconnects=$reconnects,"
cpu_us=$(awk -v t="$server_ticks" -v hz="$(getconf CLK_TCK)" -v n="$received" \
    'BEGIN { if (n > 0) printf "%.3f", t / hz * 1e6 / n; else print "n/a" }')
numbers+=" server_cpu_us_per_delivery=$cpu_us, ${total}s"
if [ "${#fails[@]}" -eq 0 ]; then
    echo "run-cluster: PASS $BUS_KIND: $numbers"
    exit 0
fi
why=$(printf '%s; ' "${fails[@]}")
echo "run-cluster: FAIL $BUS_KIND: ${why%; }"
echo "             $numbers"
exit 1
