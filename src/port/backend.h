/* SPDX-License-Identifier: MIT */
/*
 * The internal backend contract. A backend turns one platform's I/O facility
 * (epoll, io_uring, IOCP) into completions: the core submits an operation on a
 * handle and later receives exactly one completion per submitted operation
 * (multishot operations: one per result, with CP_CQE_MORE while they stay
 * armed), carrying the result as bytes, a new descriptor, or -errno.
 *
 * A backend knows handles and operations, never sessions. Every function runs
 * on the worker that owns the handle, except wake(), which any thread may call.
 */
#ifndef CP_BACKEND_H
#define CP_BACKEND_H

#include "mem/mem.h"
#include "sys.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct cp_worker cp_worker;
typedef struct cp_op cp_op;
typedef struct cp_handle cp_handle;

/* The operation is still armed: more completions will follow. */
#define CP_CQE_MORE 1u

/* send() returns this when the operation is in flight; its completion follows. */
#define CP_PENDING (-1000000)

/* data is the received bytes for receive completions (lent to the callback
 * only for the duration of the call); NULL otherwise. The memory is the
 * worker's own (epoll's receive buffer, an io_uring provided buffer, IOCP's
 * read buffer) and no one else reads it during the call, so the layers
 * above may change the bytes in place (WebSocket unmasks there). */
typedef void (*cp_op_cb)(cp_worker *w, cp_op *op, int res, unsigned flags, const uint8_t *data);

enum cp_op_kind { CP_OP_ACCEPT = 1, CP_OP_CONNECT, CP_OP_RECV, CP_OP_SEND };

struct cp_op {
    cp_op_cb cb;
    uint8_t kind;
    uint8_t armed;  /* submitted and not finally completed */
    uint16_t batch; /* accept: results handed over per readiness pass (K) */
    uint16_t gen;   /* io_uring: bumped per submission; stale completions differ */
    uint8_t kicked; /* io_uring: the backend cancelled it to re-arm it (uring.c, recheck, pause) */
    uint8_t parked; /* io_uring: a paused receive, armed for the core but not in the kernel */
    cp_handle *h;   /* io_uring: the handle it was submitted on */
    void *be;       /* backend-private per-operation storage */
};

/* One socket known to a backend. Embedded in the object that owns it (a
 * session or a listener), which keeps it alive while any op on it is armed. */
struct cp_handle {
    int fd;
    /* Beside fd, so that the two fill one word. */
    unsigned on_ready : 1;  /* epoll, IOCP: on the worker's ready list; io_uring: on the recheck list */
    unsigned hup : 1;       /* epoll: the peer closed or the socket failed */
    unsigned fixed : 1;     /* io_uring: in the ring's file table, at index fd */
    unsigned rd_paused : 1; /* recv_pause: no bytes are read until recv_resume */
    unsigned hot : 1;       /* io_uring: reads more than it is given; received one buffer at a time */
    unsigned on_replay : 1; /* io_uring: on the worker's list of handles with held completions to deliver */
    cp_op *rd;              /* armed accept or receive (multishot) */
    cp_op *wr;              /* armed connect or send */
    cp_queue ready;         /* while on_ready: the list it is on */
    cp_queue replay;        /* io_uring: while on_replay, on the worker's replay list */
    void *be;               /* IOCP: the backend's record of the socket; io_uring: its held completions */
};

/* True if the n bytes at p lie within the size bytes at base (rx_lend). */
static inline bool cp__bytes_within(const uint8_t *p, size_t n, const uint8_t *base, size_t size)
{
    return p >= base && p <= base + size && n <= (size_t)(base + size - p);
}

typedef struct cp_backend_ops {
    const char *name;
    int (*init)(cp_worker *w);
    void (*fini)(cp_worker *w);
    /* Optional: run first and last thing on the worker's own thread; the port
     * reports a thread_init failure from cp_port_create. */
    int (*thread_init)(cp_worker *w);
    void (*thread_fini)(cp_worker *w);
    /* Waits up to timeout_ms (-1 forever, 0 not at all) and dispatches the
     * completions that are ready. Returns how many, or -errno. */
    int (*poll)(cp_worker *w, int timeout_ms);
    /* True while the backend has work that must not wait (no blocking poll). */
    int (*busy)(cp_worker *w);
    /* Optional: starts what the round queued (io_uring: its submission
     * queue) without taking completions, so that it runs before the worker
     * pauses (port.c, fanout_pause). Backends whose writes run in the round
     * leave it NULL. */
    void (*submit)(cp_worker *w);
    /* Makes a worker blocked in poll() return. Any thread. */
    void (*wake)(cp_worker *w);
    /* Starts watching h->fd on this worker. */
    int (*attach)(cp_worker *w, cp_handle *h);
    /* Multishot accept: completions carry a new descriptor (non-blocking,
     * close-on-exec) or -errno; an error without CP_CQE_MORE disarms it. */
    int (*accept)(cp_worker *w, cp_handle *h, cp_op *op);
    int (*connect)(cp_worker *w, cp_handle *h, cp_op *op, const struct sockaddr *sa, socklen_t len);
    /* Multishot receive into a backend-owned buffer; 0 bytes = peer closed. */
    int (*recv)(cp_worker *w, cp_handle *h, cp_op *op);
    /* Gather send. Returns bytes written if it completed at once, CP_PENDING if
     * a completion will follow, or -errno. The iovec array need not outlive the
     * call. A completion of -EAGAIN means "nothing written, writable now":
     * the core gathers again and resubmits. */
    int (*send)(cp_worker *w, cp_handle *h, cp_op *op, const struct iovec *iov, int iovcnt);
    /* Stop and start reading h, whether or not a receive is armed: while
     * paused, an armed receive stays armed (no final completion) but nothing
     * more is read from the socket, so the peer's sends fill its window and
     * TCP pushes back; a receive armed while paused waits for the resume.
     * Bytes the backend had already read when pause was called may still be
     * delivered after it (io_uring: completions already in the ring). */
    void (*recv_pause)(cp_worker *w, cp_handle *h);
    void (*recv_resume)(cp_worker *w, cp_handle *h);
    /* True if a pending send reads the memory its iovec named until its
     * completion (io_uring, IOCP): the core must not move those bytes. An
     * epoll send only waits for room, and gathers again. */
    bool send_holds_bufs;
    /* The writes a round makes before the worker polls again; 0 for no
     * bound. An epoll write happens inside the round, so the bound is how
     * long input waits behind writes (port.c, writes_run). io_uring and IOCP
     * only queue their writes in the round: they run in the kernel at the
     * next poll, which takes the new input right after them. */
    unsigned writes_per_round;
    /* The default share of the pause after fan-out (port.c,
     * cp_port_opts.fanout_pause_pct), in percent; 0: never pauses. A backend
     * whose sends cost the worker less writes more often at the same share,
     * and needs a longer pause for its writes to carry as much. */
    unsigned fanout_pause_pct;
    /* Cancels every armed op (each completes with -ECANCELED, later, never
     * inside this call) and closes the descriptor. */
    void (*close)(cp_worker *w, cp_handle *h);
    /* Optional: gives back memory the backend kept from a load that is over
     * (the worker has gone quiet); called between rounds, never in poll(). */
    void (*trim)(cp_worker *w);
    /* Lends out the receive buffer holding [p, p + n) that the completion
     * this worker is delivering reads (cp_sendbuf_from_recv, on the worker,
     * inside the completion's callback): fills loan, and does not reuse the
     * buffer until the loan is put back. False if p is not in such a buffer
     * or no more may be lent now: the caller copies the bytes. */
    bool (*rx_lend)(cp_worker *w, const uint8_t *p, size_t n, cp_loan *loan);
} cp_backend_ops;

#ifdef _WIN32
extern const cp_backend_ops cp__iocp_backend;
#else
extern const cp_backend_ops cp__epoll_backend;
#endif
#ifdef CP_HAVE_URING
extern const cp_backend_ops cp__uring_backend;
/* 0 if io_uring can be used here, else -errno with a reason for the log. */
int cp__uring_probe(const char **why);
/* Reads the backend's environment variables; port.c calls it once, with its
 * own, before any thread of the library exists (getenv is not thread-safe). */
void cp__uring_read_env(void);
#endif

/* Called by backends: deliver a completion after the current dispatch pass
 * (used for cancellations and results known at submission time). */
void cp__worker_defer(cp_worker *w, cp_op *op, int res);

/* The end of op on h: it is off its handle and disarmed before its last
 * callback runs, so that the callback may arm it again. Every backend ends
 * an operation through these. */
static inline void cp__op_detach(cp_handle *h, cp_op *op)
{
    if (h->rd == op)
        h->rd = NULL;
    if (h->wr == op)
        h->wr = NULL;
    op->armed = 0;
}

static inline void cp__op_finish(cp_worker *w, cp_handle *h, cp_op *op, int res, const uint8_t *data)
{
    cp__op_detach(h, op);
    op->cb(w, op, res, 0, data);
}

/* A handle is on at most one such list at a time (on_ready): the ready list of
 * the inline-reading backends (epoll, IOCP: handles that still had input after
 * their fair share of reads, read again next round) or the io_uring recheck
 * list. A push puts h at the head, once; lists are taken from the head, so the
 * handle pushed last is served first, as ever. */
static inline void cp__hlist_push(cp_queue *list, cp_handle *h)
{
    if (h->on_ready)
        return;
    h->on_ready = 1;
    cp__queue_insert_head(list, &h->ready);
}

/* Takes h off whichever list it is on (on close), in O(1): also off a list a
 * backend took aside to walk (cp__queue_move), which then never meets it. */
static inline void cp__hlist_remove(cp_handle *h)
{
    if (!h->on_ready)
        return;
    cp__queue_remove(&h->ready);
    h->on_ready = 0;
}

/* The list's first handle, taken off it; NULL when the list is empty. */
static inline cp_handle *cp__hlist_pop(cp_queue *list)
{
    cp_queue *n = cp__queue_pop_head(list);
    if (!n)
        return NULL;
    cp_handle *h = CP_QUEUE_DATA(n, cp_handle, ready);
    h->on_ready = 0;
    return h;
}

#endif
