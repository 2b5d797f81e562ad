/* SPDX-License-Identifier: MIT */
/*
 * Shared test helpers for the cport test suite.
 *
 * Every test program is a Criterion program; Criterion runs each test in its
 * own forked process, so a test may change process state (rlimits, globals)
 * without affecting the next one. The Windows build uses a small
 * Criterion-compatible runner instead (tests/win/criterion), which runs each
 * test in its own child process the same way.
 *
 * Rules the helpers follow, so that tests can use them anywhere:
 * - Functions named cpt_x...() (x for "expect") assert with Criterion and must
 *   only be called from the test's own thread.
 * - Every other function returns an error code instead of asserting and may be
 *   called from any thread, including cport callbacks on worker threads.
 * - Sockets are blocking with a receive/send timeout (CPT_IO_TIMEOUT_MS), so a
 *   missing reply fails a test instead of hanging it.
 * - Sockets are ints on every system, as in cport itself: a Windows SOCKET is
 *   a kernel handle, and handles are 32-bit significant. Close them with
 *   cpt_close(); errors are negative errno values on every system (Winsock
 *   errors are mapped, see cpt_sock_errno()).
 *
 * This header brings in the system's socket API (BSD sockets or Winsock), so
 * tests include no socket header themselves.
 */
#ifndef CPT_HELPERS_H
#define CPT_HELPERS_H

#include <criterion/criterion.h>
#include <cport.h>

#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef _WIN32
#  ifndef WIN32_LEAN_AND_MEAN
#    define WIN32_LEAN_AND_MEAN
#  endif
#  include <winsock2.h>
#  include <ws2tcpip.h>
#  define SHUT_WR SD_SEND
#  define SHUT_RDWR SD_BOTH
/* cport reports -ESHUTDOWN; mingw's errno.h has no ESHUTDOWN, and cport
 * uses the Winsock code (src/sys.h). */
#  ifndef ESHUTDOWN
#    define ESHUTDOWN WSAESHUTDOWN
#  endif
#else
#  include <arpa/inet.h>
#  include <netinet/in.h>
#  include <netinet/tcp.h>
#  include <sys/socket.h>
#  include <unistd.h>
#endif

#define CPT_HOST4 "127.0.0.1"
#define CPT_HOST6 "::1"
#define CPT_IO_TIMEOUT_MS 5000

/* ------------------------------------------------------------------ time */

uint64_t cpt_now_ns(void);
uint64_t cpt_now_ms(void);
void cpt_sleep_ms(unsigned ms);
void cpt_sleep_us(unsigned us);
/* CPU time used by the whole process (all threads), in nanoseconds. */
uint64_t cpt_process_cpu_ns(void);
/* The calling thread's id, as the system numbers threads. */
int cpt_thread_id(void);
/* How long thread tid (of this process) has so far been kept from running
 * while it wanted to run: waiting for a CPU, or stopped by the hypervisor.
 * A timing test compares two readings to tell a slow part from a starved
 * machine. 0 where the system does not say. */
uint64_t cpt_thread_kept_off_ns(int tid);
/* Sleeps ms, the window a timing test counts in, and returns the longest any
 * of the n threads was kept from running meanwhile. A window in which a
 * worker was starved says nothing about the part under test. */
uint64_t cpt_sleep_watching(unsigned ms, const int *tids, int n);

/* Evaluates expr every millisecond until it is true or timeout_ms passed;
 * sets ok (a bool lvalue) to the final value of expr. */
#define CPT_WAIT(ok, expr, timeout_ms)                                                                       \
  do {                                                                                                       \
    uint64_t cpt_deadline_ = cpt_now_ms() + (uint64_t)(timeout_ms);                                          \
    for (;;) {                                                                                               \
      if (expr) {                                                                                            \
        (ok) = true;                                                                                         \
        break;                                                                                               \
      }                                                                                                      \
      if (cpt_now_ms() >= cpt_deadline_) {                                                                   \
        (ok) = (expr) ? true : false;                                                                        \
        break;                                                                                               \
      }                                                                                                      \
      cpt_sleep_ms(1);                                                                                       \
    }                                                                                                        \
  } while (0)

/* Waits for expr (as CPT_WAIT) and fails the test with the message if it never
 * became true. Test thread only. The message is mandatory. */
#define CPT_AWAIT(expr, timeout_ms, ...)                                                                     \
  do {                                                                                                       \
    bool cpt_ok_ = false;                                                                                    \
    CPT_WAIT(cpt_ok_, expr, timeout_ms);                                                                     \
    cr_assert(cpt_ok_, __VA_ARGS__);                                                                         \
  } while (0)

/* ------------------------------------------------------------------ port and services */

/* The backend named by the CP_BACKEND environment variable (AUTO if unset). */
cp_backend cpt_env_backend(void);
/* Creates a port with that backend (workers 0 = one per CPU). Skips the test if
 * the named backend is not available on this kernel (io_uring, IOCP). */
cp_port *cpt_xport(int workers);
/* The same with port options (the backend is still the environment's). */
cp_port *cpt_xport_opts(const cp_port_opts *opts);
void cpt_xport_destroy(cp_port *port);

/* Starts a server. opts may be NULL; a NULL host becomes 127.0.0.1 and the
 * port is left as given (0 = any free port). Asserts success. */
cp_service *cpt_xserver(cp_port *port, const cp_server_opts *opts, const cp_handlers *h, void *ctx);
/* Starts a client service towards host:port. Asserts success. */
cp_service *cpt_xclient(cp_port *port, const cp_client_opts *opts, const cp_handlers *h, void *ctx);
/* cp_service_stop, asserting it returns 0. */
void cpt_xstop(cp_service *svc);
/* Pushes a marker job onto q and waits (up to 5 s) until it ran: a queue
 * runs its jobs one at a time in push order, so every job pushed before the
 * call has run by then. Asserts; test thread. */
void cpt_xjobq_drained(cp_jobq *q);
cp_service_stats cpt_stats(const cp_service *svc);
/* Waits (up to 5 s, polling every 50 us) until the service has read at
 * least n bytes: what is sent after the call comes in a read of its own.
 * Asserts; test thread. */
void cpt_xbytes_in(const cp_service *svc, uint64_t n);
/* Waits (up to 5 s) until the service has written some bytes and then none
 * for 20 ms: the sockets it writes to are full, their peers not reading.
 * Asserts; test thread. */
void cpt_xwrites_stalled(const cp_service *svc);

/* ------------------------------------------------------------------ session tracking */

/* One record per session seen by a tracking service (see cpt_track). */
typedef struct cpt_srec {
    cp_session *s; /* valid while kept (track->keep_refs) or connected */
    uint64_t id;
    atomic_int peer_port;    /* the remote port, from cp_session_peer(); set last */
    atomic_int connected;    /* on_connected calls */
    atomic_int disconnected; /* on_disconnected calls */
    atomic_int inside;       /* thread id of the callback of this session now running, or 0 */
    atomic_int reason;       /* reason of on_disconnected */
    atomic_int err;          /* err of on_disconnected */
    atomic_int packets;      /* packets seen by the tracking handlers */
    atomic_llong bytes;      /* bytes seen by the tracking handlers */
    atomic_llong sent;       /* bytes reported by on_sent */
    atomic_llong expect_seq; /* free for the test: per-session sequence checks */
    void *user;              /* free for the test */
} cpt_srec;

/* A tracking context: pass it as the service ctx (or a struct that has it as
 * its first member and is calloc'ed). The cpt_on_* handlers keep counts and
 * check the callback contract: callbacks of one session never overlap or
 * nest, nothing runs for a session after its on_disconnected, no callback
 * runs after the test marked the service stopped, and inside
 * on_disconnected the session already refuses sends (-ENOTCONN). */
typedef struct cpt_track {
    atomic_int connected, disconnected, connect_failed;
    atomic_int last_connect_err;
    atomic_int failures;   /* contract violations seen inside callbacks */
    atomic_int overlaps;   /* callbacks of one session running at once on two threads */
    atomic_int nested;     /* a callback of a session run inside another of it (re-entrant) */
    atomic_int after_stop; /* callbacks after cpt_track_stopped() */
    atomic_int after_disc; /* callbacks of a session after its on_disconnected */
    atomic_int reasons[CP_REASON_COUNT_];
    atomic_bool stopped;
    atomic_llong packets, bytes_in, bytes_sent;
    atomic_int nrec;
    int cap;
    bool keep_refs; /* cp_session_ref every session in on_connected */
    bool echo;      /* the tracking packet/raw handlers echo what they get */
    /* hold_us and user may be set after the service started: atomic, so a
     * worker's callback that reads them is ordered after the test's store
     * by the store itself, not by the socket traffic in between (which
     * orders nothing in C11 and which ThreadSanitizer cannot see on
     * io_uring). */
    atomic_uint hold_us; /* each tracked callback sleeps this long inside */
    cpt_srec *recs;
    _Atomic(void *) user; /* free for the test */
} cpt_track;

cpt_track *cpt_track_new(int cap);
/* Unrefs kept sessions, frees the records and t itself (call after
 * cp_service_stop, before cp_port_destroy). */
void cpt_track_free(cpt_track *t);
/* Marks the service stopped: any later callback counts as after_stop. */
void cpt_track_stopped(cpt_track *t);
/* Asserts: no failures, overlaps, late callbacks, every on_connected matched by
 * exactly one on_disconnected. Call after cp_service_stop. */
void cpt_track_xcheck(cpt_track *t);
/* The record of a session (its cp_session_data). */
cpt_srec *cpt_rec(cp_session *s);
/* Waits (up to 2 s) until the service's stats agree with the callbacks seen
 * by t: stats.connected/disconnected equal t's counts and stats.sessions is
 * their difference. Counters may be updated just after a callback returns. */
void cpt_xsettle(const cp_service *svc, cpt_track *t);
/* Finds the record whose peer port is the given one (NULL if none yet). */
cpt_srec *cpt_track_by_peer(cpt_track *t, uint16_t peer_port);

/* Callback bracket: use at the start/end of every handler of a tracked
 * session. Records overlaps and late callbacks. */
void cpt_enter(cp_session *s);
void cpt_leave(cp_session *s);

/* Ready-made handlers for a cpt_track ctx. */
void cpt_on_connected(cp_session *s);
void cpt_on_disconnected(cp_session *s, cp_reason reason, int err);
void cpt_on_connect_failed(cp_service *svc, int err);
void cpt_on_sent(cp_session *s, size_t bytes);
int cpt_on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len);
size_t cpt_on_recv(cp_session *s, const uint8_t *data, size_t len);
/* Tracking handlers with echo = true for packet framing. */
cp_handlers cpt_track_handlers(void);

/* ------------------------------------------------------------------ raw sockets */

/* The portable basics: Winsock and BSD sockets differ in these. */
/* The last socket error of this thread as a positive errno value (Winsock
 * codes mapped to <errno.h> ones: WSAECONNREFUSED -> ECONNREFUSED, ...). */
int cpt_sock_errno(void);
/* A blocking TCP socket (AF_INET or AF_INET6) that child processes do not
 * inherit: the fd or a negative errno. */
int cpt_socket(int family);
/* close() / closesocket(). */
void cpt_close(int fd);
/* setsockopt / getsockopt with an int value: 0 or a negative errno. */
int cpt_setsockopt_int(int fd, int level, int name, int value);
int cpt_getsockopt_int(int fd, int level, int name, int *value);
/* A connected pair of stream sockets (AF_UNIX; loopback TCP on Windows, which
 * has no socketpair): 0 or a negative errno. */
int cpt_socketpair(int sv[2]);
/* Waits up to timeout_ms for fd to be readable (data, EOF or error): 1, 0
 * on timeout, negative errno. */
int cpt_poll_in(int fd, int timeout_ms);
/* A listening socket on 127.0.0.1, any free port (asserting; test thread). */
int cpt_xlisten(int backlog);
/* CPUs online (what cp_port_create's one worker per CPU counts). */
int cpt_ncpu(void);
/* 1 when running under Wine, whose sockets differ from Windows' in ways a
 * few tests must know (see cpt_close_reset). */
int cpt_under_wine(void);

/* Connects a blocking TCP socket to host:port with CPT_IO_TIMEOUT_MS send and
 * receive timeouts and TCP_NODELAY. rcvbuf > 0 sets SO_RCVBUF before connect.
 * Returns the fd or a negative errno. Any thread. */
int cpt_connect(const char *host, uint16_t port, int rcvbuf);
/* Asserting form, 127.0.0.1. */
int cpt_xconnect(uint16_t port);
/* cpt_connect (no rcvbuf) from the source address src (bound before the
 * connect, any port): 127.0.0.2 and the like, for caps by address. */
int cpt_connect_from(const char *src, const char *host, uint16_t port);
/* Sets the receive timeout of fd. */
int cpt_set_rcvtimeo(int fd, unsigned ms);
/* Sends all n bytes (MSG_NOSIGNAL). 0 or negative errno. */
int cpt_send_all(int fd, const void *p, size_t n);
/* recv() that retries when interrupted (EINTR): > 0 bytes, 0 at EOF, or a
 * negative errno (-EAGAIN when the receive timeout expired). */
ssize_t cpt_recv_some(int fd, void *p, size_t n);
/* One recv(), not retried when interrupted (-EINTR); otherwise as above. */
ssize_t cpt_recv_once(int fd, void *p, size_t n);
/* Receives exactly n bytes. 0, 1 if the peer closed first, negative errno
 * (-EAGAIN when the receive timeout expired). */
int cpt_recv_exact(int fd, void *p, size_t n);
/* Reads and discards until the peer closes (EOF or reset): 0, or -ETIMEDOUT
 * if the connection is still open after timeout_ms. */
int cpt_wait_closed(int fd, unsigned timeout_ms);
/* 1 if a read would show the connection closed (EOF/reset) right now, 0 if it
 * is open and has no data, 2 if data is waiting. Non-blocking. */
int cpt_peek_state(int fd);
/* Writes a packet header {size, id} little-endian at p. */
void cpt_put_header(uint8_t *p, uint16_t size, uint16_t id);
/* Sends one packet {4 + len, id} + body. 0 or negative errno. */
int cpt_send_packet(int fd, uint16_t id, const void *body, size_t len);
/* Receives one packet; body (up to cap bytes) and its length. 0, 1 on EOF,
 * negative errno; -EMSGSIZE if it does not fit, -EBADMSG if size < 4. */
int cpt_recv_packet(int fd, uint16_t *id, void *body, size_t cap, size_t *len);
uint16_t cpt_local_port(int fd);
/* accept() on a blocking listening socket, retried when interrupted. */
int cpt_accept(int lfd);
/* close() with SO_LINGER 0: the peer gets a reset. Not under Wine: its
 * closesocket() shuts a socket down (FIN) before closing it (server/sock.c,
 * sock_destroy), so the peer sees an orderly close first. */
void cpt_close_reset(int fd);
/* Asserting wrappers (test thread only). */
void cpt_xsend(int fd, const void *p, size_t n);
void cpt_xrecv(int fd, void *p, size_t n);
void cpt_xsend_packet(int fd, uint16_t id, const void *body, size_t len);
/* Receives one packet and asserts its id and body. */
void cpt_xrecv_packet_eq(int fd, uint16_t id, const void *body, size_t len);
void cpt_xclosed(int fd, unsigned timeout_ms);
/* Receives the next packet and asserts it is {id, body} (a marker), failing
 * with msg if something else comes first. A session's packets arrive in the
 * order they were sent, so a marker sent after the packets under test shows
 * that nothing else was sent before it: no need to wait and see. */
void cpt_xnext_packet_is(int fd, uint16_t id, const void *body, size_t len, const char *msg);

/* The fd of this process whose socket is the other end of the loopback
 * connection fd (the library's accepted socket, for instance), or -1. */
int cpt_find_peer_fd(int fd);
/* Asserting form (test thread): waits up to a second for it; if it is not
 * found and the backend is not epoll (whose sockets are plain fds), the test
 * is skipped as not applicable. */
int cpt_xfind_peer_fd(int fd);

/* Deterministic test bytes: byte i of stream `seed`. */
uint8_t cpt_pattern(uint64_t i, uint32_t seed);
void cpt_fill(uint8_t *p, size_t n, uint64_t offset, uint32_t seed);
/* Index of the first byte that differs from the pattern, or -1. */
long long cpt_check_pattern(const uint8_t *p, size_t n, uint64_t offset, uint32_t seed);

/* ------------------------------------------------------------------ resources and leaks */

/* Open descriptors of this process (Windows: open kernel handles, but for
 * those of synchronization objects, see helpers.c). */
int cpt_count_fds(void);
/* Resident set size of this process in KiB. */
long cpt_rss_kib(void);
/* Bytes of heap in use (0 when unknown, e.g. under AddressSanitizer). On
 * Windows: the busy blocks of the C runtime's heap. */
size_t cpt_heap_in_use(void);
/* Raises the soft RLIMIT_NOFILE to at least want (capped at the hard limit);
 * returns the new soft limit. Windows has no such limit (sockets are
 * handles, bounded by memory): returns want. */
unsigned long long cpt_raise_nofile(unsigned long long want);
/* 1 when built with AddressSanitizer (LeakSanitizer available). */
int cpt_sanitized(void);
/* CPT_TSAN: 1 when built with ThreadSanitizer (make check-tsan), else 0; a
 * constant, for the few tests whose measure means nothing under TSan. */
#if defined(__SANITIZE_THREAD__)
#  define CPT_TSAN 1
#elif defined(__has_feature)
#  if __has_feature(thread_sanitizer)
#    define CPT_TSAN 1
#  endif
#endif
#ifndef CPT_TSAN
#  define CPT_TSAN 0
#endif

typedef struct cpt_leak_mark {
    int fds;
} cpt_leak_mark;

/* Leak check around a test: begin records open fds; end (after every service
 * is stopped, the port destroyed and every test socket closed) asserts that
 * the fd count is back, and under AddressSanitizer runs LeakSanitizer and
 * asserts it found nothing. */
void cpt_leak_begin(cpt_leak_mark *m);
void cpt_leak_end(const cpt_leak_mark *m);

/* ------------------------------------------------------------------ a ready-made test environment */

enum {
    CPT_KEEP_REFS = 1, /* track->keep_refs */
    CPT_NO_ECHO = 2,   /* track->echo = false */
    CPT_RAW = 4,       /* handlers use on_recv (set opts->session.framing yourself) */
};

typedef struct cpt_env {
    cp_port *port;
    cp_service *svc;
    cpt_track *t;
    cp_handlers h;
    uint16_t sport;
    cpt_leak_mark leak;
} cpt_env;

/* Leak mark, a port with `workers` workers, and a tracking server (echo by
 * default) with room for `cap` sessions. opts may be NULL (127.0.0.1, any
 * port); h may be NULL (cpt_track_handlers()); h is copied into e->h. */
void cpt_env_start(cpt_env *e, int workers, const cp_server_opts *opts, const cp_handlers *h, int cap,
                   unsigned flags);
/* The same on a port made with port_opts (the backend is the environment's). */
void cpt_env_start_on(cpt_env *e, const cp_port_opts *port_opts, const cp_server_opts *opts,
                      const cp_handlers *h, int cap, unsigned flags);
/* Stops the server, checks the tracking, frees it, destroys the port and runs
 * the leak check. Close every test socket first. */
void cpt_env_stop(cpt_env *e);
/* Connects to e's server, sends a packet and expects it echoed (the server
 * must echo): proves the server still serves new sessions. */
void cpt_env_xneighbour(cpt_env *e);

#endif /* CPT_HELPERS_H */
