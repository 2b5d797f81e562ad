# SPDX-License-Identifier: MIT
# Sourced by the tools/*-check.sh scripts: one cport-server in the background,
# its output in a temporary directory, killed on exit whatever happens.
#
#   check_prepare NAME SERVER   the binary and python3 are there; makes $tmp and
#                               the exit trap (NAME prefixes messages)
#   ... start the server in the background with >"$tmp/out" 2>"$tmp/err",
#       then srv_pid=$!
#   check_await_port            sets $port from the server's "listening on" line
#                               (5 s at most), or prints its output and fails
#   check_stop [--no-term]      sends SIGTERM (not with --no-term: the caller
#                               stopped it), waits; sets $srv_rc and $stats (the
#                               server's "stopped after" line, may be empty)
# shellcheck shell=bash

check_prepare() {
  check_name=$1
  [ -x "$2" ] || { echo "$check_name: $2 not built (make build)"; exit 2; }
  command -v python3 >/dev/null || { echo "$check_name: needs python3"; exit 2; }
  tmp=$(mktemp -d)
  srv_pid=
  trap check_cleanup EXIT
}

check_cleanup() {
  if [ -n "$srv_pid" ] && kill -0 "$srv_pid" 2>/dev/null; then kill -KILL "$srv_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}

check_await_port() {
  port=
  for _ in $(seq 100); do
    port=$(sed -n 's/.* listening on [^ ]*:\([0-9][0-9]*\) .*/\1/p' "$tmp/out" 2>/dev/null | head -1)
    [ -n "$port" ] && break
    kill -0 "$srv_pid" 2>/dev/null || break
    sleep 0.05
  done
  if [ -z "$port" ]; then
    echo "$check_name: server did not start"; cat "$tmp/out" "$tmp/err"; echo "FAIL"; exit 1
  fi
  head -1 "$tmp/out"
}

check_stop() {
  [ "${1:-}" = --no-term ] || kill -TERM "$srv_pid"
  srv_rc=0
  wait "$srv_pid" || srv_rc=$?
  srv_pid=
  stats=$(grep 'stopped after' "$tmp/out" || true)
  echo "server: ${stats:-no final stats line} (exit $srv_rc)"
}
