/* SPDX-License-Identifier: MIT */
/*
 * The completion port: creation with each option, the backend choice, worker
 * counts, cp_port_post from many threads, destroy rules, logging, names.
 */
#include "helpers.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

Test(port, create_with_null_opts_uses_one_worker_per_cpu, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *p = NULL;
    int rc = cp_port_create(&p, NULL);
    cr_assert_eq(rc, 0, "cp_port_create(NULL opts): %s", cp_strerror(rc));
    int cpus = cpt_ncpu();
    cr_assert_eq(cp_port_workers(p), cpus, "%d workers on %d CPUs", cp_port_workers(p), cpus);
    const char *name = cp_port_backend_name(p);
    cr_assert(name && *name);
    const char *env = getenv("CP_BACKEND");
    if (env && *env)
        cr_assert(strstr(name, env), "AUTO with CP_BACKEND=%s chose %s", env, name);
    cpt_xport_destroy(p);
    cpt_leak_end(&leak);
}

Test(port, explicit_worker_count_and_backend, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    for (int w = 1; w <= 5; w += 2) {
        cp_port *p = cpt_xport(w);
        cr_assert_eq(cp_port_workers(p), w);
        cpt_xport_destroy(p);
    }
    cpt_leak_end(&leak);
}

/* The system's own backend, asked for by name, is the one created. */
#ifdef _WIN32
#  define NATIVE_BACKEND CP_BACKEND_IOCP
#  define NATIVE_NAME "iocp"
#else
#  define NATIVE_BACKEND CP_BACKEND_EPOLL
#  define NATIVE_NAME "epoll"
#endif

Test(port, native_backend_on_request, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *p = NULL;
    cp_port_opts o = { .workers = 2, .backend = NATIVE_BACKEND };
    cr_assert_eq(cp_port_create(&p, &o), 0);
    cr_assert_str_eq(cp_port_backend_name(p), NATIVE_NAME);
    cpt_xport_destroy(p);
    cpt_leak_end(&leak);
}

/* A backend that cannot exist here is refused with -ENOTSUP, not faked. */
Test(port, unavailable_backend_is_refused, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
#ifdef _WIN32
    const cp_backend absent[] = { CP_BACKEND_EPOLL, CP_BACKEND_URING };
#else
    const cp_backend absent[] = { CP_BACKEND_IOCP };
#endif
    for (size_t i = 0; i < sizeof absent / sizeof absent[0]; i++) {
        cp_port *p = NULL;
        cp_port_opts o = { .workers = 1, .backend = absent[i] };
        int rc = cp_port_create(&p, &o);
        cr_assert_eq(rc, -ENOTSUP, "backend %d on this system: %d (%s)", (int)absent[i], rc, cp_strerror(rc));
    }
    cpt_leak_end(&leak);
}

Test(port, many_ports_created_and_destroyed_leak_nothing, .timeout = 30)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    for (int i = 0; i < 50; i++) {
        cp_port *p = cpt_xport(2);
        cpt_xport_destroy(p);
    }
    cp_port *ps[8];
    for (int i = 0; i < 8; i++)
        ps[i] = cpt_xport(2);
    for (int i = 0; i < 8; i++)
        cpt_xport_destroy(ps[i]);
    cpt_leak_end(&leak);
}

/* ------------------------------------------------------------------ post */

enum { POSTERS = 8, PER_POSTER = 20000 };

typedef struct post_ctx {
    cp_port *port;
    pthread_t main;
    atomic_int ran;
    atomic_int on_main;
    atomic_uchar *seen;
    atomic_int twice;
    atomic_int post_errors;
} post_ctx;

typedef struct post_item {
    post_ctx *c;
    int idx;
} post_item;

static post_item *g_items;

static void post_fn(void *arg)
{
    post_item *it = arg;
    post_ctx *c = it->c;
    if (pthread_equal(pthread_self(), c->main))
        atomic_fetch_add(&c->on_main, 1);
    if (atomic_fetch_add(&c->seen[it->idx], 1) != 0)
        atomic_fetch_add(&c->twice, 1);
    atomic_fetch_add(&c->ran, 1);
}

typedef struct poster {
    post_ctx *c;
    int first;
} poster;

static void *poster_main(void *arg)
{
    poster *p = arg;
    for (int i = 0; i < PER_POSTER; i++) {
        int idx = p->first + i;
        if (cp_port_post(p->c->port, post_fn, &g_items[idx]) != 0)
            atomic_fetch_add(&p->c->post_errors, 1);
    }
    return NULL;
}

/* cp_port_post from 8 threads at once: every function runs exactly once, on
 * a worker (never on the posting thread). */
Test(port, post_from_many_threads_runs_each_once_on_workers, .timeout = 60)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    post_ctx *c = calloc(1, sizeof *c);
    c->port = cpt_xport(3);
    c->main = pthread_self();
    c->seen = calloc(POSTERS * PER_POSTER, sizeof *c->seen);
    g_items = calloc(POSTERS * PER_POSTER, sizeof *g_items);
    for (int i = 0; i < POSTERS * PER_POSTER; i++)
        g_items[i] = (post_item){ .c = c, .idx = i };
    pthread_t th[POSTERS];
    poster ps[POSTERS];
    for (int i = 0; i < POSTERS; i++) {
        ps[i] = (poster){ .c = c, .first = i * PER_POSTER };
        cr_assert_eq(pthread_create(&th[i], NULL, poster_main, &ps[i]), 0);
    }
    for (int i = 0; i < POSTERS; i++)
        pthread_join(th[i], NULL);
    cr_assert_eq(atomic_load(&c->post_errors), 0);
    CPT_AWAIT(atomic_load(&c->ran) == POSTERS * PER_POSTER, 20000, "%d of %d posted functions ran",
              atomic_load(&c->ran), POSTERS * PER_POSTER);
    cpt_xport_destroy(c->port); /* nothing runs after it: the counts below are final */
    cr_assert_eq(atomic_load(&c->ran), POSTERS * PER_POSTER, "a posted function ran more than once");
    cr_assert_eq(atomic_load(&c->twice), 0);
    cr_assert_eq(atomic_load(&c->on_main), 0, "a posted function ran on the posting thread");
    free(c->seen);
    free(g_items);
    free(c);
    cpt_leak_end(&leak);
}

typedef struct chain {
    cp_port *port;
    atomic_int left;
    atomic_int errors;
} chain;

static void chain_fn(void *arg)
{
    chain *ch = arg;
    if (atomic_fetch_sub(&ch->left, 1) > 1 && cp_port_post(ch->port, chain_fn, ch) != 0)
        atomic_fetch_add(&ch->errors, 1);
}

/* A posted function posts the next one (from a worker): 10000 links. */
Test(port, post_from_a_worker, .timeout = 30)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    chain ch = { .port = cpt_xport(2) };
    atomic_store(&ch.left, 10000);
    cr_assert_eq(cp_port_post(ch.port, chain_fn, &ch), 0);
    CPT_AWAIT(atomic_load(&ch.left) == 0, 10000, "the chain stopped with %d links left",
              atomic_load(&ch.left));
    cr_assert_eq(atomic_load(&ch.errors), 0);
    cpt_xport_destroy(ch.port);
    cpt_leak_end(&leak);
}

/* Regression, bench_bus from its worker at half speed on io_uring: a
 * function a worker posted to itself ran again within the same round, so one
 * that kept posting itself (a task done in slices, a publisher retrying after
 * -EAGAIN) ran 8192 times before the worker looked at its sockets again. Each
 * of its runs now comes after a poll: a packet written to the worker's socket
 * during one run is read a run or two later. */
typedef struct yielder {
    cp_port *port;
    int fd;             /* the test's connection to the server */
    int runs;           /* on the one worker only, as is runs_at_packet */
    int runs_at_packet; /* runs when the packet came in; -1 before */
    atomic_bool done;
} yielder;

static yielder g_yield;

static int yield_on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    (void)s, (void)id, (void)body, (void)len;
    if (g_yield.runs_at_packet < 0)
        g_yield.runs_at_packet = g_yield.runs;
    return 0;
}

static void yield_fn(void *arg)
{
    yielder *y = arg;
    if (++y->runs == 1 && cpt_send_packet(y->fd, 1, "x", 1) != 0)
        y->runs = 1 << 30; /* the send failed: stop, and fail below */
    if (y->runs_at_packet >= 0 || y->runs >= 100000 || cp_port_post(y->port, yield_fn, y) != 0)
        atomic_store(&y->done, true);
}

Test(port, a_post_to_itself_yields_to_io, .timeout = 30)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    yielder *y = &g_yield;
    *y = (yielder){ .port = cpt_xport(1), .runs_at_packet = -1 };
    cp_handlers h = { .on_packet = yield_on_packet };
    cp_service *svc = cpt_xserver(y->port, NULL, &h, NULL);
    y->fd = cpt_xconnect(cp_service_listen_port(svc));
    CPT_AWAIT(cpt_stats(svc).connected == 1, 5000, "the connection was never accepted");
    cr_assert_eq(cp_port_post(y->port, yield_fn, y), 0);
    CPT_AWAIT(atomic_load(&y->done), 20000, "the function never stopped posting itself");
    cr_assert_lt(y->runs, 1 << 30, "the packet could not be sent");
    cr_assert_geq(y->runs_at_packet, 1, "the packet never came in (%d runs)", y->runs);
    /* One run sent it; the next poll reads it. Wine's IOCP may take a few more. */
    cr_assert_leq(y->runs_at_packet, 1000, "the packet waited %d runs of a function that yields",
                  y->runs_at_packet);
    cpt_close(y->fd);
    cpt_xstop(svc);
    cpt_xport_destroy(y->port);
    cpt_leak_end(&leak);
}

typedef struct blocker {
    atomic_int started, release, done;
} blocker;

static void block_fn(void *arg)
{
    blocker *b = arg;
    atomic_fetch_add(&b->started, 1);
    while (!atomic_load(&b->release))
        cpt_sleep_ms(1);
    atomic_fetch_add(&b->done, 1);
}

/* Workers really are separate threads: with 4 workers, 4 posted functions that
 * wait for each other all run at the same time. */
Test(port, workers_run_posted_work_in_parallel, .timeout = 30)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *p = cpt_xport(4);
    blocker b = { 0 };
    for (int i = 0; i < 4; i++)
        cr_assert_eq(cp_port_post(p, block_fn, &b), 0);
    bool all = false;
    CPT_WAIT(all, atomic_load(&b.started) == 4, 5000);
    atomic_store(&b.release, 1);
    CPT_AWAIT(atomic_load(&b.done) == 4, 5000, "posted functions did not finish");
    cr_assert(all, "only %d of 4 posted functions ran at once on 4 workers", atomic_load(&b.started));
    cpt_xport_destroy(p);
    cpt_leak_end(&leak);
}

/* Work posted before destroy either runs before it returns or not at all;
 * nothing runs after cp_port_destroy returned. */
typedef struct late {
    atomic_int ran;
} late;

static void late_fn(void *arg)
{
    late *l = arg;
    cpt_sleep_us(50); /* a sleep: slow functions, so that the destroy finds posts still pending */
    atomic_fetch_add(&l->ran, 1);
}

Test(port, destroy_with_pending_posts, .timeout = 30)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    late l = { 0 };
    cp_port *p = cpt_xport(2);
    for (int i = 0; i < 5000; i++)
        cr_assert_eq(cp_port_post(p, late_fn, &l), 0);
    cpt_xport_destroy(p);
    int n = atomic_load(&l.ran);
    cpt_sleep_ms(50); /* a sleep: a function run after the destroy would show in this window */
    cr_assert_eq(atomic_load(&l.ran), n, "posted functions ran after cp_port_destroy returned");
    cpt_leak_end(&leak);
}

typedef struct destroy_from_worker {
    cp_port *port;
    atomic_int rc, done;
} destroy_from_worker;

static void destroy_self(void *arg)
{
    destroy_from_worker *d = arg;
    atomic_store(&d->rc, cp_port_destroy(d->port));
    atomic_store(&d->done, 1);
}

Test(port, destroy_from_a_worker_is_refused, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    destroy_from_worker d = { .port = cpt_xport(2) };
    cr_assert_eq(cp_port_post(d.port, destroy_self, &d), 0);
    CPT_AWAIT(atomic_load(&d.done), 5000, "posted function did not run");
    cr_assert_eq(atomic_load(&d.rc), -EDEADLK);
    /* The port still works. */
    chain ch = { .port = d.port };
    atomic_store(&ch.left, 10);
    cr_assert_eq(cp_port_post(d.port, chain_fn, &ch), 0);
    CPT_AWAIT(atomic_load(&ch.left) == 0, 5000, "the port stopped working");
    cpt_xport_destroy(d.port);
    cpt_leak_end(&leak);
}

Test(port, destroy_with_a_live_service_is_refused, .timeout = 10)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 4, 0);
    cr_assert_eq(cp_port_destroy(e.port), -EBUSY);
    cpt_env_xneighbour(&e); /* nothing was freed */
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ logging and names */

static atomic_int g_logs, g_bad_logs;

static void log_sink(cp_log_level level, const char *msg, void *ud)
{
    if (ud != &g_logs || !msg || (int)level < CP_LOG_DEBUG || (int)level > CP_LOG_ERROR)
        atomic_fetch_add(&g_bad_logs, 1);
    atomic_fetch_add(&g_logs, 1);
}

/* A log sink receives well-formed messages with its user data; removing it
 * stops delivery. The library never prints by itself (nothing on stdout). */
Test(port, log_sink_install_and_remove, .timeout = 20)
{
    cp_set_log(log_sink, &g_logs);
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 4, 0);
    cpt_env_xneighbour(&e);
    cpt_env_stop(&e);
    cr_assert_eq(atomic_load(&g_bad_logs), 0, "a log message was malformed");
    cp_set_log(NULL, NULL);
    int n = atomic_load(&g_logs);
    cpt_env_start(&e, 2, NULL, NULL, 4, 0);
    cpt_env_xneighbour(&e);
    cpt_env_stop(&e);
    cr_assert_eq(atomic_load(&g_logs), n, "messages reached a removed sink");
}

Test(port, strerror_and_reason_names, .timeout = 10)
{
    int codes[] = { 0,           -ENOTCONN, -EBUSY,  -EDEADLK, -ESHUTDOWN, -ENOTSUP,
                    -EADDRINUSE, -ENOMEM,   -EINVAL, -EEXIST,  -ENOENT,    -12345 };
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        const char *s = cp_strerror(codes[i]);
        cr_assert(s && *s, "cp_strerror(%d)", codes[i]);
    }
    cr_assert_str_neq(cp_strerror(-EADDRINUSE), cp_strerror(-ENOTCONN));
    for (int r = 0; r < CP_REASON_COUNT_; r++) {
        const char *s = cp_reason_str((cp_reason)r);
        cr_assert(s && *s, "reason %d", r);
    }
    cr_assert_str_neq(cp_reason_str(CP_REASON_SEND_OVERFLOW), cp_reason_str(CP_REASON_TOO_BIG));
}

/* Creating and destroying a port must not disturb the calling thread: a
 * blocking receive with a 300 ms timeout right afterwards times out
 * (EAGAIN) instead of failing with EINTR. (Tearing down an io_uring ring on
 * the caller's thread queues kernel task work that interrupts the caller's
 * next blocking system call.) */
static int timed_recv_errno(void)
{
    int sv[2];
    if (cpt_socketpair(sv) != 0)
        return -1;
    cpt_set_rcvtimeo(sv[0], 300);
    char c;
    ssize_t n = cpt_recv_once(sv[0], &c, 1);
    int err = n < 0 ? (int)-n : 0;
    cpt_close(sv[0]);
    cpt_close(sv[1]);
    return err;
}

Test(port, create_and_destroy_do_not_interrupt_the_caller, .timeout = 20)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *p = cpt_xport(2);
    int after_create = timed_recv_errno();
    cpt_xport_destroy(p);
    int after_destroy = timed_recv_errno();
    cr_assert_eq(after_create, EAGAIN, "blocking recv after cp_port_create failed with %s",
                 strerror(after_create));
    cr_assert_eq(after_destroy, EAGAIN, "blocking recv after cp_port_destroy failed with %s",
                 strerror(after_destroy));
    cpt_leak_end(&leak);
}

/* ------------------------------------------------------------------ posts racing destroy */

#define RACE_POSTERS 3

typedef struct post_race {
    cp_port *port;
    atomic_long accepted; /* posts that returned 0 */
    atomic_long other;    /* anything but 0 and -ESHUTDOWN */
    atomic_long ran;      /* posted functions that ran */
} post_race;

static void race_count(void *arg) { atomic_fetch_add(&((post_race *)arg)->ran, 1); }

/* Posts until refused. */
static void *race_poster(void *arg)
{
    post_race *r = arg;
    for (;;) {
        int rc = cp_port_post(r->port, race_count, r);
        if (rc == 0) {
            atomic_fetch_add(&r->accepted, 1);
            continue;
        }
        if (rc != -ESHUTDOWN)
            atomic_fetch_add(&r->other, 1);
        return NULL;
    }
}

/* cp_port_post from three threads while the port is destroyed (2 to 4
 * workers, many rounds): each post either returns -ESHUTDOWN or has run when
 * cp_port_destroy returns, and none touches what the destroy freed
 * (AddressSanitizer would see it). Destroy used not to wait for posts already
 * past its check: they pushed into freed inboxes, woke freed workers, or were
 * never run.
 *
 * The posters run freely across the destroy, so some start a call after it
 * returned. The test keeps a job queue of the port for that: a queue holds
 * the port's memory (not its workers), so such a late call finds the port
 * destroyed and is refused, instead of reading freed memory. That is how the
 * library is built, not a promise of its API (which forbids the late call);
 * the queue is released once the posters have stopped. */
Test(port, posts_racing_destroy_run_or_are_refused, .timeout = 120)
{
    enum { ROUNDS = 150, BUDGET_MS = 6000 };
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    long lost = 0, ran_late = 0, accepted = 0;
    int rounds = 0;
    uint64_t t0 = cpt_now_ms();
    for (; rounds < ROUNDS && cpt_now_ms() - t0 < BUDGET_MS; rounds++) {
        post_race *r = calloc(1, sizeof *r);
        r->port = cpt_xport(2 + rounds % 3);
        cp_jobq *keep;
        cr_assert_eq(cp_jobq_create(&keep, r->port), 0);
        pthread_t th[RACE_POSTERS];
        for (int i = 0; i < RACE_POSTERS; i++)
            cr_assert_eq(pthread_create(&th[i], NULL, race_poster, r), 0);
        /* a sleep: the destroy comes at a varied moment of the posting */
        cpt_sleep_us((unsigned)(200 + rounds * 37 % 1500));
        cpt_xport_destroy(r->port);
        long ran = atomic_load(&r->ran);
        for (int i = 0; i < RACE_POSTERS; i++)
            pthread_join(th[i], NULL);
        cp_jobq_unref(keep);
        cr_assert_eq(atomic_load(&r->other), 0);
        lost += atomic_load(&r->accepted) - ran;
        ran_late += atomic_load(&r->ran) - ran;
        accepted += atomic_load(&r->accepted);
        free(r);
    }
    cr_assert_eq(lost, 0, "%ld of %ld accepted posts had not run when destroy returned (%d rounds)", lost,
                 accepted, rounds);
    cr_assert_eq(ran_late, 0, "%ld posts ran after destroy returned", ran_late);
    cpt_leak_end(&leak);
}
