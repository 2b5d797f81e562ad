/* SPDX-License-Identifier: MIT */
/*
 * Client services: connecting N sessions, more on demand from any thread,
 * packets both ways, failures, server-side close seen by the client.
 */
#include "helpers.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A client service connects 50 sessions to a cport server; both sides see
 * them; a broadcast from the client is echoed back to each. */
Test(client, connects_n_sessions, .timeout = 30)
{
    enum { N = 50 };
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, N + 8, 0);
    cpt_track *ct = cpt_track_new(N + 8);
    cp_handlers h = cpt_track_handlers();
    cp_client_opts o = { .host = CPT_HOST4, .port = e.sport, .sessions = N };
    cp_service *cli = cpt_xclient(e.port, &o, &h, ct);
    CPT_AWAIT(atomic_load(&ct->connected) == N, 10000, "%d of %d client sessions connected (%d failed)",
              atomic_load(&ct->connected), N, atomic_load(&ct->connect_failed));
    CPT_AWAIT(atomic_load(&e.t->connected) == N, 5000, "server saw %d", atomic_load(&e.t->connected));
    cpt_xsettle(cli, ct);
    cr_assert_eq(cpt_stats(cli).sessions, N);
    cp_sendbuf *b = cp_packet_make(5, "to-server", 9);
    cr_assert_eq(cp_service_broadcast(cli, b), N);
    cp_sendbuf_unref(b);
    CPT_AWAIT(atomic_load(&ct->packets) == N, 5000, "%lld of %d echoes reached the client",
              atomic_load(&ct->packets), N);
    for (int i = 0; i < N; i++)
        cr_assert_eq(atomic_load(&ct->recs[i].packets), 1, "client session %d got %d echoes", i,
                     atomic_load(&ct->recs[i].packets));
    /* A client session's peer is the server. */
    char want[64];
    snprintf(want, sizeof want, "127.0.0.1:%u", e.sport);
    for (int i = 0; i < N; i++) {
        char buf[64];
        cr_assert_gt(cp_session_peer(ct->recs[i].s, buf, sizeof buf), 0);
        cr_assert_str_eq(buf, want);
    }
    cpt_xstop(cli);
    cpt_track_stopped(ct);
    cpt_track_xcheck(ct);
    cr_assert_eq(atomic_load(&ct->reasons[CP_REASON_STOPPING]), N);
    cpt_track_free(ct);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == N, 5000, "server sessions not closed after client stop");
    cr_assert_eq(atomic_load(&e.t->reasons[CP_REASON_PEER_CLOSED]) +
                     atomic_load(&e.t->reasons[CP_REASON_RESET]),
                 N);
    cpt_env_stop(&e);
}

typedef struct connector {
    cp_service *svc;
    int n;
    int errors;
} connector;

static void *connector_main(void *arg)
{
    connector *c = arg;
    for (int i = 0; i < c->n; i++)
        if (cp_client_connect(c->svc) != 0)
            c->errors++;
    return NULL;
}

/* sessions = 0 at start; cp_client_connect from four threads adds 40. */
Test(client, connect_more_from_other_threads, .timeout = 30)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 64, 0);
    cpt_track *ct = cpt_track_new(64);
    cp_handlers h = cpt_track_handlers();
    cp_client_opts o = { .host = CPT_HOST4, .port = e.sport, .sessions = 0 };
    cp_service *cli = cpt_xclient(e.port, &o, &h, ct);
    cpt_sleep_ms(50); /* a sleep: a connect started by sessions = 0 would show in this window */
    cr_assert_eq(atomic_load(&ct->connected), 0);
    connector c[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        c[i] = (connector){ .svc = cli, .n = 10 };
        pthread_create(&th[i], NULL, connector_main, &c[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(c[i].errors, 0);
    }
    CPT_AWAIT(atomic_load(&ct->connected) == 40, 10000, "%d of 40 connected", atomic_load(&ct->connected));
    CPT_AWAIT(atomic_load(&e.t->connected) == 40, 5000, "server saw %d", atomic_load(&e.t->connected));
    cpt_xstop(cli);
    cpt_track_stopped(ct);
    cpt_track_xcheck(ct);
    cpt_track_free(ct);
    cpt_env_stop(&e);
}

/* A client session against a raw server: the client sends in on_connected,
 * the raw server answers, the client's route gets it; then the server closes
 * and the client sees CP_REASON_PEER_CLOSED. */
typedef struct raw_peer_ctx {
    cpt_track t;
    atomic_int got_reply, bad;
} raw_peer_ctx;

static void hello_on_connected(cp_session *s)
{
    cpt_on_connected(s);
    cp_sendbuf *b = cp_packet_make(1000, "hello", 5);
    cp_session_send(s, b);
    cp_sendbuf_unref(b);
}

static int reply_route(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    raw_peer_ctx *c = cp_session_ctx(s);
    cpt_enter(s);
    if (id != 1001 || len != 7 || memcmp(body, "welcome", 7))
        atomic_fetch_add(&c->bad, 1);
    atomic_fetch_add(&c->got_reply, 1);
    cpt_leave(s);
    return 0;
}

Test(client, talks_to_a_raw_server, .timeout = 20)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    int lfd = cpt_xlisten(4);
    cp_port *p = cpt_xport(2);
    raw_peer_ctx *c = calloc(1, sizeof *c);
    c->t.cap = 4;
    c->t.recs = calloc(4, sizeof *c->t.recs);
    cp_route routes[] = { { 1001, reply_route } };
    cp_handlers h = cpt_track_handlers();
    h.on_connected = hello_on_connected;
    cp_client_opts o = { .host = CPT_HOST4,
                         .port = cpt_local_port(lfd),
                         .sessions = 1,
                         .session.routes = routes,
                         .session.nroutes = 1 };
    cp_service *cli = cpt_xclient(p, &o, &h, c);
    int afd = cpt_accept(lfd);
    cr_assert_geq(afd, 0);
    cpt_set_rcvtimeo(afd, 5000);
    cpt_xrecv_packet_eq(afd, 1000, "hello", 5);
    cpt_xsend_packet(afd, 1001, "welcome", 7);
    CPT_AWAIT(atomic_load(&c->got_reply) == 1, 5000, "reply not routed");
    cr_assert_eq(atomic_load(&c->bad), 0);
    cpt_close(afd);
    CPT_AWAIT(atomic_load(&c->t.disconnected) == 1, 5000, "server close not seen");
    cr_assert_eq(atomic_load(&c->t.recs[0].reason), CP_REASON_PEER_CLOSED);
    cpt_xsettle(cli, &c->t);
    cpt_xstop(cli);
    cpt_track_stopped(&c->t);
    cpt_track_xcheck(&c->t);
    free(c->t.recs);
    free(c);
    cpt_close(lfd);
    cpt_xport_destroy(p);
    cpt_leak_end(&leak);
}

/* Refused connects report on_connect_failed with the errno and count; the
 * service stays usable: once a server listens there, connects succeed. */
Test(client, failed_connects_then_success, .timeout = 30)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *p = cpt_xport(2);
    /* reserve a port, close it, aim the client at it */
    int tmp = cpt_socket(AF_INET);
    cr_assert_geq(tmp, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    cpt_setsockopt_int(tmp, SOL_SOCKET, SO_REUSEADDR, 1);
    cr_assert_eq(bind(tmp, (struct sockaddr *)&a, sizeof a), 0);
    uint16_t port = cpt_local_port(tmp);
    cpt_close(tmp);
    cpt_track *ct = cpt_track_new(8);
    cp_handlers h = cpt_track_handlers();
    cp_client_opts o = { .host = CPT_HOST4, .port = port, .sessions = 3 };
    cp_service *cli = cpt_xclient(p, &o, &h, ct);
    CPT_AWAIT(atomic_load(&ct->connect_failed) == 3, 5000, "%d of 3 failures",
              atomic_load(&ct->connect_failed));
    cr_assert_eq(atomic_load(&ct->last_connect_err), -ECONNREFUSED);
    cpt_xsettle(cli, ct);

    cpt_track *st = cpt_track_new(8);
    st->echo = true;
    cp_server_opts so = { .host = CPT_HOST4, .port = port };
    cp_service *srv = cpt_xserver(p, &so, &h, st);
    cr_assert_eq(cp_client_connect(cli), 0);
    CPT_AWAIT(atomic_load(&ct->connected) == 1, 5000, "connect after the server came up failed");
    cr_assert_eq(atomic_load(&ct->connect_failed), 3);
    cpt_xstop(cli);
    cpt_track_stopped(ct);
    cpt_track_xcheck(ct);
    cpt_track_free(ct);
    cpt_xstop(srv);
    cpt_track_stopped(st);
    cpt_track_xcheck(st);
    cpt_track_free(st);
    cpt_xport_destroy(p);
    cpt_leak_end(&leak);
}

/* The server disconnects every client session; each client session gets
 * exactly one on_disconnected (peer closed). */
Test(client, server_side_disconnect_seen_by_clients, .timeout = 30)
{
    enum { N = 20 };
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, N + 4, 0);
    cpt_track *ct = cpt_track_new(N + 4);
    cp_handlers h = cpt_track_handlers();
    cp_client_opts o = { .host = CPT_HOST4, .port = e.sport, .sessions = N };
    cp_service *cli = cpt_xclient(e.port, &o, &h, ct);
    CPT_AWAIT(atomic_load(&e.t->connected) == N, 10000, "server saw %d", atomic_load(&e.t->connected));
    for (int i = 0; i < N; i++)
        cr_assert_eq(cp_service_disconnect_id(e.svc, e.t->recs[i].id), 0);
    CPT_AWAIT(atomic_load(&ct->disconnected) == N, 5000, "%d of %d client sessions saw the close",
              atomic_load(&ct->disconnected), N);
    cr_assert_eq(atomic_load(&ct->reasons[CP_REASON_PEER_CLOSED]), N);
    CPT_AWAIT(atomic_load(&e.t->reasons[CP_REASON_LOCAL]) == N, 2000, "server reasons not local");
    cpt_xsettle(cli, ct);
    cr_assert_eq(cpt_stats(cli).sessions, 0);
    cpt_xstop(cli);
    cpt_track_stopped(ct);
    cpt_track_xcheck(ct);
    cpt_track_free(ct);
    cpt_env_stop(&e);
}

#ifndef _WIN32
#  include <sys/resource.h>
#endif

/* cp_client_start whose first connects cannot even be started (no socket
 * can be made: the descriptor limit leaves room for two of three) reports
 * the error and starts nothing: no service, no callback, no socket left
 * open, no connection reaches the server. With room again it starts. */
Test(client, start_reports_connects_that_cannot_start, .timeout = 20)
{
#ifdef _WIN32
    cr_skip_test("Windows has no descriptor limit to lower");
#else
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *p = cpt_xport(2);
    int lfd = cpt_xlisten(8);
    cpt_track *ct = cpt_track_new(8);
    cp_handlers h = cpt_track_handlers();
    cp_client_opts o = { .host = CPT_HOST4, .port = cpt_local_port(lfd), .sessions = 3 };
    int fds_before = cpt_count_fds();
    int lowest_free = dup(0);
    cr_assert_geq(lowest_free, 0);
    close(lowest_free);
    struct rlimit old, tight;
    cr_assert_eq(getrlimit(RLIMIT_NOFILE, &old), 0);
    tight = old;
    tight.rlim_cur = (rlim_t)lowest_free + 2;
    cr_assert_eq(setrlimit(RLIMIT_NOFILE, &tight), 0);
    cp_service *cli = (cp_service *)&o;
    int rc = cp_client_start(&cli, p, &o, &h, ct);
    setrlimit(RLIMIT_NOFILE, &old);
    cr_assert_eq(rc, -EMFILE, "cp_client_start returned %d (%s)", rc, cp_strerror(rc));
    cr_assert_null(cli);
    cr_assert_eq(cpt_count_fds(), fds_before, "the sockets of the refused start were left open");
    cpt_sleep_ms(50); /* a sleep: a failure reported late for the refused start would show in this window */
    cr_assert_eq(atomic_load(&ct->connect_failed), 0, "a refused start reported a failure later");
    cr_assert_eq(atomic_load(&ct->connected), 0);
    cr_assert_eq(cpt_poll_in(lfd, 50), 0, "a connect of the refused start reached the server");

    cli = cpt_xclient(p, &o, &h, ct);
    int afd[3];
    for (int i = 0; i < 3; i++)
        cr_assert_geq(afd[i] = cpt_accept(lfd), 0);
    CPT_AWAIT(atomic_load(&ct->connected) == 3, 5000, "%d of 3 connected", atomic_load(&ct->connected));
    cpt_xstop(cli);
    cpt_track_stopped(ct);
    cpt_track_xcheck(ct);
    cpt_track_free(ct);
    for (int i = 0; i < 3; i++)
        cpt_close(afd[i]);
    cpt_close(lfd);
    cpt_xport_destroy(p);
    cpt_leak_end(&leak);
#endif
}

/* cp_client_connect reports a socket it cannot make, and fires nothing. */
Test(client, connect_reports_a_socket_it_cannot_make, .timeout = 20)
{
#ifdef _WIN32
    cr_skip_test("Windows has no descriptor limit to lower");
#else
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *p = cpt_xport(2);
    int lfd = cpt_xlisten(8);
    cpt_track *ct = cpt_track_new(8);
    cp_handlers h = cpt_track_handlers();
    cp_client_opts o = { .host = CPT_HOST4, .port = cpt_local_port(lfd), .sessions = 0 };
    cp_service *cli = cpt_xclient(p, &o, &h, ct);
    int lowest_free = dup(0);
    cr_assert_geq(lowest_free, 0);
    close(lowest_free);
    struct rlimit old, tight;
    cr_assert_eq(getrlimit(RLIMIT_NOFILE, &old), 0);
    tight = old;
    tight.rlim_cur = (rlim_t)lowest_free;
    cr_assert_eq(setrlimit(RLIMIT_NOFILE, &tight), 0);
    int rc = cp_client_connect(cli);
    setrlimit(RLIMIT_NOFILE, &old);
    cr_assert_eq(rc, -EMFILE, "cp_client_connect returned %d (%s)", rc, cp_strerror(rc));
    cpt_sleep_ms(50); /* a sleep: a failure reported late for the refused connect would show in this window */
    cr_assert_eq(atomic_load(&ct->connect_failed), 0, "a refused connect reported a failure later");
    cr_assert_eq(cpt_stats(cli).sessions, 0);
    cpt_xstop(cli);
    cpt_track_stopped(ct);
    cpt_track_xcheck(ct);
    cpt_track_free(ct);
    cpt_close(lfd);
    cpt_xport_destroy(p);
    cpt_leak_end(&leak);
#endif
}

/* ------------------------------------------------------------------ per-connect data */

typedef struct tagged_ctx {
    cpt_track t;             /* first: the tracking handlers use it */
    atomic_int seen[16];     /* on_connected / on_connect_error per tag */
    atomic_int untagged;     /* on_connected whose data was no tag */
    atomic_int errors;       /* on_connect_error calls */
    atomic_int failed_calls; /* on_connect_failed calls (must stay 0) */
    atomic_int last_err;
    int tags[16];
} tagged_ctx;

static int tag_index(tagged_ctx *c, void *data)
{
    for (int i = 0; i < 16; i++)
        if (data == &c->tags[i])
            return i;
    return -1;
}

static void tagged_on_connected(cp_session *s)
{
    tagged_ctx *c = cp_session_ctx(s);
    int i = tag_index(c, cp_session_data(s));
    if (i < 0)
        atomic_fetch_add(&c->untagged, 1);
    else
        atomic_fetch_add(&c->seen[i], 1);
    cpt_on_connected(s); /* takes the session's data for its record */
}

static void tagged_on_connect_error(cp_service *svc, void *data, int err)
{
    tagged_ctx *c = cp_service_ctx(svc);
    int i = tag_index(c, data);
    if (i >= 0)
        atomic_fetch_add(&c->seen[i], 1);
    atomic_store(&c->last_err, err);
    atomic_fetch_add(&c->errors, 1);
}

static void tagged_on_connect_failed(cp_service *svc, int err)
{
    (void)err;
    tagged_ctx *c = cp_service_ctx(svc);
    atomic_fetch_add(&c->failed_calls, 1);
}

static tagged_ctx *tagged_new(void)
{
    tagged_ctx *c = calloc(1, sizeof *c);
    c->t.cap = 32;
    c->t.recs = calloc(32, sizeof *c->t.recs);
    return c;
}

static void tagged_free(tagged_ctx *c)
{
    free(c->t.recs);
    free(c);
}

/* Each connect's data is the session's data when on_connected runs: every
 * tag is seen exactly once, and a connect without data has none. */
Test(client, connect_data_reaches_on_connected, .timeout = 20)
{
    enum { N = 16 };
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, N + 4, 0);
    tagged_ctx *c = tagged_new();
    cp_handlers h = cpt_track_handlers();
    h.on_connected = tagged_on_connected;
    cp_client_opts o = { .host = CPT_HOST4, .port = e.sport };
    cp_service *cli = cpt_xclient(e.port, &o, &h, c);
    for (int i = 0; i < N; i++)
        cr_assert_eq(cp_client_connect_data(cli, &c->tags[i]), 0);
    cr_assert_eq(cp_client_connect(cli), 0);
    CPT_AWAIT(atomic_load(&c->t.connected) == N + 1, 5000, "%d of %d connected", atomic_load(&c->t.connected),
              N + 1);
    for (int i = 0; i < N; i++)
        cr_assert_eq(atomic_load(&c->seen[i]), 1, "connect %d was answered %d times", i,
                     atomic_load(&c->seen[i]));
    cr_assert_eq(atomic_load(&c->untagged), 1);
    cr_assert_eq(cp_client_connect_data(e.svc, &c->tags[0]), -EINVAL, "a server took a client connect");
    cr_assert_eq(cp_client_connect_data(NULL, NULL), -EINVAL);
    cpt_xstop(cli);
    cpt_track_stopped(&c->t);
    cpt_track_xcheck(&c->t);
    tagged_free(c);
    cpt_env_stop(&e);
}

/* A failed connect reports its data through on_connect_error, which then
 * replaces on_connect_failed (each failure is reported once). */
Test(client, failed_connect_reports_its_data, .timeout = 20)
{
    enum { N = 8 };
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *p = cpt_xport(2);
    int lfd = cpt_xlisten(4);
    uint16_t port = cpt_local_port(lfd);
    cpt_close(lfd); /* nothing listens there now */
    tagged_ctx *c = tagged_new();
    cp_handlers h = cpt_track_handlers();
    h.on_connect_failed = tagged_on_connect_failed;
    h.on_connect_error = tagged_on_connect_error;
    cp_client_opts o = { .host = CPT_HOST4, .port = port, .sessions = 1 };
    cp_service *cli = cpt_xclient(p, &o, &h, c);
    for (int i = 0; i < N; i++)
        cr_assert_eq(cp_client_connect_data(cli, &c->tags[i]), 0);
    CPT_AWAIT(atomic_load(&c->errors) == N + 1, 5000, "%d of %d failures reported", atomic_load(&c->errors),
              N + 1);
    for (int i = 0; i < N; i++)
        cr_assert_eq(atomic_load(&c->seen[i]), 1, "failed connect %d was reported %d times", i,
                     atomic_load(&c->seen[i]));
    cr_assert_eq(atomic_load(&c->last_err), -ECONNREFUSED);
    cr_assert_eq(atomic_load(&c->failed_calls), 0, "on_connect_failed ran next to on_connect_error");
    cr_assert_eq(cpt_stats(cli).connect_failed, (uint64_t)N + 1);
    cpt_xstop(cli);
    cpt_track_stopped(&c->t);
    cpt_track_xcheck(&c->t);
    tagged_free(c);
    cpt_xport_destroy(p);
    cpt_leak_end(&leak);
}
