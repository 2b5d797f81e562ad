/* SPDX-License-Identifier: MIT */
/* Errors, reasons, logging and clocks: the small things every layer uses. */
#include "base.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/*
 * The error table. One list gives both cp_err_name() and cp_strerror(), so no
 * code can have a name without a text or the other way round (libuv's
 * UV_ERRNO_MAP does the same). It holds every code the library returns or
 * passes on from the system (tests/test_errors.c checks that against the
 * sources), plus the other socket errors a connect, send or receive may meet.
 *
 * Every name here must exist on every system cport builds for: mingw-w64's
 * errno.h lacks ESHUTDOWN and EHOSTDOWN, and sys.h gives them Winsock's values.
 * Where two names share a value (EOPNOTSUPP is ENOTSUP on Linux, not on
 * Windows), the first entry names it, so the list keeps the preferred name
 * first and the lookup is a search, not a switch (which would reject the
 * duplicate on Linux).
 */
#define CP_ERRNO_MAP(X)                                                                                      \
  X(EINVAL, "invalid argument")                                                                              \
  X(ENOMEM, "out of memory")                                                                                 \
  X(ENOTCONN, "session is not connected")                                                                    \
  X(ENOTSUP, "not supported on this system or build")                                                        \
  X(EBUSY, "still in use")                                                                                   \
  X(EDEADLK, "would deadlock: called from a worker thread")                                                  \
  X(ESHUTDOWN, "port or service is shutting down")                                                           \
  X(EALREADY, "already in progress or done")                                                                 \
  X(EEXIST, "already exists")                                                                                \
  X(ENOENT, "not found")                                                                                     \
  X(EMSGSIZE, "message too long")                                                                            \
  X(EPROTO, "protocol error: malformed packet header")                                                       \
  X(ECANCELED, "operation canceled")                                                                         \
  X(EAGAIN, "resource temporarily unavailable, try again")                                                   \
  X(EINTR, "interrupted by a signal")                                                                        \
  X(ETIME, "timer expired")                                                                                  \
  X(ETIMEDOUT, "timed out")                                                                                  \
  X(EPERM, "operation not permitted")                                                                        \
  X(EACCES, "permission denied")                                                                             \
  X(ENOSYS, "function not implemented by the kernel")                                                        \
  X(EMFILE, "too many open files in this process")                                                           \
  X(ENFILE, "too many open files in the system")                                                             \
  X(ENOBUFS, "no buffer space")                                                                              \
  X(EADDRINUSE, "address already in use")                                                                    \
  X(EADDRNOTAVAIL, "address not available")                                                                  \
  X(EAFNOSUPPORT, "address family not supported")                                                            \
  X(ECONNREFUSED, "connection refused")                                                                      \
  X(ECONNRESET, "connection reset by peer")                                                                  \
  X(ECONNABORTED, "connection aborted")                                                                      \
  X(EPIPE, "broken pipe")                                                                                    \
  X(ENETDOWN, "network is down")                                                                             \
  X(ENETUNREACH, "network unreachable")                                                                      \
  X(ENETRESET, "connection reset by the network")                                                            \
  X(EHOSTDOWN, "host is down")                                                                               \
  X(EHOSTUNREACH, "host unreachable")                                                                        \
  X(EISCONN, "socket is already connected")                                                                  \
  X(EINPROGRESS, "operation in progress")                                                                    \
  X(EDESTADDRREQ, "destination address required")                                                            \
  X(EPROTOTYPE, "wrong protocol type for socket")                                                            \
  X(ENOPROTOOPT, "protocol option not available")                                                            \
  X(EPROTONOSUPPORT, "protocol not supported")                                                               \
  X(EOPNOTSUPP, "operation not supported on socket")                                                         \
  X(ENOTSOCK, "not a socket")                                                                                \
  X(EBADF, "bad file descriptor")                                                                            \
  X(EFAULT, "bad address")                                                                                   \
  X(EIO, "input/output error")

typedef struct cp_errdesc {
    int code; /* positive errno value */
    const char *name;
    const char *text;
} cp_errdesc;

#define CP_ERRDESC(code, text) { code, #code, text },
static const cp_errdesc err_table[] = { CP_ERRNO_MAP(CP_ERRDESC) };
#undef CP_ERRDESC

/* The entry for a negative code, or NULL. A search of a few dozen entries:
 * naming an error is never on a hot path. */
static const cp_errdesc *err_find(int err)
{
    for (size_t i = 0; i < sizeof err_table / sizeof err_table[0]; i++)
        if (-err_table[i].code == err) /* not -err: INT_MIN has no negation */
            return &err_table[i];
    return NULL;
}

const char *cp_strerror(int err)
{
    if (err >= 0)
        return "success";
    const cp_errdesc *e = err_find(err);
    return e ? e->text : "unknown error";
}

const char *cp_err_name(int err)
{
    if (err >= 0)
        return "OK";
    const cp_errdesc *e = err_find(err);
    return e ? e->name : "UNKNOWN";
}

static const char *const reason_names[CP_REASON_COUNT_] = {
    [CP_REASON_NONE] = "none",
    [CP_REASON_PEER_CLOSED] = "peer closed",
    [CP_REASON_RESET] = "connection reset",
    [CP_REASON_LOCAL] = "local disconnect",
    [CP_REASON_IO_ERROR] = "I/O error",
    [CP_REASON_BAD_HEADER] = "malformed packet header (size < 4)",
    [CP_REASON_TOO_BIG] = "packet larger than max_packet",
    [CP_REASON_HANDLER] = "packet handler refused",
    [CP_REASON_SEND_OVERFLOW] = "send queue limit exceeded",
    [CP_REASON_IDLE_TIMEOUT] = "idle timeout",
    [CP_REASON_PACKET_TIMEOUT] = "partial packet timeout",
    [CP_REASON_STOPPING] = "service stopping",
    [CP_REASON_NO_MEMORY] = "out of memory",
    [CP_REASON_TLS] = "TLS failure",
    [CP_REASON_HANDSHAKE_TIMEOUT] = "handshake timeout",
    [CP_REASON_WEBSOCKET] = "WebSocket protocol",
    [CP_REASON_KEEPALIVE] = "keepalive unanswered",
    [CP_REASON_USER_TIMEOUT] = "sent data unacknowledged",
    [CP_REASON_FIRST_PACKET_TIMEOUT] = "first packet timeout",
    [CP_REASON_PROXY] = "PROXY protocol",
    [CP_REASON_FLOOD] = "flood",
};

const char *cp_reason_str(cp_reason reason)
{
    if ((unsigned)reason >= CP_REASON_COUNT_)
        return "unknown reason";
    return reason_names[reason];
}

static const char *const refusal_names[CP_REFUSED_COUNT_] = {
    [CP_REFUSED_MAX_SESSIONS] = "max sessions",         [CP_REFUSED_PER_ADDR] = "sessions per address",
    [CP_REFUSED_ADDR_RATE] = "accept rate per address", [CP_REFUSED_RATE] = "accept rate",
    [CP_REFUSED_UNTRUSTED] = "untrusted proxy",
};

const char *cp_refusal_str(cp_refusal cause)
{
    if ((unsigned)cause >= CP_REFUSED_COUNT_)
        return "unknown cause";
    return refusal_names[cause];
}

static _Atomic(cp_log_fn) log_fn;
static _Atomic(void *) log_ud;

void cp_set_log(cp_log_fn fn, void *ud)
{
    atomic_store(&log_ud, ud);
    atomic_store(&log_fn, fn);
}

void cp__log(cp_log_level level, const char *fmt, ...)
{
    cp_log_fn fn = atomic_load(&log_fn);
    if (!fn)
        return;
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fn(level, msg, atomic_load(&log_ud));
}

uint64_t cp__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ allocation */

/* The allocator, replaced at most once and before the first allocation:
 * memory from one allocator must go back to the same one. Reads are plain:
 * setting it happens before anything that could allocate, on the thread
 * that then starts everything else. */
static struct {
    void *(*malloc_fn)(size_t);
    void *(*realloc_fn)(void *, size_t);
    void *(*calloc_fn)(size_t, size_t);
    void (*free_fn)(void *);
} alloc = { malloc, realloc, calloc, free };
static atomic_bool allocated;

int cp_set_allocator(void *(*malloc_fn)(size_t), void *(*realloc_fn)(void *, size_t),
                     void *(*calloc_fn)(size_t, size_t), void (*free_fn)(void *))
{
    if (!malloc_fn || !realloc_fn || !calloc_fn || !free_fn)
        return -EINVAL;
    if (atomic_load(&allocated))
        return -EBUSY;
    alloc.malloc_fn = malloc_fn;
    alloc.realloc_fn = realloc_fn;
    alloc.calloc_fn = calloc_fn;
    alloc.free_fn = free_fn;
    return 0;
}

/* The first allocation closes cp_set_allocator; a relaxed load keeps the
 * common case to one read of a line that stays cached. */
static void mark_allocated(void)
{
    if (!atomic_load_explicit(&allocated, memory_order_relaxed))
        atomic_store(&allocated, true);
}

void *cp__malloc(size_t n)
{
    mark_allocated();
    return alloc.malloc_fn(n);
}

void *cp__calloc(size_t n, size_t size)
{
    mark_allocated();
    return alloc.calloc_fn(n, size);
}

void *cp__realloc(void *p, size_t n)
{
    mark_allocated();
    return alloc.realloc_fn(p, n);
}

void cp__free(void *p) { alloc.free_fn(p); }

/* ------------------------------------------------------------------ misuse checks */

int cp__asserts_on(void)
{
#ifdef CP_ASSERTS
    return 1;
#else
    return 0;
#endif
}

void cp__misuse(const char *msg, const char *file, int line)
{
    /* The one place the library prints: a misuse build is about to abort,
     * and the log sink may be what the misuse broke. */
    fprintf(stderr, "cport: misuse: %s (%s:%d)\n", msg, file, line);
    fflush(stderr);
    abort();
}

#ifdef CP_ASSERTS
/* The live ports and services, so that a second destroy or stop is caught on
 * entry by looking the pointer up here instead of reading freed memory. A
 * program has few of them: a small array under one mutex. If it ever cannot
 * grow, the registry is abandoned (checks pass) rather than raise false
 * alarms about objects it missed. */
static pthread_mutex_t live_lock = PTHREAD_MUTEX_INITIALIZER;
static struct live {
    const void *p;
    int kind;
} * live;
static size_t nlive, caplive;
static bool live_broken;

void cp__live_add(int kind, const void *p)
{
    pthread_mutex_lock(&live_lock);
    if (nlive == caplive) {
        size_t cap = caplive ? caplive * 2 : 16;
        struct live *a = cp__realloc(live, cap * sizeof *a);
        if (!a)
            live_broken = true;
        else
            live = a, caplive = cap;
    }
    if (nlive < caplive)
        live[nlive++] = (struct live){ p, kind };
    pthread_mutex_unlock(&live_lock);
}

void cp__live_del(int kind, const void *p)
{
    pthread_mutex_lock(&live_lock);
    for (size_t i = 0; i < nlive; i++) {
        if (live[i].p == p && live[i].kind == kind) {
            live[i] = live[--nlive];
            break;
        }
    }
    if (nlive == 0) {
        /* Nothing live: give the memory back, so leak checks see none. */
        cp__free(live);
        live = NULL;
        caplive = 0;
    }
    pthread_mutex_unlock(&live_lock);
}

bool cp__live_has(int kind, const void *p)
{
    pthread_mutex_lock(&live_lock);
    bool found = live_broken;
    for (size_t i = 0; i < nlive && !found; i++)
        found = live[i].p == p && live[i].kind == kind;
    pthread_mutex_unlock(&live_lock);
    return found;
}
#endif
