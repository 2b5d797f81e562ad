/* SPDX-License-Identifier: MIT */
/*
 * Job queues: run one object's work one job at a time on whichever worker is
 * free: what the C++ IOCP core cport replaces calls a JobQueue, to which a
 * room's work is pushed with DoAsync.
 *
 * Jobs sit in an intrusive multi-producer single-consumer list (a push is one
 * atomic exchange). Scheduling is driven by one atomic word: the number of
 * jobs pushed and not yet run, plus a "closed" bit. The push that takes the
 * count from 0 to 1 schedules the queue (sends it to a worker); every other
 * push only appends. The runner decrements after each job and stops when the
 * count reaches 0, so at most one runner exists at any time, and a queue that
 * has work is scheduled exactly once. After a time slice the runner hands the
 * queue to a worker again instead of looping on, so one busy queue cannot
 * starve the others.
 *
 * Waiting for a closed queue to drain (cp_jobq_close_wait): the runner that
 * takes the count to zero with the closed bit set runs on_closed and then
 * marks the queue drained. Waiters sleep on one mutex and condition variable
 * shared by every queue; the runner takes them only when a waiter is
 * registered, so queues nobody waits for pay one load.
 *
 * The port keeps a list of its queues that have not drained, so that
 * cp_port_destroy can close them and wait until every job they accepted has
 * run (cp__jobq_close_all, cp__jobq_wait_drained). A queue leaves the list
 * when it drains, or when it is freed without having been closed. It holds a
 * reference to the port's memory, so it can be used (and refuses work) after
 * the destroy.
 */
#include "port/port.h"

#include <errno.h>
#include <sched.h>
#include <stdlib.h>

#define SLICE_NS (2u * 1000u * 1000u)
#define CLOSED_BIT (UINT64_C(1) << 63)
/* Default bound: sessions that push past HIGH pending jobs are not read until
 * the queue is back under LOW (cp_jobq_set_bound). */
#define BOUND_HIGH 8192u
#define BOUND_LOW 2048u
/* A runner holds back while a worker's inbox has more messages than this
 * waiting: its jobs' sends would only deepen it. */
#define BACKLOG_MAX (256u * 1024u)
#define BACKLOG_RETRY_MS 1u

typedef struct job {
    _Atomic(struct job *) next;
    void (*fn)(void *arg); /* NULL: the close marker (a close_job) */
    void *arg;
    uint64_t pushed_ns; /* for the job-wait metric: the pusher's round start, or its clock */
} job;

/* The close marker carries the on_closed of the close that queued it. Only
 * the close that sets the closed bit queues one, so a close that failed
 * leaves no trace: its callback never reaches the queue. */
typedef struct close_job {
    job j;
    void (*on_closed)(void *arg);
    void *arg;
} close_job;

struct cp_jobq {
    cp_port *port;
    atomic_uint refs;       /* the user's, plus one while scheduled */
    _Atomic uint64_t state; /* pending jobs | CLOSED_BIT */
    _Atomic(job *) tail;    /* producers exchange here */
    job *head;              /* consumer side; starts at the stub */
    job stub;
    atomic_bool drained; /* closed, every job run, on_closed returned */
    atomic_int waiters;  /* threads in cp_jobq_close_wait */
    cp_queue node;       /* on the port's list of queues; under port->qlock */
    bool listed;

    /* Backpressure: feeders paused for pushing past high, resumed once the
     * queue is back under low (see "Bounds" below). */
    _Atomic uint32_t high, low;
    atomic_bool has_paused;
    pthread_mutex_t plock;
    cp_feeder **paused;
    uint32_t npaused, cappaused;
    cp_wtimer retry; /* a runner that held back for a deep inbox goes on here */
};

static pthread_mutex_t drain_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t drain_cond = PTHREAD_COND_INITIALIZER;

static _Thread_local cp_jobq *current;

cp_jobq *cp_jobq_current(void) { return current; }

int cp_jobq_create(cp_jobq **out, cp_port *port)
{
    if (!out || !port)
        return -EINVAL;
    cp_jobq *q = cp__zalloc(sizeof *q);
    if (!q)
        return -ENOMEM;
    q->port = port;
    atomic_init(&q->refs, 1);
    atomic_init(&q->high, BOUND_HIGH);
    atomic_init(&q->low, BOUND_LOW);
    pthread_mutex_init(&q->plock, NULL);
    q->retry.heap_index = UINT32_MAX;
    atomic_init(&q->stub.next, NULL);
    atomic_init(&q->tail, &q->stub);
    q->head = &q->stub;
    /* Under the lock, so that the destroy's sweep sees every queue created
     * before it began and none after. */
    pthread_mutex_lock(&port->qlock);
    if (atomic_load(&port->stopping)) {
        pthread_mutex_unlock(&port->qlock);
        cp__free(q);
        return -ESHUTDOWN;
    }
    cp__queue_insert_head(&port->queues, &q->node);
    q->listed = true;
    cp__port_ref(port);
    pthread_mutex_unlock(&port->qlock);
    *out = q;
    return 0;
}

/* Off the port's list; the caller holds port->qlock. */
static void unlist_locked(cp_jobq *q)
{
    cp_port *port = q->port;
    if (!q->listed)
        return;
    cp__queue_remove(&q->node);
    q->listed = false;
    if (cp__queue_empty(&port->queues))
        pthread_cond_broadcast(&port->qcond);
}

static void unlist(cp_jobq *q)
{
    pthread_mutex_lock(&q->port->qlock);
    unlist_locked(q);
    pthread_mutex_unlock(&q->port->qlock);
}

static void list_push(cp_jobq *q, job *j)
{
    atomic_store_explicit(&j->next, NULL, memory_order_relaxed);
    job *prev = atomic_exchange_explicit(&q->tail, j, memory_order_acq_rel);
    atomic_store_explicit(&prev->next, j, memory_order_release);
}

/* Takes the oldest job. The caller knows one was pushed (the count says so),
 * but its producer may be between its two steps: wait for the link. */
static job *list_pop(cp_jobq *q)
{
    for (;;) {
        job *head = q->head;
        job *next = atomic_load_explicit(&head->next, memory_order_acquire);
        if (head == &q->stub) {
            if (!next) {
                sched_yield();
                continue;
            }
            q->head = next;
            head = next;
            next = atomic_load_explicit(&head->next, memory_order_acquire);
        }
        if (next) {
            q->head = next;
            return head;
        }
        if (head != atomic_load_explicit(&q->tail, memory_order_acquire)) {
            sched_yield(); /* a producer is linking after head */
            continue;
        }
        /* head is the last job: put the stub behind it so it can be taken. */
        list_push(q, &q->stub);
        next = atomic_load_explicit(&head->next, memory_order_acquire);
        if (next) {
            q->head = next;
            return head;
        }
        sched_yield();
    }
}

/*
 * Bounds. A queue fed by sessions' packets grows as fast as they send, and
 * its jobs (a room's broadcasts) may be slower: without a bound it takes all
 * memory. So a push that finds more than `high` jobs pending, made while
 * the worker handles input from a feeder (worker->feeder: a session's
 * received bytes), pauses that feeder and lists it here; when the runner
 * brings the queue back under `low`, every listed feeder takes input again.
 * The push itself always succeeds: what is pushed is never lost, and
 * producers that are not feeders (timers, user threads) are not stopped.
 * Each paused session can add at most the rest of one receive, so the queue
 * stays within high plus a receive per feeding session.
 */
static void pause_pusher(cp_jobq *q, cp_feeder *f)
{
    if (f->ops->waiting(f))
        return; /* already waiting for a queue */
    pthread_mutex_lock(&q->plock);
    if (q->npaused == q->cappaused) {
        uint32_t cap = q->cappaused ? q->cappaused * 2 : 8;
        /* NOLINTNEXTLINE(bugprone-sizeof-expression): an array of pointers: the element size is a pointer's */
        cp_feeder **a = cp__realloc(q->paused, sizeof *a * cap);
        if (!a) {
            pthread_mutex_unlock(&q->plock);
            return; /* not paused: the queue grows instead */
        }
        q->paused = a;
        q->cappaused = cap;
    }
    f->ops->hold(f);
    q->paused[q->npaused++] = f;
    atomic_store_explicit(&q->has_paused, true, memory_order_release);
    pthread_mutex_unlock(&q->plock);
    f->ops->pause(f);
}

/* Resumes every feeder paused for this queue (any thread). */
static void release_paused(cp_jobq *q)
{
    if (!atomic_load_explicit(&q->has_paused, memory_order_acquire))
        return;
    pthread_mutex_lock(&q->plock);
    cp_feeder **a = q->paused;
    uint32_t n = q->npaused;
    q->paused = NULL;
    q->npaused = q->cappaused = 0;
    atomic_store_explicit(&q->has_paused, false, memory_order_relaxed);
    pthread_mutex_unlock(&q->plock);
    for (uint32_t i = 0; i < n; i++)
        a[i]->ops->resume(a[i]);
    cp__free(a);
}

int cp_jobq_set_bound(cp_jobq *q, uint32_t high, uint32_t low)
{
    if (!q || (high && low >= high))
        return -EINVAL;
    atomic_store(&q->low, low);
    atomic_store(&q->high, high);
    return 0;
}

/* True when a worker of the port has a deep inbox: the runner's sends would
 * only add to it. */
static bool backlog_deep(const cp_port *p)
{
    for (int i = 0; i < p->nworkers; i++)
        if (atomic_load_explicit(&p->workers[i].backlog, memory_order_relaxed) > BACKLOG_MAX)
            return true;
    return false;
}

void cp_jobq_ref(cp_jobq *q) { atomic_fetch_add_explicit(&q->refs, 1, memory_order_relaxed); }

void cp_jobq_unref(cp_jobq *q)
{
    if (!q || atomic_fetch_sub_explicit(&q->refs, 1, memory_order_acq_rel) != 1)
        return;
    cp_port *port = q->port;
    unlist(q); /* a queue that was never closed */
    release_paused(q);
    pthread_mutex_destroy(&q->plock);
    cp__free(q);
    cp__port_unref(port);
}

static void run(cp_worker *w, void *qp, void *unused, uintptr_t c);
static void release_paused(cp_jobq *q);

/* Wakes every thread in cp_jobq_close_wait (of any queue) to look again. */
static void wake_waiters(void)
{
    pthread_mutex_lock(&drain_lock);
    pthread_cond_broadcast(&drain_cond);
    pthread_mutex_unlock(&drain_lock);
}

/* Runs before the runner drops its reference, so q is alive here even if a
 * woken waiter's owner frees it right away. The flag and the waiter count are
 * sequentially consistent: either this sees the waiter, or the waiter sees
 * the flag. Leaving the port's list may let the port's destroy go on; this
 * runs on a worker, which the destroy still joins. */
static void mark_drained(cp_jobq *q)
{
    atomic_store(&q->drained, true);
    unlist(q);
    if (atomic_load(&q->waiters) > 0)
        wake_waiters();
}

static void schedule(cp_jobq *q) { cp__send_msg(cp__pick_worker(q->port), run, q, NULL); }

static void retry_run(cp_worker *w, void *qp) { run(w, qp, NULL, 0); }

static void run(cp_worker *w, void *qp, void *unused, uintptr_t c)
{
    CP_UNUSED(unused);
    cp_jobq *q = qp;
    uint64_t start = cp__now_ns(), now = start;
    cp_jobq *outer = current;
    current = q;
    /* The close marker is the last job a queue counts (the closed bit stops
     * every push after it), so the count reaches zero right after it. */
    void (*on_closed)(void *arg) = NULL;
    void *closed_arg = NULL;
    for (unsigned n = 1;; n++) {
        job *j = list_pop(q);
        /* Its wait, on the clock read at most 16 jobs ago (below): no clock
         * read per job. */
        cp__whist_add(&w->m->job, now > j->pushed_ns ? now - j->pushed_ns : 0);
        if (j->fn) {
            j->fn(j->arg);
        } else {
            close_job *m = (close_job *)j;
            on_closed = m->on_closed;
            closed_arg = m->arg;
        }
        cp__free(j);
        uint64_t left = atomic_fetch_sub_explicit(&q->state, 1, memory_order_acq_rel) - 1;
        if (atomic_load_explicit(&q->has_paused, memory_order_relaxed) &&
            (left & ~CLOSED_BIT) <= atomic_load_explicit(&q->low, memory_order_relaxed))
            release_paused(q);
        if ((left & ~CLOSED_BIT) == 0) {
            current = outer;
            /* Closed and drained: nothing can be pushed any more. */
            if (left & CLOSED_BIT) {
                if (on_closed)
                    on_closed(closed_arg);
                mark_drained(q);
            }
            cp_jobq_unref(q); /* the scheduled reference */
            return;
        }
        if ((n & 15) == 0 && (now = cp__now_ns()) - start > SLICE_NS) {
            current = outer;
            schedule(q); /* still counted: nobody else schedules it */
            return;
        }
        if ((n & 15) == 0 && backlog_deep(q->port)) {
            /* Still counted: goes on here after a pause, and meanwhile the
             * queue fills to its bound and its feeders stop being read. */
            current = outer;
            q->retry.fn = retry_run;
            q->retry.arg = q;
            cp__timer_arm(w, &q->retry, BACKLOG_RETRY_MS);
            return;
        }
    }
}

/* Adds one to the count unless closed (close itself passes force); *before
 * gets the count it found. */
static int count_up(cp_jobq *q, bool closing, uint64_t *before)
{
    uint64_t s = atomic_load_explicit(&q->state, memory_order_relaxed);
    for (;;) {
        if (s & CLOSED_BIT)
            return -ESHUTDOWN;
        uint64_t ns = (s + 1) | (closing ? CLOSED_BIT : 0);
        if (atomic_compare_exchange_weak_explicit(&q->state, &s, ns, memory_order_acq_rel,
                                                  memory_order_relaxed)) {
            *before = s & ~CLOSED_BIT;
            return *before == 0; /* 1: this push must schedule */
        }
    }
}

/* Appends j (a job, or the close marker when closing); frees it if refused. */
static int enqueue(cp_jobq *q, job *j, bool closing)
{
    /* A worker has its round's start at hand; another thread reads the clock. */
    j->pushed_ns = cp__self ? cp__self->now_ns : cp__now_ns();
    uint64_t before;
    int first = count_up(q, closing, &before);
    if (first < 0) {
        cp__free(j);
        return first;
    }
    if (!first) {
        list_push(q, j);
        uint32_t high = atomic_load_explicit(&q->high, memory_order_relaxed);
        if (high && before >= high && cp__self && cp__self->port == q->port && cp__self->feeder)
            pause_pusher(q, cp__self->feeder);
        return 0;
    }
    cp_jobq_ref(q); /* held while scheduled; taken before the job is visible */
    list_push(q, j);
    /* The queue cannot drain before this job ran, so the port's destroy is
     * still waiting for it; it also waits for this send to end. */
    cp__port_hold(q->port);
    schedule(q);
    cp__port_release(q->port);
    return 0;
}

/* Closes q unless it is closed: the marker, an empty job carrying on_closed,
 * keeps the count above zero until every job pushed before it has run. */
static int close_with(cp_jobq *q, void (*on_closed)(void *arg), void *arg)
{
    close_job *c = cp__malloc(sizeof *c);
    if (!c)
        return -ENOMEM;
    c->j.fn = NULL;
    c->j.arg = NULL;
    c->on_closed = on_closed;
    c->arg = arg;
    return enqueue(q, &c->j, true);
}

int cp_jobq_push(cp_jobq *q, void (*fn)(void *arg), void *arg)
{
    if (!q || !fn)
        return -EINVAL;
    job *j = cp__malloc(sizeof *j);
    if (!j)
        return -ENOMEM;
    j->fn = fn;
    j->arg = arg;
    return enqueue(q, j, false);
}

int cp_jobq_close(cp_jobq *q, void (*on_closed)(void *arg), void *arg)
{
    if (!q)
        return -EINVAL;
    if (atomic_load(&q->state) & CLOSED_BIT)
        return -ESHUTDOWN;
    return close_with(q, on_closed, arg);
}

int cp_jobq_close_wait(cp_jobq *q)
{
    if (!q)
        return -EINVAL;
    /* Every job of the queue, on_closed included, runs on a worker of its
     * port, and the queue may be scheduled on this very worker. */
    if (cp__on_worker(q->port))
        return -EDEADLK;
    int r = close_with(q, NULL, NULL);
    if (r < 0 && r != -ESHUTDOWN)
        return r; /* out of memory: not closed */
    atomic_fetch_add(&q->waiters, 1);
    pthread_mutex_lock(&drain_lock);
    while (!atomic_load(&q->drained))
        pthread_cond_wait(&drain_cond, &drain_lock);
    pthread_mutex_unlock(&drain_lock);
    atomic_fetch_sub(&q->waiters, 1);
    return 0;
}

bool cp__jobq_closed(cp_jobq *q) { return (atomic_load(&q->state) & CLOSED_BIT) != 0; }

/* Sets the closed bit without a marker (no allocation, no on_closed). A
 * queue with work drains as its runner reaches the end; an idle one has
 * drained right here. The caller holds port->qlock, which keeps every listed
 * queue alive (a queue being freed waits for it to leave the list). */
static bool close_quietly_locked(cp_jobq *q)
{
    uint64_t s = atomic_load(&q->state);
    do {
        if (s & CLOSED_BIT)
            return false;
    } while (!atomic_compare_exchange_weak(&q->state, &s, s | CLOSED_BIT));
    if ((s & ~CLOSED_BIT) != 0)
        return false;
    atomic_store(&q->drained, true);
    unlist_locked(q);
    return true;
}

void cp__jobq_close_all(cp_port *p)
{
    bool woke = false;
    pthread_mutex_lock(&p->qlock);
    cp_queue *n, *next;
    /* Safe: a queue that has drained unlists itself, and no other. */
    CP_QUEUE_FOREACH_SAFE(n, next, &p->queues)
        woke |= close_quietly_locked(CP_QUEUE_DATA(n, cp_jobq, node));
    pthread_mutex_unlock(&p->qlock);
    if (woke)
        wake_waiters();
}

void cp__jobq_wait_drained(cp_port *p)
{
    pthread_mutex_lock(&p->qlock);
    while (!cp__queue_empty(&p->queues))
        pthread_cond_wait(&p->qcond, &p->qlock);
    pthread_mutex_unlock(&p->qlock);
}
