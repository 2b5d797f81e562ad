/* SPDX-License-Identifier: MIT */
/*
 * The port layer: workers, their rounds and messages, timers, job queues.
 * Built on the backend contract (backend.h); it knows nothing of sessions,
 * services or send buffers: what the layers above need from a round they
 * post (cp_posted), what a full job queue pauses is a feeder (cp_feeder).
 * Nothing here is public.
 */
#ifndef CP_PORT_H
#define CP_PORT_H

#include "base.h"
#include "mem/mem.h"
#include "port/backend.h"

/* ------------------------------------------------------------------ messages */

/* Work handed from one thread to a worker: fn(w, a, b, c) runs on that
 * worker. Most messages need two pointers; c is a third word for the few that
 * carry a number beside them (a session send's place in the session's order). */
typedef void (*cp_msg_fn)(cp_worker *w, void *a, void *b, uintptr_t c);
typedef struct cp_msg {
    cp_msg_fn fn;
    void *a, *b;
    uintptr_t c;
} cp_msg;

typedef struct cp_msgblk {
    struct cp_msgblk *next;
    uint32_t n, cap;
    cp_msg m[];
} cp_msgblk;

/* ------------------------------------------------------------------ timers */

typedef struct cp_wtimer {
    uint64_t deadline_ns;
    void (*fn)(cp_worker *w, void *arg);
    void *arg;
    uint32_t heap_index; /* UINT32_MAX when not armed */
    bool is_public;      /* a cp_timer: freed with the port if still armed */
} cp_wtimer;

/* Per-worker timers (owner thread only). */
void cp__timer_arm(cp_worker *w, cp_wtimer *t, uint64_t delay_ms);
void cp__timer_arm_at(cp_worker *w, cp_wtimer *t, uint64_t deadline_ns);
void cp__timer_cancel(cp_worker *w, cp_wtimer *t);
void cp__timer_drop_public(cp_wtimer *t);

/* ------------------------------------------------------------------ metrics */

/* A counter one thread writes and any thread reads: adding is a plain load
 * and store (no locked instruction); the relaxed atomics keep a reader's
 * load whole and the race defined. */
static inline void cp__own_add(atomic_uint_fast64_t *c, uint64_t v)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + v, memory_order_relaxed);
}

/* The bucket of v in a cp_histogram (cport.h): 0 for 0, then k for
 * (2^(k-2), 2^(k-1)], the last for everything above. */
static inline unsigned cp__metrics_bucket(uint64_t v)
{
    unsigned k = v <= 1 ? (unsigned)v : 65u - (unsigned)__builtin_clzll(v - 1);
    return k < CP_METRICS_BUCKETS ? k : CP_METRICS_BUCKETS - 1;
}

/* A histogram one thread writes (cp__own_add on each field). */
typedef struct cp_whist {
    atomic_uint_fast64_t count, sum, b[CP_METRICS_BUCKETS];
} cp_whist;

static inline void cp__whist_add(cp_whist *h, uint64_t v)
{
    cp__own_add(&h->count, 1);
    cp__own_add(&h->sum, v);
    cp__own_add(&h->b[cp__metrics_bucket(v)], 1);
}
/* Adds what h counts to out (any thread). */
void cp__whist_read(const cp_whist *h, cp_histogram *out);

/* A worker's loop metrics (cp_worker_metrics), written by the worker alone,
 * in a block of cache lines of its own (cp_port.wm_mem). */
typedef struct cp_wmetrics {
    cp_whist round, wait, job;
    atomic_uint_fast64_t timers; /* armed at the end of the last round */
    /* The backend's receive buffers (io_uring), at the last poll. */
    atomic_uint_fast64_t rbufs, rbufs_free, rbufs_held, rbufs_lent;
    atomic_uint_fast64_t pauses, pause_ns; /* after fan-out (port.c) */
} cp_wmetrics;

/* ------------------------------------------------------------------ port */

/* Work a layer above the port posts to run later on a worker, without a
 * lock (on the worker only). The port knows nothing of what is posted: a
 * session with bytes to write, a session paused for the rest of a round.
 * An item is on at most one list at a time; `next` is the port's. Items run
 * in no particular order. The model is nginx's posted events. */
typedef struct cp_posted cp_posted;
typedef void (*cp_posted_fn)(cp_worker *w, cp_posted *p);
struct cp_posted {
    cp_posted *next;
    cp_posted_fn fn;
};

/* What a worker takes input from right now (a session whose received bytes
 * it is handling): a bounded job queue pushed to past its bound pauses it
 * (jobq.c). The port knows it only by these calls. */
typedef struct cp_feeder cp_feeder;
typedef struct cp_feeder_ops {
    bool (*waiting)(cp_feeder *f); /* paused for a queue already (on its worker) */
    void (*hold)(cp_feeder *f);    /* a reference for the queue's list (any thread) */
    void (*pause)(cp_feeder *f);   /* stop taking input (on its worker) */
    void (*resume)(cp_feeder *f);  /* take input again, later; drops the hold (any thread) */
} cp_feeder_ops;
struct cp_feeder {
    const cp_feeder_ops *ops;
};

struct cp_worker {
    cp_port *port;
    int index;
    pthread_t thread;
    void *be; /* backend state */

    /* Lock-free inbox: a stack of message blocks pushed by any thread, taken
     * all at once by the owner and replayed in push order. */
    _Atomic(cp_msgblk *) inbox;
    /* Blocks taken from the inbox and not replayed yet, oldest first (owner
     * only): a round replays a bounded number of messages, then gives the
     * backend its turn. */
    cp_msgblk *pending;
    /* A second stack of the same kind for messages that must not wait behind
     * the inbox (cp__send_msg_urgent), replayed first in every pass of a
     * round. */
    _Atomic(cp_msgblk *) urgent;
    /* Messages pushed to the inbox and not replayed yet: producers that can
     * wait (a job queue's runner) hold back while it is deep (jobq.c). */
    atomic_uint backlog;

    /* Messages this worker produced during the current round for each worker
     * (itself included); pushed once at the end of the round. */
    cp_msgblk **outbox;

    /* cp_port_post calls this worker made to itself during the round: pushed
     * to its own inbox once the round is over, so they run after the next
     * poll (port.c, cp_port_post). */
    cp_msgblk *next_round;

    /* Posted to run within this round, before its outboxes are flushed (the
     * round goes on until none is left: a posted item may post again). */
    cp_posted *posted;
    /* Writes waiting their turn, oldest first (cp__post_write): a round
     * takes at most CP_WRITES_PER_ROUND of them, after its other work, and
     * leaves the rest to the rounds that follow, each after a poll. */
    cp_posted *writes, **writes_tail;

    /* Completions known before their operation could finish (cancellations). */
    struct cp_deferred {
        cp_op *op;
        int res;
    } * deferred;
    size_t ndeferred, capdeferred;

    /* Receive buffer shared by every session of this worker (epoll, IOCP):
     * the bytes of rbuf_own, which a handler may keep (cp__rbuf_lend). The
     * worker then reads into rbuf_next, taken by the lend, once the
     * callback is over (cp__rbuf_settle). rbuf_live: inside a receive's
     * callback. */
    uint8_t *rbuf;
    size_t rbuf_size;
    struct cp_rbuf *rbuf_own, *rbuf_next;
    bool rbuf_live;

    /* Timer heap. */
    cp_wtimer **timers;
    uint32_t ntimers, captimers;

    /* Handles that still had input after their fair share (epoll, IOCP). */
    cp_queue ready;

    /* Start of the current round, for cheap activity timestamps. */
    uint64_t now_ns;
    /* Rounds so far, and what is posted to run once at the end of this one,
     * after its outboxes are flushed and the count moved on. */
    uint32_t round;
    cp_posted *at_round_end;
    /* What the worker takes input from now (its callbacks run now), so that
     * a job queue that is full can pause it (jobq.c); NULL otherwise. */
    cp_feeder *feeder;
    cp_wmetrics *m; /* its metrics (cp_port.wm_mem) */
    /* What the current round did, as the layer above tells it
     * (cp__note_send, cp__note_recv), for the pause after fan-out; the
     * same over the last rounds (each round keeps seven eighths); and the
     * thread's CPU clock at its last pause (0: none yet). */
    uint32_t round_sends, round_recvs;
    uint32_t recent_sends, recent_recvs;
    uint64_t paused_cpu_ns;
};

/* What a layer above keeps for reuse and can give back: run on a worker
 * that trims (once quiet after load; port.c). */
typedef void (*cp_trim_fn)(void);
#define CP_TRIM_HOOKS 4

struct cp_port {
    const cp_backend_ops *be;
    void *be_shared;           /* backend state shared by the workers (IOCP's one port) */
    bool reuse_sockets;        /* cp_port_opts.iocp_reuse_sockets */
    unsigned fanout_pause_pct; /* cp_port_opts.fanout_pause_pct; 0: never */
    int nworkers;
    cp_worker *workers;
    void *wm_mem;               /* the workers' cp_wmetrics, each on cache lines of its own */
    atomic_bool stopping;       /* destroying: posts, timer starts and new queues are refused */
    atomic_bool exiting;        /* destroying, the queues drained: workers leave once idle */
    atomic_bool inboxes_closed; /* destroyed: nothing may be sent to a worker any more */
    atomic_uint rr;             /* round-robin cursor for posts and new sessions */
    atomic_int users;           /* objects that must be stopped before the destroy (services) */
    _Atomic(cp_trim_fn) trim_hooks[CP_TRIM_HOOKS]; /* cp__port_on_trim */

    /* Threads that are not workers of the port and are inside a call that
     * sends to a worker (cp__port_enter/hold): destroy waits for them. */
    atomic_int callers;
    /* The port's memory: one reference for the port until it is destroyed,
     * one per job queue and per public timer, so that their handles can be
     * given back after the destroy. */
    atomic_uint refs;

    /* Job queues that have not drained (jobq.c), for the destroy to close
     * and wait for. */
    pthread_mutex_t qlock;
    pthread_cond_t qcond;
    cp_queue queues;

    /* Start-up handshake: each worker reports its backend set-up. */
    pthread_mutex_t start_lock;
    pthread_cond_t start_cond;
    int nstarted, start_err;
};

/* The worker running on this thread, or NULL for threads the user owns. */
extern _Thread_local cp_worker *cp__self;

/* Calls that send to a worker from a thread that is not one of the port's
 * workers race cp_port_destroy, which waits for every such call in
 * progress. enter: 0 and counted, or -ESHUTDOWN (not counted) once the port
 * is being destroyed. hold: counted unconditionally, for a send the caller
 * already owes (a job queue's first push). hold_msgs: counted, or false
 * (not counted) once the inboxes are closed, when a send would be lost.
 * release ends any of them. On a worker of the port nothing is counted:
 * the destroy joins the workers before it frees anything. */
int cp__port_enter(cp_port *p);
void cp__port_hold(cp_port *p);
bool cp__port_hold_msgs(cp_port *p);
void cp__port_release(cp_port *p);
/* The port's memory (see cp_port.refs). */
void cp__port_ref(cp_port *p);
void cp__port_unref(cp_port *p);

/* Job queues (jobq.c) at cp_port_destroy: close every queue of the port
 * still open, then wait until every one of them has drained. */
void cp__jobq_close_all(cp_port *p);
void cp__jobq_wait_drained(cp_port *p);
/* True once q is closed (no job can be added). */
bool cp__jobq_closed(cp_jobq *q);

/* Sends msg to worker dst. On a worker of the same port it is batched in the
 * round's outbox; other threads push it at once. */
void cp__send_msg(cp_worker *dst, cp_msg_fn fn, void *a, void *b);
/* The same with the third word c. */
void cp__send_msg_c(cp_worker *dst, cp_msg_fn fn, void *a, void *b, uintptr_t c);
/* Sends msg to dst at once (never batched) on the urgent lane, which dst
 * replays before its inbox: for work that must not wait behind a backlog of
 * messages, such as a session's close. No order with other messages, not
 * even with earlier messages of the same thread. */
void cp__send_msg_urgent(cp_worker *dst, cp_msg_fn fn, void *a, void *b);
/* Foreign threads may batch several messages: begin, send_msg..., end. */
void cp__batch_begin(cp_port *port);
void cp__batch_end(cp_port *port);
cp_worker *cp__pick_worker(cp_port *port);
/* Any thread: fn runs on each worker that trims, from now on; a hook
 * registered twice runs once. At most CP_TRIM_HOOKS different ones. */
void cp__port_on_trim(cp_port *p, cp_trim_fn fn);
/* On w's own thread: p->fn runs later in this round (cp__post), or once at
 * its end (cp__post_round_end). */
static inline void cp__post(cp_worker *w, cp_posted *p)
{
    p->next = w->posted;
    w->posted = p;
}
/* On w's own thread: p->fn runs in its turn among the worker's writes, in
 * this round or a later one (see CP_WRITES_PER_ROUND in port.c). */
static inline void cp__post_write(cp_worker *w, cp_posted *p)
{
    p->next = NULL;
    *w->writes_tail = p;
    w->writes_tail = &p->next;
}

/* A send started, a receive handled: counted for the pause after fan-out
 * (port.c, fanout_pause). Owner only. */
static inline void cp__note_send(cp_worker *w) { w->round_sends++; }
static inline void cp__note_recv(cp_worker *w) { w->round_recvs++; }

static inline void cp__post_round_end(cp_worker *w, cp_posted *p)
{
    p->next = w->at_round_end;
    w->at_round_end = p;
}
/* True when called on a worker of this port. */
static inline bool cp__on_worker(const cp_port *p) { return cp__self && cp__self->port == p; }

/* The rx_lend of the backends that read into the worker's rbuf (epoll,
 * IOCP), and what they call around a receive's callback. */
bool cp__rbuf_lend(cp_worker *w, const uint8_t *p, size_t n, cp_loan *loan);
static inline void cp__rbuf_enter(cp_worker *w) { w->rbuf_live = true; }
void cp__rbuf_settle(cp_worker *w);

#endif
