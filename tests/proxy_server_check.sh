#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# cport-server behind Debian's haproxy, from outside: --proxy-protocol with
# send-proxy (v1) and send-proxy-v2 frontends, clients bound to 127.0.0.2
# and 127.0.0.3 (Node's net, localAddress). The server's --verbose lines must
# name each client's own address and port, and --max-per-ip 1 must refuse a
# second session from one address (127.0.0.4), which the final line counts.
#
#   tests/proxy_server_check.sh BUILD_DIR
#
# Exit 0 when it passes, 1 when not, 77 (CTest's skip) when haproxy or node
# is missing (make test-deps installs them).
set -u
B=${1:?usage: tests/proxy_server_check.sh BUILD_DIR}
if [ ! -x /usr/sbin/haproxy ] || [ ! -x /usr/bin/node ]; then
  echo "proxy_server_check: haproxy or node is missing (make test-deps)"
  exit 77
fi
dir=$(mktemp -d /tmp/cport-proxy.XXXXXX)
"$B/cport-server" --host 127.0.0.1 --port 0 --workers 2 --proxy-protocol --proxy-trusted 127.0.0.1/32 \
  --max-per-ip 1 --verbose >"$dir/server" 2>&1 &
srv=$!
hap=""
# shellcheck disable=SC2317  # runs from the trap
cleanup() {
  [ -n "$hap" ] && kill "$hap" 2>/dev/null && wait "$hap" 2>/dev/null
  kill -INT "$srv" 2>/dev/null && wait "$srv" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
port=""
for _ in $(seq 1 50); do
  port=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$dir/server" | grep -o '[0-9]*$')
  [ -n "$port" ] && break
  sleep 0.1
done
if [ -z "$port" ]; then
  echo "proxy_server_check: cport-server did not start"
  cat "$dir/server"
  exit 1
fi
free_port() {
  node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); });'
}
v1=$(free_port)
v2=$(free_port)
cat >"$dir/haproxy.cfg" <<CFG
global
  maxconn 100
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend v1
  bind 127.0.0.1:$v1
  default_backend v1
backend v1
  server s 127.0.0.1:$port send-proxy
frontend v2
  bind 127.0.0.1:$v2
  default_backend v2
backend v2
  server s 127.0.0.1:$port send-proxy-v2
CFG
/usr/sbin/haproxy -db -f "$dir/haproxy.cfg" >"$dir/haproxy" 2>&1 &
hap=$!
# Each client (source, port) writes a line and waits for its echo, or for
# the close of a refused session; all stay open until every one is done.
# Prints "source:localport served" or "source closed" per client.
# shellcheck disable=SC2016  # JavaScript, not shell
client='
const net = require("net");
const args = process.argv.slice(1);
const socks = [];
let left = args.length / 2;
const done = () => { if (--left === 0) socks.forEach((s) => s.destroy()); };
function one(src, port, tries) {
  const s = net.connect({ host: "127.0.0.1", port: +port, localAddress: src });
  s.on("error", () => { if (tries > 0) setTimeout(() => one(src, port, tries - 1), 100); else { console.log(src + " error"); done(); } });
  s.on("connect", () => {
    socks.push(s);
    const lp = s.localPort;
    let got = "";
    s.write("hello\n");
    s.on("data", (d) => { got += d; if (got === "hello\n") { console.log(src + ":" + lp + " served"); done(); } });
    s.on("close", () => { if (got !== "hello\n") { console.log(src + " closed"); done(); } });
  });
}
for (let i = 0; i < args.length; i += 2) one(args[i], args[i + 1], 50);
'
out=$(timeout 30 node -e "$client" 127.0.0.2 "$v1" 127.0.0.3 "$v2")
# Two at once from 127.0.0.4, one through each frontend: one is refused.
out2=$(timeout 30 node -e "$client" 127.0.0.4 "$v1" 127.0.0.4 "$v2" | sort)
echo "proxy_server_check: clients: $(echo "$out" "$out2" | tr '\n' ' ')"
kill -INT "$srv" && wait "$srv"
srv=""
rc=0
for src in 127.0.0.2 127.0.0.3; do
  lp=$(echo "$out" | sed -n "s/^$src:\([0-9]*\) served$/\1/p")
  if [ -z "$lp" ] || ! grep -q "connected $src:$lp\$" "$dir/server"; then
    echo "proxy_server_check: the server did not report $src:${lp:-?}"
    rc=1
  fi
done
if ! echo "$out2" | grep -q '^127.0.0.4 closed$' || [ "$(echo "$out2" | grep -c served)" != 1 ]; then
  echo "proxy_server_check: a second session from 127.0.0.4 was not refused"
  rc=1
fi
if ! grep -q 'refused={sessions per address=1}' "$dir/server"; then
  echo "proxy_server_check: the refusal is not counted"
  rc=1
fi
[ $rc = 0 ] || { cat "$dir/server"; cat "$dir/haproxy"; }
exit $rc
