/* SPDX-License-Identifier: MIT */
/*
 * Work bound to a session: cp_session_post and session timers.
 *
 * Both run user functions on the session's owner, so they are serialized with
 * its callbacks like everything else there. What needs care is the end. A
 * post or a timer start is a message to the owner, and it may still be on its
 * way when the session disconnects; yet a call that returned 0 must be
 * settled before on_disconnected (a post's fn runs, a timer ends), or the
 * user could never know when to free arg.
 *
 * So each call also leaves a record (cp_swork) on a lock-free stack in the
 * session before it sends its message, and refuses (-ENOTCONN) once the stack
 * is closed. A message that arrives moves what the stack holds to the owner's
 * list (its own record is there then) and settles its record. The close
 * closes the stack and settles every record still listed: those are exactly
 * the calls whose messages have not arrived. A record belongs to its message,
 * which frees it (or drops its reference) whether or not it was settled
 * first, so no message meets freed memory.
 *
 * A post's message travels to the owner like the sends of its thread; a send
 * made before the post may still wait there for an earlier ticket of another
 * thread (see "Order" in session.c), but any send the post makes is written
 * after it.
 */
#include "net/net.h"

#include <errno.h>
#include <stdlib.h>

struct cp_swork {
    /* A record is on the stack first, then on the owner's list, never on
     * both: the two links share their memory. */
    union {
        struct cp_swork *next; /* the stack */
        cp_queue node;         /* the owner's list */
    };
    /* Runs once, on the owner: from the record's message, or from the close
     * (closing set) if that came first. */
    void (*settle)(cp_session *s, struct cp_swork *n, bool closing);
    /* The record's message is done with it. */
    void (*release)(struct cp_swork *n);
    bool done; /* settled (owner only) */
};
typedef struct cp_swork cp_swork;

/* The closed stack's top: no record lives there. */
static cp_swork stack_closed_mark;
#define STACK_CLOSED (&stack_closed_mark)

#define CONTAINER_OF(p, type, field) ((type *)((char *)(p)-offsetof(type, field)))

static bool connected(const cp_session *s)
{
    return atomic_load_explicit(&s->state, memory_order_acquire) == CP_S_CONNECTED;
}

/* ------------------------------------------------------------------ records */

void cp__session_work_init(cp_session *s)
{
    cp__queue_init(&s->work);
    cp__queue_init(&s->timers);
}

/* Owner: moves the stack's records to the list, oldest first; closing leaves
 * the stack closed. The stack is newest first: each record goes to the head
 * of a list of its own, which then follows the owner's list. */
static void take_stack(cp_session *s, bool closing)
{
    if (atomic_load_explicit(&s->work_stack, memory_order_relaxed) == STACK_CLOSED)
        return;
    cp_swork *top = atomic_exchange_explicit(&s->work_stack, closing ? STACK_CLOSED : NULL,
                                             memory_order_acquire);
    cp_queue taken;
    cp__queue_init(&taken);
    while (top) {
        cp_swork *next = top->next; /* read before the node overwrites it */
        cp__queue_insert_head(&taken, &top->node);
        top = next;
    }
    cp__queue_append(&s->work, &taken);
}

static void settle(cp_session *s, cp_swork *n, bool closing)
{
    cp__queue_remove(&n->node);
    n->done = true;
    n->settle(s, n, closing);
}

static void work_msg(cp_worker *w, void *sp, void *np, uintptr_t c)
{
    CP_UNUSED(w);
    cp_session *s = sp;
    cp_swork *n = np;
    if (!n->done) {
        take_stack(s, false); /* n was pushed before this message was sent */
        settle(s, n, false);
    }
    n->release(n);
    cp__session_unref(s);
}

/* Any thread: records n and sends its message; -ENOTCONN once the session is
 * disconnecting. After a 0 the record may be settled at any moment (even
 * before this returns), but it is freed only by its message. */
static int work_push(cp_session *s, cp_swork *n)
{
    if (!connected(s))
        return -ENOTCONN;
    n->done = false;
    cp_swork *top = atomic_load_explicit(&s->work_stack, memory_order_relaxed);
    do {
        if (top == STACK_CLOSED)
            return -ENOTCONN;
        n->next = top;
    } while (!atomic_compare_exchange_weak_explicit(&s->work_stack, &top, n, memory_order_release,
                                                    memory_order_relaxed));
    cp__session_ref(s); /* the message's */
    cp__send_msg(s->owner, work_msg, s, n);
    return 0;
}

/* ------------------------------------------------------------------ posts */

typedef struct post {
    cp_swork n;
    void (*fn)(cp_session *s, void *arg);
    void *arg;
} post;

/* A post runs also when the close settles it: that is how its fn gets to
 * free arg. */
static void post_settle(cp_session *s, cp_swork *n, bool closing)
{
    CP_UNUSED(closing);
    post *p = CONTAINER_OF(n, post, n);
    p->fn(s, p->arg);
}

static void post_release(cp_swork *n) { cp__free(CONTAINER_OF(n, post, n)); }

int cp_session_post(cp_session *s, void (*fn)(cp_session *s, void *arg), void *arg)
{
    if (!s || !fn)
        return -EINVAL;
    post *p = cp__malloc(sizeof *p);
    if (!p)
        return -ENOMEM;
    p->n.settle = post_settle;
    p->n.release = post_release;
    p->fn = fn;
    p->arg = arg;
    int r = work_push(s, &p->n);
    if (r < 0)
        cp__free(p);
    return r;
}

/* ------------------------------------------------------------------ timers */

/* STARTING: the start's message is on its way. FIRING: fn is running. DONE: a
 * one-shot fired or the disconnect ended the timer. */
enum { T_STARTING, T_ARMED, T_FIRING, T_CANCELLED, T_DONE };

/* References: the owner side holds one from the start until the timer has
 * left the owner for good (never armed, or out of the heap and the session's
 * list); the start's message holds one, an unarm message one, and the handle
 * one until cp_session_timer_cancel. */
struct cp_session_timer {
    cp_swork start;
    cp_wtimer wt;
    cp_session *s; /* alive while listed: the close unlists every timer */
    cp_worker *owner;
    void (*fn)(cp_session *s, void *arg);
    void *arg;
    uint64_t repeat_ns;
    _Atomic int state;
    atomic_uint refs;
    cp_queue node; /* on the session's armed timers, while listed */
    bool listed;
};

static void timer_unref(cp_session_timer *t)
{
    if (atomic_fetch_sub_explicit(&t->refs, 1, memory_order_acq_rel) == 1)
        cp__free(t);
}

static void timer_list(cp_session *s, cp_session_timer *t)
{
    cp__queue_insert_head(&s->timers, &t->node);
    t->listed = true;
}

/* Owner: takes an armed (or firing) timer out of the heap and the session's
 * list and drops the owner side's reference. Whoever unlists it does this,
 * once. */
static void timer_end(cp_session_timer *t)
{
    if (!t->listed)
        return;
    cp__timer_cancel(t->owner, &t->wt);
    cp__queue_remove(&t->node);
    t->listed = false;
    timer_unref(t);
}

static void timer_fire(cp_worker *w, void *tp)
{
    cp_session_timer *t = tp;
    int expect = T_ARMED;
    if (!atomic_compare_exchange_strong(&t->state, &expect, T_FIRING)) {
        timer_end(t); /* cancelled by another thread; its message finds it ended */
        return;
    }
    /* A disconnecting session runs no more timers; its close ends them. */
    if (connected(t->s))
        t->fn(t->s, t->arg);
    expect = T_FIRING;
    if (t->repeat_ns && atomic_compare_exchange_strong(&t->state, &expect, T_ARMED)) {
        /* Keep the period; after a stall, the next tick is one period away. */
        uint64_t next = t->wt.deadline_ns + t->repeat_ns, now = cp__now_ns();
        cp__timer_arm_at(w, &t->wt, next > now ? next : now + t->repeat_ns);
        return;
    }
    expect = T_FIRING;
    atomic_compare_exchange_strong(&t->state, &expect, T_DONE);
    timer_end(t);
}

/* The start reached the owner (arm, unless cancelled meanwhile), or the close
 * came first (the timer ends without firing). */
static void timer_settle(cp_session *s, cp_swork *n, bool closing)
{
    cp_session_timer *t = CONTAINER_OF(n, cp_session_timer, start);
    int expect = T_STARTING;
    if (!closing && atomic_compare_exchange_strong(&t->state, &expect, T_ARMED)) {
        timer_list(s, t);
        cp__timer_arm_at(s->owner, &t->wt, t->wt.deadline_ns);
        return;
    }
    expect = T_STARTING;
    atomic_compare_exchange_strong(&t->state, &expect, T_DONE);
    timer_unref(t); /* the owner side's: it was never armed */
}

static void timer_release(cp_swork *n) { timer_unref(CONTAINER_OF(n, cp_session_timer, start)); }

static void unarm_msg(cp_worker *w, void *tp, void *unused, uintptr_t c)
{
    CP_UNUSED(w), CP_UNUSED(unused);
    cp_session_timer *t = tp;
    timer_end(t);
    /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): this message's reference is still held */
    timer_unref(t); /* this message's */
}

int cp_session_timer_start(cp_session_timer **out, cp_session *s, uint32_t delay_ms, uint32_t repeat_ms,
                           void (*fn)(cp_session *s, void *arg), void *arg)
{
    if (out)
        *out = NULL;
    if (!s || !fn)
        return -EINVAL;
    cp_session_timer *t = cp__zalloc(sizeof *t);
    if (!t)
        return -ENOMEM;
    t->start.settle = timer_settle;
    t->start.release = timer_release;
    t->wt.fn = timer_fire;
    t->wt.arg = t;
    t->wt.heap_index = UINT32_MAX;
    t->wt.deadline_ns = cp__now_ns() + (uint64_t)delay_ms * 1000000u;
    t->s = s;
    t->owner = s->owner;
    t->fn = fn;
    t->arg = arg;
    t->repeat_ns = (uint64_t)repeat_ms * 1000000u;
    atomic_init(&t->state, T_STARTING);
    atomic_init(&t->refs, out ? 3u : 2u); /* the owner side's, the message's, the handle's */
    /* The handle is in place before fn can run: fn may cancel its own timer. */
    if (out)
        *out = t;
    int r = work_push(s, &t->start);
    if (r < 0) {
        if (out)
            *out = NULL;
        cp__free(t);
    }
    return r;
}

int cp_session_timer_cancel(cp_session_timer *t)
{
    if (!t)
        return -EINVAL;
    int r = -ENOENT;
    int st = atomic_load(&t->state);
    while (st == T_STARTING || st == T_ARMED || st == T_FIRING) {
        if (atomic_compare_exchange_weak(&t->state, &st, T_CANCELLED)) {
            r = 0;
            break;
        }
    }
    /* A starting timer is ended by its start's message, a firing one when fn
     * returns; an armed one must leave the heap, which only the owner can do. */
    if (r == 0 && st == T_ARMED) {
        if (cp__self == t->owner) {
            timer_end(t);
        } else {
            atomic_fetch_add(&t->refs, 1);
            cp__send_msg(t->owner, unarm_msg, t, NULL);
        }
    }
    /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): the handle's reference is still held */
    timer_unref(t); /* the handle's */
    return r;
}

/* ------------------------------------------------------------------ close */

void cp__session_work_close(cp_session *s)
{
    while (!cp__queue_empty(&s->timers)) {
        cp_session_timer *t = CP_QUEUE_DATA(cp__queue_head(&s->timers), cp_session_timer, node);
        int expect = T_ARMED; /* a timer cancelled meanwhile stays cancelled */
        atomic_compare_exchange_strong(&t->state, &expect, T_DONE);
        /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): timer_end unlists t (the list head), so the loop moves on */
        timer_end(t);
    }
    take_stack(s, true);
    while (!cp__queue_empty(&s->work))
        settle(s, CP_QUEUE_DATA(cp__queue_head(&s->work), cp_swork, node), true);
}
