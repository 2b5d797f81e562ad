/* Timers: firing on time, cancellation, repeating, delivery to job queues. */
#include "helpers.h"

#include <errno.h>
#include <stdlib.h>

#define NTIMERS 10000

typedef struct tctx {
    uint64_t due_ns;        /* not before this */
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
        uint64_t delay = 100 + (uint64_t)(i % 200); /* 100..299 ms */
        c[i].due_ns = start + delay * 1000000u;
        cr_assert_eq(cp_timer_start(&t[i], port, delay, 0, on_fire, &c[i], q), 0);
    }
    /* Cancel every odd timer well before any is due. */
    for (int i = 1; i < NTIMERS; i += 2)
        cr_assert_eq(cp_timer_cancel(t[i]), 0, "timer %d could not be cancelled", i);
    cr_assert_lt(cpt_now_ns() - start, 90000000u, "arming and cancelling took too long to test");
    cpt_sleep_ms(600);
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
    if (q)
        cr_assert_eq(cp_jobq_close(q, NULL, NULL), 0);
    cp_jobq_unref(q);
    cpt_sleep_ms(20);
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
} rep_ctx;

static void on_tick(void *arg)
{
    rep_ctx *c = arg;
    if (atomic_load(&c->cancelled))
        atomic_fetch_add(&c->after_cancel, 1);
    atomic_fetch_add(&c->ticks, 1);
}

Test(timer, repeating_timer_ticks_until_cancelled_then_never_again, .timeout = 30)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(0);
    rep_ctx c = {0};
    cp_timer *t;
    cr_assert_eq(cp_timer_start(&t, port, 10, 10, on_tick, &c, NULL), 0);
    cpt_sleep_ms(205);
    int ticks = atomic_load(&c.ticks);
    cr_expect(ticks >= 15 && ticks <= 21, "%d ticks in 205 ms at 10 ms", ticks);
    cr_assert_eq(cp_timer_cancel(t), 0);
    atomic_store(&c.cancelled, 1);
    /* A tick already running when cancel returned may finish; none after. */
    cpt_sleep_ms(15);
    int settled = atomic_load(&c.ticks);
    cpt_sleep_ms(100);
    cr_expect_eq(atomic_load(&c.ticks), settled, "the timer ticked after it was cancelled");
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

Test(timer, timers_left_armed_are_freed_with_the_port, .timeout = 30)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(0);
    tctx c = {0};
    for (int i = 0; i < 100; i++)
        cr_assert_eq(cp_timer_start(NULL, port, 60000, 0, on_fire, &c, NULL), 0);
    cpt_sleep_ms(20);
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
