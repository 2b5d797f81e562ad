/* SPDX-License-Identifier: MIT */
/*
 * Session lifetime: exactly one on_disconnected under racing disconnects,
 * -ENOTCONN after disconnect, stale ids, disconnect from inside callbacks,
 * kept sessions, accessors.
 */
#include "helpers.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct racer {
    cpt_track *t;
    cp_service *svc;
    int n;
    int by_id; /* 0: cp_session_disconnect on kept refs; 1: cp_service_disconnect_id */
    atomic_int *go;
    int bad_rc;
} racer;

static void *racer_main(void *arg)
{
    racer *r = arg;
    while (!atomic_load(r->go)) {
    }
    for (int i = 0; i < r->n; i++) {
        int idx = r->by_id ? r->n - 1 - i : i;
        cpt_srec *rec = &r->t->recs[idx];
        int rc = r->by_id ? cp_service_disconnect_id(r->svc, rec->id) : cp_session_disconnect(rec->s);
        if (rc != 0 && rc != -ENOTCONN)
            r->bad_rc++;
    }
    return NULL;
}

/* 200 sessions end at once from three directions: the clients close (half
 * of them with a reset), one thread calls cp_session_disconnect, another
 * cp_service_disconnect_id. Each session gets exactly one on_disconnected. */
Test(session_lifetime, racing_disconnects_exactly_once, .timeout = 60)
{
    enum { N = 200, ROUNDS = 3 };
    cpt_raise_nofile(4 * N);
    for (int round = 0; round < ROUNDS; round++) {
        cpt_env e;
        cpt_env_start(&e, 4, NULL, NULL, N, CPT_KEEP_REFS);
        int fds[N];
        for (int i = 0; i < N; i++)
            fds[i] = cpt_xconnect(e.sport);
        CPT_AWAIT(atomic_load(&e.t->connected) == N, 10000, "%d of %d connected",
                  atomic_load(&e.t->connected), N);
        atomic_int go = 0;
        racer r[2] = { { .t = e.t, .svc = e.svc, .n = N, .by_id = 0, .go = &go },
                       { .t = e.t, .svc = e.svc, .n = N, .by_id = 1, .go = &go } };
        pthread_t th[2];
        for (int i = 0; i < 2; i++)
            pthread_create(&th[i], NULL, racer_main, &r[i]);
        atomic_store(&go, 1);
        for (int i = 0; i < N; i++) {
            if (i % 2)
                cpt_close_reset(fds[i]);
            else
                cpt_close(fds[i]);
        }
        for (int i = 0; i < 2; i++)
            pthread_join(th[i], NULL);
        cr_assert_eq(r[0].bad_rc + r[1].bad_rc, 0, "disconnect returned something else than 0 / -ENOTCONN");
        CPT_AWAIT(atomic_load(&e.t->disconnected) == N, 10000, "%d of %d disconnected",
                  atomic_load(&e.t->disconnected), N);
        cpt_xsettle(e.svc, e.t);
        for (int i = 0; i < N; i++) {
            cr_assert_eq(cp_session_disconnect(e.t->recs[i].s), -ENOTCONN);
            cr_assert_eq(cp_session_connected(e.t->recs[i].s), 0);
        }
        cpt_env_stop(&e); /* checks exactly-once for every session */
    }
}

/* After on_disconnected, every call on a kept session fails with -ENOTCONN;
 * the client got at most the data queued before the disconnect, then EOF. */
Test(session_lifetime, send_after_disconnect_is_enotconn, .timeout = 20)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 4, CPT_KEEP_REFS);
    int fd = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    cp_session *s = e.t->recs[0].s;
    cr_assert_eq(cp_session_connected(s), 1);
    cr_assert_eq(cp_session_send_copy(s, "\x05\x00\x01\x00X", 5), 0);
    cr_assert_eq(cp_session_disconnect(s), 0);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 5000, "not disconnected");
    cr_assert_eq(atomic_load(&e.t->recs[0].reason), CP_REASON_LOCAL);
    cp_sendbuf *b = cp_sendbuf_copy("x", 1);
    cr_assert_eq(cp_session_send(s, b), -ENOTCONN);
    cp_sendbuf_unref(b);
    cr_assert_eq(cp_session_send_copy(s, "x", 1), -ENOTCONN);
    cr_assert_eq(cp_session_disconnect(s), -ENOTCONN);
    cr_assert_eq(cp_session_connected(s), 0);
    uint8_t buf[16];
    ssize_t n = cpt_recv_some(fd, buf, sizeof buf);
    cr_assert(n == 0 || n == 5 || n == -ECONNRESET, "client read %zd bytes", n);
    if (n == 5)
        cpt_xclosed(fd, 3000);
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* "-ENOTCONN once the session is disconnecting": right after
 * cp_session_disconnect returned on a user thread, before on_disconnected
 * ran, a send and a second disconnect already fail. */
Test(session_lifetime, disconnecting_session_refuses_at_once, .timeout = 20)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 4, CPT_KEEP_REFS);
    int fd = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    cp_session *s = e.t->recs[0].s;
    cr_assert_eq(cp_session_disconnect(s), 0);
    int send_rc = cp_session_send_copy(s, "late", 4);
    int disc_rc = cp_session_disconnect(s);
    int conn = cp_session_connected(s);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 5000, "not disconnected");
    cr_assert_eq(send_rc, -ENOTCONN, "send right after cp_session_disconnect returned %d", send_rc);
    cr_assert_eq(disc_rc, -ENOTCONN, "a second cp_session_disconnect returned %d", disc_rc);
    cr_assert_eq(conn, 0, "cp_session_connected is 1 while disconnecting");
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* Ids: unique among live sessions; a stale id is refused with -ENOTCONN even
 * after its slot is reused, and the message never reaches the new session. */
Test(session_lifetime, stale_ids_are_refused, .timeout = 30)
{
    enum { N = 100 };
    cp_server_opts o = { .max_sessions = N };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 2 * N + 2, 0);
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == N, 5000, "not connected");
    uint64_t old[N];
    for (int i = 0; i < N; i++) {
        old[i] = e.t->recs[i].id;
        for (int j = 0; j < i; j++)
            cr_assert_neq(old[i], old[j], "sessions %d and %d share id %llu", i, j,
                          (unsigned long long)old[i]);
    }
    for (int i = 0; i < N; i++)
        cpt_close(fds[i]);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == N, 5000, "not disconnected");
    cpt_xsettle(e.svc, e.t);
    /* the same number again: with max_sessions = N every slot is reused */
    for (int i = 0; i < N; i++)
        fds[i] = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 2 * N, 5000, "second wave not connected");
    cp_sendbuf *b = cp_packet_make(13, "wrong player", 12);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(cp_service_send_to(e.svc, old[i], b), -ENOTCONN, "stale id %llu accepted",
                     (unsigned long long)old[i]);
        cr_assert_eq(cp_service_disconnect_id(e.svc, old[i]), -ENOTCONN);
        for (int j = 0; j < N; j++)
            cr_assert_neq(e.t->recs[N + j].id, old[i], "an id was reused");
    }
    cr_assert_eq(cp_service_send_to(e.svc, 0, b), -ENOTCONN);
    cr_assert_eq(cp_service_send_to(e.svc, UINT64_MAX, b), -ENOTCONN);
    cr_assert_eq(cp_service_send_to(e.svc, 0x123456789abcull, b), -ENOTCONN);
    cp_sendbuf_unref(b);
    for (int i = 0; i < N; i++)
        cr_assert_eq(cpt_peek_state(fds[i]), 0, "a stale id reached a new session");
    /* current ids work */
    b = cp_packet_make(14, "right", 5);
    for (int i = 0; i < N; i++)
        cr_assert_eq(cp_service_send_to(e.svc, e.t->recs[N + i].id, b), 0);
    cp_sendbuf_unref(b);
    for (int i = 0; i < N; i++) {
        cpt_xrecv_packet_eq(fds[i], 14, "right", 5);
        cpt_close(fds[i]);
    }
    cpt_env_stop(&e);
}

static atomic_int g_disc_inside; /* on_disconnected ran before the calling callback returned */

static void disconnect_at_once(cp_session *s)
{
    cpt_on_connected(s);
    cpt_track *t = cp_session_ctx(s);
    cpt_enter(s);
    if (cp_session_disconnect(s) != 0)
        atomic_fetch_add(&t->failures, 1);
    if (cp_session_send_copy(s, "x", 1) != -ENOTCONN)
        atomic_fetch_add(&t->failures, 1);
    cpt_srec *r = cpt_rec(s);
    if (r && atomic_load(&r->disconnected) != 0)
        atomic_fetch_add(&g_disc_inside, 1);
    cpt_leave(s);
}

/* cp_session_disconnect inside on_connected: the session still gets exactly
 * one on_disconnected (LOCAL), after on_connected returned. */
Test(session_lifetime, disconnect_inside_on_connected, .timeout = 20)
{
    cp_handlers h = cpt_track_handlers();
    h.on_connected = disconnect_at_once;
    cpt_env e;
    cpt_env_start(&e, 2, NULL, &h, 16, 0);
    int fds[10];
    for (int i = 0; i < 10; i++)
        fds[i] = cpt_xconnect(e.sport);
    for (int i = 0; i < 10; i++) {
        cpt_xclosed(fds[i], 3000);
        cpt_close(fds[i]);
    }
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 10, 5000, "not disconnected");
    cr_assert_eq(atomic_load(&e.t->reasons[CP_REASON_LOCAL]), 10);
    cr_assert_eq(atomic_load(&g_disc_inside), 0,
                 "%d times on_disconnected ran inside on_connected (from cp_session_disconnect), before "
                 "on_connected returned",
                 atomic_load(&g_disc_inside));
    cpt_env_stop(&e);
}

static int disconnect_in_handler(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    (void)id;
    (void)body;
    (void)len;
    cpt_track *t = cp_session_ctx(s);
    cpt_enter(s);
    atomic_fetch_add(&t->packets, 1);
    if (cp_session_disconnect(s) != 0)
        atomic_fetch_add(&t->failures, 1);
    if (cp_session_send_copy(s, "x", 1) != -ENOTCONN)
        atomic_fetch_add(&t->failures, 1);
    if (cp_session_disconnect(s) != -ENOTCONN)
        atomic_fetch_add(&t->failures, 1);
    cpt_srec *r = cpt_rec(s);
    if (r && atomic_load(&r->disconnected) != 0)
        atomic_fetch_add(&g_disc_inside, 1);
    cpt_leave(s);
    return 0;
}

/* cp_session_disconnect inside a packet handler: later packets of the same
 * read are not dispatched; one on_disconnected with CP_REASON_LOCAL. */
Test(session_lifetime, disconnect_inside_packet_handler, .timeout = 20)
{
    cp_handlers h = cpt_track_handlers();
    h.on_packet = disconnect_in_handler;
    cpt_env e;
    cpt_env_start(&e, 2, NULL, &h, 4, 0);
    int fd = cpt_xconnect(e.sport);
    uint8_t buf[40];
    for (int i = 0; i < 10; i++)
        cpt_put_header(buf + 4 * i, 4, 1);
    cpt_xsend(fd, buf, sizeof buf);
    cpt_xclosed(fd, 3000);
    cpt_close(fd);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 5000, "not disconnected");
    cr_assert_eq(atomic_load(&e.t->recs[0].reason), CP_REASON_LOCAL);
    cr_assert_eq(atomic_load(&e.t->packets), 1, "%lld packets dispatched after disconnect",
                 atomic_load(&e.t->packets) - 1);
    cr_assert_eq(atomic_load(&g_disc_inside), 0,
                 "on_disconnected ran inside the packet handler (from cp_session_disconnect), before the "
                 "handler returned");
    cpt_env_stop(&e);
}

/* Accessors: ctx, service, data, id; data survives until on_disconnected. */
typedef struct acc_ctx {
    cpt_track t;
    _Atomic(cp_service *) svc;
    atomic_int bad;
} acc_ctx;

static int marker;

static void acc_connected(cp_session *s)
{
    acc_ctx *c = cp_session_ctx(s);
    if (cp_session_data(s) != NULL)
        atomic_fetch_add(&c->bad, 1); /* starts NULL */
    cpt_on_connected(s);
    if (cp_session_service(s) != atomic_load(&c->svc))
        atomic_fetch_add(&c->bad, 1);
    if (cp_service_ctx(cp_session_service(s)) != c)
        atomic_fetch_add(&c->bad, 1);
    cpt_srec *r = cpt_rec(s);
    if (r)
        r->user = &marker;
}

static void acc_disconnected(cp_session *s, cp_reason reason, int err)
{
    acc_ctx *c = cp_session_ctx(s);
    cpt_srec *r = cpt_rec(s);
    if (!r || r->user != &marker || r->id != cp_session_id(s))
        atomic_fetch_add(&c->bad, 1);
    if (cp_session_connected(s))
        atomic_fetch_add(&c->bad, 1);
    cpt_on_disconnected(s, reason, err);
}

Test(session_lifetime, accessors, .timeout = 20)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *p = cpt_xport(2);
    acc_ctx *c = calloc(1, sizeof *c);
    c->t.cap = 8;
    c->t.recs = calloc(8, sizeof *c->t.recs);
    c->t.echo = true;
    cp_handlers h = cpt_track_handlers();
    h.on_connected = acc_connected;
    h.on_disconnected = acc_disconnected;
    cp_service *svc = cpt_xserver(p, NULL, &h, c);
    atomic_store(&c->svc, svc);
    int fd = cpt_xconnect(cp_service_listen_port(svc));
    cpt_xsend_packet(fd, 1, "a", 1);
    cpt_xrecv_packet_eq(fd, 1, "a", 1);
    cpt_close(fd);
    CPT_AWAIT(atomic_load(&c->t.disconnected) == 1, 5000, "not disconnected");
    cr_assert_eq(atomic_load(&c->bad), 0, "an accessor returned the wrong thing");
    cpt_xstop(svc);
    cpt_track_stopped(&c->t);
    cpt_track_xcheck(&c->t);
    free(c->t.recs);
    free(c);
    cpt_xport_destroy(p);
    cpt_leak_end(&leak);
}

typedef struct hammer {
    cp_session *s;
    atomic_int *stop;
    atomic_long sent;
    int bad;
} hammer;

static void *hammer_main(void *arg)
{
    hammer *h = arg;
    cp_sendbuf *b = cp_packet_make(2, "hammer", 6);
    while (!atomic_load(h->stop)) {
        if (h->sent % 64 == 63)
            cpt_sleep_us(20); /* a sleep: paces the sends */
        int rc = cp_session_send(h->s, b);
        if (rc == 0)
            h->sent++;
        else if (rc != -ENOTCONN)
            h->bad++;
        else
            break;
    }
    /* keep calling a little after the end */
    for (int i = 0; i < 1000; i++)
        if (cp_session_send(h->s, b) != -ENOTCONN)
            h->bad++;
    cp_sendbuf_unref(b);
    return NULL;
}

/* User threads keep sending on kept sessions while their peers disconnect:
 * every call returns 0 or -ENOTCONN, never crashes; after the end, only
 * -ENOTCONN. Queued buffers are released (leak check). */
Test(session_lifetime, sends_from_user_threads_during_disconnect, .timeout = 30)
{
    enum { N = 8 };
    cp_server_opts o = { .session.send_queue_limit = 4u << 20 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, N, CPT_KEEP_REFS | CPT_NO_ECHO);
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == N, 5000, "not connected");
    atomic_int stop = 0;
    hammer hs[N];
    pthread_t th[N];
    for (int i = 0; i < N; i++) {
        hs[i] = (hammer){ .s = e.t->recs[i].s, .stop = &stop };
        pthread_create(&th[i], NULL, hammer_main, &hs[i]);
    }
    for (int i = 0; i < N; i++) /* every thread sends before the peers go */
        CPT_AWAIT(atomic_load(&hs[i].sent) >= 500, 5000, "thread %d sent %ld times", i,
                  atomic_load(&hs[i].sent));
    for (int i = 0; i < N; i++) {
        if (i % 2)
            cpt_close_reset(fds[i]);
        else
            cpt_close(fds[i]);
    }
    CPT_AWAIT(atomic_load(&e.t->disconnected) == N, 10000, "not disconnected");
    atomic_store(&stop, 1);
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(hs[i].bad, 0, "thread %d: a send returned something else than 0 / -ENOTCONN", i);
    }
    cpt_env_stop(&e);
}

/* cp_session_service on kept sessions, from user threads, while the service
 * stops: each answer is the service or NULL, a session that answered NULL
 * never answers the service again, and after cp_service_stop returns every
 * session answers NULL. The session's finish clears the pointer on its
 * worker while these threads read it; before the fix that was a plain store
 * against a plain load, a data race ThreadSanitizer reported in every run
 * (tsan_stress.c runs the same under TSan). */
typedef struct svc_watch {
    cpt_env *e;
    int n;
    atomic_int *stop;
    atomic_long calls;
    int bad;
} svc_watch;

static void *svc_watch_main(void *arg)
{
    svc_watch *w = arg;
    bool gone[64] = { false };
    while (!atomic_load(w->stop)) {
        for (int i = 0; i < w->n; i++) {
            cp_service *got = cp_session_service(w->e->t->recs[i].s);
            w->calls++;
            if (got == NULL)
                gone[i] = true;
            else if (got != w->e->svc || gone[i])
                w->bad++;
        }
    }
    return NULL;
}

Test(session_lifetime, kept_session_service_read_while_its_service_stops, .timeout = 60)
{
    enum { N = 16, THREADS = 3, ROUNDS = 10 };
    for (int round = 0; round < ROUNDS; round++) {
        cpt_env e;
        cpt_env_start(&e, 2 + round % 3, NULL, NULL, N, CPT_KEEP_REFS);
        int fds[N];
        for (int i = 0; i < N; i++)
            fds[i] = cpt_xconnect(e.sport);
        CPT_AWAIT(atomic_load(&e.t->connected) == N, 5000, "round %d: not connected", round);
        atomic_int stop = 0;
        svc_watch ws[THREADS];
        pthread_t th[THREADS];
        for (int i = 0; i < THREADS; i++) {
            ws[i] = (svc_watch){ .e = &e, .n = N, .stop = &stop };
            pthread_create(&th[i], NULL, svc_watch_main, &ws[i]);
        }
        for (int i = 0; i < THREADS; i++) /* they read before the stop, */
            CPT_AWAIT(atomic_load(&ws[i].calls) >= 4 * N, 5000, "round %d: thread %d is not reading", round,
                      i);
        cp_service *svc = e.svc;
        cpt_xstop(svc);
        long at_stop[THREADS];
        for (int i = 0; i < THREADS; i++)
            at_stop[i] = atomic_load(&ws[i].calls);
        for (int i = 0; i < THREADS; i++) /* and every session again after it */
            CPT_AWAIT(atomic_load(&ws[i].calls) >= at_stop[i] + 2 * N, 5000,
                      "round %d: thread %d stopped reading", round, i);
        atomic_store(&stop, 1);
        for (int i = 0; i < THREADS; i++) {
            pthread_join(th[i], NULL);
            cr_assert_eq(ws[i].bad, 0,
                         "round %d, thread %d: %d answers of %ld were neither the service nor NULL, "
                         "or the service again after NULL",
                         round, i, ws[i].bad, ws[i].calls);
        }
        for (int i = 0; i < N; i++)
            cr_assert_null(cp_session_service(e.t->recs[i].s),
                           "round %d: session %d still names its stopped "
                           "service",
                           round, i);
        for (int i = 0; i < N; i++)
            cpt_close(fds[i]);
        /* cpt_env_stop without the stop, which was the test's */
        cpt_track_stopped(e.t);
        cpt_track_xcheck(e.t);
        cpt_track_free(e.t);
        cpt_xport_destroy(e.port);
        cpt_leak_end(&e.leak);
    }
}
