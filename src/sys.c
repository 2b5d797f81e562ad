/* SPDX-License-Identifier: MIT */
/* The operating-system seam (see sys.h). */
#include "base.h"

#include <string.h>

#ifdef _WIN32

#  include <mstcpip.h> /* SIO_KEEPALIVE_VALS */
#  include <mswsock.h>

int cp__win_errno(unsigned long code)
{
    switch (code) {
    case 0: return 0;
    case WSAEWOULDBLOCK: return EAGAIN;
    case WSAEINTR: return EINTR;
    case WSAEINVAL:
    case ERROR_INVALID_PARAMETER: return EINVAL;
    case WSAEMFILE:
    case ERROR_TOO_MANY_OPEN_FILES: return EMFILE;
    case WSAENOBUFS:
    case ERROR_NOT_ENOUGH_MEMORY:
    case ERROR_OUTOFMEMORY: return ENOBUFS;
    case WSAECONNRESET:
    case ERROR_NETNAME_DELETED:
    case WSAENETRESET: return ECONNRESET;
    case WSAECONNABORTED:
    case ERROR_CONNECTION_ABORTED:
    case ERROR_REQUEST_ABORTED: return ECONNABORTED;
    case WSAECONNREFUSED:
    case ERROR_CONNECTION_REFUSED:
    case ERROR_PORT_UNREACHABLE: return ECONNREFUSED;
    case WSAETIMEDOUT:
    case ERROR_SEM_TIMEOUT:
    case WAIT_TIMEOUT: return ETIMEDOUT;
    case WSAENOTCONN: return ENOTCONN;
    case WSAESHUTDOWN: return EPIPE;
    case WSAEADDRINUSE: return EADDRINUSE;
    case WSAEADDRNOTAVAIL: return EADDRNOTAVAIL;
    case WSAENETUNREACH:
    case ERROR_NETWORK_UNREACHABLE: return ENETUNREACH;
    case WSAEHOSTUNREACH:
    case ERROR_HOST_UNREACHABLE: return EHOSTUNREACH;
    case WSAENETDOWN: return ENETDOWN;
    case WSAEAFNOSUPPORT: return EAFNOSUPPORT;
    case WSAEACCES:
    case ERROR_ACCESS_DENIED: return EACCES;
    case WSAENOTSOCK:
    case ERROR_INVALID_HANDLE: return EBADF;
    case WSAEMSGSIZE: return EMSGSIZE;
    case ERROR_OPERATION_ABORTED: return ECANCELED;
    case WSAEISCONN: return EISCONN;
    case WSAEALREADY: return EALREADY;
    case WSAEINPROGRESS: return EINPROGRESS;
    case WSAEBADF: return EBADF;
    case WSAEFAULT: return EFAULT;
    case WSAEDESTADDRREQ: return EDESTADDRREQ;
    case WSAEPROTOTYPE: return EPROTOTYPE;
    case WSAENOPROTOOPT: return ENOPROTOOPT;
    case WSAEPROTONOSUPPORT: return EPROTONOSUPPORT;
    case WSAEOPNOTSUPP: return EOPNOTSUPP;
    default: return EIO;
    }
}

int cp__sock_err(void) { return -cp__win_errno((unsigned long)WSAGetLastError()); }

int cp__sock_stream(int family)
{
    SOCKET s = WSASocketW(family, SOCK_STREAM, IPPROTO_TCP, NULL, 0,
                          WSA_FLAG_OVERLAPPED | WSA_FLAG_NO_HANDLE_INHERIT);
    if (s == INVALID_SOCKET)
        return cp__sock_err();
    /* Non-blocking as well as overlapped: the backend tries sends and reads
     * inline first and only waits through the port when they would block. */
    u_long yes = 1;
    if (ioctlsocket(s, FIONBIO, &yes) != 0) {
        int r = cp__sock_err();
        closesocket(s);
        return r;
    }
    return (int)s;
}

void cp__sock_close(int fd) { closesocket((SOCKET)fd); }

int cp__sock_shutdown_wr(int fd) { return shutdown((SOCKET)fd, SD_SEND) ? cp__sock_err() : 0; }

int cp__sock_setint(int fd, int level, int name, int value)
{
    return setsockopt((SOCKET)fd, level, name, (const char *)&value, sizeof value) ? cp__sock_err() : 0;
}

/* Windows' numbers for options mingw-w64's headers lack (ws2ipdef.h). */
#  ifndef TCP_MAXRT
#    define TCP_MAXRT 5
#  endif
#  ifndef TCP_KEEPCNT
#    define TCP_KEEPCNT 16
#  endif

static unsigned long secs_up(uint32_t ms) { return ms ? (ms + 999u) / 1000u : 0; }

int cp__sock_keepalive(int fd, uint32_t idle_ms, uint32_t interval_ms, uint32_t probes)
{
    struct tcp_keepalive ka = { 1, idle_ms, interval_ms };
    DWORD got = 0;
    if (WSAIoctl((SOCKET)fd, SIO_KEEPALIVE_VALS, &ka, sizeof ka, NULL, 0, &got, NULL, NULL) != 0)
        return cp__sock_err();
    /* The count is settable from Windows 10 1703 on; before, it is 10. */
    (void)cp__sock_setint(fd, IPPROTO_TCP, TCP_KEEPCNT, (int)probes);
    return 0;
}

int cp__sock_user_timeout(int fd, uint32_t ms)
{
    return cp__sock_setint(fd, IPPROTO_TCP, TCP_MAXRT, (int)secs_up(ms));
}

int cp__sock_unacked(int fd)
{
    (void)fd;
    return -ENOTSUP;
}

int cp__sock_listener(const struct sockaddr *sa, socklen_t len, int backlog, bool reuseport)
{
    /* Windows has no SO_REUSEPORT: its SO_REUSEADDR lets a second socket
     * take the port over, not share the connections. */
    if (reuseport)
        return -ENOTSUP;
    int fd = cp__sock_stream(sa->sa_family);
    if (fd < 0)
        return fd;
    /* Not SO_REUSEADDR: on Windows it lets another process take the port over.
     * Windows needs nothing to rebind a port with connections in TIME_WAIT. */
    cp__sock_setint(fd, SOL_SOCKET, SO_EXCLUSIVEADDRUSE, 1);
    if (bind((SOCKET)fd, sa, len) != 0 || listen((SOCKET)fd, backlog) != 0) {
        int r = cp__sock_err();
        closesocket((SOCKET)fd);
        return r;
    }
    return fd;
}

int cp__ncpu(void)
{
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return si.dwNumberOfProcessors > 0 ? (int)si.dwNumberOfProcessors : 1;
}

void cp__sleep_ms(unsigned ms) { Sleep(ms); }

bool cp__fine_pause_ok(void) { return false; }
uint64_t cp__thread_cpu_ns(void) { return 0; }
void cp__pause_ns(uint64_t ns) { CP_UNUSED(ns); }

void *cp__pages_map(size_t bytes, size_t align)
{
    (void)align; /* VirtualAlloc aligns to 64 KiB */
    return VirtualAlloc(NULL, bytes, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE);
}

void cp__pages_unmap(void *p, size_t bytes)
{
    (void)bytes;
    VirtualFree(p, 0, MEM_RELEASE);
}

void cp__pages_discard(void *p, size_t bytes) { VirtualAlloc(p, bytes, MEM_RESET, PAGE_READWRITE); }

static HANDLE stop_event;
static volatile LONG stop_sig;

static BOOL WINAPI on_console_event(DWORD type)
{
    InterlockedExchange(&stop_sig, type == CTRL_C_EVENT || type == CTRL_BREAK_EVENT ? 2 /* SIGINT */
                                                                                    : 15 /* SIGTERM */);
    SetEvent(stop_event);
    /* Returning TRUE for a console close would be ignored after a few seconds
     * anyway; the main thread has that long to stop the server. */
    return TRUE;
}

static INIT_ONCE stop_once = INIT_ONCE_STATIC_INIT;

static BOOL CALLBACK stop_setup(PINIT_ONCE once, PVOID param, PVOID *ctx)
{
    (void)once, (void)param, (void)ctx;
    stop_event = CreateEventW(NULL, TRUE, FALSE, NULL);
    return stop_event && SetConsoleCtrlHandler(on_console_event, TRUE);
}

int cp_catch_stop_signals(void)
{
    return InitOnceExecuteOnce(&stop_once, stop_setup, NULL, NULL) ? 0 : -cp__win_errno(GetLastError());
}

int cp_wait_stop_signal(void)
{
    int r = cp_catch_stop_signals();
    if (r < 0)
        return r;
    if (WaitForSingleObject(stop_event, INFINITE) != WAIT_OBJECT_0)
        return -cp__win_errno(GetLastError());
    return (int)InterlockedCompareExchange(&stop_sig, 0, 0);
}

#else /* POSIX */

#  include <pthread.h>
#  include <semaphore.h>
#  include <signal.h>
#  include <sys/ioctl.h>
#  include <sys/mman.h>
#  include <time.h>
#  ifdef __linux__
#    include <linux/sockios.h> /* SIOCOUTQ */
#    include <sys/prctl.h>
#  endif

/* A handler that posts a semaphore is async-signal-safe and works whatever
 * the signal masks of the other threads are, so the caller need not block
 * signals before the workers start. */
static sem_t stop_sem;
static volatile sig_atomic_t stop_sig;
static pthread_once_t stop_once = PTHREAD_ONCE_INIT;
static int stop_err;

static void on_stop_signal(int sig)
{
    int saved = errno;
    stop_sig = sig;
    sem_post(&stop_sem);
    errno = saved;
}

static void stop_setup(void)
{
    if (sem_init(&stop_sem, 0, 0) < 0) {
        stop_err = -errno;
        return;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0)
        stop_err = -errno;
}

int cp_catch_stop_signals(void)
{
    pthread_once(&stop_once, stop_setup);
    return stop_err;
}

int cp_wait_stop_signal(void)
{
    int r = cp_catch_stop_signals();
    if (r < 0)
        return r;
    /* A process may start with these signals blocked (the mask is inherited
     * across exec); then no thread might ever take them. This one will. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    while (sem_wait(&stop_sem) < 0)
        if (errno != EINTR)
            return -errno;
    return stop_sig;
}

int cp__sock_err(void) { return -errno; }

int cp__sock_stream(int family)
{
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    return fd < 0 ? -errno : fd;
}

void cp__sock_close(int fd) { close(fd); }

int cp__sock_shutdown_wr(int fd) { return shutdown(fd, SHUT_WR) ? -errno : 0; }

int cp__sock_setint(int fd, int level, int name, int value)
{
    return setsockopt(fd, level, name, &value, sizeof value) ? -errno : 0;
}

/* Linux counts keepalive in whole seconds: ms rounded up, at least 1. */
static int secs_up(uint32_t ms) { return ms < 1000u ? 1 : (int)((ms + 999u) / 1000u); }

int cp__sock_keepalive(int fd, uint32_t idle_ms, uint32_t interval_ms, uint32_t probes)
{
    int r = cp__sock_setint(fd, SOL_SOCKET, SO_KEEPALIVE, 1);
#  ifdef TCP_KEEPIDLE
    if (!r)
        r = cp__sock_setint(fd, IPPROTO_TCP, TCP_KEEPIDLE, secs_up(idle_ms));
    if (!r)
        r = cp__sock_setint(fd, IPPROTO_TCP, TCP_KEEPINTVL, secs_up(interval_ms));
    if (!r)
        r = cp__sock_setint(fd, IPPROTO_TCP, TCP_KEEPCNT, (int)probes);
#  else
    (void)idle_ms, (void)interval_ms, (void)probes;
#  endif
    return r;
}

int cp__sock_user_timeout(int fd, uint32_t ms)
{
#  ifdef TCP_USER_TIMEOUT
    return cp__sock_setint(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, (int)ms);
#  else
    (void)fd, (void)ms;
    return -ENOTSUP;
#  endif
}

int cp__sock_unacked(int fd)
{
#  ifdef SIOCOUTQ
    int n = 0;
    return ioctl(fd, SIOCOUTQ, &n) < 0 ? -errno : n;
#  else
    (void)fd;
    return -ENOTSUP;
#  endif
}

int cp__sock_listener(const struct sockaddr *sa, socklen_t len, int backlog, bool reuseport)
{
    int fd = cp__sock_stream(sa->sa_family);
    if (fd < 0)
        return fd;
    cp__sock_setint(fd, SOL_SOCKET, SO_REUSEADDR, 1);
    if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &(int){ 1 }, sizeof(int)) < 0) {
        int r = -errno;
        close(fd);
        return r;
    }
    if (bind(fd, sa, len) < 0 || listen(fd, backlog) < 0) {
        int r = -errno;
        close(fd);
        return r;
    }
    return fd;
}

int cp__ncpu(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

void *cp__pages_map(size_t bytes, size_t align)
{
    /* mmap aligns to a page only: for more, map align more and unmap what
     * lies outside the aligned part. */
    size_t extra = align > CP_PAGE ? align : 0;
    uint8_t *p = mmap(NULL, bytes + extra, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    if (!extra)
        return p;
    uint8_t *a = (uint8_t *)(((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1));
    if (a > p)
        munmap(p, (size_t)(a - p));
    if (a + bytes < p + bytes + extra)
        munmap(a + bytes, (size_t)(p + bytes + extra - (a + bytes)));
    return a;
}

void cp__pages_unmap(void *p, size_t bytes) { munmap(p, bytes); }

void cp__pages_discard(void *p, size_t bytes) { madvise(p, bytes, MADV_DONTNEED); }

void cp__sleep_ms(unsigned ms)
{
    struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

bool cp__fine_pause_ok(void) { return true; }

uint64_t cp__thread_cpu_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0)
        return 0;
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void cp__pause_ns(uint64_t ns)
{
#  ifdef PR_SET_TIMERSLACK
    static _Thread_local bool fine;
    if (!fine) {
        prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL); /* 1 us */
        fine = true;
    }
#  endif
    struct timespec ts = { .tv_sec = (time_t)(ns / 1000000000u), .tv_nsec = (long)(ns % 1000000000u) };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

#endif
