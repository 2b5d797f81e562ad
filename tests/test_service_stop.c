/* SPDX-License-Identifier: MIT */
/*
 * Stopping services: idle, with sessions, with busy and slow sessions, with
 * connects in flight, with callbacks running, with user threads still
 * sending; repeated start/stop cycles.
 */
#include "helpers.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

Test(service_stop, idle_server_stops_at_once, .timeout = 10)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 4, 0);
    uint64_t t0 = cpt_now_ms();
    cpt_xstop(e.svc);
    cr_assert_lt(cpt_now_ms() - t0, 1000);
    cpt_track_stopped(e.t);
    cpt_track_xcheck(e.t);
    cpt_track_free(e.t);
    cpt_xport_destroy(e.port);
    cpt_leak_end(&e.leak);
}

/* 100 connected sessions: each gets on_disconnected(STOPPING) exactly once,
 * each client sees the close. */
Test(service_stop, sessions_get_stopping_reason, .timeout = 30)
{
    enum { N = 100 };
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, N, 0);
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == N, 5000, "not connected");
    uint64_t t0 = cpt_now_ms();
    cpt_xstop(e.svc);
    cr_assert_lt(cpt_now_ms() - t0, 2000, "stop took %llu ms", (unsigned long long)(cpt_now_ms() - t0));
    cpt_track_stopped(e.t);
    cr_assert_eq(atomic_load(&e.t->disconnected), N, "stop returned before every on_disconnected ran");
    cr_assert_eq(atomic_load(&e.t->reasons[CP_REASON_STOPPING]), N);
    for (int i = 0; i < N; i++) {
        cpt_xclosed(fds[i], 3000);
        cpt_close(fds[i]);
    }
    cpt_track_xcheck(e.t);
    cpt_track_free(e.t);
    cpt_xport_destroy(e.port);
    cpt_leak_end(&e.leak);
}

/* A session with 8 MiB queued towards a client that never reads does not
 * hold up the stop. */
Test(service_stop, unread_queued_data_does_not_delay_stop, .timeout = 30)
{
    cp_server_opts o = { .session.send_queue_limit = 64u << 20 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 4, CPT_KEEP_REFS | CPT_NO_ECHO);
    int fd = cpt_connect(CPT_HOST4, e.sport, 4096);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    uint8_t *big = calloc(1, 8u << 20);
    cp_sendbuf *b = cp_sendbuf_copy(big, 8u << 20);
    free(big);
    cr_assert_eq(cp_session_send(e.t->recs[0].s, b), 0);
    cp_sendbuf_unref(b);
    cpt_xwrites_stalled(e.svc); /* the client's socket is full; the rest stays queued */
    uint64_t t0 = cpt_now_ms();
    cpt_xstop(e.svc);
    uint64_t took = cpt_now_ms() - t0;
    cpt_track_stopped(e.t);
    cr_assert_lt(took, 2000, "stop waited %llu ms for a client that never reads", (unsigned long long)took);
    cpt_xclosed(fd, 10000);
    cpt_close(fd);
    cpt_track_xcheck(e.t);
    cpt_track_free(e.t);
    cpt_xport_destroy(e.port);
    cpt_leak_end(&e.leak);
}

/* A client service stopped right after start, while 200 connects are in
 * flight: stop returns, every on_connected that ran is matched, nothing runs
 * afterwards; then the server is stopped too. */
Test(service_stop, client_with_connects_in_flight, .timeout = 30)
{
    enum { N = 200, ROUNDS = 5 };
    cpt_raise_nofile(4 * N + 100);
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, N * ROUNDS, 0);
    for (int round = 0; round < ROUNDS; round++) {
        cpt_track *ct = cpt_track_new(N);
        cp_handlers h = cpt_track_handlers();
        cp_client_opts o = { .host = CPT_HOST4, .port = e.sport, .sessions = N };
        cp_service *cli = cpt_xclient(e.port, &o, &h, ct);
        cpt_sleep_us((unsigned)round * 2000); /* a sleep: each round stops later in the connects */
        cpt_xstop(cli);
        cpt_track_stopped(ct);
        cpt_track_xcheck(ct);
        cpt_track_free(ct);
    }
    CPT_AWAIT(cpt_stats(e.svc).sessions == 0, 10000, "server sessions left: %llu",
              (unsigned long long)cpt_stats(e.svc).sessions);
    cpt_env_stop(&e);
}

/* stop while a callback is running: it waits for the callback to finish
 * and no callback starts afterwards. */
typedef struct slow_cb {
    cpt_track t;
    atomic_int entered, finished;
} slow_cb;

static int slow_handler(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    (void)id;
    (void)body;
    (void)len;
    slow_cb *c = cp_session_ctx(s);
    cpt_enter(s);
    atomic_fetch_add(&c->entered, 1);
    cpt_sleep_ms(300); /* a sleep: the stop, called meanwhile, must wait this callback out */
    atomic_fetch_add(&c->finished, 1);
    cpt_leave(s);
    return 0;
}

Test(service_stop, waits_for_running_callbacks, .timeout = 20)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *p = cpt_xport(2);
    slow_cb *c = calloc(1, sizeof *c);
    c->t.cap = 4;
    c->t.recs = calloc(4, sizeof *c->t.recs);
    cp_handlers h = cpt_track_handlers();
    h.on_packet = slow_handler;
    cp_service *svc = cpt_xserver(p, NULL, &h, c);
    int fd = cpt_xconnect(cp_service_listen_port(svc));
    cpt_xsend_packet(fd, 1, NULL, 0);
    CPT_AWAIT(atomic_load(&c->entered) == 1, 5000, "handler not entered");
    cpt_xstop(svc);
    cr_assert_eq(atomic_load(&c->finished), 1, "cp_service_stop returned while a callback was running");
    cpt_track_stopped(&c->t);
    cpt_track_xcheck(&c->t);
    cpt_close(fd);
    free(c->t.recs);
    free(c);
    cpt_xport_destroy(p);
    cpt_leak_end(&leak);
}

typedef struct stop_from_worker {
    cp_service *svc;
    atomic_int rc, done;
} stop_from_worker;

static void stop_self(void *arg)
{
    stop_from_worker *s = arg;
    atomic_store(&s->rc, cp_service_stop(s->svc));
    atomic_store(&s->done, 1);
}

static void stop_in_callback(cp_session *s)
{
    cpt_on_connected(s);
    cpt_track *t = cp_session_ctx(s);
    if (cp_service_stop(cp_session_service(s)) != -EDEADLK)
        atomic_fetch_add(&t->failures, 1);
}

/* From a worker (posted function or callback), stop is refused with
 * -EDEADLK and the service keeps working. */
Test(service_stop, stop_from_worker_is_refused, .timeout = 20)
{
    cp_handlers h = cpt_track_handlers();
    h.on_connected = stop_in_callback;
    cpt_env e;
    cpt_env_start(&e, 2, NULL, &h, 8, 0);
    stop_from_worker s = { .svc = e.svc };
    cr_assert_eq(cp_port_post(e.port, stop_self, &s), 0);
    CPT_AWAIT(atomic_load(&s.done), 5000, "posted function did not run");
    cr_assert_eq(atomic_load(&s.rc), -EDEADLK);
    cpt_env_xneighbour(&e);
    cpt_env_stop(&e);
}

typedef struct sender {
    cp_session *s;
    atomic_int *stopped;
    atomic_int sends;
    int after_stop_ok;
    int bad;
} sender;

static void *keep_sending_main(void *arg)
{
    sender *sd = arg;
    cp_sendbuf *b = cp_packet_make(1, "s", 1);
    int after = 0;
    for (long i = 0; after < 2000; i++) {
        int was_stopped = atomic_load(sd->stopped);
        int rc = cp_session_send(sd->s, b);
        atomic_fetch_add(&sd->sends, 1);
        if (rc != 0 && rc != -ENOTCONN)
            sd->bad++;
        if (was_stopped) {
            after++;
            if (rc == 0)
                sd->after_stop_ok++;
        }
        if (i % 64 == 0)
            cpt_sleep_us(20); /* a sleep: paces the sends */
    }
    cp_sendbuf_unref(b);
    return NULL;
}

/* User threads send on kept sessions before, during and after the stop:
 * 0 or -ENOTCONN only, and only -ENOTCONN once stop returned. */
Test(service_stop, user_threads_sending_through_stop, .timeout = 30)
{
    enum { N = 6 };
    cp_server_opts o = { .session.send_queue_limit = 8u << 20 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, N, CPT_KEEP_REFS | CPT_NO_ECHO);
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == N, 5000, "not connected");
    atomic_int stopped = 0;
    sender sd[N];
    pthread_t th[N];
    for (int i = 0; i < N; i++) {
        sd[i] = (sender){ .s = e.t->recs[i].s, .stopped = &stopped };
        pthread_create(&th[i], NULL, keep_sending_main, &sd[i]);
    }
    for (int i = 0; i < N; i++) /* every thread sends before the stop */
        CPT_AWAIT(atomic_load(&sd[i].sends) >= 1000, 5000, "thread %d sent %d times", i,
                  atomic_load(&sd[i].sends));
    cpt_xstop(e.svc);
    atomic_store(&stopped, 1);
    cpt_track_stopped(e.t);
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(sd[i].bad, 0, "thread %d got errors other than -ENOTCONN", i);
        cr_assert_eq(sd[i].after_stop_ok, 0, "thread %d: %d sends accepted after stop returned", i,
                     sd[i].after_stop_ok);
    }
    for (int i = 0; i < N; i++)
        cpt_close(fds[i]);
    cpt_track_xcheck(e.t);
    cpt_track_free(e.t);
    cpt_xport_destroy(e.port);
    cpt_leak_end(&e.leak);
}

/* 20 start/connect/stop cycles on one port: no descriptor or memory left. */
Test(service_stop, start_stop_cycles_leak_nothing, .timeout = 60)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *p = cpt_xport(2);
    cp_handlers h = cpt_track_handlers();
    size_t heap0 = 0;
    for (int cycle = 0; cycle < 24; cycle++) {
        if (cycle == 4)
            heap0 = cpt_heap_in_use();
        cpt_track *t = cpt_track_new(16);
        t->echo = true;
        cp_service *svc = cpt_xserver(p, NULL, &h, t);
        int fds[10];
        for (int i = 0; i < 10; i++) {
            fds[i] = cpt_xconnect(cp_service_listen_port(svc));
            cpt_xsend_packet(fds[i], 1, "c", 1);
        }
        for (int i = 0; i < 10; i++)
            cpt_xrecv_packet_eq(fds[i], 1, "c", 1);
        cpt_xstop(svc);
        cpt_track_stopped(t);
        for (int i = 0; i < 10; i++)
            cpt_close(fds[i]);
        cpt_track_xcheck(t);
        cpt_track_free(t);
    }
    size_t heap1 = cpt_heap_in_use();
    cpt_xport_destroy(p);
    if (heap0 && heap1 > heap0)
        cr_assert_lt(heap1 - heap0, 256u << 10, "heap grew %zu bytes over 20 start/stop cycles",
                     heap1 - heap0);
    cpt_leak_end(&leak);
}

/* Two services on one port stopped in turn; the other keeps serving. */
Test(service_stop, stopping_one_service_leaves_the_other, .timeout = 20)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 8, 0);
    cpt_track *t2 = cpt_track_new(8);
    t2->echo = true;
    cp_handlers h = cpt_track_handlers();
    cp_service *s2 = cpt_xserver(e.port, NULL, &h, t2);
    int a = cpt_xconnect(e.sport);
    int b = cpt_xconnect(cp_service_listen_port(s2));
    cpt_xsend_packet(a, 1, "a", 1);
    cpt_xrecv_packet_eq(a, 1, "a", 1);
    cpt_xstop(s2);
    cpt_track_stopped(t2);
    cpt_xclosed(b, 3000);
    cpt_xsend_packet(a, 2, "b", 1);
    cpt_xrecv_packet_eq(a, 2, "b", 1);
    cpt_close(a);
    cpt_close(b);
    cpt_track_xcheck(t2);
    cpt_track_free(t2);
    cpt_env_stop(&e);
}

/* cp_service_stop_ex reports the final counters, taken after every session
 * finished: they include the disconnects the stop itself made (with their
 * reason) and the traffic before it. */
Test(service_stop, stop_ex_reports_final_stats_with_the_stops_own_disconnects, .timeout = 30)
{
    enum { N = 20 };
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, N + 4, 0);
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == N, 5000, "not connected");
    /* One packet each way on the first session: traffic is counted. */
    cpt_xsend_packet(fds[0], 7, "ping", 4);
    cpt_xrecv_packet_eq(fds[0], 7, "ping", 4);
    /* And one session that ended before the stop, by the peer. */
    cpt_close(fds[N - 1]);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 5000, "the closed client was not seen");

    cp_service_stats final;
    cpt_env_xneighbour(&e); /* one more session, which its client closes too */
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 2, 5000, "the neighbour's close was not seen");
    cr_assert_eq(cp_service_stop_ex(e.svc, 0, &final), 0);
    cpt_track_stopped(e.t);
    cr_assert_eq(atomic_load(&e.t->reasons[CP_REASON_STOPPING]), N - 1);
    cr_assert_eq(final.sessions, 0);
    cr_assert_eq(final.connected, (uint64_t)N + 1);
    cr_assert_eq(final.disconnected, (uint64_t)N + 1, "final.disconnected %llu",
                 (unsigned long long) final.disconnected);
    cr_assert_eq(final.by_reason[CP_REASON_STOPPING], (uint64_t)N - 1, "final.by_reason[STOPPING] %llu",
                 (unsigned long long) final.by_reason[CP_REASON_STOPPING]);
    cr_assert_eq(final.by_reason[CP_REASON_PEER_CLOSED] + final.by_reason[CP_REASON_RESET], 2);
    cr_assert_eq(final.packets_in, 2);
    cr_assert_eq(final.bytes_in, 4 + 4 + 4 + sizeof "neighbour");
    cr_assert_eq(final.bytes_out, final.bytes_in);
    for (int i = 0; i < N - 1; i++) {
        cpt_xclosed(fds[i], 3000);
        cpt_close(fds[i]);
    }
    cpt_track_xcheck(e.t);
    cpt_track_free(e.t);
    cpt_xport_destroy(e.port);
    cpt_leak_end(&e.leak);
}

/* final may be NULL; cp_service_stop is stop_ex with 0 and NULL. */
Test(service_stop, stop_ex_without_stats, .timeout = 10)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 4, 0);
    cr_assert_eq(cp_service_stop_ex(NULL, 0, NULL), -EINVAL);
    cr_assert_eq(cp_service_stop_ex(e.svc, 0, NULL), 0);
    cpt_track_stopped(e.t);
    cpt_track_xcheck(e.t);
    cpt_track_free(e.t);
    cpt_xport_destroy(e.port);
    cpt_leak_end(&e.leak);
}

/* The graceful stop: every client gets the packet queued for it right before
 * the stop, then the end of the stream, and its FIN ends the session with
 * CP_REASON_STOPPING and no error; a client that reads nothing is cut at the
 * deadline (-ETIMEDOUT); the stop returns about then, and nobody is accepted
 * meanwhile. */
typedef struct drain_client {
    int fd;
    int got; /* 1: the packet, then EOF */
    pthread_t th;
} drain_client;

static void *drain_read(void *arg)
{
    drain_client *c = arg;
    uint16_t id;
    char body[16];
    size_t len;
    if (cpt_recv_packet(c->fd, &id, body, sizeof body, &len) == 0 && id == 5 && len == 3 &&
        memcmp(body, "bye", 3) == 0 && cpt_recv_once(c->fd, body, sizeof body) == 0)
        c->got = 1;
    cpt_close(c->fd); /* the FIN that ends the session */
    return NULL;
}

Test(service_stop, graceful_stop_writes_what_was_queued_then_closes, .timeout = 30)
{
    enum { N = 16 };
    cpt_env e;
    cp_server_opts o = { 0 };
    o.session.send_queue_limit = 16u << 20;
    cpt_env_start(&e, 2, &o, NULL, N + 4, CPT_KEEP_REFS | CPT_NO_ECHO);
    drain_client c[N];
    for (int i = 0; i < N; i++)
        c[i] = (drain_client){ .fd = cpt_xconnect(e.sport) };
    int mute = cpt_connect(CPT_HOST4, e.sport, 4096); /* reads nothing */
    cr_assert_geq(mute, 0);
    CPT_AWAIT(atomic_load(&e.t->connected) == N + 1, 5000, "not connected");
    cp_sendbuf *bye = cp_packet_make(5, "bye", 3);
    static uint8_t big[60000];
    cp_sendbuf *lots = cp_packet_make(6, big, sizeof big);
    for (int i = 0; i < N + 1; i++) {
        cpt_srec *r = &e.t->recs[i];
        if (atomic_load(&r->peer_port) == cpt_local_port(mute)) {
            for (int k = 0; k < 100; k++)
                cr_assert_eq(cp_session_send(r->s, lots), 0);
        } else {
            cr_assert_eq(cp_session_send(r->s, bye), 0);
        }
    }
    cp_sendbuf_unref(bye);
    cp_sendbuf_unref(lots);
    for (int i = 0; i < N; i++)
        cr_assert_eq(pthread_create(&c[i].th, NULL, drain_read, &c[i]), 0);
    cp_service_stats final;
    uint64_t t0 = cpt_now_ms();
    cr_assert_eq(cp_service_stop_ex(e.svc, 1000, &final), 0);
    uint64_t took = cpt_now_ms() - t0;
    cpt_track_stopped(e.t);
    for (int i = 0; i < N; i++) {
        pthread_join(c[i].th, NULL);
        cr_expect_eq(c[i].got, 1, "client %d: the queued packet, then EOF", i);
    }
    cr_assert(took >= 900 && took < 3000, "the stop took %llu ms with a 1000 ms drain",
              (unsigned long long)took);
    cr_assert_eq(final.by_reason[CP_REASON_STOPPING], (uint64_t)N + 1);
    int timed_out = 0, clean = 0;
    for (int i = 0; i < N + 1; i++) {
        int err = atomic_load(&e.t->recs[i].err);
        timed_out += err == -ETIMEDOUT;
        clean += err == 0;
    }
    cr_assert_eq(timed_out, 1, "only the client that reads nothing hit the deadline");
    cr_assert_eq(clean, N, "the others ended on their FIN");
    cpt_close(mute);
    cpt_track_xcheck(e.t);
    cpt_track_free(e.t);
    cpt_xport_destroy(e.port);
    cpt_leak_end(&e.leak);
}
