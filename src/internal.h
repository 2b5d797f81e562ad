/* SPDX-License-Identifier: MIT */
/*
 * Internal declarations shared by the layers of cport. Nothing here is public.
 */
#ifndef CP_INTERNAL_H
#define CP_INTERNAL_H

#include "cport.h"
#include "port/backend.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#define CP_UNUSED(x) ((void)(x))

/* ------------------------------------------------------------------ core.c */

void cp__log(cp_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
uint64_t cp__now_ns(void);
void *cp__xalloc(size_t n); /* malloc that returns NULL; zeroed */

/* ------------------------------------------------------------------ misuse checks */

/* CP_ASSERT(cond, "message"): a check of the caller's side of a contract
 * (a misuse of the API, not an internal invariant). In builds with the CMake
 * option CP_ASSERTS (on by default for Debug, sanitizer, fuzz and soak
 * builds) a false cond prints "cport: misuse: message (file:line)" to stderr
 * and aborts, so a fuzzer or a sanitizer run names the misuse instead of
 * finding corrupted memory later. Elsewhere it compiles to nothing and cond
 * is not evaluated. */
_Noreturn void cp__misuse(const char *msg, const char *file, int line);
int cp__asserts_on(void); /* 1 when built with CP_ASSERTS (for tests) */
#ifdef CP_ASSERTS
#  define CP_ASSERT(cond, msg) ((cond) ? (void)0 : cp__misuse((msg), __FILE__, __LINE__))
#else
#  define CP_ASSERT(cond, msg) ((void)sizeof(!(cond)))
#endif

/* Live-object registry for the misuse checks: ports and services are added
 * when created and removed just before they are freed, so that a second
 * cp_port_destroy or cp_service_stop is caught on entry without reading the
 * freed object. Only in CP_ASSERTS builds; elsewhere it costs nothing. */
enum { CP_LIVE_PORT, CP_LIVE_SERVICE };
#ifdef CP_ASSERTS
void cp__live_add(int kind, const void *p);
void cp__live_del(int kind, const void *p);
bool cp__live_has(int kind, const void *p);
#else
static inline void cp__live_add(int kind, const void *p) { (void)kind, (void)p; }
static inline void cp__live_del(int kind, const void *p) { (void)kind, (void)p; }
static inline bool cp__live_has(int kind, const void *p) { return (void)kind, (void)p, true; }
#endif

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

/* ------------------------------------------------------------------ port */

typedef struct cp_session cp_session;

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

    /* Sessions with queued bytes to write at the end of the round. */
    cp_session *dirty;

    /* Completions known before their operation could finish (cancellations). */
    struct cp_deferred {
        cp_op *op;
        int res;
    } *deferred;
    size_t ndeferred, capdeferred;

    /* Receive buffer shared by every session of this worker. */
    uint8_t *rbuf;
    size_t rbuf_size;

    /* Timer heap. */
    cp_wtimer **timers;
    uint32_t ntimers, captimers;

    /* Handles that still had input after their fair share (epoll). */
    cp_handle *ready;

    /* Start of the current round, for cheap activity timestamps. */
    uint64_t now_ns;
    /* Rounds so far, and the sessions whose receive is paused until the end
     * of this one because they used their fair share of it (flow.c). */
    uint32_t round;
    cp_session *share_paused;
    /* The session whose received bytes are being handled (its callbacks run
     * now), so that a job queue that is full can pause it (jobq.c). */
    cp_session *rx_session;
};

struct cp_port {
    const cp_backend_ops *be;
    void *be_shared; /* backend state shared by the workers (IOCP's one port) */
    bool reuse_sockets; /* cp_port_opts.iocp_reuse_sockets */
    int nworkers;
    cp_worker *workers;
    atomic_bool stopping;  /* destroying: posts, timer starts and new queues are refused */
    atomic_bool exiting;   /* destroying, the queues drained: workers leave once idle */
    atomic_bool inboxes_closed; /* destroyed: nothing may be sent to a worker any more */
    atomic_uint rr;        /* round-robin cursor for posts and new sessions */
    atomic_int services;   /* live services */

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
    cp_jobq *queues;

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
/* True when called on a worker of this port. */
static inline bool cp__on_worker(const cp_port *p) { return cp__self && cp__self->port == p; }

/* ------------------------------------------------------------------ send buffers */

struct cp_sendbuf {
    atomic_uint refs;
    uint32_t len;
    uint32_t cap;
    uint32_t big_class;     /* allocated alone: its size class, or BIG_NONE */
    struct cp_chunk *chunk; /* NULL for buffers allocated alone */
    uint8_t data[];
};

/* big_class of a block a send queue copied small buffers into (sendq.c):
 * allocated alone, never shared, freed by the last unref. */
#define CP_SENDBUF_BLOCK (UINT32_MAX - 1)

/* The memory b may keep alive while it is referenced, about what malloc
 * took for it: for a buffer carved from a chunk, the whole chunk (any one
 * buffer can keep it); for one allocated alone, its allocation. */
extern const size_t cp__sendbuf_chunk_charge;
size_t cp__sendbuf_alone_charge(const cp_sendbuf *b);
static inline size_t cp__sendbuf_charge(const cp_sendbuf *b)
{
    return b->chunk ? cp__sendbuf_chunk_charge : cp__sendbuf_alone_charge(b);
}
/* A send queue's private block of cap bytes (len 0, one reference), and the
 * same block grown to cap bytes (realloc: it may move; NULL leaves b as it
 * was). */
/* A send queue's own blocks (sendq.c): whole pages, of at least cap bytes
 * of data; growing one may move it. What a block of cap bytes is charged. */
cp_sendbuf *cp__sendbuf_block_new(size_t cap);
cp_sendbuf *cp__sendbuf_block_grow(cp_sendbuf *b, size_t cap);
size_t cp__sendbuf_block_charge(size_t cap);
/* Bytes of free big buffers kept in the pools. */
size_t cp__sendbuf_pooled(void);
/* Bytes the free pools of chunks and big buffers hold (for tests). */
static inline bool cp__sendbuf_is_block(const cp_sendbuf *b) { return b->big_class == CP_SENDBUF_BLOCK; }
/* Gives the pooled free chunks and large buffers back to malloc (a worker
 * calls it when it goes quiet after load; the pools refill on demand). */
void cp__sendbuf_trim(void);

/* ------------------------------------------------------------------ pages and slabs */

/* AddressSanitizer builds: the slabs and the page cache hand out malloc's
 * memory, so that ASan sees every use after free (slab.c, pages.c). */
#if defined(__SANITIZE_ADDRESS__)
#  define CP_ASAN 1
#elif defined(__has_feature)
#  if __has_feature(address_sanitizer)
#    define CP_ASAN 1
#  endif
#endif

/* Runs of whole pages for the send path's bulk memory, kept for reuse until
 * a worker trims (pages.c). Any thread. Not zeroed. */
void *cp__pages_get(size_t bytes); /* bytes: a multiple of CP_PAGE */
void cp__pages_put(void *p, size_t bytes);
void cp__pages_trim(void);
size_t cp__pages_cached(void); /* bytes kept for reuse */
size_t cp__pages_in_use(void); /* bytes handed out and not given back */
static inline size_t cp__pages_round(size_t n) { return (n + CP_PAGE - 1) & ~(size_t)(CP_PAGE - 1); }


/* Objects of one size in blocks of pages of their own (slab.c). Any thread. */
typedef struct cp_slab {
    pthread_mutex_t lock;
    size_t size;                            /* of an object; a multiple of 16 */
    struct slab_block *avail, *avail_tail; /* blocks with a free place, fullest first */
    struct slab_block *spare;               /* an empty block, kept for the next object */
    size_t blocks;                          /* mapped, the spare included */
} cp_slab;
#define CP_SLAB_INIT(obj_size) {PTHREAD_MUTEX_INITIALIZER, ((obj_size) + 15u) & ~(size_t)15u, NULL, NULL, NULL, 0}
void *cp__slab_alloc(cp_slab *sl); /* zeroed, or NULL */
void cp__slab_free(cp_slab *sl, void *obj);
size_t cp__slab_blocks(cp_slab *sl);
/* False in sanitizer builds: objects are calloc's then (slab.c says why). */
extern const bool cp__slab_maps_pages;

/* ------------------------------------------------------------------ sessions */

enum cp_session_state {
    CP_S_NEW = 0,     /* allocated, not yet on its worker */
    CP_S_CONNECTING,  /* client: connect in flight */
    CP_S_CONNECTED,
    CP_S_DRAINING,    /* cp_session_shutdown: no new sends; queued ones go out, then FIN */
    CP_S_DISCONNECTING, /* a close was requested; it runs on the owner soon */
    CP_S_CLOSING,     /* disconnect started; waiting for completions */
    CP_S_CLOSED       /* every completion arrived; left the service */
};

/* How many distinct chunks a send queue charges once each (sendq.c). */
#define CP_SENDQ_CHUNKS 4

typedef struct cp_sendq {
    /* Entries: buffer pointers; two low bits say how a chunk-carved
     * buffer whose chunk has no slot in chunks[] is charged (sendq.c). */
    uintptr_t *ring; /* power-of-two capacity */
    uint32_t head, count, cap;
    uint32_t first_off; /* bytes of ring[head] already written */
    size_t bytes;       /* unsent bytes in the queue */
    size_t mem;         /* accounted memory: every entry's charge, and the ring */
    size_t soft;        /* above this mem, small buffers are copied (set by push) */
    uint32_t inflight;  /* entries from the head a pending send reads */
    uint32_t tidy;      /* entries from the head compaction has been through */
    uint32_t regrow;    /* capacity a freed ring comes back at (0: the least) */
    struct {
        struct cp_chunk *c;
        uint32_t n; /* queued entries charged through this slot */
    } chunks[CP_SENDQ_CHUNKS];
} cp_sendq;

/* The send queue (sendq.c), owner thread only. push takes over one
 * reference to b unless it fails: -ENOBUFS when what the queue would account
 * passes limit (an empty queue takes any b of at most limit bytes), -ENOMEM;
 * the caller keeps b then. gather fills at most max_iov entries with the
 * unsent bytes from the front, stopping once max_bytes are reached, and
 * returns how many; pending says that a send which reads those n entries'
 * memory is in flight, landed that it completed; consume drops the first n
 * bytes (written); clear releases everything and the ring. */
int cp__sendq_push(cp_sendq *q, cp_sendbuf *b, size_t limit);
int cp__sendq_gather(cp_sendq *q, struct iovec *iov, int max_iov, size_t max_bytes);
void cp__sendq_consume(cp_sendq *q, size_t n);
void cp__sendq_clear(cp_sendq *q);
static inline void cp__sendq_pending(cp_sendq *q, int n) { q->inflight = (uint32_t)n; }
static inline void cp__sendq_landed(cp_sendq *q) { q->inflight = 0; }
/* The memory the queue accounts (what send_queue_limit is compared with):
 * each entry's charge plus the ring. Cheap: a field. */
static inline size_t cp__sendq_mem(const cp_sendq *q) { return q->mem; }
/* What pushing b would add to the queue's memory as things stand (before
 * any copying the queue may decide on). */
size_t cp__sendq_charge(const cp_sendq *q, const cp_sendbuf *b);

struct cp_session {
    /* What a receive and a send touch comes first, so that a session costs a
     * worker as few cache lines as possible per message; the cold tail
     * (close op, groups, peer address) follows. */
    /* Low 32 bits: references. High 32 bits: send tickets handed to threads
     * other than the owner (see "Order" in session.c). One word, so that the
     * reference a cross-thread send takes for its message also takes its
     * ticket, in the same locked add. */
    _Atomic uint64_t rc;
    _Atomic int state;
    /* Valid until the session finishes, which clears it (on the owner, with
     * release order). Other threads read it through cp_session_service() on a
     * kept session at any time, so it is atomic; the owner's own reads are
     * the implicit loads of an atomic, plain loads on x86 and one
     * load-acquire on ARM. */
    _Atomic(cp_service *) svc;
    void *ctx;        /* the service's ctx, kept for sessions held past that */
    cp_worker *owner;
    uint64_t id;
    void *data;

    cp_handle h;
    cp_op rd, wr;
    int ops_pending;        /* armed ops; the session is released at 0 */
    uint32_t holds;         /* owner-side holders (armed ops, the dirty list): one reference for all */
    bool was_connected;     /* on_connected ran */
    bool dirty;             /* on owner->dirty */
    bool is_client;
    bool drain_marked;      /* draining: the shutdown took its place in the order */
    bool wr_shut;           /* draining: everything written, FIN sent */
    bool peer_eof;          /* draining: the peer's FIN arrived */
    uint8_t drain_reason;   /* draining: the reason on_disconnected will get */
    cp_session *dirty_next;

    /* Bytes of an incomplete packet (or unconsumed raw bytes). */
    uint8_t *carry;
    uint32_t carry_len, carry_cap;

    cp_sendq sq;

    /* Sends that arrived before an earlier one (owner only): their buffers
     * wait here, sorted, until the tickets before them have been applied. */
    uint32_t tx_applied;    /* tickets applied so far */
    uint64_t drain_deadline_ns; /* cp_session_shutdown: closed hard at this time */
    uint32_t nheld, capheld;
    struct cp_held *held;

    /* Idle and partial-packet timeouts: one timer, armed for the nearer. */
    uint64_t last_rx_ns;   /* last receive */
    uint64_t pkt_start_ns; /* when the incomplete packet in carry began */
    cp_wtimer tmo;

    /* Receive flow control (flow.c, owner only): why the receive is paused
     * (CP_RX_* bits; 0 = reading), since when, this round's share, and the
     * rate limit's theoretical arrival times (GCRA) with the timer that
     * resumes a session the limit paused. */
    uint8_t rx_block;
    bool rx_backlog;  /* carry holds the rest of a receive a pause stopped (packet.c) */
    uint32_t rx_round, rx_round_bytes;
    uint64_t rx_paused_ns;
    uint64_t tat_pkts, tat_bytes;
    cp_session *share_next;
    cp_wtimer rx_tmo;

    cp_op cl;               /* the close pseudo-operation (deferred, never submitted) */

    /* Groups this session is in; guarded by glock. */
    pthread_mutex_t glock;
    cp_group **groups;
    uint32_t ngroups, capgroups;

    struct sockaddr_storage peer;
    socklen_t peer_len;

    /* Work bound to the session (session_work.c): posts and timer starts on
     * their way to the owner. Any thread pushes onto the stack; the owner
     * moves them to its list; the close closes the stack. */
    _Atomic(struct cp_swork *) work_stack;
    struct cp_swork *work_head, *work_tail;
    struct cp_session_timer *timers; /* armed session timers (owner only) */
#ifdef CP_ASSERTS
    atomic_int user_refs; /* cp_session_ref minus cp_session_unref, for the misuse check */
#endif
};

cp_session *cp__session_new(cp_service *svc, cp_worker *owner, bool is_client);
/* On the owner: take over an accepted descriptor and start the session. */
void cp__session_start_accepted(cp_worker *w, void *s, void *fd, uintptr_t c);
/* On the owner: connect s with the socket fd (made by the caller). */
void cp__session_start_connect(cp_worker *w, void *s, void *fd, uintptr_t c);
/* Queue b on s (takes its own reference). Any thread. */
int cp__session_send(cp_session *s, cp_sendbuf *b);
/* The library's own references (cp_session_ref/unref are the user's). */
void cp__session_ref(cp_session *s);
void cp__session_unref(cp_session *s);
void cp__session_close(cp_session *s, cp_reason reason, int err);
/* End of round: write every dirty session once. */
void cp__session_flush_dirty(cp_worker *w);
/* Any thread: refuse sends from now on and close on the owner soon (never
 * inside a callback in progress). -ENOTCONN if already disconnecting. */
int cp__session_request_close(cp_session *s, cp_reason reason);
/* Any thread: the graceful close of cp_session_shutdown, ending with reason.
 * -ENOTCONN unless connected. */
int cp__session_shutdown(cp_session *s, uint32_t timeout_ms, cp_reason reason);

/* Packet/raw parser: consume received bytes for s; returns the packets
 * handed to handlers (raw framing: 0). */
size_t cp__session_input(cp_session *s, const uint8_t *data, size_t n);
/* The parser kept the start of an unfinished packet (raw: unconsumed bytes)
 * and set pkt_start_ns: the timeout timer may have to fire sooner. */
void cp__session_packet_started(cp_session *s);
/* The receive was paused or resumed (flow.c): the timeouts' deadlines moved.
 * Connected sessions only. */
void cp__session_timeout_rearm(cp_session *s);

/* On the owner, from the close, before on_disconnected: refuse further posts
 * and timer starts, end the session's timers and run the posts still on
 * their way (session_work.c). */
void cp__session_work_close(cp_session *s);

/* Receive flow control (flow.c). A session's receive is paused while any
 * reason holds: its rate limit is spent (RATE), its send queue is above the
 * high watermark (SENDQ), it used its fair share of the worker's round
 * (SHARE), a job queue it fed is over its bound (QUEUE, jobq.c). While
 * paused nothing more is read from its socket, so TCP pushes back on the
 * peer. Owner only, except cp__rx_unblock_msg. */
enum { CP_RX_RATE = 1, CP_RX_SENDQ = 2, CP_RX_SHARE = 4, CP_RX_QUEUE = 8 };
void cp__rx_block(cp_session *s, unsigned why);
void cp__rx_unblock(cp_session *s, unsigned why);
/* A receive of n bytes holding packets packets was consumed. */
void cp__rx_account(cp_session *s, size_t n, size_t packets);
/* The send queue changed: pause above the high watermark, resume below the low. */
void cp__rx_sendq_check(cp_session *s);
/* End of a round: the sessions paused for their share read again. */
void cp__rx_round_end(cp_worker *w);
/* The session is closing or draining: no reason holds any more; resume:
 * read again (draining reads and drops; a close cancels the receive anyway). */
void cp__rx_reset(cp_session *s, bool resume);
/* At creation. */
void cp__rx_init(cp_session *s);
/* Packet framing, while a receive is handled: takes one packet from the rate
 * limit; false (and the session paused) when it is over its rate. */
bool cp__rx_rate_packet(cp_session *s);
/* Frees a session's carry buffer of cap bytes (packet.c says where it is from). */
void cp__carry_free(uint8_t *carry, size_t cap);
/* On the owner, in a clean context: handles the backlog a pause left in
 * carry (packet.c), unless paused again. */
void cp__session_backlog(cp_session *s);
/* Any thread: unblock why on s, on its owner, by message (takes its own reference). */
void cp__rx_unblock_later(cp_session *s, unsigned why);

/* Groups: remove s from every group (on close). */
void cp__group_leave_all(cp_session *s);

/* ------------------------------------------------------------------ services */

typedef struct cp_slot {
    cp_session *s;
    uint32_t gen;
    uint32_t next_free;
} cp_slot;

typedef struct cp_listener cp_listener;

/* A service's traffic counters on one worker: written by that worker alone,
 * so adding is a plain load and store (no locked instruction, and no cache
 * line shared with other workers); readers sum the workers' blocks. */
typedef struct cp_traffic {
    atomic_uint_fast64_t bytes_in, bytes_out, packets_in;
    char pad_[64 - 3 * sizeof(atomic_uint_fast64_t)];
} cp_traffic;

struct cp_service {
    cp_port *port;
    cp_handlers h;
    void *ctx;
    bool is_client;
    atomic_bool stopping;

    /* Session options, fixed at start. */
    cp_framing framing;
    uint32_t max_packet;
    size_t send_queue_limit;
    bool nodelay;
    uint64_t idle_timeout_ns, packet_timeout_ns; /* 0 = off */
    size_t sq_high, sq_low;          /* send-queue watermarks (receive paused between) */
    uint32_t rate_pkts, rate_bytes;  /* receive rate limit per second; 0 = none */
    uint64_t win_pkts_ns, win_bytes_ns; /* the bursts, as time at those rates */
    uint64_t pkt_cost_ns;            /* one packet at rate_pkts */
    cp_packet_fn *routes; /* indexed by id, nroutes entries */
    uint32_t nroutes;

    /* Live-session table: slot + generation make the session id. */
    pthread_mutex_t lock;
    pthread_cond_t drained;
    cp_slot *slots;
    uint32_t nslots, free_head, live; /* live = occupied slots */
    int objects;                      /* live sessions + listener, for stop */

    cp_listener *listener;
    struct sockaddr_storage addr;     /* server: bound address; client: target */
    socklen_t addr_len;

    struct {
        atomic_uint_fast64_t connected, disconnected, rejected, connect_failed, accept_errors;
        atomic_uint_fast64_t by_reason[CP_REASON_COUNT_];
    } st;
    cp_traffic *traffic; /* one per worker of the port, 64-byte aligned */
    void *traffic_mem;
};

/* Table slot management (service.c). */
int cp__service_add_session(cp_service *svc, cp_session *s);
void cp__service_session_done(cp_service *svc, cp_session *s);
void cp__service_object_done(cp_service *svc);
int cp__addr_str(const struct sockaddr *sa, socklen_t len, char *buf, size_t size);
int cp__resolve(const char *host, uint16_t port, bool passive, struct sockaddr_storage *ss,
                socklen_t *len);

/* Listener (listener.c). */
int cp__listener_start(cp_service *svc, int backlog, int accepts);
void cp__listener_stop(cp_service *svc);

static inline void cp__stat_add(atomic_uint_fast64_t *c, uint64_t v)
{
    atomic_fetch_add_explicit(c, v, memory_order_relaxed);
}

/* On the owner worker w only: see cp_traffic. */
static inline cp_traffic *cp__traffic(cp_service *svc, const cp_worker *w) { return &svc->traffic[w->index]; }

static inline void cp__traffic_add(atomic_uint_fast64_t *c, uint64_t v)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + v, memory_order_relaxed);
}

#endif
