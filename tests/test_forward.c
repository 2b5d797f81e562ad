/* SPDX-License-Identifier: MIT */
/*
 * Forwarding without a copy (cp_sendbuf_from_recv): a handler sends on the
 * bytes it was given from the receive buffer the backend lent out. Exact
 * bytes under load with several workers; one packet relayed to sessions of
 * other workers, which release the lent buffer on their own threads; a
 * reader that stalls while lent buffers pile up behind it; views that
 * outlive their port; and the cases that must copy.
 */
#include "helpers.h"

#include "buf/sendbuf.h" /* cp__sendbuf_is_view: whether a lend happened */

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* What cp_sendbuf_from_recv returned for 4 KiB or more (views or copies),
 * and for less. */
static atomic_int g_views, g_copies, g_small_views;

static void count(const cp_sendbuf *b, size_t len)
{
    if (len < 4096)
        atomic_fetch_add(&g_small_views, cp__sendbuf_is_view(b) ? 1 : 0);
    else
        atomic_fetch_add(cp__sendbuf_is_view(b) ? &g_views : &g_copies, 1);
}

/* Sends the len bytes at p, which s's callback was given, to each of the n
 * sessions at to, as one buffer from cp_sendbuf_from_recv (counted); -1 out
 * of memory. */
static int forward(cp_session *s, const uint8_t *p, size_t len, cp_session *const *to, int n)
{
    cp_sendbuf *b = cp_sendbuf_from_recv(s, p, len);
    if (!b)
        return -1;
    count(b, len);
    for (int i = 0; i < n; i++)
        (void)cp_session_send(to[i], b);
    cp_sendbuf_unref(b);
    return 0;
}

/* Raw echo of what came, and a packet echoed as it came, header and all. */
static size_t fwd_echo(cp_session *s, const uint8_t *data, size_t len)
{
    if (forward(s, data, len, &s, 1) < 0)
        cp_session_disconnect(s);
    return len;
}

static int echo_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    (void)id;
    return forward(s, body - CP_PACKET_HEADER, len + CP_PACKET_HEADER, &s, 1);
}

/* A tracking server (tests/helpers.h: every session connected and
 * disconnected once, then the leak check) whose packets or raw bytes go to
 * on_packet or on_recv. */
static void env_start(cpt_env *e, int workers, cp_server_opts *o, cp_packet_fn on_packet,
                      size_t (*on_recv)(cp_session *, const uint8_t *, size_t))
{
    cp_handlers h = cpt_track_handlers();
    h.on_packet = on_packet;
    h.on_recv = on_recv;
    if (on_recv)
        o->session.framing = CP_FRAMING_RAW;
    cpt_env_start(e, workers, o, &h, 16, 0);
}

/* Waits until every provided buffer of the port is free again (io_uring;
 * trivially true elsewhere), none held or lent. */
static void xbufs_back(cp_port *port)
{
    cp_worker_metrics m;
    CPT_AWAIT(cp_port_metrics_get(port, -1, &m) == 0 && m.recv_bufs_free == m.recv_bufs && !m.recv_bufs_lent,
              5000, "%llu of %llu provided buffers free, %llu held, %llu lent",
              (unsigned long long)m.recv_bufs_free, (unsigned long long)m.recv_bufs,
              (unsigned long long)m.recv_bufs_held, (unsigned long long)m.recv_bufs_lent);
}

typedef struct echo_client {
    uint16_t port;
    int idx, rounds, bad, rc;
} echo_client;

/* Four 16 KiB messages out, then their echo in, checked byte for byte: the
 * server's queue never holds more than that, so nothing pauses its reads. */
static void *echo_client_main(void *arg)
{
    echo_client *c = arg;
    enum { B = 16384, K = 4 };
    int fd = cpt_connect(CPT_HOST4, c->port, 0);
    if (fd < 0) {
        c->rc = fd;
        return NULL;
    }
    uint8_t *out = malloc((size_t)B * K), *in = malloc((size_t)B * K);
    for (int r = 0; r < c->rounds && !c->rc; r++) {
        uint64_t off = (uint64_t)r * B * K;
        cpt_fill(out, (size_t)B * K, off, (uint32_t)c->idx);
        if ((c->rc = cpt_send_all(fd, out, (size_t)B * K)) != 0)
            break;
        if ((c->rc = cpt_recv_exact(fd, in, (size_t)B * K)) != 0)
            break;
        if (cpt_check_pattern(in, (size_t)B * K, off, (uint32_t)c->idx) != -1)
            c->bad++;
    }
    free(out);
    free(in);
    cpt_close(fd);
    return NULL;
}

/* Eight connections on four workers echo 16 KiB messages; every byte comes
 * back in order, and every receive of 4 KiB or more was lent, not copied. */
Test(forward, echo_16k_exact_on_four_workers, .timeout = 60)
{
    enum { T = 8 };
    cpt_env e;
    cp_server_opts o = { 0 };
    env_start(&e, 4, &o, NULL, fwd_echo);
    echo_client c[T];
    pthread_t th[T];
    for (int i = 0; i < T; i++) {
        c[i] = (echo_client){ .port = e.sport, .idx = i, .rounds = 150 };
        cr_assert_eq(pthread_create(&th[i], NULL, echo_client_main, &c[i]), 0);
    }
    for (int i = 0; i < T; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(c[i].rc, 0, "client %d: error %d", i, c[i].rc);
        cr_assert_eq(c[i].bad, 0, "client %d: %d rounds came back different", i, c[i].bad);
    }
    cr_assert_gt(atomic_load(&g_views), T * 50, "only %d views", atomic_load(&g_views));
    cr_assert_eq(atomic_load(&g_copies), 0, "%d receives of 4 KiB or more were copied (%d lent)",
                 atomic_load(&g_copies), atomic_load(&g_views));
    cr_assert_eq(atomic_load(&g_small_views), 0, "a receive under 4 KiB was lent");
    CPT_AWAIT(atomic_load(&e.t->disconnected) == T, 5000, "not all disconnected");
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ relays */

enum { SINKS = 4, RELAYED = 1500, BODY = 6000 };
static cp_session *_Atomic g_sinks[SINKS];
static atomic_int g_nsinks;

/* Packet 1 makes its sender a sink; packet 2 is relayed, as it came, to
 * every sink, whatever worker each is on: one view, several queues. */
static int relay_on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    if (id == 1) {
        int i = atomic_fetch_add(&g_nsinks, 1);
        if (i >= SINKS)
            return -1;
        cp_session_ref(s);
        atomic_store(&g_sinks[i], s);
        return 0;
    }
    cp_session *to[SINKS];
    for (int i = 0; i < SINKS; i++)
        to[i] = atomic_load(&g_sinks[i]);
    return forward(s, body - CP_PACKET_HEADER, len + CP_PACKET_HEADER, to, SINKS);
}

typedef struct sink {
    int fd, idx, rc, bad;
} sink;

static void *sink_main(void *arg)
{
    sink *k = arg;
    uint8_t *in = malloc(BODY);
    for (int p = 0; p < RELAYED && !k->rc; p++) {
        uint16_t id;
        size_t len;
        if ((k->rc = cpt_recv_packet(k->fd, &id, in, BODY, &len)) != 0)
            break;
        if (id != 2 || len != BODY || cpt_check_pattern(in, BODY, (uint64_t)p * BODY, 7) != -1)
            k->bad++;
    }
    free(in);
    return NULL;
}

/* One source's packets go to four sinks spread over the workers, in order
 * and byte-exact; their views are released by whichever worker wrote them
 * last, and every provided buffer comes back (io_uring). */
Test(forward, relay_to_sessions_of_other_workers, .timeout = 60)
{
    cpt_env e;
    cp_server_opts o = { .session = { .max_packet = 65535, .send_queue_limit = 64u << 20 } };
    env_start(&e, 4, &o, relay_on_packet, NULL);
    uint16_t sport = e.sport;
    sink k[SINKS];
    pthread_t th[SINKS];
    for (int i = 0; i < SINKS; i++) {
        k[i] = (sink){ .fd = cpt_xconnect(sport), .idx = i };
        cpt_xsend_packet(k[i].fd, 1, NULL, 0);
    }
    CPT_AWAIT(atomic_load(&g_nsinks) == SINKS, 5000, "the sinks did not register");
    for (int i = 0; i < SINKS; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, sink_main, &k[i]), 0);
    int src = cpt_xconnect(sport);
    uint8_t *body = malloc(BODY);
    for (int p = 0; p < RELAYED; p++) {
        cpt_fill(body, BODY, (uint64_t)p * BODY, 7);
        cpt_xsend_packet(src, 2, body, BODY);
    }
    free(body);
    for (int i = 0; i < SINKS; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(k[i].rc, 0, "sink %d: error %d", i, k[i].rc);
        cr_assert_eq(k[i].bad, 0, "sink %d: %d packets differ", i, k[i].bad);
    }
    cr_assert_gt(atomic_load(&g_views), 0, "no packet was relayed from the receive buffer");
    /* Packets split across receives were reassembled, and copied. */
    cr_assert_eq(atomic_load(&g_views) + atomic_load(&g_copies), RELAYED);
    xbufs_back(e.port);
    cpt_close(src);
    for (int i = 0; i < SINKS; i++) {
        cpt_close(k[i].fd);
        cp_session_unref(atomic_load(&g_sinks[i]));
    }
    CPT_AWAIT(atomic_load(&e.t->disconnected) == SINKS + 1, 5000, "not all disconnected");
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ a reader that stalls */

/* A client sends 12 MiB and reads nothing; its echoes pile up in the
 * server's queue as lent buffers. The worker must go on receiving for
 * everyone (io_uring lends at most a quarter of its buffers, the queue
 * copies the rest out as it backs up), and the stalled client then reads
 * every byte back, exact. */
Test(forward, stalled_reader_does_not_starve_the_worker, .timeout = 60)
{
    enum { B = 16384, N = 768 };
    cpt_env e;
    cp_server_opts o = { .session.send_queue_limit = 64u << 20 };
    env_start(&e, 1, &o, NULL, fwd_echo);
    cp_service *svc = e.svc;
    uint16_t sport = e.sport;
    int fd = cpt_connect(CPT_HOST4, sport, 16384);
    cr_assert_geq(fd, 0);
    uint8_t *out = malloc((size_t)B * N);
    cpt_fill(out, (size_t)B * N, 0, 11);
    cpt_xsend(fd, out, (size_t)B * N);
    cpt_xbytes_in(svc, (uint64_t)B * N);
    cpt_xwrites_stalled(svc);
    cp_worker_metrics m;
    cr_assert_eq(cp_port_metrics_get(e.port, -1, &m), 0);
    if (m.recv_bufs) {
        uint64_t in_use = m.recv_bufs - m.recv_bufs_free - m.recv_bufs_held;
        cr_assert_gt(m.recv_bufs_lent, 0u, "no provided buffer is lent to the stalled queue");
        cr_assert_leq(m.recv_bufs_lent, m.recv_bufs / 4, "%llu of %llu provided buffers lent",
                      (unsigned long long)m.recv_bufs_lent, (unsigned long long)m.recv_bufs);
        cr_assert_leq(in_use, m.recv_bufs / 4, "%llu of %llu provided buffers neither free nor held",
                      (unsigned long long)in_use, (unsigned long long)m.recv_bufs);
    } else {
        cr_assert_eq(m.recv_bufs_lent, 0u, "only io_uring has provided buffers to lend");
    }
    /* A neighbour on the same (only) worker is still served. */
    int nb = cpt_xconnect(sport);
    uint8_t ping[8192], pong[8192];
    cpt_fill(ping, sizeof ping, 0, 12);
    cpt_xsend(nb, ping, sizeof ping);
    cpt_xrecv(nb, pong, sizeof pong);
    cr_assert_eq(memcmp(ping, pong, sizeof ping), 0);
    cpt_close(nb);
    uint8_t *in = malloc((size_t)B * N);
    cpt_xrecv(fd, in, (size_t)B * N);
    cr_assert_eq(memcmp(in, out, (size_t)B * N), 0, "the stalled reader's echo differs");
    cr_assert_gt(atomic_load(&g_views), 0);
    free(in);
    free(out);
    cpt_close(fd);
    xbufs_back(e.port);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 2, 5000, "not all disconnected");
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ throttled sessions */

/* A session over its receive rate is paused with receives on their way
 * (io_uring holds their completions, buffers and all, and delivers them
 * when it resumes): packets forwarded from those deliveries, and from the
 * ones that follow, come back exact and in order, and every provided buffer
 * comes back. */
Test(forward, throttled_session_forwards_what_was_held, .timeout = 60)
{
    enum { P = 240, B8 = 8000 };
    cpt_env e;
    cp_server_opts o = {
        .session = { .max_packet = 65535, .recv_rate_packets = 600, .recv_burst_packets = 20 }
    };
    env_start(&e, 2, &o, echo_packet, NULL);
    int fd = cpt_xconnect(e.sport);
    size_t n = (size_t)P * (4 + B8);
    uint8_t *out = malloc(n), *in = malloc(n);
    for (int p = 0; p < P; p++) {
        cpt_put_header(out + (size_t)p * (4 + B8), 4 + B8, (uint16_t)p);
        cpt_fill(out + (size_t)p * (4 + B8) + 4, B8, (uint64_t)p * B8, 21);
    }
    cpt_xsend(fd, out, n);
    cpt_xrecv(fd, in, n);
    cr_assert_eq(memcmp(in, out, n), 0, "the throttled session's echoes differ");
    cr_assert_gt(atomic_load(&g_views), 0, "nothing was lent");
    free(in);
    free(out);
    cpt_close(fd);
    xbufs_back(e.port);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 5000, "the session did not end");
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ lifetimes */

static cp_sendbuf *_Atomic g_kept;

static size_t keep_first(cp_session *s, const uint8_t *data, size_t len)
{
    cp_sendbuf *b = cp_sendbuf_from_recv(s, data, len);
    cp_sendbuf *none = NULL;
    if (b && (!cp__sendbuf_is_view(b) || !atomic_compare_exchange_strong(&g_kept, &none, b)))
        cp_sendbuf_unref(b);
    return len;
}

/* A view kept by the application past cp_port_destroy still has its bytes
 * (the lent buffer's memory goes with its last reference, not with the
 * port): under ASan a freed or unmapped buffer fails here. */
Test(forward, view_outlives_its_port, .timeout = 30)
{
    enum { B = 8192 };
    /* The environment's leak check runs with the view still kept; this one
     * after its release. */
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cpt_env e;
    cp_server_opts o = { 0 };
    env_start(&e, 2, &o, NULL, keep_first);
    int fd = cpt_xconnect(e.sport);
    uint8_t out[B];
    cpt_fill(out, B, 0, 5);
    for (int i = 0; i < 50 && !atomic_load(&g_kept); i++) {
        cpt_xsend(fd, out, B);
        cpt_sleep_ms(10);
    }
    CPT_AWAIT(atomic_load(&g_kept) != NULL, 5000, "no receive was lent");
    cpt_close(fd);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 5000, "the session did not end");
    cpt_env_stop(&e);
    cp_sendbuf *b = atomic_load(&g_kept);
    size_t len = cp_sendbuf_len(b);
    cr_assert_geq(len, 4096u);
    /* The view holds the start of some send: bytes of the pattern, at a
     * multiple of B from where they began. */
    const uint8_t *p = cp_sendbuf_data(b);
    bool found = false;
    for (size_t at = 0; at < B && !found; at++)
        found = cpt_check_pattern(p, len < B - at ? len : B - at, at, 5) == -1;
    cr_assert(found, "the kept view's bytes changed after the port was destroyed");
    cp_sendbuf_unref(b);
    cpt_leak_end(&leak);
}

/* ------------------------------------------------------------------ copies */

static atomic_int g_whole_copied, g_split_copied, g_split_bad;
static cp_session *_Atomic g_split_session;

/* Packets of 8 KiB, relayed back as they came. Packet 9 arrives in two
 * receives and is reassembled, so it cannot be lent. */
static int split_on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    cp_sendbuf *b = cp_sendbuf_from_recv(s, body - CP_PACKET_HEADER, len + CP_PACKET_HEADER);
    if (!b)
        return -1;
    if (cp_sendbuf_len(b) != len + CP_PACKET_HEADER ||
        memcmp(cp_sendbuf_data(b), body - CP_PACKET_HEADER, len + CP_PACKET_HEADER) != 0)
        atomic_fetch_add(&g_split_bad, 1);
    atomic_fetch_add(id == 9 ? &g_split_copied : &g_whole_copied, cp__sendbuf_is_view(b) ? 0 : 1);
    cp_session *none = NULL;
    if (atomic_compare_exchange_strong(&g_split_session, &none, s))
        cp_session_ref(s);
    (void)cp_session_send(s, b);
    cp_sendbuf_unref(b);
    return 0;
}

/* Bytes that are not in a receive buffer any more are copied: a packet
 * reassembled from two receives, and bytes named outside any callback. */
Test(forward, copies_what_cannot_be_lent, .timeout = 30)
{
    enum { B = 8192 };
    cpt_env e;
    cp_server_opts o = { .session.max_packet = 65535 };
    env_start(&e, 1, &o, split_on_packet, NULL);
    int fd = cpt_xconnect(e.sport);
    uint8_t pkt[B + 4], back[B + 4];
    cpt_put_header(pkt, B + 4, 9);
    cpt_fill(pkt + 4, B, 0, 3);
    cpt_xsend(fd, pkt, 100);
    cpt_sleep_ms(100); /* its own receive */
    cpt_xsend(fd, pkt + 100, sizeof pkt - 100);
    cpt_xrecv(fd, back, sizeof back);
    cr_assert_eq(memcmp(pkt, back, sizeof pkt), 0);
    cr_assert_eq(atomic_load(&g_split_copied), 1, "the reassembled packet was not copied");
    /* A whole one, in one receive: lent, not copied. */
    cpt_put_header(pkt, B + 4, 10);
    cpt_xsend(fd, pkt, sizeof pkt);
    cpt_xrecv(fd, back, sizeof back);
    cr_assert_eq(memcmp(pkt, back, sizeof pkt), 0);
    cr_assert_eq(atomic_load(&g_whole_copied), 0, "a packet in one receive was copied");
    cr_assert_eq(atomic_load(&g_split_bad), 0, "a relayed packet's bytes differ");

    /* On the test's thread, outside any callback: a copy. */
    cp_session *s = atomic_load(&g_split_session);
    cr_assert_not_null(s);
    cp_sendbuf *b = cp_sendbuf_from_recv(s, pkt, sizeof pkt);
    cr_assert_not_null(b);
    cr_assert(!cp__sendbuf_is_view(b));
    cr_assert_eq(cp_sendbuf_len(b), sizeof pkt);
    cr_assert_eq(memcmp(cp_sendbuf_data(b), pkt, sizeof pkt), 0);
    cp_sendbuf_unref(b);
    cr_assert_null(cp_sendbuf_from_recv(NULL, pkt, 10));
    cr_assert_null(cp_sendbuf_from_recv(s, NULL, 10));
    cp_session_unref(s);
    cpt_close(fd);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 5000, "the session did not end");
    cpt_env_stop(&e);
}
