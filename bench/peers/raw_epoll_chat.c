/* SPDX-License-Identifier: MIT */
/*
 * raw_epoll_chat — the baseline cport's chat/broadcast server is measured against.
 *
 * Protocol: packets { u16 size; u16 id; body }, little-endian, size counts the
 * 4-byte header (4..65535). Every complete packet received from any client is
 * delivered unchanged to every connected client, the sender included.
 *
 * One thread, one level-triggered epoll set. Per epoll_wait round:
 *   1. each readable client gets one read(), straight into the round buffer
 *      (after any partial packet it carried over from earlier); its complete
 *      packets stay there, a trailing partial packet goes back to its carry;
 *   2. after the round, every client gets the whole round buffer with ONE
 *      write(). Only when that write is short (or the client already has a
 *      backlog) is the rest copied to a per-client backlog, drained on EPOLLOUT.
 *
 *   raw_epoll_chat --port P [--host H] [--backlog-limit BYTES]
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
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_EVENTS 1024
#define READ_CHUNK (64 * 1024)    /* bytes per read() */
#define ROUND_SOFT_CAP (4u << 20) /* stop reading more clients this round past this */

struct client {
    int live_idx;         /* index in live[], -1 when free */
    unsigned char *carry; /* partial packet carried to the next read */
    size_t carry_len, carry_cap;
    unsigned char *back; /* unsent broadcast bytes (only after a short write) */
    size_t back_off, back_len, back_cap;
};

static struct client *tab; /* indexed by fd */
static int max_fds;
static int *live; /* fds of connected clients, dense */
static int nlive;
static int ep;
static int reserve_fd = -1;
static size_t backlog_limit = 64u << 20;

static unsigned char *round_buf;
static size_t round_len, round_cap;

static void usage(FILE *f)
{
    fprintf(f, "usage: raw_epoll_chat --port P [--host H] [--backlog-limit BYTES]\n"
               "  one-thread epoll chat server: every packet {u16 size,u16 id,body} from any\n"
               "  client goes to every client; one write per client per epoll round\n"
               "  --host H               address to bind (default 0.0.0.0)\n"
               "  --backlog-limit BYTES  drop a client whose unsent backlog exceeds this (default 64 MiB)\n");
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
        fprintf(stderr, "raw_epoll_chat: %s:%s: %s\n", host, port, gai_strerror(rc));
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
        fprintf(stderr, "raw_epoll_chat: bind/listen %s:%s: %s\n", host, port, strerror(errno));
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

static int reserve(unsigned char **p, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : 4096;
    while (n < need)
        n *= 2;
    unsigned char *q = realloc(*p, n);
    if (!q)
        return -1;
    *p = q;
    *cap = n;
    return 0;
}

static void close_client(int fd)
{
    struct client *c = &tab[fd];
    if (c->live_idx >= 0) {
        int last = live[--nlive];
        live[c->live_idx] = last;
        tab[last].live_idx = c->live_idx;
    }
    free(c->carry);
    free(c->back);
    memset(c, 0, sizeof *c);
    c->live_idx = -1;
    close(fd);
}

static void do_accept(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if ((errno == EMFILE || errno == ENFILE) && reserve_fd >= 0) {
                close(reserve_fd);
                fd = accept(lfd, NULL, NULL);
                if (fd >= 0)
                    close(fd);
                reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                continue;
            }
            return;
        }
        if (fd >= max_fds) {
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            continue;
        }
        struct client *c = &tab[fd];
        memset(c, 0, sizeof *c);
        c->live_idx = nlive;
        live[nlive++] = fd;
    }
}

/* One read; complete packets land in the round buffer, a partial tail in the carry. */
static void on_readable(int fd)
{
    struct client *c = &tab[fd];
    if (reserve(&round_buf, &round_cap, round_len + c->carry_len + READ_CHUNK) < 0) {
        close_client(fd);
        return;
    }
    unsigned char *start = round_buf + round_len;
    if (c->carry_len)
        memcpy(start, c->carry, c->carry_len);
    ssize_t r = read(fd, start + c->carry_len, READ_CHUNK);
    if (r <= 0) {
        if (r == 0 || (errno != EAGAIN && errno != EINTR))
            close_client(fd);
        return;
    }
    size_t total = c->carry_len + (size_t)r, p = 0;
    while (total - p >= 4) {
        size_t size = (size_t)start[p] | (size_t)start[p + 1] << 8;
        if (size < 4) {
            round_len += p; /* keep the good packets before it */
            close_client(fd);
            return;
        }
        if (size > total - p)
            break;
        p += size;
    }
    round_len += p;
    size_t rest = total - p;
    if (rest && reserve(&c->carry, &c->carry_cap, rest) < 0) {
        close_client(fd);
        return;
    }
    if (rest)
        memcpy(c->carry, start + p, rest);
    c->carry_len = rest;
}

static int backlog_append(struct client *c, const unsigned char *p, size_t n)
{
    if (c->back_off && c->back_len + n > c->back_cap) {
        memmove(c->back, c->back + c->back_off, c->back_len - c->back_off);
        c->back_len -= c->back_off;
        c->back_off = 0;
    }
    if (c->back_len - c->back_off + n > backlog_limit)
        return -1;
    if (reserve(&c->back, &c->back_cap, c->back_len + n) < 0)
        return -1;
    memcpy(c->back + c->back_len, p, n);
    c->back_len += n;
    return 0;
}

static void set_interest(int fd, unsigned events)
{
    struct epoll_event ev = { .events = events, .data.fd = fd };
    if (epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev) < 0)
        close_client(fd);
}

/* Returns 0 if the client is still alive. */
static int on_writable(int fd)
{
    struct client *c = &tab[fd];
    while (c->back_off < c->back_len) {
        ssize_t w = write(fd, c->back + c->back_off, c->back_len - c->back_off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return 0;
            close_client(fd);
            return -1;
        }
        c->back_off += (size_t)w;
    }
    c->back_off = c->back_len = 0;
    set_interest(fd, EPOLLIN);
    return tab[fd].live_idx >= 0 ? 0 : -1;
}

/* One write of the round's packets to every client. */
static void broadcast_round(void)
{
    const unsigned char *data = round_buf;
    size_t len = round_len;
    for (int i = 0; i < nlive;) {
        int fd = live[i];
        struct client *c = &tab[fd];
        if (c->back_len) {
            /* Already behind: keep order, queue after the backlog. */
            if (backlog_append(c, data, len) < 0) {
                close_client(fd); /* live[i] now holds another client */
                continue;
            }
            i++;
            continue;
        }
        ssize_t w = write(fd, data, len);
        if (w == (ssize_t)len) {
            i++;
            continue;
        }
        if (w < 0) {
            if (errno != EAGAIN && errno != EINTR) {
                close_client(fd);
                continue;
            }
            w = 0;
        }
        if (backlog_append(c, data + w, len - (size_t)w) < 0) {
            close_client(fd);
            continue;
        }
        set_interest(fd, EPOLLIN | EPOLLOUT);
        if (tab[fd].live_idx >= 0)
            i++;
    }
    round_len = 0;
}

int main(int argc, char **argv)
{
    const char *host = "0.0.0.0";
    const char *port = NULL;
    static const struct option lo[] = {
        { "port", required_argument, NULL, 'p' },
        { "host", required_argument, NULL, 'H' },
        { "backlog-limit", required_argument, NULL, 'l' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int o;
    while ((o = getopt_long(argc, argv, "p:H:l:h", lo, NULL)) != -1) {
        switch (o) {
        case 'p': port = optarg; break;
        case 'H': host = optarg; break;
        case 'l': {
            char *end;
            long long v = strtoll(optarg, &end, 10);
            if (*end || v < 65536) {
                usage(stderr);
                return 2;
            }
            backlog_limit = (size_t)v;
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

    tab = calloc((size_t)max_fds, sizeof *tab);
    live = calloc((size_t)max_fds, sizeof *live);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (!tab || !live || ep < 0 || sfd < 0 || reserve(&round_buf, &round_cap, 1u << 20) < 0) {
        perror("raw_epoll_chat: setup");
        return 1;
    }
    for (int i = 0; i < max_fds; i++)
        tab[i].live_idx = -1;
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

    static struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("raw_epoll_chat: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            unsigned e = evs[i].events;
            if (fd == lfd) {
                do_accept(lfd);
                continue;
            }
            if (fd == sfd)
                goto out;
            if (tab[fd].live_idx < 0)
                continue; /* closed earlier in this round */
            if ((e & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && tab[fd].back_len) {
                if (on_writable(fd) < 0)
                    continue;
            }
            if ((e & (EPOLLIN | EPOLLHUP | EPOLLERR)) && round_len < ROUND_SOFT_CAP)
                on_readable(fd);
        }
        if (round_len)
            broadcast_round();
    }
out:
    for (int i = 0; i < nlive; i++) {
        free(tab[live[i]].carry);
        free(tab[live[i]].back);
    }
    free(tab);
    free(live);
    free(round_buf);
    return 0;
}
