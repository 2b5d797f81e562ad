#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Headless Chromium joins cport-server's room from its own page, over ws://
# and wss://: the page (tools/ws_chat.html, ?check=100) sends 100 binary
# packets of varied sizes and checks each comes back byte-identical and in
# order (tests/ws_browser.js drives the browser and reads the verdict).
#
#   tests/ws_browser_check.sh BUILD_DIR
#
# Exit 0 when both pass, 1 when one fails, 77 (CTest's skip) when chromium
# or node is not installed (make test-deps installs them).
set -u
B=${1:?usage: tests/ws_browser_check.sh BUILD_DIR}
here=$(cd "$(dirname "$0")" && pwd)
for p in /usr/bin/chromium /usr/bin/node /usr/bin/openssl; do
  [ -x "$p" ] || { echo "ws_browser_check: $p is missing (make test-deps)"; exit 77; }
done
tmp=$(mktemp -d /tmp/cport-wsb.XXXXXX)
srv=
# shellcheck disable=SC2317  # runs from the trap
cleanup() {
  [ -n "$srv" ] && kill -INT "$srv" 2>/dev/null && wait "$srv" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$tmp/key.pem" \
  -out "$tmp/cert.pem" -days 2 -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  >/dev/null 2>&1 || { echo "ws_browser_check: openssl req failed"; exit 1; }

# run SCHEME [server options...]: one server, one browser run against it.
run() {
  local scheme=$1 ca=()
  shift
  "$B/cport-server" --host 127.0.0.1 --port 0 --ws-port 0 --mode chat --workers 1 "$@" >"$tmp/srv.out" 2>&1 &
  srv=$!
  local port=""
  for _ in $(seq 1 50); do
    port=$(grep -o 'on port [0-9]*' "$tmp/srv.out" | grep -o '[0-9]*$')
    [ -n "$port" ] && break
    sleep 0.1
  done
  [ -n "$port" ] || { echo "ws_browser_check: cport-server did not start"; cat "$tmp/srv.out"; return 1; }
  [ "$scheme" = https ] && ca=("ca=$tmp/cert.pem")
  timeout 60 node "$here/ws_browser.js" "$scheme://127.0.0.1:$port/?check=100" timeout=30 "${ca[@]}"
  local rc=$?
  kill -INT "$srv" 2>/dev/null
  wait "$srv" 2>/dev/null
  srv=
  echo "ws_browser_check: $scheme: exit $rc"
  return $rc
}
rc=0
run http || rc=1
run https --tls-cert "$tmp/cert.pem" --tls-key "$tmp/key.pem" || rc=1
exit $rc
