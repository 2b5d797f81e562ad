#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# run.sh — cport against what users would pick instead (make bench / make bench-quick).
#
#   bench/run.sh BUILD full|quick     run the benchmarks with the programs in BUILD
#   bench/run.sh --deps               install (as root) or print the Debian packages the
#                                     peers and the chart need; the Makefile calls it
#                                     before it builds
#
# Builds nothing. Every run: the server pinned to CPU 0 (taskset), the loadgen to CPU 1,
# contenders alternating (A B C .. then reversed next round), the server's CPU time read
# from /proc/PID/stat around the loadgen run (same method as bench/cpu_compare.sh).
# Writes bench/results/latest.md + chart.png + latest.tsv (full) or
# bench/results/quick.md + quick-chart.png + quick.tsv (quick), and keeps the
# per-run logs in BUILD/bench-logs/MODE/. Exit 0 if no run failed, 1 otherwise.
# Environment: BENCH_ROUNDS (override rounds, default 3), BENCH_SECONDS (load duration
# of one run, default 1.5), BENCH_SERVER_CPU / BENCH_LOAD_CPU (default 0 / 1),
# BENCH_PORT_BASE (default 17900), BENCH_SCENARIOS (a space-separated list of scenario
# ids, e.g. "chat500 chat1000" or "idle10000": run only those, and write
# bench/results/subset.md + subset-chart.png + subset.tsv instead; default all of the mode's).
# shellcheck disable=SC2317  # cleanup runs from a trap
set -u

BENCH_PKGS="libuv1-dev libasio-dev libssl-dev openssl g++ gnuplot-nox libwebsockets-dev"

deps() {
    local missing="" p
    for p in $BENCH_PKGS; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || missing="$missing $p"
    done
    [ -n "$missing" ] || return 0
    if [ "$(id -u)" = 0 ]; then
        echo "bench: installing:$missing"
        # shellcheck disable=SC2086
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    else
        echo "bench: the peers (libuv, Asio, OpenSSL, libwebsockets) and the chart need Debian packages; run:"
        echo "  sudo apt-get install -y --no-install-recommends$missing"
        echo "bench: continuing; contenders that were not built are skipped"
    fi
    return 0
}

if [ "${1:-}" = "--deps" ]; then
    deps
    exit 0
fi
if [ $# -ne 2 ] || { [ "$2" != full ] && [ "$2" != quick ]; }; then
    echo "usage: bench/run.sh BUILD full|quick   |   bench/run.sh --deps" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
B=$(cd "$1" 2>/dev/null && pwd) || { echo "bench: no build directory $1" >&2; exit 2; }
MODE=$2
SCPU=${BENCH_SERVER_CPU:-0}
LCPU=${BENCH_LOAD_CPU:-1}
port=${BENCH_PORT_BASE:-17900}
resdir=$here/results
logdir=$B/bench-logs/$MODE
mkdir -p "$resdir" "$logdir"
rm -f "$logdir"/*.log
if [ -n "${BENCH_SCENARIOS:-}" ]; then # a subset: leave the whole runs' results alone
    out_md=$resdir/subset.md out_png=$resdir/subset-chart.png out_tsv=$resdir/subset.tsv
elif [ "$MODE" = full ]; then
    out_md=$resdir/latest.md out_png=$resdir/chart.png out_tsv=$resdir/latest.tsv
else
    out_md=$resdir/quick.md out_png=$resdir/quick-chart.png out_tsv=$resdir/quick.tsv
fi
for t in taskset timeout awk getconf; do
    command -v $t >/dev/null || { echo "bench: needs $t" >&2; exit 2; }
done
for b in loadgen raw_epoll_echo raw_epoll_chat cport-server; do
    [ -x "$B/$b" ] || { echo "bench: $B/$b missing (build first: make build)" >&2; exit 2; }
done
hz=$(getconf CLK_TCK)
have_ss=0
ss -Hltn 'sport = :1' >/dev/null 2>&1 && have_ss=1
ncpu=$(nproc)
if [ "$ncpu" -le "$LCPU" ] || [ "$ncpu" -le "$SCPU" ]; then
    echo "bench: needs CPUs $SCPU and $LCPU (this machine has $ncpu)" >&2
    exit 2
fi
T_START=$(date +%s)

# ------------------------------------------------------------- contenders
# name|binary|command[|lag] ({PORT} is replaced). Multi-threaded ones get 1 thread: the
# server is pinned to one CPU, so every contender is one thread on one CPU. "lag" marks a
# chat peer whose design (one write per packet per recipient) is expected not to keep up
# with the heavier chat loads on one CPU: a run of it in which the only errors are
# deliveries still missing at the end of the drain (nothing out of order, no byte or
# connection error) is reported as "behind", with what it did deliver, not as a failure.
ECHO_ALL=(
    "raw_epoll|raw_epoll_echo|./raw_epoll_echo --port {PORT}"
    "raw_uring|raw_uring_echo|./raw_uring_echo --port {PORT}"
    "libuv|uv_echo|./uv_echo --threads 1 --port {PORT}"
    "asio|asio_echo|./asio_echo --threads 1 --port {PORT}"
    "cport_epoll|cport-server|./cport-server --backend epoll --workers 1 --mode echo --port {PORT}"
    "cport_uring|cport-server|./cport-server --backend uring --workers 1 --mode echo --port {PORT}"
)
PACKET_ALL=(
    "raw_epoll|raw_epoll_echo|./raw_epoll_echo --port {PORT}"
    "raw_uring|raw_uring_echo|./raw_uring_echo --port {PORT}"
    "libuv|uv_echo|./uv_echo --threads 1 --port {PORT}"
    "asio|asio_echo|./asio_echo --threads 1 --port {PORT}"
    "cport_epoll|cport-server|./cport-server --backend epoll --workers 1 --mode packet --port {PORT}"
    "cport_uring|cport-server|./cport-server --backend uring --workers 1 --mode packet --port {PORT}"
)
CHAT_ALL=(
    "raw_epoll|raw_epoll_chat|./raw_epoll_chat --port {PORT}"
    "libuv|uv_chat|./uv_chat --port {PORT}|lag"
    "asio|asio_chat|./asio_chat --threads 1 --port {PORT}|lag"
    "cport_epoll|cport-server|./cport-server --backend epoll --workers 1 --mode chat --port {PORT}"
    "cport_uring|cport-server|./cport-server --backend uring --workers 1 --mode chat --port {PORT}"
)
skipped=""
available() { # filter a contender list to the built ones; result in AV
    AV=()
    local c bin
    for c in "$@"; do
        bin=$(echo "$c" | cut -d'|' -f2)
        if [ -x "$B/$bin" ]; then
            AV+=("$c")
        else
            case " $skipped " in *" $bin "*) ;; *) skipped="$skipped $bin" ;; esac
        fi
    done
}

# ---------------------------------------------------------------- helpers
server_pid="" load_pid="" idle_pids=""
stop_pid() { # SIGTERM, then SIGKILL after $2 tenths of a second
    local p=$1 i
    [ -n "$p" ] || return 0
    kill -TERM "$p" 2>/dev/null
    for ((i = 0; i < ${2:-50} * 5; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.02; done
    if kill -0 "$p" 2>/dev/null; then
        echo "bench: process $p ignored SIGTERM; killing it" >&2
        kill -KILL "$p" 2>/dev/null
    fi
    wait "$p" 2>/dev/null
}
cleanup() {
    local p
    for p in $load_pid $idle_pids $server_pid; do stop_pid "$p" 20; done
    load_pid="" idle_pids="" server_pid=""
}
trap cleanup EXIT
trap 'echo "bench: interrupted" >&2; exit 130' INT TERM HUP

cpu_ticks() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo $(( ${12} + ${13} ))
}
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null; }
listening() {
    local hex
    # ss asks the kernel for listening sockets only; /proc/net/tcp also lists every
    # TIME_WAIT socket (tens of thousands after the 1000-connection and churn runs), and
    # reading it took up to ~0.1 s per poll
    if [ "$have_ss" = 1 ]; then
        [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]
        return
    fi
    hex=$(printf '%04X' "$1")
    awk -v h=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == h { f = 1 } END { exit !f }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
next_port() {
    while listening "$port"; do port=$((port + 1)); done
    P=$port
    port=$((port + 1))
}
kv() {
    local k=$1 w
    for w in $2; do case "$w" in "$k"=*) echo "${w#*=}"; return 0 ;; esac; done
    echo ""
}
elapsed() { echo $(( $(date +%s) - T_START )); }
eta() { # ", about N s left", from the mean time per run so far
    local e
    e=$(elapsed)
    [ "$nrun" -gt 0 ] && [ "$e" -gt 0 ] && echo ", run $((nrun + 1))/$TOTAL_RUNS, ~$(( e * (TOTAL_RUNS - nrun) / nrun )) s left"
}

# start_server NAME CMD LOG -> server_pid, P; 0 when listening
start_server() {
    local name=$1 cmd=$2 log=$3 deadline
    next_port
    cmd=${cmd//\{PORT\}/$P}
    (cd "$B" && exec taskset -c "$SCPU" bash -c "exec env $cmd") >"$log" 2>&1 </dev/null &
    server_pid=$!
    deadline=$(( $(date +%s) + 10 ))
    while ! listening "$P"; do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            echo "bench: $name exited before listening:" >&2
            tail -3 "$log" >&2
            wait "$server_pid" 2>/dev/null
            server_pid=""
            return 1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "bench: $name not listening on $P after 10 s" >&2
            stop_pid "$server_pid"
            server_pid=""
            return 1
        fi
        sleep 0.05
    done
    sleep 0.1
    return 0
}

# run_one SCEN NAME CMD ROUND LOADARGS [lag] -> appends a row to $out_tsv, sets R_* for the
# progress line; R_ok: 1 ok, 2 behind (a "lag" contender that only lost deliveries), 0 failed
run_one() {
    local scen=$1 name=$2 cmd=$3 round=$4 load=$5 lag=${6:-}
    local log="$logdir/$scen.$name.r$round.server.log" llog="$logdir/$scen.$name.r$round.loadgen.log"
    local c0 c1 t0 t1 rc line rss
    R_ok=0 R_msgs=0 R_rate=0 R_us=nan R_p50=nan R_p99=nan R_util=0 R_cpu=0 R_rss=0 R_lg=0 R_lost=0
    if start_server "$name" "$cmd" "$log"; then
        c0=$(cpu_ticks "$server_pid")
        t0=$(date +%s%N)
        # shellcheck disable=SC2086
        timeout -k 5 120 taskset -c "$LCPU" "$B/loadgen" $load --port "$P" >"$llog" 2>&1 </dev/null &
        load_pid=$!
        wait "$load_pid"
        rc=$?
        load_pid=""
        t1=$(date +%s%N)
        c1=$(cpu_ticks "$server_pid") || c1=""
        rss=$(status_kib "$server_pid" VmHWM)
        stop_pid "$server_pid"
        server_pid=""
        line=$(grep '^RESULT ' "$llog" | tail -1)
        if [ -n "$line" ] && [ -n "$c1" ]; then
            R_msgs=$(kv msgs "$line") R_rate=$(kv msgs_per_s "$line")
            R_p50=$(kv p50_us "$line") R_p99=$(kv p99_us "$line") R_rss=${rss:-0}
            read -r R_cpu R_util R_us < <(awk -v c0="$c0" -v c1="$c1" -v hz="$hz" -v m="$R_msgs" \
                -v t0="$t0" -v t1="$t1" 'BEGIN { s = (c1 - c0) / hz; w = (t1 - t0) / 1e9
                    printf "%.2f %.0f %s\n", s, (w > 0 ? 100 * s / w : 0), (m > 0 ? sprintf("%.4f", s * 1e6 / m) : "nan") }')
            # the loadgen's CPU over its window: with srv% also low, something else had the CPUs
            R_lg=$(awk -v c="$(kv lg_cpu_s "$line")" -v w="$(kv secs "$line")" 'BEGIN { printf "%.0f", (w > 0 ? 100 * c / w : 0) }')
            R_lost=$(kv lost "$line")
            if [ "$rc" -eq 0 ]; then
                R_ok=1
            elif [ "$lag" = lag ] && [ "$rc" -eq 1 ] && [ "${R_lost:-0}" -gt 0 ] &&
                [ "$(kv out_of_order "$line")" = 0 ] && [ "$(kv errors "$line")" = "$R_lost" ]; then
                R_ok=2
            fi
        fi
        if [ "$R_ok" = 0 ]; then
            echo "bench: $scen $name round $round FAILED (loadgen exit ${rc:-?}$([ -n "$c1" ] || echo ", server died")); $llog:" >&2
            grep -v '^RESULT ' "$llog" | tail -3 >&2
        fi
    fi
    R_st=FAILED
    [ "$R_ok" = 1 ] && R_st=ok
    [ "$R_ok" = 2 ] && R_st=behind
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scen" "$name" "$round" \
        "$R_st" "$R_msgs" "$R_rate" "$R_cpu" "$R_util" \
        "$R_us" "$R_p50" "$R_p99" "$R_rss" "$R_lg" "${R_lost:-0}" >>"$out_tsv"
    [ "$R_ok" != 0 ]
}

# --------------------------------------------------------------- scenarios
# selected ID: whether BENCH_SCENARIOS (if set) names this scenario
selected() {
    [ -z "${BENCH_SCENARIOS:-}" ] && return 0
    case " $BENCH_SCENARIOS " in *" $1 "*) return 0 ;; esac
    return 1
}
SCENS=()
declare -A S_TITLE S_LOAD S_UNIT S_BASE S_ORDER
fail=0 nrun=0
# scenario ID "TITLE" UNIT "LOADGEN ARGS" ROUNDS CONTENDER...
scenario() {
    local id=$1 title=$2 unit=$3 load=$4 rounds=$5 r k i n
    shift 5
    selected "$id" || return 0
    available "$@"
    n=${#AV[@]}
    if [ "$COUNTING" = 1 ]; then TOTAL_RUNS=$((TOTAL_RUNS + rounds * n)); return; fi
    SCENS+=("$id") S_TITLE[$id]=$title S_LOAD[$id]=$load S_UNIT[$id]=$unit
    S_BASE[$id]=$(echo "${AV[0]}" | cut -d'|' -f1)
    S_ORDER[$id]=""
    for ((i = 0; i < n; i++)); do S_ORDER[$id]="${S_ORDER[$id]} $(echo "${AV[$i]}" | cut -d'|' -f1)"; done
    echo
    echo "== [$(elapsed) s$(eta)] $id: $title — $rounds round(s) x $n contenders"
    echo "   loadgen $load"
    for ((r = 1; r <= rounds; r++)); do
        for ((k = 0; k < n; k++)); do
            i=$k
            [ $((r % 2)) -eq 0 ] && i=$((n - 1 - k)) # A B C, C B A, ...
            local name cmd lag
            name=$(echo "${AV[$i]}" | cut -d'|' -f1)
            cmd=$(echo "${AV[$i]}" | cut -d'|' -f3)
            lag=$(echo "${AV[$i]}" | cut -d'|' -f4)
            nrun=$((nrun + 1))
            run_one "$id" "$name" "$cmd" "$r" "$load" "$lag" || fail=1
            st=$R_st
            [ "$R_ok" = 2 ] && st="behind: $R_lost deliveries missing after the drain"
            printf '   [%3d/%d %3ss] r%d %-12s %9s %s/s  %8s us/%s  p50 %8s us  p99 %8s us  srv %3s%%  lg %3s%%  rss %6s KiB  %s\n' \
                "$nrun" "$TOTAL_RUNS" "$(elapsed)" "$r" "$name" "$R_rate" "$unit" "$R_us" "$unit" "$R_p50" "$R_p99" "$R_util" "$R_lg" "$R_rss" "$st"
        done
    done
    print_medians "$id"
}

# medians of one scenario from the TSV:
#   contender msgs/s us paired ratio p50 p99 util rss_MiB ok n behind delivered%
# Runs that are "behind" count in the medians beside the ok ones (their numbers are what
# the server did while saturated: CPU per delivery made, the latency of what arrived);
# delivered% is the median, over the behind runs, of the share of the deliveries that
# arrived before the drain ended.
# ratio  = median us/msg of the contender / median us/msg of the baseline (ratio of medians)
# paired = median over the rounds of (contender's us/msg / the baseline's us/msg in the
#          same round); only rounds in which both succeeded count. A slow phase of the
#          machine hits both runs of a round, so this is the steadier of the two.
medians() {
    awk -F'\t' -v s="$1" -v order="${S_ORDER[$1]}" -v base="${S_BASE[$1]}" '
    function med(str,   a, n, i, j, t) {
        n = split(str, a, " "); if (n == 0) return "nan"
        for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
        return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
    $1 == s { tot[$2]++; if ($4 == "ok" || $4 == "behind") { if ($4 == "ok") ok[$2]++; else bh[$2]++
              R[$2] = R[$2] " " $6; U[$2] = U[$2] " " $9
              P5[$2] = P5[$2] " " $10; P9[$2] = P9[$2] " " $11; C[$2] = C[$2] " " $8; M[$2] = M[$2] " " $12
              if ($4 == "behind") D[$2] = D[$2] " " ($5 + $14 > 0 ? 100 * $5 / ($5 + $14) : 0)
              rounds[$3] = 1; if ($9 != "nan") UR[$2, $3] = $9 + 0 } }
    END { n = split(order, o, " "); bu = med(U[base])
        for (i = 1; i <= n; i++) { c = o[i]; u = med(U[c])
            ratio = (u == "nan" || bu == "nan" || bu == 0) ? "nan" : sprintf("%.2f", u / bu)
            pr = ""
            for (r in rounds)
                if ((c, r) in UR && (base, r) in UR && UR[base, r] > 0)
                    pr = pr " " (UR[c, r] / UR[base, r])
            p = med(pr); paired = (p == "nan") ? "nan" : sprintf("%.2f", p)
            printf "%s\t%.0f\t%s\t%s\t%s\t%.0f\t%.0f\t%.0f\t%.1f\t%d\t%d\t%d\t%.0f\n", c, med(R[c]),
                (u == "nan" ? "nan" : sprintf("%.3f", u)), paired, ratio, med(P5[c]), med(P9[c]), med(C[c]),
                med(M[c]) / 1024, ok[c], tot[c], bh[c], med(D[c]) } }' "$out_tsv"
}
# okcol OK N BEHIND DELIVERED%: the "ok" column, e.g. "3/3" or "0/3, 3 behind (14% delivered)"
okcol() {
    if [ "$3" -gt 0 ]; then echo "$1/$2, $3 behind ($4% delivered)"; else echo "$1/$2"; fi
}
print_medians() {
    local id=$1
    echo "   medians over the rounds; paired = median of the per-round ratios of server us/${S_UNIT[$id]} to ${S_BASE[$id]}'s"
    echo "   in the same round; ratio = median over ${S_BASE[$id]}'s median:"
    printf '   %-12s %10s %10s %6s %6s %9s %9s %5s %8s %s\n' contender "${S_UNIT[$id]}/s" "us/${S_UNIT[$id]}" paired ratio p50_us p99_us srv% rss_MiB ok
    medians "$id" | while IFS=$'\t' read -r c r u pr ra p5 p9 cp m ok n bh dl; do
        printf '   %-12s %10s %10s %6s %6s %9s %9s %5s %8s %s\n' "$c" "$r" "$u" "$pr" "$ra" "$p5" "$p9" "$cp" "$m" "$(okcol "$ok" "$n" "$bh" "$dl")"
    done
}

# summary: one row per scenario, the paired ratio of every contender (TSV, header first)
summary() {
    local id names="" c
    for c in "${ECHO_ALL[@]}"; do names="$names ${c%%|*}"; done
    for id in "${SCENS[@]}"; do
        medians "$id" | awk -F'\t' -v id="$id" -v names="$names" '
            { pr[$1] = ($10 + $12 == 0 ? "FAILED" : ($12 > 0 ? $4 " (behind)" : $4)) }
            END { n = split(names, o, " "); line = id
                  for (i = 1; i <= n; i++) line = line "\t" ((o[i] in pr) ? pr[o[i]] : "-"); print line }'
    done | { echo "scenario$names" | tr ' ' '\t'; cat; }
}

# chat_summary: one row per chat scenario, each contender's median server µs per delivery
# and median p99 delivery latency side by side (TSV, header first); "behind" marks a
# contender that did not deliver everything before the drain ended
chat_summary() {
    local id names="" c
    for c in "${CHAT_ALL[@]}"; do names="$names ${c%%|*}"; done
    for id in "${SCENS[@]}"; do
        [ "${S_UNIT[$id]}" = delivery ] || continue
        medians "$id" | awk -F'\t' -v id="$id" -v names="$names" '
            { cell[$1] = ($10 + $12 == 0 ? "FAILED" : sprintf("%s µs, p99 %.1f ms%s", $3, $7 / 1000,
                ($12 > 0 ? sprintf(" (behind, %d%% delivered)", $13) : ""))) }
            END { n = split(names, o, " "); line = id
                  for (i = 1; i <= n; i++) line = line "\t" ((o[i] in cell) ? cell[o[i]] : "-"); print line }'
    done | { echo "scenario$names" | tr ' ' '\t'; cat; }
}

# memory per idle connection: N idle connections from 2 idle_conns processes (< 20,000 fds each)
MEM_ROWS=()
memory_test() {
    local conns=$1 c name cmd log rss0 rss1 fd0 fdn deadline half p ok
    shift
    selected "idle$conns" || return 0
    available "$@"
    [ -x "$B/idle_conns" ] || { [ "$COUNTING" = 1 ] || echo "bench: idle_conns not built; memory test skipped"; return; }
    if [ "$COUNTING" = 1 ]; then TOTAL_RUNS=$((TOTAL_RUNS + ${#AV[@]})); return; fi
    echo
    echo "== [$(elapsed) s$(eta)] idle$conns: server memory per idle connection, $conns connections"
    half=$((conns / 2))
    for c in "${AV[@]}"; do
        name=$(echo "$c" | cut -d'|' -f1)
        cmd=$(echo "$c" | cut -d'|' -f3)
        case "$cmd" in *cport-server*) cmd="$cmd --max-sessions $((conns + 1000))" ;; esac
        log="$logdir/idle.$name.server.log"
        ok=0 rss0=0 rss1=0
        nrun=$((nrun + 1))
        if start_server "$name" "$cmd" "$log"; then
            rss0=$(status_kib "$server_pid" VmRSS)
            fd0=$(ls "/proc/$server_pid/fd" | wc -l)
            idle_pids=""
            for p in 1 2; do
                taskset -c "$LCPU" "$B/idle_conns" --port "$P" --conns "$half" --hold 60 \
                    >"$logdir/idle.$name.client$p.log" 2>&1 </dev/null &
                idle_pids="$idle_pids $!"
            done
            deadline=$(( $(date +%s) + 30 ))
            while :; do
                fdn=$(ls "/proc/$server_pid/fd" 2>/dev/null | wc -l)
                [ "$fdn" -ge $((fd0 + 2 * half)) ] && { ok=1; break; }
                [ "$(date +%s)" -ge "$deadline" ] && break
                sleep 0.2
            done
            sleep 1
            rss1=$(status_kib "$server_pid" VmRSS)
            for p in $idle_pids; do kill -0 "$p" 2>/dev/null || ok=0; done
            for p in $idle_pids; do stop_pid "$p" 20; done
            idle_pids=""
            stop_pid "$server_pid"
            server_pid=""
        fi
        [ "$ok" = 1 ] || { fail=1; echo "bench: idle $name FAILED (server has $((fdn - fd0)) of $conns)" >&2; }
        local per
        per=$(awk -v a="$rss0" -v b="$rss1" -v n="$conns" 'BEGIN { printf "%.0f", (b - a) * 1024 / n }')
        printf '   [%3d/%d %3ss] %-12s RSS %6s -> %6s KiB: %5s B/connection  %s\n' "$nrun" "$TOTAL_RUNS" "$(elapsed)" \
            "$name" "$rss0" "$rss1" "$per" \
            "$([ "$ok" = 1 ] && echo ok || echo FAILED)"
        MEM_ROWS+=("$name|$rss0|$rss1|$per|$([ "$ok" = 1 ] && echo ok || echo FAILED)")
    done
}

# ------------------------------------------------------------------ plan
# The plan runs twice: first with COUNTING=1, which only adds up the runs (for the
# "run k/N" progress and the time estimate), then for real.
plan() {
    local R D sz n id t
    R=${BENCH_ROUNDS:-3}
    if [ "$MODE" = quick ]; then
        D=${BENCH_SECONDS:-1.5}
        scenario echo64x200 "echo 64 B, 200 connections, ping-pong" msg \
            "--mode echo --conns 200 --size 64 --depth 1 --duration $D --drain 3" "$R" "${ECHO_ALL[@]}"
        scenario chat100 "chat, 100 clients x 10 packets/s x 64 B" delivery \
            "--mode chat --conns 100 --rate 10 --size 64 --duration $D --drain 3" "$R" "${CHAT_ALL[@]}"
        MAIN_ECHO=echo64x200 MAIN_CHAT=chat100
        return
    fi
    D=${BENCH_SECONDS:-1.5}
    # Echo: every size x every connection count, ping-pong (depth 1: each connection has
    # one message in flight). In flight at most: 1000 x 16 KiB = 16 MiB; open files:
    # 1000 + a few per process, far below the 20,000 limit.
    for sz in 64 1024 16384; do
        for n in 10 200 1000; do
            case $sz in 64) id=echo64x$n t="64 B" ;; 1024) id=echo1kx$n t="1 KiB" ;; *) id=echo16kx$n t="16 KiB" ;; esac
            scenario "$id" "echo $t, $n connections, ping-pong" msg \
                "--mode echo --conns $n --size $sz --depth 1 --duration $D --drain 3" "$R" "${ECHO_ALL[@]}"
        done
    done
    scenario packet64x200 "packet echo 64 B, 200 connections, 4 in flight" msg \
        "--mode packet --conns 200 --size 64 --depth 4 --duration $D --drain 3" "$R" "${PACKET_ALL[@]}"
    scenario chat100 "chat, 100 clients x 10 packets/s x 64 B" delivery \
        "--mode chat --conns 100 --rate 10 --size 64 --duration $D --drain 3" "$R" "${CHAT_ALL[@]}"
    scenario chat500 "chat, 500 clients x 1 packet/s x 64 B" delivery \
        "--mode chat --conns 500 --rate 1 --size 64 --duration $D --drain 3" "$R" "${CHAT_ALL[@]}"
    scenario chat1000 "chat, 1000 clients x 1 packet/s x 64 B" delivery \
        "--mode chat --conns 1000 --rate 1 --size 64 --duration $D --drain 2" "$R" "${CHAT_ALL[@]}"
    scenario churn50 "connection churn: 50 slots connect, echo 64 B, close" conn \
        "--mode churn --conns 50 --size 64 --duration $D --drain 3" "$R" "${ECHO_ALL[@]}"
    memory_test 10000 "${ECHO_ALL[@]}"
    MAIN_ECHO=echo64x200 MAIN_CHAT=chat1000
}

COUNTING=1 TOTAL_RUNS=0
plan
COUNTING=0
if [ "$TOTAL_RUNS" = 0 ]; then
    echo "bench: nothing to run (BENCH_SCENARIOS=\"${BENCH_SCENARIOS:-}\" names no $MODE scenario, or no contender is built)" >&2
    exit 2
fi
: >"$out_tsv"
echo "bench ($MODE): $TOTAL_RUNS runs; server on CPU $SCPU, loadgen on CPU $LCPU, CLK_TCK=$hz; programs in $B; logs in $logdir"
plan

# ---------------------------------------------------------------- report
T_TOTAL=$(elapsed)
cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
{
    echo "# cport against what users would pick instead ($MODE run)"
    echo
    echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC'). Machine: $(nproc) CPUs ($cpu_model), kernel $(uname -r),"
    echo "$(. /etc/os-release 2>/dev/null; echo "${PRETTY_NAME:-?}"), $(gcc --version 2>/dev/null | head -1),"
    echo "build type $(awk -F= '/^CMAKE_BUILD_TYPE:/ { print ($2 == "" ? "(default: RelWithDebInfo)" : $2) }' "$B/CMakeCache.txt" 2>/dev/null),"
    echo "CLK_TCK=$hz. Loopback only. Total run time ${T_TOTAL} s."
    echo
    if [ -n "${BENCH_SCENARIOS:-}" ]; then
        echo "Command: \`$([ -n "${BENCH_ROUNDS:-}" ] && echo "BENCH_ROUNDS=$BENCH_ROUNDS ")BENCH_SCENARIOS=\"$BENCH_SCENARIOS\" bench/run.sh $1 $MODE\` (a subset of \`make bench$([ "$MODE" = quick ] && echo -quick)\`)."
    else
        echo "Command: \`bench/run.sh $1 $MODE\` (\`make bench$([ "$MODE" = quick ] && echo -quick)\`)."
    fi
    echo "Each run starts the server pinned to CPU $SCPU (\`taskset -c $SCPU\`), runs \`taskset -c $LCPU loadgen ARGS --port P\`,"
    echo "reads the server's utime+stime from /proc/PID/stat before and after, and stops the server"
    echo "(SIGTERM). Contenders alternate (A B C …, then C B A …). Every number is the median over"
    echo "the rounds that succeeded (or, for a chat peer, fell behind: see below). Two ratios of the server's CPU per message to raw_epoll's:"
    echo "**\`paired\`** is the median over the rounds of (contender / raw_epoll in the same round),"
    echo "so a slow phase of the machine, which hits both runs of a round, cancels out;"
    echo "\`ratio\` is the median over raw_epoll's median. Every contender runs one thread"
    echo "(\`--threads 1\`, \`--workers 1\`). RSS is the server's peak (VmHWM) at the end of the run."
    echo "The echo scenarios are ping-pong: one message in flight per connection (\`--depth 1\`)."
    echo
    echo "Contenders: raw_epoll = \`raw_epoll_echo\` / \`raw_epoll_chat\`; raw_uring = \`raw_uring_echo\`"
    echo "(multishot accept + recv, provided buffers, SINGLE_ISSUER|DEFER_TASKRUN); libuv = \`uv_echo\` / \`uv_chat\`"
    echo "(libuv $(dpkg-query -W -f='${Version}' libuv1 2>/dev/null)); asio = \`asio_echo\` / \`asio_chat\` (standalone Asio"
    echo "$(dpkg-query -W -f='${Version}' libasio-dev 2>/dev/null)); cport_epoll / cport_uring = \`cport-server --backend epoll|uring --workers 1\`."
    echo "The chat peers are written as their libraries' own examples write a broadcast: libuv, one"
    echo "\`uv_write\` per packet per recipient; Asio, a deque per session with one \`async_write\` in"
    echo "flight. Where that cannot keep up on one CPU, the run is reported as *behind* (only deliveries"
    echo "missing at the end of the drain, nothing out of order or corrupted), with the share delivered;"
    echo "its µs/delivery is then the server's CPU per delivery made while saturated, and its p99 the"
    echo "latency of what did arrive."
    [ -n "$skipped" ] && echo "Not built, so skipped:$skipped."
    echo
    echo "## Summary: server CPU per message, paired ratio to raw_epoll (lower is better)"
    echo
    summary | awk -F'\t' '{ printf "|"; for (i = 1; i <= NF; i++) printf " %s |", $i; print ""
        if (NR == 1) { printf "|"; for (i = 1; i <= NF; i++) printf "---|"; print "" } }'
    if [ "$(chat_summary | wc -l)" -gt 1 ]; then
        echo
        echo "## Chat: server CPU per delivery beside p99 delivery latency (medians)"
        echo
        chat_summary | awk -F'\t' '{ printf "|"; for (i = 1; i <= NF; i++) printf " %s |", $i; print ""
            if (NR == 1) { printf "|"; for (i = 1; i <= NF; i++) printf "---|"; print "" } }'
    fi
    for id in "${SCENS[@]}"; do
        u=${S_UNIT[$id]}
        echo
        echo "## $id: ${S_TITLE[$id]}"
        echo
        echo "\`loadgen ${S_LOAD[$id]}\`"
        echo
        if [ "$u" = delivery ]; then us=deliveries; else us=${u}s; fi
        echo "| contender | $us/s | server µs/$u | paired | ratio | p50 µs | p99 µs | server CPU % | peak RSS MiB | ok runs |"
        echo "|---|---|---|---|---|---|---|---|---|---|"
        medians "$id" | while IFS=$'\t' read -r c r us pr ra p5 p9 cp m ok n bh dl; do
            echo "| $c | $r | $us | $pr | $ra | $p5 | $p9 | $cp | $m | $(okcol "$ok" "$n" "$bh" "$dl") |"
        done
    done
    if [ ${#MEM_ROWS[@]} -gt 0 ]; then
        echo
        echo "## idle10000: server memory per idle connection"
        echo
        echo "10,000 connections from two \`idle_conns\` processes (5,000 each, pinned to CPU $LCPU), which"
        echo "send nothing; the server's VmRSS before they connect and 1 s after it holds all of them."
        echo "cport-server gets \`--max-sessions 11000\`. Kernel socket memory is not in RSS."
        echo
        echo "| contender | RSS before KiB | RSS with 10k KiB | bytes / connection | status |"
        echo "|---|---|---|---|---|"
        for row in "${MEM_ROWS[@]}"; do
            IFS='|' read -r c a b per st <<<"$row"
            echo "| $c | $a | $b | $per | $st |"
        done
    fi
    echo
    echo "Raw per-run rows: \`$(basename "$out_tsv")\` (scenario, contender, round, status, msgs, msgs/s,"
    echo "server CPU s, server CPU %, µs/msg, p50, p99, peak RSS KiB, loadgen CPU %, deliveries lost). Chart: \`$(basename "$out_png")\`."
} >"$out_md"

# chart: server CPU per message for the main echo scenario; for the main chat scenario,
# server CPU per delivery beside the p99 delivery latency (log scale: a peer that falls
# behind has seconds). With BENCH_SCENARIOS, the panels of the scenarios that ran.
in_scens() { case " ${SCENS[*]} " in *" $1 "*) return 0 ;; esac; return 1; }
if ! in_scens "$MAIN_CHAT"; then # the last chat scenario that ran, if any
    MAIN_CHAT=""
    for id in "${SCENS[@]}"; do [ "${S_UNIT[$id]}" = delivery ] && MAIN_CHAT=$id; done
fi
in_scens "$MAIN_ECHO" || MAIN_ECHO=""
npanels=0
[ -n "$MAIN_ECHO" ] && npanels=$((npanels + 1))
[ -n "$MAIN_CHAT" ] && npanels=$((npanels + 2))
if [ "$npanels" = 0 ]; then
    echo "bench: no echo or chat scenario ran; no chart"
elif command -v gnuplot >/dev/null; then
    d1=$(mktemp) d2=$(mktemp)
    # "label" value; a contender that fell behind is labelled so, with the share delivered
    [ -n "$MAIN_ECHO" ] && medians "$MAIN_ECHO" | awk -F'\t' '$3 != "nan" { printf "\"%s\" %s\n", $1, $3 }' >"$d1"
    [ -n "$MAIN_CHAT" ] && medians "$MAIN_CHAT" | awk -F'\t' '$3 != "nan" {
        l = ($12 > 0 ? sprintf("%s (behind, %d%%)", $1, $13) : $1); printf "\"%s\" %s %.3f\n", l, $3, $7 / 1000 }' >"$d2"
    {
        echo "set terminal pngcairo noenhanced size $((npanels * 550)),470 font \"sans,10\""
        echo "set output \"$out_png\""
        echo "set multiplot layout 1,$npanels title \"cport vs. alternatives, one server thread pinned (median of rounds, lower is better)\""
        echo "set style fill solid 0.8 border -1"
        echo "set boxwidth 0.6"
        echo "set grid ytics"
        echo "set offsets 0, 0, graph 0.08, 0"
        echo "unset key"
        echo "set xtics rotate by -30"
        if [ -n "$MAIN_ECHO" ]; then
            echo "set yrange [0:*]"
            echo "set ylabel \"server µs per message\""
            echo "set title \"${S_TITLE[$MAIN_ECHO]}\""
            echo "plot \"$d1\" using 0:2:xtic(1) with boxes lc rgb \"#4477aa\", \"\" using 0:2:(sprintf(\"%.2f\",\$2)) with labels offset 0,0.7"
        fi
        if [ -n "$MAIN_CHAT" ]; then
            echo "set yrange [0:*]"
            echo "set ylabel \"server µs per delivery\""
            echo "set title \"${S_TITLE[$MAIN_CHAT]}: CPU\""
            echo "plot \"$d2\" using 0:2:xtic(1) with boxes lc rgb \"#cc6677\", \"\" using 0:2:(sprintf(\"%.2f\",\$2)) with labels offset 0,0.7"
            echo "set logscale y"
            echo "set yrange [*:*]"
            echo "set ylabel \"p99 delivery latency, ms (log scale)\""
            echo "set title \"${S_TITLE[$MAIN_CHAT]}: p99 latency\""
            echo "plot \"$d2\" using 0:3:xtic(1) with boxes lc rgb \"#ddaa33\", \"\" using 0:3:(sprintf(\"%.1f\",\$3)) with labels offset 0,0.7"
            echo "unset logscale y"
        fi
        echo "unset multiplot"
    } >"$logdir/chart.gp"
    gnuplot "$logdir/chart.gp" 2>"$logdir/gnuplot.log" || echo "bench: gnuplot failed, see $logdir/gnuplot.log and chart.gp" >&2
    rm -f "$d1" "$d2"
else
    echo "bench: gnuplot not installed; no chart (apt-get install gnuplot-nox)"
fi

echo
echo "summary: server CPU per message, paired ratio to raw_epoll (median of per-round ratios; lower is better)"
summary | awk -F'\t' '{ printf "   %-14s", $1; for (i = 2; i <= NF; i++) printf " %11s", $i; print "" }'
if [ "$(chat_summary | wc -l)" -gt 1 ]; then
    echo
    echo "chat: server µs per delivery and p99 delivery latency (medians)"
    chat_summary | awk -F'\t' 'NR > 1 { for (i = 2; i <= NF; i++) printf "   %-10s %-12s %s\n", (i == 2 ? $1 : ""), h[i], $i }
        NR == 1 { for (i = 2; i <= NF; i++) h[i] = $i }'
fi
echo
echo "bench ($MODE): $nrun runs in $(elapsed) s; $( [ $fail = 0 ] && echo "no failure" || echo "SOME RUNS FAILED")"
[ -n "$skipped" ] && echo "bench: not built, skipped:$skipped"
echo "bench: wrote $out_md, $out_png, $out_tsv"
exit $fail
