#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# cport-server --metrics from outside, under a little chat load (cport-dummy).
#
#   tests/metrics_check.sh BUILD_DIR promtool
#       /metrics passes `promtool check metrics` (Debian: prometheus) and
#       counts the load: packets in and out, sessions, accepts, disconnects
#       by reason, the loop histograms; / is the page, other paths 404.
#   tests/metrics_check.sh BUILD_DIR page [SHOT.png]
#       headless Chromium loads / (?check=5): every chart (sessions,
#       messages/s, bytes/s, loop lag) draws 5+ points with non-zero data
#       (tests/ws_browser.js reads the verdict from the title); SHOT.png
#       gets a screenshot.
#
# Exit 0 on success, 1 on failure, 77 (CTest's skip) when promtool, chromium
# or node is missing (make test-deps installs them).
set -u
B=${1:?usage: tests/metrics_check.sh BUILD_DIR promtool|page [SHOT.png]}
what=${2:?usage: tests/metrics_check.sh BUILD_DIR promtool|page [SHOT.png]}
shot=${3:-}
here=$(cd "$(dirname "$0")" && pwd)
case $what in
promtool) need=(/usr/bin/promtool) ;;
page) need=(/usr/bin/chromium /usr/bin/node) ;;
*) echo "metrics_check: promtool or page, not '$what'"; exit 2 ;;
esac
for p in "${need[@]}"; do
  [ -x "$p" ] || { echo "metrics_check: $p is missing (make test-deps)"; exit 77; }
done
tmp=$(mktemp -d /tmp/cport-metrics.XXXXXX)
srv= load=
# shellcheck disable=SC2317  # runs from the trap
cleanup() {
  [ -n "$load" ] && kill "$load" 2>/dev/null && wait "$load" 2>/dev/null
  [ -n "$srv" ] && kill -TERM "$srv" 2>/dev/null && wait "$srv" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "metrics_check: FAIL: $*"; exit 1; }

"$B/cport-server" --host 127.0.0.1 --port 0 --mode chat --workers 2 --metrics 127.0.0.1:0 >"$tmp/srv.out" 2>&1 &
srv=$!
port= mport=
for _ in $(seq 1 50); do
  port=$(sed -n 's/^cport-server listening on 127.0.0.1:\([0-9]*\) .*/\1/p' "$tmp/srv.out")
  mport=$(sed -n 's|^cport-server: metrics on http://127.0.0.1:\([0-9]*\)/.*|\1|p' "$tmp/srv.out")
  [ -n "$port" ] && [ -n "$mport" ] && break
  sleep 0.1
done
[ -n "$port" ] && [ -n "$mport" ] || { cat "$tmp/srv.out"; fail "cport-server did not start with --metrics"; }

# get PATH FILE: the body of GET PATH into FILE (bash's /dev/tcp: no curl
# needed); prints the status code.
get() {
  local status
  exec 3<>"/dev/tcp/127.0.0.1/$mport" || return 1
  printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$1" >&3
  timeout 10 cat <&3 >"$tmp/resp"
  exec 3<&-
  status=$(head -n 1 "$tmp/resp" | tr -d '\r' | cut -d' ' -f2)
  sed '1,/^\r$/d' "$tmp/resp" >"$2"
  echo "$status"
}
# value FILE LINE-PREFIX: the sample's value (the first line that starts so).
value() { grep -F "$2" "$1" | head -n 1 | awk '{ print $NF }'; }

if [ "$what" = promtool ]; then
  # 20 sessions, 5 packets a second each for 2 s, all verified: then gone.
  "$B/cport-dummy" --host 127.0.0.1 --port "$port" --mode chat --sessions 20 --rate 5 --size 64 \
    --duration 2 >"$tmp/dummy.out" 2>&1 || { cat "$tmp/dummy.out"; fail "cport-dummy failed"; }
  st=$(get /metrics "$tmp/metrics") || fail "cannot connect to the metrics port"
  [ "$st" = 200 ] || fail "GET /metrics: status $st"
  promtool check metrics <"$tmp/metrics" || fail "promtool check metrics"
  echo "metrics_check: promtool check metrics: clean ($(wc -l <"$tmp/metrics") lines)"
  pin=$(value "$tmp/metrics" 'cport_received_packets_total{service="tcp"}')
  pout=$(value "$tmp/metrics" 'cport_sent_packets_total{service="tcp"}')
  acc=$(value "$tmp/metrics" 'cport_accepted_total{service="tcp"}')
  peer=$(value "$tmp/metrics" 'cport_disconnects_total{service="tcp",reason="peer closed"}')
  sess=$(value "$tmp/metrics" 'cport_sessions{service="tcp"}')
  rounds=$(value "$tmp/metrics" 'cport_worker_round_seconds_count{worker="0"}')
  jobs=$(value "$tmp/metrics" 'cport_job_wait_seconds_count{worker="0"}')
  jobs1=$(value "$tmp/metrics" 'cport_job_wait_seconds_count{worker="1"}')
  echo "metrics_check: packets in=$pin out=$pout accepted=$acc peer_closed=$peer sessions=$sess rounds0=$rounds jobs=$jobs+$jobs1"
  # Each of the 20 sends 5/s for 2 s (about 200 in all); each packet goes to
  # every member of the room: 20, but fewer while the sessions join and leave.
  [ "${pin:-0}" -ge 150 ] || fail "packets in: ${pin:-none}"
  [ "${pout:-0}" -le $((pin * 20)) ] && [ "${pout:-0}" -ge $((pin * 18)) ] ||
    fail "packets out ${pout:-none}, not about 20 x $pin"
  [ "${acc:-0}" -eq 20 ] || fail "accepted: ${acc:-none}"
  [ "${peer:-0}" -eq 20 ] || fail "disconnects by peer closed: ${peer:-none}"
  [ "${sess:-x}" = 0 ] || fail "sessions: ${sess:-none}"
  [ "${rounds:-0}" -gt 0 ] || fail "worker 0 rounds: ${rounds:-none}"
  # 20 members are too few for a pause after fan-out (32 sends a round): the
  # counters are there, at 0.
  pauses=$(value "$tmp/metrics" 'cport_worker_fanout_pauses_total{worker="0"}')
  [ "${pauses:-x}" = 0 ] || fail "worker 0 fan-out pauses: ${pauses:-none}"
  # A join, a leave and a broadcast per packet: jobs of the room.
  [ $((${jobs:-0} + ${jobs1:-0})) -ge $((pin + 40)) ] || fail "jobs: ${jobs:-none}+${jobs1:-none}"
  st=$(get / "$tmp/page") || fail "GET /"
  [ "$st" = 200 ] && grep -q '<title>cport metrics</title>' "$tmp/page" || fail "GET /: status $st, not the page"
  st=$(get /nothing "$tmp/none") || fail "GET /nothing"
  [ "$st" = 404 ] || fail "GET /nothing: status $st"
  echo "metrics_check: PASS"
  exit 0
fi

# page: load running while the browser watches (long enough for any wait).
"$B/cport-dummy" --host 127.0.0.1 --port "$port" --mode chat --sessions 50 --rate 10 --size 64 \
  --duration 120 >"$tmp/dummy.out" 2>&1 &
load=$!
args=()
[ -n "$shot" ] && args+=("shot=$shot")
timeout 90 node "$here/ws_browser.js" "http://127.0.0.1:$mport/?check=5" timeout=60 "${args[@]}"
rc=$?
[ $rc -eq 0 ] || fail "the page did not chart (ws_browser.js exit $rc)"
echo "metrics_check: PASS"
