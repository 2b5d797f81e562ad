/* SPDX-License-Identifier: MIT */
/*
 * The net layer: sessions, their send queues and flow control, services,
 * listeners, framing and groups. Built on the port and send buffer layers.
 * Nothing here is public.
 */
#ifndef CP_NET_H
#define CP_NET_H

#include "buf/sendbuf.h"
#include "port/port.h"

typedef struct cp_session cp_session;

/* A TCP peer's address: IPv4 or IPv6, so 28 bytes, not a
 * sockaddr_storage's 128 (every idle session carries one). */
typedef union cp_sockaddr {
    struct sockaddr sa;
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
} cp_sockaddr;

/* ------------------------------------------------------------------ sessions */

enum cp_session_state {
    CP_S_NEW = 0,     /* allocated, not yet on its worker */
    CP_S_CONNECTING,  /* client: connect in flight */
    CP_S_PROXY,       /* server with proxy_protocol: reading the PROXY header */
    CP_S_HANDSHAKING, /* TCP is up, a filter's handshake (TLS) is not done yet */
    CP_S_CONNECTED,
    CP_S_DRAINING,      /* cp_session_shutdown: no new sends; queued ones go out, then FIN */
    CP_S_DISCONNECTING, /* a close was requested; it runs on the owner soon */
    CP_S_CLOSING,       /* disconnect started; waiting for completions */
    CP_S_CLOSED         /* every completion arrived; left the service */
};

/* How many distinct chunks a send queue charges once each (sendq.c). */
#define CP_SENDQ_CHUNKS 4

typedef struct cp_sendq {
    /* Entries: buffer pointers; two low bits say how a chunk-carved
     * buffer whose chunk has no slot in chunks[] is charged (sendq.c). */
    /* The entries, in a ring of cap places (a power of two); while cap is 0
     * the queue holds at most one entry, in place of the ring's pointer, so
     * that a session that writes a packet at a time, or an idle one, has no
     * ring at all. */
    union {
        uintptr_t *ring;
        uintptr_t one;
    };
    uint32_t head, count, cap;
    uint32_t first_off; /* bytes of ring[head] already written */
    size_t bytes;       /* unsent bytes in the queue */
    size_t mem;         /* accounted memory: every entry's charge, and the ring */
    size_t soft;        /* above this mem, small buffers are copied (set by push) */
    uint32_t inflight;  /* entries from the head a pending send reads */
    uint32_t tidy;      /* entries from the head compaction has been through */
    uint32_t regrow;    /* capacity a freed ring comes back at (0: the least) */
    bool framed;        /* every buffer pushed is sent framed (a WebSocket server's queue) */
    struct {
        struct cp_chunk *c;
        uint32_t n; /* queued entries charged through this slot */
    } chunks[CP_SENDQ_CHUNKS];
} cp_sendq;

/* The send queue (sendq.c), owner thread only. push takes over one
 * reference to b unless it fails: -ENOBUFS when what the queue would account
 * passes limit (an empty queue takes any b of at most limit bytes), -ENOMEM;
 * the caller keeps b then. In a framed queue, b is sent with the frame
 * header its close wrote into its headroom in front (sendbuf.h: one
 * WebSocket binary message); a view, which has no headroom, is queued as a
 * copy. gather fills at most max_iov entries with the
 * unsent bytes from the front, stopping once max_bytes are reached, and
 * returns how many; pending says that a send which reads those n entries'
 * memory is in flight, landed that it completed; consume drops the first n
 * bytes (written) and returns how many of them were the user's (not frame
 * headers, not a filter's own buffers: what on_sent counts; a block the
 * queue copied frames into counts its user bytes when its last byte goes);
 * clear releases everything and the ring. */
int cp__sendq_push(cp_sendq *q, cp_sendbuf *b, size_t limit);
/* Takes the first entry out whole, with the queue's reference to it; NULL
 * if there is none, or it is partly written or read by a pending send. */
cp_sendbuf *cp__sendq_pop(cp_sendq *q);
int cp__sendq_gather(cp_sendq *q, struct iovec *iov, int max_iov, size_t max_bytes);
size_t cp__sendq_consume(cp_sendq *q, size_t n);
void cp__sendq_clear(cp_sendq *q);
static inline void cp__sendq_pending(cp_sendq *q, int n) { q->inflight = (uint32_t)n; }
static inline void cp__sendq_landed(cp_sendq *q) { q->inflight = 0; }
/* The memory the queue accounts (what send_queue_limit is compared with):
 * each entry's charge plus the ring. Cheap: a field. */
static inline size_t cp__sendq_mem(const cp_sendq *q) { return q->mem; }
/* What pushing b would add to the queue's memory as things stand (before
 * any copying the queue may decide on). */
size_t cp__sendq_charge(const cp_sendq *q, const cp_sendbuf *b);

/* ------------------------------------------------------------------ filters */

/*
 * A byte-stream filter between the socket and the framer (TLS, WebSocket):
 * docs/design.md, "The seam for byte-stream filters". A layer above net
 * implements the operations; net calls them on the session's owner and
 * knows nothing else of the filter. The kind is what a service holds (the
 * public cp_tls begins with one); each session of the service gets its own
 * filter, which begins with a cp_filter. A session may have a chain of them
 * (TLS outside, WebSocket inside): the outermost meets the socket, the
 * innermost the framer; each one's input goes on to the one inside it
 * (cp__filter_pass), and each one encodes what the one inside it made
 * (cp__filter_source).
 */
typedef struct cp_filter cp_filter;
typedef struct cp_filter_kind cp_filter_kind;

typedef struct cp_filter_ops {
    /* A new session's filter; NULL when out of memory. */
    cp_filter *(*attach)(cp_filter_kind *k, cp_session *s);
    /* The stream under the filter is up (TCP, or the filter outside it is
     * done with its handshake): begin the handshake (a client appends its
     * hello to the wire queue). 0, or -errno to close the session. */
    int (*start)(cp_filter *f);
    /* Bytes from below. Passes what it decodes on with cp__filter_pass
     * (after cp__filter_up, once its handshake is done) and returns the
     * packets that made; closes the session itself on a bad stream. */
    size_t (*input)(cp_filter *f, const uint8_t *data, size_t n);
    /* The queue of what the filter made, which the filter outside it
     * encodes, or the session writes; NULL: the filter frames its source in
     * place, so that queue is its output too (a WebSocket server's frames
     * are the user's own buffers, each header in its headroom). */
    cp_sendq *(*wire)(cp_filter *f);
    /* Turns what its source queue (cp__filter_source) holds into wire bytes. */
    void (*encode)(cp_filter *f);
    /* A draining session has written everything: append the end of the
     * stream (TLS close_notify); true if anything was appended. */
    bool (*finish)(cp_filter *f);
    /* n bytes of the wire queue were written: how many bytes of its source
     * that completes (for the innermost, the user's: on_sent). NULL when
     * the wire queue says it itself: its buffers' framing is all the
     * filter adds (sendbuf.h; a WebSocket's headers and masked copies). */
    size_t (*written)(cp_filter *f, size_t n);
    /* The session is about to close hard with reason (its socket still
     * open, its state not yet changed): last words, written at once, best
     * effort (a WebSocket Close with the reason's code). May be NULL. */
    void (*closing)(cp_filter *f, int reason);
    /* The session has finished (its wire queue is cleared): free the filter. */
    void (*detach)(cp_filter *f);
    void (*kind_ref)(cp_filter_kind *k);
    void (*kind_unref)(cp_filter_kind *k);
} cp_filter_ops;

struct cp_filter_kind {
    const cp_filter_ops *ops;
    uint32_t handshake_ms; /* the handshake's deadline (CP_REASON_HANDSHAKE_TIMEOUT) */
    uint8_t fail_reason;   /* a cp_reason: what a failed start closes with */
};

/* Small, as it is with every session of a service with filters; where a
 * filter sits in the chain is the session's (cp_session.flt). */
struct cp_filter {
    cp_filter_kind *kind; /* set by net after attach; its operations are kind->ops */
    cp_session *s;
};

/* At most this many filters on one session (TLS, then WebSocket). */
#define CP_FILTERS_MAX 2

/* On the owner, from a filter's input: its handshake is done. The filter
 * inside it starts now; after the innermost, the session is connected (on_connected runs). */
void cp__filter_up(cp_filter *f);
/* On the owner: bytes f decoded go on to the filter inside it, or to the
 * framer; returns the packets that made. */
size_t cp__filter_pass(cp_filter *f, const uint8_t *data, size_t n);
/* The queue f encodes from: what the filter inside it made, or the
 * session's own send queue. */
cp_sendq *cp__filter_source(cp_filter *f);
/* The filter of the given operations on s (the chain's), or NULL. */
cp_filter *cp__session_filter(const cp_session *s, const cp_filter_ops *ops);
/* On the owner: the filter appended to the wire queue by itself (a
 * handshake flight, a TLS KeyUpdate): write it this round. */
void cp__session_wire_ready(cp_session *s);
/* On the owner: write what filter f made now rather than at the end of
 * the round, for a fatal alert or a Close that must leave before the close
 * that follows (a close drops what is still queued). */
void cp__session_wire_flush(cp_filter *f);
/* On the owner: the user's limit on what the session may queue, less what
 * the filter's wire queue already holds. */
size_t cp__session_queue_room(const cp_session *s);
/* The session takes bytes: connected, or in a filter's handshake (which
 * reads too), its socket still open. Defined in flow.c. */
bool cp__session_reading(const cp_session *s);
/* On the owner: the memory both send queues hold (what send_queue_limit and
 * the watermarks count). Defined in session.c. */
size_t cp__session_queued_mem(const cp_session *s);

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
    uint32_t tx_applied; /* tickets applied so far (owner only; see the held sends below) */
    /* Valid until the session finishes, which clears it (on the owner, with
     * release order). Other threads read it through cp_session_service() on a
     * kept session at any time, so it is atomic; the owner's own reads are
     * the implicit loads of an atomic, plain loads on x86 and one
     * load-acquire on ARM. */
    _Atomic(cp_service *) svc;
    void *ctx; /* the service's ctx, kept for sessions held past that */
    cp_worker *owner;
    uint64_t id;
    void *data;

    cp_handle h;
    cp_op rd, wr;
    int ops_pending;    /* armed ops; the session is released at 0 */
    uint32_t holds;     /* owner-side holders (armed ops, the dirty list): one reference for all */
    bool was_connected; /* on_connected ran */
    bool dirty;         /* posted to write its queue this round (flush) */
    bool is_client;
    bool drain_marked;    /* draining: the shutdown took its place in the order */
    bool wr_shut;         /* draining: everything written, FIN sent */
    bool peer_eof;        /* draining: the peer's FIN arrived */
    uint8_t drain_reason; /* draining: the reason on_disconnected will get */
    uint8_t flt_finished; /* draining: bit i set once flt[i]'s finish ran */
    cp_posted flush;      /* writes the queue at the round's end (session.c) */

    /* Bytes of an incomplete packet (or unconsumed raw bytes). */
    uint8_t *carry;
    uint32_t carry_len, carry_cap;

    cp_sendq sq;
    /* The send-queue memory last sampled into the worker's histogram, its
     * bucket (cp__session_sq_sample), and the owner's round of the last
     * sample a send took (owner only). */
    size_t sq_seen;
    uint32_t sq_round;
    uint8_t sq_bucket;
    /* The filters, outermost (the socket's side) first; flt[0] NULL: plain
     * TCP. Bit i of flt_finished: flt[i]'s finish ran. */
    cp_filter *flt[CP_FILTERS_MAX];

    /* Draining (cp_session_shutdown): closed hard at this time. Before the
     * first packet (which comes before any drain could matter to it): the
     * first packet's deadline, first_packet_timeout. */
    union {
        uint64_t drain_deadline_ns;
        uint64_t first_deadline_ns;
    };
    /* Sends that arrived before an earlier one (owner only): their buffers
     * wait here, sorted, until the tickets before them (tx_applied) have
     * been applied. */
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
    bool first_seen;  /* a whole packet (raw: bytes) has arrived */
    uint8_t flood_by; /* flood control: the limit that refused first (flow.c) */
    /* Counted in the service's caps by address, under peer (here: a byte
     * of padding that was free). */
    bool addr_counted;
    uint32_t rx_round, rx_round_bytes;
    /* Flood control: when a limit first refused this session, in the
     * worker's milliseconds (truncated, never 0); 0: not over. It and
     * flood_by sit in what was padding: the threshold costs no memory. */
    uint32_t flood_since;
    uint64_t rx_turned_ns; /* when the receive last paused (while paused) or resumed */
    uint64_t tat_pkts, tat_bytes;
    /* The per-id limits' theoretical arrival times (svc->nlimits of them),
     * allocated at the session's first packet on a limited id. */
    uint64_t *route_tat;
    cp_posted share_end; /* resumes a session paused for its share, next round */
    cp_feeder feeder;    /* what a full job queue pauses (flow.c) */
    cp_wtimer rx_tmo;

    cp_op cl; /* the close pseudo-operation (deferred, never submitted) */

    /* Groups this session is in; guarded by glock. */
    pthread_mutex_t glock;
    cp_group **groups;
    uint32_t ngroups, capgroups;

    /* The peer's address (with proxy_protocol, the client's from the header). */
    cp_sockaddr peer;
    socklen_t peer_len;

    /* Work bound to the session (session_work.c): posts and timer starts on
     * their way to the owner. Any thread pushes onto the stack; the owner
     * moves them to its list; the close closes the stack. */
    _Atomic(struct cp_swork *) work_stack;
    cp_queue work;   /* the owner's list, oldest first */
    cp_queue timers; /* armed session timers (owner only) */
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
/* Any thread: refuse sends from now on and close on the owner soon (never
 * inside a callback in progress). -ENOTCONN if already disconnecting. */
int cp__session_request_close(cp_session *s, cp_reason reason);
/* Any thread: the graceful close of cp_session_shutdown, ending with reason.
 * -ENOTCONN unless connected. */
int cp__session_shutdown(cp_session *s, uint32_t timeout_ms, cp_reason reason);
/* On the owner, from a filter refusing its handshake with an answer (an
 * HTTP error): the same graceful close from the handshake, so that the
 * answer is written and then FIN, and what the peer still sends is read
 * and dropped rather than reset over. The session never connected: it ends
 * with reason as a failed handshake. -ENOTCONN unless in a handshake. */
int cp__session_refuse(cp_session *s, uint32_t timeout_ms, cp_reason reason);

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
/* A new session's lists of work (session_work.c). */
void cp__session_work_init(cp_session *s);

/* Receive flow control (flow.c). A session's receive is paused while any
 * reason holds: its rate limit is spent (RATE), its send queue is above the
 * high watermark (SENDQ), it used its fair share of the worker's round
 * (SHARE), a job queue it fed is over its bound (QUEUE, jobq.c), its
 * filter holds input back (FILTER: a TLS handshake waiting its turn). While
 * paused nothing more is read from its socket, so TCP pushes back on the
 * peer. Owner only, except cp__rx_unblock_msg. */
enum { CP_RX_RATE = 1, CP_RX_SENDQ = 2, CP_RX_SHARE = 4, CP_RX_QUEUE = 8, CP_RX_FILTER = 16 };
void cp__rx_block(cp_session *s, unsigned why);
void cp__rx_unblock(cp_session *s, unsigned why);
/* A receive of n bytes holding packets packets was consumed. */
void cp__rx_account(cp_session *s, size_t n, size_t packets);
/* The send queue changed: pause above the high watermark, resume below the low. */
void cp__rx_sendq_check(cp_session *s);
/* The session is closing or draining: no reason holds any more; resume:
 * read again (draining reads and drops; a close cancels the receive anyway). */
void cp__rx_reset(cp_session *s, bool resume);
/* At creation. */
void cp__rx_init(cp_session *s);
/* Packet framing, while a receive is handled: takes one packet of this id
 * from the session's rate limit and the id's; false when either is spent:
 * the session is then paused, or closed (CP_REASON_FLOOD, or out of
 * memory for the limits' state). */
bool cp__rx_rate_packet(cp_session *s, uint16_t id);
/* The session has finished: its limits' state goes. */
void cp__rx_free(cp_session *s);
/* Frees a session's carry buffer of cap bytes (packet.c says where it is from). */
void cp__carry_free(uint8_t *carry, size_t cap);
/* On the owner, in a clean context: handles the backlog a pause left in
 * carry (packet.c), unless paused again. */
void cp__session_backlog(cp_session *s);
/* Any thread: unblock why on s, on its owner, by message (takes its own reference). */
void cp__rx_unblock_later(cp_session *s, unsigned why);

/* Groups: remove s from every group (on close). */
void cp__group_leave_all(cp_session *s);

/* A group's tap: a layer above (the bus) sees every buffer the group's
 * broadcasts queue, after the members got it, on the broadcasting thread.
 * The group holds a reference on the tap while it is set, and each
 * broadcast one while it calls it, so the tap outlives every call that can
 * reach it; unref drops one. skip is the session the broadcast left out.
 * closed runs (with no lock held) when cp_group_destroy clears the tap. */
typedef struct cp__group_tap cp__group_tap;
struct cp__group_tap {
    void (*fn)(cp__group_tap *t, cp_sendbuf *b, const cp_session *skip);
    void (*closed)(cp__group_tap *t);
    void (*ref)(cp__group_tap *t);
    void (*unref)(cp__group_tap *t);
};
/* Sets g's tap. -EBUSY if one is set, -ESHUTDOWN once g is destroyed. */
int cp__group_set_tap(cp_group *g, cp__group_tap *t);
/* Clears g's tap if it is t (closed does not run). */
void cp__group_clear_tap(cp_group *g, cp__group_tap *t);
/* Broadcast without the tap: for what the tap's owner received from elsewhere. */
int cp__group_broadcast_local(cp_group *g, cp_sendbuf *b);
/* The group's memory, for a tap that names it after cp_group_destroy. */
void cp__group_ref(cp_group *g);
void cp__group_unref(cp_group *g);

/* ------------------------------------------------------------------ services */

typedef struct cp_slot {
    cp_session *s;
    uint32_t gen;
    uint32_t next_free;
} cp_slot;

typedef struct cp_listener cp_listener;

/* ------------------------------------------------------------------ addresses (addr.c, proxy.c) */

/* What the caps by address count under: an IPv4 address (IPv4-mapped IPv6
 * too), or an IPv6 address's /64. */
typedef struct cp_addr_key {
    uint64_t hi, lo;
} cp_addr_key;
/* False for a family that is neither. */
bool cp__addr_key(const struct sockaddr *sa, socklen_t len, cp_addr_key *k);

/* Trusted ranges: parsed from "a/b,c/d" (-EINVAL, -ENOMEM); matched with
 * IPv4 and IPv4-mapped IPv6 alike. The array is freed with cp__free. */
typedef struct cp_cidr cp_cidr;
int cp__cidr_parse(const char *list, cp_cidr **out, uint32_t *n);
bool cp__cidr_match(const cp_cidr *v, uint32_t n, const struct sockaddr *sa, socklen_t len);

/* The caps by address and the total accept rate of one server (0 = off for
 * each); any thread, one lock, taken per accept and per finished session
 * only. max_sessions bounds the table (see addr.c). */
typedef struct cp_addrcap cp_addrcap;
int cp__addrcap_new(cp_addrcap **out, uint32_t per_addr, uint32_t rate_per_addr, uint32_t rate,
                    uint32_t max_sessions);
void cp__addrcap_free(cp_addrcap *c);
/* Any cap by address is on (else admit and release must not be called). */
bool cp__addrcap_by_addr(const cp_addrcap *c);
/* The total rate: true if one more connection fits now (and takes it). */
bool cp__addrcap_total(cp_addrcap *c, uint64_t now);
/* One more session from k: -1 if admitted (counted: release it when it
 * finishes), else the cp_refusal. */
int cp__addrcap_admit(cp_addrcap *c, cp_addr_key k, uint64_t now);
void cp__addrcap_release(cp_addrcap *c, cp_addr_key k);
/* Entries in the table now (for tests). */
size_t cp__addrcap_entries(cp_addrcap *c);

/* The longest PROXY header taken (v2 with its TLVs); longer is malformed. */
#define CP_PROXY_MAX 1024
/* A PROXY header (v1 or v2) at the start of the n bytes received so far:
 * its length, with *len 0 when the socket's own address stands (v2 LOCAL,
 * v1 UNKNOWN, a family with no address) or else *addr and *len the
 * client's; 0 if more bytes are needed; -1 if malformed. */
int cp__proxy_parse(const uint8_t *data, size_t n, cp_sockaddr *addr, socklen_t *len);

/* A service's traffic counters on one worker: written by that worker alone,
 * so adding is a plain load and store (no locked instruction, and no cache
 * line shared with other workers); readers sum the workers' blocks. */
typedef struct cp_traffic {
    atomic_uint_fast64_t bytes_in, bytes_out, packets_in, packets_out, unrouted;
    /* The worker's sessions by send-queue memory (cp_service_metrics): the
     * memory, and the sessions in each bucket but 0 (those with nothing
     * queued are the rest of the live ones). */
    atomic_uint_fast64_t sq_mem;
    atomic_uint_fast64_t sq_hist[CP_METRICS_BUCKETS];
} cp_traffic;
/* Each worker's cp_traffic on cache lines of its own. */
#define CP_TRAFFIC_STRIDE ((sizeof(cp_traffic) + 63) & ~(size_t)63)

struct cp_service {
    cp_port *port;
    cp_handlers h;
    void *ctx;
    bool is_client;
    bool proxy;                /* proxy_protocol: every connection begins with a PROXY header */
    atomic_bool stop_claimed;  /* a stop is under way (a second one gets -EALREADY) */
    atomic_bool stopping;      /* no new sessions: set once a draining stop's listener is closed */
    atomic_uint stop_drain_ms; /* the stop's drain, set before stopping: see session_connected */
    bool listener_closed;      /* under lock: it accepts nothing more */

    /* Session options, fixed at start. */
    cp_framing framing;
    uint32_t max_packet;
    size_t raw_limit; /* raw framing: unconsumed bytes at most (0: see packet.c) */
    size_t send_queue_limit;
    bool nodelay;
    uint32_t ka_idle_ms, ka_interval_ms, ka_probes; /* TCP keepalive; idle 0 = off */
    uint32_t user_timeout_ms;                       /* TCP_USER_TIMEOUT; 0 = off */
    uint64_t idle_timeout_ns, packet_timeout_ns;    /* 0 = off */
    uint64_t first_packet_ns;                       /* 0 = off */
    size_t sq_high, sq_low;                         /* send-queue watermarks (receive paused between) */
    uint32_t rate_pkts, rate_bytes;                 /* receive rate limit per second; 0 = none */
    uint64_t win_pkts_ns, win_bytes_ns;             /* the bursts, as time at those rates */
    uint64_t pkt_cost_ns;                           /* one packet at rate_pkts */
    cp_filter_kind *filters[CP_FILTERS_MAX];        /* outermost first, each a reference */
    uint8_t nfilters;                               /* 0 = plain TCP */
    cp_packet_fn *routes;                           /* indexed by id, nroutes entries */
    /* Per-id receive limits (flow.c): limit_of[id] is 1 + the limit's index
     * (0: none), for ids below nlimit_ids; each limit as a GCRA's cost of a
     * packet and burst window. */
    struct cp_id_limit {
        uint64_t cost_ns, win_ns;
    } * limits;
    uint16_t *limit_of;
    uint32_t nroutes, nlimit_ids, nlimits;
    uint32_t flood_ms;     /* flood control's second threshold; 0 = off */
    uint32_t route_stride; /* counters per worker in route_pkts (below) */

    /* Live-session table: slot + generation make the session id. */
    pthread_mutex_t lock;
    pthread_cond_t drained;
    cp_slot *slots;
    uint32_t nslots, free_head, live; /* live = occupied slots */
    int objects;                      /* live sessions + listener, for stop */

    cp_listener *listener;
    cp_addrcap *caps; /* caps by address and accept rate; NULL: none */
    cp_cidr *trusted; /* proxy_protocol: proxy_trusted, ntrusted ranges */
    uint32_t ntrusted;
    uint32_t proxy_timeout_ms;    /* proxy_protocol: the header's deadline */
    struct sockaddr_storage addr; /* server: bound address; client: target */
    socklen_t addr_len;

    struct {
        atomic_uint_fast64_t connected, disconnected, accepted, rejected, connect_failed, accept_errors;
        atomic_uint_fast64_t by_reason[CP_REASON_COUNT_];
        atomic_uint_fast64_t refused[CP_REFUSED_COUNT_]; /* [MAX_SESSIONS] unused: rejected */
    } st;
    /* Per worker of the port, 64-byte aligned, CP_TRAFFIC_STRIDE apart:
     * the traffic, then the packets by route id (nroutes counters, rounded
     * up to whole cache lines: route_stride of them). */
    uint8_t *traffic;
    void *traffic_mem;
    atomic_uint_fast64_t *route_pkts;
};

/* Whether a packet of this id is under any receive limit (flow.c; then each one is
 * taken through cp__rx_rate_packet). */
static inline bool cp__rx_limited(const cp_service *svc, uint16_t id)
{
    return svc->rate_pkts || (id < svc->nlimit_ids && svc->limit_of[id]);
}

/* Table slot management (service.c). */
int cp__service_add_session(cp_service *svc, cp_session *s);
void cp__service_session_done(cp_service *svc, cp_session *s);
void cp__service_object_done(cp_service *svc);
/* The listener has closed: every connection it accepted is in the table. */
void cp__service_listener_done(cp_service *svc);
/* A new connection from peer may go on (-1), or the cp_refusal that closes
 * it at once: the total accept rate, the trusted proxies, and (without
 * proxy_protocol) the caps by address, which then count s (addr_counted).
 * Any thread. */
int cp__service_admit_accept(cp_service *svc, const cp_sockaddr *peer, socklen_t len, bool *counted);
/* The caps by address for a session whose PROXY header gave its address:
 * -1 (counted) or the cp_refusal. */
int cp__service_admit_session(cp_service *svc, cp_session *s);
/* Counts a refusal of that cause. */
void cp__service_refused(cp_service *svc, int cause);
int cp__addr_str(const struct sockaddr *sa, socklen_t len, char *buf, size_t size);
int cp__resolve(const char *host, uint16_t port, bool passive, struct sockaddr_storage *ss, socklen_t *len);

/* Raw framing: the most bytes on_recv may leave unconsumed (a layer above
 * whose messages are larger than a packet); before the first session. */
void cp__service_set_raw_limit(cp_service *svc, size_t bytes);

/* Listener (listener.c). */
int cp__listener_start(cp_service *svc, int backlog, int accepts, bool reuseport);
void cp__listener_stop(cp_service *svc);

static inline void cp__stat_add(atomic_uint_fast64_t *c, uint64_t v)
{
    atomic_fetch_add_explicit(c, v, memory_order_relaxed);
}

/* On the owner worker w only: see cp_traffic. */
static inline cp_traffic *cp__traffic(cp_service *svc, const cp_worker *w)
{
    return (cp_traffic *)(void *)(svc->traffic + CP_TRAFFIC_STRIDE * (size_t)w->index);
}

static inline void cp__traffic_add(atomic_uint_fast64_t *c, uint64_t v) { cp__own_add(c, v); }

/* On the owner: a packet with this id was handed to its handler. */
static inline void cp__route_count(cp_session *s, uint16_t id)
{
    cp_service *svc = s->svc;
    if (id < svc->nroutes)
        cp__own_add(&svc->route_pkts[(size_t)svc->route_stride * (size_t)s->owner->index + id], 1);
    else
        cp__own_add(&cp__traffic(svc, s->owner)->unrouted, 1);
}

/* On the owner: the session's send-queue memory may have changed; moves it
 * in its worker's histogram (cp_traffic.sq_hist). A bucket computed and
 * compared, and one add; two more when it changed bucket. */
void cp__session_sq_sample(cp_session *s);

#endif
