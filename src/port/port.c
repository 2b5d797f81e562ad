/* SPDX-License-Identifier: MIT */
/*
 * The completion port: a pool of workers, each running one backend instance,
 * and the plumbing that moves work between threads.
 *
 * A worker's loop is a sequence of rounds. A round dispatches the backend's
 * completions, replays the worker's urgent lane (closes) and then its inbox
 * (work sent by other threads; at most ROUND_MSGS messages of it per round),
 * fires due timers, then writes every session that got bytes queued during the
 * round (one gather write each), and finally hands the messages it produced
 * for other workers over in one push per destination. Batching per round is
 * what keeps a broadcast to a thousand sessions at one write per recipient and
 * one wake-up per worker.
 */
#include "port/port.h"

#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __GLIBC__
#  include <malloc.h> /* malloc_trim */
#endif

_Thread_local cp_worker *cp__self;

#define RBUF_SIZE (64u * 1024u)
#define BLK_MIN 16u
#define BLK_MAX 1024u
/* Inbox messages a round replays at most (whole blocks) before the backend's
 * turn: a backlog of messages, which user threads that send faster than the
 * worker applies can grow without limit, then delays completions and the
 * urgent lane by at most this many messages (a few ms) instead of by all of
 * it. Smaller slices mean fewer messages per gather write: in bench_group's
 * broadcast floods (2 workers) 1024 took 1.3-2.6 times as long to deliver,
 * 4096 up to 1.2 times on epoll, 8192 as long as no limit (within noise). */
#define ROUND_MSGS 8192u

/* ------------------------------------------------------------------ message blocks */

static cp_msgblk *blk_new(uint32_t cap)
{
    cp_msgblk *b = cp__malloc(sizeof *b + cap * sizeof(cp_msg));
    if (!b)
        return NULL;
    b->next = NULL;
    b->n = 0;
    b->cap = cap;
    return b;
}

/* Appends to a chain whose head is the newest block. Returns -ENOMEM only if
 * no block could be had. */
static int chain_append(cp_msgblk **chain, cp_msg m)
{
    cp_msgblk *head = *chain;
    if (!head || head->n == head->cap) {
        uint32_t cap = head ? (head->cap * 2 > BLK_MAX ? BLK_MAX : head->cap * 2) : BLK_MIN;
        cp_msgblk *nb = blk_new(cap);
        if (!nb)
            return -ENOMEM;
        nb->next = head;
        *chain = head = nb;
    }
    head->m[head->n++] = m;
    return 0;
}

/* Pushes a chain (newest block first) onto one of dst's stacks (inbox or
 * urgent) without waking anyone; true if the stack was empty. The consumer
 * takes the whole stack and reverses it, so blocks are replayed in push order.
 * The worker is woken only by the push that finds the stack empty: any later
 * push is covered by that wake-up, because the worker empties the stack after
 * it. */
static bool stack_put(_Atomic(cp_msgblk *) *stack, cp_msgblk *head, uint32_t *msgs)
{
    cp_msgblk *tail = head;
    *msgs = head->n;
    while (tail->next) {
        tail = tail->next;
        *msgs += tail->n;
    }
    cp_msgblk *old = atomic_load_explicit(stack, memory_order_relaxed);
    do {
        tail->next = old;
    } while (!atomic_compare_exchange_weak_explicit(stack, &old, head, memory_order_release,
                                                    memory_order_relaxed));
    return !old;
}

static bool inbox_put(cp_worker *dst, cp_msgblk *head)
{
    uint32_t n;
    bool was_empty = stack_put(&dst->inbox, head, &n);
    atomic_fetch_add_explicit(&dst->backlog, n, memory_order_relaxed);
    return was_empty;
}

static void inbox_push(cp_worker *dst, cp_msgblk *head)
{
    if (inbox_put(dst, head) && dst != cp__self)
        dst->port->be->wake(dst);
}

/* The whole stack, oldest block first. */
static cp_msgblk *stack_take(_Atomic(cp_msgblk *) *stack)
{
    /* Most rounds find it empty: a plain load then spares the locked
     * exchange, which would wait for every store of the round to drain. */
    if (!atomic_load_explicit(stack, memory_order_relaxed))
        return NULL;
    cp_msgblk *list = atomic_exchange_explicit(stack, NULL, memory_order_acquire);
    cp_msgblk *rev = NULL;
    while (list) {
        cp_msgblk *next = list->next;
        list->next = rev;
        rev = list;
        list = next;
    }
    return rev;
}

/* Runs the messages of one block and frees it; returns how many ran. */
static uint32_t blk_replay(cp_worker *w, cp_msgblk *b)
{
    uint32_t n = b->n;
    for (uint32_t i = 0; i < n; i++)
        b->m[i].fn(w, b->m[i].a, b->m[i].b, b->m[i].c);
    cp__free(b);
    return n;
}

static bool urgent_drain(cp_worker *w)
{
    cp_msgblk *b = stack_take(&w->urgent);
    if (!b)
        return false;
    while (b) {
        cp_msgblk *next = b->next;
        blk_replay(w, b);
        b = next;
    }
    return true;
}

/* Replays inbox messages, oldest first, block by block until at least budget
 * have run or none is left; blocks taken but not replayed stay pending, in
 * front of anything pushed later. Returns how many ran. */
static uint32_t inbox_drain(cp_worker *w, uint32_t budget)
{
    if (!w->pending)
        w->pending = stack_take(&w->inbox);
    uint32_t ran = 0;
    while (w->pending && ran < budget) {
        cp_msgblk *b = w->pending;
        w->pending = b->next;
        ran += blk_replay(w, b);
    }
    if (ran)
        atomic_fetch_sub_explicit(&w->backlog, ran, memory_order_relaxed);
    return ran;
}

/* Threads that are not workers batch only inside cp__batch_begin/end (a
 * broadcast, say); otherwise each message is pushed at once. */
static _Thread_local struct {
    cp_port *port;
    int depth;
    cp_msgblk **chains;
    int nchains;
} foreign;

void cp__batch_begin(cp_port *port)
{
    if (cp__on_worker(port))
        return;
    if (foreign.depth++ > 0)
        return;
    if (foreign.nchains < port->nworkers) {
        /* NOLINTNEXTLINE(bugprone-sizeof-expression): an array of pointers: the element size is a pointer's */
        cp_msgblk **c = cp__realloc(foreign.chains, sizeof *c * (size_t)port->nworkers);
        if (!c) {
            foreign.depth--;
            return;
        }
        foreign.chains = c;
        foreign.nchains = port->nworkers;
    }
    /* NOLINTNEXTLINE(bugprone-sizeof-expression): an array of pointers: the element size is a pointer's */
    memset(foreign.chains, 0, sizeof *foreign.chains * (size_t)port->nworkers);
    foreign.port = port;
}

void cp__batch_end(cp_port *port)
{
    if (cp__on_worker(port) || foreign.port != port || --foreign.depth > 0)
        return;
    for (int i = 0; i < port->nworkers; i++)
        if (foreign.chains[i])
            inbox_push(&port->workers[i], foreign.chains[i]);
    foreign.port = NULL;
    cp__free(foreign.chains);
    foreign.chains = NULL;
    foreign.nchains = 0;
}

void cp__send_msg_c(cp_worker *dst, cp_msg_fn fn, void *a, void *b, uintptr_t c)
{
    cp_port *port = dst->port;
    cp_msg m = { fn, a, b, c };
    cp_msgblk **chain = NULL;
    if (cp__on_worker(port))
        chain = &cp__self->outbox[dst->index];
    else if (foreign.depth > 0 && foreign.port == port)
        chain = &foreign.chains[dst->index];
    if (chain) {
        if (chain_append(chain, m) == 0)
            return;
    } else {
        cp_msgblk *one = blk_new(1);
        if (one) {
            one->m[one->n++] = m;
            inbox_push(dst, one);
            return;
        }
    }
    /* Out of memory for even one message block. Messages carry references and
     * completion duties, so dropping one would leak or hang; spin until memory
     * frees up, which on Linux in practice means never reaching here. */
    for (;;) {
        cp_msgblk *one = blk_new(1);
        if (one) {
            one->m[one->n++] = m;
            inbox_push(dst, one);
            return;
        }
        cp__sleep_ms(1);
    }
}

void cp__send_msg(cp_worker *dst, cp_msg_fn fn, void *a, void *b) { cp__send_msg_c(dst, fn, a, b, 0); }

void cp__send_msg_urgent(cp_worker *dst, cp_msg_fn fn, void *a, void *b)
{
    cp_msgblk *one;
    while (!(one = blk_new(1))) /* as cp__send_msg_c: dropping it would leak or hang */
        cp__sleep_ms(1);
    one->m[one->n++] = (cp_msg){ fn, a, b, 0 };
    uint32_t n;
    if (stack_put(&dst->urgent, one, &n) && dst != cp__self)
        dst->port->be->wake(dst);
}

static void outbox_flush(cp_worker *w)
{
    for (int i = 0; i < w->port->nworkers; i++) {
        cp_msgblk *c = w->outbox[i];
        if (c) {
            w->outbox[i] = NULL;
            inbox_push(&w->port->workers[i], c);
        }
    }
}

cp_worker *cp__pick_worker(cp_port *port)
{
    unsigned i = atomic_fetch_add_explicit(&port->rr, 1, memory_order_relaxed);
    return &port->workers[i % (unsigned)port->nworkers];
}

/* ------------------------------------------------------------------ deferred completions */

void cp__worker_defer(cp_worker *w, cp_op *op, int res)
{
    if (w->ndeferred == w->capdeferred) {
        size_t cap = w->capdeferred ? w->capdeferred * 2 : 64;
        struct cp_deferred *d = cp__realloc(w->deferred, cap * sizeof *d);
        if (!d) {
            /* Cannot record it: deliver now. Callers never hold state that
             * this would break; deferral only avoids deep recursion. */
            op->cb(w, op, res, 0, NULL);
            return;
        }
        w->deferred = d;
        w->capdeferred = cap;
    }
    w->deferred[w->ndeferred++] = (struct cp_deferred){ op, res };
}

static bool deferred_drain(cp_worker *w)
{
    if (!w->ndeferred)
        return false;
    /* Callbacks may defer more; the array may move, so index afresh. */
    for (size_t i = 0; i < w->ndeferred; i++) {
        struct cp_deferred d = w->deferred[i];
        d.op->cb(w, d.op, d.res, 0, NULL);
    }
    w->ndeferred = 0;
    return true;
}

/* ------------------------------------------------------------------ timers (min-heap) */

static bool timer_less(const cp_wtimer *a, const cp_wtimer *b) { return a->deadline_ns < b->deadline_ns; }

static void heap_set(cp_worker *w, uint32_t i, cp_wtimer *t)
{
    w->timers[i] = t;
    t->heap_index = i;
}

static void heap_up(cp_worker *w, uint32_t i)
{
    cp_wtimer *t = w->timers[i];
    while (i > 0) {
        uint32_t p = (i - 1) / 2;
        if (!timer_less(t, w->timers[p]))
            break;
        heap_set(w, i, w->timers[p]);
        i = p;
    }
    heap_set(w, i, t);
}

static void heap_down(cp_worker *w, uint32_t i)
{
    cp_wtimer *t = w->timers[i];
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= w->ntimers)
            break;
        if (c + 1 < w->ntimers && timer_less(w->timers[c + 1], w->timers[c]))
            c++;
        if (!timer_less(w->timers[c], t))
            break;
        heap_set(w, i, w->timers[c]);
        i = c;
    }
    heap_set(w, i, t);
}

void cp__timer_cancel(cp_worker *w, cp_wtimer *t)
{
    uint32_t i = t->heap_index;
    if (i == UINT32_MAX || i >= w->ntimers || w->timers[i] != t)
        return;
    t->heap_index = UINT32_MAX;
    cp_wtimer *last = w->timers[--w->ntimers];
    if (i < w->ntimers) {
        heap_set(w, i, last);
        heap_up(w, i);
        heap_down(w, last->heap_index);
    }
}

void cp__timer_arm(cp_worker *w, cp_wtimer *t, uint64_t delay_ms)
{
    cp__timer_arm_at(w, t, cp__now_ns() + delay_ms * 1000000u);
}

void cp__timer_arm_at(cp_worker *w, cp_wtimer *t, uint64_t deadline_ns)
{
    cp__timer_cancel(w, t);
    if (w->ntimers == w->captimers) {
        uint32_t cap = w->captimers ? w->captimers * 2 : 16;
        /* NOLINTNEXTLINE(bugprone-sizeof-expression): an array of pointers: the element size is a pointer's */
        cp_wtimer **a = cp__realloc(w->timers, cap * sizeof *a);
        if (!a)
            abort(); /* a timer is a promise we cannot silently drop */
        w->timers = a;
        w->captimers = cap;
    }
    t->deadline_ns = deadline_ns;
    heap_set(w, w->ntimers++, t);
    heap_up(w, t->heap_index);
}

static bool timers_run(cp_worker *w)
{
    if (!w->ntimers)
        return false;
    bool ran = false;
    uint64_t now = cp__now_ns();
    while (w->ntimers && w->timers[0]->deadline_ns <= now) {
        cp_wtimer *t = w->timers[0];
        cp__timer_cancel(w, t);
        t->fn(w, t->arg);
        ran = true;
    }
    return ran;
}

static int timers_timeout_ms(cp_worker *w)
{
    if (!w->ntimers)
        return -1;
    uint64_t now = cp__now_ns(), d = w->timers[0]->deadline_ns;
    if (d <= now)
        return 0;
    uint64_t ms = (d - now + 999999u) / 1000000u;
    return ms > 60000 ? 60000 : (int)ms;
}

/* ------------------------------------------------------------------ worker loop */

static bool has_work(cp_worker *w)
{
    return w->ndeferred || w->posted || w->writes || w->pending ||
           atomic_load_explicit(&w->inbox, memory_order_relaxed) ||
           atomic_load_explicit(&w->urgent, memory_order_relaxed) || w->port->be->busy(w);
}

/* Runs and empties a list of posted items (what an item posts meanwhile
 * goes to the list afresh). */
static void posted_run(cp_worker *w, cp_posted **list)
{
    cp_posted *p = *list;
    *list = NULL;
    while (p) {
        cp_posted *next = p->next;
        p->fn(w, p);
        p = next;
    }
}

/*
 * A round makes at most be->writes_per_round of the writes waiting their turn
 * (cp__post_write), oldest first, after its other work. A broadcast makes
 * every member's session wait to write; if one round wrote them all, input
 * that came meanwhile would wait for the whole pass, and its delivery to the
 * first members for one more: with 1000 chat clients on one epoll worker a
 * pass took 13 ms and p99 was two passes. Taken in turns, the worker reads
 * between turns, and a member's next write carries what came up to its turn:
 * one pass at most. Every write still carries all its session had queued, so
 * the writes per message do not change.
 */
static void writes_run(cp_worker *w)
{
    unsigned cap = w->port->be->writes_per_round;
    for (unsigned i = 0; (cap == 0 || i < cap) && w->writes; i++) {
        cp_posted *p = w->writes;
        w->writes = p->next;
        if (!w->writes)
            w->writes_tail = &w->writes;
        p->fn(w, p);
    }
}

static void round_finish(cp_worker *w)
{
    uint32_t budget = ROUND_MSGS;
    bool more;
    do {
        more = urgent_drain(w);
        more |= deferred_drain(w);
        uint32_t ran = inbox_drain(w, budget);
        budget -= ran < budget ? ran : budget;
        more |= ran > 0;
        more |= timers_run(w);
        more |= deferred_drain(w);
        if (w->posted) {
            posted_run(w, &w->posted);
            more = true;
        }
        /* Messages to itself are replayed in this same round. */
        if (w->outbox[w->index]) {
            cp_msgblk *c = w->outbox[w->index];
            w->outbox[w->index] = NULL;
            inbox_push(w, c);
            more = true;
        }
    } while (more && budget &&
             (w->ndeferred || w->posted || w->pending || atomic_load(&w->inbox) || atomic_load(&w->urgent)));
    writes_run(w);
    outbox_flush(w);
    if (w->next_round) {
        inbox_push(w, w->next_round);
        w->next_round = NULL;
    }
    w->round++;
    posted_run(w, &w->at_round_end);
}

/*
 * Memory a load leaves behind is given back once the worker has gone quiet.
 * After a burst the process keeps what it touched: freed send buffers sit in
 * the sendbuf pools and in glibc's per-thread malloc arenas (which return
 * memory only from the top of a heap), and the io_uring backend keeps its
 * provided buffers' pages. After 12,000 connections of 2 MB bursts that was
 * 5x the RSS of a fresh server on io_uring. Time is cut into windows of
 * TRIM_WINDOW_NS; a window with at least TRIM_LOADED completions marks the
 * worker loaded, and the first two quiet windows (fewer than TRIM_QUIET)
 * after that trim: the backend's own memory, what the layers above keep
 * (cp__port_on_trim: the sendbuf pools), the page cache (pages.c), the
 * worker's receive buffer's pages, then malloc_trim
 * (glibc). The bulk of a burst (chunks, queue blocks and rings, carries,
 * held copies) is pages of its own and goes back whole; what stays in
 * malloc's arenas is small. The second trim takes what was freed just after the
 * first, often by another worker still finishing its part of the burst:
 * without it, one run in five kept 1.7 MB in a worker's arena. So a steady
 * load never pays for it (one addition per round), and a worker that stays
 * idle trims twice, then sleeps as before.
 */
#define TRIM_WINDOW_NS (1000u * 1000000u)
/* Completions are readiness events on epoll, and one event may stand for
 * many reads and writes: 100 sessions draining 250,000 replies each made
 * only 130-200 a second per worker. So a window counts as loaded from 64,
 * and as quiet below 16, well under what a burst's tail makes (a trim in the
 * tail would run while the burst's memory is still in use, and not again
 * once it is freed). */
#define TRIM_LOADED 64
#define TRIM_QUIET 16
#define TRIM_TIMES 2 /* quiet windows that trim after a loaded one */

typedef struct trim_state {
    uint64_t window_end;
    uint32_t completions; /* in the current window */
    uint8_t trims_due;    /* quiet windows that will trim (TRIM_TIMES after a busy one) */
} trim_state;

static void worker_trim(cp_worker *w)
{
    if (w->port->be->trim)
        w->port->be->trim(w);
    for (int i = 0; i < CP_TRIM_HOOKS; i++) {
        cp_trim_fn fn = atomic_load_explicit(&w->port->trim_hooks[i], memory_order_acquire);
        if (fn)
            fn();
    }
    cp__pages_trim();
    cp__slab_trim();
    if (w->rbuf)
        cp__pages_discard(w->rbuf, w->rbuf_size);
#ifdef __GLIBC__
    malloc_trim(0);
#endif
}

void cp__port_on_trim(cp_port *p, cp_trim_fn fn)
{
    for (int i = 0; i < CP_TRIM_HOOKS; i++) {
        cp_trim_fn cur = NULL;
        if (atomic_compare_exchange_strong(&p->trim_hooks[i], &cur, fn) || cur == fn)
            return;
    }
}

/* A worker that may have to trim does not sleep past the window's end. */
static int trim_timeout(const trim_state *t, int timeout, uint64_t now)
{
    if (timeout == 0 || (!t->trims_due && t->completions < TRIM_LOADED))
        return timeout;
    uint64_t left = t->window_end > now ? t->window_end - now : 0;
    int ms = (int)((left + 999999u) / 1000000u) + 1;
    return timeout < 0 || timeout > ms ? ms : timeout;
}

/* Runs after each round: counts its completions, and trims at the end of
 * the first TRIM_TIMES quiet windows after a loaded one. */
static void trim_check(cp_worker *w, trim_state *t, int completions)
{
    if (completions > 0)
        t->completions += (uint32_t)completions;
    if (w->now_ns < t->window_end)
        return;
    if (t->completions >= TRIM_LOADED) {
        t->trims_due = TRIM_TIMES;
    } else if (t->trims_due && t->completions < TRIM_QUIET && !has_work(w)) {
        worker_trim(w);
        t->trims_due--;
    }
    t->completions = 0;
    t->window_end = w->now_ns + TRIM_WINDOW_NS;
}

/*
 * The pause after fan-out (cp_port_opts.fanout_pause_pct). A broadcast makes
 * each receive a send to every member; a loaded worker then spends its time
 * on writes, and the writes carry what came since the member's last one.
 * Busy without a break, it writes as often as it can: each write is small
 * and costs its syscall and its packet whatever it carries (chat, 1000
 * clients: 13 packets a write). A pause of a share of the CPU time (the
 * backend's default: 25% on epoll, 50% on io_uring, whose cheaper sends
 * need a longer one) lets the room's next packets queue, so the next
 * writes carry more; the worker's CPU per delivery falls by about the
 * pause's share, and the clients, which read once per write, keep up
 * better. Request and reply
 * traffic (a send per receive) gains nothing from waiting and never pauses.
 * Sends and receives are weighed over the last rounds (a sum that loses an
 * eighth a round), not the round alone: a round that only writes what
 * queued behind writes in flight (their completions came in it, the
 * requests in the rounds before) is not a broadcast.
 *
 * What the worker used: the thread's CPU clock since its last pause (on
 * io_uring the writes run in the kernel on this thread's clock, at the next
 * submission); before its first, the round's own time since its poll
 * returned. One clock read per pause. The writes the round queued start
 * before the pause (io_uring submits them), so a pause delays what comes
 * next, never what was already queued.
 */
#define FANOUT_MIN_SENDS 32u
#define FANOUT_SENDS_PER_RECV 4u
#define FANOUT_PAUSE_MAX_NS 1000000u

static void fanout_pause(cp_worker *w)
{
    uint32_t sends = w->round_sends;
    w->recent_sends += sends - (w->recent_sends >> 3);
    w->recent_recvs += w->round_recvs - (w->recent_recvs >> 3);
    w->round_sends = w->round_recvs = 0;
    unsigned pct = w->port->fanout_pause_pct;
    if (!pct || sends < FANOUT_MIN_SENDS || w->recent_sends < FANOUT_SENDS_PER_RECV * (w->recent_recvs + 1))
        return;
    if (atomic_load_explicit(&w->port->exiting, memory_order_relaxed))
        return;
    if (w->port->be->submit)
        w->port->be->submit(w);
    uint64_t cpu = cp__thread_cpu_ns(), now = cp__now_ns();
    uint64_t used = now > w->now_ns ? now - w->now_ns : 0;
    if (w->paused_cpu_ns && cpu > w->paused_cpu_ns)
        used = cpu - w->paused_cpu_ns;
    uint64_t ns = used * pct / 100u;
    ns = ns < FANOUT_PAUSE_MAX_NS ? ns : FANOUT_PAUSE_MAX_NS;
    cp__pause_ns(ns);
    w->paused_cpu_ns = cpu;
    cp__own_add(&w->m->pauses, 1);
    cp__own_add(&w->m->pause_ns, ns);
}

/* The round's duration, from its poll's return; the timers it left armed. */
static void round_measure(cp_worker *w)
{
    uint64_t end = cp__now_ns();
    cp__whist_add(&w->m->round, end > w->now_ns ? end - w->now_ns : 0);
    atomic_store_explicit(&w->m->timers, w->ntimers, memory_order_relaxed);
}

static void *worker_main(void *arg)
{
    cp_worker *w = arg;
    cp_port *port = w->port;
    cp__self = w;
    int r = port->be->thread_init ? port->be->thread_init(w) : 0;
    pthread_mutex_lock(&port->start_lock);
    port->nstarted++;
    if (r < 0 && !port->start_err)
        port->start_err = r;
    pthread_cond_broadcast(&port->start_cond);
    pthread_mutex_unlock(&port->start_lock);
    if (r < 0) {
        cp__self = NULL;
        return NULL;
    }
    trim_state trim = { 0 };
    uint64_t last_poll = cp__now_ns();
    for (;;) {
        if (atomic_load(&w->port->exiting) && !has_work(w))
            break;
        int timeout = has_work(w) ? 0 : trim_timeout(&trim, timers_timeout_ms(w), w->now_ns);
        int pr = w->port->be->poll(w, timeout); /* sets w->now_ns */
        if (pr < 0 && pr != -EINTR)
            cp__log(CP_LOG_ERROR, "worker %d: poll failed: %s", w->index, cp_strerror(pr));
        /* A poll that did not block found its completions waiting since up
         * to the previous poll; one that blocked was woken by them. */
        if (pr > 0)
            cp__whist_add(&w->m->wait, timeout == 0 && w->now_ns > last_poll ? w->now_ns - last_poll : 0);
        last_poll = w->now_ns;
        round_finish(w);
        round_measure(w);
        fanout_pause(w);
        trim_check(w, &trim, pr);
    }
    if (w->port->be->thread_fini)
        w->port->be->thread_fini(w);
    cp__self = NULL;
    return NULL;
}

/* ------------------------------------------------------------------ public */

static void run_post(cp_worker *w, void *fn, void *arg, uintptr_t c)
{
    CP_UNUSED(w);
    void (*f)(void *);
    memcpy(&f, &fn, sizeof f);
    f(arg);
}

int cp_port_post(cp_port *port, void (*fn)(void *arg), void *arg)
{
    if (!port || !fn)
        return -EINVAL;
    int r = cp__port_enter(port);
    if (r < 0)
        return r;
    void *f;
    memcpy(&f, &fn, sizeof f);
    cp_worker *dst = cp__pick_worker(port);
    /* A post a worker makes to itself runs in its next round, after the next
     * poll, not in this one as other messages to itself do. A function that
     * posts itself again (a long task done in slices, a publisher retrying
     * after -EAGAIN) then yields to I/O each time, as nginx's
     * posted_next_events do; run in the same round it would spin through the
     * round's whole message budget while the sockets wait (bench_bus from
     * its worker on io_uring: one send completion per 8192 retries). */
    if (cp__self && dst == cp__self && chain_append(&dst->next_round, (cp_msg){ run_post, f, arg, 0 }) == 0) {
        cp__port_release(port);
        return 0;
    }
    cp__send_msg(dst, run_post, f, arg);
    cp__port_release(port);
    return 0;
}

/* ------------------------------------------------------------------ calls racing the destroy */

/* The counter and the flags are sequentially consistent: a caller counts
 * itself, then reads the flag; the destroy sets the flag, then reads the
 * count. So either the caller sees the flag and backs off, or the destroy
 * sees the caller and waits for it. A refused call does not count itself
 * at all when it sees the flag first, so that a busy caller cannot keep the
 * destroy waiting. */
/* Counts the caller unless flag is set (checked before and after). */
static bool count_unless(cp_port *p, atomic_bool *flag)
{
    if (atomic_load(flag))
        return false;
    atomic_fetch_add(&p->callers, 1);
    if (atomic_load(flag)) {
        atomic_fetch_sub(&p->callers, 1);
        return false;
    }
    return true;
}

int cp__port_enter(cp_port *p)
{
    if (cp__on_worker(p))
        return atomic_load(&p->stopping) ? -ESHUTDOWN : 0;
    return count_unless(p, &p->stopping) ? 0 : -ESHUTDOWN;
}

void cp__port_hold(cp_port *p)
{
    if (!cp__on_worker(p))
        atomic_fetch_add(&p->callers, 1);
}

bool cp__port_hold_msgs(cp_port *p) { return cp__on_worker(p) || count_unless(p, &p->inboxes_closed); }

void cp__port_release(cp_port *p)
{
    if (!cp__on_worker(p))
        atomic_fetch_sub(&p->callers, 1);
}

/* Every call counted above is short (a few pushes), so the destroy spins. */
static void wait_callers(cp_port *p)
{
    while (atomic_load(&p->callers) > 0)
        sched_yield();
}

/* The environment is read once, by the process's first cp_port_create, before
 * any thread of the library exists: getenv is not safe against a setenv on
 * another thread, and later ports may be created on worker threads. */
static pthread_once_t env_once = PTHREAD_ONCE_INIT;
static cp_backend env_backend = CP_BACKEND_AUTO;
static char env_backend_bad[64]; /* CP_BACKEND when it names no backend */

static void env_read(void)
{
    /* NOLINTNEXTLINE(concurrency-mt-unsafe): the library's only read of CP_BACKEND, once (above) */
    const char *env = getenv("CP_BACKEND");
    if (env && *env) {
        if (!strcmp(env, "epoll"))
            env_backend = CP_BACKEND_EPOLL;
        else if (!strcmp(env, "uring") || !strcmp(env, "io_uring"))
            env_backend = CP_BACKEND_URING;
        else if (!strcmp(env, "iocp"))
            env_backend = CP_BACKEND_IOCP;
        else if (strcmp(env, "auto") != 0)
            snprintf(env_backend_bad, sizeof env_backend_bad, "%s", env);
    }
#ifdef CP_HAVE_URING
    cp__uring_read_env();
#endif
}

#ifdef CP_HAVE_URING
/* io_uring when it works here; with AUTO, epoll when it does not. */
static const cp_backend_ops *uring_or_epoll(cp_backend want, int *err)
{
    const char *why = NULL;
    int r = cp__uring_probe(&why);
    if (r == 0)
        return &cp__uring_backend;
    if (want == CP_BACKEND_URING) {
        cp__log(CP_LOG_ERROR, "io_uring requested but unusable: %s", why ? why : cp_strerror(r));
        *err = -ENOTSUP;
        return NULL;
    }
    cp__log(CP_LOG_INFO, "io_uring unusable (%s): using epoll", why ? why : cp_strerror(r));
    return &cp__epoll_backend;
}
#endif

/* The backend this platform offers for want (never AUTO's environment
 * lookup: choose_backend does that first). */
static const cp_backend_ops *platform_backend(cp_backend want, int *err)
{
#ifdef CP_HAVE_URING
    if (want == CP_BACKEND_AUTO || want == CP_BACKEND_URING)
        return uring_or_epoll(want, err);
#endif
#ifdef _WIN32
    if (want == CP_BACKEND_AUTO || want == CP_BACKEND_IOCP)
        return &cp__iocp_backend;
#else
    if (want == CP_BACKEND_AUTO || want == CP_BACKEND_EPOLL)
        return &cp__epoll_backend;
#endif
    *err = -ENOTSUP;
    return NULL;
}

static const cp_backend_ops *choose_backend(cp_backend want, int *err)
{
    pthread_once(&env_once, env_read);
    if (want == CP_BACKEND_AUTO) {
        want = env_backend;
        if (env_backend_bad[0])
            cp__log(CP_LOG_WARN, "CP_BACKEND=%s is not a backend; choosing automatically", env_backend_bad);
    }
    return platform_backend(want, err);
}

/* Each worker's cp_wmetrics on cache lines of its own. */
#define WM_STRIDE ((sizeof(cp_wmetrics) + 63) & ~(size_t)63)

/* What the workers used; the port and worker structures themselves stay
 * until the last reference (see cp_port.refs). */
/*
 * The receive buffer of epoll and IOCP. Every read of the worker goes into
 * the same one, so its bytes are warm in the cache. A handler that forwards
 * what it was given without a copy (cp_sendbuf_from_recv) is lent the
 * buffer: its views keep it, counted here, and the worker reads into a new
 * one from the page cache after the callback; the last view to go, on any
 * thread, puts the old one back there. The count is apart from the pages,
 * so that a trim can give every page of the worker's buffer back.
 */
struct cp_rbuf {
    atomic_uint refs; /* the worker's while it reads into it, and one per view */
    uint8_t *data;    /* RBUF_SIZE bytes from the page cache */
};

static struct cp_rbuf *rbuf_new(void)
{
    struct cp_rbuf *b = cp__malloc(sizeof *b);
    if (b && !(b->data = cp__pages_get(RBUF_SIZE))) {
        cp__free(b);
        b = NULL;
    }
    if (b)
        atomic_init(&b->refs, 1);
    return b;
}

static void rbuf_put(void *arg, uint32_t tag)
{
    CP_UNUSED(tag);
    struct cp_rbuf *b = arg;
    if (atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) != 1)
        return;
    cp__pages_put(b->data, RBUF_SIZE);
    cp__free(b);
}

bool cp__rbuf_lend(cp_worker *w, const uint8_t *p, size_t n, cp_loan *loan)
{
    if (!w->rbuf_live || !cp__bytes_within(p, n, w->rbuf, w->rbuf_size))
        return false;
    if (!w->rbuf_next && !(w->rbuf_next = rbuf_new()))
        return false;
    atomic_fetch_add_explicit(&w->rbuf_own->refs, 1, memory_order_relaxed);
    *loan = (cp_loan){ .put = rbuf_put, .arg = w->rbuf_own, .pin = RBUF_SIZE };
    return true;
}

void cp__rbuf_settle(cp_worker *w)
{
    w->rbuf_live = false;
    if (!w->rbuf_next)
        return;
    rbuf_put(w->rbuf_own, 0);
    w->rbuf_own = w->rbuf_next;
    w->rbuf_next = NULL;
    w->rbuf = w->rbuf_own->data;
}

static void workers_free(cp_port *p)
{
    for (int i = 0; i < p->nworkers; i++) {
        cp_worker *w = &p->workers[i];
        cp__free(w->outbox);
        cp__free(w->deferred);
        if (w->rbuf_own)
            rbuf_put(w->rbuf_own, 0); /* lent views may keep it */
        if (w->rbuf_next)
            rbuf_put(w->rbuf_next, 0);
        w->rbuf_own = w->rbuf_next = NULL;
        cp__free(w->timers);
        w->outbox = NULL;
        w->deferred = NULL;
        w->rbuf = NULL;
        w->timers = NULL;
    }
}

static void port_free(cp_port *p)
{
    workers_free(p);
    pthread_mutex_destroy(&p->start_lock);
    pthread_cond_destroy(&p->start_cond);
    pthread_mutex_destroy(&p->qlock);
    pthread_cond_destroy(&p->qcond);
    cp__free(p->workers);
    cp__free(p->wm_mem);
    cp__free(p);
}

void cp__port_ref(cp_port *p) { atomic_fetch_add_explicit(&p->refs, 1, memory_order_relaxed); }

void cp__port_unref(cp_port *p)
{
    if (atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) == 1)
        port_free(p);
}

/* A port with its queue and its (zeroed) workers, or NULL. */
static cp_port *port_alloc(const cp_backend_ops *be, const cp_port_opts *o)
{
    cp_port *p = cp__zalloc(sizeof *p);
    if (!p)
        return NULL;
    p->be = be;
    atomic_init(&p->refs, 1);
    pthread_mutex_init(&p->qlock, NULL);
    pthread_cond_init(&p->qcond, NULL);
    cp__queue_init(&p->queues);
    p->nworkers = o->workers;
    p->reuse_sockets = o->iocp_reuse_sockets != 0;
    p->fanout_pause_pct = (unsigned)o->fanout_pause_pct;
    p->workers = cp__zalloc(sizeof *p->workers * (size_t)o->workers);
    p->wm_mem = cp__zalloc(WM_STRIDE * (size_t)o->workers + 63);
    if (!p->workers || !p->wm_mem) {
        cp__free(p->workers);
        cp__free(p->wm_mem);
        pthread_mutex_destroy(&p->qlock);
        pthread_cond_destroy(&p->qcond);
        cp__free(p);
        return NULL;
    }
    return p;
}

/* Worker i's memory and backend state; what it got before a failure is
 * freed with the port (workers_free). */
static int worker_init(cp_port *p, int i)
{
    cp_worker *w = &p->workers[i];
    w->port = p;
    w->index = i;
    w->m = (cp_wmetrics *)((((uintptr_t)p->wm_mem + 63) & ~(uintptr_t)63) + WM_STRIDE * (size_t)i);
    cp__queue_init(&w->ready);
    w->writes_tail = &w->writes;
    /* NOLINTNEXTLINE(bugprone-sizeof-expression): an array of pointers: the element size is a pointer's */
    w->outbox = cp__zalloc(sizeof *w->outbox * (size_t)p->nworkers);
    /* From the page cache, so that it can be lent (cp__rbuf_lend); a trim
     * gives its pages back (worker_trim). */
    w->rbuf_own = rbuf_new();
    w->rbuf = w->rbuf_own ? w->rbuf_own->data : NULL;
    w->rbuf_size = RBUF_SIZE;
    if (!w->outbox || !w->rbuf)
        return -ENOMEM;
    return p->be->init(w);
}

/* Sets the workers up in order until one fails; *inited counts those whose
 * backend state was made (and must be torn down). */
static int workers_init(cp_port *p, int *inited)
{
    int err = 0;
    for (; *inited < p->nworkers; (*inited)++) {
        if ((err = worker_init(p, *inited)) < 0)
            break;
    }
    return err;
}

/* Starts the workers' threads until one cannot be; *started counts them. */
static int threads_start(cp_port *p, int *started)
{
    for (; *started < p->nworkers; (*started)++) {
        if (pthread_create(&p->workers[*started].thread, NULL, worker_main, &p->workers[*started]))
            return -EAGAIN;
    }
    return 0;
}

/* Starts the workers and waits until each started one is up; the first
 * failure, a thread's or a worker's own set-up. */
static int workers_start(cp_port *p, int *started)
{
    int err = threads_start(p, started);
    /* Each worker sets its backend up on its own thread; wait for all. */
    pthread_mutex_lock(&p->start_lock);
    while (p->nstarted < *started)
        pthread_cond_wait(&p->start_cond, &p->start_lock);
    if (!err)
        err = p->start_err;
    pthread_mutex_unlock(&p->start_lock);
    return err;
}

/* Undoes a create that failed: the started workers exit and are joined,
 * the set-up ones are torn down, the port is freed. */
static void port_abort(cp_port *p, int started, int inited)
{
    atomic_store(&p->stopping, true);
    atomic_store(&p->exiting, true);
    for (int i = 0; i < started; i++) {
        p->be->wake(&p->workers[i]);
        pthread_join(p->workers[i].thread, NULL);
    }
    for (int i = 0; i < inited; i++)
        p->be->fini(&p->workers[i]);
    port_free(p);
}

int cp_port_create(cp_port **out, const cp_port_opts *opts)
{
    if (!out)
        return -EINVAL;
    *out = NULL;
    cp_port_opts o = opts ? *opts : (cp_port_opts){ 0 };
    if (o.workers < 0 || o.workers > 1024 || o.fanout_pause_pct < -1 || o.fanout_pause_pct > 100)
        return -EINVAL;
    if (o.workers == 0) {
        o.workers = cp__ncpu();
    }
    int err = 0;
    const cp_backend_ops *be = choose_backend(o.backend, &err);
    if (!be)
        return err;
    if (o.fanout_pause_pct == 0)
        o.fanout_pause_pct = (int)be->fanout_pause_pct;
    if (o.fanout_pause_pct < 0 || !cp__fine_pause_ok())
        o.fanout_pause_pct = 0;

    cp_port *p = port_alloc(be, &o);
    if (!p)
        return -ENOMEM;
    int inited = 0, started = 0;
    err = workers_init(p, &inited);
    /* Made on every path: port_free destroys them. */
    pthread_mutex_init(&p->start_lock, NULL);
    pthread_cond_init(&p->start_cond, NULL);
    if (!err)
        err = workers_start(p, &started);
    if (err) {
        port_abort(p, started, inited);
        return err;
    }
    cp__live_add(CP_LIVE_PORT, p);
    *out = p;
    return 0;
}

/* After the workers have left: runs what is still in their inboxes and
 * deferred lists on this thread, each as its worker, and hands on what that
 * produces (outboxes, itself included) until nothing is left. No wake-ups:
 * nobody waits on the workers' backends any more. */
static void final_drain(cp_port *p)
{
    bool more;
    do {
        more = false;
        for (int i = 0; i < p->nworkers; i++) {
            cp_worker *w = &p->workers[i];
            cp__self = w;
            while (urgent_drain(w) | (inbox_drain(w, UINT32_MAX) > 0) | deferred_drain(w))
                more = true;
            if (w->next_round) {
                inbox_put(w, w->next_round);
                w->next_round = NULL;
                more = true;
            }
            for (int k = 0; k < p->nworkers; k++) {
                cp_msgblk *c = w->outbox[k];
                if (c) {
                    w->outbox[k] = NULL;
                    inbox_put(&p->workers[k], c);
                    more = true;
                }
            }
            cp__self = NULL;
        }
    } while (more);
}

int cp_port_destroy(cp_port *p)
{
    if (!p)
        return -EINVAL;
    CP_ASSERT(cp__live_has(CP_LIVE_PORT, p), "cp_port_destroy: not a live port (destroyed twice?)");
    if (cp__on_worker(p))
        return -EDEADLK;
    if (atomic_load(&p->users) > 0)
        return -EBUSY;
    /* From here posts, timer starts and new queues are refused; the calls
     * already past that check finish their sends first. */
    atomic_store(&p->stopping, true);
    wait_callers(p);
    /* Every queue still open is closed (its later pushes are refused), and
     * every job a push accepted runs, on the workers, before they stop;
     * on_closed too. Then the pushers that scheduled a queue from other
     * threads have left their wake-ups. */
    cp__jobq_close_all(p);
    cp__jobq_wait_drained(p);
    wait_callers(p);
    atomic_store(&p->exiting, true);
    for (int i = 0; i < p->nworkers; i++)
        p->be->wake(&p->workers[i]);
    for (int i = 0; i < p->nworkers; i++)
        pthread_join(p->workers[i].thread, NULL);
    /* Messages that reached a worker after it left (a post that raced the
     * stop, a message between workers in their last rounds) run here rather
     * than being lost: their arguments may own memory. */
    final_drain(p);
    /* Timer handles may be given back at any time, also after this returns:
     * from now on a cancel sends nothing. The cancels that were sending have
     * their messages run by the second drain. */
    atomic_store(&p->inboxes_closed, true);
    wait_callers(p);
    final_drain(p);
    for (int i = 0; i < p->nworkers; i++) {
        cp_worker *w = &p->workers[i];
        /* Only public timers can be left: every service is stopped. Each
         * gives up the heap's reference; a handle still out keeps the timer
         * (and the port's memory) until it is given back. */
        for (uint32_t k = 0; k < w->ntimers; k++)
            if (w->timers[k]->is_public)
                cp__timer_drop_public(w->timers[k]);
        w->ntimers = 0;
        p->be->fini(w);
    }
    cp__live_del(CP_LIVE_PORT, p);
    workers_free(p);
    cp__port_unref(p);
    return 0;
}

const char *cp_port_backend_name(const cp_port *port) { return port ? port->be->name : "none"; }
int cp_port_workers(const cp_port *port) { return port ? port->nworkers : 0; }

/* ------------------------------------------------------------------ metrics */

uint64_t cp_metrics_bucket_le(int k)
{
    if (k <= 0)
        return 0;
    if (k >= CP_METRICS_BUCKETS - 1)
        return UINT64_MAX;
    return UINT64_C(1) << (k - 1);
}

void cp__whist_read(const cp_whist *h, cp_histogram *out)
{
    out->count += atomic_load_explicit(&h->count, memory_order_relaxed);
    out->sum += atomic_load_explicit(&h->sum, memory_order_relaxed);
    for (int k = 0; k < CP_METRICS_BUCKETS; k++)
        out->buckets[k] += atomic_load_explicit(&h->b[k], memory_order_relaxed);
}

int cp_port_metrics_get(const cp_port *port, int worker, cp_worker_metrics *out)
{
    if (!port || !out || worker < -1 || worker >= port->nworkers)
        return -EINVAL;
    memset(out, 0, sizeof *out);
    int from = worker < 0 ? 0 : worker, to = worker < 0 ? port->nworkers : worker + 1;
    for (int i = from; i < to; i++) {
        const cp_worker *w = &port->workers[i];
        cp__whist_read(&w->m->round, &out->round_ns);
        cp__whist_read(&w->m->wait, &out->wait_ns);
        cp__whist_read(&w->m->job, &out->job_wait_ns);
        out->inbox_depth += atomic_load_explicit(&w->backlog, memory_order_relaxed);
        out->timers_armed += atomic_load_explicit(&w->m->timers, memory_order_relaxed);
        out->recv_bufs += atomic_load_explicit(&w->m->rbufs, memory_order_relaxed);
        out->recv_bufs_free += atomic_load_explicit(&w->m->rbufs_free, memory_order_relaxed);
        out->recv_bufs_held += atomic_load_explicit(&w->m->rbufs_held, memory_order_relaxed);
        out->recv_bufs_lent += atomic_load_explicit(&w->m->rbufs_lent, memory_order_relaxed);
        out->fanout_pauses += atomic_load_explicit(&w->m->pauses, memory_order_relaxed);
        out->fanout_pause_ns += atomic_load_explicit(&w->m->pause_ns, memory_order_relaxed);
    }
    return 0;
}
