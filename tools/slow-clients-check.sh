#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Hostile slow clients against a real cport-server process: max_sessions,
# drip-feeding (partial-packet timeout) and never-reading clients at once.
#
#   tools/slow-clients-check.sh [BACKEND] [SERVER]   (BACKEND epoll|uring, default epoll;
#                                                     SERVER default build/cport-server)
#
# Starts SERVER --mode packet --max-sessions MAX (default 200) --max-packet 4096
# --packet-timeout PT (default 1000 ms) --send-queue-limit 64 KiB. Then one
# client process opens:
#   DRIP (default MAX/2) drip-feeders: a header promising a 4000-byte packet,
#     then one body byte every 100 ms (never finishing within the timeout);
#   NOREAD (default MAX/2) never-readers: 4 KiB receive buffer, send packets the
#     server echoes, never read (bursts of 64 x 4000 B every 100 ms);
#   EXTRA (default 50) connections beyond max_sessions, once the others are in.
# For DURATION seconds (default 12) it samples the server's RSS.
#
# PASS needs: every extra connection closed at once and counted as rejected;
# every drip-feeder cut by the partial-packet timeout between PT and PT+1.5 s
# after its header; every never-reader cut with "send queue limit exceeded";
# no other close reason; connected == disconnected at exit; exit 0.
# It prints the server's RSS before/max/after next to the bytes the clients
# pushed, so a growing footprint would show. Bounded: about DURATION+10 s.
set -euo pipefail
BACKEND=${1:-epoll}
SERVER=${2:-build/cport-server}
MAX=${MAX:-200}
PT=${PT:-1000}
DRIP=${DRIP:-$((MAX / 2))}
NOREAD=${NOREAD:-$((MAX - MAX / 2))}
EXTRA=${EXTRA:-50}
DURATION=${DURATION:-12}

# shellcheck source=tools/check-lib.sh
. "$(dirname "$0")/check-lib.sh"
check_prepare slow-clients-check "$SERVER"

"$SERVER" --port 0 --mode packet --backend "$BACKEND" --workers 2 --max-sessions "$MAX" \
  --max-packet 4096 --packet-timeout "$PT" --send-queue-limit 65536 >"$tmp/out" 2>"$tmp/err" &
srv_pid=$!
check_await_port

set +e
timeout $((DURATION + 60)) python3 - "$srv_pid" "$port" "$DRIP" "$NOREAD" "$EXTRA" "$PT" "$DURATION" <<'EOF'
import resource, socket, struct, sys, time
pid, port, ndrip, nnoread, nextra, pt_ms, dur = (int(a) for a in sys.argv[1:8])
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, max(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
ok = True

def rss_kib():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"):
            return int(l.split()[1])

def peer_closed(s):
    try:
        return s.recv(65536, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True

rss0 = rss_kib()
drip, drip_t0, noread, extra = [], [], [], []
for i in range(ndrip):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(struct.pack("<HH", 4000, 1))   # promises 4000 bytes
    s.setblocking(False)
    drip.append(s); drip_t0.append(time.monotonic())
for i in range(nnoread):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5); s.connect(("127.0.0.1", port)); s.setblocking(False)
    noread.append(s)
time.sleep(0.3)                              # every one of them is a live session now
ext_closed = 0
for i in range(nextra):
    s = socket.socket(); s.settimeout(3)
    s.connect(("127.0.0.1", port))
    try:
        ext_closed += s.recv(1) == b""       # closed by the server at once
    except OSError:
        ext_closed += 1
    s.close()

pkt = struct.pack("<HH", 4000, 1) + b"x" * 3996
sent = [0] * nnoread
drip_cut = [None] * ndrip
nr_cut = [None] * nnoread
t0 = time.monotonic(); rss_max = rss0; last = -9
while time.monotonic() - t0 < dur:
    now = time.monotonic()
    for i, s in enumerate(drip):
        if drip_cut[i] is None:
            if peer_closed(s):
                drip_cut[i] = now - drip_t0[i]
            else:
                try:
                    s.send(b"d")               # one more body byte, every 100 ms
                except OSError:
                    drip_cut[i] = now - drip_t0[i]
    for i, s in enumerate(noread):
        if nr_cut[i] is None:
            try:
                for _ in range(64):
                    sent[i] += s.send(pkt)
            except BlockingIOError:
                pass
            except OSError:
                nr_cut[i] = now - t0
            if nr_cut[i] is None and peer_closed(s):
                nr_cut[i] = now - t0
    rss_max = max(rss_max, rss_kib())
    if now - t0 - last >= 3:
        last = now - t0
        print(f"  t={now - t0:4.1f}s server RSS {rss_kib()} KiB; cut so far: drip {sum(t is not None for t in drip_cut)}"
              f"/{ndrip}, never-readers {sum(t is not None for t in nr_cut)}/{nnoread}")
    time.sleep(0.1)

dc = [t for t in drip_cut if t is not None]
nc = [t for t in nr_cut if t is not None]
print(f"beyond max_sessions: {ext_closed}/{nextra} extra connections closed at once")
if dc:
    print(f"drip-feeders: {len(dc)}/{ndrip} cut, {min(dc) * 1000:.0f}..{max(dc) * 1000:.0f} ms after their header "
          f"(packet timeout {pt_ms} ms), each having dripped <= {int(max(dc) * 10) + 1} body bytes of 3996")
else:
    print(f"drip-feeders: 0/{ndrip} cut")
print(f"never-readers: {len(nc)}/{nnoread} cut; each pushed {min(sent)}..{max(sent)} bytes "
      f"({sum(sent) / 1e6:.1f} MB in all) before its cut")
print(f"server RSS: {rss0} KiB before, {rss_max} KiB at most, {rss_kib()} KiB at the end")
if ext_closed != nextra:
    print("  -> FAIL: a connection beyond max_sessions was kept"); ok = False
if len(dc) != ndrip or min(dc) * 1000 < pt_ms - 50 or max(dc) * 1000 > pt_ms + 1500:
    print("  -> FAIL: drip-feeders not cut by the packet timeout"); ok = False
if len(nc) != nnoread:
    print("  -> FAIL: never-readers not cut"); ok = False
for s in drip + noread:
    s.close()
sys.exit(0 if ok else 1)
EOF
py_rc=$?
set -e
check_stop
num() { echo "$stats" | sed -n "s/.*[ {,]$1=\\([0-9]*\\).*/\\1/p"; }
fail=
[ "$py_rc" -eq 0 ] || fail="$fail client-checks"
[ "$srv_rc" -eq 0 ] || fail="$fail server-exit"
[ -n "$stats" ] && [ "$(num connected)" = "$(num disconnected)" ] || fail="$fail unbalanced"
[ "$(num rejected)" = "$EXTRA" ] || fail="$fail rejected!=$EXTRA"
[ "$(num 'partial packet timeout')" = "$DRIP" ] || fail="$fail packet-timeouts!=$DRIP"
[ "$(num 'send queue limit exceeded')" = "$NOREAD" ] || fail="$fail overflows!=$NOREAD"
reasons=$(echo "$stats" | sed -n 's/.*reasons={\(.*\)}.*/\1/p' | tr ',' '\n' | grep -v '^partial packet timeout=\|^send queue limit exceeded=' || true)
[ -z "$reasons" ] || fail="$fail other-reasons($(echo "$reasons" | tr "\n" " "))"
if [ -z "$fail" ]; then
  echo "slow-clients-check $BACKEND: PASS"
else
  echo "slow-clients-check $BACKEND: FAIL:$fail"; exit 1
fi
