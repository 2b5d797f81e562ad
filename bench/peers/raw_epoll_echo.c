/* SPDX-License-Identifier: MIT */
/*
 * raw_epoll_echo — the baseline cport's echo server is measured against.
 *
 * One thread, one level-triggered epoll set, no library. Each readiness event
 * costs one read() into a shared buffer and one write() of the same bytes.
 * Only when a write is short does the connection get a pending buffer of the
 * unwritten rest; it then stops reading (back-pressure) and waits for EPOLLOUT.
 *
 *   raw_epoll_echo --port P [--host H] [--buf BYTES]
 *
 * Prints "listening on H:P" once ready; exits 0 on SIGINT/SIGTERM.
 */
#ifndef _GNU_SOURCE
#  define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_EVENTS 512

struct conn {
    char *pend; /* unwritten rest of the last echo, NULL when none */
    size_t plen, poff;
};

static struct conn *conns; /* indexed by fd */
static int max_fds;
static int ep;
static int reserve_fd = -1;

static void usage(FILE *f)
{
    fprintf(f, "usage: raw_epoll_echo --port P [--host H] [--buf BYTES]\n"
               "  one-thread level-triggered epoll echo server (benchmark baseline)\n"
               "  --host H     address to bind (default 0.0.0.0)\n"
               "  --buf BYTES  read buffer size (default 65536)\n");
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < (1u << 20))
        max_fds = (int)rl.rlim_cur;
    else
        max_fds = 1 << 20;
}

static int open_listener(const char *host, const char *port, char *desc, size_t desclen)
{
    struct addrinfo hints, *res, *ai;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "raw_epoll_echo: %s:%s: %s\n", host, port, gai_strerror(rc));
        return -1;
    }
    int fd = -1;
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
            continue;
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, SOMAXCONN) == 0) {
            char h[NI_MAXHOST], p[NI_MAXSERV];
            if (getnameinfo(ai->ai_addr, ai->ai_addrlen, h, sizeof h, p, sizeof p,
                            NI_NUMERICHOST | NI_NUMERICSERV) == 0)
                snprintf(desc, desclen, "%s:%s", h, p);
            break;
        }
        fprintf(stderr, "raw_epoll_echo: bind/listen %s:%s: %s\n", host, port, strerror(errno));
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

static void close_conn(int fd)
{
    free(conns[fd].pend);
    conns[fd].pend = NULL;
    conns[fd].plen = conns[fd].poff = 0;
    close(fd); /* also removes it from the epoll set */
}

static void set_interest(int fd, unsigned events)
{
    struct epoll_event ev = { .events = events, .data.fd = fd };
    if (epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev) < 0)
        close_conn(fd);
}

static void do_accept(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if ((errno == EMFILE || errno == ENFILE) && reserve_fd >= 0) {
                /* Out of descriptors: accept and drop one so the listener
                 * does not stay readable forever. */
                close(reserve_fd);
                fd = accept(lfd, NULL, NULL);
                if (fd >= 0)
                    close(fd);
                reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                continue;
            }
            return; /* EAGAIN or an error we cannot fix here */
        }
        if (fd >= max_fds) {
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
            close(fd);
    }
}

/* Write the pending rest; back to reading when it is all gone. */
static void flush_pending(int fd)
{
    struct conn *c = &conns[fd];
    while (c->poff < c->plen) {
        ssize_t w = write(fd, c->pend + c->poff, c->plen - c->poff);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                close_conn(fd);
            return;
        }
        c->poff += (size_t)w;
    }
    free(c->pend);
    c->pend = NULL;
    c->plen = c->poff = 0;
    set_interest(fd, EPOLLIN);
}

static void on_conn_event(int fd, unsigned events, char *buf, size_t bufsz)
{
    struct conn *c = &conns[fd];
    if (c->pend) {
        /* Waiting for room: EPOLLOUT, or an error/hangup that the write reports. */
        flush_pending(fd);
        return;
    }
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
        return;
    ssize_t r = read(fd, buf, bufsz);
    if (r <= 0) {
        if (r == 0 || (errno != EAGAIN && errno != EINTR))
            close_conn(fd);
        return;
    }
    ssize_t w = write(fd, buf, (size_t)r);
    if (w == r)
        return;
    if (w < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            close_conn(fd);
            return;
        }
        w = 0;
    }
    /* Short write: keep the rest and stop reading until it is written. */
    size_t rest = (size_t)(r - w);
    c->pend = malloc(rest);
    if (!c->pend) {
        close_conn(fd);
        return;
    }
    memcpy(c->pend, buf + w, rest);
    c->plen = rest;
    c->poff = 0;
    set_interest(fd, EPOLLOUT);
}

int main(int argc, char **argv)
{
    const char *host = "0.0.0.0";
    const char *port = NULL;
    long bufsz = 65536;
    static const struct option lo[] = {
        { "port", required_argument, NULL, 'p' },
        { "host", required_argument, NULL, 'H' },
        { "buf", required_argument, NULL, 'b' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int o;
    while ((o = getopt_long(argc, argv, "p:H:b:h", lo, NULL)) != -1) {
        switch (o) {
        case 'p': port = optarg; break;
        case 'H': host = optarg; break;
        case 'b': {
            char *end;
            bufsz = strtol(optarg, &end, 10);
            if (*end || bufsz < 1024 || bufsz > (64L << 20)) {
                usage(stderr);
                return 2;
            }
            break;
        }
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!port || optind != argc) {
        usage(stderr);
        return 2;
    }
    {
        char *end;
        long pn = strtol(port, &end, 10);
        if (*end || pn < 0 || pn > 65535) {
            usage(stderr);
            return 2;
        }
    }

    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);

    conns = calloc((size_t)max_fds, sizeof *conns);
    char *buf = malloc((size_t)bufsz);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (!conns || !buf || ep < 0 || sfd < 0) {
        perror("raw_epoll_echo: setup");
        return 1;
    }
    char desc[NI_MAXHOST + NI_MAXSERV + 2] = "?";
    int lfd = open_listener(host, port, desc, sizeof desc);
    if (lfd < 0)
        return 1;
    reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = lfd };
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    ev.data.fd = sfd;
    epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &ev);

    printf("listening on %s\n", desc);
    fflush(stdout);

    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("raw_epoll_echo: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd)
                do_accept(lfd);
            else if (fd == sfd)
                goto out;
            else
                on_conn_event(fd, evs[i].events, buf, (size_t)bufsz);
        }
    }
out:
    for (int fd = 0; fd < max_fds; fd++)
        free(conns[fd].pend);
    free(conns);
    free(buf);
    return 0;
}
