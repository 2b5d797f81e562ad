#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# ws.sh — issue 18's WebSocket numbers, measured from outside.
#
#   bench/ws.sh [BUILD_DIR] [ROUNDS]        (defaults: build, 3)
#
# Needs the build's cport-server, loadgen and idle_conns (loadgen --ws and
# idle_conns --ws need OpenSSL at build time), lws_echo (libwebsockets-dev)
# for the libwebsockets comparison (skipped if not built), and taskset,
# timeout, awk. cport's WebSocket listener is `cport-server --ws-port P`
# (the same mode as its main port): until cport-server --help mentions
# --ws-port, every cport WebSocket run is skipped, said so first and in the
# summary, and the script exits 3; the plain TCP runs and the peers still run.
# The servers run on CPU 0 (one worker) and every client on CPU 1. The parts:
#
#  1. Echo, 200 connections x 64 B, 4 in flight, WS_ECHO_SECONDS per run:
#     server CPU per message over the load window (loadgen --server-pid, so
#     the connects and upgrades are left out; the whole run's figure is in
#     the table too) of cport-server on epoll and io_uring, over WebSocket
#     (--ws-port, loadgen --ws) and over plain TCP, and of lws_echo (loadgen
#     --ws), alternating (reversed every other round). The mode is packet
#     (cport-server --mode packet, loadgen --mode packet: each packet is one
#     WebSocket message both ways), or WS_ECHO_MODE=echo for raw bytes.
#     Goals, paired by round: cport WebSocket / cport TCP <= 1.05, and
#     cport WebSocket / lws_echo < 1.00.
#  2. Chat, 1000 clients x 1 packet/s x 64 B (loadgen --mode chat, which
#     checks every delivery, its content and each sender's order) against
#     cport-server --mode chat, WebSocket and plain alternating, CPU per
#     delivery over the load window. Goals: WebSocket / plain <= 1.10
#     (paired), nothing lost, nothing out of order. The drain is 10 s.
#  3. Idle memory: cport-server --mode packet (with its WebSocket listener);
#     a first WS_IDLE/2 idle_conns sessions of the kind measured, kept, VmRSS
#     once it held still for 2 s; then WS_IDLE (2000) more, VmRSS once still
#     again (the worker trims in its first two quiet seconds); per session = the difference /
#     WS_IDLE: what one more idle session costs. The first sessions pay what
#     a burst of them costs once (malloc's arena growing to the upgrades in
#     flight, the timer heap, the slabs' first pages), which is not a
#     session's. WebSocket (a session counts once its 101 arrived) and plain
#     alternate, ROUNDS times. Goal: a WebSocket session at most 64 bytes
#     above a plain one (the median of the rounds' differences). lws_echo's
#     figure is shown for reference.
#
# WS_NODE_DIR=DIR adds a reference of the echo runs: a node echo server with
# the npm `ws` package found in DIR/node_modules (npm install ws in DIR; it
# is never installed by this script).
# Everything goes to a temporary directory, named at the start; nothing is
# written into the repository. The last thing printed is the summary table.
# Exit 0 if every run worked (whatever the verdicts), 1 if a run failed, 2 on
# bad usage or missing programs, 3 if cport-server has no --ws-port yet.
# Environment: WS_ECHO_SECONDS (4), WS_CHAT_SECONDS (5), WS_IDLE (2000),
# WS_ECHO_MODE (packet), WS_PARTS (default "1 2 3"), WS_NODE_DIR.
set -u

here=$(cd "$(dirname "$0")" && pwd)
ME=ws.sh
# shellcheck source=lib.sh
. "$here/lib.sh"
bench_args "$@"
ECHO_S=${WS_ECHO_SECONDS:-4}
CHAT_S=${WS_CHAT_SECONDS:-5}
IDLE_N=${WS_IDLE:-2000}
EM=${WS_ECHO_MODE:-packet}
case "$EM" in packet | echo) ;; *) echo "ws.sh: WS_ECHO_MODE is packet or echo" >&2; exit 2 ;; esac

need_built "" cport-server loadgen idle_conns
need_tools taskset timeout awk getconf
if ! "$B/loadgen" --help | grep -q -- --ws || "$B/loadgen" --port 1 --ws --duration 0.01 2>&1 | grep -q 'without OpenSSL'; then
    echo "ws.sh: $B/loadgen has no --ws (built without OpenSSL? apt-get install libssl-dev)" >&2
    exit 2
fi
HAVE_WS=0
"$B/cport-server" --help 2>&1 | grep -q -- --ws-port && HAVE_WS=1
HAVE_LWS=0
[ -x "$B/lws_echo" ] && HAVE_LWS=1
HAVE_NODE=0
if [ -n "${WS_NODE_DIR:-}" ]; then
    if command -v node >/dev/null && [ -d "$WS_NODE_DIR/node_modules/ws" ]; then
        HAVE_NODE=1
    else
        echo "ws.sh: WS_NODE_DIR=$WS_NODE_DIR: needs node and $WS_NODE_DIR/node_modules/ws" >&2
        exit 2
    fi
fi

LOG=$(mktemp -d /tmp/cport-ws.XXXXXX)
SRV="$B/cport-server --workers 1"
NO_WS="n/a: cport-server has no --ws-port yet"
T0=$(date +%s)

trap_cleanup
port=18800
PARTS=${WS_PARTS:-1 2 3}

# settled_rss PID: VmRSS (KiB) once it held still for 2 s (the worker's
# trims come in the first two quiet seconds after load), at most 12 s.
settled_rss() {
    local last now i
    last=$(status_kib "$1" VmRSS)
    for i in $(seq 1 6); do
        sleep 2
        now=$(status_kib "$1" VmRSS)
        [ "$now" = "$last" ] && [ "$i" -gt 1 ] && break
        last=$now
    done
    echo "$now"
}

echo "ws.sh: build $B, $ROUNDS round(s); servers on CPU $SCPU (one worker), clients on CPU $LCPU"
echo "ws.sh: logs in $LOG"
echo "ws.sh: $(nproc) CPUs online, load average $(cut -d' ' -f1-3 /proc/loadavg)"
if [ $HAVE_WS = 0 ]; then
    echo "ws.sh: $B/cport-server has no --ws-port yet (cport-server --help does not mention it):"
    echo "ws.sh: every cport WebSocket run is SKIPPED; only the plain TCP runs and the peers are measured"
fi
[ $HAVE_LWS = 1 ] || echo "ws.sh: lws_echo not built (apt-get install libwebsockets-dev, then re-run CMake): its runs are skipped"

if [ $HAVE_NODE = 1 ]; then
    # the npm ws package's own echo, as its README writes it
    cat >"$LOG/ws_echo.js" <<'EOF'
const { WebSocketServer } = require('ws');
const port = +process.argv[process.argv.indexOf('--port') + 1];
const wss = new WebSocketServer({ port, perMessageDeflate: false });
wss.on('connection', (ws) => {
  ws.on('error', () => {});
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
});
wss.on('listening', () => console.log(`listening on 0.0.0.0:${port} (node ${process.version}, ws ${require('ws/package.json').version})`));
for (const s of ['SIGINT', 'SIGTERM']) process.on(s, () => process.exit(0));
EOF
fi

# ------------------------------------------------------- 1. echo CPU per message
if want 1; then
echo
echo "== [$(elapsed) s] 1. echo ($EM), 200 conns x 64 B, 4 in flight, ${ECHO_S} s per run, alternating"
LD="--mode $EM --conns 200 --size 64 --depth 4 --duration $ECHO_S"
E_NAMES=() E_CMDS=() E_PORT=()
add_echo() { E_NAMES+=("$1"); E_CMDS+=("$2"); E_PORT+=("$3"); }
for b in epoll uring; do
    add_echo "cport_${b}_tcp" "$SRV --backend $b --mode $EM --port {PORT}" tcp
    [ $HAVE_WS = 1 ] && add_echo "cport_${b}_ws" "$SRV --backend $b --mode $EM --port {PORT} --ws-port {WSPORT}" ws
done
[ $HAVE_LWS = 1 ] && add_echo lws "$B/lws_echo --port {WSPORT}" ws
[ $HAVE_NODE = 1 ] && add_echo node_ws "env NODE_PATH=$WS_NODE_DIR/node_modules node $LOG/ws_echo.js --port {WSPORT}" ws
declare -A EC
printf '   %-5s %-16s %10s %9s %5s %5s %10s %12s %9s\n' round contender msgs msgs/s err lg_cpu us/msg us/msg_all p99_us
for ((r = 1; r <= ROUNDS; r++)); do
    for i in $(order "$r" ${#E_NAMES[@]}); do
        n=${E_NAMES[$i]}
        ld=$LD
        [ "${E_PORT[$i]}" = ws ] && ld="$ld --ws"
        run_load "echo.$n.r$r" "${E_CMDS[$i]}" "$ld" "${E_PORT[$i]}"
        us=nan
        [ "$RL_ok" = 1 ] && us=$(kv srv_us_per_msg "$RL")
        EC[$n,$r]=$us
        printf '   %-5s %-16s %10s %9s %5s %5s %10s %12s %9s\n' "$r" "$n" "$(kv msgs "$RL")" "$(kv msgs_per_s "$RL")" \
            "$(kv errors "$RL")" "$(kv lg_cpu_s "$RL")" "$us" "$RL_whole_us" "$(kv p99_us "$RL")"
    done
done
ecol() { local r; for ((r = 1; r <= ROUNDS; r++)); do echo "${EC[$1,$r]:-nan}"; done; }
epaired() { # epaired A B -> median over rounds of A/B
    local r
    for ((r = 1; r <= ROUNDS; r++)); do div "${EC[$1,$r]:-nan}" "${EC[$2,$r]:-nan}" %.4f; done | median %.3f
}
echo "   medians, server us per message over the load window:"
echo "   $(for n in "${E_NAMES[@]}"; do printf '%s %s; ' "$n" "$(ecol "$n" | median %.3f)"; done)"
for b in epoll uring; do
    if [ $HAVE_WS = 1 ]; then
        r=$(epaired "cport_${b}_ws" "cport_${b}_tcp")
        row "echo: cport_$b WebSocket / TCP (paired)" "$r  ($(ecol "cport_${b}_ws" | median %.3f) / $(ecol "cport_${b}_tcp" | median %.3f) us/msg)" "<= 1.05" "$(verdict "$r" '<=' 1.05)"
        if [ $HAVE_LWS = 1 ]; then
            r=$(epaired "cport_${b}_ws" lws)
            row "echo: cport_$b WebSocket / lws_echo (paired)" "$r" "< 1.00" "$(verdict "$r" '<' 1.00)"
        else
            row "echo: cport_$b WebSocket / lws_echo (paired)" "n/a: lws_echo not built" "< 1.00" "n/a"
        fi
    else
        row "echo: cport_$b WebSocket / TCP (paired)" "$NO_WS  (TCP $(ecol "cport_${b}_tcp" | median %.3f) us/msg)" "<= 1.05" "n/a"
        row "echo: cport_$b WebSocket / lws_echo (paired)" "$NO_WS" "< 1.00" "n/a"
    fi
done
[ $HAVE_LWS = 1 ] && row "echo: lws_echo, server us/msg" "$(ecol lws | median %.3f)  (/ cport_epoll TCP, paired: $(epaired lws cport_epoll_tcp))" "-" "-"
[ $HAVE_NODE = 1 ] && row "echo: node ws, server us/msg" "$(ecol node_ws | median %.3f)  (/ cport_epoll TCP, paired: $(epaired node_ws cport_epoll_tcp))" "-" "-"
fi

# ------------------------------------------------------------ 2. chat
if want 2; then
echo
echo "== [$(elapsed) s] 2. chat, 1000 clients x 1 packet/s x 64 B, ${CHAT_S} s per run, WebSocket and plain"
CT_NAMES=()
for b in epoll uring; do
    CT_NAMES+=("cport_${b}_tcp")
    [ $HAVE_WS = 1 ] && CT_NAMES+=("cport_${b}_ws")
done
declare -A CT
bad_chat=0
printf '   %-5s %-16s %11s %9s %5s %5s %12s %12s %10s\n' round contender deliveries lost ooo err us/deliv us/deliv_all p99_us
for ((r = 1; r <= ROUNDS; r++)); do
    for i in $(order "$r" ${#CT_NAMES[@]}); do
        n=${CT_NAMES[$i]}
        b=${n#cport_}
        b=${b%%_*}
        ld="--mode chat --conns 1000 --rate 1 --size 64 --duration $CHAT_S --drain 10"
        cmd="$SRV --backend $b --mode chat --port {PORT}"
        kind=tcp
        case "$n" in *_ws) ld="$ld --ws" cmd="$cmd --ws-port {WSPORT}" kind=ws ;; esac
        run_load "chat.$n.r$r" "$cmd" "$ld" $kind
        us=nan
        [ "$RL_ok" = 1 ] && us=$(kv srv_us_per_msg "$RL")
        [ "$RL_ok" = 1 ] || bad_chat=1
        CT[$n,$r]=$us
        printf '   %-5s %-16s %11s %9s %5s %5s %12s %12s %10s\n' "$r" "$n" "$(kv deliveries "$RL")" "$(kv lost "$RL")" \
            "$(kv out_of_order "$RL")" "$(kv errors "$RL")" "$us" "$RL_whole_us" "$(kv p99_us "$RL")"
    done
done
for b in epoll uring; do
    p=$(for ((k = 1; k <= ROUNDS; k++)); do echo "${CT[cport_${b}_tcp,$k]}"; done | median %.3f)
    if [ $HAVE_WS = 1 ]; then
        t=$(for ((k = 1; k <= ROUNDS; k++)); do echo "${CT[cport_${b}_ws,$k]}"; done | median %.3f)
        pr=$(for ((k = 1; k <= ROUNDS; k++)); do div "${CT[cport_${b}_ws,$k]}" "${CT[cport_${b}_tcp,$k]}" %.4f; done | median %.3f)
        row "chat: cport_$b WebSocket / plain (paired)" "$pr  ($t / $p us/delivery)" "<= 1.10" "$(verdict "$pr" '<=' 1.10)"
    else
        row "chat: cport_$b WebSocket / plain (paired)" "$NO_WS  (plain $p us/delivery)" "<= 1.10" "n/a"
    fi
done
what="every delivery, in order, all runs"
[ $HAVE_WS = 1 ] || what="$what (plain only)"
row "chat: $what" "$([ $bad_chat = 0 ] && echo "yes" || echo "NO (see the table above)")" "nothing lost" "$([ $bad_chat = 0 ] && echo ok || echo MISSED)"
fi

# ------------------------------------------------------------ 3. idle memory
# idle_run ROUND NAME "SERVER COMMAND" tcp|ws -> IDLE_B (bytes per session, nan if it failed)
idle_run() {
    local round=$1
    shift
    local name=$1 kind=$3 flag="" lp rss_f rss0="" rss1="" ipid wpid st=FAILED
    IDLE_B=nan
    [ "$kind" = ws ] && flag=--ws
    start_server "$name" "$2" || return 1
    lp=$P
    [ "$kind" = ws ] && lp=$WP
    rss_f=$(status_kib "$SPID" VmRSS)
    # the first sessions, kept: they pay the one-time costs of a burst of them
    # shellcheck disable=SC2086
    idle_clients "$LOG/$name.warm.log" --port "$lp" --conns $((IDLE_N / 2)) --hold 60 $flag
    wpid=$IPID
    rss0=$(settled_rss "$SPID")
    # shellcheck disable=SC2086
    idle_clients "$LOG/$name.clients.log" --port "$lp" --conns "$IDLE_N" --hold 60 $flag
    ipid=$IPID
    if grep -q '^connected' "$LOG/$name.clients.log"; then
        rss1=$(settled_rss "$SPID")
        kill -0 "$ipid" 2>/dev/null && st=ok
    fi
    kill -0 "$wpid" 2>/dev/null || st=FAILED
    kill -TERM "$ipid" "$wpid" 2>/dev/null
    wait "$ipid" "$wpid" 2>/dev/null
    forget "$ipid"
    forget "$wpid"
    stop_server
    [ "$st" = ok ] || fail "$name: the $IDLE_N sessions did not all stay up (see $LOG/$name.clients.log)"
    [ "$st" = ok ] && IDLE_B=$(awk -v a="$rss0" -v b="$rss1" -v n="$IDLE_N" 'BEGIN { printf "%.1f", (b - a) * 1024 / n }')
    printf '   %-5s %-24s %10s %12s %12s %14s %s\n' "$round" "${name%.r*}" "$rss_f" "$rss0" "$rss1" "$IDLE_B B" "$st"
}

if want 3; then
echo
echo "== [$(elapsed) s] 3. idle memory: $IDLE_N idle sessions (idle_conns), server VmRSS, alternating"
declare -A MEM
printf '   %-5s %-24s %10s %12s %12s %14s %s\n' round server fresh_KiB warm_KiB held_KiB per_session status
for ((r = 1; r <= ROUNDS; r++)); do
    kinds=(tcp)
    [ $HAVE_WS = 1 ] && kinds=(tcp ws)
    [ $((r % 2)) -eq 0 ] && [ $HAVE_WS = 1 ] && kinds=(ws tcp)
    for b in epoll uring; do
        cmd="$SRV --backend $b --mode packet --port {PORT}"
        [ $HAVE_WS = 1 ] && cmd="$cmd --ws-port {WSPORT}"
        for kind in "${kinds[@]}"; do
            idle_run "$r" "idle.cport_${b}_$kind.r$r" "$cmd" "$kind"
            MEM[$b,$kind,$r]=$IDLE_B
        done
    done
    if [ $HAVE_LWS = 1 ]; then
        idle_run "$r" "idle.lws.r$r" "$B/lws_echo --port {WSPORT}" ws
        MEM[lws,$r]=$IDLE_B
    fi
done
for b in epoll uring; do
    p=$(for ((k = 1; k <= ROUNDS; k++)); do echo "${MEM[$b,tcp,$k]}"; done | median %.1f)
    if [ $HAVE_WS = 1 ]; then
        w=$(for ((k = 1; k <= ROUNDS; k++)); do echo "${MEM[$b,ws,$k]}"; done | median %.1f)
        d=$(for ((k = 1; k <= ROUNDS; k++)); do
            awk -v a="${MEM[$b,ws,$k]}" -v b="${MEM[$b,tcp,$k]}" 'BEGIN { if (a == "nan" || b == "nan") print "nan"; else printf "%.1f\n", a - b }'
        done | median %.1f)
        worst=$(for ((k = 1; k <= ROUNDS; k++)); do
            awk -v a="${MEM[$b,ws,$k]}" -v b="${MEM[$b,tcp,$k]}" 'BEGIN { if (a == "nan" || b == "nan") print "nan"; else printf "%.1f\n", a - b }'
        done | maxof)
        row "idle: cport_$b bytes per WebSocket session above plain" "$d B  ($w / $p B per session; worst round ${worst:-nan})" "<= 64" "$(verdict "$d" '<=' 64)"
    else
        row "idle: cport_$b bytes per WebSocket session above plain" "$NO_WS  (plain $p B per session)" "<= 64" "n/a"
    fi
done
[ $HAVE_LWS = 1 ] && row "idle: lws_echo bytes per WebSocket session" "$(for ((k = 1; k <= ROUNDS; k++)); do echo "${MEM[lws,$k]}"; done | median %.1f) B" "-" "-"
fi

# ------------------------------------------------------------ summary
echo
echo "== [$(elapsed) s] summary: issue 18's WebSocket numbers, from outside ($ROUNDS rounds; medians;"
echo "   servers pinned to CPU $SCPU with one worker, clients on CPU $LCPU; a shared VM's numbers are noisy)"
[ $HAVE_WS = 1 ] || echo "   cport-server has NO --ws-port yet: the cport WebSocket rows are n/a"
summary_table 58 72
[ $FAILED = 1 ] && exit 1
[ $HAVE_WS = 1 ] || exit 3
exit 0
