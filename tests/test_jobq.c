/* SPDX-License-Identifier: MIT */
/* Job queues: order, exclusion, fairness, closing. */
#include "helpers.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>

#define PUSHERS 4
#define PER_PUSHER 25000

typedef struct order_ctx {
    atomic_int running; /* jobs of the queue running right now */
    atomic_int overlaps;
    atomic_long ran;
    long last[PUSHERS]; /* written only by jobs, which never overlap */
    atomic_int out_of_order;
    cp_jobq *q;
} order_ctx;

typedef struct order_job {
    order_ctx *c;
    int thread;
    long seq;
} order_job;

static void order_run(void *arg)
{
    order_job *j = arg;
    order_ctx *c = j->c;
    if (atomic_fetch_add(&c->running, 1) != 0)
        atomic_fetch_add(&c->overlaps, 1);
    if (cp_jobq_current() != c->q)
        atomic_fetch_add(&c->overlaps, 1);
    if (j->seq != c->last[j->thread] + 1)
        atomic_fetch_add(&c->out_of_order, 1);
    c->last[j->thread] = j->seq;
    atomic_fetch_sub(&c->running, 1);
    atomic_fetch_add(&c->ran, 1);
    free(j);
}

static void count_up(void *arg) { atomic_fetch_add((atomic_int *)arg, 1); }

typedef struct pusher {
    order_ctx *c;
    int index;
} pusher;

static void *push_thread(void *arg)
{
    pusher *p = arg;
    for (long i = 1; i <= PER_PUSHER; i++) {
        order_job *j = malloc(sizeof *j);
        *j = (order_job){ p->c, p->index, i };
        while (cp_jobq_push(p->c->q, order_run, j) == -ENOMEM)
            cpt_sleep_ms(1); /* a retry's pause: memory comes back as jobs run */
    }
    return NULL;
}

Test(jobq, pushes_from_four_threads_run_once_in_order_never_two_at_a_time, .timeout = 60)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(0);
    order_ctx c = { 0 };
    for (int i = 0; i < PUSHERS; i++)
        c.last[i] = 0;
    cr_assert_eq(cp_jobq_create(&c.q, port), 0);
    pthread_t th[PUSHERS];
    pusher p[PUSHERS];
    for (int i = 0; i < PUSHERS; i++) {
        p[i] = (pusher){ &c, i };
        pthread_create(&th[i], NULL, push_thread, &p[i]);
    }
    for (int i = 0; i < PUSHERS; i++)
        pthread_join(th[i], NULL);
    CPT_AWAIT(atomic_load(&c.ran) == PUSHERS * PER_PUSHER, 30000, "ran %ld of %d jobs", atomic_load(&c.ran),
              PUSHERS * PER_PUSHER);
    cr_expect_eq(atomic_load(&c.overlaps), 0, "jobs of one queue ran concurrently");
    cr_expect_eq(atomic_load(&c.out_of_order), 0, "a thread's jobs ran out of push order");
    for (int i = 0; i < PUSHERS; i++)
        cr_expect_eq(c.last[i], PER_PUSHER);
    atomic_int closed = 0;
    cr_assert_eq(cp_jobq_close(c.q, count_up, &closed), 0);
    CPT_AWAIT(atomic_load(&closed) == 1, 5000, "on_closed did not run");
    cp_jobq_unref(c.q);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

/* ------------------------------------------------------------------ fairness */

typedef struct spin_ctx {
    cp_jobq *q;
    atomic_int stop;
    atomic_long spins;
} spin_ctx;

/* A job that keeps its queue busy forever by pushing itself again. */
static void spin_job(void *arg)
{
    spin_ctx *c = arg;
    uint64_t until = cpt_now_ns() + 200000; /* 0.2 ms of work per job */
    while (cpt_now_ns() < until)
        ;
    atomic_fetch_add(&c->spins, 1);
    if (!atomic_load(&c->stop))
        cp_jobq_push(c->q, spin_job, c);
}

Test(jobq, a_busy_queue_does_not_starve_another, .timeout = 30)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    /* One worker: fairness must come from the time slice, not from a second
     * thread picking up the other queue. */
    cp_port *port = cpt_xport(1);
    spin_ctx busy = { 0 };
    cr_assert_eq(cp_jobq_create(&busy.q, port), 0);
    cp_jobq_push(busy.q, spin_job, &busy);
    CPT_AWAIT(atomic_load(&busy.spins) >= 20, 5000, "the busy queue did not start");
    cp_jobq *other;
    cr_assert_eq(cp_jobq_create(&other, port), 0);
    atomic_int ran = 0;
    uint64_t t0 = cpt_now_ms();
    cp_jobq_push(other, count_up, &ran);
    CPT_AWAIT(atomic_load(&ran) == 1, 2000, "a second queue never ran while the first stayed busy");
    cr_expect_lt(cpt_now_ms() - t0, 500, "the second queue waited %llu ms",
                 (unsigned long long)(cpt_now_ms() - t0));
    atomic_store(&busy.stop, 1);
    atomic_int closed = 0;
    cp_jobq_close(busy.q, count_up, &closed);
    cp_jobq_close(other, count_up, &closed);
    CPT_AWAIT(atomic_load(&closed) == 2, 5000, "queues did not close");
    cp_jobq_unref(busy.q);
    cp_jobq_unref(other);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

/* ------------------------------------------------------------------ closing */

typedef struct close_ctx {
    cp_jobq *q;
    atomic_int ran, after_close, closed;
    atomic_int close_seen;
    atomic_int accepted;
    atomic_int all_pushed;   /* the test thread finished pushing */
    atomic_int close_result; /* what the in-job close and push returned */
    int close_at;
} close_ctx;

static void counted_job(void *arg)
{
    close_ctx *c = arg;
    if (atomic_load(&c->closed))
        atomic_fetch_add(&c->after_close, 1);
    /* The first job holds the queue until every job is pushed, so the close
     * below cannot overtake a push of the test thread. */
    while (!atomic_load(&c->all_pushed))
        cpt_sleep_us(100);
    int n = atomic_fetch_add(&c->ran, 1) + 1;
    if (n == c->close_at) {
        int r = cp_jobq_close(c->q, NULL, NULL);
        /* Pushing after close is refused, also from inside the queue. */
        int p = cp_jobq_push(c->q, counted_job, c);
        atomic_store(&c->close_result, r == 0 && p == -ESHUTDOWN ? 1 : -1);
    }
}

Test(jobq, closing_from_inside_a_job_runs_the_earlier_jobs_and_nothing_after, .timeout = 30)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(0);
    close_ctx c = { .close_at = 500 };
    cr_assert_eq(cp_jobq_create(&c.q, port), 0);
    /* Pushed before the close: all 1000 run (the close marker queues behind them). */
    for (int i = 0; i < 1000; i++)
        cr_assert_eq(cp_jobq_push(c.q, counted_job, &c), 0);
    atomic_store(&c.all_pushed, 1);
    CPT_AWAIT(atomic_load(&c.ran) == 1000, 10000, "ran %d of 1000", atomic_load(&c.ran));
    /* Drained: nothing of the queue runs any more. */
    cr_assert_eq(cp_jobq_close_wait(c.q), 0);
    cr_expect_eq(atomic_load(&c.ran), 1000);
    cr_expect_eq(atomic_load(&c.close_result), 1, "close inside a job failed or a later push was accepted");
    cr_expect_eq(atomic_load(&c.after_close), 0);
    cp_jobq_unref(c.q);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

static void *close_pusher(void *arg)
{
    close_ctx *c = arg;
    /* Push until the close is seen (bounded, in case it never comes). */
    for (int i = 0; i < 5000000; i++) {
        int r = cp_jobq_push(c->q, counted_job, c);
        if (r == 0)
            atomic_fetch_add(&c->accepted, 1);
        if (r == -ESHUTDOWN) {
            atomic_fetch_add(&c->close_seen, 1);
            break;
        }
    }
    return NULL;
}

static void on_closed_under_load(void *arg) { atomic_store(&((close_ctx *)arg)->closed, 1); }

Test(jobq, closing_under_load_loses_no_accepted_job, .timeout = 30)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(0);
    close_ctx c = { .close_at = -1, .all_pushed = 1 };
    cr_assert_eq(cp_jobq_create(&c.q, port), 0);
    pthread_t th[3];
    for (int i = 0; i < 3; i++)
        pthread_create(&th[i], NULL, close_pusher, &c);
    cpt_sleep_ms(2); /* a sleep: the close lands amid the pushes */
    cr_assert_eq(cp_jobq_close(c.q, on_closed_under_load, &c), 0);
    for (int i = 0; i < 3; i++)
        pthread_join(th[i], NULL);
    CPT_AWAIT(atomic_load(&c.closed) == 1, 10000, "on_closed never ran");
    /* Every push that returned 0 ran before on_closed; nothing ran after. */
    cr_expect_eq(atomic_load(&c.ran), atomic_load(&c.accepted), "ran %d, accepted %d", atomic_load(&c.ran),
                 atomic_load(&c.accepted));
    cr_expect_eq(atomic_load(&c.close_seen), 3, "%d of 3 pushers saw the close", atomic_load(&c.close_seen));
    cr_expect_eq(atomic_load(&c.after_close), 0);
    cp_jobq_unref(c.q);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

/* ------------------------------------------------------------------ waiting for a closed queue to drain */

typedef struct drain_ctx {
    cp_jobq *q;
    atomic_int ran;
    atomic_int on_closed_done;
    atomic_int wait_rc; /* what cp_jobq_close_wait returned inside a job / post */
    atomic_int wait_done;
} drain_ctx;

static void slow_counted(void *arg)
{
    drain_ctx *c = arg;
    cpt_sleep_us(300); /* a sleep: a slow job, so the close waits for a queue */
    atomic_fetch_add(&c->ran, 1);
}

static void slow_on_closed(void *arg)
{
    drain_ctx *c = arg;
    cpt_sleep_ms(30); /* a sleep: a slow on_closed, which the waits must outlast */
    atomic_store(&c->on_closed_done, 1);
}

/* close_wait returns only once every job pushed before it has run. */
Test(jobq, close_wait_returns_after_every_pushed_job_ran, .timeout = 30)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(2);
    drain_ctx c = { 0 };
    cr_assert_eq(cp_jobq_create(&c.q, port), 0);
    for (int i = 0; i < 200; i++)
        cr_assert_eq(cp_jobq_push(c.q, slow_counted, &c), 0);
    cr_assert_eq(cp_jobq_close_wait(c.q), 0);
    cr_assert_eq(atomic_load(&c.ran), 200, "close_wait returned with %d of 200 jobs run",
                 atomic_load(&c.ran));
    cr_assert_eq(cp_jobq_push(c.q, slow_counted, &c), -ESHUTDOWN,
                 "the queue accepted a push after close_wait");
    /* Drained already: returns at once. */
    uint64_t t0 = cpt_now_ms();
    cr_assert_eq(cp_jobq_close_wait(c.q), 0);
    cr_assert_lt(cpt_now_ms() - t0, 1000);
    cp_jobq_unref(c.q);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

/* A queue closed earlier with an on_closed: close_wait waits for that
 * on_closed to return too. */
Test(jobq, close_wait_after_close_waits_for_on_closed, .timeout = 30)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(2);
    drain_ctx c = { 0 };
    cr_assert_eq(cp_jobq_create(&c.q, port), 0);
    for (int i = 0; i < 50; i++)
        cr_assert_eq(cp_jobq_push(c.q, slow_counted, &c), 0);
    cr_assert_eq(cp_jobq_close(c.q, slow_on_closed, &c), 0);
    cr_assert_eq(cp_jobq_close_wait(c.q), 0);
    cr_assert_eq(atomic_load(&c.ran), 50);
    cr_assert_eq(atomic_load(&c.on_closed_done), 1, "close_wait returned before on_closed did");
    cp_jobq_unref(c.q);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

static void wait_from_job(void *arg)
{
    drain_ctx *c = arg;
    atomic_store(&c->wait_rc, cp_jobq_close_wait(c->q));
    atomic_store(&c->wait_done, 1);
}

/* From a job of the queue itself, and from any worker of its port (the
 * queue might be scheduled there), close_wait would wait for itself. */
Test(jobq, close_wait_refuses_to_wait_for_itself, .timeout = 30)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(2);
    drain_ctx c = { .wait_rc = 1 };
    cr_assert_eq(cp_jobq_create(&c.q, port), 0);
    cr_assert_eq(cp_jobq_push(c.q, wait_from_job, &c), 0);
    CPT_AWAIT(atomic_load(&c.wait_done), 5000, "close_wait inside a job of the queue did not return");
    cr_assert_eq(atomic_load(&c.wait_rc), -EDEADLK);
    atomic_store(&c.wait_done, 0);
    atomic_store(&c.wait_rc, 1);
    cr_assert_eq(cp_port_post(port, wait_from_job, &c), 0);
    CPT_AWAIT(atomic_load(&c.wait_done), 5000, "close_wait on a worker did not return");
    cr_assert_eq(atomic_load(&c.wait_rc), -EDEADLK);
    /* Refused means nothing changed: the queue is still open. */
    cr_assert_eq(cp_jobq_push(c.q, slow_counted, &c), 0);
    cr_assert_eq(cp_jobq_close_wait(c.q), 0);
    cr_assert_eq(atomic_load(&c.ran), 1);
    cr_assert_eq(cp_jobq_close_wait(NULL), -EINVAL);
    cp_jobq_unref(c.q);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

/* ------------------------------------------------------------------ two closes at once */

/* Two threads close one queue at the same moment, each with its own
 * on_closed. Exactly one close succeeds, and the on_closed that runs is that
 * one's: a close that failed (-ESHUTDOWN) never fires its callback. The
 * closes used to write the callback into the queue before deciding who
 * closes, so the loser's could overwrite the winner's. */
typedef struct close_race {
    _Atomic(cp_jobq *) q;
    atomic_int round; /* the round the closers are released into */
    atomic_int done;  /* closes finished in all rounds */
    atomic_int quit;
    int rc[2];           /* this round's results; read after done says so */
    atomic_int fired[2]; /* this round's on_closed calls, per closer */
} close_race;

typedef struct closer {
    close_race *r;
    int index;
} closer;

static void race_on_closed(void *arg) { atomic_fetch_add((atomic_int *)arg, 1); }

typedef struct race_gate {
    close_race *r;
    int until; /* closes done, this round included */
} race_gate;

/* Holds the queue until both closes of the round have returned, so that the
 * runner reads the closing callback only after both closes wrote whatever
 * they write. */
static void race_hold(void *arg)
{
    race_gate *g = arg;
    uint64_t deadline = cpt_now_ms() + 5000;
    while (atomic_load(&g->r->done) < g->until && cpt_now_ms() < deadline)
        sched_yield();
}

static void *race_closer(void *arg)
{
    closer *c = arg;
    close_race *r = c->r;
    for (int seen = 0;;) {
        int round;
        /* Spin hot for a while, so that both closers leave at the same moment. */
        for (unsigned spins = 0; (round = atomic_load(&r->round)) == seen && !atomic_load(&r->quit);)
            if (++spins > 20000)
                sched_yield();
        if (atomic_load(&r->quit))
            return NULL;
        seen = round;
        r->rc[c->index] = cp_jobq_close(atomic_load(&r->q), race_on_closed, &r->fired[c->index]);
        atomic_fetch_add(&r->done, 1);
    }
}

Test(jobq, concurrent_closes_run_only_the_winners_on_closed, .timeout = 60)
{
    enum { ROUNDS = 100000, BUDGET_MS = 3000 };
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(2);
    close_race r = { 0 };
    closer cl[2] = { { &r, 0 }, { &r, 1 } };
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, race_closer, &cl[i]), 0);
    int rounds = 0, both = 0, neither = 0, loser_fired = 0, winner_silent = 0;
    uint64_t t0 = cpt_now_ms();
    for (; rounds < ROUNDS && cpt_now_ms() - t0 < BUDGET_MS; rounds++) {
        cp_jobq *q;
        cr_assert_eq(cp_jobq_create(&q, port), 0);
        race_gate g = { &r, 2 * (rounds + 1) };
        cr_assert_eq(cp_jobq_push(q, race_hold, &g), 0);
        atomic_store(&r.q, q);
        atomic_store(&r.fired[0], 0);
        atomic_store(&r.fired[1], 0);
        atomic_store(&r.round, rounds + 1);
        while (atomic_load(&r.done) < 2 * (rounds + 1))
            sched_yield();
        /* Drained: the winner's on_closed has returned. */
        cr_assert_eq(cp_jobq_close_wait(q), 0);
        int ok0 = r.rc[0] == 0, ok1 = r.rc[1] == 0;
        if (ok0 && ok1)
            both++;
        else if (!ok0 && !ok1)
            neither++;
        else {
            int w = ok0 ? 0 : 1;
            cr_assert_eq(r.rc[1 - w], -ESHUTDOWN);
            if (atomic_load(&r.fired[1 - w]) != 0)
                loser_fired++;
            if (atomic_load(&r.fired[w]) != 1)
                winner_silent++;
        }
        cp_jobq_unref(q);
    }
    atomic_store(&r.quit, 1);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    cr_expect_eq(both + neither, 0, "%d rounds with two winners, %d with none", both, neither);
    cr_expect_eq(loser_fired, 0, "the failed close's on_closed ran in %d of %d rounds", loser_fired, rounds);
    cr_expect_eq(winner_silent, 0, "the successful close's on_closed did not run once in %d of %d rounds",
                 winner_silent, rounds);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

/* ------------------------------------------------------------------ queued work at cp_port_destroy */

typedef struct destroy_ctx {
    cp_jobq *q;
    atomic_int ran;
    atomic_int ran_at_on_closed; /* ran when on_closed started; -1 before */
    atomic_int on_closed_calls;
    atomic_int accepted; /* re-pushes that returned 0 */
    atomic_int refused;  /* re-pushes that returned -ESHUTDOWN */
    atomic_int other;    /* anything else a re-push returned */
    atomic_int stop;
} destroy_ctx;

static void spin_20us(void *arg)
{
    destroy_ctx *c = arg;
    uint64_t until = cpt_now_ns() + 20000;
    while (cpt_now_ns() < until)
        ;
    atomic_fetch_add(&c->ran, 1);
}

static void destroy_on_closed(void *arg)
{
    destroy_ctx *c = arg;
    atomic_store(&c->ran_at_on_closed, atomic_load(&c->ran));
    atomic_fetch_add(&c->on_closed_calls, 1);
}

/* 500 jobs of 20 us queued, then the port is destroyed (2 to 4 workers, with
 * the queue still open, the caller's reference given up before or after):
 * every job whose push returned 0 has run when cp_port_destroy returns, and
 * the queue, its jobs and the messages that scheduled it are freed (the leak
 * check). Destroy used to drop most of them and leak the rest. */
Test(jobq, port_destroy_runs_every_queued_job, .timeout = 60)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    for (int round = 0; round < 12; round++) {
        cp_port *port = cpt_xport(2 + round % 3);
        destroy_ctx c = { 0 };
        cr_assert_eq(cp_jobq_create(&c.q, port), 0);
        for (int i = 0; i < 500; i++)
            cr_assert_eq(cp_jobq_push(c.q, spin_20us, &c), 0);
        bool keep = round % 2;
        if (!keep)
            cp_jobq_unref(c.q);
        cpt_xport_destroy(port);
        cr_assert_eq(atomic_load(&c.ran), 500,
                     "round %d: %d of 500 accepted jobs ran before destroy returned", round,
                     atomic_load(&c.ran));
        if (keep) {
            /* The destroy closed the queue: it refuses work, and is drained. */
            cr_assert_eq(cp_jobq_push(c.q, spin_20us, &c), -ESHUTDOWN);
            cr_assert_eq(cp_jobq_close(c.q, destroy_on_closed, &c), -ESHUTDOWN);
            cr_assert_eq(cp_jobq_close_wait(c.q), 0);
            cp_jobq_unref(c.q);
        }
        cpt_sleep_ms(2); /* a sleep: a job run after the destroy returned would show in this window */
        cr_assert_eq(atomic_load(&c.ran), 500, "round %d: a job ran after destroy returned", round);
        cr_assert_eq(atomic_load(&c.on_closed_calls), 0, "round %d: a refused close ran its on_closed",
                     round);
    }
    cpt_leak_end(&m);
}

/* The same with the queue closed just before the destroy: every job runs,
 * then on_closed, once, all before cp_port_destroy returns. Destroy used to
 * run a few dozen of the 500 and never on_closed. */
Test(jobq, port_destroy_after_close_runs_every_job_then_on_closed, .timeout = 60)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    for (int round = 0; round < 12; round++) {
        cp_port *port = cpt_xport(2 + round % 3);
        destroy_ctx c = { .ran_at_on_closed = -1 };
        cr_assert_eq(cp_jobq_create(&c.q, port), 0);
        for (int i = 0; i < 500; i++)
            cr_assert_eq(cp_jobq_push(c.q, spin_20us, &c), 0);
        cr_assert_eq(cp_jobq_close(c.q, destroy_on_closed, &c), 0);
        cp_jobq_unref(c.q);
        cpt_xport_destroy(port);
        cr_assert_eq(atomic_load(&c.ran), 500, "round %d: %d of 500 jobs ran", round, atomic_load(&c.ran));
        cr_assert_eq(atomic_load(&c.on_closed_calls), 1,
                     "round %d: on_closed ran %d times before destroy returned", round,
                     atomic_load(&c.on_closed_calls));
        cr_assert_eq(atomic_load(&c.ran_at_on_closed), 500, "round %d: on_closed ran after %d of 500 jobs",
                     round, atomic_load(&c.ran_at_on_closed));
    }
    cpt_leak_end(&m);
}

/* A job that pushes itself again, for as long as the queue takes it. */
static void repush_job(void *arg)
{
    destroy_ctx *c = arg;
    uint64_t until = cpt_now_ns() + 20000;
    while (cpt_now_ns() < until)
        ;
    atomic_fetch_add(&c->ran, 1);
    if (atomic_load(&c->stop))
        return;
    int r = cp_jobq_push(c->q, repush_job, c);
    if (r == 0)
        atomic_fetch_add(&c->accepted, 1);
    else if (r == -ESHUTDOWN)
        atomic_fetch_add(&c->refused, 1);
    else
        atomic_fetch_add(&c->other, 1);
}

/* A job re-pushing itself while the port is destroyed: the destroy closes
 * the queue (the last re-push is refused), and every re-push that was
 * accepted runs before destroy returns. Destroy used to lose the job whose
 * run was handed on during its final drain. */
Test(jobq, port_destroy_loses_no_job_a_job_pushed, .timeout = 60)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    for (int round = 0; round < 12; round++) {
        cp_port *port = cpt_xport(2 + round % 3);
        destroy_ctx c = { 0 };
        cr_assert_eq(cp_jobq_create(&c.q, port), 0);
        cr_assert_eq(cp_jobq_push(c.q, repush_job, &c), 0);
        cpt_sleep_ms(5 + round % 4); /* a sleep: the destroy meets the re-pushes at varied moments */
        cp_jobq_unref(c.q);
        /* The stop flag bounds the test if the destroy never closes the queue. */
        cpt_xport_destroy(port);
        atomic_store(&c.stop, 1);
        int ran = atomic_load(&c.ran), accepted = atomic_load(&c.accepted);
        cr_assert_eq(ran, accepted + 1, "round %d: %d jobs ran, 1 + %d pushed", round, ran, accepted);
        cr_assert_eq(atomic_load(&c.refused), 1, "round %d: the destroy did not refuse the re-push", round);
        cr_assert_eq(atomic_load(&c.other), 0);
    }
    cpt_leak_end(&m);
}
