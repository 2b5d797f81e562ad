/* SPDX-License-Identifier: MIT */
/*
 * The send queue: order under concurrent senders, gather writes over many
 * small buffers, the byte limit, on_sent pacing, one buffer on many sessions.
 */
#include "helpers.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct sender {
    cp_service *svc;
    uint64_t id;
    uint16_t tid;
    int n;
    int bad;
} sender;

static void *sender_main(void *arg)
{
    sender *s = arg;
    uint8_t body[600];
    unsigned rnd = s->tid + 1u;
    for (int i = 0; i < s->n; i++) {
        rnd = rnd * 1103515245u + 12345u;
        size_t len = 4 + (rnd >> 8) % 500;
        uint32_t seq = (uint32_t)i;
        memcpy(body, &seq, 4);
        cpt_fill(body + 4, len - 4, 0, (uint32_t)(s->tid * 100000 + i));
        cp_sendbuf *b = cp_packet_make(s->tid, body, len);
        if (!b || cp_service_send_to(s->svc, s->id, b) != 0)
            s->bad++;
        cp_sendbuf_unref(b);
    }
    return NULL;
}

/* Four user threads send 5000 packets each to one session: every packet
 * arrives intact, and each thread's packets in the order it sent them. */
Test(send_queue, concurrent_senders_keep_their_order, .timeout = 60)
{
    enum { T = 4, N = 5000 };
    cp_server_opts o = { .session.send_queue_limit = 64u << 20 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 4, CPT_NO_ECHO);
    int fd = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    sender s[T];
    pthread_t th[T];
    for (int i = 0; i < T; i++) {
        s[i] = (sender){ .svc = e.svc, .id = e.t->recs[0].id, .tid = (uint16_t)i, .n = N };
        pthread_create(&th[i], NULL, sender_main, &s[i]);
    }
    uint32_t next[T] = { 0 };
    uint8_t body[600];
    int bad = 0;
    for (int k = 0; k < T * N; k++) {
        uint16_t id;
        size_t len;
        int rc = cpt_recv_packet(fd, &id, body, sizeof body, &len);
        cr_assert_eq(rc, 0, "packet %d: %d", k, rc);
        cr_assert_lt(id, T);
        uint32_t seq;
        memcpy(&seq, body, 4);
        if (seq != next[id] || cpt_check_pattern(body + 4, len - 4, 0, (uint32_t)(id * 100000 + seq)) != -1)
            bad++;
        next[id] = seq + 1;
    }
    for (int i = 0; i < T; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(s[i].bad, 0);
    }
    cr_assert_eq(bad, 0, "%d packets out of order or damaged", bad);
    cpt_close(fd);
    cpt_env_stop(&e);
}

static void burst_on_connected(cp_session *s)
{
    cpt_on_connected(s);
    cpt_track *t = cp_session_ctx(s);
    cpt_enter(s);
    /* 5000 tiny buffers queued in one callback: more than IOV_MAX per write */
    for (uint32_t i = 0; i < 5000; i++) {
        uint8_t p[8];
        cpt_put_header(p, 8, 1);
        memcpy(p + 4, &i, 4);
        if (cp_session_send_copy(s, p, sizeof p) != 0)
            atomic_fetch_add(&t->failures, 1);
    }
    cpt_leave(s);
}

Test(send_queue, thousands_of_small_buffers_in_one_round, .timeout = 30)
{
    cp_handlers h = cpt_track_handlers();
    h.on_connected = burst_on_connected;
    cpt_env e;
    cpt_env_start(&e, 2, NULL, &h, 4, CPT_NO_ECHO);
    int fd = cpt_xconnect(e.sport);
    uint8_t *all = malloc(5000 * 8);
    cpt_xrecv(fd, all, 5000 * 8);
    for (uint32_t i = 0; i < 5000; i++) {
        uint32_t seq;
        memcpy(&seq, all + 8 * i + 4, 4);
        cr_assert_eq(seq, i, "packet %u carries %u", i, seq);
    }
    free(all);
    CPT_AWAIT(atomic_load(&e.t->bytes_sent) == 5000 * 8, 2000, "on_sent reported %lld bytes",
              atomic_load(&e.t->bytes_sent));
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* One buffer bigger than the whole limit: the session is disconnected with
 * CP_REASON_SEND_OVERFLOW (and the buffer is released: leak check). */
Test(send_queue, buffer_larger_than_limit_overflows, .timeout = 20)
{
    cp_server_opts o = { .session.send_queue_limit = 64u << 10 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 4, CPT_KEEP_REFS);
    int fd = cpt_connect(CPT_HOST4, e.sport, 4096);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    uint8_t *big = calloc(1, 8u << 20);
    cp_sendbuf *b = cp_sendbuf_copy(big, 8u << 20);
    free(big);
    cp_session_send(e.t->recs[0].s, b); /* 0 or an error: either way the session must go */
    cp_sendbuf_unref(b);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 5000, "not disconnected");
    cr_assert_eq(atomic_load(&e.t->recs[0].reason), CP_REASON_SEND_OVERFLOW, "reason %s",
                 cp_reason_str((cp_reason)atomic_load(&e.t->recs[0].reason)));
    cpt_xclosed(fd, 10000);
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* A producer paced by on_sent (keeps at most 512 KiB queued) sends 32 MiB
 * through a 1 MiB limit: never overflows, every byte arrives in order. */
enum { PACE_TOTAL = 32u << 20, PACE_CHUNK = 64u << 10, PACE_WINDOW = 512u << 10 };

static void pace_fill(cp_session *s)
{
    cpt_srec *r = cpt_rec(s);
    cpt_track *t = cp_session_ctx(s);
    long long queued = atomic_load(&r->expect_seq);
    while (queued < PACE_TOTAL && queued - atomic_load(&r->sent) < PACE_WINDOW) {
        cp_sendbuf *b = cp_sendbuf_open(PACE_CHUNK);
        if (!b) {
            atomic_fetch_add(&t->failures, 1);
            return;
        }
        cpt_fill(cp_sendbuf_data(b), PACE_CHUNK, (uint64_t)queued, 21);
        cp_sendbuf_close(b, PACE_CHUNK);
        int rc = cp_session_send(s, b);
        cp_sendbuf_unref(b);
        if (rc != 0) {
            atomic_fetch_add(&t->failures, 1);
            return;
        }
        queued += PACE_CHUNK;
        atomic_store(&r->expect_seq, queued);
    }
}

static void pace_connected(cp_session *s)
{
    cpt_on_connected(s);
    cpt_enter(s);
    pace_fill(s);
    cpt_leave(s);
}

static void pace_sent(cp_session *s, size_t bytes)
{
    cpt_on_sent(s, bytes);
    cpt_enter(s);
    pace_fill(s);
    cpt_leave(s);
}

Test(send_queue, on_sent_pacing_never_overflows, .timeout = 60)
{
    cp_handlers h = cpt_track_handlers();
    h.on_connected = pace_connected;
    h.on_sent = pace_sent;
    cp_server_opts o = { .session.send_queue_limit = 1u << 20 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, &h, 4, CPT_NO_ECHO);
    int fd = cpt_xconnect(e.sport);
    uint8_t *buf = malloc(1u << 20);
    size_t got = 0;
    long long bad = -1;
    while (got < PACE_TOTAL) {
        size_t want = PACE_TOTAL - got < (1u << 20) ? PACE_TOTAL - got : (1u << 20);
        ssize_t n = cpt_recv_some(fd, buf, want);
        if (n <= 0) {
            CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 2000,
                      "stream ended after %zu bytes (%s), no on_disconnected", got,
                      n == 0 ? "EOF" : strerror((int)-n));
            cr_assert_gt(n, 0,
                         "stream ended after %zu bytes (%s): session ended with %s, err %d; %d sends failed",
                         got, n == 0 ? "EOF" : strerror((int)-n),
                         cp_reason_str((cp_reason)atomic_load(&e.t->recs[0].reason)),
                         atomic_load(&e.t->recs[0].err), atomic_load(&e.t->failures));
        }
        long long b = cpt_check_pattern(buf, (size_t)n, got, 21);
        if (b >= 0 && bad < 0)
            bad = (long long)got + b;
        got += (size_t)n;
    }
    free(buf);
    cr_assert_eq(bad, -1, "byte %lld differs", bad);
    cr_assert_eq(atomic_load(&e.t->reasons[CP_REASON_SEND_OVERFLOW]), 0);
    cr_assert_eq(cpt_peek_state(fd), 0, "the session was closed");
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* One buffer queued on 100 sessions, unreferenced by the caller at once:
 * every session sends it whole. */
Test(send_queue, one_buffer_many_sessions, .timeout = 30)
{
    enum { N = 100 };
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, N, CPT_KEEP_REFS | CPT_NO_ECHO);
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == N, 5000, "not connected");
    uint8_t body[3000];
    cpt_fill(body, sizeof body, 0, 8);
    cp_sendbuf *b = cp_packet_make(77, body, sizeof body);
    for (int i = 0; i < N; i++)
        cr_assert_eq(cp_session_send(e.t->recs[i].s, b), 0);
    cp_sendbuf_unref(b);
    for (int i = 0; i < N; i++) {
        cpt_xrecv_packet_eq(fds[i], 77, body, sizeof body);
        cpt_close(fds[i]);
    }
    cpt_env_stop(&e);
}

/* Data queued on a session whose peer vanished is released when the session
 * ends (leak check), and on_disconnected still runs once. */
Test(send_queue, queued_data_released_on_disconnect, .timeout = 30)
{
    cp_server_opts o = { .session.send_queue_limit = 32u << 20 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 4, CPT_KEEP_REFS | CPT_NO_ECHO);
    int fd = cpt_connect(CPT_HOST4, e.sport, 4096);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    cp_session *s = e.t->recs[0].s;
    for (int i = 0; i < 64; i++) {
        cp_sendbuf *b = cp_sendbuf_open(128u << 10);
        memset(cp_sendbuf_data(b), i, 128u << 10);
        cp_sendbuf_close(b, 128u << 10);
        cr_assert_eq(cp_session_send(s, b), 0);
        cp_sendbuf_unref(b);
    }
    cpt_close_reset(fd);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 5000, "not disconnected");
    int why = atomic_load(&e.t->recs[0].reason);
    cr_assert(why == CP_REASON_RESET || why == CP_REASON_PEER_CLOSED || why == CP_REASON_IO_ERROR,
              "reason %s", cp_reason_str((cp_reason)atomic_load(&e.t->recs[0].reason)));
    cpt_env_stop(&e);
}
