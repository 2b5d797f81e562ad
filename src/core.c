/* Errors, reasons, logging and clocks: the small things every layer uses. */
#include "internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

const char *cp_strerror(int err)
{
    if (err >= 0)
        return "success";
    /* strerror() is not guaranteed thread-safe; the errno values cport returns
     * are a small known set, named here. */
    switch (-err) {
    case EINVAL: return "invalid argument";
    case ENOMEM: return "out of memory";
    case ENOTCONN: return "session is not connected";
    case ENOTSUP: return "not supported on this system or build";
    case EBUSY: return "still in use";
    case EDEADLK: return "would deadlock: called from a worker thread";
    case ESHUTDOWN: return "port or service is shutting down";
    case EADDRINUSE: return "address already in use";
    case EADDRNOTAVAIL: return "address not available";
    case ECONNREFUSED: return "connection refused";
    case ECONNRESET: return "connection reset by peer";
    case ETIMEDOUT: return "timed out";
    case EMFILE: return "too many open files in this process";
    case ENFILE: return "too many open files in the system";
    case ENOBUFS: return "no buffer space";
    case ECANCELED: return "operation canceled";
    case EEXIST: return "already exists";
    case ENOENT: return "not found";
    case EACCES: return "permission denied";
    case EPERM: return "operation not permitted";
    case ENOSYS: return "function not implemented by the kernel";
    case EHOSTUNREACH: return "host unreachable";
    case ENETUNREACH: return "network unreachable";
    case EPIPE: return "broken pipe";
    case EAFNOSUPPORT: return "address family not supported";
    case EMSGSIZE: return "message too long";
    default: return "unknown error";
    }
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
};

const char *cp_reason_str(cp_reason reason)
{
    if ((unsigned)reason >= CP_REASON_COUNT_)
        return "unknown reason";
    return reason_names[reason];
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

void *cp__xalloc(size_t n)
{
    return calloc(1, n);
}

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
static struct live { const void *p; int kind; } *live;
static size_t nlive, caplive;
static bool live_broken;

void cp__live_add(int kind, const void *p)
{
    pthread_mutex_lock(&live_lock);
    if (nlive == caplive) {
        size_t cap = caplive ? caplive * 2 : 16;
        struct live *a = realloc(live, cap * sizeof *a);
        if (!a)
            live_broken = true;
        else
            live = a, caplive = cap;
    }
    if (nlive < caplive)
        live[nlive++] = (struct live){p, kind};
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
        free(live);
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
