/*
 * The listener: binding (port 0, in-use ports, any address, IPv6), keeping
 * accepts pending under bursts, max_sessions, restart on the same port.
 */
#include "helpers.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

Test(listener, port_zero_picks_a_free_port, .timeout = 10)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 4, 0);
    cr_assert_neq(e.sport, 0);
    cpt_env_xneighbour(&e);
    cpt_env_stop(&e);
}

/* A port held by another socket: -EADDRINUSE, and nothing is left behind. */
Test(listener, port_in_use_is_reported, .timeout = 10)
{
    cpt_leak_mark leak;
    int lfd = cpt_xlisten(4);
    cpt_leak_begin(&leak);
    cp_port *p = cpt_xport(1);
    cp_handlers h = cpt_track_handlers();
    cp_service *svc = NULL;
    cp_server_opts o = { .host = CPT_HOST4, .port = cpt_local_port(lfd) };
    int rc = cp_server_start(&svc, p, &o, &h, NULL);
    cr_assert_eq(rc, -EADDRINUSE, "start on a used port: %d (%s)", rc, cp_strerror(rc));
    cpt_xport_destroy(p); /* no service was left registered on the port */
    cpt_leak_end(&leak);
    cpt_close(lfd);
}

/* Two cport servers on one port: the second is refused (no silent sharing). */
Test(listener, second_server_on_same_port_is_refused, .timeout = 10)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 4, 0);
    cp_handlers h = cpt_track_handlers();
    cp_service *svc = NULL;
    cp_server_opts o = { .host = CPT_HOST4, .port = e.sport };
    int rc = cp_server_start(&svc, e.port, &o, &h, e.t);
    cr_assert_eq(rc, -EADDRINUSE, "second server on port %u: %d (%s)", e.sport, rc, cp_strerror(rc));
    cpt_env_xneighbour(&e);
    cpt_env_stop(&e);
}

Test(listener, bad_host_is_refused, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *p = cpt_xport(1);
    cp_handlers h = cpt_track_handlers();
    cp_service *svc = NULL;
    cp_server_opts o = { .host = "300.1.2.3" };
    cr_assert_lt(cp_server_start(&svc, p, &o, &h, NULL), 0);
    o.host = "192.0.2.1"; /* TEST-NET: not an address of this machine */
    cr_assert_lt(cp_server_start(&svc, p, &o, &h, NULL), 0);
    cpt_xport_destroy(p);
    cpt_leak_end(&leak);
}

/* A burst of 500 connects with only 2 accepts kept pending and a small
 * backlog retried by the kernel: every one is accepted and served. */
Test(listener, burst_of_connects_with_few_pending_accepts, .timeout = 60)
{
    enum { N = 500 };
    cpt_raise_nofile(4 * N);
    cp_server_opts o = { .accepts = 2, .backlog = 64 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, N + 4, 0);
    int *fds = malloc(N * sizeof *fds);
    for (int i = 0; i < N; i++) {
        fds[i] = cpt_connect(CPT_HOST4, e.sport, 0);
        cr_assert_geq(fds[i], 0, "connect #%d: %s", i, strerror(-fds[i]));
    }
    CPT_AWAIT(atomic_load(&e.t->connected) == N, 10000, "%d of %d accepted", atomic_load(&e.t->connected), N);
    for (int i = 0; i < N; i += 25) {
        cpt_xsend_packet(fds[i], 3, &i, sizeof i);
        cpt_xrecv_packet_eq(fds[i], 3, &i, sizeof i);
    }
    cpt_xsettle(e.svc, e.t);
    cr_assert_eq(cpt_stats(e.svc).sessions, (uint64_t)N);
    for (int i = 0; i < N; i++)
        cpt_close(fds[i]);
    free(fds);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == N, 10000, "not all disconnected");
    cpt_env_stop(&e);
}

/* max_sessions: connections beyond it are closed at once and counted as
 * rejected; when a session leaves, a new one is accepted again. */
Test(listener, max_sessions_enforced, .timeout = 30)
{
    enum { MAX = 5, EXTRA = 3 };
    cp_server_opts o = { .max_sessions = MAX };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, MAX + EXTRA + 4, 0);
    int fds[MAX];
    for (int i = 0; i < MAX; i++)
        fds[i] = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == MAX, 5000, "first %d not connected", MAX);
    int extra[EXTRA];
    for (int i = 0; i < EXTRA; i++) {
        extra[i] = cpt_xconnect(e.sport);
        cpt_xclosed(extra[i], 3000);
        cpt_close(extra[i]);
    }
    CPT_AWAIT(cpt_stats(e.svc).rejected == EXTRA, 2000, "rejected %llu, expected %d",
              (unsigned long long)cpt_stats(e.svc).rejected, EXTRA);
    cr_assert_eq(atomic_load(&e.t->connected), MAX, "on_connected ran for a rejected connection");
    for (int i = 0; i < MAX; i++) { /* the admitted ones are unaffected */
        cpt_xsend_packet(fds[i], 1, "in", 2);
        cpt_xrecv_packet_eq(fds[i], 1, "in", 2);
    }
    cpt_close(fds[0]);
    CPT_AWAIT(cpt_stats(e.svc).sessions == MAX - 1, 5000, "the closed session did not leave");
    fds[0] = cpt_xconnect(e.sport);
    cpt_xsend_packet(fds[0], 2, "again", 5);
    cpt_xrecv_packet_eq(fds[0], 2, "again", 5);
    cr_assert_eq(cpt_stats(e.svc).rejected, EXTRA);
    for (int i = 0; i < MAX; i++)
        cpt_close(fds[i]);
    cpt_env_stop(&e);
}

/* Stopping a server closes the listening socket: new connects are refused.
 * Starting again on the same port works at once, even with the previous
 * server's connections in TIME_WAIT (the server closed them first). */
Test(listener, stop_then_restart_on_same_port, .timeout = 30)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *p = cpt_xport(2);
    cp_handlers h = cpt_track_handlers();
    uint16_t port = 0;
    for (int round = 0; round < 5; round++) {
        cpt_track *t = cpt_track_new(16);
        t->echo = true;
        cp_server_opts o = { .host = CPT_HOST4, .port = port };
        cp_service *svc = cpt_xserver(p, &o, &h, t);
        if (round == 0)
            port = cp_service_port(svc);
        cr_assert_eq(cp_service_port(svc), port);
        int fds[8];
        for (int i = 0; i < 8; i++) {
            fds[i] = cpt_xconnect(port);
            cpt_xsend_packet(fds[i], 1, "r", 1);
            cpt_xrecv_packet_eq(fds[i], 1, "r", 1);
        }
        cpt_xstop(svc); /* the server closes first: its side goes to TIME_WAIT */
        cpt_track_stopped(t);
        for (int i = 0; i < 8; i++) {
            cpt_xclosed(fds[i], 3000);
            cpt_close(fds[i]);
        }
        int fd = cpt_connect(CPT_HOST4, port, 0);
        cr_assert_eq(fd, -ECONNREFUSED, "connect after stop: %d", fd);
        cpt_track_xcheck(t);
        cpt_track_free(t);
    }
    cpt_xport_destroy(p);
    cpt_leak_end(&leak);
}

/* Several servers on one port object, each with its own sessions. */
Test(listener, several_servers_on_one_port, .timeout = 20)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *p = cpt_xport(2);
    cp_handlers h = cpt_track_handlers();
    cpt_track *t[4];
    cp_service *s[4];
    for (int i = 0; i < 4; i++) {
        t[i] = cpt_track_new(8);
        t[i]->echo = true;
        s[i] = cpt_xserver(p, NULL, &h, t[i]);
    }
    for (int i = 0; i < 4; i++) {
        int fd = cpt_xconnect(cp_service_port(s[i]));
        cpt_xsend_packet(fd, (uint16_t)i, "s", 1);
        cpt_xrecv_packet_eq(fd, (uint16_t)i, "s", 1);
        cpt_close(fd);
    }
    for (int i = 0; i < 4; i++) {
        CPT_AWAIT(atomic_load(&t[i]->disconnected) == 1, 5000, "server %d", i);
        cpt_xstop(s[i]);
        cpt_track_stopped(t[i]);
        cpt_track_xcheck(t[i]);
        cr_assert_eq(atomic_load(&t[i]->connected), 1, "server %d saw another server's session", i);
        cpt_track_free(t[i]);
    }
    cpt_xport_destroy(p);
    cpt_leak_end(&leak);
}

/* A server started from a job on a worker and stopped at once from another
 * thread. The listener's first step travels in the starting worker's outbox
 * until that round ends, while the stop's close goes straight to the
 * listener's inbox: the close may arrive first, and must then be the one that
 * finishes the listener, after its first step (before the fix the close freed
 * it and the first step then used the freed listener: a use-after-free under
 * ASan in every run). The job keeps its round open a moment so that the stop
 * lands in that window. */
typedef struct start_on_worker {
    cp_port *port;
    cp_handlers h;
    _Atomic(cp_service *) svc;
    atomic_int rc;
    atomic_bool job_done;
} start_on_worker;

/* The listener's log lines: in a release build the freed listener's first
 * step usually found its closed descriptor and said so at ERROR. */
static atomic_int listener_errors;

static void count_errors(cp_log_level level, const char *msg, void *ud)
{
    (void)msg, (void)ud;
    if (level >= CP_LOG_WARN)
        atomic_fetch_add(&listener_errors, 1);
}

static void start_server_job(void *arg)
{
    start_on_worker *j = arg;
    cp_service *svc = NULL;
    cp_server_opts o = { .host = CPT_HOST4 };
    atomic_store(&j->rc, cp_server_start(&svc, j->port, &o, &j->h, NULL));
    atomic_store(&j->svc, svc);
    cpt_sleep_ms(2); /* the round, and with it the outbox, stays open */
    atomic_store(&j->job_done, true);
}

Test(listener, stop_right_after_start_on_a_worker, .timeout = 60)
{
    enum { ROUNDS = 60 };
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_set_log(count_errors, NULL);
    for (int round = 0; round < ROUNDS; round++) {
        cp_port *p = cpt_xport(2 + round % 3);
        start_on_worker j = { .port = p, .h = cpt_track_handlers(), .rc = 1 };
        cr_assert_eq(cp_port_post(p, start_server_job, &j), 0);
        CPT_AWAIT(atomic_load(&j.svc) || atomic_load(&j.rc) != 1, 5000, "round %d: the job never ran", round);
        cr_assert_eq(atomic_load(&j.rc), 0, "round %d: cp_server_start on a worker: %d", round, atomic_load(&j.rc));
        uint16_t port = cp_service_port(atomic_load(&j.svc));
        cpt_xstop(atomic_load(&j.svc));
        CPT_AWAIT(atomic_load(&j.job_done), 5000, "round %d: the job never returned", round);
        int fd = cpt_connect(CPT_HOST4, port, 0);
        cr_assert_eq(fd, -ECONNREFUSED, "round %d: connect after stop: %d", round, fd);
        cpt_xport_destroy(p);
        cr_assert_eq(atomic_load(&listener_errors), 0, "round %d: the listener logged a failure", round);
    }
    cp_set_log(NULL, NULL);
    cpt_leak_end(&leak);
}
