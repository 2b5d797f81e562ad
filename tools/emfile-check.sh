#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Descriptor exhaustion, end to end, on a real cport-server process.
#
#   tools/emfile-check.sh [BACKEND] [SERVER]     (BACKEND epoll|uring, default epoll;
#                                                 SERVER default build/cport-server)
#
# 1. Starts SERVER --mode echo --backend BACKEND --port 0 under `ulimit -n NOFILE`
#    (default 256, soft and hard, so the server cannot raise it).
# 2. A client process connects one "keeper" and checks an echo, then opens
#    ATTEMPTS (default 2000) non-blocking connections and keeps them open: the
#    server runs out of descriptors (the kernel backlog holds up to 1024 more,
#    the rest stay in SYN retry).
# 3. Over WINDOW seconds (default 10) while descriptors are exhausted it
#    samples the server's CPU time from /proc/PID/stat (utime+stime; and, finer,
#    the threads' run time from /proc/PID/task/*/schedstat) and keeps
#    echoing on the keeper every 100 ms; it also counts the server's open
#    descriptors (/proc/PID/fd) throughout the window.
# 4. Closes the ATTEMPTS connections, then requires a fresh client to be
#    served within 15 s and RECOVER (default 50) more fresh clients to echo.
# 5. SIGTERM; reads the server's final stats line and its accept-error log.
#
# STOP_EXHAUSTED=1 replaces 4 with a SIGTERM while still exhausted (the service
# stops with every session live and the listener in its back-off); PASS then
# needs the server to exit 0 within 30 s with connected == disconnected.
#
# PASS needs: the keeper served on every probe; the server at its descriptor
# limit (>= NOFILE-8 open) for the whole window; server CPU < MAX_CPU_PCT
# (default 5) of one CPU over the window; recovery as in 4; the server exits 0.
# Bounded: the whole run is under ~60 s plus WINDOW; needs python3.
set -euo pipefail
BACKEND=${1:-epoll}
SERVER=${2:-build/cport-server}
NOFILE=${NOFILE:-256}
ATTEMPTS=${ATTEMPTS:-2000}
WINDOW=${WINDOW:-10}
RECOVER=${RECOVER:-50}
MAX_CPU_PCT=${MAX_CPU_PCT:-5}
STOP_EXHAUSTED=${STOP_EXHAUSTED:-0}

# shellcheck source=tools/check-lib.sh
. "$(dirname "$0")/check-lib.sh"
check_prepare emfile-check "$SERVER"

# Subshell: the limit applies to the server only. exec keeps the pid.
( ulimit -n "$NOFILE"; exec "$SERVER" --port 0 --mode echo --backend "$BACKEND" --workers 2 \
    >"$tmp/out" 2>"$tmp/err" ) &
srv_pid=$!
check_await_port
echo "server pid $srv_pid, limit $(awk '/Max open files/ {print $4}' /proc/$srv_pid/limits) descriptors"

set +e
timeout $((WINDOW + 90)) python3 - "$srv_pid" "$port" "$ATTEMPTS" "$WINDOW" "$RECOVER" "$NOFILE" "$MAX_CPU_PCT" "$STOP_EXHAUSTED" <<'EOF'
import errno, os, resource, select, signal, socket, sys, time
pid, port, attempts, window, recover, nofile, max_cpu, stop_exhausted = (int(a) for a in sys.argv[1:9])
resource.setrlimit(resource.RLIMIT_NOFILE, (attempts + 500, max(attempts + 500, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
tck = os.sysconf("SC_CLK_TCK")
ok = True

def cpu_ticks():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])        # utime, stime (fields 14, 15)

def run_ns():
    # Sum of every thread's run time (first field of schedstat), in ns: a
    # finer cross-check of the tick counts above. Threads that exit in
    # between are not counted (cport's workers live as long as the port).
    t = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            t += int(open(f"/proc/{pid}/task/{tid}/schedstat").read().split()[0])
        except (OSError, ValueError):
            pass
    return t

def nfds():
    return len(os.listdir(f"/proc/{pid}/fd"))

def echo(s, msg, tmo=5.0):
    s.settimeout(tmo)
    try:
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            d = s.recv(len(msg) - len(got))
            if not d:
                return False
            got += d
        return got == msg
    except OSError:
        return False

keeper = socket.create_connection(("127.0.0.1", port), timeout=5)
if not echo(keeper, b"keeper-hello"):
    print("keeper: no echo before the flood"); sys.exit(1)
fds0 = nfds()
print(f"before: server has {fds0} descriptors open; keeper echoes")

# The flood: non-blocking connects, kept open.
socks = []
t0 = time.monotonic()
for i in range(attempts):
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.setblocking(False)
    r = c.connect_ex(("127.0.0.1", port))
    if r not in (0, errno.EINPROGRESS):
        print(f"connect #{i}: {os.strerror(r)}")
    socks.append(c)
# Let the server take what it can and hit its limit.
deadline = time.monotonic() + 10
while time.monotonic() < deadline and nfds() < nofile - 8:
    time.sleep(0.05)
time.sleep(1.0)
ep = select.epoll()
for c in socks:
    ep.register(c.fileno(), select.EPOLLOUT)
est = sum(1 for _ in ep.poll(0.5, maxevents=attempts + 10))
ep.close()
print(f"flood: {attempts} connects issued in {time.monotonic() - t0:.2f} s; "
      f"{est} completed the handshake (server sessions + kernel backlog), the rest in SYN retry")

# The exhausted window.
fds_a = nfds()
c0, n0, w0 = cpu_ticks(), run_ns(), time.monotonic()
probes = good = 0
fds_min = fds_a
while time.monotonic() - w0 < window:
    probes += 1
    if echo(keeper, b"probe-%06d" % probes, 2.0):
        good += 1
    fds_min = min(fds_min, nfds())
    time.sleep(0.1)
c1, n1, w1 = cpu_ticks(), run_ns(), time.monotonic()
fds_b = nfds()
cpu_ms = (c1 - c0) * 1000 / tck
wall_ms = (w1 - w0) * 1000
pct = 100.0 * cpu_ms / wall_ms
print(f"exhausted window: server descriptors {fds_a} -> {fds_b} (min {fds_min}, limit {nofile}); "
      f"server CPU {cpu_ms:.0f} ms over {wall_ms:.0f} ms wall = {pct:.2f}% of one CPU "
      f"(limit {max_cpu}%, {tck} Hz ticks; schedstat: {(n1 - n0) / 1e6:.2f} ms)")
print(f"keeper during the window: {good}/{probes} echo probes answered")
if fds_min < nofile - 8:
    print("  -> FAIL: the server was not at its descriptor limit for the whole window"); ok = False
if pct >= max_cpu:
    print("  -> FAIL: server CPU while exhausted"); ok = False
if good != probes or probes == 0:
    print("  -> FAIL: the already-connected client was not served"); ok = False

if stop_exhausted:
    # Stop instead of recovering: SIGTERM while every descriptor is in use, the
    # sessions are live and the listener waits on its back-off timer.
    ts = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    while time.monotonic() - ts < 30:
        try:
            st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            st = "gone"
        if st in ("Z", "X", "gone"):
            break
        time.sleep(0.01)
    print(f"stop while exhausted: the server exited {(time.monotonic() - ts) * 1000:.0f} ms after SIGTERM"
          f"{'' if st in ('Z', 'X', 'gone') else ' -- NOT within 30 s'}")
    for c in socks + [keeper]:
        c.close()
    sys.exit(0 if ok and st in ("Z", "X", "gone") else 1)

# Recovery.
for c in socks:
    c.close()
socks = []
t2 = time.monotonic()
fresh_ok = False
while time.monotonic() - t2 < 15:
    try:
        f = socket.create_connection(("127.0.0.1", port), timeout=2)
        fresh_ok = echo(f, b"fresh-after-flood", 3.0)
        f.close()
        if fresh_ok:
            break
    except OSError:
        pass
    time.sleep(0.1)
rec_ms = (time.monotonic() - t2) * 1000
print(f"recovery: first fresh client {'served' if fresh_ok else 'NOT served'} "
      f"{rec_ms:.0f} ms after the flood was closed")
many = []
served = 0
for i in range(recover):
    try:
        many.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    except OSError as e:
        print(f"recovery connect #{i}: {e}")
for i, s in enumerate(many):
    served += echo(s, b"again-%04d" % i)
for s in many:
    s.close()
kept = echo(keeper, b"keeper-after")
keeper.close()
print(f"recovery: {served}/{recover} more fresh clients served; keeper still served: {kept}; "
      f"server descriptors now {nfds()}")
if not fresh_ok or served != recover or not kept:
    print("  -> FAIL: no recovery"); ok = False
sys.exit(0 if ok else 1)
EOF
py_rc=$?
set -e
sleep 0.5
if [ "$STOP_EXHAUSTED" = 1 ]; then check_stop --no-term; else check_stop; fi
echo "server log: $(grep -c 'accept paused' "$tmp/err" || true) 'accept paused' warnings; first/last:"
grep 'accept paused' "$tmp/err" | sed -n '1p;$p' | sed 's/^/  /'
other=$(grep -v 'accept paused\|received, stopping' "$tmp/err" || true)
[ -z "$other" ] || { echo "server stderr (other):"; echo "$other" | head -20 | sed 's/^/  /'; }
balanced=no
if [ -n "$stats" ]; then
  c=$(echo "$stats" | sed -n 's/.* connected=\([0-9]*\) .*/\1/p')
  d=$(echo "$stats" | sed -n 's/.* disconnected=\([0-9]*\) .*/\1/p')
  [ -n "$c" ] && [ "$c" = "$d" ] && balanced=yes
fi
echo "server: connected == disconnected: $balanced"
if [ "$py_rc" -eq 0 ] && [ "$srv_rc" -eq 0 ] && [ "$balanced" = yes ]; then
  echo "emfile-check $BACKEND: PASS"
else
  echo "emfile-check $BACKEND: FAIL (client rc $py_rc, server rc $srv_rc)"; exit 1
fi
