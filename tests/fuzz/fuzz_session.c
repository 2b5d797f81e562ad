/* SPDX-License-Identifier: MIT */
/*
 * fuzz_session: a real cport server session driven by arbitrary bytes and
 * arbitrary disconnects, under libFuzzer (+ ASan + UBSan).
 *
 * The process runs one cport server on 127.0.0.1 (CP_FRAMING_PACKET,
 * max_packet 1024, a small send queue limit of 16 KiB so overflows happen, a
 * 30 ms partial-packet timeout), created once in LLVMFuzzerInitialize, and a
 * "chaos" thread that performs server-side actions after a delay. Each input
 * is a script of at most 96 operations on up to 4 client connections:
 *
 *   op byte: bits 5-6 the connection, bits 0-4 the operation (mod 16)
 *    0 connect (arg bit 0: SO_RCVBUF 4096, so server sends back up)
 *    1 send arg bytes of the input, raw          2 send a valid packet (id, body arg*4)
 *    3 shutdown(SHUT_WR)                          4 close with SO_LINGER 0 (reset)
 *    5 close                                      6 read what is there (non-blocking)
 *    7 chaos thread: cp_session_disconnect after arg*4 us
 *    8 chaos thread: cp_session_send_copy of arg*64 bytes after arg*4 us
 *    9 cp_session_disconnect now (this thread)   10 cp_session_send 8 KiB now
 *   11 sleep arg*4 us                            12 cp_service_disconnect_id
 *   13 cp_service_send_to                        14 cp_service_broadcast of a small packet
 *   15 send a packet whose handler returns -1 (CP_REASON_HANDLER)
 *
 * The server's on_packet echoes packets with an odd id. Checked (abort() on a
 * violation, which libFuzzer reports with the input): every session's
 * callbacks never overlap, no callback after on_disconnected, on_disconnected
 * exactly once per on_connected, and after the input (every client socket
 * closed) the server reaches on_connected == on_disconnected and
 * stats.sessions == 0 within 10 s. ASan/UBSan catch memory errors.
 */
#include <cport.h>

#include "fuzz_common.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define NCONN 4
#define MAX_OPS 96
#define MAX_RECS 512

typedef struct rec {
    cp_session *s; /* referenced in on_connected, unref'd after the input */
    uint64_t id;
    atomic_int state;   /* 0 connected, 1 disconnected */
    atomic_int inside;  /* a callback of this session is running */
    atomic_int pending; /* chaos commands still queued for it */
} rec;

static cp_port *g_port;
static cp_service *g_svc;
static _Atomic(rec *) g_by_port[65536];
static rec *g_recs[MAX_RECS];
static atomic_int g_nrecs;
static atomic_long g_connected, g_disconnected;

static void fail(const char *what, long a, long b)
{
    fprintf(stderr, "fuzz_session: VIOLATION: %s (%ld, %ld)\n", what, a, b);
    abort();
}

static void enter(cp_session *s, rec **out)
{
    rec *r = cp_session_data(s);
    if (!r)
        fail("callback of a session without a record", 0, 0);
    if (atomic_load(&r->state) != 0)
        fail("callback after on_disconnected", 0, 0);
    if (atomic_fetch_add(&r->inside, 1) != 0)
        fail("callbacks of one session overlap", 0, 0);
    *out = r;
}

static void leave(rec *r) { atomic_fetch_sub(&r->inside, 1); }

static void on_connected(cp_session *s)
{
    rec *r = calloc(1, sizeof *r);
    if (!r)
        abort();
    r->s = s;
    r->id = cp_session_id(s);
    cp_session_ref(s);
    cp_session_set_data(s, r);
    int i = atomic_fetch_add(&g_nrecs, 1);
    if (i >= MAX_RECS)
        fail("too many sessions in one input", i, MAX_RECS);
    g_recs[i] = r;
    char peer[64];
    if (cp_session_peer(s, peer, sizeof peer) > 0) {
        char *c = strrchr(peer, ':');
        if (c)
            atomic_store(&g_by_port[atoi(c + 1) & 0xffff], r);
    }
    atomic_fetch_add(&g_connected, 1);
}

static int on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    rec *r;
    enter(s, &r);
    int rc = 0;
    if (id == 0xdead) {
        rc = -1;
    } else if (id & 1) {
        cp_sendbuf *b = cp_packet_make(id, body, len);
        if (b) {
            cp_session_send(s, b);
            cp_sendbuf_unref(b);
        }
    }
    leave(r);
    return rc;
}

static void on_sent(cp_session *s, size_t bytes)
{
    rec *r;
    enter(s, &r);
    leave(r);
}

static void on_disconnected(cp_session *s, cp_reason reason, int err)
{
    rec *r;
    enter(s, &r);
    if (reason <= CP_REASON_NONE || reason >= CP_REASON_COUNT_)
        fail("reason out of range", reason, err);
    if (cp_session_send_copy(s, "x", 1) != -ENOTCONN)
        fail("send inside on_disconnected did not return -ENOTCONN", 0, 0);
    leave(r);
    atomic_store(&r->state, 1);
    atomic_fetch_add(&g_disconnected, 1);
}

/* ------------------------------------------------------------------ chaos thread */

typedef struct cmd {
    rec *r;
    int kind; /* 0 disconnect, 1 send */
    unsigned delay_us;
    size_t bytes;
} cmd;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static cmd g_q[256];
static int g_qhead, g_qlen;
static atomic_int g_inflight;
static uint8_t g_junk[8192];

static void *chaos_main(void *arg)
{
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&g_mu);
        while (g_qlen == 0)
            pthread_cond_wait(&g_cv, &g_mu);
        cmd c = g_q[g_qhead];
        g_qhead = (g_qhead + 1) % 256;
        g_qlen--;
        pthread_mutex_unlock(&g_mu);
        uint64_t until = now_us() + c.delay_us;
        while (now_us() < until)
            sched_yield();
        if (c.kind == 0)
            cp_session_disconnect(c.r->s);
        else
            cp_session_send_copy(c.r->s, g_junk, c.bytes);
        atomic_fetch_sub(&c.r->pending, 1);
        atomic_fetch_sub(&g_inflight, 1);
    }
    return NULL;
}

static void chaos_push(rec *r, int kind, unsigned delay_us, size_t bytes)
{
    pthread_mutex_lock(&g_mu);
    if (g_qlen < 256) {
        g_q[(g_qhead + g_qlen) % 256] = (cmd){ r, kind, delay_us, bytes };
        g_qlen++;
        atomic_fetch_add(&r->pending, 1);
        atomic_fetch_add(&g_inflight, 1);
        pthread_cond_signal(&g_cv);
    }
    pthread_mutex_unlock(&g_mu);
}

/* ------------------------------------------------------------------ libFuzzer */


int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    /* Packet-shaped junk for server sends: {size, id} headers every 64 bytes. */
    for (size_t i = 0; i < sizeof g_junk; i += 64) {
        g_junk[i] = 64;
        g_junk[i + 1] = 0;
        g_junk[i + 2] = (uint8_t)i;
        g_junk[i + 3] = 0;
        memset(g_junk + i + 4, 'j', 60);
    }
    cp_port_opts po = { .workers = 2 };
    int rc = cp_port_create(&g_port, &po);
    if (rc != 0) {
        fprintf(stderr, "fuzz_session: cp_port_create: %s\n", cp_strerror(rc));
        exit(1);
    }
    cp_handlers h = { .on_connected = on_connected,
                      .on_packet = on_packet,
                      .on_sent = on_sent,
                      .on_disconnected = on_disconnected };
    cp_server_opts o = { .host = "127.0.0.1", .port = 0 };
    o.session.framing = CP_FRAMING_PACKET;
    o.session.max_packet = 1024;
    o.session.send_queue_limit = 16 * 1024;
    o.session.packet_timeout_ms = 30;
    rc = cp_server_start(&g_svc, g_port, &o, &h, NULL);
    if (rc != 0) {
        fprintf(stderr, "fuzz_session: cp_server_start: %s\n", cp_strerror(rc));
        exit(1);
    }
    pthread_t t;
    pthread_create(&t, NULL, chaos_main, NULL);
    pthread_detach(t);
    fprintf(stderr, "fuzz_session: backend %s, server on port %u\n", cp_port_backend_name(g_port),
            cp_service_listen_port(g_svc));
    return 0;
}

typedef struct conn {
    int fd;
    uint16_t lport;
} conn;

static rec *rec_of(conn *c)
{
    if (c->lport == 0)
        return NULL;
    rec *r = atomic_load(&g_by_port[c->lport]);
    return r;
}

static void conn_connect(conn *c, int small_rcvbuf)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (small_rcvbuf) {
        int sz = 4096;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    }
    struct sockaddr_in a = { .sin_family = AF_INET,
                             .sin_port = htons(cp_service_listen_port(g_svc)),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (connect_retry(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return;
    }
    struct sockaddr_in l;
    socklen_t ll = sizeof l;
    getsockname(fd, (struct sockaddr *)&l, &ll);
    c->fd = fd;
    c->lport = ntohs(l.sin_port);
    /* Wait (briefly) for the server's on_connected so server-side operations
     * have a session to act on. */
    uint64_t until = now_us() + 200000;
    while (!atomic_load(&g_by_port[c->lport]) && now_us() < until)
        sched_yield();
}

static void conn_close(conn *c, int reset)
{
    if (c->fd < 0)
        return;
    if (reset) {
        struct linger lg = { .l_onoff = 1, .l_linger = 0 };
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(c->fd);
    c->fd = -1;
}

static void send_packet(int fd, uint16_t id, size_t body)
{
    uint8_t buf[4 + 1024];
    if (body > 1020)
        body = 1020;
    buf[0] = (uint8_t)(body + 4);
    buf[1] = (uint8_t)((body + 4) >> 8);
    buf[2] = (uint8_t)id;
    buf[3] = (uint8_t)(id >> 8);
    memset(buf + 4, 'p', body);
    send(fd, buf, body + 4, MSG_NOSIGNAL | MSG_DONTWAIT);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    conn cs[NCONN];
    uint16_t used_ports[MAX_OPS];
    int nused = 0;
    for (int i = 0; i < NCONN; i++)
        cs[i] = (conn){ .fd = -1 };
    size_t pos = 0;
    for (int op = 0; op < MAX_OPS && pos < size; op++) {
        uint8_t b = data[pos++];
        uint8_t arg = pos < size ? data[pos] : 0;
        conn *c = &cs[(b >> 5) & 3];
        int kind = b & 15;
        if (kind == 0) {
            if (c->fd < 0 && nused < MAX_OPS) {
                pos++;
                conn_connect(c, arg & 1);
                if (c->fd >= 0)
                    used_ports[nused++] = c->lport;
            }
            continue;
        }
        if (kind == 11) {
            pos++;
            uint64_t until = now_us() + (unsigned)arg * 4;
            while (now_us() < until)
                sched_yield();
            continue;
        }
        if (kind == 14) {
            cp_sendbuf *pb = cp_packet_make(3, "bcast", 5);
            cp_service_broadcast(g_svc, pb);
            cp_sendbuf_unref(pb);
            continue;
        }
        rec *r = rec_of(c);
        switch (kind) {
        case 1: {
            pos++;
            size_t n = arg;
            if (n > size - pos)
                n = size - pos;
            if (c->fd >= 0 && n)
                send(c->fd, data + pos, n, MSG_NOSIGNAL | MSG_DONTWAIT);
            pos += n;
            break;
        }
        case 2:
            pos++;
            if (c->fd >= 0)
                send_packet(c->fd, arg, (size_t)arg * 4);
            break;
        case 3:
            if (c->fd >= 0)
                shutdown(c->fd, SHUT_WR);
            break;
        case 4: conn_close(c, 1); break;
        case 5: conn_close(c, 0); break;
        case 6:
            if (c->fd >= 0) {
                uint8_t buf[65536];
                while (recv(c->fd, buf, sizeof buf, MSG_DONTWAIT) > 0)
                    ;
            }
            break;
        case 7:
            pos++;
            if (r)
                chaos_push(r, 0, (unsigned)arg * 4, 0);
            break;
        case 8:
            pos++;
            if (r)
                chaos_push(r, 1, (unsigned)arg * 4, ((size_t)arg % 128 + 1) * 64);
            break;
        case 9:
            if (r)
                cp_session_disconnect(r->s);
            break;
        case 10:
            if (r)
                cp_session_send_copy(r->s, g_junk, sizeof g_junk);
            break;
        case 12:
            if (r)
                cp_service_disconnect_id(g_svc, r->id);
            break;
        case 13:
            if (r) {
                cp_sendbuf *pb = cp_packet_make(5, "to", 2);
                cp_service_send_to(g_svc, r->id, pb);
                cp_sendbuf_unref(pb);
            }
            break;
        case 15:
            if (c->fd >= 0)
                send_packet(c->fd, 0xdead, 0);
            break;
        }
    }
    for (int i = 0; i < NCONN; i++)
        conn_close(&cs[i], 0);

    /* Every session must end: on_connected == on_disconnected, nothing live. */
    uint64_t deadline = now_us() + 10000000;
    cp_service_stats st;
    for (;;) {
        cp_service_stats_get(g_svc, &st);
        long con = atomic_load(&g_connected), dis = atomic_load(&g_disconnected);
        if (con == dis && st.sessions == 0 && st.connected == (uint64_t)con &&
            st.disconnected == (uint64_t)dis && atomic_load(&g_inflight) == 0)
            break;
        if (now_us() > deadline) {
            fprintf(stderr,
                    "fuzz_session: on_connected %ld on_disconnected %ld, stats: sessions %llu "
                    "connected %llu disconnected %llu, chaos in flight %d\n",
                    con, dis, (unsigned long long)st.sessions, (unsigned long long)st.connected,
                    (unsigned long long)st.disconnected, atomic_load(&g_inflight));
            int nr = atomic_load(&g_nrecs);
            for (int i = 0; i < nr; i++)
                for (int j = 0; j < nused; j++)
                    if (g_recs[i] && atomic_load(&g_recs[i]->state) == 0 &&
                        atomic_load(&g_by_port[used_ports[j]]) == g_recs[i])
                        fprintf(stderr,
                                "fuzz_session: still live: the session of connect #%d of this input "
                                "(client port %u)\n",
                                j, used_ports[j]);
            fail("sessions did not all end within 10 s of the clients closing", con, dis);
        }
        sched_yield();
    }
    int n = atomic_load(&g_nrecs);
    for (int i = 0; i < n; i++) {
        rec *r = g_recs[i];
        if (atomic_load(&r->state) != 1)
            fail("a session ended without on_disconnected", i, 0);
        cp_session_unref(r->s);
        free(r);
        g_recs[i] = NULL;
    }
    atomic_store(&g_nrecs, 0);
    for (int i = 0; i < nused; i++)
        atomic_store(&g_by_port[used_ports[i]], NULL);
    return 0;
}
