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
 */
#ifndef CPORT_H
#define CPORT_H

#include <stddef.h>
#include <stdint.h>
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

/* ------------------------------------------------------------------ errors */

/* Names an error code returned by any cp_ function (negative errno values). */
CP_API const char *cp_strerror(int err);

/* Why a session ended; passed to on_disconnected. */
typedef enum cp_reason {
    CP_REASON_NONE = 0,
    CP_REASON_PEER_CLOSED,    /* the peer closed its side (read returned 0) */
    CP_REASON_RESET,          /* connection reset or aborted by the peer */
    CP_REASON_LOCAL,          /* cp_session_disconnect() */
    CP_REASON_IO_ERROR,       /* another socket error; see the err argument */
    CP_REASON_BAD_HEADER,     /* packet header size < 4 */
    CP_REASON_TOO_BIG,        /* packet header size > max_packet */
    CP_REASON_HANDLER,        /* a packet handler returned a negative value */
    CP_REASON_SEND_OVERFLOW,  /* queued send bytes would exceed send_queue_limit */
    CP_REASON_IDLE_TIMEOUT,   /* nothing received for idle_timeout_ms */
    CP_REASON_PACKET_TIMEOUT, /* a packet was started but not finished in time */
    CP_REASON_STOPPING,       /* the service is stopping */
    CP_REASON_NO_MEMORY,      /* the session could not get memory it needed */
    CP_REASON_COUNT_
} cp_reason;

/* A short constant string naming the reason ("peer closed", ...). */
CP_API const char *cp_reason_str(cp_reason reason);

/* ------------------------------------------------------------------ logging */

typedef enum cp_log_level { CP_LOG_DEBUG, CP_LOG_INFO, CP_LOG_WARN, CP_LOG_ERROR } cp_log_level;
typedef void (*cp_log_fn)(cp_log_level level, const char *msg, void *ud);

/* The library never prints on its own. Install a log sink (any thread; NULL
 * removes it). Messages are rare: backend choice, accept backoff, etc. */
CP_API void cp_set_log(cp_log_fn fn, void *ud);

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
} cp_port_opts;

/* Creates a port and starts its workers. opts may be NULL.
 * -ENOTSUP if the requested backend is not available here. */
CP_API int cp_port_create(cp_port **out, const cp_port_opts *opts);

/* Stops and joins every worker and frees the port. Every service on it must
 * have been stopped first (-EBUSY otherwise, and nothing is freed). Must not be
 * called from a worker (-EDEADLK). */
CP_API int cp_port_destroy(cp_port *port);

/* Runs fn(arg) on some worker, soon. Any thread. -ESHUTDOWN once destroying. */
CP_API int cp_port_post(cp_port *port, void (*fn)(void *arg), void *arg);

CP_API const char *cp_port_backend_name(const cp_port *port); /* "epoll", ... */
CP_API int cp_port_workers(const cp_port *port);

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

CP_API int cp_jobq_create(cp_jobq **out, cp_port *port);
/* Any thread. -ESHUTDOWN once the queue is closed. */
CP_API int cp_jobq_push(cp_jobq *q, void (*fn)(void *arg), void *arg);
/* Refuses further pushes (they return -ESHUTDOWN); the jobs already pushed
 * still run; then on_closed (may be NULL) runs on a worker. Safe from inside
 * one of the queue's own jobs. No job runs after on_closed. */
CP_API int cp_jobq_close(cp_jobq *q, void (*on_closed)(void *arg), void *arg);
/* The creator holds one reference; the memory goes with the last one (a
 * closing queue keeps its own until it has drained). Any thread. */
CP_API void cp_jobq_ref(cp_jobq *q);
CP_API void cp_jobq_unref(cp_jobq *q);
/* The queue whose job is running on this thread, or NULL. */
CP_API cp_jobq *cp_jobq_current(void);

/* ------------------------------------------------------------------ timers */

/* One-shot (repeat_ms 0) or repeating timers with millisecond resolution.
 * fn(arg) runs on a worker, or as a job of q when q is not NULL. Each timer
 * costs O(log n) to arm, fire and cancel (a heap per worker).
 * out may be NULL for a timer that is never cancelled; otherwise the handle
 * must be given back with cp_timer_cancel() (also after a one-shot fired). */
typedef struct cp_timer cp_timer;

CP_API int cp_timer_start(cp_timer **out, cp_port *port, uint64_t delay_ms, uint64_t repeat_ms,
                          void (*fn)(void *arg), void *arg, cp_jobq *q);
/* Any thread. Returns 0 if the timer will not fire again (a call already
 * running on another worker finishes; a job already queued is skipped),
 * -ENOENT if a one-shot had already fired. Releases the handle either way. */
CP_API int cp_timer_cancel(cp_timer *t);

/* ------------------------------------------------------------------ send buffers */

/* Opens a send buffer with room for cap bytes, carved from this thread's chunk
 * (no lock). Write into cp_sendbuf_data(), then cp_sendbuf_close() with the
 * number of bytes written; only those are kept. One buffer may be open per
 * thread at a time. The caller holds one reference. NULL if out of memory. */
CP_API cp_sendbuf *cp_sendbuf_open(size_t cap);
CP_API uint8_t *cp_sendbuf_data(cp_sendbuf *b);
CP_API void cp_sendbuf_close(cp_sendbuf *b, size_t len);
CP_API size_t cp_sendbuf_len(const cp_sendbuf *b);
/* Shortcuts: a closed buffer holding a copy of data; a closed packet buffer
 * holding {size, id} followed by body (NULL if size would exceed 65535). */
CP_API cp_sendbuf *cp_sendbuf_copy(const void *data, size_t len);
CP_API cp_sendbuf *cp_packet_make(uint16_t id, const void *body, size_t body_len);
/* Reference counting; any thread. A buffer queued on a session is referenced
 * by that session until written, so the caller may unref right after send. */
CP_API void cp_sendbuf_ref(cp_sendbuf *b);
CP_API void cp_sendbuf_unref(cp_sendbuf *b);

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
} cp_handlers;

/* Options shared by both kinds of service. Zero means the default. */
typedef struct cp_session_opts {
    cp_framing framing;        /* CP_FRAMING_PACKET */
    uint32_t max_packet;       /* 4096; at most 65535 */
    size_t send_queue_limit;   /* 1 MiB of queued, unsent bytes per session */
    const cp_route *routes;    /* packet handlers by id, copied at start */
    size_t nroutes;
    int no_nodelay;            /* 1 keeps Nagle on (TCP_NODELAY is set by default) */
    uint32_t idle_timeout_ms;   /* nothing received for this long: disconnect (0 = off) */
    uint32_t packet_timeout_ms; /* a packet started but unfinished this long: disconnect
                                   (raw framing: bytes on_recv left unconsumed this long,
                                   timed afresh whenever it consumes some) */
} cp_session_opts;

typedef struct cp_server_opts {
    const char *host;          /* numeric IPv4/IPv6 or a name; NULL = "0.0.0.0" */
    uint16_t port;             /* 0 picks a free port; see cp_service_port() */
    int backlog;               /* listen backlog; 0 = 1024 */
    int accepts;               /* accepts kept pending (K); 0 = 64 */
    uint32_t max_sessions;     /* live sessions at most; 0 = 10000 */
    cp_session_opts session;
} cp_server_opts;

typedef struct cp_client_opts {
    const char *host;          /* where to connect */
    uint16_t port;
    uint32_t sessions;         /* connect this many at start (may be 0) */
    uint32_t max_sessions;     /* 0 = max(sessions, 10000) */
    cp_session_opts session;
} cp_client_opts;

/* Starts a server: listening, accepting, serving. ctx is returned by
 * cp_service_ctx(). Returns -EADDRINUSE etc. if it cannot listen. */
CP_API int cp_server_start(cp_service **out, cp_port *port, const cp_server_opts *opts,
                           const cp_handlers *h, void *ctx);

/* Starts a client service and begins opts->sessions connects. */
CP_API int cp_client_start(cp_service **out, cp_port *port, const cp_client_opts *opts,
                           const cp_handlers *h, void *ctx);

/* Client services: start one more connect. Any thread. */
CP_API int cp_client_connect(cp_service *svc);

/* Graceful stop: stops accepting, disconnects every session with
 * CP_REASON_STOPPING, waits until every callback has run and every completion
 * has drained, then frees the service. No callback of this service runs after
 * it returns. Not from a worker (-EDEADLK). */
CP_API int cp_service_stop(cp_service *svc);

CP_API void *cp_service_ctx(const cp_service *svc);
CP_API cp_port *cp_service_port_of(const cp_service *svc);
/* The local port a server listens on (useful with port 0). */
CP_API uint16_t cp_service_port(const cp_service *svc);

typedef struct cp_service_stats {
    uint64_t sessions;          /* live now */
    uint64_t connected;         /* on_connected calls so far */
    uint64_t disconnected;      /* on_disconnected calls so far */
    uint64_t rejected;          /* accepted beyond max_sessions and closed at once */
    uint64_t connect_failed;
    uint64_t accept_errors;     /* EMFILE, ENFILE, ENOBUFS... (each backoff counts once) */
    uint64_t bytes_in, bytes_out;
    uint64_t packets_in;
    uint64_t by_reason[CP_REASON_COUNT_];
} cp_service_stats;

/* A snapshot of counters; any thread. */
CP_API void cp_service_stats_get(const cp_service *svc, cp_service_stats *out);

/* By session id, any thread: queue buf / disconnect. -ENOTCONN if that session
 * is gone or its slot was reused. */
CP_API int cp_service_send_to(cp_service *svc, uint64_t id, cp_sendbuf *b);
CP_API int cp_service_disconnect_id(cp_service *svc, uint64_t id);
/* Queue buf on every live session of the service; returns how many. */
CP_API int cp_service_broadcast(cp_service *svc, cp_sendbuf *b);

/* ------------------------------------------------------------------ sessions */

/* Queues buf for sending (the session takes its own reference). Any thread,
 * any time: -ENOTCONN once the session is disconnecting or gone. Exceeding the
 * send_queue_limit disconnects the session with CP_REASON_SEND_OVERFLOW. */
CP_API int cp_session_send(cp_session *s, cp_sendbuf *b);
/* Copies data into a new buffer and sends it. */
CP_API int cp_session_send_copy(cp_session *s, const void *data, size_t len);

/* Starts disconnecting with CP_REASON_LOCAL. Any thread; -ENOTCONN if already
 * disconnecting. on_disconnected follows on the session's worker. */
CP_API int cp_session_disconnect(cp_session *s);

/* Keep a session's memory alive beyond its callbacks (any thread). A kept
 * session that disconnected answers every call with -ENOTCONN. */
CP_API void cp_session_ref(cp_session *s);
CP_API void cp_session_unref(cp_session *s);

CP_API uint64_t cp_session_id(const cp_session *s);
/* The session's service; NULL once the session has finished (a session kept
 * with cp_session_ref can outlive its service). */
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
 * across any socket call. */
CP_API int cp_group_create(cp_group **out);
CP_API void cp_group_destroy(cp_group *g);
CP_API int cp_group_add(cp_group *g, cp_session *s);    /* -EEXIST, -ENOTCONN */
CP_API int cp_group_remove(cp_group *g, cp_session *s); /* -ENOENT */
CP_API size_t cp_group_size(cp_group *g);
/* Returns the number of members the buffer was queued on. */
CP_API int cp_group_broadcast(cp_group *g, cp_sendbuf *b);

#ifdef __cplusplus
}
#endif
#endif /* CPORT_H */
