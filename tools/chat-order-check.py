#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""An independent chat client: checks a chat server's per-sender order without cport.

Connects N clients to a server that broadcasts every {u16 size, u16 id} packet
to every client (cport-server --mode chat), sends R packets per second from
each client for D seconds, and checks that every client receives every
packet of every sender exactly once, in the order the sender sent them.

  tools/chat-order-check.py --port 7777 --clients 20 --rate 500 --duration 5

Prints one RESULT line; exit status 0 when nothing was lost, duplicated or
out of order, 1 otherwise, 2 for bad arguments.
"""
import argparse
import selectors
import socket
import struct
import sys
import time

PKT_ID = 0x4321
HDR = struct.Struct("<HH")
BODY = struct.Struct("<III")  # magic, sender, sequence
MAGIC = 0x6368_6b31


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7777)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rate", type=float, default=500.0, help="packets per second per client")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of sending")
    p.add_argument("--drain", type=float, default=10.0, help="seconds to wait for the rest")
    a = p.parse_args()
    if not (1 <= a.clients <= 500) or a.rate <= 0 or a.duration <= 0:
        p.error("need 1..500 clients, a positive rate and duration")
    return a


class Client:
    def __init__(self, index, host, port, nclients):
        self.index = index
        self.sock = socket.create_connection((host, port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.next_seq = [0] * nclients   # next sequence expected from each sender
        self.received = 0
        self.late = 0
        self.gaps = 0
        self.corrupt = 0
        self.sent = 0

    def feed(self, data):
        self.buf += data
        off = 0
        n = len(self.buf)
        while n - off >= HDR.size:
            size, pid = HDR.unpack_from(self.buf, off)
            if size < HDR.size:
                self.corrupt += 1
                off = n
                break
            if n - off < size:
                break
            if pid != PKT_ID or size != HDR.size + BODY.size:
                self.corrupt += 1
            else:
                magic, sender, seq = BODY.unpack_from(self.buf, off + HDR.size)
                if magic != MAGIC or sender >= len(self.next_seq):
                    self.corrupt += 1
                else:
                    self.received += 1
                    want = self.next_seq[sender]
                    if seq < want:
                        self.late += 1
                    else:
                        self.gaps += seq - want
                        self.next_seq[sender] = seq + 1
            off += size
        del self.buf[:off]


def main():
    a = parse_args()
    clients = [Client(i, a.host, a.port, a.clients) for i in range(a.clients)]
    sel = selectors.DefaultSelector()
    for c in clients:
        sel.register(c.sock, selectors.EVENT_READ, c)
    # Everyone joins the room on connect; give the server a moment so that
    # nobody's first packets go to a room that does not have everyone yet.
    time.sleep(0.5)
    pkt = HDR.size + BODY.size
    start = time.monotonic()
    end_send = start + a.duration
    interval = 1.0 / a.rate
    next_tick = start
    errors = 0
    while True:
        now = time.monotonic()
        if now < end_send and now >= next_tick:
            # Catch up to the schedule: every client sends what it owes.
            due = int((now - start) * a.rate) + 1
            for c in clients:
                while c.sent < due:
                    msg = HDR.pack(pkt, PKT_ID) + BODY.pack(MAGIC, c.index, c.sent)
                    try:
                        c.sock.sendall(msg)
                    except BlockingIOError:
                        c.sock.setblocking(True)
                        c.sock.sendall(msg)
                        c.sock.setblocking(False)
                    c.sent += 1
            next_tick += interval
        expected = sum(c.sent for c in clients)
        if now >= end_send and all(c.received >= expected for c in clients):
            break
        if now >= end_send + a.drain:
            break
        timeout = max(0.0, min(next_tick, end_send) - now) if now < end_send else 0.05
        for key, _ in sel.select(timeout):
            c = key.data
            try:
                data = c.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(c.sock)
                errors += 1
                continue
            c.feed(data)
    sent = sum(c.sent for c in clients)
    expected = sent * a.clients
    received = sum(c.received for c in clients)
    late = sum(c.late for c in clients)
    gaps = sum(c.gaps for c in clients)
    corrupt = sum(c.corrupt for c in clients)
    lost = expected - received
    ok = lost == 0 and late == 0 and gaps == 0 and corrupt == 0 and errors == 0
    print(f"RESULT clients={a.clients} sent={sent} expected={expected} received={received} "
          f"lost={lost} out_of_order={late} gaps={gaps} corrupt={corrupt} closed={errors} "
          f"status={'ok' if ok else 'fail'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
