/* SPDX-License-Identifier: MIT */
/* Timers: firing on time, cancellation, repeating, delivery to job queues. */
#include "helpers.h"
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>

#define NTIMERS 10000
/* run_half_cancelled's timeline: the timers are due from DUE_MS on, and the
 * test arms all and cancels half within CANCEL_BY_MS, before any is due.
 * Under ThreadSanitizer arming and cancelling 15,000 timers takes several
 * times longer (each call is instrumented), often past 250 ms on a loaded
 * machine, so the whole timeline is ten times longer there: the same
 * sequence, the same checks, on a longer clock. */
#define TIME_SCALE (CPT_TSAN ? 10 : 1)
#define DUE_MS (300 * TIME_SCALE)
#define CANCEL_BY_MS (250 * TIME_SCALE)

/* The number of timers in the heaps of port's workers, read on each worker. */
typedef struct heap_probe {
    atomic_int total;
    atomic_int answered;
} heap_probe;

static void probe_heap(cp_worker *w, void *pp, void *unused, uintptr_t c)
{
    (void)unused, (void)c;
    heap_probe *p = pp;
    atomic_fetch_add(&p->total, (int)w->ntimers);
    atomic_fetch_add(&p->answered, 1);
}

static int armed_timers(cp_port *port)
{
    heap_probe p = { 0 };
    for (int i = 0; i < port->nworkers; i++)
        cp__send_msg(&port->workers[i], probe_heap, &p, NULL);
    CPT_AWAIT(atomic_load(&p.answered) == port->nworkers, 5000, "a worker did not answer");
    return atomic_load(&p.total);
}

/* Waits until no timer of port can call its function any more: every one
 * has left its worker's heap (fired for the last time, or unarmed), as seen
 * on the worker itself, so no firing is under way either; and with q, every
 * job a firing pushed onto q has run. Stands for "long enough that a late
 * call would have shown itself". */
static void xtimers_quiet(cp_port *port, cp_jobq *q)
{
    CPT_AWAIT(armed_timers(port) == 0, 5000, "a timer is still in its worker's heap");
    if (q)
        cpt_xjobq_drained(q);
}

typedef struct tctx {
    uint64_t due_ns; /* not before this */
    atomic_int fired;
    atomic_int early;
} tctx;

static void on_fire(void *arg)
{
    tctx *c = arg;
    if (cpt_now_ns() < c->due_ns)
        atomic_fetch_add(&c->early, 1);
    atomic_fetch_add(&c->fired, 1);
}

static void run_half_cancelled(bool via_jobq)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(0);
    cp_jobq *q = NULL;
    if (via_jobq)
        cr_assert_eq(cp_jobq_create(&q, port), 0);
    tctx *c = calloc(NTIMERS, sizeof *c);
    cp_timer **t = calloc(NTIMERS, sizeof *t);
    uint64_t start = cpt_now_ns();
    for (int i = 0; i < NTIMERS; i++) {
        uint64_t delay = DUE_MS + (uint64_t)(i % 200); /* 300..499 ms (unscaled) */
        c[i].due_ns = start + delay * 1000000u;
        cr_assert_eq(cp_timer_start(&t[i], port, delay, 0, on_fire, &c[i], q), 0);
    }
    /* Cancel every odd timer well before any is due. On a loaded machine
     * arming and cancelling can take long; the time is checked first, so that
     * such a run says so instead of blaming cancel. */
    int refused = 0, first_refused = -1;
    for (int i = 1; i < NTIMERS; i += 2) {
        if (cp_timer_cancel(t[i]) != 0 && refused++ == 0)
            first_refused = i;
    }
    cr_assert_lt(cpt_now_ns() - start, CANCEL_BY_MS * 1000000ull,
                 "arming and cancelling took too long to test");
    cr_assert_eq(refused, 0, "%d timers could not be cancelled (the first: %d)", refused, first_refused);
    /* The last timer was due at 499 ms: once every heap is empty and the
     * queue has run what they pushed, every call there will be has run. */
    xtimers_quiet(port, q);
    int fired = 0, wrong = 0, early = 0;
    for (int i = 0; i < NTIMERS; i++) {
        int f = atomic_load(&c[i].fired);
        fired += f;
        early += atomic_load(&c[i].early);
        if (f != (i % 2 == 0 ? 1 : 0))
            wrong++;
    }
    cr_expect_eq(fired, NTIMERS / 2, "%d timers fired", fired);
    cr_expect_eq(wrong, 0, "%d timers fired the wrong number of times", wrong);
    cr_expect_eq(early, 0, "%d timers fired before their time", early);
    /* A one-shot that fired: cancel says so and releases the handle. */
    for (int i = 0; i < NTIMERS; i += 2)
        cr_expect_eq(cp_timer_cancel(t[i]), -ENOENT);
    if (q) {
        cr_assert_eq(cp_jobq_close(q, NULL, NULL), 0);
        cr_assert_eq(cp_jobq_close_wait(q), 0);
    }
    cp_jobq_unref(q);
    cpt_xport_destroy(port);
    free(c);
    free(t);
    cpt_leak_end(&m);
}

Test(timer, ten_thousand_armed_half_cancelled_exactly_the_rest_fire_on_time, .timeout = 30)
{
    run_half_cancelled(false);
}

Test(timer, delivered_through_a_job_queue_cancelled_ones_never_run, .timeout = 30)
{
    run_half_cancelled(true);
}

typedef struct rep_ctx {
    atomic_int ticks;
    atomic_int after_cancel;
    atomic_int cancelled;
    atomic_int tid; /* the worker's thread id, for its run-queue wait */
} rep_ctx;

static void on_tick(void *arg)
{
    rep_ctx *c = arg;
    atomic_store(&c->tid, cpt_thread_id());
    if (atomic_load(&c->cancelled))
        atomic_fetch_add(&c->after_cancel, 1);
    atomic_fetch_add(&c->ticks, 1);
}

Test(timer, repeating_timer_ticks_until_cancelled_then_never_again, .timeout = 30)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(0);
    rep_ctx c = { 0 };
    cp_timer *t;
    cr_assert_eq(cp_timer_start(&t, port, 10, 10, on_tick, &c, NULL), 0);
    CPT_AWAIT(atomic_load(&c.ticks) > 0, 5000, "the timer never ticked");
    /* A window in which the worker was kept from running for more than half
     * a period is measured again (at most five times): its ticks were late
     * because nothing ran. */
    int ticks = 0, tid = atomic_load(&c.tid);
    for (int round = 0; round < 5; round++) {
        int before = atomic_load(&c.ticks);
        uint64_t starved = cpt_sleep_watching(200, &tid, 1); /* a sleep: the window the test counts in */
        ticks = atomic_load(&c.ticks) - before;
        if (starved < 5u * 1000000u)
            break;
        cr_log_info("the worker was kept from running for %llu us of 200 ms; measuring again",
                    (unsigned long long)(starved / 1000u));
    }
    cr_expect(ticks >= 15 && ticks <= 21, "%d ticks in 200 ms at 10 ms", ticks);
    cr_assert_eq(cp_timer_cancel(t), 0);
    atomic_store(&c.cancelled, 1);
    /* Cancel returns after a tick in progress ended; none may start after.
     * Once the timer has left its worker's heap, none can. */
    int settled = atomic_load(&c.ticks);
    xtimers_quiet(port, NULL);
    cr_expect_eq(atomic_load(&c.ticks), settled, "the timer ticked after it was cancelled");
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

Test(timer, timers_left_armed_are_freed_with_the_port, .timeout = 30)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(0);
    tctx c = { 0 };
    for (int i = 0; i < 100; i++)
        cr_assert_eq(cp_timer_start(NULL, port, 60000, 0, on_fire, &c, NULL), 0);
    CPT_AWAIT(armed_timers(port) == 100, 5000, "the timers did not reach their workers' heaps");
    cpt_xport_destroy(port);
    cr_expect_eq(atomic_load(&c.fired), 0);
    cpt_leak_end(&m);
}

Test(timer, bad_arguments_are_refused, .timeout = 10)
{
    cp_port *port = cpt_xport(1);
    cp_timer *t;
    cr_expect_eq(cp_timer_start(&t, NULL, 1, 0, on_fire, NULL, NULL), -EINVAL);
    cr_expect_eq(cp_timer_start(&t, port, 1, 0, NULL, NULL, NULL), -EINVAL);
    cr_expect_eq(cp_timer_cancel(NULL), -EINVAL);
    cpt_xport_destroy(port);
}

/* ------------------------------------------------------------------ cancel waits for a running call */

typedef struct slow_ctx {
    atomic_int inside; /* calls in progress */
    atomic_int calls;  /* calls started */
    unsigned sleep_ms;
} slow_ctx;

static void slow_cb(void *arg)
{
    slow_ctx *c = arg;
    atomic_fetch_add(&c->inside, 1);
    atomic_fetch_add(&c->calls, 1);
    cpt_sleep_ms(c->sleep_ms); /* a sleep: the call must last for a cancel to meet it running */
    atomic_fetch_sub(&c->inside, 1);
}

/* Cancel from the test thread while (or just before) the callback runs:
 * when cancel returns no call may be in progress, and none may start later,
 * so the context can be freed at once (AddressSanitizer would see a late
 * call touch freed memory). Half the rounds cancel once a call is under way,
 * the others at varying moments around the first deadline. */
static void cancel_while_running(bool via_jobq, uint64_t repeat_ms)
{
    enum { ROUNDS = 60 };
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(2);
    cp_jobq *q = NULL;
    if (via_jobq)
        cr_assert_eq(cp_jobq_create(&q, port), 0);
    int caught_running = 0;
    for (int i = 0; i < ROUNDS; i++) {
        slow_ctx *c = calloc(1, sizeof *c);
        c->sleep_ms = 5;
        cp_timer *t;
        cr_assert_eq(cp_timer_start(&t, port, 1, repeat_ms, slow_cb, c, q), 0);
        if (i % 2 == 0)
            CPT_AWAIT(atomic_load(&c->calls) > 0, 2000, "round %d: the timer never fired", i);
        else
            cpt_sleep_us((unsigned)(i * 97 % 3000)); /* a sleep: the moment of the cancel varies */
        if (atomic_load(&c->inside))
            caught_running++;
        int r = cp_timer_cancel(t);
        cr_assert(r == 0 || (r == -ENOENT && !repeat_ms), "round %d: cancel returned %d", i, r);
        cr_assert_eq(atomic_load(&c->inside), 0, "round %d: cancel returned while the callback ran", i);
        int calls = atomic_load(&c->calls);
        xtimers_quiet(port, q);
        cr_assert_eq(atomic_load(&c->calls), calls, "round %d: a call started after cancel returned", i);
        free(c);
    }
    /* The test means something only if cancels met running calls. */
    cr_expect(caught_running > ROUNDS / 4, "only %d of %d cancels met a running call", caught_running,
              ROUNDS);
    if (q) {
        cr_assert_eq(cp_jobq_close(q, NULL, NULL), 0);
        cr_assert_eq(cp_jobq_close_wait(q), 0);
        cp_jobq_unref(q);
    }
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

Test(timer, cancel_returns_after_a_running_one_shot_call_finished, .timeout = 30)
{
    cancel_while_running(false, 0);
}

Test(timer, cancel_returns_after_a_running_repeating_call_finished, .timeout = 30)
{
    cancel_while_running(false, 1);
}

Test(timer, cancel_returns_after_a_running_job_queue_call_finished, .timeout = 30)
{
    cancel_while_running(true, 0);
}

Test(timer, cancel_returns_after_a_running_repeating_job_queue_call_finished, .timeout = 30)
{
    cancel_while_running(true, 1);
}

typedef struct gate {
    atomic_int open;
    atomic_int entered;
} gate;

static void gate_job(void *arg)
{
    gate *g = arg;
    atomic_store(&g->entered, 1);
    while (!atomic_load(&g->open))
        cpt_sleep_ms(1);
}

/* A one-shot that fired into its job queue while the queue was busy: its job
 * is queued but has not started. Cancelling it then still stops the call
 * (0: it will not fire), so its argument can be freed. */
Test(timer, cancel_skips_a_one_shot_job_already_queued, .timeout = 30)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(2);
    cp_jobq *q;
    cr_assert_eq(cp_jobq_create(&q, port), 0);
    gate g = { 0 };
    cr_assert_eq(cp_jobq_push(q, gate_job, &g), 0);
    CPT_AWAIT(atomic_load(&g.entered), 2000, "the gate job did not start");
    slow_ctx c = { .sleep_ms = 0 };
    cp_timer *t;
    cr_assert_eq(cp_timer_start(&t, port, 1, 0, slow_cb, &c, q), 0);
    /* A sleep: the gate holds a worker, which answers no probe of its heap,
     * and a queued job shows nowhere else; the timer fired long ago. */
    cpt_sleep_ms(50);
    cr_assert_eq(cp_timer_cancel(t), 0, "a timer whose job had not started could not be cancelled");
    atomic_store(&g.open, 1);
    cr_assert_eq(cp_jobq_close(q, NULL, NULL), 0);
    cr_assert_eq(cp_jobq_close_wait(q), 0); /* the timer's job has had its turn */
    cr_assert_eq(atomic_load(&c.calls), 0, "the cancelled timer's queued job ran");
    cp_jobq_unref(q);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

typedef struct self_ctx {
    _Atomic(cp_timer *) t;
    atomic_int ticks;
    atomic_int cancel_rc;
    atomic_int cancelled;
} self_ctx;

static void self_cancel_cb(void *arg)
{
    self_ctx *c = arg;
    cp_timer *t = atomic_load(&c->t);
    if (atomic_fetch_add(&c->ticks, 1) + 1 == 3 && t) {
        atomic_store(&c->cancel_rc, cp_timer_cancel(t));
        atomic_store(&c->cancelled, 1);
    }
}

/* A repeating timer cancels itself from its third call: the cancel does not
 * wait for the call it is made from, and no call follows. */
static void cancel_from_own_callback(bool via_jobq)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(2);
    cp_jobq *q = NULL;
    if (via_jobq)
        cr_assert_eq(cp_jobq_create(&q, port), 0);
    self_ctx c = { .cancel_rc = 1 };
    cp_timer *t;
    cr_assert_eq(cp_timer_start(&t, port, 20, 5, self_cancel_cb, &c, q), 0);
    atomic_store(&c.t, t);
    CPT_AWAIT(atomic_load(&c.cancelled), 5000, "the callback's own cancel never returned (%d ticks)",
              atomic_load(&c.ticks));
    cr_assert_eq(atomic_load(&c.cancel_rc), 0);
    xtimers_quiet(port, q);
    cr_assert_eq(atomic_load(&c.ticks), 3, "%d calls; the timer went on after cancelling itself",
                 atomic_load(&c.ticks));
    if (q) {
        cr_assert_eq(cp_jobq_close(q, NULL, NULL), 0);
        cr_assert_eq(cp_jobq_close_wait(q), 0);
        cp_jobq_unref(q);
    }
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

Test(timer, cancel_from_its_own_callback_does_not_wait_for_itself, .timeout = 30)
{
    cancel_from_own_callback(false);
}

Test(timer, cancel_from_its_own_job_queue_callback_does_not_wait_for_itself, .timeout = 30)
{
    cancel_from_own_callback(true);
}

/* ------------------------------------------------------------------ handles outliving the port */

typedef struct outlive_ctx {
    cp_port *port;
    cp_timer **t;
    int n;
    atomic_int next;            /* the canceller's cursor */
    atomic_int bad;             /* cancels that answered neither 0 nor -ENOENT */
    atomic_int fired_cancelled; /* -ENOENT for a timer that never fired */
    atomic_int *fired;          /* per timer */
} outlive_ctx;

static void outlive_fire(void *arg) { atomic_fetch_add((atomic_int *)arg, 1); }

static void give_back(outlive_ctx *c, int i)
{
    int r = cp_timer_cancel(c->t[i]);
    if (r != 0 && r != -ENOENT)
        atomic_fetch_add(&c->bad, 1);
    if (r == -ENOENT && atomic_load(&c->fired[i]) == 0)
        atomic_fetch_add(&c->fired_cancelled, 1);
}

/* Every timer due at once (a quarter, called on a worker) has fired. */
static bool quarter_fired(outlive_ctx *c)
{
    for (int i = 0; i < c->n; i += 4)
        if (!atomic_load(&c->fired[i]))
            return false;
    return true;
}

static void *outlive_canceller(void *arg)
{
    outlive_ctx *c = arg;
    for (int i; (i = atomic_fetch_add(&c->next, 1)) < c->n;) {
        give_back(c, i);
        cpt_sleep_us(20); /* a sleep: the cancels are spread over the destroy */
    }
    return NULL;
}

/* Timers still armed when their port is destroyed (one-shot and repeating,
 * direct and through a job queue), mixed with one-shots that fired: every
 * handle can be given back after cp_port_destroy, and also while it runs,
 * from another thread; an armed timer's cancel answers 0 (it never fired)
 * and nothing leaks once every handle is back. Cancel used to send to the
 * freed worker. */
Test(timer, handles_given_back_after_port_destroy_are_safe_and_leak_nothing, .timeout = 60)
{
    enum { N = 64 };
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    for (int round = 0; round < 20; round++) {
        outlive_ctx c = { .n = N };
        c.port = cpt_xport(2 + round % 3);
        c.t = calloc(N, sizeof *c.t);
        c.fired = calloc(N, sizeof *c.fired);
        cp_jobq *q;
        cr_assert_eq(cp_jobq_create(&q, c.port), 0);
        for (int i = 0; i < N; i++) {
            /* A quarter fire at once, the rest are still armed at the destroy. */
            uint64_t delay = i % 4 == 0 ? 0 : 60000, repeat = i % 3 == 1 ? 60000 : 0;
            cr_assert_eq(cp_timer_start(&c.t[i], c.port, delay, repeat, outlive_fire, &c.fired[i],
                                        i % 2 ? q : NULL),
                         0);
        }
        cp_jobq_unref(q);
        CPT_AWAIT(quarter_fired(&c), 5000, "round %d: the timers due at once did not fire", round);
        /* Odd rounds give the handles back while the destroy runs. */
        pthread_t th;
        if (round % 2)
            cr_assert_eq(pthread_create(&th, NULL, outlive_canceller, &c), 0);
        cpt_xport_destroy(c.port);
        if (round % 2)
            pthread_join(th, NULL);
        else
            outlive_canceller(&c);
        cr_assert_eq(atomic_load(&c.bad), 0, "round %d: a cancel failed", round);
        cr_assert_eq(atomic_load(&c.fired_cancelled), 0,
                     "round %d: %d timers that never fired answered -ENOENT", round,
                     atomic_load(&c.fired_cancelled));
        for (int i = 0; i < N; i++)
            cr_assert_eq(atomic_load(&c.fired[i]), i % 4 == 0 ? 1 : 0, "round %d: timer %d fired %d times",
                         round, i, atomic_load(&c.fired[i]));
        free(c.t);
        free(c.fired);
    }
    cpt_leak_end(&m);
}

/* ------------------------------------------------------------------ timers of a closed job queue */

/* A job queue's close ends the timers delivered through it: a one-shot that
 * fires after the close never calls its function, and cancel says 0 (it
 * never fired), not -ENOENT; a repeating one stops (it leaves its worker's
 * heap at its next tick) instead of firing into the closed queue forever.
 * A timer can no longer be started on a closed queue. */
Test(timer, a_closed_job_queue_ends_its_timers_and_cancel_tells_the_truth, .timeout = 30)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(2);
    /* The one-shot must come due after the close. It is started just before
     * it, 100 ms ahead; a machine so loaded that the close took longer tells
     * nothing, and the round is run again (the one-shot then ran before the
     * close, legitimately). */
    for (int attempt = 0;; attempt++) {
        cr_assert_lt(attempt, 5, "the queue's close never came within 100 ms of the one-shot's start");
        cp_jobq *q;
        cr_assert_eq(cp_jobq_create(&q, port), 0);
        atomic_int once = 0, ticks = 0;
        cp_timer *one, *rep;
        cr_assert_eq(cp_timer_start(&rep, port, 2, 2, outlive_fire, &ticks, q), 0);
        CPT_AWAIT(atomic_load(&ticks) >= 3, 5000, "the repeating timer did not tick");
        uint64_t t0 = cpt_now_ms();
        cr_assert_eq(cp_timer_start(&one, port, 100, 0, outlive_fire, &once, q), 0);
        cr_assert_eq(cp_jobq_close_wait(q), 0);
        bool in_time = cpt_now_ms() - t0 < 100;
        int settled = atomic_load(&ticks);
        /* Both fire into the closed queue (the one-shot at 100 ms) and end. */
        CPT_AWAIT(armed_timers(port) == 0, 5000, "a timer of the closed queue is still armed");
        if (!in_time) {
            cp_timer_cancel(one);
            cp_timer_cancel(rep);
            cp_jobq_unref(q);
            continue;
        }
        cr_assert_eq(atomic_load(&once), 0, "the one-shot ran after its queue closed");
        cr_assert_eq(atomic_load(&ticks), settled, "the repeating timer ran after its queue closed");
        cr_assert_eq(cp_timer_cancel(one), 0, "a one-shot that never fired answered that it had");
        cr_assert_eq(cp_timer_cancel(rep), 0);
        cp_timer *late_start = NULL;
        cr_assert_eq(cp_timer_start(&late_start, port, 1, 0, outlive_fire, &once, q), -ESHUTDOWN);
        cr_assert_null(late_start);
        cp_jobq_unref(q);
        break;
    }
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

/* The same as a race: many one-shots due around the moment their queue
 * closes (2 to 4 workers). Each either ran, and cancel answers -ENOENT, or
 * did not, and cancel answers 0. Cancel used to answer -ENOENT for a few
 * whose job the closed queue had refused. */
Test(timer, one_shots_racing_their_queues_close_cancel_tells_the_truth, .timeout = 60)
{
    enum { N = 400, ROUNDS = 8 };
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    int lies = 0, ran_total = 0, refused_total = 0;
    for (int round = 0; round < ROUNDS; round++) {
        cp_port *port = cpt_xport(2 + round % 3);
        cp_jobq *q;
        cr_assert_eq(cp_jobq_create(&q, port), 0);
        atomic_int *fired = calloc(N, sizeof *fired);
        cp_timer **t = calloc(N, sizeof *t);
        for (int i = 0; i < N; i++)
            cr_assert_eq(cp_timer_start(&t[i], port, (uint64_t)(i % 20), 0, outlive_fire, &fired[i], q), 0);
        cpt_sleep_ms(10); /* a sleep: the close lands amid the timers' deadlines */
        cr_assert_eq(cp_jobq_close_wait(q), 0);
        /* Every timer has fired (its job ran, or the closed queue refused it). */
        CPT_AWAIT(armed_timers(port) == 0, 5000, "round %d: a timer is still armed", round);
        for (int i = 0; i < N; i++) {
            int r = cp_timer_cancel(t[i]);
            int f = atomic_load(&fired[i]);
            cr_assert(f <= 1);
            if ((r == -ENOENT) != (f == 1))
                lies++;
            ran_total += f;
            refused_total += !f;
        }
        cp_jobq_unref(q);
        cpt_xport_destroy(port);
        free(fired);
        free(t);
    }
    cr_assert_eq(lies, 0, "cancel's answer disagreed with whether the timer ran for %d of %d timers", lies,
                 N * ROUNDS);
    cr_expect(ran_total > 0 && refused_total > 0, "the close met no timer (%d ran, %d did not)", ran_total,
              refused_total);
    cpt_leak_end(&m);
}
