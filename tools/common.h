/*
 * Helpers shared by the cport command-line tools (cport-server, cport-dummy).
 *
 * CMake builds one program per C file in tools/, so shared code lives in this
 * header as static inline functions: each program gets its own copy and no
 * extra translation unit is needed.
 */
#ifndef CPORT_TOOLS_COMMON_H
#define CPORT_TOOLS_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <stdarg.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "cport.h"

/* Exit status for a command line we cannot use (bad, unknown or missing
 * argument, number out of range). 1 is kept for "ran but failed". */
#define TOOL_EXIT_USAGE 2

/* Prints "prog: <message>", then the program's usage, and exits with
 * TOOL_EXIT_USAGE. The programs' usage_error() wrappers forward to this. */
__attribute__((noreturn, format(printf, 3, 0))) static inline void
tool_usage_vexit(const char *prog, void (*usage)(FILE *), const char *fmt, va_list ap)
{
    fprintf(stderr, "%s: ", prog);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    usage(stderr);
    exit(TOOL_EXIT_USAGE);
}

/* CLOCK_MONOTONIC in nanoseconds. The dummy puts this value into chat packets
 * and the receivers subtract it from their own clock: valid because sender and
 * receivers are threads of one process. */
static inline uint64_t tool_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Parses a whole decimal string into [min, max]. With allow_suffix, one of
 * k/K, m/M, g/G multiplies by 2^10, 2^20, 2^30 (for byte sizes such as "1M").
 * Returns 0, or -1 if the text is empty, not a number, has trailing junk,
 * overflows or is out of range. Signs are refused: strtoull would silently
 * turn "-1" into a huge value. */
static inline int tool_parse_u64(const char *text, uint64_t min, uint64_t max, int allow_suffix,
                                 uint64_t *out)
{
    if (text == NULL || *text < '0' || *text > '9')
        return -1;
    errno = 0;
    char *end = NULL;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno != 0 || end == text)
        return -1;
    if (allow_suffix && *end != '\0' && end[1] == '\0') {
        unsigned shift = 0;
        switch (*end) {
        case 'k': case 'K': shift = 10; break;
        case 'm': case 'M': shift = 20; break;
        case 'g': case 'G': shift = 30; break;
        default: return -1;
        }
        if (v > (UINT64_MAX >> shift))
            return -1;
        v <<= shift;
        end++;
    }
    if (*end != '\0' || v < min || v > max)
        return -1;
    *out = (uint64_t)v;
    return 0;
}

/* Parses a non-negative decimal number with an optional fraction ("0.5"),
 * within [min, max]. Returns 0 or -1. */
static inline int tool_parse_double(const char *text, double min, double max, double *out)
{
    if (text == NULL || ((*text < '0' || *text > '9') && *text != '.'))
        return -1;
    errno = 0;
    char *end = NULL;
    double v = strtod(text, &end);
    if (errno != 0 || end == text || *end != '\0' || !(v >= min && v <= max))
        return -1;
    *out = v;
    return 0;
}

/* True if opt is one of the NULL-terminated names. */
static inline int tool_is_option(const char *opt, const char *const *names)
{
    for (; *names != NULL; names++)
        if (strcmp(opt, *names) == 0)
            return 1;
    return 0;
}

/* "auto" | "epoll" | "uring" → cp_backend. Returns 0 or -1. */
static inline int tool_parse_backend(const char *text, cp_backend *out)
{
    if (strcmp(text, "auto") == 0)
        *out = CP_BACKEND_AUTO;
    else if (strcmp(text, "epoll") == 0)
        *out = CP_BACKEND_EPOLL;
    else if (strcmp(text, "uring") == 0 || strcmp(text, "io_uring") == 0)
        *out = CP_BACKEND_URING;
    else
        return -1;
    return 0;
}

/* Creates the port, turning the common failure "this backend was not built
 * or the kernel refuses it" into a message that says so. Returns 0, or the
 * exit status the caller should use (2 for an unavailable backend, which is a
 * usage problem, 1 for anything else). */
static inline int tool_create_port(const char *prog, cp_port **port, int workers, cp_backend backend)
{
    cp_port_opts opts = { .workers = workers, .backend = backend };
    int rc = cp_port_create(port, &opts);
    if (rc == 0)
        return 0;
    if (rc == -ENOTSUP && backend != CP_BACKEND_AUTO) {
        fprintf(stderr, "%s: %s backend not available in this build or on this kernel (%s)\n",
                prog, backend == CP_BACKEND_URING ? "io_uring" : "requested", cp_strerror(rc));
        return TOOL_EXIT_USAGE;
    }
    fprintf(stderr, "%s: cannot create the completion port: %s\n", prog, cp_strerror(rc));
    return 1;
}

/* The log sink both tools install: one line per message on stderr with the
 * program name and level. cport logs rarely (backend choice, accept backoff),
 * and stdio locks each call, so workers may log concurrently. */
static inline void tool_log_sink(cp_log_level level, const char *msg, void *ud)
{
    static const char *const names[] = { "debug", "info", "warn", "error" };
    const char *name = (unsigned)level < sizeof names / sizeof names[0] ? names[level] : "?";
    fprintf(stderr, "%s: [%s] %s\n", (const char *)ud, name, msg);
}

/* Raises the soft open-file limit to want (capped by the hard limit), because
 * the default soft limit (often 1024) is far below what a stress run needs.
 * Returns the soft limit in effect afterwards. */
static inline rlim_t tool_raise_nofile(rlim_t want)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return 0;
    if (rl.rlim_cur < want) {
        rlim_t target = (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want) ? rl.rlim_max : want;
        struct rlimit nrl = { .rlim_cur = target, .rlim_max = rl.rlim_max };
        if (setrlimit(RLIMIT_NOFILE, &nrl) == 0)
            rl.rlim_cur = target;
    }
    return rl.rlim_cur;
}

/* Blocks SIGINT and SIGTERM in the calling thread and (because threads
 * inherit the mask) in every thread created afterwards, notably cport's
 * workers. Call before cp_port_create. The main thread then takes the signals
 * synchronously with sigwait/sigtimedwait, so no cport function ever runs in
 * a signal handler. SIGPIPE is ignored so that a write to a closed peer can
 * only ever produce EPIPE. */
static inline void tool_block_stop_signals(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, set, NULL);
    signal(SIGPIPE, SIG_IGN);
}

#endif /* CPORT_TOOLS_COMMON_H */
