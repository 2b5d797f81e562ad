/* SPDX-License-Identifier: MIT */
/*
 * Repro (io_uring; found by fuzz_ws_frames, fixed in on_send_cqe: it is in the send path
 * of src/net/session.c): a cp_session_disconnect that lands while a send is in
 * flight makes the closing flush write that send's bytes again.
 *
 * on_send_cqe consumes what a completed send wrote only while the session is
 * "wire open"; in DISCONNECTING it skips sent(), so the bytes stay at the
 * head of the wire queue. The close then runs the filters' last words
 * (ws_closing: a Close frame) and cp__session_wire_flush, which does write in
 * DISCONNECTING: the already-sent bytes go out a second time, then the
 * Close. Here the WebSocket peer reads its 101 again after the upgrade,
 * where a frame must be (the 80 KiB queued meanwhile are dropped, as a hard
 * close drops what is queued). A TLS session's closing alert would follow
 * re-sent records the same way. Counting res in on_send_cqe also in
 * DISCONNECTING (as cp__session_wire_flush writes then) makes it pass.
 *
 *   cc -D_GNU_SOURCE -Iinclude tests/fuzz/repro/uring_disconnect_resends.c build/libcport.a \
 *      -luring -lssl -lcrypto -lpthread
 *   CP_BACKEND=uring ./a.out   -> "run K: not a frame after 0 bytes of frames: \"HTTP/1.1 101\"",
 *                                 "bad N of 300"  (exit 1): N 1-8 on main at 028a8b0, 60-95 at
 *                                 1c1a584 (the window moved with the framed queue)
 *   CP_BACKEND=epoll ./a.out   -> "bad 0 of 300"  (exit 0)
 * With on_send_cqe counting res in DISCONNECTING too: 0 of 900 on io_uring.
 * Fixed so: after the fix 0 of 300, before it 81 of 300 (io_uring, one run each).
 */
#include <cport.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static _Atomic(cp_session *) g_s;
static atomic_int g_ended;

static void on_connected(cp_session *s)
{
    cp_session_ref(s);
    atomic_store(&g_s, s);
}

static void on_disconnected(cp_session *s, cp_reason r, int e) { atomic_fetch_add(&g_ended, 1); }

int main(void)
{
    cp_port *port;
    cp_port_opts po = { .workers = 2 };
    cp_port_create(&port, &po);
    cp_ws *ws;
    cp_ws_opts wo = { 0 };
    cp_ws_create(&ws, &wo);
    cp_handlers h = { .on_connected = on_connected, .on_disconnected = on_disconnected };
    cp_server_opts o = { .host = "127.0.0.1" };
    o.session.ws = ws;
    cp_service *svc;
    if (cp_server_start(&svc, port, &o, &h, NULL) != 0)
        return 2;
    static uint8_t junk[20480];
    memset(junk, 'j', sizeof junk);
    int bad = 0, runs = 300;
    for (int it = 0; it < runs; it++) {
        atomic_store(&g_s, NULL);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        struct timeval tv = { .tv_sec = 2 };
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        struct sockaddr_in a = { .sin_family = AF_INET,
                                 .sin_port = htons(cp_service_listen_port(svc)),
                                 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        connect(fd, (struct sockaddr *)&a, sizeof a);
        static const char req[] =
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        send(fd, req, sizeof req - 1, 0);
        char head[512];
        size_t got = 0;
        while (got < sizeof head && !memmem(head, got, "\r\n\r\n", 4)) {
            ssize_t r = recv(fd, head + got, 1, 0);
            if (r <= 0)
                return 3;
            got += (size_t)r;
        }
        while (!atomic_load(&g_s))
            sched_yield();
        cp_session *s = atomic_load(&g_s);
        for (int k = 0; k < 4; k++) {
            junk[0] = (uint8_t)k; /* each buffer its own first byte */
            cp_session_send_copy(s, junk, sizeof junk);
        }
        cp_session_disconnect(s); /* while the 101's send may not have completed on the worker */
        /* Everything after the 101 must be frames: binary ones, each buffer
         * at most once and in order, then a Close. */
        static uint8_t buf[1 << 20];
        size_t n = 0;
        for (ssize_t r; (r = recv(fd, buf + n, sizeof buf - n, 0)) > 0;)
            n += (size_t)r;
        size_t i = 0;
        int next = 0, again = 0;
        while (i + 2 <= n && (buf[i] == 0x82 || buf[i] == 0x88)) {
            size_t l = buf[i + 1] & 0x7f, hl = 2;
            if (l == 126) {
                l = (size_t)buf[i + 2] << 8 | buf[i + 3];
                hl = 4;
            }
            if (buf[i] == 0x82 && i + hl < n && buf[i + hl] != next++)
                again = 1;
            i += hl + l;
        }
        if (i != n || again) {
            if (!bad)
                printf("run %d: %s after %zu bytes of frames: \"%.12s\"\n", it,
                       again ? "a buffer again or out of order" : "not a frame", i, (const char *)buf + i);
            bad++;
        }
        close(fd);
        while (atomic_load(&g_ended) <= it)
            sched_yield();
        cp_session_unref(s);
    }
    printf("backend %s: bad %d of %d\n", cp_port_backend_name(port), bad, runs);
    cp_service_stop(svc);
    cp_ws_unref(ws);
    cp_port_destroy(port);
    return bad ? 1 : 0;
}
