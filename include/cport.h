/* SPDX-License-Identifier: MIT */
/*
 * cport — the completion-port network core for game servers.
 *
 * One header, the whole public API. Every function that can fail returns 0 (or
 * a non-negative value) on success and a negative errno-style code on failure;
 * cp_strerror() names it. A call that fails never fires a callback later.
 *
 * Threads: a cp_port owns N worker threads. Every callback runs on a worker.
 * Callbacks of one session never run concurrently with each other, so the
 * session's own state needs no lock inside them. Functions marked "any thread"
 * may be called from workers and from threads the user owns.
 *
 * Misuse: builds with the CMake option CP_ASSERTS (on by default for Debug
 * and sanitizer builds, off for release) check the caller's side of some
 * contracts and abort with "cport: misuse: <what> (file:line)" on stderr
 * when it is broken; each such check is named "Misuse:" below. Release
 * builds do not check: the behaviour of a misuse is undefined there.
 */
#ifndef CPORT_H
#define CPORT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h> /* memcpy, for the float helpers below */
#ifdef _WIN32
/* cport returns negative errno values on Windows too. The C runtime's errno.h
 * has the POSIX network codes but not ESHUTDOWN; cport uses Winsock's value. */
#  include <errno.h>
#  ifndef ESHUTDOWN
#    define ESHUTDOWN 10058
#  endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(CPORT_SHARED)
#  ifdef CPORT_BUILDING
#    define CP_API __declspec(dllexport)
#  else
#    define CP_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define CP_API __attribute__((visibility("default")))
#else
#  define CP_API
#endif

#define CP_VERSION_MAJOR 0
#define CP_VERSION_MINOR 1
#define CP_VERSION_PATCH 0

typedef struct cp_port cp_port;
typedef struct cp_service cp_service;
typedef struct cp_session cp_session;
typedef struct cp_sendbuf cp_sendbuf;
typedef struct cp_group cp_group;
typedef struct cp_tls cp_tls;
typedef struct cp_ws cp_ws;

/* ------------------------------------------------------------------ errors */

/* Describes an error code returned by any cp_ function or passed to a
 * callback (a negative errno value) in a few words: "connection refused".
 * Non-negative values give "success"; codes cport does not know give
 * "unknown error". Never NULL; the string is constant. Any thread. */
CP_API const char *cp_strerror(int err);
/* The symbolic name of the same code, for logs and tests: "ECONNREFUSED".
 * Non-negative values give "OK", codes cport does not know "UNKNOWN". Where
 * two names share one value on a system (EOPNOTSUPP and ENOTSUP on Linux) the
 * library's own name is given. Never NULL; constant; any thread. Every code
 * the library returns has a name and a text (one table gives both). */
CP_API const char *cp_err_name(int err);

/* Why a session ended; passed to on_disconnected. */
typedef enum cp_reason {
    CP_REASON_NONE = 0,
    CP_REASON_PEER_CLOSED,          /* the peer closed its side (read returned 0) */
    CP_REASON_RESET,                /* connection reset or aborted by the peer */
    CP_REASON_LOCAL,                /* cp_session_disconnect() */
    CP_REASON_IO_ERROR,             /* another socket error; see the err argument */
    CP_REASON_BAD_HEADER,           /* packet header size < 4 */
    CP_REASON_TOO_BIG,              /* packet header size > max_packet */
    CP_REASON_HANDLER,              /* a packet handler returned a negative value */
    CP_REASON_SEND_OVERFLOW,        /* the send queue's memory would exceed send_queue_limit */
    CP_REASON_IDLE_TIMEOUT,         /* nothing received for idle_timeout_ms */
    CP_REASON_PACKET_TIMEOUT,       /* a packet was started but not finished in time */
    CP_REASON_STOPPING,             /* the service is stopping */
    CP_REASON_NO_MEMORY,            /* the session could not get memory it needed */
    CP_REASON_TLS,                  /* TLS failed: a handshake the peer or we refused, a bad
                                 record, a renegotiation attempt (err: -EPROTO, or
                                 -ECONNABORTED for an end of stream without close_notify) */
    CP_REASON_HANDSHAKE_TIMEOUT,    /* the TLS handshake or the WebSocket upgrade did not
                                 finish in time */
    CP_REASON_WEBSOCKET,            /* WebSocket: a refused or malformed upgrade, a frame
                                 RFC 6455 forbids, a text message not allowed, a message
                                 over the limit, a missing pong (err -EPROTO, -EMSGSIZE,
                                 -ETIMEDOUT); the peer got the matching Close code */
    CP_REASON_KEEPALIVE,            /* the peer answered no TCP keepalive probe: it vanished
                                 while the connection was idle (keepalive_idle_ms) */
    CP_REASON_USER_TIMEOUT,         /* what the session sent went unacknowledged for
                                 user_timeout_ms: the peer vanished with data in flight */
    CP_REASON_FIRST_PACKET_TIMEOUT, /* no whole packet (raw framing: no bytes) within
                                    first_packet_timeout_ms of connecting */
    CP_REASON_PROXY,                /* proxy_protocol: the PROXY header was malformed, or not
                                    complete within proxy_timeout_ms (never connected:
                                    counted in by_reason, no callback) */
    CP_REASON_FLOOD,                /* held back by a receive rate limit (the session's or
                                    a route's) without a break for flood_ms: a flooder */
    CP_REASON_COUNT_
} cp_reason;

/* A short constant string naming the reason ("peer closed", ...). */
CP_API const char *cp_reason_str(cp_reason reason);

/* Why a server closed a new connection at once, before any session work or
 * callback (cp_service_stats.refused). */
typedef enum cp_refusal {
    CP_REFUSED_MAX_SESSIONS = 0, /* max_sessions were live (also cp_service_stats.rejected) */
    CP_REFUSED_PER_ADDR,         /* max_sessions_per_addr sessions from its address were live */
    CP_REFUSED_ADDR_RATE,        /* its address was over accept_rate_per_addr */
    CP_REFUSED_RATE,             /* the server was over accept_rate */
    CP_REFUSED_UNTRUSTED,        /* proxy_protocol: its source is not in proxy_trusted */
    CP_REFUSED_COUNT_
} cp_refusal;

/* A short constant string naming the cause ("max sessions", ...). */
CP_API const char *cp_refusal_str(cp_refusal cause);

/* ------------------------------------------------------------------ logging */

typedef enum cp_log_level { CP_LOG_DEBUG, CP_LOG_INFO, CP_LOG_WARN, CP_LOG_ERROR } cp_log_level;
typedef void (*cp_log_fn)(cp_log_level level, const char *msg, void *ud);

/* The library never prints on its own (but for the misuse message of a
 * CP_ASSERTS build, just before it aborts). Install a log sink (any thread;
 * NULL removes it). Messages are rare: backend choice, accept backoff, etc. */
CP_API void cp_set_log(cp_log_fn fn, void *ud);

/* ------------------------------------------------------------------ allocation */

/* Replaces the allocator cport uses for its own memory (as libuv's
 * uv_replace_allocator): malloc, realloc, calloc and free as one set, e.g.
 * to count what cport takes or to use jemalloc or mimalloc. Call it before
 * any other cport call: once cport has allocated anything it returns -EBUSY
 * (memory must go back to the allocator it came from). -EINVAL if any
 * function is NULL. Traffic's bulk memory (send buffer chunks, queue blocks,
 * sessions) is pages cport maps itself, not the allocator's. */
CP_API int cp_set_allocator(void *(*malloc_fn)(size_t), void *(*realloc_fn)(void *, size_t),
                            void *(*calloc_fn)(size_t, size_t), void (*free_fn)(void *));

/* ------------------------------------------------------------------ port */

typedef enum cp_backend {
    CP_BACKEND_AUTO = 0, /* io_uring where the kernel allows it, else epoll;
                            the CP_BACKEND environment variable overrides */
    CP_BACKEND_EPOLL,
    CP_BACKEND_URING,
    CP_BACKEND_IOCP
} cp_backend;

typedef struct cp_port_opts {
    int workers;        /* worker threads; 0 = one per CPU */
    cp_backend backend; /* CP_BACKEND_AUTO by default */
    /* Windows (IOCP) only: recycle the sockets of closed sessions with
     * DisconnectEx(TF_REUSE_SOCKET) and give them to AcceptEx again, instead
     * of closing and opening sockets. Off by default: Wine does not implement
     * it, so only the default path is tested in CI (docs/design.md). */
    int iocp_reuse_sockets;
    /* A worker whose writes fan out (a round that started 32 or more
     * sends, while its last rounds made four or more per receive: a room's
     * broadcasts) pauses before its next poll for this percentage of the
     * CPU time it used since its last pause, at most 1 ms. Meanwhile the
     * room's next packets arrive and queue, so each of its next writes
     * carries more of them: fewer, larger writes cost the server less per
     * delivery and each client fewer reads. At the default a loaded room
     * costs a fifth to a third less CPU per delivery with no worse tail latency
     * (bench/RESULTS.md); a packet waits for at most one pause more.
     * Request and reply traffic (a send per receive) never pauses. 0 = the
     * default: 25 on epoll, 50 on io_uring (its sends cost less, so at the
     * same share its writes stay smaller); -1 = never pause (each write as
     * soon as the round allows); at most 100. Linux only: Windows cannot sleep or count a
     * thread's CPU time that finely, and its workers never pause. */
    int fanout_pause_pct;
} cp_port_opts;

/* Creates a port and starts its workers. opts may be NULL.
 * -ENOTSUP if the requested backend is not available here. */
CP_API int cp_port_create(cp_port **out, const cp_port_opts *opts);

/* Stops and joins every worker and frees the port. Every service on it must
 * have been stopped first (-EBUSY otherwise, and nothing is freed). Must not be
 * called from a worker (-EDEADLK). In order:
 * - from its start, cp_port_post, cp_timer_start and cp_jobq_create on the
 *   port return -ESHUTDOWN; a call that had already passed that check
 *   finishes first (a post that returned 0 runs, below);
 * - every job queue of the port still open is closed (as by cp_jobq_close
 *   with no on_closed: later pushes return -ESHUTDOWN), and every job a push
 *   accepted runs, then the on_closed of a queue the user had closed, all
 *   on the workers (a job that pushes again meets the close: -ESHUTDOWN);
 * - the workers stop; posts that had not run yet run on the calling thread.
 * When it returns no callback of the port runs any more, and none will.
 * Timer handles and job queue references still held stay valid: give them
 * back afterwards (cp_timer_cancel answers 0 for a timer that never fired,
 * cp_jobq_unref frees the queue); the port's memory goes with the last one.
 * Any other call on the port after it returned is a misuse (it must not
 * start then). Misuse: destroying a port twice. */
CP_API int cp_port_destroy(cp_port *port);

/* Runs fn(arg) on some worker, soon. Any thread. -ESHUTDOWN once
 * cp_port_destroy has begun; a post that returned 0 runs exactly once, before
 * cp_port_destroy returns, also one that raced it. A post that lands on the
 * worker making it runs after that worker has polled its sockets again, so a
 * function that posts itself (work done in slices, a retry after -EAGAIN)
 * yields to I/O each time. */
CP_API int cp_port_post(cp_port *port, void (*fn)(void *arg), void *arg);

CP_API const char *cp_port_backend_name(const cp_port *port); /* "epoll", ... */
CP_API int cp_port_workers(const cp_port *port);

/*
 * Metrics (docs/design.md, "Metrics"). Counters the library keeps anyway,
 * cheaply: each worker writes its own (a plain load and store, no locked
 * instruction, no cache line shared with another worker), and a snapshot
 * sums them. Always on; a snapshot may be taken from any thread at any time
 * and is consistent per counter, not across counters.
 *
 * A histogram counts values in CP_METRICS_BUCKETS power-of-two buckets:
 * bucket 0 holds the value 0, bucket k (1 <= k < CP_METRICS_BUCKETS - 1) the
 * values in (2^(k-2), 2^(k-1)], and the last bucket everything above, so
 * cp_metrics_bucket_le(k) is 0, 1, 2, 4, ..., 2^31, then UINT64_MAX. The
 * counts are per bucket, not cumulative (Prometheus' are: add them up).
 */
#define CP_METRICS_BUCKETS 34
typedef struct cp_histogram {
    uint64_t count; /* values counted */
    uint64_t sum;   /* their sum */
    uint64_t buckets[CP_METRICS_BUCKETS];
} cp_histogram;
/* Bucket k's upper bound (inclusive): 0, then 2^(k-1); UINT64_MAX for the last. */
CP_API uint64_t cp_metrics_bucket_le(int k);

/* A worker's loop, or every worker's summed. Times in nanoseconds. */
typedef struct cp_worker_metrics {
    /* Rounds by how long each took, from its poll's return to the end of
     * the round (completions, messages, timers, posted work, writes): a
     * completion that arrives meanwhile waits at most that long. One clock
     * read per round. */
    cp_histogram round_ns;
    /* For each poll that found completions: how long they can have waited,
     * at most. A poll that had to wait for its first completion (the worker
     * was idle) counts 0; one that found completions already there (the
     * worker came straight from the last round) counts the time since the
     * previous poll returned. No clock read of its own. */
    cp_histogram wait_ns;
    /* Jobs of the port's job queues by how long each waited between its
     * push and its start, measured on the worker's clocks of the round (a
     * push from a worker is stamped with its round's start, so this is an
     * upper bound by up to a round). */
    cp_histogram job_wait_ns;
    uint64_t inbox_depth;  /* messages sent to the worker and not run yet, now */
    uint64_t timers_armed; /* timers armed on it, at the end of its last round */
    /* io_uring's provided receive buffers (32 KiB each): how many the worker
     * has, how many are free (in the kernel's ring or waiting to go back),
     * how many keep bytes for paused sessions, and how many are lent to send
     * buffers (cp_sendbuf_from_recv: forwarded bytes not written yet, at
     * most a quarter); at its last poll. The rest are being handled. All 0
     * on other backends. */
    uint64_t recv_bufs, recv_bufs_free, recv_bufs_held, recv_bufs_lent;
    /* Pauses after fan-out (cp_port_opts.fanout_pause_pct) and their total
     * length, since the port started. */
    uint64_t fanout_pauses, fanout_pause_ns;
} cp_worker_metrics;

/* Fills out with worker's metrics, or with every worker's summed when
 * worker is -1 (cp_port_workers says how many there are). Any thread.
 * -EINVAL for a worker out of range. */
CP_API int cp_port_metrics_get(const cp_port *port, int worker, cp_worker_metrics *out);

/* Blocks the calling thread until the process is asked to stop: SIGINT or
 * SIGTERM on POSIX systems, Ctrl-C, Ctrl-Break or closing the console on
 * Windows. Returns the signal number (SIGINT/SIGTERM; Windows reports the
 * console events as SIGINT and SIGTERM too), or a negative errno. The handlers
 * are installed by cp_catch_stop_signals or by the first call; a stop request
 * that arrives after that and before the call is not lost. Lets a server's
 * main() wait the same way on every system. */
CP_API int cp_wait_stop_signal(void);

/* Installs the stop handlers now, without waiting: from here on a stop
 * request no longer ends the process but is kept for cp_wait_stop_signal.
 * For a program that waits in another thread and must not be killed by a
 * request that comes before that thread gets there. 0 or a negative errno;
 * any thread, any number of times. */
CP_API int cp_catch_stop_signals(void);

/* ------------------------------------------------------------------ job queues */

/* A job queue runs its jobs one at a time, in push order, on whichever worker
 * is free: game objects (rooms, say) put their work on one and need no lock.
 * A queue with work is scheduled once, never twice; a long queue yields its
 * worker after a time slice so other queues get a turn. */
typedef struct cp_jobq cp_jobq;

/* -ESHUTDOWN once cp_port_destroy has begun. */
CP_API int cp_jobq_create(cp_jobq **out, cp_port *port);
/* Any thread. -ESHUTDOWN once the queue is closed (cp_port_destroy closes the
 * port's queues). A push that returned 0 runs, before the port's destroy
 * returns. */
CP_API int cp_jobq_push(cp_jobq *q, void (*fn)(void *arg), void *arg);
/* Refuses further pushes (they return -ESHUTDOWN); the jobs already pushed
 * still run; then on_closed (may be NULL) runs on a worker. Safe from inside
 * one of the queue's own jobs. No job runs after on_closed. -ESHUTDOWN if the
 * queue is closed already; of several closes at once exactly one returns 0,
 * and only its on_closed runs (a close that fails never runs its own). */
CP_API int cp_jobq_close(cp_jobq *q, void (*on_closed)(void *arg), void *arg);
/* Closes the queue (unless it is closed already) and blocks until it has
 * drained: every job pushed before the close has run and the on_closed of an
 * earlier cp_jobq_close, if any, has returned. Returns 0, also for a queue
 * that had drained before the call; -EDEADLK from a worker of the queue's
 * port, where it could wait for itself (a job of the queue always runs on
 * one); -ENOMEM if the queue could not be closed (nothing changed then). The
 * caller must hold a reference for the duration of the call, and still owns
 * it afterwards. Threads the user owns only. */
CP_API int cp_jobq_close_wait(cp_jobq *q);
/* The creator holds one reference; the memory goes with the last one (a
 * closing queue keeps its own until it has drained). Any thread. A reference
 * may outlive the port: after cp_port_destroy the queue is closed and
 * drained, and cp_jobq_unref still frees it. */
CP_API void cp_jobq_ref(cp_jobq *q);
CP_API void cp_jobq_unref(cp_jobq *q);
/* The queue whose job is running on this thread, or NULL. */
CP_API cp_jobq *cp_jobq_current(void);
/* Backpressure: a session whose packet handler pushes onto a queue that has
 * more than high jobs pending is not read (TCP pushes back on its peer) until
 * the queue is back under low; the push itself always succeeds, and pushes
 * from elsewhere (timers, posts, user threads) are never held up. Default
 * 8192 / 2048: a job waits behind at most about that many (what a flooded
 * room adds to its members' latency); high 0 turns it off. While a worker's inbox is very deep a
 * queue's runner also waits (a millisecond at a time) before it runs more
 * jobs, so the queue fills to its bound instead. -EINVAL if low >= high != 0.
 * Any thread. */
CP_API int cp_jobq_set_bound(cp_jobq *q, uint32_t high, uint32_t low);

/* ------------------------------------------------------------------ timers */

/* One-shot (repeat_ms 0) or repeating timers with millisecond resolution.
 * fn(arg) runs on a worker, or as a job of q when q is not NULL. Each timer
 * costs O(log n) to arm, fire and cancel (a heap per worker).
 * A timer delivered through q ends when q closes: fn is not called for a
 * tick after the close (a job queued before the close still runs, as every
 * job does), and a repeating timer stops (it leaves its worker at its next
 * tick). cp_port_destroy ends every timer of the port.
 * out may be NULL for a timer that is never cancelled; otherwise the handle
 * must be given back with cp_timer_cancel() (also after a one-shot fired,
 * after its queue closed, and after cp_port_destroy: every handle can still
 * be given back then, and nothing leaks once all are).
 * -ESHUTDOWN if q is closed or cp_port_destroy has begun. */
typedef struct cp_timer cp_timer;

CP_API int cp_timer_start(cp_timer **out, cp_port *port, uint64_t delay_ms, uint64_t repeat_ms,
                          void (*fn)(void *arg), void *arg, cp_jobq *q);
/* Any thread. Returns 0 if the timer will not fire again (a job already
 * queued for it is skipped), -ENOENT if a one-shot had already fired (with a
 * job queue: its job had started). So a one-shot that never called fn, also
 * one that its queue's close or the port's destroy ended, answers 0.
 * Releases the handle either way, also after cp_port_destroy.
 * Called from anywhere but the timer's own callback, it returns only when no
 * call of fn is running and none can start, so arg may be freed right after:
 * it waits for a call in progress on another worker to return. Called from
 * inside fn itself, it cancels and returns at once (the call in progress is
 * the caller's own). Because it may wait, a callback must not cancel a timer
 * whose own callback waits for that callback to finish (two timers whose
 * callbacks cancel each other can deadlock). */
CP_API int cp_timer_cancel(cp_timer *t);

/* ------------------------------------------------------------------ send buffers */

/* Opens a send buffer with room for cap bytes, carved from this thread's chunk
 * (no lock). Write into cp_sendbuf_data(), then cp_sendbuf_close() with the
 * number of bytes written; only those are kept. The writing and the close
 * may happen on another thread (hand the buffer over with your own
 * synchronization): the buffer keeps the length it was closed at, whatever
 * the opening thread does meanwhile. One buffer may be open per thread at a
 * time: misuse is opening another on a thread whose last buffer has not been
 * closed (on any thread) before the call; the shortcuts below may run while
 * one is open (they close theirs at once). The caller holds one reference.
 * NULL if out of memory. */
CP_API cp_sendbuf *cp_sendbuf_open(size_t cap);
CP_API uint8_t *cp_sendbuf_data(cp_sendbuf *b);
CP_API void cp_sendbuf_close(cp_sendbuf *b, size_t len);
CP_API size_t cp_sendbuf_len(const cp_sendbuf *b);
/* Shortcuts: a closed buffer holding a copy of data; a closed packet buffer
 * holding {size, id} followed by body (NULL if size would exceed 65535). */
CP_API cp_sendbuf *cp_sendbuf_copy(const void *data, size_t len);
CP_API cp_sendbuf *cp_packet_make(uint16_t id, const void *body, size_t body_len);

/* A packet written in place, without a copy: cp_packet_open reserves the
 * header and body_cap bytes of body (a send buffer opened as by
 * cp_sendbuf_open, so the same one-open-buffer-per-thread rule holds: close
 * it before opening the next one on this thread); write the body at
 * cp_packet_body(), then cp_packet_close() with the body's length fills in
 * the header {size, id}. The caller holds one reference, as with any buffer.
 * cp_packet_open: NULL if body_cap > CP_PACKET_MAX - CP_PACKET_HEADER (65531)
 * or out of memory. cp_packet_body: the first body byte; body_cap bytes are
 * writable until the close. cp_packet_close: 0, or -EMSGSIZE if body_len >
 * body_cap, a programming error: the buffer is then closed empty (sending it
 * sends nothing) rather than framed around bytes that were never reserved;
 * -EINVAL if b is NULL. b must come from cp_packet_open. As with
 * cp_sendbuf_open, the body may be written and the packet closed on another
 * thread; once closed it is an ordinary buffer (any thread). */
CP_API cp_sendbuf *cp_packet_open(uint16_t id, size_t body_cap);
CP_API uint8_t *cp_packet_body(cp_sendbuf *b);
CP_API int cp_packet_close(cp_sendbuf *b, size_t body_len);
/* Reference counting; any thread. A buffer queued on a session is referenced
 * by that session until written, so the caller may unref right after send.
 * Misuse: releasing a reference one does not hold (found while the buffer's
 * memory is still the library's). */
CP_API void cp_sendbuf_ref(cp_sendbuf *b);
CP_API void cp_sendbuf_unref(cp_sendbuf *b);

/* ------------------------------------------------------------------ packet bodies */

/* Little-endian fields, the byte order of the packet header. Each helper
 * moves one byte at a time, so p needs no alignment and the host's byte order
 * does not matter (compilers merge the byte moves into single loads and
 * stores where the target allows).
 * cp_put_* write sizeof(T) bytes at p, cp_get_* read them; the caller
 * guarantees the room. Floats are IEEE-754 single precision, bit for bit. */
static inline void cp_put_u8(uint8_t *p, uint8_t v) { p[0] = v; }
static inline void cp_put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static inline void cp_put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}
static inline void cp_put_u64(uint8_t *p, uint64_t v)
{
    cp_put_u32(p, (uint32_t)v);
    cp_put_u32(p + 4, (uint32_t)(v >> 32));
}
static inline void cp_put_i32(uint8_t *p, int32_t v) { cp_put_u32(p, (uint32_t)v); }
static inline void cp_put_f32(uint8_t *p, float v)
{
    uint32_t u;
    memcpy(&u, &v, 4);
    cp_put_u32(p, u);
}
static inline uint8_t cp_get_u8(const uint8_t *p) { return p[0]; }
static inline uint16_t cp_get_u16(const uint8_t *p) { return (uint16_t)(p[0] | (unsigned)p[1] << 8); }
static inline uint32_t cp_get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t cp_get_u64(const uint8_t *p)
{
    return (uint64_t)cp_get_u32(p) | (uint64_t)cp_get_u32(p + 4) << 32;
}
static inline int32_t cp_get_i32(const uint8_t *p)
{
    uint32_t u = cp_get_u32(p);
    int32_t v;
    memcpy(&v, &u, 4); /* two's complement, without an implementation-defined cast */
    return v;
}
static inline float cp_get_f32(const uint8_t *p)
{
    uint32_t u = cp_get_u32(p);
    float v;
    memcpy(&v, &u, 4);
    return v;
}

/* Bounded writing and reading: a cursor, an end and a sticky error flag, so a
 * handler can build or parse a body field by field and check once at the end.
 * A write or read that does not fit sets err, moves nothing and (reads)
 * yields 0; every later call does the same. Plain values on the caller's
 * stack: no allocation, any thread.
 *
 *   cp_reader r = cp_reader_make(body, len);
 *   uint32_t x = cp_read_u32(&r); float y = cp_read_f32(&r);
 *   if (r.err || cp_reader_left(&r)) return -1;   (short or long body)
 *
 *   cp_sendbuf *b = cp_packet_open(ID, 8);
 *   cp_writer w = cp_writer_make(cp_packet_body(b), 8);
 *   cp_write_u32(&w, x); cp_write_f32(&w, y);
 *   cp_packet_close(b, cp_writer_len(&w));   (w.err: it did not fit) */
typedef struct cp_writer {
    uint8_t *start, *p, *end;
    int err;
} cp_writer;
typedef struct cp_reader {
    const uint8_t *p, *end;
    int err;
} cp_reader;

/* A writer over cap bytes at buf (buf may be NULL when cap is 0). */
static inline cp_writer cp_writer_make(uint8_t *buf, size_t cap)
{
    cp_writer w = { buf, buf, buf ? buf + cap : buf, 0 };
    return w;
}
/* Bytes written so far (those that fit). */
static inline size_t cp_writer_len(const cp_writer *w) { return (size_t)(w->p - w->start); }
/* Room for n more bytes: where they go, or NULL after setting err. */
static inline uint8_t *cp_writer_take(cp_writer *w, size_t n)
{
    if (w->err || (size_t)(w->end - w->p) < n) {
        w->err = 1;
        return NULL;
    }
    uint8_t *at = w->p;
    w->p += n;
    return at;
}
static inline void cp_write_bytes(cp_writer *w, const void *data, size_t n)
{
    uint8_t *at = cp_writer_take(w, n);
    if (at && n)
        memcpy(at, data, n);
}
/* cp_write_u8, _u16, _u32, _u64, _i32, _f32: one field at the cursor. */
#define CP_WRITE_(T, name, n)                                                                                \
  static inline void cp_write_##name(cp_writer *w, T v)                                                      \
  {                                                                                                          \
    uint8_t *at = cp_writer_take(w, n);                                                                      \
    if (at)                                                                                                  \
      cp_put_##name(at, v);                                                                                  \
  }
CP_WRITE_(uint8_t, u8, 1)
CP_WRITE_(uint16_t, u16, 2)
CP_WRITE_(uint32_t, u32, 4)
CP_WRITE_(uint64_t, u64, 8)
CP_WRITE_(int32_t, i32, 4)
CP_WRITE_(float, f32, 4)
#undef CP_WRITE_

/* A reader over len bytes at body (body may be NULL when len is 0). */
static inline cp_reader cp_reader_make(const uint8_t *body, size_t len)
{
    cp_reader r = { body, body ? body + len : body, 0 };
    return r;
}
/* Bytes not read yet. */
static inline size_t cp_reader_left(const cp_reader *r) { return (size_t)(r->end - r->p); }
/* The next n bytes (valid as long as the body is), or NULL after setting err. */
static inline const uint8_t *cp_reader_take(cp_reader *r, size_t n)
{
    if (r->err || cp_reader_left(r) < n) {
        r->err = 1;
        return NULL;
    }
    const uint8_t *at = r->p;
    r->p += n;
    return at;
}
/* Copies the next n bytes to out; on a short body out is left untouched. */
static inline void cp_read_bytes(cp_reader *r, void *out, size_t n)
{
    const uint8_t *at = cp_reader_take(r, n);
    if (at && n)
        memcpy(out, at, n);
}
/* cp_read_u8, _u16, _u32, _u64, _i32, _f32: the field at the cursor, or 0. */
#define CP_READ_(T, name, n)                                                                                 \
  static inline T cp_read_##name(cp_reader *r)                                                               \
  {                                                                                                          \
    const uint8_t *at = cp_reader_take(r, n);                                                                \
    return at ? cp_get_##name(at) : (T)0;                                                                    \
  }
CP_READ_(uint8_t, u8, 1)
CP_READ_(uint16_t, u16, 2)
CP_READ_(uint32_t, u32, 4)
CP_READ_(uint64_t, u64, 8)
CP_READ_(int32_t, i32, 4)
CP_READ_(float, f32, 4)
#undef CP_READ_

/* ------------------------------------------------------------------ services */

typedef enum cp_framing {
    CP_FRAMING_PACKET = 0, /* {u16 size, u16 id} little-endian, size counts the header */
    CP_FRAMING_RAW         /* no framing: on_recv gets bytes, returns what it consumed */
} cp_framing;

#define CP_PACKET_HEADER 4u
#define CP_PACKET_MAX 65535u

/* A packet handler: return 0 to go on, a negative value to disconnect the
 * session with CP_REASON_HANDLER. body is valid only during the call. */
typedef int (*cp_packet_fn)(cp_session *s, uint16_t id, const uint8_t *body, size_t len);

typedef struct cp_route {
    uint16_t id;
    cp_packet_fn fn;
} cp_route;

/* A receive rate limit on one packet id (chat 5/s, move 30/s), per session,
 * beside the session-wide recv_rate_packets: a packet is taken when both
 * allow it. A session over it is throttled as by the session's limit (its
 * receive paused until the id's budget is back; nothing is dropped and order
 * is kept, so its packets on other ids wait behind it too). The id needs no
 * route (the limit also holds for what on_packet gets). A separate array
 * rather than fields of cp_route, so that every route initialiser written
 * before it (positional { id, fn }) still compiles without warnings. A
 * session carries the limits' state (8 bytes a limit) from its first packet
 * on a limited id; one that never sends one carries a pointer. */
typedef struct cp_route_limit {
    uint16_t id;
    uint32_t rate_packets;  /* packets a second on this id, on average; > 0 */
    uint32_t burst_packets; /* packets at once above the rate; 0 = twice the rate */
} cp_route_limit;

typedef struct cp_handlers {
    /* The session is connected and receiving. */
    void (*on_connected)(cp_session *s);
    /* Client services: a connect attempt failed; err is a negative errno. No
     * session was ever reported connected for it. */
    void (*on_connect_failed)(cp_service *svc, int err);
    /* CP_FRAMING_RAW: bytes received and not yet consumed; return how many
     * were consumed (the rest is offered again with the next bytes). */
    size_t (*on_recv)(cp_session *s, const uint8_t *data, size_t len);
    /* CP_FRAMING_PACKET: packets whose id has no route. NULL drops them. */
    cp_packet_fn on_packet;
    /* Bytes of this session's queue were written to the socket. Optional. */
    void (*on_sent)(cp_session *s, size_t bytes);
    /* Exactly once for every session whose on_connected ran; no callback of the
     * session runs after it. err is a negative errno for CP_REASON_IO_ERROR. */
    void (*on_disconnected)(cp_session *s, cp_reason reason, int err);
    /* Client services: as on_connect_failed, with the data of the failed
     * connect (cp_client_connect_data; NULL for other connects). When set, it
     * is called instead of on_connect_failed, so each failure is reported
     * once. Optional; last, so that code written before it still compiles. */
    void (*on_connect_error)(cp_service *svc, void *data, int err);
} cp_handlers;

/* Options shared by both kinds of service. Zero means the default.
 * Options that cannot work make the start fail with -EINVAL instead of being
 * ignored; each such case is named below. Handlers that do not apply (on_recv
 * with packet framing, on_connect_failed on a server) are simply not called. */
typedef struct cp_session_opts {
    cp_framing framing;               /* CP_FRAMING_PACKET; CP_FRAMING_RAW needs on_recv
                                  and takes no routes */
    uint32_t max_packet;              /* 4096; 4 to 65535 */
    size_t send_queue_limit;          /* 1 MiB of memory per session's send queue: what
                                  its unsent buffers keep alive (a small buffer
                                  may pin a 32 KiB chunk until the queue backs
                                  up and copies it out), not only their bytes;
                                  an empty queue always takes a buffer of up to
                                  this many bytes. With packet framing at least
                                  max_packet, so that a packet the service
                                  accepts can be echoed */
    const cp_route *routes;           /* packet handlers by id, copied at start: each
                                  with a handler, no id twice */
    size_t nroutes;                   /* routes may be NULL only when this is 0 */
    int no_nodelay;                   /* 1 keeps Nagle on (TCP_NODELAY is set by default) */
    uint32_t idle_timeout_ms;         /* nothing received for this long: disconnect (0 = off) */
    uint32_t packet_timeout_ms;       /* a packet started but unfinished this long: disconnect
                                   (raw framing: bytes on_recv left unconsumed this long,
                                   timed afresh whenever it consumes some) */
    uint32_t first_packet_timeout_ms; /* no whole packet this long after connecting (a
                                         login that does not come): disconnect with
                                         CP_REASON_FIRST_PACKET_TIMEOUT (0 = off) */
    /* Flow control: a session is not read while its peer is over its rate
     * limit, or while its own send queue is above send_queue_high (until it
     * is back below send_queue_low). Its bytes then wait in the kernel and
     * TCP pushes back on the peer; nothing is dropped and no one is cut for
     * it (a peer that stops reading still is, at send_queue_limit). */
    size_t send_queue_high;      /* half of send_queue_limit; at most the limit */
    size_t send_queue_low;       /* half of send_queue_high; below it */
    uint32_t recv_rate_packets;  /* packets a second per session, on average; 0 = no
                                    limit; packet framing only */
    uint32_t recv_burst_packets; /* packets at once above the rate; 0 = twice the rate;
                                    needs the rate */
    uint32_t recv_rate_bytes;    /* bytes a second per session; 0 = no limit */
    uint32_t recv_burst_bytes;   /* 0 = twice the rate; needs the rate */
    cp_tls *tls;                 /* TLS (cp_tls_create): a server's sessions accept TLS,
                                    a client's connects speak it; the service keeps its
                                    own reference. NULL = plain TCP. -ENOTSUP on Windows */
    cp_ws *ws;                   /* WebSocket (cp_ws_create): a server's sessions accept
                                    the upgrade, a client's connects ask for it (over TLS
                                    too, with tls); the service keeps its own reference.
                                    NULL = none */
    /* Dead peers: a peer that vanishes without a FIN (a cable pulled, a NAT
     * that forgot it) is otherwise found only by the kernel's defaults,
     * hours later. Both are the kernel's TCP timers, so they cost nothing
     * per message. */
    uint32_t keepalive_idle_ms;     /* probe a connection idle this long (TCP keepalive;
                                       rounded up to whole seconds); unanswered probes
                                       disconnect with CP_REASON_KEEPALIVE. 0 = off */
    uint32_t keepalive_interval_ms; /* between probes; 0 = 1000; needs keepalive_idle_ms */
    uint32_t keepalive_probes;      /* unanswered probes that end it; 0 = 3; at most 127;
                                       needs keepalive_idle_ms */
    uint32_t user_timeout_ms;       /* data sent and unacknowledged this long disconnects
                                       with CP_REASON_USER_TIMEOUT (TCP_USER_TIMEOUT; on
                                       Windows TCP_MAXRT, whole seconds). 0 = off */
    /* Flood control (docs/design.md, "Flood control"): per-id limits, and
     * the second threshold past which throttling gives way to a cut. */
    const cp_route_limit *route_limits; /* packet framing only; no id twice; at most 254 */
    size_t nroute_limits;               /* route_limits may be NULL only when this is 0 */
    uint32_t flood_ms;                  /* a session held back by a rate limit (its own
                                           packets or bytes, or one id's) continuously for
                                           this long is disconnected with CP_REASON_FLOOD.
                                           Continuously: from the first packet a limit
                                           refused until that limit finds it calm again (a
                                           packet taken with three quarters of the burst to
                                           spare, or after half a burst's time of reading
                                           without a refusal). So a burst that drains within
                                           flood_ms and a peer at or under the rate are
                                           never cut, while a flooder, whose bytes wait in
                                           the kernel and spend each rest's budget at once,
                                           stays over. Set it above the longest throttle an
                                           honest burst needs ((burst sent - burst) / rate
                                           s). 0 = off; needs a rate limit */
} cp_session_opts;

/* ------------------------------------------------------------------ TLS */

/*
 * A TLS context (OpenSSL 3; Linux only for now: on Windows every TLS call
 * returns -ENOTSUP). Shared by any number of services, which each keep a
 * reference; reference-counted, any thread. Records are built in user space
 * between the session and the framer, so packets, groups, job queues and
 * timeouts work unchanged over TLS. on_connected runs after the handshake;
 * a handshake that fails ends the session with CP_REASON_TLS or
 * CP_REASON_HANDSHAKE_TIMEOUT and never reports it connected.
 */
enum { CP_TLS_1_2 = 0x0303, CP_TLS_1_3 = 0x0304 };
#define CP_TLS_TICKET_KEY_LEN 80 /* 16 bytes of name, 32 of HMAC key, 32 of AES key */

typedef struct cp_tls_opts {
    const char *cert_file;         /* PEM certificate chain: servers (required), clients (optional) */
    const char *key_file;          /* PEM private key of cert_file */
    const char *ca_file;           /* PEM CA certificates that verify the peer; NULL = the
                              system's default store */
    int verify;                    /* 1: a client checks the server's certificate (and sni's
                              name); a server requires and checks a client certificate */
    const char *sni;               /* clients: the server name sent (and verified with verify) */
    int min_version;               /* CP_TLS_1_2 (0 = it) or CP_TLS_1_3 */
    uint32_t handshake_timeout_ms; /* 0 = 10000 */
    int no_tickets;                /* 1: servers issue no session tickets (no resumption) */
    const uint8_t *ticket_key;     /* CP_TLS_TICKET_KEY_LEN bytes, NULL = a random key of this
                                  context: servers given the same key resume each other's
                                  sessions */
    uint32_t handshakes_per_round; /* new handshakes a worker starts per round at most,
                                      and no more handshake work than about 0.25 ms
                                      once one step ran (the rest wait, in order); 0 = 8 */
} cp_tls_opts;

/* -EINVAL for missing or contradictory options, -EIO with a log line for a
 * file OpenSSL cannot load or a key that does not match its certificate. */
CP_API int cp_tls_create(cp_tls **out, const cp_tls_opts *opts);
/* Certificate rotation without a restart, any thread: handshakes that start
 * after it returns use the new certificate and key; established sessions
 * keep theirs. On failure (-EIO) the old ones stay. */
CP_API int cp_tls_reload(cp_tls *tls, const char *cert_file, const char *key_file);
CP_API void cp_tls_ref(cp_tls *tls);
CP_API void cp_tls_unref(cp_tls *tls);

typedef struct cp_tls_info {
    char version[16]; /* "TLSv1.3", "TLSv1.2" */
    char cipher[64];  /* OpenSSL's name: "TLS_AES_128_GCM_SHA256" */
    int resumed;      /* 1: the handshake resumed an earlier session */
} cp_tls_info;

/* A connected TLS session's protocol; -ENOTCONN before the handshake has
 * finished, -EINVAL for a plain session. Its owner worker (its callbacks). */
CP_API int cp_session_tls_info(const cp_session *s, cp_tls_info *out);

/* ------------------------------------------------------------------ WebSocket */

/*
 * WebSocket (RFC 6455) for browser and WebGL clients, on the same packets,
 * groups and handlers as TCP: the payloads of the binary messages a client
 * sends form the session's byte stream (a message may hold several packets
 * or part of one), and each buffer the server sends goes out as one binary
 * message. The upgrade request is parsed by llhttp. permessage-deflate is
 * declined. Close codes the server sends: 1000 cp_session_shutdown and
 * cp_session_disconnect, 1001 a stopping service, 1002 a frame RFC 6455
 * forbids, 1003 a text message not allowed, 1007 invalid UTF-8 in an allowed
 * text message, 1008 a missing pong or a flood (CP_REASON_FLOOD), 1009 a
 * message over the limit or a packet over max_packet, 1011 any other reason
 * (docs/design.md, "WebSocket").
 */

/* What the upgrade callback sees; the strings are valid during the call. */
typedef struct cp_ws_request {
    const char *path;      /* the request target as sent ("/play?room=7") */
    const char *host;      /* Host, or "" */
    const char *origin;    /* Origin, or "" (browsers always send it) */
    const char *protocols; /* Sec-WebSocket-Protocol as sent, or "" */
} cp_ws_request;

typedef struct cp_ws_opts {
    const char *path;           /* servers: only this path (before any '?') upgrades;
                                   NULL = any. Clients: the path asked for; NULL = "/" */
    const char *host;           /* clients: the Host sent; NULL = the address connected to */
    const char *const *origins; /* NULL-terminated list of allowed Origin values; NULL =
                                    any. Others get 403 */
    const char *subprotocol;    /* if set, answered when the client offers it (others
                                    are refused with 400); NULL = none */
    const char *page;           /* a GET of the path that is no upgrade gets this page
                                    (text/html); NULL = 426 Upgrade Required */
    /* Called on the session's worker for a valid upgrade request: return 0 to
       accept, or an HTTP status (400-599) to refuse with. NULL = accept */
    int (*on_upgrade)(const cp_ws_request *req, void *arg);
    void *upgrade_arg;
    uint32_t max_request;        /* bytes of the upgrade request; 0 = 8192 (431 past it) */
    uint32_t upgrade_timeout_ms; /* 0 = 10000 (CP_REASON_HANDSHAKE_TIMEOUT) */
    uint32_t max_message;        /* bytes of one message; 0 = the service's max_packet
                                    (1009 past it) */
    uint32_t ping_interval_ms;   /* a ping this often; no pong by the next one closes with
                                    1008; 0 = no pings */
    int allow_text;              /* 1: text messages join the stream too (valid UTF-8,
                                    else 1007); 0: they close with 1003 */
} cp_ws_opts;

/* -EINVAL for bad options, -ENOMEM, -ENOTSUP where the build has no
 * WebSocket (no llhttp, or Linux without OpenSSL for SHA-1; Windows uses
 * CNG). */
CP_API int cp_ws_create(cp_ws **out, const cp_ws_opts *opts);
CP_API void cp_ws_ref(cp_ws *ws);
CP_API void cp_ws_unref(cp_ws *ws);

typedef struct cp_server_opts {
    const char *host;      /* numeric IPv4/IPv6 or a name; NULL = "0.0.0.0" */
    uint16_t port;         /* 0 picks a free port; see cp_service_listen_port() */
    int backlog;           /* listen backlog; 0 = 1024; not negative */
    int accepts;           /* accepts kept pending (K); 0 = 64; at most 65535 */
    uint32_t max_sessions; /* live sessions at most; 0 = 10000 */
    /* 1: SO_REUSEPORT, so that a new process can listen on the same port
     * while this one drains (a rolling restart: start the new one, then stop
     * this one with cp_service_stop_ex and a drain). The kernel spreads new
     * connections over the listeners; those still queued to a listener
     * when it closes are reset unless net.ipv4.tcp_migrate_req is 1 (Linux
     * 5.14+), which moves them to another. Linux only: -ENOTSUP elsewhere.
     * 0 = off: a second listener gets -EADDRINUSE. */
    int reuseport;
    cp_session_opts session;
    /* Caps by source address, each 0 = off. An address is an IPv4 address,
     * or an IPv6 /64 (one subscriber's usual allotment; an IPv4-mapped IPv6
     * address counts as its IPv4 address). A connection over a cap is closed
     * at once, before any session work or callback, and counted in
     * cp_service_stats.refused. With proxy_protocol the caps by address
     * apply to the client's address from the header, once it is read. */
    uint32_t max_sessions_per_addr; /* live sessions from one address at most */
    uint32_t accept_rate_per_addr;  /* new connections a second from one address, on average,
                                       with bursts of as many */
    uint32_t accept_rate;           /* new connections a second in all, bursts of as many */
    /* PROXY protocol (v1 text and v2 binary, as HAProxy's send-proxy and
     * send-proxy-v2 write it): every connection must begin with a header,
     * which is read and consumed before anything else (TLS, WebSocket).
     * cp_session_peer then gives the client's address (a v2 LOCAL header, a
     * proxy's health check, keeps the socket's). A connection whose source is
     * not in proxy_trusted is refused at accept (CP_REFUSED_UNTRUSTED); a
     * malformed header, or one not complete within proxy_timeout_ms, closes
     * the connection with CP_REASON_PROXY. Headers of more than 1024 bytes
     * (v2 with large TLVs) are refused as malformed. */
    int proxy_protocol;        /* 1: on */
    const char *proxy_trusted; /* the proxies' addresses: comma-separated CIDRs, IPv4 or
                                  IPv6 ("10.0.0.0/8,::1/128"; an address alone is one
                                  host); required with proxy_protocol, else -EINVAL */
    uint32_t proxy_timeout_ms; /* the header's deadline; 0 = 5000 */
} cp_server_opts;

typedef struct cp_client_opts {
    const char *host;      /* where to connect; not NULL or empty */
    uint16_t port;         /* not 0 */
    uint32_t sessions;     /* connect this many at start (may be 0) */
    uint32_t max_sessions; /* 0 = max(sessions, 10000); not below sessions */
    cp_session_opts session;
} cp_client_opts;

/* Starts a server: listening, accepting, serving. ctx is returned by
 * cp_service_ctx(). Returns -EADDRINUSE etc. if it cannot listen, -EINVAL
 * for options that cannot work (see the option structs). Any thread,
 * workers included; the service may be stopped from any other thread as soon
 * as this returns, even before it has begun accepting. */
CP_API int cp_server_start(cp_service **out, cp_port *port, const cp_server_opts *opts, const cp_handlers *h,
                           void *ctx);

/* Starts a client service and begins opts->sessions connects. -EINVAL for
 * options that cannot work (see the option structs). If those
 * connects cannot even be started (the host does not resolve, a socket
 * cannot be made: -EMFILE, -EAFNOSUPPORT, ...) it returns that error and
 * starts nothing: no service, no callback. A connect that fails later (refused,
 * unreachable, ...) is reported to on_connect_failed. */
CP_API int cp_client_start(cp_service **out, cp_port *port, const cp_client_opts *opts, const cp_handlers *h,
                           void *ctx);

/* Client services: start one more connect. Any thread. Its socket is made
 * here: if that fails the error is returned (and no callback follows);
 * later failures go to on_connect_failed. -ESHUTDOWN once stopping, -EMFILE
 * when max_sessions sessions are live. */
CP_API int cp_client_connect(cp_service *svc);
/* cp_client_connect for a connect that carries user data: the session's data
 * (cp_session_data) is data from the start, so on_connected knows which
 * connect it answers; if the connect fails, on_connect_error gets data. */
CP_API int cp_client_connect_data(cp_service *svc, void *data);

/* Graceful stop: stops accepting, disconnects every session with
 * CP_REASON_STOPPING, waits until every callback has run and every completion
 * has drained, then frees the service. No callback of this service runs after
 * it returns, and the listening socket is closed. Its wait does not grow with
 * the sends queued for the workers (see cp_session_disconnect), nor with
 * broadcasts other threads keep making meanwhile. Not from a worker
 * (-EDEADLK). -EALREADY while another stop of it is under way. Misuse:
 * stopping a service that was already stopped. */
CP_API int cp_service_stop(cp_service *svc);

CP_API void *cp_service_ctx(const cp_service *svc);
/* The cp_port the service runs on (formerly cp_service_port_of). */
CP_API cp_port *cp_service_get_port(const cp_service *svc);
/* The local TCP port a server listens on, useful with port 0 (formerly
 * cp_service_port, a name too close to the cp_port above). */
CP_API uint16_t cp_service_listen_port(const cp_service *svc);

typedef struct cp_service_stats {
    uint64_t sessions;     /* live now */
    uint64_t connected;    /* on_connected calls so far */
    uint64_t disconnected; /* on_disconnected calls so far */
    uint64_t accepted;     /* connections the listener accepted (each once, refused or not) */
    uint64_t rejected;     /* accepted beyond max_sessions and closed at once
                              (refused[CP_REFUSED_MAX_SESSIONS]) */
    uint64_t connect_failed;
    uint64_t accept_errors; /* EMFILE, ENFILE, ENOBUFS... (each backoff counts once) */
    uint64_t bytes_in, bytes_out;
    uint64_t packets_in;
    uint64_t packets_out; /* buffers queued to send (packet framing: packets) */
    uint64_t by_reason[CP_REASON_COUNT_];
    uint64_t refused[CP_REFUSED_COUNT_]; /* new connections closed at once, by cause */
} cp_service_stats;

/* A snapshot of counters; any thread. */
CP_API void cp_service_stats_get(const cp_service *svc, cp_service_stats *out);

/* What cp_service_metrics_get adds to the counters (see "Metrics" above). */
typedef struct cp_service_metrics {
    cp_service_stats stats; /* as cp_service_stats_get */
    /* Packets by route id (packet framing): route_packets[id] for the ids
     * below nroutes (the largest id routed + 1); the rest, handled by
     * on_packet or dropped, here. */
    uint64_t unrouted_packets;
    uint32_t nroutes;
    /* Live sessions by the memory their send queues hold now (what
     * send_queue_limit is compared with), in bytes: count is the live
     * sessions, sum the memory, bucket 0 the sessions with nothing queued.
     * Sampled at the first send of each round, when the round's flush
     * writes the queue and when a write completes: a queue whose write is
     * stalled may show without what its last round queued. */
    cp_histogram send_queue;
} cp_service_metrics;

/* A snapshot of the service's counters and metrics; any thread. The packets
 * by route id go to route_packets[0 .. n-1] (n may be 0 and route_packets
 * NULL; out->nroutes says how many there are). */
CP_API void cp_service_metrics_get(const cp_service *svc, cp_service_metrics *out, uint64_t *route_packets,
                                   size_t n);

/* cp_service_stop that also reports the service's final counters: final (if
 * not NULL) is filled after every session has finished, just before the
 * service is freed, so it counts the disconnects of the stop itself
 * (by_reason[CP_REASON_STOPPING]) and all traffic; sessions is 0.
 * drain_ms 0: hard stop, as cp_service_stop (which is this call with 0 and
 * NULL). drain_ms > 0: the graceful stop. Accepting stops at once; every
 * connected session is closed as by cp_session_shutdown(s, drain_ms): no new
 * sends, what is queued is written, then FIN, and the session ends on the
 * peer's FIN (on_disconnected(s, CP_REASON_STOPPING, 0)) or hard at the
 * deadline (CP_REASON_STOPPING, -ETIMEDOUT). A server's listener is closed
 * first, and the drain waits for it: a connection it accepted until then is
 * started (on_connected) and drained at once, never dropped, so that with
 * reuseport a new server can take over the port without one connection
 * lost (a rolling restart). Sessions still connecting or in a TLS or
 * WebSocket handshake, and any left a moment after the deadline, are closed
 * hard. Returns when every session has finished, so within about drain_ms. */
CP_API int cp_service_stop_ex(cp_service *svc, uint32_t drain_ms, cp_service_stats *final);

/* By session id, any thread: queue buf / disconnect. -ENOTCONN if that session
 * is gone or its slot was reused (cp_service_send_to: or is not connected yet). */
CP_API int cp_service_send_to(cp_service *svc, uint64_t id, cp_sendbuf *b);
CP_API int cp_service_disconnect_id(cp_service *svc, uint64_t id);
/* Queue buf on every connected session of the service; returns how many. */
CP_API int cp_service_broadcast(cp_service *svc, cp_sendbuf *b);

/* ------------------------------------------------------------------ sessions */

/* Queues buf for sending (the session takes its own reference). Any thread,
 * any time: -ENOTCONN once the session is disconnecting or gone. Exceeding the
 * send_queue_limit disconnects the session with CP_REASON_SEND_OVERFLOW.
 *
 * Order: sends to one session are written in happens-before order. If one
 * send call returns before another starts — on the same thread, or on any
 * thread it handed work to, through cport (the next job of a job queue, a job
 * it pushed, cp_port_post, a timer it started, a callback of another session
 * it sent to) or through your own locks and atomics — the first is written
 * first. The same holds for cp_session_send_copy, cp_group_broadcast,
 * cp_service_send_to and cp_service_broadcast, on every backend and with any
 * number of workers. Sends that overlap in time go out in either order. */
CP_API int cp_session_send(cp_session *s, cp_sendbuf *b);
/* Copies data into a new buffer and sends it. */
CP_API int cp_session_send_copy(cp_session *s, const void *data, size_t len);

/* Forwarding without a copy: a closed send buffer holding len bytes at data,
 * which must lie within what the running callback of s was given: on_recv's
 * bytes, or a packet handler's body together with the CP_PACKET_HEADER bytes
 * before it (body - CP_PACKET_HEADER, len + CP_PACKET_HEADER: the packet as
 * it came, header and all). Only on s's worker, inside that callback. Where
 * the bytes are still in the receive buffer the backend read them into
 * (epoll, io_uring, IOCP), the buffer itself is lent to the send buffer and
 * the worker reads on into another one, so a relay, an echo or a
 * broadcast of what a player sent costs no copy; the buffer goes back when
 * the last reference to the send buffer is released, on any thread, also
 * after the port is gone. Otherwise the bytes are copied, as by
 * cp_sendbuf_copy: when they were reassembled across receives, came through
 * a filter (TLS, WebSocket), are smaller than 4 KiB (a copy costs less), or
 * the worker has many buffers lent already (io_uring keeps 3/4 of its
 * buffers for receiving). A lent buffer costs its whole size (32 or 64 KiB)
 * against a send queue's limit while queued, and a queue that backs up
 * copies it out as it does other buffers (send_queue_limit). The buffer is
 * closed: cp_sendbuf_data gives its bytes to read, never to write (a lent
 * buffer's bytes may be queued on other sessions already). The caller holds
 * one reference. NULL if s is NULL, data is NULL with len > 0, or out of
 * memory. */
CP_API cp_sendbuf *cp_sendbuf_from_recv(cp_session *s, const void *data, size_t len);

/* The hard close: starts disconnecting with CP_REASON_LOCAL at once. What is
 * still queued is dropped (a packet sent just before may never arrive; use
 * cp_session_shutdown for that). Any thread; -ENOTCONN if already
 * disconnecting. on_disconnected follows on the session's worker, soon: the
 * close does not wait behind the sends and other work queued for that worker
 * before it (user threads that send faster than the worker can apply may
 * queue any amount), only behind the slice of it the worker is replaying.
 * Also ends a graceful close that is under way. */
CP_API int cp_session_disconnect(cp_session *s);

/* The graceful close. From this call on no further send is accepted
 * (-ENOTCONN, and cp_session_connected() is 0); every send that happened
 * before it (see "Order" above) is still written; then the write side is shut
 * (FIN), so the peer reads everything and then the end of the stream; what
 * the peer still sends is read and dropped, and its FIN closes the session:
 * on_disconnected(s, CP_REASON_LOCAL, 0). If that has not happened within
 * timeout_ms of this call, the session is closed hard:
 * on_disconnected(s, CP_REASON_LOCAL, -ETIMEDOUT). Any thread. -EINVAL for
 * timeout_ms 0, -ENOTCONN if the session is not connected (or already closing,
 * gracefully or not). */
CP_API int cp_session_shutdown(cp_session *s, uint32_t timeout_ms);

/* Keep a session's memory alive beyond its callbacks (any thread). A kept
 * session that disconnected answers every call with -ENOTCONN. */
CP_API void cp_session_ref(cp_session *s);
CP_API void cp_session_unref(cp_session *s);

CP_API uint64_t cp_session_id(const cp_session *s);
/* The session's service; NULL once the session has finished (a session kept
 * with cp_session_ref can outlive its service). Any thread, at any time, also
 * while the session finishes or its service stops. Inside the session's
 * callbacks it is the service. Elsewhere the answer is a snapshot: NULL
 * means the session has left its service for good (its on_disconnected, if
 * it had one, has returned, and what that callback did is visible to the
 * caller); a service pointer may go stale at once and stays usable only
 * while the caller knows the service is not being stopped. After
 * cp_service_stop returns, every session of that service answers NULL. */
CP_API cp_service *cp_session_service(const cp_session *s);
/* The service's ctx; stays valid for kept sessions after they finished. */
CP_API void *cp_session_ctx(const cp_session *s);
CP_API void *cp_session_data(const cp_session *s);
CP_API void cp_session_set_data(cp_session *s, void *data);
CP_API int cp_session_connected(const cp_session *s);
/* Peer address as text "ip:port" / "[ip]:port"; returns length or < 0. */
CP_API int cp_session_peer(const cp_session *s, char *buf, size_t len);

/* ------------------------------------------------------------------ work bound to a session */

/* Game code that acts for one player (a bot's tick, a reply computed on
 * another thread) runs it here instead of on a job queue of its own: on the
 * session's worker, serialized with the session's callbacks (never
 * concurrently with them, so it needs no lock for the session's state), and
 * never after on_disconnected. */

/* Runs fn(s, arg) on the session's worker, soon. Any thread. Every post that
 * returns 0 runs exactly once, before on_disconnected: a post still on its
 * way when the session disconnects runs during the disconnect, just before
 * on_disconnected, when cp_session_connected(s) is already 0 and sends fail.
 * So fn may always free arg. Posts made by one thread run in the order made.
 * -ENOTCONN once the session is disconnecting (fn will not run), -ENOMEM. */
CP_API int cp_session_post(cp_session *s, void (*fn)(cp_session *s, void *arg), void *arg);

/* A one-shot (repeat_ms 0) or repeating timer of one session: fn(s, arg) runs
 * on the session's worker, serialized with its callbacks, while the session
 * is connected. Any thread; -ENOTCONN once the session is disconnecting.
 * The disconnect ends every timer of the session, also one whose start had
 * not reached the worker yet: when on_disconnected runs, no timer fn of the
 * session is running or will run again, so that is the place to free the
 * args of the timers still live. A start that fails does nothing.
 * Handles as with cp_timer: out may be NULL for a timer that is never
 * cancelled; otherwise the handle must be given back with
 * cp_session_timer_cancel() (also after a one-shot fired or the session
 * disconnected). A handle stays valid until then, even past the session. */
typedef struct cp_session_timer cp_session_timer;

CP_API int cp_session_timer_start(cp_session_timer **out, cp_session *s, uint32_t delay_ms,
                                  uint32_t repeat_ms, void (*fn)(cp_session *s, void *arg), void *arg);
/* Any thread. Returns 0 if the timer will not fire again, -ENOENT if it had
 * already ended (a one-shot fired, or the session disconnected); releases the
 * handle either way. On the session's worker the end is immediate: after a 0
 * fn does not run again (called from fn itself, that run is the last), so arg
 * may be freed at once. From another thread a run already under way
 * finishes: free arg in a post made after the cancel (it runs after that
 * run), or in on_disconnected if the post is refused. */
CP_API int cp_session_timer_cancel(cp_session_timer *t);

/* ------------------------------------------------------------------ groups */

/* A set of sessions (a room) with broadcast. Any thread. A member that
 * disconnects leaves every group by itself before on_disconnected. Broadcast
 * queues one buffer on every member: no payload copy, and no lock is held
 * while it does, so broadcasts from any number of threads never hold up a
 * member's disconnect, nor add and remove. Add and remove copy the member
 * list (their cost grows with the group's size); a broadcast that starts
 * after a remove returned does not reach that member, one that overlaps it
 * may. */
CP_API int cp_group_create(cp_group **out);
CP_API void cp_group_destroy(cp_group *g);
CP_API int cp_group_add(cp_group *g, cp_session *s);    /* -EEXIST, -ENOTCONN, -ENOMEM */
CP_API int cp_group_remove(cp_group *g, cp_session *s); /* -ENOENT, -ENOMEM */
CP_API size_t cp_group_size(cp_group *g);
/* Queues b on every member (each takes its own reference; the caller keeps
 * its own). Returns the number of members the buffer was queued on (members
 * already disconnecting refuse it), or -EINVAL if g or b is NULL. Any thread. */
CP_API int cp_group_broadcast(cp_group *g, cp_sendbuf *b);
/* The same, but skip (typically the sender) does not get b. skip may be NULL
 * or a session that is not a member: then every member gets it. */
CP_API int cp_group_broadcast_except(cp_group *g, cp_sendbuf *b, const cp_session *skip);

/* ------------------------------------------------------------------ bus */

/* Rooms across servers: a message bus over an existing broker, NATS
 * (recommended) or Redis pub/sub. The bus speaks to the broker over this
 * port's own client sessions: no thread or event loop of its own. Delivery
 * is at most once, as the brokers promise: a message published while the
 * connection is down, or still queued when it breaks, is lost (and counted).
 * The broker going away never stops the port from serving its own clients;
 * the bus reconnects with backoff (first try within 100 ms, then doubling up
 * to reconnect_max_ms), along the URL list, and subscribes again. */
typedef struct cp_bus cp_bus;
typedef struct cp_bus_sub cp_bus_sub;

typedef struct cp_bus_opts {
    const char *url;           /* "nats://host:port[,host:port...]" or "redis://host:port" */
    const char *name;          /* this server's name to the broker: letters, digits and
                                  "-_.:", at most 64; NULL = "cport" */
    size_t pending_limit;      /* bytes queued towards the broker at most: a publish
                                  past it returns -EAGAIN; 0 = 8 MiB */
    uint32_t ping_interval_ms; /* a ping this often; two unanswered mean the broker
                                  is gone (reconnect); 0 = 5000 */
    uint32_t reconnect_max_ms; /* backoff cap; 0 = 2000 */
} cp_bus_opts;

/* A message as a subscription receives it. subject is NUL-terminated (the
 * subject it was published to, which a wildcard subscription needs); data
 * is the payload; reply is the NATS reply subject ("" if none). All valid
 * during the call only. */
typedef struct cp_bus_msg {
    const char *subject;
    const uint8_t *data;
    size_t len;
    const char *reply;
} cp_bus_msg;
typedef void (*cp_bus_fn)(void *arg, const cp_bus_msg *m);

typedef struct cp_bus_stats {
    uint64_t published;     /* messages handed to the broker connection */
    uint64_t delivered;     /* messages received for subscriptions and bridges */
    uint64_t dropped;       /* messages lost: published while the connection was
                               down, still queued when it broke, bridged room
                               messages that could not be published, and
                               received room messages that were malformed */
    uint64_t gaps;          /* bridged room messages other servers sent that never
                               arrived (counted by their sequence numbers) */
    uint64_t reconnects;    /* connections made again after a loss */
    uint64_t slow_consumer; /* times the broker cut the bus as a slow consumer */
    uint64_t pending_bytes; /* queued towards the broker now */
    int connected;          /* 1 while the broker connection is up */
} cp_bus_stats;

/* Creates a bus on port and starts connecting; returns at once (the
 * connection comes up in the background). -EINVAL for a bad URL or option,
 * -ENOTSUP for a scheme this build does not have (redis:// without hiredis). */
CP_API int cp_bus_create(cp_bus **out, cp_port *port, const cp_bus_opts *opts);
/* Subscribes fn(arg, msg) to subject (NATS wildcards "*" and ">" allowed).
 * With a queue group name (NATS only; NULL for none), each message goes to
 * one subscriber of the group across all servers. fn runs on a worker, or as
 * a job of q when q is not NULL. Messages of one subscription are delivered
 * in the order the broker sent them. Any thread. -EINVAL for a bad subject or
 * queue name, -ENOTSUP for a queue group on Redis. */
CP_API int cp_bus_subscribe(cp_bus_sub **out, cp_bus *bus, const char *subject, const char *queue,
                            cp_bus_fn fn, void *arg, cp_jobq *q);
/* Ends a subscription and releases the handle. When it returns, fn is not
 * running and will not run again (a job already queued for it is skipped),
 * unless it is called from fn itself. Any thread. */
CP_API int cp_bus_unsubscribe(cp_bus_sub *sub);
/* Publishes len bytes to subject (no wildcards). Any thread. 0 when queued
 * towards the broker; -ENOTCONN while the connection is down (the message is
 * lost and counted); -EAGAIN past pending_limit; -EMSGSIZE above the
 * broker's limit. Publishes from one thread go out in the order made. */
CP_API int cp_bus_publish(cp_bus *bus, const char *subject, const void *data, size_t len);
/* The same with a send buffer: no copy of the payload (the bus takes its own
 * reference; the caller keeps its own). */
CP_API int cp_bus_publish_buf(cp_bus *bus, const char *subject, cp_sendbuf *b);
CP_API void cp_bus_stats_get(cp_bus *bus, cp_bus_stats *out);
/* Closes the broker connection, ends every subscription (their handles must
 * still be given back) and bridge, and frees the bus. Not from a worker of
 * its port (-EDEADLK). */
CP_API int cp_bus_destroy(cp_bus *bus);

/* Bridges group g over the bus: every buffer g broadcasts (a packet) is also
 * published to subject, and what other servers bridged to the same subject
 * is broadcast to g's members here, as one shared buffer. Each sender's
 * order is kept. A server's own messages are not delivered back to it. Ends
 * with cp_group_destroy or cp_bus_destroy. -EBUSY if g is bridged already. */
CP_API int cp_group_bridge(cp_group *g, cp_bus *bus, const char *subject);

#ifdef __cplusplus
}
#endif
#endif /* CPORT_H */
