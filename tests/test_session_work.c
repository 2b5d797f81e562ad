/* SPDX-License-Identifier: MIT */
/*
 * Work bound to a session: cp_session_post and session timers run on the
 * session's worker, never alongside one of its callbacks and never after its
 * on_disconnected; calls made once it is disconnecting fail with -ENOTCONN;
 * and every arg handed over is freed exactly once, also when posts and timer
 * starts race the disconnect.
 *
 * Each posted function and timer function brackets itself with cpt_enter /
 * cpt_leave, so the tracking server counts any overlap with a callback of the
 * same session and anything that runs after its on_disconnected.
 */
#include "helpers.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define CAP 1024
#define NHAMMER 4
#define ARG_MAGIC 0x5e55104e

/* ------------------------------------------------------------------ per-session test state */

typedef struct targ targ;

/* Indexed like the tracking records (cpt_srec); static, so it outlives the
 * sessions that threads still hold. */
typedef struct sstate {
    pthread_t owner;       /* the thread on_connected ran on */
    pthread_mutex_t lock;  /* guards args and closed */
    targ *args;            /* timer args this session still owns */
    bool closed;           /* on_disconnected ran and freed them */
    int last_seq[NHAMMER]; /* per poster thread; touched on the owner only */
    atomic_int ticks;
    atomic_int ticks_at_disc;
    atomic_int tid; /* the owner's thread id, for its run-queue wait */
    atomic_int post_ran;
    atomic_int post_saw_connected;
    atomic_int fired;
    _Atomic(cp_session_timer *) handle;
} sstate;

static cpt_env E;
static sstate states[CAP];
static _Atomic(cp_session *) sessions[CAP]; /* published after states[i] is set up */
static atomic_int published;

static atomic_int not_on_owner, failures, bad_rc, out_of_order;
static atomic_int allocs, frees, posts_ok, posts_refused, post_runs, timer_runs;

static void (*connected_hook)(cp_session *s, sstate *st);
static void (*disconnected_hook)(cp_session *s, sstate *st);

static int index_of(cp_session *s) { return (int)(cpt_rec(s) - E.t->recs); }
static sstate *state_of(cp_session *s) { return &states[index_of(s)]; }

/* Brackets a posted or timer function like a callback, and checks that it
 * runs on the session's worker. */
static void work_enter(cp_session *s)
{
    cpt_enter(s);
    if (!pthread_equal(pthread_self(), state_of(s)->owner))
        atomic_fetch_add(&not_on_owner, 1);
}

static void free_session_args(sstate *st);

static void work_on_connected(cp_session *s)
{
    cpt_on_connected(s);
    cpt_srec *r = cpt_rec(s);
    if (!r)
        return;
    sstate *st = state_of(s);
    st->owner = pthread_self();
    pthread_mutex_init(&st->lock, NULL);
    if (connected_hook)
        connected_hook(s, st);
    atomic_store(&sessions[index_of(s)], s);
    atomic_fetch_add(&published, 1);
}

static void refused_post(cp_session *s, void *arg)
{
    (void)s, (void)arg;
    atomic_fetch_add(&failures, 1); /* never runs: the post was refused */
}

static void work_on_disconnected(cp_session *s, cp_reason reason, int err)
{
    sstate *st = state_of(s);
    /* Everything bound to the session is settled; new work is refused. */
    if (cp_session_post(s, refused_post, NULL) != -ENOTCONN)
        atomic_fetch_add(&failures, 1);
    cp_session_timer *t = (cp_session_timer *)&t; /* must be reset to NULL */
    if (cp_session_timer_start(&t, s, 0, 0, refused_post, NULL) != -ENOTCONN || t != NULL)
        atomic_fetch_add(&failures, 1);
    if (disconnected_hook)
        disconnected_hook(s, st);
    free_session_args(st);
    cpt_on_disconnected(s, reason, err);
}

static void start_env(int workers, unsigned flags, cp_packet_fn on_packet)
{
    cp_handlers h = cpt_track_handlers();
    h.on_connected = work_on_connected;
    h.on_disconnected = work_on_disconnected;
    if (on_packet)
        h.on_packet = on_packet;
    cpt_env_start(&E, workers, NULL, &h, CAP, flags | CPT_KEEP_REFS);
}

static void connect_clients(int *fds, int n)
{
    for (int i = 0; i < n; i++)
        fds[i] = cpt_xconnect(E.sport);
    CPT_AWAIT(atomic_load(&published) == n, 5000, "%d of %d sessions connected", atomic_load(&published), n);
}

static void expect_clean(void)
{
    cr_expect_eq(atomic_load(&not_on_owner), 0, "%d functions ran off the session's worker",
                 atomic_load(&not_on_owner));
    cr_expect_eq(atomic_load(&failures), 0, "%d contract violations", atomic_load(&failures));
    cr_expect_eq(atomic_load(&bad_rc), 0, "%d calls returned an unexpected code", atomic_load(&bad_rc));
    cr_expect_eq(atomic_load(&allocs), atomic_load(&frees), "%d args handed over, %d freed",
                 atomic_load(&allocs), atomic_load(&frees));
}

/* ------------------------------------------------------------------ posts */

typedef struct parg {
    int magic;
    int from; /* poster thread, or -1 */
    int seq;
} parg;

static parg *parg_new(int from, int seq)
{
    parg *p = malloc(sizeof *p);
    cr_assert_not_null(p);
    p->magic = ARG_MAGIC;
    p->from = from;
    p->seq = seq;
    atomic_fetch_add(&allocs, 1);
    return p;
}

/* Checks the post order of each poster thread and frees the arg. */
static void counted_post(cp_session *s, void *arg)
{
    work_enter(s);
    parg *p = arg;
    if (p->magic != ARG_MAGIC)
        atomic_fetch_add(&failures, 1);
    if (p->from >= 0) {
        sstate *st = state_of(s);
        if (p->seq <= st->last_seq[p->from])
            atomic_fetch_add(&out_of_order, 1);
        st->last_seq[p->from] = p->seq;
    }
    p->magic = 0;
    free(p);
    atomic_fetch_add(&frees, 1);
    atomic_fetch_add(&post_runs, 1);
    cpt_leave(s);
}

static void post_counted(cp_session *s, int from, int seq)
{
    parg *p = parg_new(from, seq);
    int rc = cp_session_post(s, counted_post, p);
    if (rc == 0) {
        atomic_fetch_add(&posts_ok, 1);
        return;
    }
    if (rc != -ENOTCONN)
        atomic_fetch_add(&bad_rc, 1);
    atomic_fetch_add(&posts_refused, 1);
    free(p);
    atomic_fetch_add(&frees, 1);
}

typedef struct poster {
    int id, nsessions, posts;
    pthread_t th;
} poster;

static void *poster_main(void *arg)
{
    poster *p = arg;
    for (int i = 1; i <= p->posts; i++) {
        cp_session *s = atomic_load(&sessions[i % p->nsessions]);
        post_counted(s, p->id, i);
        if (i % 64 == 0)
            cpt_sleep_us(100); /* a sleep: paces the posts */
    }
    return NULL;
}

/* Four threads post to eight sessions on two workers while the sessions'
 * clients keep their receive callbacks busy. */
Test(session_work, posts_from_other_threads_run_on_the_owner_between_callbacks, .timeout = 60)
{
    enum { N = 8, POSTS = 2000 };
    start_env(2, 0, NULL);
    int fds[N];
    connect_clients(fds, N);
    poster p[NHAMMER];
    for (int i = 0; i < NHAMMER; i++) {
        p[i] = (poster){ .id = i, .nsessions = N, .posts = POSTS };
        pthread_create(&p[i].th, NULL, poster_main, &p[i]);
    }
    uint8_t body[16];
    cpt_fill(body, sizeof body, 0, 1);
    for (int round = 0; round < 40; round++) {
        for (int i = 0; i < N; i++)
            cpt_xsend_packet(fds[i], 5, body, sizeof body);
        for (int i = 0; i < N; i++)
            cpt_xrecv_packet_eq(fds[i], 5, body, sizeof body);
    }
    for (int i = 0; i < NHAMMER; i++)
        pthread_join(p[i].th, NULL);
    cr_assert_eq(atomic_load(&posts_ok), NHAMMER * POSTS, "%d posts refused", atomic_load(&posts_refused));
    CPT_AWAIT(atomic_load(&post_runs) == NHAMMER * POSTS, 5000, "%d of %d posts ran", atomic_load(&post_runs),
              NHAMMER * POSTS);
    cr_expect_eq(atomic_load(&out_of_order), 0, "%d posts ran before an earlier one of the same thread",
                 atomic_load(&out_of_order));
    for (int i = 0; i < N; i++)
        cpt_close(fds[i]);
    cpt_env_stop(&E); /* overlaps, nesting, calls after on_disconnected */
    cr_expect_eq(atomic_load(&post_runs), NHAMMER * POSTS, "posts ran again");
    expect_clean();
}

/* Each packet a session receives makes its handler post to the next session,
 * which may live on the other worker. */
static int post_onward(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    int rc = cpt_on_packet(s, id, body, len);
    int n = 8;
    cp_session *next = atomic_load(&sessions[(index_of(s) + 1) % n]);
    post_counted(next, -1, 0);
    return rc;
}

Test(session_work, posts_from_other_sessions_callbacks_run_on_their_owner, .timeout = 60)
{
    enum { N = 8, PACKETS = 200 };
    start_env(2, 0, post_onward);
    int fds[N];
    connect_clients(fds, N);
    uint8_t body[8];
    cpt_fill(body, sizeof body, 0, 2);
    for (int round = 0; round < PACKETS; round++) {
        for (int i = 0; i < N; i++)
            cpt_xsend_packet(fds[i], 6, body, sizeof body);
        for (int i = 0; i < N; i++)
            cpt_xrecv_packet_eq(fds[i], 6, body, sizeof body);
    }
    cr_assert_eq(atomic_load(&posts_ok), N * PACKETS, "%d posts refused", atomic_load(&posts_refused));
    CPT_AWAIT(atomic_load(&post_runs) == N * PACKETS, 5000, "%d of %d posts ran", atomic_load(&post_runs),
              N * PACKETS);
    for (int i = 0; i < N; i++)
        cpt_close(fds[i]);
    cpt_env_stop(&E);
    expect_clean();
}

/* ------------------------------------------------------------------ the disconnect settles what is on its way */

static void seen_post(cp_session *s, void *arg)
{
    work_enter(s);
    sstate *st = arg;
    atomic_fetch_add(&st->post_ran, 1);
    atomic_store(&st->post_saw_connected, cp_session_connected(s));
    cpt_leave(s);
}

static void never_fires(cp_session *s, void *arg)
{
    work_enter(s);
    atomic_fetch_add(&((sstate *)arg)->fired, 1);
    cpt_leave(s);
}

/* The handler posts and starts a timer, then refuses the packet: the session
 * closes right after, before the worker has even sent the two messages
 * (they wait in its outbox until the end of the round). */
static int post_then_refuse(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    cpt_on_packet(s, id, body, len);
    sstate *st = state_of(s);
    if (cp_session_post(s, seen_post, st) != 0)
        atomic_fetch_add(&bad_rc, 1);
    cp_session_timer *t = NULL;
    if (cp_session_timer_start(&t, s, 0, 0, never_fires, st) != 0)
        atomic_fetch_add(&bad_rc, 1);
    atomic_store(&st->handle, t);
    return -1;
}

static void check_settled(cp_session *s, sstate *st)
{
    (void)s;
    if (atomic_load(&st->post_ran) != 1)
        atomic_fetch_add(&failures, 1); /* the post on its way ran before on_disconnected */
    cp_session_timer *t = atomic_exchange(&st->handle, NULL);
    if (t && cp_session_timer_cancel(t) != -ENOENT)
        atomic_fetch_add(&failures, 1); /* the disconnect ended the timer */
}

Test(session_work, work_on_its_way_is_settled_before_on_disconnected, .timeout = 30)
{
    disconnected_hook = check_settled;
    start_env(1, 0, post_then_refuse);
    int fd;
    connect_clients(&fd, 1);
    cp_session *s = atomic_load(&sessions[0]);
    sstate *st = &states[0];
    cpt_xsend_packet(fd, 1, "x", 1);
    cpt_xclosed(fd, 3000);
    cpt_close(fd);
    CPT_AWAIT(atomic_load(&E.t->disconnected) == 1, 3000, "on_disconnected did not run");
    cr_expect_eq(atomic_load(&st->post_ran), 1, "the post ran %d times", atomic_load(&st->post_ran));
    cr_expect_eq(atomic_load(&st->post_saw_connected), 0, "the post ran before the disconnect began");
    cpt_sleep_ms(50); /* a sleep: a late firing would show in this window; the gone session takes no probe */
    cr_expect_eq(atomic_load(&st->fired), 0, "a timer started before the disconnect fired after it");
    /* After on_disconnected: refused, and nothing handed over. */
    cr_expect_eq(cp_session_post(s, refused_post, NULL), -ENOTCONN);
    cp_session_timer *t = (cp_session_timer *)&t;
    cr_expect_eq(cp_session_timer_start(&t, s, 10, 10, refused_post, NULL), -ENOTCONN);
    cr_expect(t == NULL, "a failed start left a handle");
    cr_expect_eq(atomic_load(&E.t->reasons[CP_REASON_HANDLER]), 1);
    cpt_env_stop(&E);
    expect_clean();
}

Test(session_work, bad_arguments_are_einval, .timeout = 30)
{
    start_env(1, 0, NULL);
    int fd;
    connect_clients(&fd, 1);
    cp_session *s = atomic_load(&sessions[0]);
    cr_expect_eq(cp_session_post(NULL, refused_post, NULL), -EINVAL);
    cr_expect_eq(cp_session_post(s, NULL, NULL), -EINVAL);
    cp_session_timer *t = (cp_session_timer *)&t;
    cr_expect_eq(cp_session_timer_start(&t, NULL, 0, 0, refused_post, NULL), -EINVAL);
    cr_expect(t == NULL, "a failed start left a handle");
    cr_expect_eq(cp_session_timer_start(&t, s, 0, 0, NULL, NULL), -EINVAL);
    cr_expect(t == NULL, "a failed start left a handle");
    cr_expect_eq(cp_session_timer_cancel(NULL), -EINVAL);
    cpt_close(fd);
    cpt_env_stop(&E);
    expect_clean();
}

/* ------------------------------------------------------------------ timers */

static void tick(cp_session *s, void *arg)
{
    work_enter(s);
    atomic_fetch_add(&((sstate *)arg)->ticks, 1);
    cpt_leave(s);
}

static void start_ticking(cp_session *s, sstate *st)
{
    atomic_store(&st->tid, cpt_thread_id());
    cp_session_timer *t = NULL;
    if (cp_session_timer_start(&t, s, 100, 100, tick, st) != 0)
        atomic_fetch_add(&bad_rc, 1);
    atomic_store(&st->handle, t);
}

static void stop_ticking(cp_session *s, sstate *st)
{
    (void)s;
    atomic_store(&st->ticks_at_disc, atomic_load(&st->ticks));
    cp_session_timer *t = atomic_exchange(&st->handle, NULL);
    if (t && cp_session_timer_cancel(t) != -ENOENT)
        atomic_fetch_add(&failures, 1); /* the disconnect ended it already */
}

/* Counts the ticks of sessions 0..n-1 over a window of ms. A window in which
 * a worker was kept from running for more than half a period (waiting for a
 * CPU, or stopped by the hypervisor) says nothing about the timer: its ticks
 * were late because nothing ran. Such a window is measured again, at most
 * five times; a window that was not starved is judged as it is. */
static uint64_t count_ticks(int n, unsigned ms, int *ticks)
{
    uint64_t elapsed = 0;
    int before[2], tids[2];
    for (int i = 0; i < n; i++)
        tids[i] = atomic_load(&states[i].tid);
    for (int round = 0; round < 5; round++) {
        for (int i = 0; i < n; i++)
            before[i] = atomic_load(&states[i].ticks);
        uint64_t t0 = cpt_now_ms();
        uint64_t starved = cpt_sleep_watching(ms, tids, n); /* a sleep: the window the test counts in */
        elapsed = cpt_now_ms() - t0;
        for (int i = 0; i < n; i++)
            ticks[i] = atomic_load(&states[i].ticks) - before[i];
        if (starved < 50u * 1000000u)
            break;
        cr_log_info("a worker was kept from running for %llu ms of a %llu ms window; measuring again",
                    (unsigned long long)(starved / 1000000u), (unsigned long long)elapsed);
    }
    return elapsed;
}

/* A bot's 10 Hz tick: about ten a second, on the session's worker; it ends
 * with the session, and a cancel from another thread ends it too. */
Test(session_work, a_10hz_session_timer_ticks_until_the_disconnect, .timeout = 30)
{
    connected_hook = start_ticking;
    disconnected_hook = stop_ticking;
    start_env(2, 0, NULL);
    int fds[2];
    connect_clients(fds, 2);
    int ticks[2];
    uint64_t elapsed = count_ticks(2, 1000, ticks);
    for (int i = 0; i < 2; i++) {
        /* A tick may fall outside the window's edges; where the system does
         * not tell starvation (Windows), a short stall can cost another. */
        cr_expect(ticks[i] >= 7 && ticks[i] <= 12, "session %d ticked %d times in %llu ms at 10 Hz", i,
                  ticks[i], (unsigned long long)elapsed);
    }
    /* The first client's session disconnects: its timer stops with it; the
     * other session's goes on. */
    cpt_srec *first = cpt_track_by_peer(E.t, cpt_local_port(fds[0]));
    cr_assert_not_null(first);
    sstate *gone = &states[first - E.t->recs], *other = &states[1 - (first - E.t->recs)];
    int other_before = atomic_load(&other->ticks);
    cpt_close(fds[0]);
    CPT_AWAIT(atomic_load(&E.t->disconnected) == 1, 3000, "on_disconnected did not run");
    cpt_sleep_ms(300); /* a sleep: the window in which the gone timer must not tick and the other must */
    cr_expect_eq(atomic_load(&gone->ticks), atomic_load(&gone->ticks_at_disc),
                 "the timer ticked after on_disconnected");
    cr_expect_geq(atomic_load(&other->ticks), other_before + 2, "the other session's timer stopped too");
    /* The other timer, cancelled from this thread, stops too (a tick under
     * way may finish). */
    cp_session_timer *t = atomic_exchange(&other->handle, NULL);
    cr_assert_not_null(t);
    cr_expect_eq(cp_session_timer_cancel(t), 0);
    int at_cancel = atomic_load(&other->ticks);
    cpt_sleep_ms(300); /* a sleep: a tick after the cancel would show in this window */
    cr_expect(atomic_load(&other->ticks) <= at_cancel + 1, "the timer ticked on after its cancel");
    cpt_close(fds[1]);
    cpt_env_stop(&E);
    expect_clean();
}

/* One-shot cancelled on the worker; repeating timer that cancels itself from
 * its own function; one-shot that fired. */
static atomic_int self_cancel_runs;
static _Atomic(cp_session_timer *) self_cancel_handle, fired_handle;

static void cancel_it(cp_session *s, void *arg)
{
    work_enter(s);
    sstate *st = arg;
    cp_session_timer *t = atomic_exchange(&st->handle, NULL);
    if (!t || cp_session_timer_cancel(t) != 0)
        atomic_fetch_add(&failures, 1);
    cpt_leave(s);
}

static void cancel_self_on_third_run(cp_session *s, void *arg)
{
    (void)arg;
    work_enter(s);
    if (atomic_fetch_add(&self_cancel_runs, 1) == 2) {
        cp_session_timer *t = atomic_exchange(&self_cancel_handle, NULL);
        if (!t || cp_session_timer_cancel(t) != 0)
            atomic_fetch_add(&failures, 1);
    }
    cpt_leave(s);
}

static void fire_once(cp_session *s, void *arg)
{
    work_enter(s);
    atomic_fetch_add(&((sstate *)arg)->ticks, 1);
    cpt_leave(s);
}

static void start_three(cp_session *s, sstate *st)
{
    cp_session_timer *t = NULL;
    if (cp_session_timer_start(&t, s, 200, 0, never_fires, st) != 0)
        atomic_fetch_add(&bad_rc, 1);
    atomic_store(&st->handle, t);
    if (cp_session_post(s, cancel_it, st) != 0)
        atomic_fetch_add(&bad_rc, 1);
    if (cp_session_timer_start(&t, s, 0, 20, cancel_self_on_third_run, NULL) != 0)
        atomic_fetch_add(&bad_rc, 1);
    atomic_store(&self_cancel_handle, t);
    if (cp_session_timer_start(&t, s, 10, 0, fire_once, st) != 0)
        atomic_fetch_add(&bad_rc, 1);
    atomic_store(&fired_handle, t);
}

Test(session_work, cancels_on_the_worker_are_final, .timeout = 30)
{
    connected_hook = start_three;
    start_env(2, 0, NULL);
    int fd;
    connect_clients(&fd, 1);
    cpt_sleep_ms(400); /* a sleep: past the cancelled one-shot's 200 ms deadline, which must pass unfired */
    cr_expect_eq(atomic_load(&states[0].fired), 0, "a one-shot cancelled on its worker fired");
    cr_expect_eq(atomic_load(&self_cancel_runs), 3,
                 "a timer that cancelled itself on its third run ran %d times",
                 atomic_load(&self_cancel_runs));
    cr_expect_eq(atomic_load(&states[0].ticks), 1, "a one-shot fired %d times",
                 atomic_load(&states[0].ticks));
    cr_expect_eq(cp_session_timer_cancel(atomic_exchange(&fired_handle, NULL)), -ENOENT,
                 "cancelling a one-shot that fired");
    cpt_close(fd);
    cpt_env_stop(&E);
    expect_clean();
}

/* ------------------------------------------------------------------ races */

/* A timer arg belongs to its session's list from just before the start
 * until a one-shot's fire frees it or on_disconnected frees what is left.
 * The starter holds the list's lock across cp_session_timer_start, so that
 * on_disconnected (which takes it) sees every arg whose start returned 0 and
 * none whose start failed. Whatever the library got wrong shows up as a leak,
 * a double free or a use after free under AddressSanitizer, or as a function
 * run after on_disconnected. */
struct targ {
    int magic;
    targ *prev, *next;
    int idx;
};

static void targ_link(sstate *st, targ *a)
{
    a->prev = NULL;
    a->next = st->args;
    if (st->args)
        st->args->prev = a;
    st->args = a;
}

static void targ_unlink(sstate *st, targ *a)
{
    if (a->prev)
        a->prev->next = a->next;
    else
        st->args = a->next;
    if (a->next)
        a->next->prev = a->prev;
}

static void targ_free(targ *a)
{
    a->magic = 0;
    free(a);
    atomic_fetch_add(&frees, 1);
}

static void free_session_args(sstate *st)
{
    pthread_mutex_lock(&st->lock);
    st->closed = true;
    while (st->args) {
        targ *a = st->args;
        targ_unlink(st, a);
        targ_free(a);
    }
    pthread_mutex_unlock(&st->lock);
}

static void race_fire_once(cp_session *s, void *arg)
{
    work_enter(s);
    targ *a = arg;
    sstate *st = &states[a->idx];
    if (a->magic != ARG_MAGIC || a->idx != index_of(s))
        atomic_fetch_add(&failures, 1);
    pthread_mutex_lock(&st->lock);
    targ_unlink(st, a);
    pthread_mutex_unlock(&st->lock);
    targ_free(a);
    atomic_fetch_add(&timer_runs, 1);
    cpt_leave(s);
}

static void race_tick(cp_session *s, void *arg)
{
    work_enter(s);
    targ *a = arg;
    if (a->magic != ARG_MAGIC || a->idx != index_of(s))
        atomic_fetch_add(&failures, 1);
    atomic_fetch_add(&timer_runs, 1);
    cpt_leave(s);
}

/* Starts a timer with a fresh arg; returns the handle when asked for one. */
static cp_session_timer *race_start_timer(cp_session *s, uint32_t delay, uint32_t repeat, bool want_handle)
{
    int idx = index_of(s);
    sstate *st = &states[idx];
    targ *a = calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->magic = ARG_MAGIC;
    a->idx = idx;
    atomic_fetch_add(&allocs, 1);
    cp_session_timer *t = NULL;
    pthread_mutex_lock(&st->lock);
    if (st->closed) {
        pthread_mutex_unlock(&st->lock);
        targ_free(a);
        return NULL;
    }
    targ_link(st, a);
    int rc = cp_session_timer_start(want_handle ? &t : NULL, s, delay, repeat,
                                    repeat ? race_tick : race_fire_once, a);
    if (rc != 0) {
        if (rc != -ENOTCONN)
            atomic_fetch_add(&bad_rc, 1);
        targ_unlink(st, a);
        targ_free(a);
    }
    pthread_mutex_unlock(&st->lock);
    return t;
}

typedef struct hammer {
    int id;
    uint32_t rnd;
    atomic_int *stop;
    pthread_t th;
} hammer;

static uint32_t next_rnd(uint32_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 17;
    *x ^= *x << 5;
    return *x;
}

static void hammer_once(hammer *h, cp_session *s, int seq)
{
    uint32_t r = next_rnd(&h->rnd);
    switch (r % 16) {
    case 0:
    case 1:
    case 2:
    case 3:
    case 4:
    case 5:
    case 6:
    case 7: post_counted(s, h->id, seq); break;
    case 8:
    case 9:
    case 10: race_start_timer(s, (r >> 8) % 20, 0, false); break;
    case 11:
    case 12: race_start_timer(s, (r >> 8) % 10, 1 + (r >> 16) % 10, false); break;
    case 13:
    case 14: {
        cp_session_timer *t = race_start_timer(s, (r >> 8) % 5, (r >> 12) % 2 ? 1 + (r >> 16) % 5 : 0, true);
        if (t) {
            if ((r >> 20) % 2)
                cpt_sleep_us((r >> 21) % 2000); /* a sleep: the cancel comes at a random moment */
            int rc = cp_session_timer_cancel(t);
            if (rc != 0 && rc != -ENOENT)
                atomic_fetch_add(&bad_rc, 1);
        }
        break;
    }
    default:
        if ((r >> 8) % 8 == 0) {
            int rc = cp_session_disconnect(s);
            if (rc != 0 && rc != -ENOTCONN)
                atomic_fetch_add(&bad_rc, 1);
        }
        break;
    }
}

static void *hammer_main(void *arg)
{
    hammer *h = arg;
    int seq = 0;
    while (!atomic_load(h->stop)) {
        int n = atomic_load(&E.t->nrec);
        if (n > CAP)
            n = CAP;
        cp_session *s = n ? atomic_load(&sessions[next_rnd(&h->rnd) % (uint32_t)n]) : NULL;
        if (!s) {
            cpt_sleep_us(200); /* a poll: no session to hammer yet */
            continue;
        }
        hammer_once(h, s, ++seq);
        if (seq % 8 == 0)
            cpt_sleep_us(50); /* a sleep: paces the hammering */
    }
    return NULL;
}

/* Four threads post, start timers (one-shot, repeating, with handles they
 * cancel), and disconnect, on sessions picked at random, while clients come
 * and go; two workers. Every arg is freed exactly once, by the function that
 * ran for it, by the thread whose call failed, or in on_disconnected. */
Test(session_work, posts_and_timer_starts_racing_disconnects_free_every_arg_once, .timeout = 120)
{
    enum { LIVE = 8, RUN_MS = 1500 };
    start_env(2, CPT_NO_ECHO, NULL);
    atomic_int stop = 0;
    hammer h[NHAMMER];
    for (int i = 0; i < NHAMMER; i++) {
        h[i] = (hammer){ .id = i, .rnd = 0x9e3779b9u * (uint32_t)(i + 1), .stop = &stop };
        pthread_create(&h[i].th, NULL, hammer_main, &h[i]);
    }
    int fds[LIVE];
    int open = 0, opened = 0;
    uint32_t rnd = 12345;
    uint64_t end = cpt_now_ms() + RUN_MS;
    while (cpt_now_ms() < end && opened < CAP - 2 * LIVE) {
        if (open < LIVE) {
            int fd = cpt_connect(CPT_HOST4, E.sport, 0);
            cr_assert_geq(fd, 0, "connect: %s", cp_strerror(fd));
            fds[open++] = fd;
            opened++;
        } else {
            int i = (int)(next_rnd(&rnd) % LIVE);
            if (next_rnd(&rnd) % 2)
                cpt_close_reset(fds[i]);
            else
                cpt_close(fds[i]);
            fds[i] = fds[--open];
        }
        cpt_sleep_ms(2 + next_rnd(&rnd) % 4); /* a sleep: the clients come and go at random moments */
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < NHAMMER; i++)
        pthread_join(h[i].th, NULL);
    for (int i = 0; i < open; i++)
        cpt_close(fds[i]);
    CPT_AWAIT(atomic_load(&E.t->connected) == opened && atomic_load(&E.t->disconnected) == opened, 10000,
              "%d sessions opened, %d connected, %d disconnected", opened, atomic_load(&E.t->connected),
              atomic_load(&E.t->disconnected));
    cr_log_info("%d sessions; posts: %d ran, %d refused; %d timer runs", opened, atomic_load(&posts_ok),
                atomic_load(&posts_refused), atomic_load(&timer_runs));
    cr_expect_geq(opened, 50, "only %d sessions came and went", opened);
    cr_expect(atomic_load(&posts_ok) > 1000, "only %d posts were accepted", atomic_load(&posts_ok));
    cr_expect(atomic_load(&posts_refused) > 0, "no post met a disconnecting session");
    cr_expect(atomic_load(&timer_runs) > 100, "only %d timer runs", atomic_load(&timer_runs));
    cpt_env_stop(&E); /* no callback or function after on_disconnected; LeakSanitizer */
    cr_expect_eq(atomic_load(&post_runs), atomic_load(&posts_ok), "%d posts accepted, %d ran",
                 atomic_load(&posts_ok), atomic_load(&post_runs));
    cr_expect_eq(atomic_load(&out_of_order), 0, "%d posts ran before an earlier one of the same thread",
                 atomic_load(&out_of_order));
    expect_clean();
}
