/*
 * Public timers on the port's workers.
 *
 * Each timer lives in the heap of one worker (its owner, chosen round-robin);
 * arming and removal happen there, O(log n). Cancelling is possible from any
 * thread and is decided by one atomic state word: whichever of "fire" (on the
 * owner) and "cancel" wins the compare-and-swap decides whether the timer
 * fires. A job already queued for a cancelled timer finds it cancelled and
 * does nothing, so a cancelled timer never fires.
 *
 * References: the owner's heap holds one while the timer is armed or firing, a
 * queued job holds one, and the user's handle holds one until cp_timer_cancel.
 */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>

enum { T_ARMED, T_FIRING, T_CANCELLED, T_DONE };

struct cp_timer {
    cp_wtimer wt;
    cp_worker *owner;
    _Atomic int state;
    atomic_uint refs;
    uint64_t repeat_ns;
    void (*fn)(void *arg);
    void *arg;
    cp_jobq *q;
};

static void timer_unref(cp_timer *t)
{
    if (atomic_fetch_sub_explicit(&t->refs, 1, memory_order_acq_rel) != 1)
        return;
    if (t->q)
        cp_jobq_unref(t->q);
    free(t);
}

static void as_job(void *tp)
{
    cp_timer *t = tp;
    if (atomic_load(&t->state) != T_CANCELLED)
        t->fn(t->arg);
    timer_unref(t);
}

static void fire(cp_worker *w, void *tp)
{
    cp_timer *t = tp;
    int expect = T_ARMED;
    if (!atomic_compare_exchange_strong(&t->state, &expect, T_FIRING)) {
        timer_unref(t); /* cancelled: the heap's reference */
        return;
    }
    if (t->q) {
        atomic_fetch_add(&t->refs, 1);
        if (cp_jobq_push(t->q, as_job, t) < 0)
            timer_unref(t);
    } else {
        t->fn(t->arg);
    }
    expect = T_FIRING;
    if (t->repeat_ns && atomic_compare_exchange_strong(&t->state, &expect, T_ARMED)) {
        /* Keep the period; after a stall, the next tick is one period away. */
        uint64_t next = t->wt.deadline_ns + t->repeat_ns, now = cp__now_ns();
        cp__timer_arm_at(w, &t->wt, next > now ? next : now + t->repeat_ns);
        return;
    }
    expect = T_FIRING;
    atomic_compare_exchange_strong(&t->state, &expect, T_DONE);
    timer_unref(t);
}

static void arm_msg(cp_worker *w, void *tp, void *unused, uintptr_t c)
{
    CP_UNUSED(unused);
    cp_timer *t = tp;
    if (atomic_load(&t->state) != T_ARMED) {
        timer_unref(t); /* cancelled before it reached its worker */
        return;
    }
    cp__timer_arm_at(w, &t->wt, t->wt.deadline_ns);
}

static void unarm_msg(cp_worker *w, void *tp, void *unused, uintptr_t c)
{
    CP_UNUSED(unused);
    cp_timer *t = tp;
    if (t->wt.heap_index != UINT32_MAX) {
        cp__timer_cancel(w, &t->wt);
        timer_unref(t); /* the heap's reference */
    }
    timer_unref(t); /* this message's */
}

int cp_timer_start(cp_timer **out, cp_port *port, uint64_t delay_ms, uint64_t repeat_ms,
                   void (*fn)(void *arg), void *arg, cp_jobq *q)
{
    if (out)
        *out = NULL;
    if (!port || !fn || delay_ms > UINT64_MAX / 2000000u || repeat_ms > UINT64_MAX / 2000000u)
        return -EINVAL;
    if (atomic_load(&port->stopping))
        return -ESHUTDOWN;
    cp_timer *t = cp__xalloc(sizeof *t);
    if (!t)
        return -ENOMEM;
    t->owner = cp__pick_worker(port);
    t->wt.fn = fire;
    t->wt.arg = t;
    t->wt.heap_index = UINT32_MAX;
    t->wt.deadline_ns = cp__now_ns() + delay_ms * 1000000u;
    t->wt.is_public = true;
    t->repeat_ns = repeat_ms * 1000000u;
    t->fn = fn;
    t->arg = arg;
    t->q = q;
    if (q)
        cp_jobq_ref(q);
    atomic_init(&t->state, T_ARMED);
    atomic_init(&t->refs, out ? 2 : 1);
    if (out)
        *out = t;
    cp__send_msg(t->owner, arm_msg, t, NULL);
    return 0;
}

int cp_timer_cancel(cp_timer *t)
{
    if (!t)
        return -EINVAL;
    int r = -ENOENT;
    int s = atomic_load(&t->state);
    while (s == T_ARMED || s == T_FIRING) {
        if (atomic_compare_exchange_weak(&t->state, &s, T_CANCELLED)) {
            r = 0;
            break;
        }
    }
    if (r == 0 && s == T_ARMED) {
        atomic_fetch_add(&t->refs, 1);
        cp__send_msg(t->owner, unarm_msg, t, NULL);
    }
    timer_unref(t); /* the handle's */
    return r;
}

/* Port teardown: a public timer still in a heap gives up the heap's reference. */
void cp__timer_drop_public(cp_wtimer *wt)
{
    timer_unref(wt->arg);
}
