/* SPDX-License-Identifier: MIT */
/*
 * Regression tests for the 13 flaws cport must not have: those of the widely
 * copied C++ Windows IOCP server core (IocpCore, Service, Session,
 * PacketSession, SendBuffer) whose model cport keeps. In that core:
 *   1. a failed connect was treated as success (a "connected" zombie);
 *   2. an I/O error other than a reset left the session half-alive, and a
 *      failed disconnect call skipped OnDisconnected;
 *   3. a completion's error code was lost, and a null event dequeued from a
 *      closed port was dereferenced;
 *   4. accept failures were retried recursively (stack overflow, a busy loop
 *      on EMFILE);
 *   5. a short send silently lost the rest of its bytes;
 *   6. the send queue was unbounded: a slow client grew memory for ever;
 *   7. headers were not checked: size < 4 looped for ever, ids indexed past
 *      the handler table, any packet over 6000 bytes crashed;
 *   8. every session held 640 KiB of receive buffer, idle or not;
 *   9. broadcast held a lock across every recipient's send system call;
 *  10. a service could not be stopped, drained and freed;
 *  11. reference cycles (listener <-> service, player <-> session) leaked
 *      whole sessions;
 *  12. TCP_NODELAY was set at the wrong level (no effect), and only IPv4
 *      worked;
 *  13. one session's receive and send hooks could run at once on two threads.
 * One or more tests per flaw, named fNN_<what must hold>; the comment above
 * each says what cport must do instead.
 */
#include "helpers.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifndef _WIN32
#  include <fcntl.h>
#  include <sys/resource.h>
#  include <sys/time.h>
#endif

/* A loopback port that nothing listens on: bound once, then closed. */
static uint16_t closed_port(void)
{
    int fd = cpt_socket(AF_INET);
    cr_assert_geq(fd, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    uint16_t p = cpt_local_port(fd);
    cpt_close(fd);
    return p;
}

static bool have_ipv6_loopback(void)
{
    int fd = cpt_socket(AF_INET6);
    if (fd < 0)
        return false;
    struct sockaddr_in6 a = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT };
    bool ok = bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
    cpt_close(fd);
    return ok;
}

/* ------------------------------------------------------------------ 1 */

/* Flaw 1: a failed connect was treated as success. Connecting to a port where
 * nothing listens must report on_connect_failed(-ECONNREFUSED) and never
 * on_connected. */
Test(flaws, f01_failed_connect_is_not_connected, .timeout = 20)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *port = cpt_xport(2);
    cpt_track *t = cpt_track_new(16);
    cp_handlers h = cpt_track_handlers();
    cp_client_opts o = { .host = CPT_HOST4, .port = closed_port(), .sessions = 5 };
    cp_service *cli = cpt_xclient(port, &o, &h, t);

    CPT_AWAIT(atomic_load(&t->connect_failed) == 5, 5000, "on_connect_failed ran %d times, expected 5",
              atomic_load(&t->connect_failed));
    int rc = cp_client_connect(cli);
    if (rc == 0)
        CPT_AWAIT(atomic_load(&t->connect_failed) == 6, 5000, "the 6th connect did not fail");
    else
        cr_assert_lt(rc, 0);
    /* A sleep: a late on_connected or second report of a refused connect
     * would come in this window; nothing marks its absence. */
    cpt_sleep_ms(100);
    int expected = rc == 0 ? 6 : 5;

    cpt_xsettle(cli, t);
    cp_service_stats st = cpt_stats(cli);
    cr_assert_eq(atomic_load(&t->connected), 0, "on_connected ran for a refused connect");
    cr_assert_eq(atomic_load(&t->connect_failed), expected);
    cr_assert_eq(atomic_load(&t->last_connect_err), -ECONNREFUSED, "err is %d, expected -ECONNREFUSED",
                 atomic_load(&t->last_connect_err));
    cr_assert_eq(st.connected, 0);
    cr_assert_eq(st.sessions, 0, "%llu zombie sessions", (unsigned long long)st.sessions);
    cr_assert_eq(st.connect_failed, (uint64_t)expected);
    cp_sendbuf *b = cp_packet_make(1, "z", 1);
    cr_assert_eq(cp_service_broadcast(cli, b), 0, "broadcast reached a zombie session");
    cp_sendbuf_unref(b);

    cpt_xstop(cli);
    cpt_track_stopped(t);
    cpt_track_xcheck(t);
    cpt_track_free(t);
    cpt_xport_destroy(port);
    cpt_leak_end(&leak);
}

/* ------------------------------------------------------------------ 2 */

/* Flaw 2: an I/O error other than reset left the session half-alive. Here the
 * server's socket is swapped (dup2) for a pipe end, so the server's next write
 * fails with EBADF/ENOTSOCK: the session must be disconnected exactly once with
 * CP_REASON_IO_ERROR and the errno, leave the session table, and answer every
 * later call with -ENOTCONN.
 * POSIX only: Windows cannot put another object under a socket's handle
 * (no dup2), so there is no such trick there. */
Test(flaws, f02_send_error_fully_disconnects, .timeout = 20)
{
#ifdef _WIN32
    cr_skip_test("POSIX only: needs dup2() over the library's socket");
#else
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 8, CPT_KEEP_REFS);
    int fd = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    cpt_srec *r = &e.t->recs[0];
    int sfd = cpt_xfind_peer_fd(fd);

    int p[2];
    cr_assert_eq(pipe(p), 0);
    cr_assert_eq(dup2(p[0], sfd), sfd);
    cpt_close(p[0]);

    cp_sendbuf *b = cp_packet_make(9, "xyz", 3);
    cr_assert_not_null(b);
    int rc = cp_service_send_to(e.svc, r->id, b);
    cp_sendbuf_unref(b);
    cr_assert(rc == 0 || rc == -ENOTCONN, "send_to: %d", rc);

    bool gone = false;
    CPT_WAIT(gone, atomic_load(&e.t->disconnected) == 1, 3000);
    if (!gone) {
        /* The library did not use the fd number (e.g. registered files): the
         * write went to the real socket. Then this trick proves nothing. */
        uint8_t buf[7];
        if (cpt_recv_exact(fd, buf, sizeof buf) == 0) {
            cpt_close(p[1]);
            cpt_close(fd);
            cpt_env_stop(&e);
            cr_skip_test("the library does not write through the fd number; trick not applicable");
        }
    }
    cr_assert(gone, "the session was not disconnected after a send error");
    cr_assert_eq(atomic_load(&r->reason), CP_REASON_IO_ERROR, "reason %s, expected io error",
                 cp_reason_str((cp_reason)atomic_load(&r->reason)));
    int err = atomic_load(&r->err);
    cr_assert(err < 0 && err != -ECONNRESET, "err %d should carry the errno (EBADF/ENOTSOCK)", err);
    cpt_xsettle(e.svc, e.t);
    cp_service_stats st = cpt_stats(e.svc);
    cr_assert_eq(st.sessions, 0, "the session is still in the table");
    cr_assert_eq(st.by_reason[CP_REASON_IO_ERROR], 1);
    cr_assert_eq(cp_session_connected(r->s), 0);
    cr_assert_eq(cp_session_send_copy(r->s, "a", 1), -ENOTCONN);
    cr_assert_eq(cp_session_disconnect(r->s), -ENOTCONN);
    b = cp_sendbuf_copy("a", 1);
    cr_assert_eq(cp_service_send_to(e.svc, r->id, b), -ENOTCONN);
    cp_sendbuf_unref(b);
    cr_assert_eq(cp_service_disconnect_id(e.svc, r->id), -ENOTCONN);

    cpt_close(p[1]);
    cpt_close(fd);
    cpt_env_xneighbour(&e);
    cpt_env_stop(&e);
#endif
}

/* Flaw 2, with a real network error: the server's socket gets a 300 ms
 * TCP_USER_TIMEOUT while the peer never reads (zero window), so the kernel
 * aborts the connection with ETIMEDOUT.
 * Linux only: Windows has no TCP_USER_TIMEOUT (TCP_MAXRT bounds
 * retransmissions, not the probes of a zero window). */
Test(flaws, f02_timeout_error_fully_disconnects, .timeout = 30)
{
#ifdef _WIN32
    cr_skip_test("Linux only: needs TCP_USER_TIMEOUT");
#else
    cp_server_opts o = { .session.send_queue_limit = 64u << 20 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 8, CPT_KEEP_REFS);
    int fd = cpt_connect(CPT_HOST4, e.sport, 4096);
    cr_assert_geq(fd, 0);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    cpt_srec *r = &e.t->recs[0];
    int sfd = cpt_xfind_peer_fd(fd);
    unsigned ut = 300;
    cr_assert_eq(setsockopt(sfd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ut, sizeof ut), 0);

    size_t sz = 256u << 10;
    uint8_t *data = malloc(sz);
    cr_assert_not_null(data);
    memset(data, 'z', sz);
    cp_sendbuf *b = cp_sendbuf_copy(data, sz);
    free(data);
    cr_assert_not_null(b);
    for (int i = 0; i < 32; i++) {
        int rc = cp_session_send(r->s, b);
        if (rc == -ENOTCONN)
            break;
        cr_assert_eq(rc, 0, "send: %d", rc);
    }
    cp_sendbuf_unref(b);

    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 15000, "the timed-out session was never disconnected");
    cr_assert_eq(atomic_load(&r->reason), CP_REASON_IO_ERROR, "reason %s (err %d), expected io error",
                 cp_reason_str((cp_reason)atomic_load(&r->reason)), atomic_load(&r->err));
    cr_assert_eq(atomic_load(&r->err), -ETIMEDOUT, "err %d, expected -ETIMEDOUT", atomic_load(&r->err));
    cpt_xsettle(e.svc, e.t);
    cp_service_stats st = cpt_stats(e.svc);
    cr_assert_eq(st.sessions, 0);
    cr_assert_eq(cp_session_send_copy(r->s, "a", 1), -ENOTCONN);
    cr_assert_eq(cp_service_disconnect_id(e.svc, r->id), -ENOTCONN);
    cpt_close(fd);
    cpt_env_xneighbour(&e);
    cpt_env_stop(&e);
#endif
}

/* ------------------------------------------------------------------ 3 */

/* Flaw 3: error codes were lost. A reset from the peer is reported as
 * CP_REASON_RESET, an orderly close as CP_REASON_PEER_CLOSED, and every
 * reason has a name. Under Wine a client cannot reset a connection (its
 * closesocket() sends a FIN first): there the test checks all but the reset
 * and then says skipped. */
Test(flaws, f03_reasons_reach_the_user, .timeout = 20)
{
    bool can_reset = !cpt_under_wine();
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 8, 0);
    int a = cpt_xconnect(e.sport);
    int b = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 2, 5000, "not connected");
    cpt_srec *ra = cpt_track_by_peer(e.t, cpt_local_port(a));
    cpt_srec *rb = cpt_track_by_peer(e.t, cpt_local_port(b));
    cr_assert(ra && rb, "cp_session_peer() did not name the clients' ports");
    cpt_close_reset(a);
    cpt_close(b);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 2, 5000, "not disconnected");
    if (can_reset)
        cr_assert_eq(atomic_load(&ra->reason), CP_REASON_RESET, "reset reported as %s",
                     cp_reason_str((cp_reason)atomic_load(&ra->reason)));
    cr_assert_eq(atomic_load(&rb->reason), CP_REASON_PEER_CLOSED, "close reported as %s",
                 cp_reason_str((cp_reason)atomic_load(&rb->reason)));
    cpt_xsettle(e.svc, e.t);
    cp_service_stats st = cpt_stats(e.svc);
    if (can_reset) {
        cr_assert_eq(st.by_reason[CP_REASON_RESET], 1);
        cr_assert_eq(st.by_reason[CP_REASON_PEER_CLOSED], 1);
    }
    cr_assert_eq(st.disconnected, 2);
    for (int i = CP_REASON_NONE; i < CP_REASON_COUNT_; i++) {
        const char *s = cp_reason_str((cp_reason)i);
        cr_assert(s && *s, "reason %d has no name", i);
        for (int j = CP_REASON_NONE; j < i; j++)
            cr_assert_str_neq(s, cp_reason_str((cp_reason)j), "reasons %d and %d share a name", i, j);
    }
    cr_assert_not_null(cp_reason_str(CP_REASON_COUNT_), "an out-of-range reason must still name something");
    int codes[] = { -ENOTCONN, -EBUSY, -EDEADLK, -ESHUTDOWN, -ECONNREFUSED, -ETIMEDOUT, -EINVAL };
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        const char *s = cp_strerror(codes[i]);
        cr_assert(s && *s, "cp_strerror(%d) is empty", codes[i]);
    }
    cr_assert_str_neq(cp_strerror(-ENOTCONN), cp_strerror(-EBUSY));
    cpt_env_stop(&e);
    if (!can_reset)
        cr_skip_test("the reset half not checked: Wine cannot reset a connection (all else held)");
}

typedef struct worker_call {
    cp_port *port;
    cp_service *svc;
    atomic_int port_rc, svc_rc, done;
} worker_call;

static void call_from_worker(void *arg)
{
    worker_call *w = arg;
    atomic_store(&w->port_rc, cp_port_destroy(w->port));
    atomic_store(&w->svc_rc, cp_service_stop(w->svc));
    atomic_store(&w->done, 1);
}

typedef struct repost {
    cp_port *port;
    atomic_int runs, bad_rc, shutdown_seen;
} repost;

static void repost_fn(void *arg)
{
    repost *r = arg;
    atomic_fetch_add(&r->runs, 1);
    int rc = cp_port_post(r->port, repost_fn, r);
    if (rc == -ESHUTDOWN)
        atomic_store(&r->shutdown_seen, 1);
    else if (rc != 0)
        atomic_fetch_add(&r->bad_rc, 1);
}

/* Flaw 3, second half: operations on things that are gone or going fail with
 * a clean error, never a crash: destroy with a live service (-EBUSY), destroy
 * and stop from a worker (-EDEADLK), post while the port is being destroyed
 * (-ESHUTDOWN), calls on a kept session after its service stopped
 * (-ENOTCONN). */
Test(flaws, f03_calls_on_gone_objects_fail_cleanly, .timeout = 30)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 8, CPT_KEEP_REFS);
    int fd = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");

    cr_assert_eq(cp_port_destroy(e.port), -EBUSY, "destroying a port with a live service");
    worker_call w = { .port = e.port, .svc = e.svc };
    cr_assert_eq(cp_port_post(e.port, call_from_worker, &w), 0);
    CPT_AWAIT(atomic_load(&w.done), 5000, "posted function did not run");
    cr_assert_eq(atomic_load(&w.port_rc), -EDEADLK, "cp_port_destroy from a worker: %d",
                 atomic_load(&w.port_rc));
    cr_assert_eq(atomic_load(&w.svc_rc), -EDEADLK, "cp_service_stop from a worker: %d",
                 atomic_load(&w.svc_rc));
    /* Still fully working. */
    cpt_xsend_packet(fd, 5, "ok", 2);
    cpt_xrecv_packet_eq(fd, 5, "ok", 2);

    cp_session *s = e.t->recs[0].s;
    uint64_t id = e.t->recs[0].id;
    cpt_xstop(e.svc);
    cpt_track_stopped(e.t);
    cpt_xclosed(fd, 5000);
    cpt_close(fd);
    /* The kept session outlives its service and answers -ENOTCONN. */
    cr_assert_eq(cp_session_connected(s), 0);
    cr_assert_eq(cp_session_send_copy(s, "x", 1), -ENOTCONN);
    cp_sendbuf *b = cp_sendbuf_copy("x", 1);
    cr_assert_eq(cp_session_send(s, b), -ENOTCONN);
    cp_sendbuf_unref(b);
    cr_assert_eq(cp_session_disconnect(s), -ENOTCONN);
    cr_assert_eq(cp_session_id(s), id);
    cp_group *g;
    cr_assert_eq(cp_group_create(&g), 0);
    cr_assert_eq(cp_group_add(g, s), -ENOTCONN);
    cr_assert_eq(cp_group_size(g), 0);
    cp_group_destroy(g);
    cpt_track_xcheck(e.t);
    cpt_track_free(e.t);

    repost rp = { .port = e.port };
    cr_assert_eq(cp_port_post(e.port, repost_fn, &rp), 0);
    CPT_AWAIT(atomic_load(&rp.runs) > 100, 5000, "reposting function is not running");
    cpt_xport_destroy(e.port);
    int runs = atomic_load(&rp.runs);
    cpt_sleep_ms(50); /* a sleep: work run after the destroy returned would show in this window */
    cr_assert_eq(atomic_load(&rp.runs), runs, "posted work ran after cp_port_destroy returned");
    cr_assert_eq(atomic_load(&rp.bad_rc), 0, "cp_port_post during destroy returned neither 0 nor -ESHUTDOWN");
    cpt_leak_end(&e.leak);
}

/* ------------------------------------------------------------------ 4 */

/* Flaw 4: accept failures were retried recursively / in a busy loop. The
 * test process runs with a soft RLIMIT_NOFILE of 1024 (set before the port
 * exists, so every backend sees it), fills its descriptor table with dummy
 * descriptors but a few, and lets 40 clients connect: the server must neither
 * crash nor spin (process CPU over one second stays small), must count the
 * accept errors, and must accept again once the dummies are closed.
 * POSIX only: Windows has no descriptor limit to lower (sockets are handles,
 * bounded by memory), so accept errors cannot be provoked this way there. */
Test(flaws, f04_emfile_no_spin_and_recovers, .timeout = 60)
{
#ifdef _WIN32
    cr_skip_test("POSIX only: needs RLIMIT_NOFILE");
#else
    enum { M = 40, SPARE = 6, LIMIT = 1024 };
    struct rlimit old, low;
    cr_assert_eq(getrlimit(RLIMIT_NOFILE, &old), 0);
    low = old;
    low.rlim_cur = LIMIT;
    cr_assert_eq(setrlimit(RLIMIT_NOFILE, &low), 0);
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, M + 16, 0);
    int fds[M];
    for (int i = 0; i < M; i++) {
        fds[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        cr_assert_geq(fds[i], 0);
        struct timeval tv = { .tv_sec = 5 };
        setsockopt(fds[i], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fds[i], SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    }
    static int dummy[LIMIT];
    int ndummy = 0;
    while (ndummy < LIMIT) {
        int d = fcntl(fds[0], F_DUPFD_CLOEXEC, 0);
        if (d < 0)
            break;
        dummy[ndummy++] = d;
    }
    cr_assert_eq(errno, EMFILE, "filling the descriptor table: %s", strerror(errno));
    for (int i = 0; i < SPARE && ndummy > 0; i++)
        cpt_close(dummy[--ndummy]);

    struct sockaddr_in a = { .sin_family = AF_INET,
                             .sin_port = htons(e.sport),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    int connect_fail = 0;
    for (int i = 0; i < M; i++)
        if (connect(fds[i], (struct sockaddr *)&a, sizeof a) != 0 && errno != EINTR)
            connect_fail++;

    bool errors_seen = false;
    CPT_WAIT(errors_seen, cpt_stats(e.svc).accept_errors >= 1, 3000);
    cpt_sleep_ms(
        300); /* a sleep: the first reaction to EMFILE passes; the window measures the steady state */
    uint64_t cpu0 = cpt_process_cpu_ns();
    uint64_t t0 = cpt_now_ns();
    cpt_sleep_ms(1000); /* a sleep: the window whose CPU time is measured */
    uint64_t cpu_ms = (cpt_process_cpu_ns() - cpu0) / 1000000u;
    uint64_t wall_ms = (cpt_now_ns() - t0) / 1000000u;
    cp_service_stats st = cpt_stats(e.svc);
    /* Free the descriptors before asserting, so a failure can be reported. */
    for (int i = 0; i < ndummy; i++)
        cpt_close(dummy[i]);

    cr_assert_eq(connect_fail, 0, "%d raw connects failed", connect_fail);
    cr_assert(errors_seen,
              "no accept error counted although the process is out of descriptors "
              "(connected %llu)",
              (unsigned long long)st.connected);
    cr_assert_lt(st.connected, (uint64_t)M, "all connections accepted: the limit was not reached");
    cr_log_info("exhausted: %llu ms CPU over %llu ms wall, %llu accept errors", (unsigned long long)cpu_ms,
                (unsigned long long)wall_ms, (unsigned long long)st.accept_errors);
    cr_assert_lt(cpu_ms, 200, "the server used %llu ms of CPU in %llu ms while out of descriptors (spinning)",
                 (unsigned long long)cpu_ms, (unsigned long long)wall_ms);

    /* Descriptors are free again: a new client is served within seconds. */
    int fresh = cpt_connect(CPT_HOST4, e.sport, 0);
    cr_assert_geq(fresh, 0);
    cpt_set_rcvtimeo(fresh, 10000);
    cpt_xsend_packet(fresh, 1, "again", 5);
    cpt_xrecv_packet_eq(fresh, 1, "again", 5);
    cpt_close(fresh);
    /* Every waiting client is now either served or closed, none left hanging. */
    for (int i = 0; i < M; i++) {
        int rc = cpt_send_packet(fds[i], 2, "old", 3);
        if (rc == 0) {
            uint8_t body[8];
            uint16_t id;
            size_t len;
            cpt_set_rcvtimeo(fds[i], 10000);
            rc = cpt_recv_packet(fds[i], &id, body, sizeof body, &len);
            cr_assert(rc == 0 || rc == 1 || rc == -ECONNRESET, "client %d neither served nor closed: %d", i,
                      rc);
            if (rc == 0)
                cr_assert(id == 2 && len == 3 && !memcmp(body, "old", 3));
        }
        cpt_close(fds[i]);
    }
    cpt_env_stop(&e);
    setrlimit(RLIMIT_NOFILE, &old);
#endif
}

/* ------------------------------------------------------------------ 5 */

typedef struct slow_reader {
    int fd;
    size_t total;
    uint32_t seed;
    long long bad_at;
    int rc;
    size_t got;
} slow_reader;

static void *slow_reader_main(void *arg)
{
    slow_reader *sr = arg;
    sr->bad_at = -1;
    cpt_sleep_ms(300); /* a sleep: not reading yet lets the server's writes go short */
    size_t cap = 16384;
    uint8_t *buf = malloc(cap);
    unsigned rnd = 12345;
    while (sr->got < sr->total) {
        rnd = rnd * 1103515245u + 12345u;
        size_t want = 1 + (rnd >> 8) % cap;
        if (want > sr->total - sr->got)
            want = sr->total - sr->got;
        ssize_t n = cpt_recv_some(sr->fd, buf, want);
        if (n <= 0) {
            sr->rc = n == 0 ? 1 : (int)n;
            break;
        }
        long long bad = cpt_check_pattern(buf, (size_t)n, sr->got, sr->seed);
        if (bad >= 0 && sr->bad_at < 0)
            sr->bad_at = (long long)sr->got + bad;
        sr->got += (size_t)n;
        if ((sr->got / 4096) % 64 == 0)
            cpt_sleep_us(200); /* a sleep: the reader is slow on purpose */
    }
    free(buf);
    return NULL;
}

/* Flaw 5: short sends lost bytes. The server queues 8 MiB in buffers of random
 * sizes (1 B .. 256 KiB, and one of 2 MiB) towards a client with a tiny
 * receive buffer that reads slowly: every byte must arrive, in order. */
Test(flaws, f05_short_sends_deliver_every_byte_in_order, .timeout = 60)
{
    cp_server_opts o = { .session.send_queue_limit = 64u << 20 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 4, CPT_KEEP_REFS | CPT_NO_ECHO);
    int fd = cpt_connect(CPT_HOST4, e.sport, 4096);
    cr_assert_geq(fd, 0);
    cpt_set_rcvtimeo(fd, 10000);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    uint64_t id = e.t->recs[0].id;

    const size_t total = 8u << 20;
    const uint32_t seed = 5;
    slow_reader sr = { .fd = fd, .total = total, .seed = seed };
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, slow_reader_main, &sr), 0);
    uint8_t *src = malloc(total);
    cr_assert_not_null(src);
    cpt_fill(src, total, 0, seed);
    size_t off = 0;
    unsigned rnd = 99;
    int nbufs = 0;
    while (off < total) {
        rnd = rnd * 1103515245u + 12345u;
        size_t n = nbufs == 10 ? (2u << 20) : 1 + (rnd >> 4) % (256u << 10);
        if (n > total - off)
            n = total - off;
        cp_sendbuf *b = cp_sendbuf_copy(src + off, n);
        cr_assert_not_null(b);
        int rc = cp_service_send_to(e.svc, id, b);
        cp_sendbuf_unref(b);
        cr_assert_eq(rc, 0, "send_to at offset %zu: %d", off, rc);
        off += n;
        nbufs++;
    }
    free(src);
    pthread_join(th, NULL);
    cr_assert_eq(sr.got, total, "received %zu of %zu bytes (rc %d)", sr.got, total, sr.rc);
    cr_assert_eq(sr.bad_at, -1, "byte %lld differs (lost or reordered data)", sr.bad_at);
    CPT_AWAIT(cpt_stats(e.svc).bytes_out == total, 5000, "stats.bytes_out %llu != %zu",
              (unsigned long long)cpt_stats(e.svc).bytes_out, total);
    CPT_AWAIT(atomic_load(&e.t->bytes_sent) == (long long)total, 5000, "on_sent reported %lld of %zu bytes",
              atomic_load(&e.t->bytes_sent), total);
    cr_assert_eq(cpt_peek_state(fd), 0, "extra bytes or a close after the data");
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ 6 */

/* Flaw 6: unbounded send queue. A client that never reads must be disconnected
 * with CP_REASON_SEND_OVERFLOW once its queue would pass send_queue_limit,
 * while a neighbour is still served. */
Test(flaws, f06_never_reading_client_dropped_with_overflow, .timeout = 60)
{
    cp_server_opts o = { .session.send_queue_limit = 256u << 10 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 8, CPT_KEEP_REFS);
    int fd = cpt_connect(CPT_HOST4, e.sport, 4096);
    cr_assert_geq(fd, 0);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    cpt_srec *r = &e.t->recs[0];

    uint8_t *chunk = calloc(1, 64u << 10);
    cp_sendbuf *b = cp_sendbuf_copy(chunk, 64u << 10);
    free(chunk);
    cr_assert_not_null(b);
    size_t queued = 0;
    int rc = 0;
    uint64_t deadline = cpt_now_ms() + 20000;
    while (queued < (256u << 20) && cpt_now_ms() < deadline) {
        rc = cp_service_send_to(e.svc, r->id, b);
        if (rc != 0)
            break;
        queued += 64u << 10;
        if (queued % (4u << 20) == 0)
            cpt_sleep_ms(5); /* a sleep: paces the sends, so the worker writes some of them */
    }
    cr_assert_neq(rc, 0, "after %zu MiB queued the session is still accepting sends", queued >> 20);
    CPT_AWAIT(atomic_load(&r->disconnected) == 1, 5000, "not disconnected");
    cr_assert_eq(cp_service_send_to(e.svc, r->id, b), -ENOTCONN);
    cp_sendbuf_unref(b);
    cr_assert_eq(atomic_load(&r->reason), CP_REASON_SEND_OVERFLOW, "reason %s, expected send overflow",
                 cp_reason_str((cp_reason)atomic_load(&r->reason)));
    cpt_xsettle(e.svc, e.t);
    cr_assert_eq(cpt_stats(e.svc).by_reason[CP_REASON_SEND_OVERFLOW], 1);
    cr_assert_eq(cp_session_send_copy(r->s, "x", 1), -ENOTCONN);
    cpt_env_xneighbour(&e);
    cpt_xclosed(fd, 10000);
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ 7 */

/* Sends raw bytes on one connection while a neighbour is connected; expects
 * the bad one closed with `reason` and the neighbour still served. */
static void bad_input_case(const uint8_t *bytes, size_t n, uint32_t max_packet, cp_reason reason)
{
    cp_server_opts o = { .session.max_packet = max_packet };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 8, 0);
    int nb = cpt_xconnect(e.sport);
    int bad = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 2, 5000, "not connected");
    cpt_xsend_packet(nb, 1, "before", 6);
    cpt_xrecv_packet_eq(nb, 1, "before", 6);
    cpt_srec *rb = cpt_track_by_peer(e.t, cpt_local_port(bad));
    cr_assert_not_null(rb);

    cpt_xsend(bad, bytes, n);
    cpt_xclosed(bad, 3000);
    CPT_AWAIT(atomic_load(&rb->disconnected) == 1, 3000, "bad session not disconnected");
    cr_assert_eq(atomic_load(&rb->reason), (int)reason, "reason %s, expected %s",
                 cp_reason_str((cp_reason)atomic_load(&rb->reason)), cp_reason_str(reason));
    cr_assert_eq(atomic_load(&rb->packets), 0, "a malformed packet reached a handler");
    cpt_xsettle(e.svc, e.t);
    cp_service_stats st = cpt_stats(e.svc);
    cr_assert_eq(st.by_reason[reason], 1);
    cr_assert_eq(st.sessions, 1, "the neighbour was affected");
    cpt_xsend_packet(nb, 2, "after", 5);
    cpt_xrecv_packet_eq(nb, 2, "after", 5);
    cpt_env_xneighbour(&e);
    cpt_close(bad);
    cpt_close(nb);
    cpt_env_stop(&e);
}

/* Flaw 7: a size-0 header made the original loop forever. */
Test(flaws, f07_header_size_0_closes_only_that_session, .timeout = 20)
{
    uint8_t p[8];
    cpt_put_header(p, 0, 1);
    cpt_put_header(p + 4, 8, 1);
    bad_input_case(p, sizeof p, 0, CP_REASON_BAD_HEADER);
}

Test(flaws, f07_header_size_3_closes_only_that_session, .timeout = 20)
{
    uint8_t p[8];
    cpt_put_header(p, 3, 1);
    cpt_put_header(p + 4, 4, 1);
    bad_input_case(p, sizeof p, 0, CP_REASON_BAD_HEADER);
}

/* size > max_packet (default 4096): rejected before the body arrives. */
Test(flaws, f07_header_over_max_packet_closes_only_that_session, .timeout = 20)
{
    uint8_t p[4];
    cpt_put_header(p, 4097, 1);
    bad_input_case(p, sizeof p, 0, CP_REASON_TOO_BIG);
}

Test(flaws, f07_header_65535_over_small_max_closes_only_that_session, .timeout = 20)
{
    uint8_t p[4];
    cpt_put_header(p, 65535, 65535);
    bad_input_case(p, sizeof p, 100, CP_REASON_TOO_BIG);
}

typedef struct route_ctx {
    cpt_track *t;
    atomic_int r1, r2, unknown, bad;
    atomic_int last_unknown_id;
} route_ctx;

static route_ctx *g_route;

static int route1(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    (void)body;
    cpt_enter(s);
    if (id != 1 || len != 1)
        atomic_fetch_add(&g_route->bad, 1);
    atomic_fetch_add(&g_route->r1, 1);
    cp_session_send_copy(s, "\x05\x00\x01\x00R", 5);
    cpt_leave(s);
    return 0;
}

static int route2(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    (void)body;
    (void)len;
    cpt_enter(s);
    if (id != 2)
        atomic_fetch_add(&g_route->bad, 1);
    atomic_fetch_add(&g_route->r2, 1);
    cpt_leave(s);
    return 0;
}

static int unknown_fn(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    (void)body;
    cpt_enter(s);
    if (len != 1 || id == 1 || id == 2)
        atomic_fetch_add(&g_route->bad, 1);
    atomic_fetch_add(&g_route->unknown, 1);
    atomic_store(&g_route->last_unknown_id, id);
    cpt_leave(s);
    return 0;
}

static void unrouted_case(bool with_default)
{
    route_ctx rc = { 0 };
    g_route = &rc;
    cp_route routes[] = { { 1, route1 }, { 2, route2 } };
    cp_server_opts o = { .session.routes = routes, .session.nroutes = 2 };
    cp_handlers h = cpt_track_handlers();
    h.on_packet = with_default ? unknown_fn : NULL;
    cpt_env e;
    cpt_env_start(&e, 2, &o, &h, 8, 0);
    int fd = cpt_xconnect(e.sport);
    uint16_t ids[] = { 0, 3, 255, 256, 1000, 4096, 32768, 65534, 65535 };
    size_t nids = sizeof ids / sizeof ids[0];
    for (size_t i = 0; i < nids; i++)
        cpt_xsend_packet(fd, ids[i], "u", 1);
    cpt_xsend_packet(fd, 2, "", 0);
    cpt_xsend_packet(fd, 1, "k", 1);
    cpt_xrecv_packet_eq(fd, 1, "R", 1);
    CPT_AWAIT(atomic_load(&rc.r2) == 1, 2000, "route 2 not called");
    cr_assert_eq(atomic_load(&rc.r1), 1);
    cr_assert_eq(atomic_load(&rc.unknown), with_default ? (int)nids : 0);
    if (with_default)
        cr_assert_eq(atomic_load(&rc.last_unknown_id), 65535);
    cr_assert_eq(atomic_load(&rc.bad), 0, "a handler got the wrong id or body");
    cr_assert_eq(cpt_peek_state(fd), 0, "the session was closed by unrouted ids");
    if (with_default)
        CPT_AWAIT(cpt_stats(e.svc).packets_in == nids + 2, 2000, "stats.packets_in %llu, expected %zu",
                  (unsigned long long)cpt_stats(e.svc).packets_in, nids + 2);
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* Flaw 7: ids indexed past the end of the handler table. Ids without a route
 * (up to 65535) go to on_packet, with their id intact. */
Test(flaws, f07_unrouted_ids_go_to_on_packet, .timeout = 20) { unrouted_case(true); }

/* ... and are dropped when on_packet is NULL; the session goes on. */
Test(flaws, f07_unrouted_ids_dropped_without_on_packet, .timeout = 20) { unrouted_case(false); }

/* Flaw 7: any packet over 6000 bytes crashed the original. With max_packet
 * 65535, packets of every large size up to 65535 bytes are echoed intact. */
Test(flaws, f07_packets_up_to_65535_bytes, .timeout = 30)
{
    cp_server_opts o = { .session.max_packet = 65535 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 4, 0);
    int fd = cpt_xconnect(e.sport);
    uint8_t *body = malloc(65535);
    cr_assert_not_null(body);
    size_t sizes[] = { 6000, 6001, 16384, 65535 - 4 - 1, 65535 - 4 };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        cpt_fill(body, sizes[i], i * 100000, 7);
        cpt_xsend_packet(fd, (uint16_t)(100 + i), body, sizes[i]);
        cpt_xrecv_packet_eq(fd, (uint16_t)(100 + i), body, sizes[i]);
    }
    free(body);
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ 8 */

/* ThreadSanitizer maps shadow memory for every address the program touches,
 * so under it, as under AddressSanitizer (cpt_sanitized), RSS says nothing
 * about the library. */
static const bool rss_under_tsan = CPT_TSAN;

/* Flaw 8: 640 KiB of receive buffer per session. 2000 sessions that each
 * received a whole packet and went idle must cost less than 2 KiB of RSS each
 * (client and server in one process: 4000 descriptors). A warm-up of 64
 * sessions sending 40 packets each, one at a time, first touches every fixed
 * pool (per-worker read buffers, every buffer of a provided-buffer ring). */
Test(flaws, f08_idle_sessions_hold_no_receive_buffer, .timeout = 90)
{
    enum { N = 2000, WARM = 64, ROUNDS = 40 };
    cr_assert_geq(cpt_raise_nofile(2 * N + 2 * WARM + 200), (unsigned long long)(2 * N + 2 * WARM + 100),
                  "not enough file descriptors for this test");
    cp_server_opts o = { .session.max_packet = 65535 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, N + WARM + 8, CPT_NO_ECHO);
    uint8_t body[1000];
    memset(body, 'b', sizeof body);
    int warm[WARM];
    for (int i = 0; i < WARM; i++)
        warm[i] = cpt_xconnect(e.sport);
    for (int r = 0; r < ROUNDS; r++) {
        for (int i = 0; i < WARM; i++)
            cpt_xsend_packet(warm[i], 1, body, sizeof body);
        cpt_sleep_ms(1); /* a sleep: paces the rounds, so packets come one at a time */
    }
    CPT_AWAIT(atomic_load(&e.t->packets) == WARM * ROUNDS, 10000, "warm-up packets not received");
    for (int i = 0; i < WARM; i++)
        cpt_close(warm[i]);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == WARM, 5000, "warm-up sessions not disconnected");
    cpt_sleep_ms(100); /* a sleep: the warm-up's memory goes back (trims) before the baseline RSS */

    int *fds = malloc(N * sizeof *fds);
    cr_assert_not_null(fds);
    long rss0 = cpt_rss_kib();
    for (int i = 0; i < N; i++) {
        fds[i] = cpt_connect(CPT_HOST4, e.sport, 0);
        cr_assert_geq(fds[i], 0, "connect #%d: %s", i, strerror(-fds[i]));
        cpt_xsend_packet(fds[i], 1, body, sizeof body);
    }
    CPT_AWAIT(atomic_load(&e.t->packets) == WARM * ROUNDS + N, 20000, "only %lld of %d packets received",
              atomic_load(&e.t->packets) - WARM * ROUNDS, N);
    cpt_xsettle(e.svc, e.t);
    cr_assert_eq(cpt_stats(e.svc).sessions, (uint64_t)N);
    cpt_sleep_ms(200); /* a sleep: the workers go idle and trim before the RSS is read */
    long growth = cpt_rss_kib() - rss0;
    cr_log_info("RSS growth for %d idle sessions: %ld KiB (%.2f KiB each)", N, growth, (double)growth / N);
    if (!cpt_sanitized() && !rss_under_tsan)
        cr_assert_lt(growth, (long)N * 2, "%d idle sessions cost %ld KiB of RSS (%.2f KiB each, limit 2)", N,
                     growth, (double)growth / N);
    for (int i = 0; i < N; i++)
        cpt_close(fds[i]);
    free(fds);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == WARM + N, 20000, "sessions not disconnected");
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ 9 */

typedef struct bc_reader {
    int fd;
    int expect;
    int got;
    int order_errors;
    int rc;
    uint64_t done_ms;
} bc_reader;

static void *bc_reader_main(void *arg)
{
    bc_reader *r = arg;
    uint8_t *body = malloc(65536);
    while (r->got < r->expect) {
        uint16_t id;
        size_t len;
        int rc = cpt_recv_packet(r->fd, &id, body, 65536, &len);
        if (rc) {
            r->rc = rc;
            break;
        }
        uint32_t seq;
        memcpy(&seq, body, 4);
        if (seq != (uint32_t)r->got)
            r->order_errors++;
        r->got++;
    }
    r->done_ms = cpt_now_ms();
    free(body);
    return NULL;
}

typedef struct group_ctx {
    cpt_track t; /* first: the ctx is also a cpt_track */
    cp_group *g;
} group_ctx;

static void join_group_connected(cp_session *s)
{
    cpt_on_connected(s);
    group_ctx *gc = cp_session_ctx(s);
    if (cp_group_add(gc->g, s) != 0)
        atomic_fetch_add(&gc->t.failures, 1);
}

/* Flaw 9: broadcast held a lock across every member's send. A member that
 * never reads must not delay delivery to the others, and no broadcast call
 * may wait for it. */
Test(flaws, f09_broadcast_never_blocks_on_slow_member, .timeout = 60)
{
    enum { FAST = 4, PKTS = 300, BODY = 16384 };
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *port = cpt_xport(2);
    group_ctx *gc = calloc(1, sizeof *gc);
    cr_assert_not_null(gc);
    gc->t.cap = 16;
    gc->t.recs = calloc(16, sizeof *gc->t.recs);
    cr_assert_eq(cp_group_create(&gc->g), 0);
    cp_handlers h = cpt_track_handlers();
    h.on_connected = join_group_connected;
    cp_server_opts o = { .session.send_queue_limit = 64u << 20, .session.max_packet = 65535 };
    cp_service *svc = cpt_xserver(port, &o, &h, gc);
    uint16_t sport = cp_service_listen_port(svc);

    int slow = cpt_connect(CPT_HOST4, sport, 4096);
    cr_assert_geq(slow, 0);
    bc_reader rd[FAST];
    pthread_t th[FAST];
    for (int i = 0; i < FAST; i++) {
        rd[i] = (bc_reader){ .fd = cpt_xconnect(sport), .expect = PKTS };
        cpt_set_rcvtimeo(rd[i].fd, 20000);
    }
    CPT_AWAIT(cp_group_size(gc->g) == FAST + 1, 5000, "not all members joined");
    for (int i = 0; i < FAST; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, bc_reader_main, &rd[i]), 0);

    uint8_t *body = calloc(1, BODY);
    uint64_t worst_ns = 0;
    uint64_t t0 = cpt_now_ms();
    for (uint32_t seq = 0; seq < PKTS; seq++) {
        memcpy(body, &seq, 4);
        cp_sendbuf *b = cp_packet_make(3, body, BODY);
        cr_assert_not_null(b);
        uint64_t c0 = cpt_now_ns();
        int n = cp_group_broadcast(gc->g, b);
        uint64_t dt = cpt_now_ns() - c0;
        cp_sendbuf_unref(b);
        if (dt > worst_ns)
            worst_ns = dt;
        cr_assert_eq(n, FAST + 1, "broadcast reached %d members", n);
    }
    free(body);
    for (int i = 0; i < FAST; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < FAST; i++) {
        cr_assert_eq(rd[i].got, PKTS, "fast member %d got %d of %d packets (rc %d)", i, rd[i].got, PKTS,
                     rd[i].rc);
        cr_assert_eq(rd[i].order_errors, 0);
        cr_assert_lt(rd[i].done_ms - t0, 10000, "fast member %d took %llu ms", i,
                     (unsigned long long)(rd[i].done_ms - t0));
    }
    cr_log_info("slowest broadcast call: %.3f ms", (double)worst_ns / 1e6);
    cr_assert_lt(worst_ns, 100u * 1000000u, "a broadcast call took %.1f ms", (double)worst_ns / 1e6);
    cr_assert_eq(cpt_peek_state(slow), 2, "the slow member got nothing at all");
    cr_assert_eq(cpt_stats(svc).sessions, FAST + 1, "a member was dropped (slow member's queue < limit)");

    cpt_xstop(svc);
    cpt_track_stopped(&gc->t);
    cr_assert_eq(cp_group_size(gc->g), 0, "stopped sessions are still group members");
    cpt_track_xcheck(&gc->t);
    for (int i = 0; i < FAST; i++)
        cpt_close(rd[i].fd);
    cpt_close(slow);
    cp_group_destroy(gc->g);
    free(gc->t.recs);
    free(gc);
    cpt_xport_destroy(port);
    cpt_leak_end(&leak);
}

/* ------------------------------------------------------------------ 10 */

typedef struct busy_client {
    uint16_t port;
    int nconn;
    atomic_int *go;
    atomic_llong roundtrips; /* read by the test while the thread runs */
    int bad;
} busy_client;

static void *busy_client_main(void *arg)
{
    busy_client *bc = arg;
    int fds[16];
    int n = bc->nconn;
    int open_n = 0;
    for (int i = 0; i < n; i++) {
        fds[i] = cpt_connect(CPT_HOST4, bc->port, 0);
        if (fds[i] >= 0)
            open_n++;
        else
            bc->bad++;
    }
    uint8_t body[64];
    memset(body, 'q', sizeof body);
    while (open_n > 0) {
        for (int i = 0; i < n; i++) {
            if (fds[i] < 0)
                continue;
            int rc = 0;
            for (int k = 0; k < 8 && rc == 0; k++)
                rc = cpt_send_packet(fds[i], 1, body, sizeof body);
            for (int k = 0; k < 8 && rc == 0; k++) {
                uint8_t got[64];
                size_t len;
                rc = cpt_recv_packet(fds[i], NULL, got, sizeof got, &len);
                if (rc == 0 && (len != sizeof body || memcmp(got, body, len)))
                    bc->bad++;
            }
            if (rc == 0) {
                atomic_fetch_add_explicit(&bc->roundtrips, 1, memory_order_relaxed);
                continue;
            }
            if (rc == -EAGAIN)
                bc->bad++; /* neither served nor closed within the timeout */
            cpt_close(fds[i]);
            fds[i] = -1;
            open_n--;
        }
    }
    return NULL;
}

/* Every session of t has handled at least n packets: traffic flows on all. */
static bool every_session_echoed(cpt_track *t, int n)
{
    for (int i = 0; i < atomic_load(&t->nrec); i++)
        if (atomic_load(&t->recs[i].packets) < n)
            return false;
    return true;
}

/* Flaw 10: no graceful shutdown. cp_service_stop while 50 sessions exchange
 * traffic returns promptly; every on_connected is matched by exactly one
 * on_disconnected; no callback runs after it returns; everything is freed. */
Test(flaws, f10_graceful_stop_with_busy_sessions, .timeout = 60)
{
    enum { THREADS = 5, PER = 10 };
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, THREADS * PER + 8, 0);
    busy_client bc[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
        bc[i] = (busy_client){ .port = e.sport, .nconn = PER };
        cr_assert_eq(pthread_create(&th[i], NULL, busy_client_main, &bc[i]), 0);
    }
    CPT_AWAIT(atomic_load(&e.t->connected) == THREADS * PER, 5000, "clients not connected");
    CPT_AWAIT(every_session_echoed(e.t, 8), 5000, "not every session exchanged traffic");
    long long before = 0;
    for (int i = 0; i < THREADS; i++)
        before += atomic_load(&bc[i].roundtrips); /* a hint: the threads go on counting */
    uint64_t t0 = cpt_now_ms();
    cpt_xstop(e.svc);
    uint64_t took = cpt_now_ms() - t0;
    cpt_track_stopped(e.t);
    for (int i = 0; i < THREADS; i++)
        pthread_join(th[i], NULL);
    cr_assert_lt(took, 5000, "cp_service_stop took %llu ms", (unsigned long long)took);
    long long total = 0;
    int bad = 0;
    for (int i = 0; i < THREADS; i++) {
        total += atomic_load(&bc[i].roundtrips);
        bad += bc[i].bad;
    }
    cr_log_info("%lld round trips (%lld before stop), stop took %llu ms", total, before,
                (unsigned long long)took);
    cr_assert_gt(total, 0, "no traffic happened");
    cr_assert_eq(bad, 0, "%d bad echoes or hanging connections", bad);
    cr_assert_gt(atomic_load(&e.t->reasons[CP_REASON_STOPPING]), 0,
                 "no session ended with CP_REASON_STOPPING");
    cpt_track_xcheck(e.t);
    cpt_track_free(e.t);
    cpt_xport_destroy(e.port);
    cpt_leak_end(&e.leak);
}

/* ------------------------------------------------------------------ 11 */

typedef struct player {
    cp_session *s;
    int level;
} player;

typedef struct cycle_ctx {
    cpt_track t;
    cp_group *g;
} cycle_ctx;

static void player_connected(cp_session *s)
{
    cpt_on_connected(s); /* keep_refs: the user keeps the session */
    cycle_ctx *cc = cp_session_ctx(s);
    cpt_srec *r = cpt_rec(s);
    player *p = malloc(sizeof *p);
    if (!p || !r) {
        free(p);
        atomic_fetch_add(&cc->t.failures, 1);
        return;
    }
    p->s = s; /* player -> session; the record's user pointer: session -> player */
    p->level = 1;
    r->user = p;
    if (cp_group_add(cc->g, s) != 0)
        atomic_fetch_add(&cc->t.failures, 1);
}

/* One cycle: 200 clients, each session kept by the user (ref), pointing at a
 * player that points back, and in a group; a broadcast; then stop. */
static void ref_cycle(cp_port *port)
{
    enum { N = 200 };
    cycle_ctx *cc = calloc(1, sizeof *cc);
    cr_assert_not_null(cc);
    cc->t.cap = N;
    cc->t.recs = calloc(N, sizeof *cc->t.recs);
    cc->t.keep_refs = true;
    cr_assert_eq(cp_group_create(&cc->g), 0);
    cp_handlers h = cpt_track_handlers();
    h.on_connected = player_connected;
    cp_service *svc = cpt_xserver(port, NULL, &h, cc);
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = cpt_xconnect(cp_service_listen_port(svc));
    CPT_AWAIT(cp_group_size(cc->g) == N, 5000, "not all sessions joined the group");
    CPT_AWAIT(atomic_load(&cc->t.connected) == N, 5000, "not connected");
    cp_sendbuf *b = cp_packet_make(4, "hello", 5);
    cr_assert_eq(cp_group_broadcast(cc->g, b), N);
    cp_sendbuf_unref(b);
    for (int i = 0; i < N; i += 10)
        cpt_xrecv_packet_eq(fds[i], 4, "hello", 5);
    cpt_xstop(svc);
    cpt_track_stopped(&cc->t);
    cr_assert_eq(cp_group_size(cc->g), 0, "members stay in the group after stop");
    for (int i = 0; i < N; i++) {
        player *p = cc->t.recs[i].user;
        cr_assert_eq(cp_session_send_copy(p->s, "x", 1), -ENOTCONN);
        free(p);
        cpt_close(fds[i]);
    }
    cpt_track_xcheck(&cc->t);
    cp_group_destroy(cc->g);
    cpt_track_free(&cc->t); /* unrefs the kept sessions, frees cc (t is its first member) */
}

/* Flaw 11: reference cycles (listener <-> service, player <-> session) leaked
 * whole sessions. After stop + unref, nothing may remain: checked by
 * LeakSanitizer in the sanitizer build and by heap accounting over repeated
 * cycles otherwise. */
Test(flaws, f11_no_leak_from_refs_and_groups, .timeout = 60)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *port = cpt_xport(2);
    /* Warm-up: pools and caches grow to their bound over the first cycles. */
    for (int i = 0; i < 4; i++)
        ref_cycle(port);
    size_t heap0 = cpt_heap_in_use();
    for (int i = 0; i < 4; i++)
        ref_cycle(port);
    size_t heap1 = cpt_heap_in_use();
    cpt_xport_destroy(port);
    if (heap0 && heap1 > heap0)
        cr_assert_lt(heap1 - heap0, 160u << 10, "heap grew by %zu bytes over 4 cycles of 200 sessions",
                     heap1 - heap0);
    cr_log_info("heap before %zu after %zu", heap0, heap1);
    cpt_leak_end(&leak);
}

/* ------------------------------------------------------------------ 12 */

static int tcp_nodelay_of(int fd)
{
    int v = -1;
    if (cpt_getsockopt_int(fd, IPPROTO_TCP, TCP_NODELAY, &v) != 0)
        return -1;
    return v;
}

/* Flaw 12: TCP_NODELAY was set at the wrong level. Checked on the library's
 * own sockets (found in this process by address): accepted sockets have it
 * unless no_nodelay is set; so do a client service's sockets. */
Test(flaws, f12_tcp_nodelay_really_set, .timeout = 30)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 8, 0);
    int fd = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    int sfd = cpt_xfind_peer_fd(fd);
    cr_assert_eq(tcp_nodelay_of(sfd), 1, "TCP_NODELAY is not set on the accepted socket");
    cpt_close(fd);

    /* no_nodelay = 1 keeps Nagle on. */
    cp_server_opts o = { .session.no_nodelay = 1 };
    cpt_track *t2 = cpt_track_new(4);
    cp_handlers h = cpt_track_handlers();
    cp_service *s2 = cpt_xserver(e.port, &o, &h, t2);
    fd = cpt_xconnect(cp_service_listen_port(s2));
    CPT_AWAIT(atomic_load(&t2->connected) == 1, 5000, "not connected");
    sfd = cpt_xfind_peer_fd(fd);
    cr_assert_eq(tcp_nodelay_of(sfd), 0, "no_nodelay = 1 but TCP_NODELAY is set");
    cpt_close(fd);
    cpt_xstop(s2);
    cpt_track_stopped(t2);
    cpt_track_xcheck(t2);
    cpt_track_free(t2);

    /* A client service's connected socket. */
    int lfd = cpt_xlisten(8);
    cpt_track *t3 = cpt_track_new(4);
    cp_client_opts co = { .host = CPT_HOST4, .port = cpt_local_port(lfd), .sessions = 1 };
    cp_service *cli = cpt_xclient(e.port, &co, &h, t3);
    int afd = cpt_accept(lfd);
    cr_assert_geq(afd, 0);
    CPT_AWAIT(atomic_load(&t3->connected) == 1, 5000, "client session not connected");
    int cfd = cpt_xfind_peer_fd(afd);
    cr_assert_eq(tcp_nodelay_of(cfd), 1, "TCP_NODELAY is not set on the client service's socket");
    cpt_xstop(cli);
    cpt_track_stopped(t3);
    cpt_track_xcheck(t3);
    cpt_track_free(t3);
    cpt_close(afd);
    cpt_close(lfd);
    cpt_env_stop(&e);
}

/* The response to each ping is written in two parts, the second from on_sent
 * after the first reached the socket: with Nagle on, the second part waits
 * for the client's delayed ACK (~40 ms); with TCP_NODELAY it leaves at once. */
static int ping_handler(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    (void)id;
    (void)body;
    (void)len;
    cpt_enter(s);
    cpt_srec *r = cpt_rec(s);
    static const uint8_t pong[4] = { 4, 0, 2, 0 };
    atomic_store(&r->expect_seq, 1); /* second half pending */
    cp_session_send_copy(s, pong, 2);
    cpt_leave(s);
    return 0;
}

static void pong_second_half(cp_session *s, size_t bytes)
{
    cpt_on_sent(s, bytes);
    cpt_enter(s);
    cpt_srec *r = cpt_rec(s);
    static const uint8_t pong[4] = { 4, 0, 2, 0 };
    if (atomic_exchange(&r->expect_seq, 0) == 1)
        cp_session_send_copy(s, pong + 2, 2);
    cpt_leave(s);
}

static uint64_t pingpong_ms(int no_nodelay, int rounds)
{
    cp_server_opts o = { .session.no_nodelay = no_nodelay };
    cp_handlers h = cpt_track_handlers();
    h.on_packet = ping_handler;
    h.on_sent = pong_second_half;
    cpt_env e;
    cpt_env_start(&e, 2, &o, &h, 4, CPT_NO_ECHO);
    int fd = cpt_xconnect(e.sport);
    /* warm up past the kernel's initial quick-ACK phase */
    uint64_t t0 = 0;
    for (int i = 0; i < rounds + 20; i++) {
        if (i == 20)
            t0 = cpt_now_ns();
        cpt_xsend_packet(fd, 1, NULL, 0);
        uint8_t pong[4];
        cpt_xrecv(fd, pong, 4);
        cr_assert(pong[0] == 4 && pong[2] == 2, "bad pong");
    }
    uint64_t ms = (cpt_now_ns() - t0) / 1000000u;
    cpt_close(fd);
    cpt_env_stop(&e);
    return ms;
}

/* Flaw 12, by behaviour: 100 ping-pongs whose replies are written in two
 * small writes finish far below what Nagle + delayed ACK would cost. */
Test(flaws, f12_small_writes_not_delayed, .timeout = 60)
{
    uint64_t ms = pingpong_ms(0, 100);
    cr_log_info("100 split ping-pongs with TCP_NODELAY: %llu ms", (unsigned long long)ms);
    cr_assert_lt(ms, 1000, "100 ping-pongs took %llu ms: small writes are delayed (Nagle)",
                 (unsigned long long)ms);
}

/* Control for the test above: with no_nodelay = 1 the same exchange is slow,
 * which shows the test can see Nagle at all (and that no_nodelay works). */
Test(flaws, f12_nagle_control_is_slow, .timeout = 60)
{
    uint64_t ms = pingpong_ms(1, 50);
    cr_log_info("50 split ping-pongs with Nagle: %llu ms", (unsigned long long)ms);
    cr_assert_gt(ms, 500, "with Nagle on, 50 split ping-pongs took only %llu ms", (unsigned long long)ms);
}

/* Flaw 12: IPv4 only. A server on ::1 serves, names its peers "[::1]:port",
 * and a client service reaches it. */
Test(flaws, f12_ipv6_server_and_client, .timeout = 30)
{
    if (!have_ipv6_loopback())
        cr_skip_test("no IPv6 loopback here");
    cp_server_opts o = { .host = CPT_HOST6 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 8, CPT_KEEP_REFS);
    int fd = cpt_connect(CPT_HOST6, e.sport, 0);
    cr_assert_geq(fd, 0, "connect [::1]:%u: %s", e.sport, strerror(-fd));
    cpt_xsend_packet(fd, 6, "ipv6", 4);
    cpt_xrecv_packet_eq(fd, 6, "ipv6", 4);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    char peer[96];
    int n = cp_session_peer(e.t->recs[0].s, peer, sizeof peer);
    cr_assert_gt(n, 0);
    char want[96];
    snprintf(want, sizeof want, "[::1]:%u", cpt_local_port(fd));
    cr_assert_str_eq(peer, want);
    cr_assert_eq(n, (int)strlen(want));
    int sfd = cpt_xfind_peer_fd(fd);
    cr_assert_eq(tcp_nodelay_of(sfd), 1, "TCP_NODELAY not set on an IPv6 session");
    cpt_close(fd);

    cpt_track *ct = cpt_track_new(8);
    ct->echo = false;
    cp_handlers h = cpt_track_handlers();
    cp_client_opts co = { .host = CPT_HOST6, .port = e.sport, .sessions = 3 };
    cp_service *cli = cpt_xclient(e.port, &co, &h, ct);
    CPT_AWAIT(atomic_load(&ct->connected) == 3, 5000,
              "IPv6 client sessions not connected (%d failed, err %d)", atomic_load(&ct->connect_failed),
              atomic_load(&ct->last_connect_err));
    cp_sendbuf *b = cp_packet_make(8, "v6", 2);
    cr_assert_eq(cp_service_broadcast(cli, b), 3);
    cp_sendbuf_unref(b);
    CPT_AWAIT(atomic_load(&ct->packets) == 3, 5000, "echoes over IPv6 not received");
    cpt_xstop(cli);
    cpt_track_stopped(ct);
    cpt_track_xcheck(ct);
    cpt_track_free(ct);
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ 13 */

typedef struct flood {
    int fd;
    int npkts;
    atomic_int *pushed; /* packets the server pushed to this client */
    atomic_int *push_done;
    int echoes, pushes, rc;
} flood;

static void *flood_writer(void *arg)
{
    flood *f = arg;
    uint8_t body[32];
    memset(body, 'f', sizeof body);
    for (int i = 0; i < f->npkts; i++)
        if (cpt_send_packet(f->fd, 1, body, sizeof body) != 0)
            break;
    return NULL;
}

static void *flood_reader(void *arg)
{
    flood *f = arg;
    uint8_t body[64];
    uint64_t deadline = cpt_now_ms() + 30000;
    for (;;) {
        if (f->echoes == f->npkts && atomic_load(f->push_done) && f->pushes == atomic_load(f->pushed))
            break;
        if (cpt_poll_in(f->fd, 100) == 0) {
            if (cpt_now_ms() > deadline) {
                f->rc = -ETIMEDOUT;
                break;
            }
            continue;
        }
        uint16_t id;
        size_t len;
        int rc = cpt_recv_packet(f->fd, &id, body, sizeof body, &len);
        if (rc) {
            f->rc = rc;
            break;
        }
        if (id == 1)
            f->echoes++;
        else
            f->pushes++;
    }
    return NULL;
}

/* Flaw 13: OnRecv and OnSend of one session could run at the same time. Four
 * clients flood their sessions with packets (echoed) while a user thread
 * pushes packets to the same sessions by id; every callback holds a per-session
 * "inside" flag for a few microseconds: no overlap may ever be seen. */
Test(flaws, f13_callbacks_of_one_session_never_overlap, .timeout = 60)
{
    enum { C = 4, PKTS = 3000 };
    cp_server_opts o = { .session.send_queue_limit = 16u << 20 };
    cpt_env e;
    cpt_env_start(&e, 4, &o, NULL, C + 4, 0);
    e.t->hold_us = 5;
    flood f[C];
    atomic_int pushed[C];
    atomic_int push_done = 0;
    pthread_t w[C], rd[C];
    for (int i = 0; i < C; i++) {
        atomic_init(&pushed[i], 0);
        f[i] = (flood){ .fd = cpt_xconnect(e.sport),
                        .npkts = PKTS,
                        .pushed = &pushed[i],
                        .push_done = &push_done };
        cpt_set_rcvtimeo(f[i].fd, 20000);
    }
    CPT_AWAIT(atomic_load(&e.t->connected) == C, 5000, "not connected");
    uint64_t ids[C];
    for (int i = 0; i < C; i++) {
        cpt_srec *r = cpt_track_by_peer(e.t, cpt_local_port(f[i].fd));
        cr_assert_not_null(r);
        ids[i] = r->id;
    }
    for (int i = 0; i < C; i++) {
        pthread_create(&w[i], NULL, flood_writer, &f[i]);
        pthread_create(&rd[i], NULL, flood_reader, &f[i]);
    }
    cp_sendbuf *b = cp_packet_make(2, "push", 4);
    for (int k = 0; k < PKTS; k++) {
        for (int i = 0; i < C; i++)
            if (cp_service_send_to(e.svc, ids[i], b) == 0)
                atomic_fetch_add(&pushed[i], 1);
        if (k % 64 == 0)
            cpt_sleep_us(100); /* a sleep: paces the pushes among the clients' floods */
    }
    cp_sendbuf_unref(b);
    atomic_store(&push_done, 1);
    for (int i = 0; i < C; i++) {
        pthread_join(w[i], NULL);
        pthread_join(rd[i], NULL);
    }
    for (int i = 0; i < C; i++) {
        cr_assert_eq(f[i].echoes, PKTS, "client %d: %d echoes (rc %d)", i, f[i].echoes, f[i].rc);
        cr_assert_eq(f[i].pushes, atomic_load(&pushed[i]), "client %d: %d of %d pushes", i, f[i].pushes,
                     atomic_load(&pushed[i]));
    }
    cr_assert_eq(atomic_load(&e.t->overlaps), 0, "callbacks of one session overlapped %d times",
                 atomic_load(&e.t->overlaps));
    for (int i = 0; i < C; i++)
        cpt_close(f[i].fd);
    cpt_env_stop(&e);
}
