/* SPDX-License-Identifier: MIT */
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
#  define _GNU_SOURCE
#endif

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Everything that differs between POSIX systems and Windows lives in this
 * header, behind these #ifdefs; the programs themselves have none. */
#ifdef _WIN32
#  ifndef WIN32_LEAN_AND_MEAN
#    define WIN32_LEAN_AND_MEAN
#  endif
#  include <winsock2.h>
#  include <ws2tcpip.h> /* inet_pton */
#  include <windows.h>
#  include <psapi.h> /* GetProcessMemoryInfo (kernel32's K32 entry point) */
#else
#  include <arpa/inet.h> /* inet_pton */
#  include <sys/resource.h>
#endif

#include "cport.h"

/* The printf format checker to use: on mingw-w64, plain "printf" means the
 * Microsoft runtime's formats, which lack %zu and %llu; with _GNU_SOURCE the
 * programs use mingw's own C99 printf, whose checker is "gnu_printf". */
#ifdef __MINGW_PRINTF_FORMAT
#  define TOOL_PRINTF __MINGW_PRINTF_FORMAT
#else
#  define TOOL_PRINTF printf
#endif

/* The --backend values this system offers, for the usage text and errors. */
#ifdef _WIN32
#  define TOOL_BACKEND_CHOICES "auto | iocp"
#  define TOOL_BACKEND_LIST "auto or iocp"
#else
#  define TOOL_BACKEND_CHOICES "auto | epoll | uring"
#  define TOOL_BACKEND_LIST "auto, epoll or uring"
#endif

/* Exit status for a command line we cannot use (bad, unknown or missing
 * argument, number out of range). 1 is kept for "ran but failed". */
#define TOOL_EXIT_USAGE 2

/* Prints "prog: <message>", then the program's usage, and exits with
 * TOOL_EXIT_USAGE. The programs' usage_error() wrappers forward to this. */
__attribute__((noreturn, format(TOOL_PRINTF, 3, 0))) static inline void
tool_usage_vexit(const char *prog, void (*usage)(FILE *), const char *fmt, va_list ap)
{
    fprintf(stderr, "%s: ", prog);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    usage(stderr);
    /* NOLINTNEXTLINE(concurrency-mt-unsafe): usage errors are found before any other thread starts */
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

/* Sleeps for about ns nanoseconds (Windows: whole milliseconds, rounded up). */
static inline void tool_sleep_ns(uint64_t ns)
{
#ifdef _WIN32
    uint64_t ms = (ns + 999999u) / 1000000u;
    Sleep(ms > 0xfffffffeu ? 0xfffffffeu : (DWORD)ms);
#else
    struct timespec ts = { .tv_sec = (time_t)(ns / 1000000000u), .tv_nsec = (long)(ns % 1000000000u) };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
#endif
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
        case 'k':
        case 'K': shift = 10; break;
        case 'm':
        case 'M': shift = 20; break;
        case 'g':
        case 'G': shift = 30; break;
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

/* "auto" | "epoll" | "uring" (Windows: "auto" | "iocp") → cp_backend.
 * Returns 0 or -1. */
static inline int tool_parse_backend(const char *text, cp_backend *out)
{
    if (strcmp(text, "auto") == 0)
        *out = CP_BACKEND_AUTO;
#ifdef _WIN32
    else if (strcmp(text, "iocp") == 0)
        *out = CP_BACKEND_IOCP;
#else
    else if (strcmp(text, "epoll") == 0)
        *out = CP_BACKEND_EPOLL;
    else if (strcmp(text, "uring") == 0 || strcmp(text, "io_uring") == 0)
        *out = CP_BACKEND_URING;
#endif
    else
        return -1;
    return 0;
}

/* Creates the port, turning the common failure "this backend was not built
 * or the kernel refuses it" into a message that says so. Returns 0, or the
 * exit status the caller should use (2 for an unavailable backend, which is a
 * usage problem, 1 for anything else). */
static inline int tool_create_port(const char *prog, cp_port **port, const cp_port_opts *opts)
{
    int rc = cp_port_create(port, opts);
    if (rc == 0)
        return 0;
    if (rc == -ENOTSUP && opts->backend != CP_BACKEND_AUTO) {
        fprintf(stderr, "%s: %s backend not available in this build or on this kernel (%s)\n", prog,
                opts->backend == CP_BACKEND_URING ? "io_uring" : "requested", cp_strerror(rc));
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
 * Returns the soft limit in effect afterwards. Windows has no such limit
 * (a socket is a handle, bounded by memory): UINT64_MAX. */
static inline uint64_t tool_raise_nofile(uint64_t want)
{
#ifdef _WIN32
    (void)want;
    return UINT64_MAX;
#else
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return 0;
    if (rl.rlim_cur < want) {
        rlim_t target = (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want) ? rl.rlim_max : (rlim_t)want;
        struct rlimit nrl = { .rlim_cur = target, .rlim_max = rl.rlim_max };
        if (setrlimit(RLIMIT_NOFILE, &nrl) == 0)
            rl.rlim_cur = target;
    }
    return (uint64_t)rl.rlim_cur; /* RLIM_INFINITY is the largest value */
#endif
}

/* Stop requests: SIGINT or SIGTERM on POSIX systems; Ctrl-C, Ctrl-Break or
 * closing the console on Windows (reported as SIGINT and SIGTERM).
 *
 * tool_stop_init() installs cport's handlers (cp_catch_stop_signals), then
 * starts one watcher thread that calls cp_wait_stop_signal() and records what
 * it returns, before any other thread exists. On POSIX it then blocks SIGINT
 * and SIGTERM in the calling thread, which every thread created later (cport's
 * workers) inherits; cp_wait_stop_signal unblocks them in the watcher. So a
 * signal that arrives at any point after that (even before the server
 * listens, or right after) is never lost, it is always taken by the watcher,
 * and no worker is ever interrupted by one. The main thread then either
 * blocks (tool_stop_wait) or polls (tool_stop_requested). */

/* 0 while no stop was requested; then SIGINT/SIGTERM, or a negative errno if
 * cp_wait_stop_signal failed. */
static inline atomic_int *tool_stop_state(void)
{
    static atomic_int state;
    return &state;
}

static inline pthread_t *tool_stop_thread(void)
{
    static pthread_t thread;
    return &thread;
}

static inline void *tool_stop_watch(void *arg)
{
    (void)arg;
    int sig = cp_wait_stop_signal();
    atomic_store(tool_stop_state(), sig != 0 ? sig : SIGTERM);
    return NULL;
}

/* Call first in main, before cp_port_create. Returns 0 or a negative errno.
 * POSIX: SIGPIPE is also ignored, so that a write to a closed peer can only
 * ever produce EPIPE. */
static inline int tool_stop_init(void)
{
#ifndef _WIN32
    signal(SIGPIPE, SIG_IGN);
#endif
    int rc = cp_catch_stop_signals();
    if (rc < 0)
        return rc;
    rc = pthread_create(tool_stop_thread(), NULL, tool_stop_watch, NULL);
    if (rc != 0)
        return -rc;
#ifndef _WIN32
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
#endif
    return 0;
}

/* Blocks until a stop is requested. Returns SIGINT or SIGTERM, or a negative
 * errno if waiting failed. Call once, after tool_stop_init. */
static inline int tool_stop_wait(void)
{
    pthread_join(*tool_stop_thread(), NULL);
    return atomic_load(tool_stop_state());
}

/* 0 while no stop was requested, then SIGINT or SIGTERM (or a negative errno
 * if waiting failed). Any thread, never blocks. */
static inline int tool_stop_requested(void) { return atomic_load(tool_stop_state()); }

/* Resident memory (Windows: working set) of process pid in KiB, or -1 if it
 * cannot be read or the process is gone. */
static inline long tool_process_rss_kib(long pid)
{
#ifdef _WIN32
    HANDLE h = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, FALSE, (DWORD)pid);
    if (h == NULL)
        return -1;
    long kib = -1;
    DWORD code = 0;
    PROCESS_MEMORY_COUNTERS pmc;
    if (GetExitCodeProcess(h, &code) && code == STILL_ACTIVE && GetProcessMemoryInfo(h, &pmc, sizeof pmc))
        kib = (long)(pmc.WorkingSetSize / 1024u);
    CloseHandle(h);
    return kib;
#else
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%ld/status", pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return -1;
    long kib = -1;
    while (fgets(line, sizeof line, f) != NULL) {
        if (strncmp(line, "VmRSS:", 6) == 0) {
            kib = strtol(line + 6, NULL, 10);
            break;
        }
    }
    fclose(f);
    return kib;
#endif
}

/* aligned_alloc, which the Windows C runtime lacks; free with
 * tool_aligned_free. size must be a multiple of align. */
static inline void *tool_aligned_alloc(size_t align, size_t size)
{
#ifdef _WIN32
    return _aligned_malloc(size, align);
#else
    return aligned_alloc(align, size);
#endif
}

static inline void tool_aligned_free(void *p)
{
#ifdef _WIN32
    _aligned_free(p);
#else
    free(p);
#endif
}

#endif /* CPORT_TOOLS_COMMON_H */
