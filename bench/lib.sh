# shellcheck shell=bash
# SPDX-License-Identifier: MIT
# lib.sh — the shell helpers the bench scripts share; sourced, never run:
#
#   here=$(cd "$(dirname "$0")" && pwd)
#   ME=tls.sh
#   # shellcheck source=lib.sh
#   . "$here/lib.sh"
#
# Sourcing it only defines functions and sets the variables marked "sets"
# below; nothing runs, and no trap is installed until trap_cleanup.
# Variables the caller provides (each function says which it reads):
#   ME      the script's name, first word of every message ("tls.sh")
#   B       the build directory, absolute (bench_args sets it)
#   ROUNDS  the rounds to run (bench_args sets it)
#   LOG     the directory every log goes to (the script's mktemp -d)
#   T0      the script's start, $(date +%s), for elapsed
#   port    the first port next_port tries; it moves past every port taken
#
# Arguments and requirements
#   bench_args "$@"       [BUILD_DIR] [ROUNDS] (defaults build, 3), or -h:
#                         sets B and ROUNDS; usage on stdout and exit 0 for
#                         -h, on stderr and exit 2 when wrong (reads ME)
#   need_built HINT P...  exit 2 unless every program P is in B ("(HINT)"
#                         is added to the message when HINT is not empty)
#   need_tools T...       exit 2 unless every command T is on PATH
# Processes: every process a script starts in the background is tracked
# (PIDS) until it is waited for, so that an exit or an interrupt ends it.
#   track PID / forget PID  add PID to / remove it from PIDS
#   kill_tracked          SIGTERM to every tracked process, SIGKILL to those
#                         still there after 1 s; waits for every child
#   trap_cleanup          kill_tracked on exit; an interrupt (INT, TERM,
#                         HUP) says so and exits 130
#   fail MESSAGE          "ME: MESSAGE" on stderr, and sets FAILED=1
# Servers: pinned to CPU SCPU (0), their clients to LCPU (1).
#   start_server NAME CMD  runs CMD, where {PORT} is replaced by a free port
#                         (sets P) and {WSPORT} by a second one (sets WP;
#                         empty without {WSPORT}), on SCPU, output in
#                         LOG/NAME.server.log; sets SPID; returns 0 once
#                         every port it was given listens, else fails (fail),
#                         stops the server and returns 1 (after 10 s, or at
#                         once if the server exits)
#   stop_server           SIGTERM to SPID, SIGKILL after 5 s; SPID empty
#   run_load NAME CMD ARGS [tcp|ws]  start_server NAME CMD, then loadgen
#                         ARGS on LCPU against P (tcp, the default) or WP
#                         (ws), with --server-pid; stops the server. Sets
#                         RL (loadgen's RESULT line, "" if none), RL_ok (1
#                         if loadgen and the server lasted) and RL_whole_us
#                         (the server's CPU us per message over the whole
#                         loadgen run, connects included); a failure is
#                         fail-ed with the tail of LOG/NAME.loadgen.log
#   idle_clients LOGFILE ARGS...  idle_conns ARGS on LCPU in the background,
#                         tracked, output in LOGFILE; sets IPID; returns
#                         when its "connected" line is there, when it
#                         exited, or after 30 s
#   listening PORT        true if something listens on TCP PORT (v4 or v6)
#   next_port             sets P to the first port from $port nothing
#                         listens on; $port moves past it
#   cpu_ticks PID         utime+stime of PID, all threads, in clock ticks
#   status_kib PID FIELD  a KiB field of /proc/PID/status (VmRSS, VmHWM)
# Numbers (nan and empty lines are skipped; nan when nothing is left)
#   kv KEY LINE           the value of KEY=value in LINE, "" if none
#   median FORMAT         the median of stdin's numbers, printf FORMAT
#   maxof / minof         the largest / smallest of stdin's numbers
#   div A B [FORMAT]      A / B (FORMAT %.3f); nan if either is, or B is 0
#   verdict V OP LIMIT    ok or MISSED for V OP LIMIT (OP <=, <, >=, ==);
#                         n/a when V is nan or empty
# Running and reporting
#   elapsed               seconds since T0
#   order ROUND N         the indexes 0..N-1, reversed on even rounds
#   want N                true if part N is in PARTS (a list the script sets)
#   row WHAT VALUE GOAL VERDICT   adds a row to the summary (SUM)
#   summary_table W1 W2   the summary: a header and every row, the first
#                         two columns W1 and W2 wide, then "logs: LOG"

# The variables above are set here for the script, or by the script for these
# functions, which shellcheck cannot see when it reads this file alone.
# shellcheck disable=SC2034,SC2154
SCPU=0 LCPU=1
PIDS=""
FAILED=0
SUM=()

# ------------------------------------------------- arguments and requirements
bench_args() {
    local usage="usage: bench/$ME [BUILD_DIR] [ROUNDS]   (defaults: build 3)"
    case "${1:-}" in -h | --help) echo "$usage"; exit 0 ;; esac
    [ $# -le 2 ] || { echo "$usage" >&2; exit 2; }
    B=${1:-build}
    ROUNDS=${2:-3}
    [[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "$usage" >&2; exit 2; }
    B=$(cd "$B" 2>/dev/null && pwd) || { echo "$ME: no build directory ${1:-build}" >&2; exit 2; }
}

need_built() {
    local hint=${1:+ ($1)} p
    shift
    for p in "$@"; do
        [ -x "$B/$p" ] || { echo "$ME: $B/$p not built$hint" >&2; exit 2; }
    done
}

need_tools() {
    local t
    for t in "$@"; do
        command -v "$t" >/dev/null || { echo "$ME: needs $t" >&2; exit 2; }
    done
}

# ------------------------------------------------------------------ processes
track() { PIDS="$PIDS $1"; }

forget() {
    local p out=""
    for p in $PIDS; do [ "$p" = "$1" ] || out="$out $p"; done
    PIDS=$out
}

# shellcheck disable=SC2317  # runs from the trap
kill_tracked() {
    local p
    for p in $PIDS; do kill -TERM "$p" 2>/dev/null; done
    for p in $PIDS; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null
    done
    wait 2>/dev/null
}

trap_cleanup() {
    trap kill_tracked EXIT
    trap 'echo "$ME: interrupted" >&2; exit 130' INT TERM HUP
}

fail() { echo "$ME: $*" >&2; FAILED=1; }

# -------------------------------------------------------------------- servers
listening() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v h=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == h { f = 1 } END { exit !f }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

next_port() {
    while listening "$port"; do port=$((port + 1)); done
    P=$port
    port=$((port + 1))
}

start_server() {
    local name=$1 cmd=$2 p ports="" deadline
    next_port
    p=$P WP=""
    [[ $cmd == *"{PORT}"* ]] && ports=$p
    if [[ $cmd == *"{WSPORT}"* ]]; then
        next_port
        WP=$P
        ports="$ports${ports:+ }$WP"
    fi
    P=$p
    cmd=${cmd//\{PORT\}/$P}
    cmd=${cmd//\{WSPORT\}/$WP}
    # shellcheck disable=SC2086
    taskset -c "$SCPU" $cmd >"$LOG/$name.server.log" 2>&1 </dev/null &
    SPID=$!
    track "$SPID"
    deadline=$(($(date +%s) + 10))
    for p in $ports; do
        while ! listening "$p"; do
            if ! kill -0 "$SPID" 2>/dev/null || [ "$(date +%s)" -ge "$deadline" ]; then
                fail "$name: server not listening on $ports (see $LOG/$name.server.log)"
                stop_server
                return 1
            fi
            sleep 0.05
        done
    done
    sleep 0.1
}

stop_server() {
    [ -n "${SPID:-}" ] || return 0
    kill -TERM "$SPID" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SPID" 2>/dev/null
    wait "$SPID" 2>/dev/null
    forget "$SPID"
    SPID=""
}

run_load() {
    local name=$1 log=$LOG/$1.loadgen.log c0 c1 rc lp
    RL="" RL_ok=0 RL_whole_us=nan
    start_server "$name" "$2" || return 1
    lp=$P
    [ "${4:-tcp}" = ws ] && lp=$WP
    c0=$(cpu_ticks "$SPID")
    # shellcheck disable=SC2086
    timeout -k 5 120 taskset -c "$LCPU" "$B/loadgen" $3 --port "$lp" --server-pid "$SPID" >"$log" 2>&1 </dev/null
    rc=$?
    c1=$(cpu_ticks "$SPID") || c1=""
    stop_server
    RL=$(grep '^RESULT ' "$log" | tail -1)
    [ $rc -eq 0 ] && [ -n "$RL" ] && [ -n "$c1" ] && RL_ok=1
    [ "$RL_ok" = 1 ] || { fail "$name: loadgen exit $rc (see $log)"; grep -v '^RESULT' "$log" | tail -3 >&2; }
    RL_whole_us=$(awk -v a="$c0" -v b="$c1" -v hz="$(getconf CLK_TCK)" -v m="$(kv msgs "$RL")" \
        'BEGIN { if (b == "" || m + 0 == 0) print "nan"; else printf "%.4f\n", (b - a) / hz * 1e6 / m }')
}

idle_clients() {
    local log=$1
    shift
    taskset -c "$LCPU" "$B/idle_conns" "$@" >"$log" 2>&1 </dev/null &
    IPID=$!
    track "$IPID"
    for _ in $(seq 1 300); do
        grep -q '^connected' "$log" 2>/dev/null && break
        kill -0 "$IPID" 2>/dev/null || break
        sleep 0.1
    done
}

cpu_ticks() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) } # drop "pid (comm) "; the fields now start at field 3 (state)
    # shellcheck disable=SC2086
    set -- $s
    echo $((${12} + ${13}))
}

status_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null; }

# -------------------------------------------------------------------- numbers
kv() {
    local w
    for w in $2; do case "$w" in "$1"=*) echo "${w#*=}"; return 0 ;; esac; done
    echo ""
}

median() {
    grep -v -e nan -e '^$' | sort -g | awk -v f="$1\n" '{ v[NR] = $1 } END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) printf f, v[(NR + 1) / 2]; else printf f, (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

maxof() { grep -v -e nan -e '^$' | sort -g | tail -1; }
minof() { grep -v -e nan -e '^$' | sort -g | head -1; }

div() { awk -v a="$1" -v b="$2" -v f="${3:-%.3f}" 'BEGIN { if (a == "" || b == "" || a == "nan" || b == "nan" || b == 0) print "nan"; else printf f "\n", a / b }'; }

verdict() {
    awk -v v="$1" -v op="$2" -v l="$3" 'BEGIN {
        if (v == "" || v == "nan") { print "n/a"; exit }
        ok = (op == "<=") ? (v + 0 <= l + 0) : (op == "<") ? (v + 0 < l + 0) : (op == ">=") ? (v + 0 >= l + 0) : (v + 0 == l + 0)
        print ok ? "ok" : "MISSED" }'
}

# ------------------------------------------------------ running and reporting
elapsed() { echo $(($(date +%s) - T0)); }

order() {
    local r=$1 n=$2 i
    for ((i = 0; i < n; i++)); do
        if [ $((r % 2)) -eq 0 ]; then echo $((n - 1 - i)); else echo "$i"; fi
    done
}

want() { [[ " $PARTS " == *" $1 "* ]]; }

row() { SUM+=("$1|$2|$3|$4"); }

summary_table() {
    local fmt="%-$1s %-$2s %-13s %s\n" s a v g d
    # shellcheck disable=SC2059  # the format is ours
    printf "$fmt" what measured goal verdict
    for s in "${SUM[@]}"; do
        IFS='|' read -r a v g d <<<"$s"
        # shellcheck disable=SC2059
        printf "$fmt" "$a" "$v" "$g" "$d"
    done
    echo "logs: $LOG"
}
