/* SPDX-License-Identifier: MIT */
/*
 * tls_epoll_echo — the TLS echo baseline: one thread, epoll and OpenSSL,
 * written the straightforward way.
 *
 * The socket is OpenSSL's (SSL_set_fd). Accepted sockets are non-blocking;
 * SSL_accept runs on their events until the handshake is done. Then each
 * readable event SSL_reads what is there, record by record, and echoes every
 * piece it read with its own SSL_write (so one record, and one write(), per
 * message). When a write cannot finish (WANT_WRITE), the rest goes to a pending
 * buffer, reading stops (back-pressure) and the connection waits for EPOLLOUT,
 * as in raw_epoll_echo. Partial writes and a moving write buffer are allowed
 * (SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER), so the
 * pending copy can be retried from anywhere. Everything else is OpenSSL's
 * default (no read-ahead unless --read-ahead, session tickets on).
 *
 *   tls_epoll_echo --port P [--host H] --cert FILE --key FILE [--read-ahead]
 *
 * Prints "listening on H:P" once ready; exits 0 on SIGINT/SIGTERM; usage and
 * exit 2 on bad arguments.
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
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#define MAX_EVENTS 512
#define BUF_SIZE 16384 /* one TLS record's plaintext at most */

struct conn {
    SSL *ssl;       /* NULL: the slot is free */
    bool ready;     /* handshake done */
    bool out_armed; /* EPOLLOUT in the interest set */
    char *pend;     /* unwritten rest of an echo, NULL when none */
    size_t plen, poff;
};

static struct conn *conns; /* indexed by fd */
static int max_fds;
static int ep;
static int reserve_fd = -1;
static SSL_CTX *ctx;

static void usage(FILE *f)
{
    fprintf(f, "usage: tls_epoll_echo --port P [--host H] --cert FILE --key FILE [--read-ahead]\n"
               "  one-thread epoll + OpenSSL echo server, one SSL_write per message read (baseline)\n"
               "  --host H       address to bind (default 0.0.0.0)\n"
               "  --cert FILE    certificate chain (PEM)\n"
               "  --key FILE     private key (PEM)\n"
               "  --read-ahead   let OpenSSL read whatever the socket has (default: OpenSSL's\n"
               "                 default, a record header and then its body)\n");
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

static SSL_CTX *make_ctx(const char *cert, const char *key, bool read_ahead)
{
    SSL_CTX *c = SSL_CTX_new(TLS_server_method());
    if (!c)
        return NULL;
    SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION);
    SSL_CTX_set_mode(c, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (read_ahead)
        SSL_CTX_set_read_ahead(c, 1);
    const char *bad = access(cert, R_OK) < 0 ? cert : access(key, R_OK) < 0 ? key : NULL;
    if (bad) {
        fprintf(stderr, "tls_epoll_echo: %s: %s\n", bad, strerror(errno));
    } else if (SSL_CTX_use_certificate_chain_file(c, cert) != 1 ||
               SSL_CTX_use_PrivateKey_file(c, key, SSL_FILETYPE_PEM) != 1 ||
               SSL_CTX_check_private_key(c) != 1) {
        fprintf(stderr, "tls_epoll_echo: %s / %s: %s\n", cert, key,
                ERR_reason_error_string(ERR_peek_last_error()));
    } else {
        return c;
    }
    SSL_CTX_free(c);
    return NULL;
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
        fprintf(stderr, "tls_epoll_echo: %s:%s: %s\n", host, port, gai_strerror(rc));
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
        fprintf(stderr, "tls_epoll_echo: bind/listen %s:%s: %s\n", host, port, strerror(errno));
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

/* After a clean close_notify from the client, answer with ours; after an
 * error, just drop it. The error queue is emptied so that one connection's
 * failure never shows up in another's SSL_get_error. */
static void close_conn(int fd, bool clean)
{
    struct conn *c = &conns[fd];
    if (clean)
        SSL_shutdown(c->ssl);
    ERR_clear_error();
    SSL_free(c->ssl);
    free(c->pend);
    memset(c, 0, sizeof *c);
    close(fd); /* also removes it from the epoll set */
}

static void set_out(int fd, bool out)
{
    struct conn *c = &conns[fd];
    if (c->out_armed == out)
        return;
    struct epoll_event ev = { .events = out ? EPOLLOUT : EPOLLIN, .data.fd = fd };
    if (epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev) < 0) {
        close_conn(fd, false);
        return;
    }
    c->out_armed = out;
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
        SSL *ssl = SSL_new(ctx);
        if (!ssl || SSL_set_fd(ssl, fd) != 1) {
            SSL_free(ssl);
            ERR_clear_error();
            close(fd);
            continue;
        }
        SSL_set_accept_state(ssl);
        conns[fd].ssl = ssl;
        struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
            close_conn(fd, false);
    }
}

/* What to do after an SSL call returned n <= 0: 0 wait (for EPOLLOUT if
 * *out), -1 the connection is gone. */
static int ssl_wait(int fd, int n, bool *out)
{
    int e = SSL_get_error(conns[fd].ssl, n);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        *out = e == SSL_ERROR_WANT_WRITE;
        return 0;
    }
    close_conn(fd, e == SSL_ERROR_ZERO_RETURN);
    return -1;
}

/* SSL_write p[0..len) until it is all written or the socket is full: the
 * bytes written, or -1 if the connection is gone. A record cut short stays in
 * OpenSSL and is not counted; the retry starts with its bytes again. */
static ssize_t write_some(int fd, const char *p, size_t len)
{
    size_t off = 0;
    while (off < len) {
        int n = SSL_write(conns[fd].ssl, p + off, (int)(len - off));
        if (n <= 0) {
            bool out = false;
            return ssl_wait(fd, n, &out) < 0 ? -1 : (ssize_t)off;
        }
        off += (size_t)n;
    }
    return (ssize_t)off;
}

/* The socket is full: keep the rest, stop reading until it is written. (A
 * write that waits for the peer's bytes, a renegotiation, does not happen:
 * TLS 1.3 has none and the clients here start none.) */
static void keep_pending(int fd, const char *p, size_t len)
{
    struct conn *c = &conns[fd];
    c->pend = malloc(len);
    if (!c->pend) {
        close_conn(fd, false);
        return;
    }
    memcpy(c->pend, p, len);
    c->plen = len;
    c->poff = 0;
    set_out(fd, true);
}

/* Everything the socket has: one SSL_read per record, one SSL_write per read. */
static void on_readable(int fd, char *buf)
{
    for (;;) {
        int n = SSL_read(conns[fd].ssl, buf, BUF_SIZE);
        if (n <= 0) {
            bool out = false;
            if (ssl_wait(fd, n, &out) == 0)
                set_out(fd, out);
            return;
        }
        ssize_t w = write_some(fd, buf, (size_t)n);
        if (w < 0)
            return;
        if (w < n) {
            keep_pending(fd, buf + w, (size_t)(n - w));
            return;
        }
    }
}

/* EPOLLOUT (or an error the write reports) while an echo is pending. */
static void flush_pending(int fd, char *buf)
{
    struct conn *c = &conns[fd];
    ssize_t w = write_some(fd, c->pend + c->poff, c->plen - c->poff);
    if (w < 0)
        return;
    c->poff += (size_t)w;
    if (c->poff < c->plen)
        return;
    free(c->pend);
    c->pend = NULL;
    c->plen = c->poff = 0;
    set_out(fd, false);
    /* with --read-ahead, records may wait in OpenSSL rather than in the socket */
    if (c->ssl)
        on_readable(fd, buf);
}

static void on_conn_event(int fd, char *buf)
{
    struct conn *c = &conns[fd];
    if (!c->ready) {
        int n = SSL_accept(c->ssl);
        if (n <= 0) {
            bool out = false;
            if (ssl_wait(fd, n, &out) == 0)
                set_out(fd, out);
            return;
        }
        c->ready = true;
        set_out(fd, false);
        /* the client's first data may have come with its Finished */
        on_readable(fd, buf);
    } else if (c->pend) {
        flush_pending(fd, buf);
    } else {
        on_readable(fd, buf);
    }
}

int main(int argc, char **argv)
{
    const char *host = "0.0.0.0";
    const char *port = NULL, *cert = NULL, *key = NULL;
    bool read_ahead = false;
    static const struct option lo[] = {
        { "port", required_argument, NULL, 'p' },
        { "host", required_argument, NULL, 'H' },
        { "cert", required_argument, NULL, 'c' },
        { "key", required_argument, NULL, 'k' },
        { "read-ahead", no_argument, NULL, 'r' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int o;
    while ((o = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (o) {
        case 'p': port = optarg; break;
        case 'H': host = optarg; break;
        case 'c': cert = optarg; break;
        case 'k': key = optarg; break;
        case 'r': read_ahead = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!port || !cert || !key || optind != argc) {
        usage(stderr);
        return 2;
    }
    {
        char *end;
        long pn = strtol(port, &end, 10);
        if (!*port || *end || pn < 0 || pn > 65535) {
            usage(stderr);
            return 2;
        }
    }

    ctx = make_ctx(cert, key, read_ahead);
    if (!ctx)
        return 1;
    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);

    conns = calloc((size_t)max_fds, sizeof *conns);
    char *buf = malloc(BUF_SIZE);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (!conns || !buf || ep < 0 || sfd < 0) {
        perror("tls_epoll_echo: setup");
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

    printf("listening on %s (%s)\n", desc, OpenSSL_version(OPENSSL_VERSION));
    fflush(stdout);

    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("tls_epoll_echo: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd)
                do_accept(lfd);
            else if (fd == sfd)
                goto out;
            else if (conns[fd].ssl)
                on_conn_event(fd, buf);
        }
    }
out:
    for (int fd = 0; fd < max_fds; fd++)
        if (conns[fd].ssl)
            close_conn(fd, false);
    free(conns);
    free(buf);
    SSL_CTX_free(ctx);
    return 0;
}
