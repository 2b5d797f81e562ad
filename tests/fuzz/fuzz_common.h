/* SPDX-License-Identifier: MIT */
/* Pieces the fuzz targets share; static inline so each target stays one file to build. */
#ifndef CP_FUZZ_COMMON_H
#define CP_FUZZ_COMMON_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <time.h>

/* connect() that survives signals (libFuzzer's timers interrupt it): after
 * EINTR the connect goes on in the background; wait for it with poll. */
static inline int connect_retry(int fd, const struct sockaddr *sa, socklen_t len)
{
    if (connect(fd, sa, len) == 0)
        return 0;
    if (errno != EINTR && errno != EINPROGRESS)
        return -1;
    for (;;) {
        struct pollfd pf = { .fd = fd, .events = POLLOUT };
        int r = poll(&pf, 1, 10000);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
        errno = err;
        return err ? -1 : 0;
    }
}

static inline uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Short waits spin (yielding), so that they stay short; long ones sleep,
 * leaving the two cores to the server. */
static inline void sleep_us(uint64_t us)
{
    if (us >= 1000) {
        struct timespec ts = { .tv_sec = (time_t)(us / 1000000u), .tv_nsec = (long)(us % 1000000u) * 1000 };
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
        return;
    }
    uint64_t until = now_us() + us;
    while (now_us() < until)
        sched_yield();
}

/* A deadline for the server that does not count time this thread was not
 * running (a stall of the machine or of its VM: on 2 shared cores a wait
 * of 1 ms once came back seconds later). */
typedef struct patience {
    uint64_t deadline, last, stalled;
} patience;

static inline patience patience_start(uint64_t us)
{
    uint64_t now = now_us();
    return (patience){ .deadline = now + us, .last = now };
}

/* Called on each turn of a wait loop; true once the time is up. */
static inline bool patience_out(patience *p)
{
    uint64_t now = now_us();
    if (now - p->last > 100000) {
        p->deadline += now - p->last;
        p->stalled += now - p->last;
    }
    p->last = now;
    return now > p->deadline;
}

/* The listening socket of a server on port, found among our descriptors, to
 * read its accept queue: a connection still in it has no session yet, so "no
 * session live" alone could pass before an input's last sessions even began.
 * Read only. -1 if none. */
static inline int listener_fd_of(uint16_t port)
{
    for (int fd = 0; fd < 1024; fd++) {
        int acc = 0;
        socklen_t al = sizeof acc;
        struct sockaddr_in a;
        socklen_t sl = sizeof a;
        if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &al) == 0 && acc &&
            getsockname(fd, (struct sockaddr *)&a, &sl) == 0 && a.sin_family == AF_INET &&
            ntohs(a.sin_port) == port)
            return fd;
    }
    return -1;
}

/* Connections waiting to be accepted on the listening socket fd (Linux
 * reports a listener's accept queue as tcpi_unacked); 0 when unknown. */
static inline unsigned accept_backlog(int fd)
{
    struct tcp_info ti;
    socklen_t len = sizeof ti;
    if (fd < 0 || getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0)
        return 0;
    return ti.tcpi_unacked;
}

#endif
