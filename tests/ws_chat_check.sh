#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# One chat room of cport-server over WebSocket, checked by the npm ws
# client (tests/ws_peer.js chat): 50 WebSocket clients x 20 packets, then a
# room of 40 WebSocket and 10 TCP clients; every client must get every
# packet of every sender (50,000 deliveries each time), each sender's in
# order.
#
#   tests/ws_chat_check.sh BUILD_DIR
#
# Exit 0 when both pass, 1 when one fails, 77 (CTest's skip) when node or
# the ws package is missing (make test-deps installs them).
set -u
B=${1:?usage: tests/ws_chat_check.sh BUILD_DIR}
here=$(cd "$(dirname "$0")" && pwd)
if [ ! -x /usr/bin/node ] || [ ! -d "$here/node/node_modules/ws" ]; then
  echo "ws_chat_check: node or the ws package is missing (make test-deps)"
  exit 77
fi
out=$(mktemp /tmp/cport-wschat.XXXXXX)
"$B/cport-server" --host 127.0.0.1 --port 0 --ws-port 0 --mode chat --workers 2 >"$out" 2>&1 &
srv=$!
# shellcheck disable=SC2317  # runs from the trap
cleanup() {
  kill -INT "$srv" 2>/dev/null && wait "$srv" 2>/dev/null
  rm -f "$out"
}
trap cleanup EXIT
port="" wsport=""
for _ in $(seq 1 50); do
  wsport=$(grep -o 'on port [0-9]*' "$out" | grep -o '[0-9]*$')
  [ -n "$wsport" ] && break
  sleep 0.1
done
port=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$out" | grep -o '[0-9]*$')
if [ -z "$wsport" ] || [ -z "$port" ]; then
  echo "ws_chat_check: cport-server did not start"
  cat "$out"
  exit 1
fi
rc=0
for room in "clients=50 packets=20" "clients=40 packets=20 tcp=10 tcp_port=$port"; do
  # shellcheck disable=SC2086  # the room's options are words
  line=$(timeout 120 node "$here/ws_peer.js" chat "ws://127.0.0.1:$wsport/" $room 2>&1 | tail -1)
  echo "ws_chat_check: $room: $line"
  [ "$line" = "CHAT 50000 50000 0" ] || rc=1
done
exit $rc
