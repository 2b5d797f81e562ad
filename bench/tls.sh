#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# tls.sh — every TLS acceptance number of issue 17, measured from outside.
#
#   bench/tls.sh [BUILD_DIR] [ROUNDS]        (defaults: build, 3)
#
# Needs the build's cport-server, loadgen, tls_epoll_echo, tls_hs_cost, storm
# and idle_conns (all there when CMake found OpenSSL), asio_tls_echo if it is
# to be compared (skipped if not built), and openssl, taskset, timeout, awk.
# The servers run on CPU 0 (one worker) and every client on CPU 1. The parts:
#
#  1. Echo, 200 connections x 64 B over TLS, 4 in flight, then 1 in flight:
#     server CPU per message by bench/cpu_compare.sh (alternating, --abba) of
#     tls_epoll_echo (the baseline), cport-server on epoll and io_uring, and
#     asio_tls_echo --threads 1 (depth 4 only). Ratios: paired medians of
#     cport / tls_epoll (goal <= 1.00 at depth 4, <= 1.10 at depth 1) and
#     cport / asio (goal <= 0.90). The CPU counted includes the 200 handshakes
#     of the connect phase, for every contender alike (about 1% of a run).
#  2. Handshakes, in one alternating round: tls_hs_cost, OpenSSL's own
#     server CPU per full TLS 1.3 handshake in-process with cport's settings
#     and the same certificate; cport-server's CPU per connection under
#     loadgen --mode churn --tls (connect, full handshake, one 64-byte echo,
#     close_notify, close; the server's CPU from /proc over the load divided
#     by the connections, nothing subtracted), beside the same churn in plain
#     TCP, and tls_epoll_echo under the TLS churn for reference. Goal: cport's
#     TLS churn per connection <= 1.10 x OpenSSL's handshake (paired by round).
#  3. Storm: 100 established TLS sessions echo 64 B every 10 ms each while 2
#     forked processes (nice 10) keep 500 new full handshakes each going for
#     STORM_SECONDS: 1000 handshakes land at once at the start, and every
#     slot starts its next one when one is done (bench/storm.c --tls --slots;
#     at least 1000 handshakes are required). Reported: the sessions' round
#     trip p99 and max during the storm (goal p99 < 5 ms, judged on the
#     median over rounds; the worst round is shown too) and the handshakes
#     per second. The same 100
#     sessions without a storm (quiet_epoll) show the floor the machine
#     allows at the time.
#  4. Idle memory: 2000 idle TLS sessions (idle_conns --tls: each counts once
#     the server's session ticket arrived, i.e. the server finished its
#     handshake) against cport-server; its VmRSS after a warm-up of 50
#     sessions and 3 s of quiet, and again 3 s after all 2000 are up (the
#     worker trims after two quiet seconds). Per session = the difference /
#     2000; the same with plain TCP. Goal <= 16 KiB per TLS session.
#  5. Chat, 1000 clients x 1 packet/s x 64 B (loadgen --mode chat, which
#     checks every delivery, its content and each sender's order) against
#     cport-server --mode chat, TLS and plain alternating. Server CPU per
#     delivery over the load window only (loadgen --server-pid, so the 1000
#     handshakes of the connect phase are left out). Goal: nothing lost,
#     nothing out of order. The drain is 10 s, so a server that fell behind
#     (a busy machine) still gets to deliver everything.
#
# Everything goes to a temporary directory, named at the start (logs, the
# certificate); nothing is written into the repository. The last thing
# printed is the summary table. Exit 0 if every run worked (whatever the
# verdicts), 1 if a run failed, 2 on bad usage or missing programs.
# Environment: TLS_ECHO_SECONDS (4), TLS_CHURN_SECONDS (3), TLS_CHAT_SECONDS
# (5), STORM_SECONDS (5), TLS_HS_COUNT (2000), TLS_IDLE (2000), TLS_PARTS
# (which of the parts above run, default "1 2 3 4 5"; e.g. TLS_PARTS=2 with
# more rounds to look at the handshake figure alone).
set -u

here=$(cd "$(dirname "$0")" && pwd)
ME=tls.sh
# shellcheck source=lib.sh
. "$here/lib.sh"
bench_args "$@"
ECHO_S=${TLS_ECHO_SECONDS:-4}
CHURN_S=${TLS_CHURN_SECONDS:-3}
CHAT_S=${TLS_CHAT_SECONDS:-5}
STORM_S=${STORM_SECONDS:-5}
HS_COUNT=${TLS_HS_COUNT:-2000}
IDLE_N=${TLS_IDLE:-2000}

need_built "OpenSSL missing? apt-get install libssl-dev" cport-server loadgen tls_epoll_echo tls_hs_cost storm idle_conns
need_tools openssl taskset timeout awk getconf
HAVE_ASIO=0
[ -x "$B/asio_tls_echo" ] && HAVE_ASIO=1

LOG=$(mktemp -d /tmp/cport-tls.XXXXXX)
"$here/tls_cert.sh" "$LOG/cert" >/dev/null || exit 2
CERT=$LOG/cert/cert.pem KEY=$LOG/cert/key.pem
SRV="$B/cport-server --workers 1 --tls-cert $CERT --tls-key $KEY"
SRV_PLAIN="$B/cport-server --workers 1"
T0=$(date +%s)

trap_cleanup
port=17800
PARTS=${TLS_PARTS:-1 2 3 4 5}

echo "tls.sh: build $B, $ROUNDS round(s); servers on CPU $SCPU (one worker), clients on CPU $LCPU"
echo "tls.sh: logs and certificate in $LOG"
echo "tls.sh: $(nproc) CPUs online, load average $(cut -d' ' -f1-3 /proc/loadavg); $(openssl version)"

# ------------------------------------------------------- 1. echo CPU per message
# cpu_compare.sh FILE DEPTH CONTENDERS...; prints its medians block
echo_compare() {
    local out=$1 depth=$2
    shift 2
    "$here/cpu_compare.sh" --rounds "$ROUNDS" --abba --loadgen "$B/loadgen" --port-base "$port" \
        --logs "${out%.txt}" --load "--mode echo --tls --conns 200 --size 64 --depth $depth --duration $ECHO_S" \
        "$@" >"$out" 2>&1 || fail "echo depth $depth: a run failed (see $out)"
    port=$((port + 200)) # past the ports cpu_compare.sh took
    sed -n '/^medians over/,/^logs:/p' "$out" | grep -v '^logs:' | sed 's/^/   /'
}

# paired_from FILE A B -> median over rounds of us/msg(A) / us/msg(B), rounds where both are ok
paired_from() {
    awk -v a="$2" -v b="$3" '$1 ~ /^[0-9]+$/ && NF >= 10 && $10 == "ok" { u[$1 SUBSEP $2] = $8; r[$1] = 1 }
        END { for (k in r) if (((k, a) in u) && ((k, b) in u) && u[k, b] > 0) printf "%.4f\n", u[k, a] / u[k, b] }' "$1" |
        median %.3f
}

median_us() { awk -v n="$2" '$1 == n && NF == 7 { print $2 }' "$1"; } # from cpu_compare's medians table

E_TLS="tls_epoll=$B/tls_epoll_echo --port {PORT} --cert $CERT --key $KEY"
E_CE="cport_epoll=$SRV --backend epoll --port {PORT}"
E_CU="cport_uring=$SRV --backend uring --port {PORT}"
E_ASIO="asio=$B/asio_tls_echo --threads 1 --port {PORT} --cert $CERT --key $KEY"

if want 1; then
echo
echo "== [$(elapsed) s] 1a. echo over TLS, 200 conns x 64 B, 4 in flight, ${ECHO_S} s per run"
f4=$LOG/echo-depth4.txt
if [ $HAVE_ASIO = 1 ]; then
    echo_compare "$f4" 4 "$E_TLS" "$E_CE" "$E_CU" "$E_ASIO"
else
    echo "   (asio_tls_echo not built: apt-get install libasio-dev g++; the asio ratios are n/a)"
    echo_compare "$f4" 4 "$E_TLS" "$E_CE" "$E_CU"
fi
for b in epoll uring; do
    r=$(paired_from "$f4" "cport_$b" tls_epoll)
    row "echo d4: cport_$b / tls_epoll (paired)" "$r  ($(median_us "$f4" "cport_$b") / $(median_us "$f4" tls_epoll) us/msg)" "<= 1.00" "$(verdict "$r" '<=' 1.00)"
done
for b in epoll uring; do
    r=$(paired_from "$f4" "cport_$b" asio)
    row "echo d4: cport_$b / asio (paired)" "$r  (asio $(median_us "$f4" asio) us/msg)" "<= 0.90" "$(verdict "$r" '<=' 0.90)"
done

echo
echo "== [$(elapsed) s] 1b. echo over TLS, 200 conns x 64 B, 1 in flight, ${ECHO_S} s per run"
f1=$LOG/echo-depth1.txt
echo_compare "$f1" 1 "$E_TLS" "$E_CE" "$E_CU"
for b in epoll uring; do
    r=$(paired_from "$f1" "cport_$b" tls_epoll)
    row "echo d1: cport_$b / tls_epoll (paired)" "$r  ($(median_us "$f1" "cport_$b") / $(median_us "$f1" tls_epoll) us/msg)" "<= 1.10" "$(verdict "$r" '<=' 1.10)"
done

fi

# ------------------------------------------------------------ 2. handshakes
if want 2; then
echo
echo "== [$(elapsed) s] 2. handshakes: OpenSSL's own (tls_hs_cost, $HS_COUNT, on CPU $SCPU) and churn"
echo "   (connect, full handshake, 64 B echo, close_notify, close; 32 slots, ${CHURN_S} s per run), alternating"
CH_NAMES=(openssl cport_epoll_tls cport_uring_tls tls_epoll_tls cport_epoll_plain cport_uring_plain)
CH_CMDS=("" "$SRV --backend epoll --port {PORT}" "$SRV --backend uring --port {PORT}"
    "$B/tls_epoll_echo --cert $CERT --key $KEY --port {PORT}"
    "$SRV_PLAIN --backend epoll --port {PORT}" "$SRV_PLAIN --backend uring --port {PORT}")
CH_LOAD_TLS="--mode churn --tls --conns 32 --size 64 --duration $CHURN_S"
CH_LOAD_PLAIN="--mode churn --conns 32 --size 64 --duration $CHURN_S"
declare -A CH
printf '   %-5s %-18s %9s %9s %11s %9s\n' round contender conns conns/s us/conn p99_us
for ((r = 1; r <= ROUNDS; r++)); do
    for i in $(order "$r" ${#CH_NAMES[@]}); do
        n=${CH_NAMES[$i]}
        if [ "$n" = openssl ]; then
            out=$LOG/hs_cost.r$r.txt
            line=""
            taskset -c "$SCPU" "$B/tls_hs_cost" --cert "$CERT" --key "$KEY" --count "$HS_COUNT" >"$out" 2>&1 &&
                line=$(grep '^RESULT ' "$out")
            [ -n "$line" ] || fail "tls_hs_cost failed (see $out)"
            CH[$n,$r]=$(kv server_us "$line")
            CH[$n,$r]=${CH[$n,$r]:-nan}
            printf '   %-5s %-18s %9s %9s %11s %9s  (in-process: median %s, client %s us; %s %s %s)\n' "$r" "$n" \
                "$(kv handshakes "$line")" - "${CH[$n,$r]}" - "$(kv server_us_median "$line")" \
                "$(kv client_us "$line")" "$(kv version "$line")" "$(kv cipher "$line")" "$(kv group "$line")"
            continue
        fi
        case "$n" in *_tls) ld=$CH_LOAD_TLS ;; *) ld=$CH_LOAD_PLAIN ;; esac
        run_load "churn.$n.r$r" "${CH_CMDS[$i]}" "$ld"
        us=nan
        [ "$RL_ok" = 1 ] && us=$(kv srv_us_per_msg "$RL")
        CH[$n,$r]=$us
        printf '   %-5s %-18s %9s %9s %11s %9s\n' "$r" "$n" "$(kv msgs "$RL")" "$(kv msgs_per_s "$RL")" "$us" "$(kv p99_us "$RL")"
    done
done
declare -A CHM
for n in "${CH_NAMES[@]}"; do
    CHM[$n]=$(for ((r = 1; r <= ROUNDS; r++)); do echo "${CH[$n,$r]}"; done | median %.1f)
done
ch_paired() { # ch_paired A B -> median over rounds of A/B
    local r
    for ((r = 1; r <= ROUNDS; r++)); do div "${CH[$1,$r]}" "${CH[$2,$r]}" %.4f; done | median %.3f
}
echo "   medians, server us per connection (openssl: per handshake, in-process):"
echo "   $(for n in "${CH_NAMES[@]}"; do printf '%s %s; ' "$n" "${CHM[$n]}"; done)"
row "handshake: OpenSSL in-process, server CPU" "${CHM[openssl]} us" "-" "-"
for b in epoll uring; do
    t=${CHM[cport_${b}_tls]} p=${CHM[cport_${b}_plain]}
    r=$(ch_paired "cport_${b}_tls" openssl)
    share=$(for ((k = 1; k <= ROUNDS; k++)); do
        awk -v t="${CH[cport_${b}_tls,$k]}" -v p="${CH[cport_${b}_plain,$k]}" -v o="${CH[openssl,$k]}" \
            'BEGIN { if (t == "nan" || p == "nan" || o == "nan" || o == 0) print "nan"; else printf "%.4f\n", (t - p) / o }'
    done | median %.2f)
    row "handshake: cport_$b TLS churn / OpenSSL (paired)" "$r  ($t us/conn; plain churn $p; (TLS-plain)/OpenSSL $share)" "<= 1.10" "$(verdict "$r" '<=' 1.10)"
    row "handshake: cport_$b / tls_epoll TLS churn (paired)" "$(ch_paired "cport_${b}_tls" tls_epoll_tls)" "-" "-"
done
row "handshake: tls_epoll TLS churn / OpenSSL (paired)" "$(ch_paired tls_epoll_tls openssl)  (${CHM[tls_epoll_tls]} us/conn)" "-" "-"

fi

# ------------------------------------------------------------ 3. storm
if want 3; then
echo
echo "== [$(elapsed) s] 3. 100 TLS sessions echo 64 B every 10 ms during a handshake storm, ${STORM_S} s"
echo "   (2 processes at nice 10 keep 500 handshakes each going: 1000 at once at the start, then each slot's next)"
# "quiet" is the same without the storm (--procs 0): the floor this machine allows just now
echo "   (quiet_epoll: the same 100 sessions on cport epoll without a storm, for the machine's own noise;"
echo "   tls_epoll: the minimal OpenSSL server under the same storm, for reference)"
ST_NAMES=(quiet_epoll cport_epoll cport_uring tls_epoll)
declare -A ST
printf '   %-5s %-12s %11s %8s %9s %9s %9s %9s %s\n' round server handshakes hs/s p99_us max_us srv_p99 wake_p99 status
for ((r = 1; r <= ROUNDS; r++)); do
    for i in $(order "$r" ${#ST_NAMES[@]}); do
        n=${ST_NAMES[$i]}
        procs=2
        [ "$n" = quiet_epoll ] && procs=0
        cmd="$SRV --backend ${n#*_} --mode echo --port {PORT}"
        [ "$n" = tls_epoll ] && cmd="$B/tls_epoll_echo --cert $CERT --key $KEY --port {PORT}"
        name=storm.$n.r$r
        st=FAILED
        line=""
        if start_server "$name" "$cmd"; then
            timeout -k 5 60 taskset -c "$LCPU" "$B/storm" --port "$P" --mode connect --tls --procs $procs --slots 500 \
                --storm-nice 10 --neighbours 100 --interval 10 --size 64 --duration "$STORM_S" \
                >"$LOG/$name.log" 2>&1 </dev/null
            rc=$?
            kill -0 "$SPID" 2>/dev/null || rc=1
            stop_server
            line=$(grep '^RESULT ' "$LOG/$name.log" | tail -1)
            if [ $rc -eq 0 ] && [ -n "$line" ]; then
                st=ok
                [ $procs = 0 ] || [ "$(kv connects "$line")" -ge 1000 ] || st="ok (<1000 handshakes)"
            else
                fail "$name: storm exit $rc (see $LOG/$name.log)"
            fi
        fi
        for k in connects connects_per_s p99_us max_us; do
            v=$(kv $k "$line")
            [ "$st" = FAILED ] && v=nan
            ST[$n,$k,$r]=${v:-nan}
        done
        printf '   %-5s %-12s %11s %8s %9s %9s %9s %9s %s\n' "$r" "$n" "$(kv connects "$line")" \
            "$(kv connects_per_s "$line")" "$(kv p99_us "$line")" "$(kv max_us "$line")" \
            "$(kv srv_p99_us "$line")" "$(kv wake_p99_us "$line")" "$st"
    done
done
col() { for ((r = 1; r <= ROUNDS; r++)); do echo "${ST[$n,$1,$r]}"; done; }
n=quiet_epoll
row "storm: reference, no storm (cport_epoll), p99" "$(col p99_us | median %.0f) us  (worst round $(col p99_us | maxof) us, max $(col max_us | maxof) us)" "-" "-"
n=tls_epoll
row "storm: reference, tls_epoll_echo, p99" "$(col p99_us | median %.0f) us  (worst round $(col p99_us | maxof) us, max $(col max_us | maxof) us; $(col connects_per_s | median %.0f) handshakes/s)" "-" "-"
for b in epoll uring; do
    n=cport_$b
    p99=$(col p99_us | median %.0f)
    p99w=$(col p99_us | maxof)
    mx=$(col max_us | maxof)
    hs=$(col connects_per_s | median %.0f)
    hsmin=$(col connects | minof)
    ms=$(awk -v v="$p99" 'BEGIN { if (v == "nan") print "nan"; else printf "%.2f", v / 1000 }')
    row "storm: cport_$b sessions' p99 (median of rounds)" "$ms ms  (worst round p99 ${p99w:-nan} us, max ${mx:-nan} us; $hs handshakes/s, >= ${hsmin:-nan} per round)" "< 5 ms" "$(verdict "$ms" '<' 5)"
done

fi

# ------------------------------------------------------------ 4. idle memory
if want 4; then
echo
echo "== [$(elapsed) s] 4. idle memory: $IDLE_N sessions after their handshake (idle_conns), server VmRSS"
printf '   %-18s %10s %12s %12s %12s %s\n' server fresh_KiB warm_KiB held_KiB per_session status
declare -A MEM
for b in epoll uring; do
    for kind in tls plain; do
        name=idle.cport_${b}_$kind
        cmd=$SRV tflag=--tls
        [ $kind = plain ] && cmd=$SRV_PLAIN tflag=""
        per=nan st=FAILED rss_f="" rss0="" rss1=""
        if start_server "$name" "$cmd --backend $b --mode packet --port {PORT}"; then
            rss_f=$(status_kib "$SPID" VmRSS)
            # a warm-up: the first sessions' one-time allocations (OpenSSL's tables, the worker's rings)
            # shellcheck disable=SC2086
            taskset -c "$LCPU" "$B/idle_conns" --port "$P" --conns 50 --hold 0 $tflag >"$LOG/$name.warm.log" 2>&1
            sleep 3
            rss0=$(status_kib "$SPID" VmRSS)
            # shellcheck disable=SC2086
            idle_clients "$LOG/$name.clients.log" --port "$P" --conns "$IDLE_N" --hold 60 $tflag
            if grep -q '^connected' "$LOG/$name.clients.log"; then
                sleep 3
                rss1=$(status_kib "$SPID" VmRSS)
                kill -0 "$IPID" 2>/dev/null && st=ok
            fi
            kill -TERM "$IPID" 2>/dev/null
            wait "$IPID" 2>/dev/null
            forget "$IPID"
            stop_server
            [ "$st" = ok ] || fail "$name: the $IDLE_N sessions did not all stay up (see $LOG/$name.clients.log)"
            [ "$st" = ok ] && per=$(awk -v a="$rss0" -v b="$rss1" -v n="$IDLE_N" 'BEGIN { printf "%.2f", (b - a) / n }')
        fi
        MEM[$b,$kind]=$per
        printf '   %-18s %10s %12s %12s %12s %s\n' "cport_${b}_$kind" "$rss_f" "$rss0" "$rss1" "$per KiB" "$st"
    done
    row "idle: cport_$b KiB per TLS session" "${MEM[$b,tls]} KiB  (plain ${MEM[$b,plain]} KiB)" "<= 16" "$(verdict "${MEM[$b,tls]}" '<=' 16)"
done

fi

# ------------------------------------------------------------ 5. chat
if want 5; then
echo
echo "== [$(elapsed) s] 5. chat, 1000 clients x 1 packet/s x 64 B, ${CHAT_S} s per run, TLS and plain"
CT_NAMES=(cport_epoll_plain cport_epoll_tls cport_uring_plain cport_uring_tls)
declare -A CT
bad_chat=0
printf '   %-5s %-18s %11s %9s %5s %5s %12s %12s %10s\n' round contender deliveries lost ooo err us/deliv us/deliv_all p99_us
for ((r = 1; r <= ROUNDS; r++)); do
    for i in $(order "$r" ${#CT_NAMES[@]}); do
        n=${CT_NAMES[$i]}
        b=${n#cport_}
        b=${b%%_*}
        ld="--mode chat --conns 1000 --rate 1 --size 64 --duration $CHAT_S --drain 10"
        cmd="$SRV_PLAIN --backend $b --mode chat --port {PORT}"
        case "$n" in *_tls) ld="$ld --tls" cmd="$SRV --backend $b --mode chat --port {PORT}" ;; esac
        run_load "chat.$n.r$r" "$cmd" "$ld"
        us=nan
        [ "$RL_ok" = 1 ] && us=$(kv srv_us_per_msg "$RL")
        [ "$RL_ok" = 1 ] || bad_chat=1
        CT[$n,$r]=$us
        printf '   %-5s %-18s %11s %9s %5s %5s %12s %12s %10s\n' "$r" "$n" "$(kv deliveries "$RL")" "$(kv lost "$RL")" \
            "$(kv out_of_order "$RL")" "$(kv errors "$RL")" "$us" "$RL_whole_us" "$(kv p99_us "$RL")"
    done
done
for b in epoll uring; do
    t=$(for ((r = 1; r <= ROUNDS; r++)); do echo "${CT[cport_${b}_tls,$r]}"; done | median %.3f)
    p=$(for ((r = 1; r <= ROUNDS; r++)); do echo "${CT[cport_${b}_plain,$r]}"; done | median %.3f)
    pr=$(for ((r = 1; r <= ROUNDS; r++)); do div "${CT[cport_${b}_tls,$r]}" "${CT[cport_${b}_plain,$r]}" %.4f; done | median %.2f)
    row "chat: cport_$b us per delivery, TLS / plain" "$t / $p  (paired TLS/plain $pr)" "-" "-"
done
row "chat: every delivery, in order, all runs" "$([ $bad_chat = 0 ] && echo "yes" || echo "NO (see the table above)")" "nothing lost" "$([ $bad_chat = 0 ] && echo ok || echo MISSED)"

fi

# ------------------------------------------------------------ summary
echo
echo "== [$(elapsed) s] summary: issue 17's TLS acceptance, from outside ($ROUNDS rounds; medians;"
echo "   servers pinned to CPU $SCPU with one worker, clients on CPU $LCPU; a shared VM's numbers are noisy)"
summary_table 50 74
exit $FAILED
