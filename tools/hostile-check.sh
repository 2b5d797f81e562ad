#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Hostile traffic against a real cport-server, measured from outside (issue 14).
#
#   tools/hostile-check.sh [--build DIR] [--backend B] [--mode M] [--server "FLAGS"]
#                          SCENARIO [cport-hostile options...]
#   tools/hostile-check.sh [--build DIR] [--backends "epoll uring"] --all
#
# Starts DIR/cport-server (default build/) --port 0 --host 127.0.0.1 --mode M
# --backend B (default epoll) plus FLAGS, pinned to CPU 0 with taskset, then runs
# DIR/cport-hostile SCENARIO pinned to CPU 1 with the server's pid (so it can
# read the server's RSS itself) and the extra options. Meanwhile it samples the
# server's VmRSS every 100 ms; at the end it reads VmHWM (peak RSS), stops the
# server with SIGTERM and prints:
#   hostile SCENARIO backend=B mode=M | RESULT ... | rss_kib start=.. max=.. end=.. hwm=..
# The mode defaults to the one the scenario is written for (chat-flood: chat;
# burst, idle-after-burst, pin, tiny: packet; the rest: echo). Exit status: the tool's
# (1 when a --max-*/--min-* threshold broke), else 1 if the server did not stop
# cleanly. Bounded: each scenario runs at most its --duration (default below)
# plus a few seconds.
#
# --all runs the acceptance set (every scenario with its defaults) on each
# backend in --backends and prints one line per run, then, for churn, the
# io_uring/epoll ratio of RSS after the churn. About 4 minutes for both backends.
set -uo pipefail
BUILD=build BACKEND=epoll MODE='' SERVER_FLAGS='' ALL=0 BACKENDS="epoll uring"
while [ $# -gt 0 ]; do
  case "$1" in
  --build) BUILD=$2; shift 2 ;;
  --backend) BACKEND=$2; shift 2 ;;
  --backends) BACKENDS=$2; shift 2 ;;
  --mode) MODE=$2; shift 2 ;;
  --server) SERVER_FLAGS=$2; shift 2 ;;
  --all) ALL=1; shift ;;
  -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) break ;;
  esac
done

# The time each scenario gets, and its server mode.
default_duration() {
  case $1 in
  chat-flood|pin) echo 15 ;;
  burst|idle-after-burst|churn) echo 20 ;;
  *) echo 10 ;;
  esac
}
default_mode() {
  case $1 in
  chat-flood) echo chat ;;
  burst|idle-after-burst|pin|tiny) echo packet ;;
  *) echo echo ;;
  esac
}

# One scenario on one backend; prints the summary line, returns the verdict.
run_one() {
  local scenario=$1 backend=$2 mode=$3; shift 3
  local server=$BUILD/cport-server tool=$BUILD/cport-hostile
  if [ ! -x "$server" ] || [ ! -x "$tool" ]; then
    echo "hostile-check: build $server and $tool first (make build)"; return 2
  fi
  command -v taskset >/dev/null || { echo "hostile-check: needs taskset (util-linux)"; return 2; }
  local tmp; tmp=$(mktemp -d)
  # shellcheck disable=SC2086  # SERVER_FLAGS is a list of words
  taskset -c 0 "$server" --port 0 --host 127.0.0.1 --mode "$mode" --backend "$backend" $SERVER_FLAGS \
    >"$tmp/out" 2>"$tmp/err" &
  local srv=$! port=
  for _ in $(seq 100); do
    port=$(sed -n 's/.* listening on [^ ]*:\([0-9][0-9]*\) .*/\1/p' "$tmp/out" 2>/dev/null | head -1)
    [ -n "$port" ] && break
    kill -0 "$srv" 2>/dev/null || break
    sleep 0.05
  done
  if [ -z "$port" ]; then
    echo "hostile-check: server did not start"; cat "$tmp/out" "$tmp/err"; kill -KILL "$srv" 2>/dev/null
    rm -rf "$tmp"; return 1
  fi
  # The sampler: VmRSS in KiB every 100 ms, on the attackers' CPU.
  taskset -c 1 bash -c "while [ -r /proc/$srv/status ]; do
      sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\).*/\1/p' /proc/$srv/status 2>/dev/null; sleep 0.1; done" \
    >"$tmp/rss" 2>/dev/null &
  local sampler=$! dur; dur=$(default_duration "$scenario")
  local has_dur=0
  for a in "$@"; do [ "$a" = --duration ] && has_dur=1; done
  local extra=(); [ $has_dur = 1 ] || extra=(--duration "$dur")
  taskset -c 1 timeout 300 "$tool" "$scenario" --port "$port" --server-pid "$srv" "${extra[@]}" "$@" \
    >"$tmp/tool" 2>"$tmp/toolerr"
  local rc=$?
  local hwm; hwm=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$srv/status" 2>/dev/null)
  local end; end=$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$srv/status" 2>/dev/null)
  kill -TERM "$srv" 2>/dev/null
  local srv_rc=0 waited=0
  while kill -0 "$srv" 2>/dev/null && [ $waited -lt 100 ]; do sleep 0.1; waited=$((waited + 1)); done
  if kill -0 "$srv" 2>/dev/null; then kill -KILL "$srv"; srv_rc=137; fi
  wait "$srv" 2>/dev/null || srv_rc=$?
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  local start max
  start=$(head -1 "$tmp/rss"); max=$(sort -n "$tmp/rss" | tail -1)
  grep -v '^RESULT' "$tmp/tool" | sed 's/^/  /'
  sed 's/^/  /' "$tmp/toolerr"
  echo "hostile $scenario backend=$backend mode=$mode | $(grep '^RESULT' "$tmp/tool" || echo "no RESULT (exit $rc)") |" \
       "server rss_kib start=${start:-?} max=${max:-?} end=${end:-?} hwm=${hwm:-?}"
  echo "  server: $(grep 'stopped after' "$tmp/out" || echo "no final stats line") (exit $srv_rc)"
  rm -rf "$tmp"
  [ $rc -ne 0 ] && return $rc
  [ $srv_rc -ne 0 ] && return 1
  return 0
}

if [ $ALL = 1 ]; then
  fail=0
  declare -A churn_after
  for b in $BACKENDS; do
    for s in chat-flood burst pin tiny idle-after-burst churn rst-storm connect-storm; do
      line=$(run_one "$s" "$b" "$(default_mode "$s")" "$@") || fail=1
      echo "$line"
      if [ "$s" = churn ]; then
        churn_after[$b]=$(echo "$line" | sed -n 's/.* rss_after_kib=\([0-9]*\).*/\1/p' | head -1)
      fi
    done
  done
  if [ -n "${churn_after[epoll]:-}" ] && [ -n "${churn_after[uring]:-}" ]; then
    echo "churn: RSS after, io_uring ${churn_after[uring]} KiB vs epoll ${churn_after[epoll]} KiB" \
         "(ratio $(awk "BEGIN{printf \"%.2f\", ${churn_after[uring]}/${churn_after[epoll]}}"))"
  fi
  exit $fail
fi

[ $# -ge 1 ] || { echo "usage: $0 [--build DIR] [--backend B] [--mode M] [--server FLAGS] SCENARIO [options] | --all"; exit 2; }
scenario=$1; shift
run_one "$scenario" "$BACKEND" "${MODE:-$(default_mode "$scenario")}" "$@"
