/* SPDX-License-Identifier: MIT */
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
 * The same word says whether a call of the user's function is in progress
 * (RUN) and whether a cancel waits for it to end (WAIT). Setting RUN is part
 * of the compare-and-swap that decides the timer fires, so a cancel that wins
 * afterwards sees it: cp_timer_cancel then waits for the call to end, which
 * lets its caller free the argument at once. The wait is on one mutex and
 * condition variable shared by every timer; a call that ends takes them only
 * when a cancel is waiting. A cancel made by the callback itself does not
 * wait (the call in progress is its own). At most one call of a timer runs at
 * a time: calls come from the owner's heap one after another, or as jobs of
 * one queue, which runs them one at a time.
 *
 * References: the owner's heap holds one while the timer is armed or firing, a
 * queued job holds one, and the user's handle holds one until cp_timer_cancel.
 * A timer holds one on its port's memory, so that a handle can be given back
 * after cp_port_destroy: the destroy drops the heaps' references, and a
 * cancel from then on sends nothing (cp__port_hold_msgs).
 *
 * A timer delivered through a job queue ends when that queue closes: the
 * first time it fires into the closed queue (its job refused), it goes to
 * ENDED instead of being armed again, and it never called fn since the
 * close; so cancel answers 0 (it will not fire), not -ENOENT (it fired).
 */
#include "port/port.h"

#include <errno.h>
#include <stdlib.h>

/* Phases, in the low bits of the state word. */
enum {
    T_ARMED,   /* in its owner's heap, or on the way there */
    T_FIRING,  /* the owner is firing it */
    T_PENDING, /* a one-shot fired into its job queue; the job has not started */
    T_CANCELLED,
    T_DONE, /* a one-shot whose call started */
    T_ENDED /* ended without a call: its job queue had closed */
};
#define T_PHASE 7u
#define T_RUN 8u   /* a call of fn is in progress */
#define T_WAIT 16u /* a cancel waits for that call to end */

struct cp_timer {
    cp_wtimer wt;
    cp_worker *owner;
    atomic_uint state;
    atomic_uint refs;
    uint64_t repeat_ns;
    void (*fn)(void *arg);
    void *arg;
    cp_jobq *q;
};

static pthread_mutex_t wait_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wait_cond = PTHREAD_COND_INITIALIZER;

/* The timer whose function this thread is running (innermost), so that a
 * cancel from inside the callback knows not to wait for itself. */
static _Thread_local cp_timer *running_here;

static void timer_unref(cp_timer *t)
{
    if (atomic_fetch_sub_explicit(&t->refs, 1, memory_order_acq_rel) != 1)
        return;
    cp_port *port = t->owner->port;
    if (t->q)
        cp_jobq_unref(t->q);
    cp__free(t);
    cp__port_unref(port);
}

static void call_fn(cp_timer *t)
{
    cp_timer *outer = running_here;
    running_here = t;
    t->fn(t->arg);
    running_here = outer;
}

/* A call ended and cleared RUN; old is the state word before that. The
 * caller still holds a reference, so t is alive while waiters are woken. */
static void call_ended(unsigned old)
{
    if (!(old & T_WAIT))
        return;
    pthread_mutex_lock(&wait_lock);
    pthread_cond_broadcast(&wait_cond);
    pthread_mutex_unlock(&wait_lock);
}

/* The waiting side of call_ended: RUN is cleared before the lock is taken
 * there, and tested under the lock here, so the wake-up cannot be missed. */
static void wait_call_end(cp_timer *t)
{
    pthread_mutex_lock(&wait_lock);
    while (atomic_load(&t->state) & T_RUN)
        pthread_cond_wait(&wait_cond, &wait_lock);
    pthread_mutex_unlock(&wait_lock);
}

static void as_job(void *tp)
{
    cp_timer *t = tp;
    unsigned s = atomic_load(&t->state), ns;
    do {
        unsigned phase = s & T_PHASE;
        if (phase == T_CANCELLED) {
            timer_unref(t); /* skipped: the job's reference */
            return;
        }
        /* A one-shot has fired once its call starts; a repeating timer keeps
         * the phase its owner gave it. */
        ns = (s & ~T_PHASE) | (t->repeat_ns ? phase : T_DONE) | T_RUN;
    } while (!atomic_compare_exchange_weak(&t->state, &s, ns));
    call_fn(t);
    call_ended(atomic_fetch_and(&t->state, ~(T_RUN | T_WAIT)));
    timer_unref(t);
}

/* Takes an armed timer to FIRING (and RUN when it calls fn itself); false if
 * it was cancelled. Flags set by a job of the timer still running stay. */
static bool fire_begin(cp_timer *t)
{
    unsigned s = atomic_load(&t->state);
    do {
        if ((s & T_PHASE) != T_ARMED)
            return false;
    } while (!atomic_compare_exchange_weak(&t->state, &s, (s & ~T_PHASE) | T_FIRING | (t->q ? 0 : T_RUN)));
    return true;
}

/* How a firing went: fn called here, or its job queued, refused by the
 * closed queue, or not queued for want of memory (tried again later). */
enum { F_CALLED, F_QUEUED, F_REFUSED, F_NOMEM };

static unsigned next_phase(const cp_timer *t, int how)
{
    if (how == F_REFUSED)
        return T_ENDED;
    if (t->repeat_ns || how == F_NOMEM)
        return T_ARMED;
    return how == F_QUEUED ? T_PENDING : T_DONE;
}

/* Leaves FIRING for the next phase, unless a cancel or the timer's job moved
 * it on meanwhile; returns the new state word. */
static unsigned fire_end(cp_timer *t, int how)
{
    unsigned s = atomic_load(&t->state), ns;
    do {
        unsigned phase = s & T_PHASE;
        if (phase == T_FIRING)
            phase = next_phase(t, how);
        ns = (s & ~T_PHASE) | phase;
        if (!t->q)
            ns &= ~(T_RUN | T_WAIT);
    } while (!atomic_compare_exchange_weak(&t->state, &s, ns));
    if (!t->q)
        call_ended(s);
    return ns;
}

static void fire(cp_worker *w, void *tp)
{
    cp_timer *t = tp;
    if (!fire_begin(t)) {
        timer_unref(t); /* cancelled: the heap's reference */
        return;
    }
    int how = F_CALLED;
    if (t->q) {
        atomic_fetch_add(&t->refs, 1);
        int r = cp_jobq_push(t->q, as_job, t);
        how = r == 0 ? F_QUEUED : r == -ESHUTDOWN ? F_REFUSED : F_NOMEM;
        if (r != 0)
            timer_unref(t);
    } else {
        call_fn(t);
    }
    /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): the heap's reference is still held */
    if ((fire_end(t, how) & T_PHASE) == T_ARMED) {
        /* Keep the period; after a stall, the next tick is one period away.
         * A one-shot whose job found no memory tries again in 1 ms. */
        uint64_t period = t->repeat_ns ? t->repeat_ns : 1000000u;
        uint64_t next = t->wt.deadline_ns + period, now = cp__now_ns();
        cp__timer_arm_at(w, &t->wt, next > now ? next : now + period);
        return;
    }
    timer_unref(t);
}

static void arm_msg(cp_worker *w, void *tp, void *unused, uintptr_t c)
{
    CP_UNUSED(unused);
    cp_timer *t = tp;
    if ((atomic_load(&t->state) & T_PHASE) != T_ARMED) {
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
    /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): this message's reference is still held */
    timer_unref(t); /* this message's */
}

int cp_timer_start(cp_timer **out, cp_port *port, uint64_t delay_ms, uint64_t repeat_ms,
                   void (*fn)(void *arg), void *arg, cp_jobq *q)
{
    if (out)
        *out = NULL;
    if (!port || !fn || delay_ms > UINT64_MAX / 2000000u || repeat_ms > UINT64_MAX / 2000000u)
        return -EINVAL;
    if (q && cp__jobq_closed(q))
        return -ESHUTDOWN;
    int r = cp__port_enter(port);
    if (r < 0)
        return r;
    cp_timer *t = cp__zalloc(sizeof *t);
    if (!t) {
        cp__port_release(port);
        return -ENOMEM;
    }
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
    atomic_init(&t->state, (unsigned)T_ARMED);
    atomic_init(&t->refs, out ? 2 : 1);
    if (out)
        *out = t;
    cp__port_ref(port);
    cp__send_msg(t->owner, arm_msg, t, NULL);
    cp__port_release(port);
    return 0;
}

/* Moves a live timer to CANCELLED (and asks to be told when a call running
 * on another thread ends). *before and *after are the states around the
 * change. 0, or -ENOENT if the timer had already fired or been cancelled. */
static int mark_cancelled(cp_timer *t, bool own, unsigned *before, unsigned *after)
{
    int r;
    unsigned s = atomic_load(&t->state), ns;
    do {
        unsigned phase = s & T_PHASE;
        bool live = phase == T_ARMED || phase == T_FIRING || phase == T_PENDING;
        r = live || phase == T_ENDED ? 0 : -ENOENT;
        ns = live ? (s & ~T_PHASE) | T_CANCELLED : s;
        if ((s & T_RUN) && !own)
            ns |= T_WAIT;
    } while (ns != s && !atomic_compare_exchange_weak(&t->state, &s, ns));
    *before = s;
    *after = ns;
    return r;
}

int cp_timer_cancel(cp_timer *t)
{
    if (!t)
        return -EINVAL;
    bool own = running_here == t;
    /* After the port's destroy (or late in it) the heaps are gone: an armed
     * timer is then just cancelled, and nothing is sent. */
    cp_port *port = t->owner->port;
    bool can_send = cp__port_hold_msgs(port);
    unsigned s, ns;
    int r = mark_cancelled(t, own, &s, &ns);
    if (r == 0 && (s & T_PHASE) == T_ARMED && can_send) {
        atomic_fetch_add(&t->refs, 1);
        cp__send_msg(t->owner, unarm_msg, t, NULL);
    }
    if (can_send)
        cp__port_release(port);
    if ((ns & T_RUN) && !own)
        wait_call_end(t);
    timer_unref(t); /* the handle's */
    return r;
}

/* Port teardown: a public timer still in a heap gives up the heap's reference. */
void cp__timer_drop_public(cp_wtimer *wt) { timer_unref(wt->arg); }
