#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# cpu_compare.sh — server CPU time per message, contenders side by side.
#
#   bench/cpu_compare.sh [options] --load "LOADGEN ARGS" NAME=COMMAND [NAME=COMMAND ...]
#
# Each COMMAND is a simple command line (optionally preceded by VAR=value
# assignments) in which {PORT} is replaced by a fresh port, e.g.
#   "raw=./raw_epoll_echo --port {PORT}"
#   "cport=CP_BACKEND=epoll ./cport-echo --port {PORT}"
# The first contender is the baseline. For each of R rounds, the contenders run
# in the given order (A B A B ...; --abba reverses every other round). One run:
#   1. start the server pinned to --server-cpu (taskset), wait until its port listens;
#   2. read its utime+stime from /proc/PID/stat;
#   3. run the loadgen pinned to --load-cpu with the --load args plus --port;
#   4. read utime+stime again; stop the server with SIGTERM (SIGKILL after 5 s);
#   5. server CPU microseconds per message = CPU ticks / CLK_TCK * 1e6 / msgs,
#      msgs from the loadgen's RESULT line (chat: deliveries).
# srv% is the server's CPU use over the run (100 = one CPU busy), lg% the loadgen's
# over its load window: a side near 100 is the bottleneck.
# Prints a table per round, then per contender the medians and the ratio to the
# baseline (ratio of medians, and median of the per-round paired ratios), and
# how far the paired median can be trusted: a 90% bootstrap interval and the
# number of rounds in which the contender cost less than the baseline.
# Exit 0 if every run succeeded (loadgen exit 0), 1 if any failed, 2 on bad usage.
# shellcheck disable=SC2317,SC2059  # cleanup runs from a trap; printf formats are ours
set -u
# cpu_ticks, listening, next_port (P from $port), kv and median
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
    cat <<'EOF'
usage: cpu_compare.sh [options] --load "LOADGEN ARGS" NAME=COMMAND [NAME=COMMAND ...]
  NAME=COMMAND       a contender; {PORT} in COMMAND is replaced by the port (first = baseline)
  --load "ARGS"      loadgen arguments without --port (e.g. "--mode echo --conns 200 --size 64 --depth 4 --duration 5")
  --rounds R         rounds, each runs every contender once, in order (default 3)
  --abba             reverse the order every other round (A B, B A, ...) to cancel drift
  --loadgen PATH     loadgen binary (default: ./loadgen, build/loadgen, or loadgen on PATH)
  --server-cpu C     CPU for the server (default 0)
  --load-cpu C       CPU for the loadgen (default 1)
  --port-base P      first port to use; every run takes the next free one (default 17700)
  --ready-timeout S  seconds to wait for the server to listen (default 10)
  --run-timeout S    hard limit for one loadgen run in seconds (default 120)
  --logs DIR         keep server and loadgen output there (default: a temporary dir, removed)
EOF
}

abba=0 rounds=3 load="" loadgen="" scpu=0 lcpu=1 port=17700 ready_to=10 run_to=120 logdir="" keep_logs=0
names=() cmds=()
while [ $# -gt 0 ]; do
    case "$1" in
    --load) [ $# -ge 2 ] || { usage >&2; exit 2; }; load=$2; shift 2 ;;
    --rounds) [ $# -ge 2 ] || { usage >&2; exit 2; }; rounds=$2; shift 2 ;;
    --abba) abba=1; shift ;;
    --loadgen) [ $# -ge 2 ] || { usage >&2; exit 2; }; loadgen=$2; shift 2 ;;
    --server-cpu) [ $# -ge 2 ] || { usage >&2; exit 2; }; scpu=$2; shift 2 ;;
    --load-cpu) [ $# -ge 2 ] || { usage >&2; exit 2; }; lcpu=$2; shift 2 ;;
    --port-base) [ $# -ge 2 ] || { usage >&2; exit 2; }; port=$2; shift 2 ;;
    --ready-timeout) [ $# -ge 2 ] || { usage >&2; exit 2; }; ready_to=$2; shift 2 ;;
    --run-timeout) [ $# -ge 2 ] || { usage >&2; exit 2; }; run_to=$2; shift 2 ;;
    --logs) [ $# -ge 2 ] || { usage >&2; exit 2; }; logdir=$2; keep_logs=1; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "cpu_compare: unknown option $1" >&2; usage >&2; exit 2 ;;
    *=*) names+=("${1%%=*}"); cmds+=("${1#*=}"); shift ;;
    *) echo "cpu_compare: expected NAME=COMMAND, got '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
isint() { [[ $1 =~ ^[0-9]+$ ]]; }
if [ ${#names[@]} -eq 0 ] || [ -z "$load" ] || ! isint "$rounds" || [ "$rounds" -lt 1 ] ||
   ! isint "$scpu" || ! isint "$lcpu" || ! isint "$port" || ! isint "$ready_to" || ! isint "$run_to"; then
    usage >&2
    exit 2
fi
for c in "${cmds[@]}"; do
    case "$c" in *"{PORT}"*) ;; *) echo "cpu_compare: command without {PORT}: $c" >&2; exit 2 ;; esac
done
case " $load " in *" --port "*|*" --port="*) echo "cpu_compare: --load must not contain --port" >&2; exit 2 ;; esac
if [ -z "$loadgen" ]; then
    for p in ./loadgen ./build/loadgen "$(command -v loadgen 2>/dev/null)"; do
        if [ -n "$p" ] && [ -x "$p" ]; then loadgen=$p; break; fi
    done
fi
if [ -z "$loadgen" ] || [ ! -x "$loadgen" ]; then
    echo "cpu_compare: no loadgen binary found (use --loadgen PATH)" >&2
    exit 2
fi
for t in taskset timeout awk getconf; do
    command -v $t >/dev/null || { echo "cpu_compare: needs $t" >&2; exit 2; }
done
hz=$(getconf CLK_TCK)
if [ -z "$logdir" ]; then
    logdir=$(mktemp -d /tmp/cpu_compare.XXXXXX)
else
    mkdir -p "$logdir" || exit 2
fi

# ---------------------------------------------------------------- cleanup
server_pid="" load_pid=""
cleanup() {
    local p
    for p in $load_pid $server_pid; do
        kill -TERM "$p" 2>/dev/null
    done
    for p in $load_pid $server_pid; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null
    done
    wait 2>/dev/null
    load_pid="" server_pid=""
    [ "$keep_logs" = 1 ] || rm -rf "$logdir"
}
trap cleanup EXIT
trap 'echo "cpu_compare: interrupted" >&2; exit 130' INT TERM HUP

# ------------------------------------------------------------------ helpers
now_ns() { date +%s%N; }

# run_one NAME COMMAND -> sets R_msgs R_rate R_cpu_s R_util R_lg R_us R_p99 R_ok
run_one() {
    local name=$1 cmd=$2 p log llog t0 t1 c0 c1 rc line
    next_port
    p=$P
    cmd=${cmd//\{PORT\}/$p}
    log="$logdir/$name.r$round.server.log"
    llog="$logdir/$name.r$round.loadgen.log"
    R_msgs=0 R_rate=0 R_cpu_s=0 R_util=0 R_lg=- R_us=nan R_p99=nan R_ok=0
    taskset -c "$scpu" bash -c "exec env $cmd" >"$log" 2>&1 </dev/null &
    server_pid=$!
    local deadline=$(( $(date +%s) + ready_to ))
    while ! listening "$p"; do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            echo "cpu_compare: $name: server exited before listening (see below)" >&2
            tail -5 "$log" >&2
            server_pid=""
            return 1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "cpu_compare: $name: not listening on port $p after ${ready_to}s" >&2
            cleanup_server
            return 1
        fi
        sleep 0.05
    done
    sleep 0.1
    c0=$(cpu_ticks "$server_pid") || { echo "cpu_compare: $name: server gone" >&2; server_pid=""; return 1; }
    t0=$(now_ns)
    # shellcheck disable=SC2086
    timeout -k 5 "$run_to" taskset -c "$lcpu" "$loadgen" $load --port "$p" >"$llog" 2>&1 </dev/null &
    load_pid=$!
    wait "$load_pid"
    rc=$?
    load_pid=""
    t1=$(now_ns)
    c1=$(cpu_ticks "$server_pid") || c1=""
    cleanup_server
    line=$(grep '^RESULT ' "$llog" | tail -1)
    if [ -z "$c1" ]; then
        echo "cpu_compare: $name: the server died during the run" >&2
        rc=1
    fi
    if [ $rc -ne 0 ] || [ -z "$line" ]; then
        echo "cpu_compare: $name round $round: loadgen exit $rc" >&2
        grep -v '^RESULT ' "$llog" | tail -5 >&2
        [ -n "$line" ] && echo "$line" >&2
    fi
    [ -n "$line" ] || return 1
    R_msgs=$(kv msgs "$line")
    R_rate=$(kv msgs_per_s "$line")
    R_p99=$(kv p99_us "$line")
    R_lg=$(awk -v c="$(kv lg_cpu_s "$line")" -v s="$(kv secs "$line")" \
        'BEGIN { if (c == "" || s + 0 <= 0) print "-"; else printf "%.0f\n", 100 * c / s }')
    [ -n "$c1" ] || return 1
    read -r R_cpu_s R_util R_us < <(awk -v c0="$c0" -v c1="$c1" -v hz="$hz" -v m="$R_msgs" \
        -v t0="$t0" -v t1="$t1" 'BEGIN {
            s = (c1 - c0) / hz; w = (t1 - t0) / 1e9
            u = (w > 0) ? 100 * s / w : 0
            per = (m > 0) ? sprintf("%.4f", s * 1e6 / m) : "nan"
            printf "%.2f %.0f %s\n", s, u, per }')
    [ $rc -eq 0 ] && R_ok=1
    return 0
}

cleanup_server() {
    [ -n "$server_pid" ] || return 0
    kill -TERM "$server_pid" 2>/dev/null
    local i
    for i in $(seq 1 50); do
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$server_pid" 2>/dev/null; then
        echo "cpu_compare: server $server_pid ignored SIGTERM for 5 s; killing it" >&2
        kill -KILL "$server_pid" 2>/dev/null
    fi
    wait "$server_pid" 2>/dev/null
    server_pid=""
}

spread() { # "[lo, hi] k/N" for per-round ratios on stdin: 90% bootstrap interval of their median
    grep -v -e nan -e '^$' | awk 'function med(a, m,   i, j, t) {
            for (i = 2; i <= m; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
            return m % 2 ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2 }
        { v[NR] = $1; if ($1 < 1) below++ }
        END {
            if (NR == 0) { print "nan"; exit }
            srand(1); B = 2000
            for (b = 1; b <= B; b++) { for (i = 1; i <= NR; i++) s[i] = v[int(rand() * NR) + 1]; m[b] = med(s, NR) }
            med(m, B)
            printf "[%.3f, %.3f] %d/%d\n", m[int(B * 0.05)], m[int(B * 0.95)], below, NR }'
}

# --------------------------------------------------------------------- main
n=${#names[@]}
echo "cpu_compare: $n contender(s), $rounds round(s); server on CPU $scpu, loadgen on CPU $lcpu; CLK_TCK=$hz"
echo "load: $loadgen $load"
for ((i = 0; i < n; i++)); do echo "  [$i] ${names[$i]} = ${cmds[$i]}"; done
fail=0
declare -a res_us res_rate res_p99 res_util
fmt="%-5s %-16s %12s %10s %9s %5s %5s %9s %10s %s\n"
for ((round = 1; round <= rounds; round++)); do
    echo
    printf "$fmt" round contender msgs msgs/s srv_cpu_s srv% lg% us/msg p99_us status
    for ((k = 0; k < n; k++)); do
        i=$k
        if [ "$abba" = 1 ] && [ $((round % 2)) -eq 0 ]; then i=$((n - 1 - k)); fi
        if run_one "${names[$i]}" "${cmds[$i]}"; then
            if [ "$R_ok" = 1 ]; then st=ok; else st=FAILED fail=1; fi
        else
            st=FAILED fail=1
        fi
        printf "$fmt" "$round" "${names[$i]}" "$R_msgs" "$R_rate" "$R_cpu_s" "$R_util" "$R_lg" "$R_us" "$R_p99" "$st"
        [ "$st" = ok ] || R_us=nan
        res_us[round * n + i]=$R_us
        res_rate[round * n + i]=$R_rate
        res_p99[round * n + i]=$R_p99
        res_util[round * n + i]=$R_util
    done
done

echo
echo "medians over $rounds round(s) (ratio = contender / ${names[0]}; paired = median of per-round ratios):"
fmt2="%-16s %10s %12s %10s %6s %8s %8s\n"
printf "$fmt2" contender us/msg msgs/s p99_us srv% ratio paired
base=""
for ((i = 0; i < n; i++)); do
    mu=$(for ((r = 1; r <= rounds; r++)); do echo "${res_us[$((r * n + i))]}"; done | median %.4f)
    mr=$(for ((r = 1; r <= rounds; r++)); do echo "${res_rate[$((r * n + i))]}"; done | median %.0f)
    mp=$(for ((r = 1; r <= rounds; r++)); do echo "${res_p99[$((r * n + i))]}"; done | median %.1f)
    mc=$(for ((r = 1; r <= rounds; r++)); do echo "${res_util[$((r * n + i))]}"; done | median %.0f)
    [ $i -eq 0 ] && base=$mu
    ratio=$(awk -v a="$mu" -v b="$base" 'BEGIN { if (a == "nan" || b == "nan" || b == 0) print "nan"; else printf "%.3f\n", a / b }')
    paired=$(for ((r = 1; r <= rounds; r++)); do
        awk -v a="${res_us[$((r * n + i))]}" -v b="${res_us[$((r * n))]}" \
            'BEGIN { if (a == "nan" || b == "nan" || b == 0) print "nan"; else printf "%.4f\n", a / b }'
    done | median %.4f)
    paired=$(awk -v p="$paired" 'BEGIN { if (p == "nan") print p; else printf "%.3f\n", p }')
    printf "$fmt2" "${names[$i]}" "$mu" "$mr" "$mp" "$mc" "$ratio" "$paired"
done
if [ "$n" -gt 1 ]; then
    echo "paired ratio spread (90% bootstrap interval of the median; rounds cheaper than ${names[0]}):"
    for ((i = 1; i < n; i++)); do
        sp=$(for ((r = 1; r <= rounds; r++)); do
            awk -v a="${res_us[$((r * n + i))]}" -v b="${res_us[$((r * n))]}" \
                'BEGIN { if (a == "nan" || b == "nan" || b == 0) print "nan"; else printf "%.4f\n", a / b }'
        done | spread)
        printf "  %-16s %s\n" "${names[$i]}" "$sp"
    done
fi
[ "$keep_logs" = 1 ] && echo "logs: $logdir"
exit $fail
