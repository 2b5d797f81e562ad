/* SPDX-License-Identifier: MIT */
/*
 * idle_conns — open N idle TCP (or TLS) connections to a server and hold them.
 *
 *   idle_conns --port P [--host H] --conns N [--hold SEC] [--wave W] [--tls]
 *
 * Connects in waves of W (default 256) non-blocking connects, waiting for each
 * wave to finish, so the server's accept backlog never overflows. Prints
 * "connected N" when all are up, then holds them, sending nothing, until SIGINT,
 * SIGTERM or --hold seconds (default 60) pass, and exits 0. Exit 1 if a
 * connection fails (or the server closes one while held), 2 on bad arguments.
 * Used by bench/run.sh to measure a server's memory per idle connection; one
 * process keeps below 20,000 descriptors, so 10,000 connections take one or two.
 *
 * --tls: each wave also completes its TLS handshakes (OpenSSL, no certificate
 * check) before the next wave starts, and a TLS 1.3 connection counts as up
 * only once the server's first session ticket has arrived: the server sends it
 * after it has processed the client's Finished, so "connected N" means every
 * handshake is done on the server's side too (a TLS 1.3 server with tickets
 * off would never get there). Held connections then read whatever the server
 * sends without a byte of data (more tickets, a KeyUpdate); data, an alert or
 * a close fails the run. Held connections are dropped without close_notify.
 *
 * --ws (with or without --tls): each wave then also makes its WebSocket
 * upgrades (GET /, bench/ws_client.h), and a connection counts as up once the
 * server's 101 has arrived and checked out. Held sessions answer pings with
 * pongs; data, a close or a protocol error fails the run. Needs OpenSSL at
 * build time (SHA-1 for the handshake).
 */
#ifndef _GNU_SOURCE
#  define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifdef IDLE_TLS
#  include <openssl/err.h>
#  include <openssl/ssl.h>
#  define WSC_OPENSSL
#endif
#include "ws_client.h"

static volatile sig_atomic_t stop;
static void on_sig(int s)
{
    (void)s;
    stop = 1;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: idle_conns --port P [--host H] --conns N [--hold SEC] [--wave W] [--tls] [--ws]\n");
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int num(const char *s, long lo, long hi, long *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == 0 || *end || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

/* ------------------------------------------------------------------ TLS */

#ifdef IDLE_TLS
enum { HS, WAIT_TICKET, UP };

static SSL_CTX *tls_ctx;
static SSL **tls_ssl;
static uint8_t *tls_state;

/* A session ticket arrived: the server has finished its handshake. Nothing
 * is kept (returning 0 lets OpenSSL free the session). */
static int on_ticket(SSL *ssl, SSL_SESSION *sess)
{
    (void)sess;
    uint8_t *st = SSL_get_app_data(ssl);
    if (*st == WAIT_TICKET)
        *st = UP;
    return 0;
}

static int tls_init(long conns)
{
    tls_ctx = SSL_CTX_new(TLS_client_method());
    tls_ssl = calloc((size_t)conns, sizeof *tls_ssl);
    tls_state = calloc((size_t)conns, 1);
    if (!tls_ctx || !tls_ssl || !tls_state)
        return -1;
    SSL_CTX_set_min_proto_version(tls_ctx, TLS1_2_VERSION);
    /* the new-session callback runs only with client caching on */
    SSL_CTX_set_session_cache_mode(tls_ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(tls_ctx, on_ticket);
    return 0;
}

static const char *tls_reason(void)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    ERR_clear_error();
    return r ? r : "closed by the server";
}

/* One step of connection i: sets the poll events it waits for; 1 up, 0 not
 * yet, -1 failed. */
static int tls_step(long i, struct pollfd *p)
{
    SSL *ssl = tls_ssl[i];
    int rc = 0;
    if (tls_state[i] == HS) {
        rc = SSL_do_handshake(ssl);
        if (rc == 1) {
            tls_state[i] = SSL_version(ssl) >= TLS1_3_VERSION ? WAIT_TICKET : UP;
            if (tls_state[i] == UP)
                return 1;
        }
    }
    if (tls_state[i] == WAIT_TICKET) {
        unsigned char b[256];
        rc = SSL_read(ssl, b, sizeof b);
        if (rc > 0) {
            fprintf(stderr, "idle_conns: #%ld: the server sent data\n", i);
            return -1;
        }
        if (tls_state[i] == UP) {
            ERR_clear_error();
            return 1;
        }
    }
    int e = SSL_get_error(ssl, rc);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        p->events = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
        return 0;
    }
    fprintf(stderr, "idle_conns: #%ld: TLS handshake: %s\n", i, tls_reason());
    return -1;
}

/* Handshakes of connections base..base+n-1 (already TCP-connected). */
static int tls_wave(struct pollfd *pf, long base, long n, double deadline)
{
    long left = n;
    for (long i = base; i < base + n; i++) {
        SSL *ssl = SSL_new(tls_ctx);
        if (!ssl || SSL_set_fd(ssl, pf[i].fd) != 1)
            return -1;
        SSL_set_connect_state(ssl);
        SSL_set_app_data(ssl, &tls_state[i]);
        tls_ssl[i] = ssl;
        int r = tls_step(i, &pf[i]);
        if (r < 0)
            return -1;
        if (r > 0) {
            pf[i].events = 0;
            left--;
        }
    }
    while (left > 0 && !stop) {
        if (now() > deadline) {
            fprintf(stderr, "idle_conns: %ld TLS handshakes (or their session tickets) still pending\n",
                    left);
            return -1;
        }
        int r = poll(pf + base, (nfds_t)n, 100);
        if (r < 0 && errno != EINTR)
            return -1;
        for (long i = base; r > 0 && i < base + n; i++) {
            if (!pf[i].revents || pf[i].events == 0)
                continue;
            int k = tls_step(i, &pf[i]);
            if (k < 0)
                return -1;
            if (k > 0) {
                pf[i].events = 0;
                left--;
            }
        }
    }
    return 0;
}

/* A held connection became readable: 0 if it was only TLS housekeeping. */
static int tls_held_read(long i)
{
    unsigned char b[256];
    int rc = SSL_read(tls_ssl[i], b, sizeof b);
    if (rc <= 0 && SSL_get_error(tls_ssl[i], rc) == SSL_ERROR_WANT_READ)
        return 0;
    fprintf(stderr, "idle_conns: #%ld: the server %s a held connection\n", i,
            rc > 0 ? "wrote data to" : "closed");
    ERR_clear_error();
    return -1;
}
#else
static int tls_init(long conns)
{
    (void)conns;
    fprintf(stderr, "idle_conns: built without OpenSSL, so --tls is not available\n");
    return -1;
}
static int tls_wave(struct pollfd *pf, long base, long n, double deadline)
{
    (void)pf, (void)base, (void)n, (void)deadline;
    return -1;
}
static int tls_held_read(long i)
{
    (void)i;
    return -1;
}
#endif

/* ------------------------------------------------------------ WebSocket */

#ifdef IDLE_TLS
#  define WS_ANSWER_CAP 1024

static struct wsc_rx *ws_rx; /* --ws: each session's parser of the server's frames */
static bool use_tls;

/* connection i's bytes, through its SSL with --tls; -1 with EAGAIN when
 * there is nothing (OpenSSL's housekeeping included) */
static ssize_t io_read(long i, int fd, void *b, size_t n)
{
    if (!use_tls)
        return read(fd, b, n);
    int rc = SSL_read(tls_ssl[i], b, (int)n);
    if (rc > 0)
        return rc;
    int e = SSL_get_error(tls_ssl[i], rc);
    ERR_clear_error();
    errno = e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE ? EAGAIN
            : e == SSL_ERROR_ZERO_RETURN                          ? 0
                                                                  : EIO;
    return errno ? -1 : 0;
}

/* all of p, or -1: a few hundred bytes always fit in a socket's buffer */
static int io_write_all(long i, int fd, const void *p, size_t n)
{
    ssize_t w = use_tls ? SSL_write(tls_ssl[i], p, (int)n) : write(fd, p, n);
    if (w == (ssize_t)n)
        return 0;
    ERR_clear_error();
    return -1;
}

/* After frames from the server: a ping is answered; 0, or -1 if the
 * frames held data, a close or a protocol error (said). */
static int ws_frames(long i, int fd, unsigned char *b, size_t n)
{
    const char *why = NULL;
    long got = wsc_rx_feed(&ws_rx[i], b, n, &why);
    if (got < 0 || got > 0 || ws_rx[i].closed) {
        fprintf(stderr, "idle_conns: #%ld: %s\n", i,
                got < 0   ? why
                : got > 0 ? "the server sent data on an idle WebSocket session"
                          : "the server closed the WebSocket session");
        return -1;
    }
    if (ws_rx[i].ping) {
        static uint64_t rng = 0x1d1e;
        unsigned char f[6 + 125];
        ws_rx[i].ping = false;
        size_t len = wsc_control(f, WSC_PONG, ws_rx[i].ping_data, ws_rx[i].ping_len, wsc_rand(&rng));
        if (io_write_all(i, fd, f, len) < 0) {
            fprintf(stderr, "idle_conns: #%ld: cannot send a pong\n", i);
            return -1;
        }
    }
    return 0;
}

/* The upgrades of connections base..base+n-1 (their transport is up). */
static int ws_wave(struct pollfd *pf, long base, long n, const char *host, long port, double deadline)
{
    static char *ans;
    static size_t *ans_len;
    static char(*accept)[29];
    static long cap;
    if (cap < n) {
        free(ans), free(ans_len), free(accept);
        ans = malloc((size_t)n * WS_ANSWER_CAP);
        ans_len = malloc((size_t)n * sizeof *ans_len);
        accept = malloc((size_t)n * sizeof *accept);
        if (!ans || !ans_len || !accept)
            return -1;
        cap = n;
    }
    char portstr[24];
    snprintf(portstr, sizeof portstr, "%ld", port);
    for (long k = 0; k < n; k++) {
        char key[25], req[512];
        int len = -1;
        if (wsc_key(key) == 0 && wsc_accept_for(key, accept[k]) == 0)
            len = wsc_request(req, sizeof req, host, portstr, "/", key);
        if (len < 0 || io_write_all(base + k, pf[base + k].fd, req, (size_t)len) < 0) {
            fprintf(stderr, "idle_conns: #%ld: cannot send the WebSocket upgrade\n", base + k);
            return -1;
        }
        ans_len[k] = 0;
        pf[base + k].events = POLLIN;
    }
    long left = n;
    while (left > 0 && !stop) {
        if (now() > deadline) {
            fprintf(stderr, "idle_conns: %ld WebSocket upgrades still unanswered\n", left);
            return -1;
        }
        int r = poll(pf + base, (nfds_t)n, 100);
        if (r < 0 && errno != EINTR)
            return -1;
        for (long k = 0; r > 0 && k < n; k++) {
            long i = base + k;
            if (!pf[i].revents || pf[i].events == 0)
                continue;
            char *a = ans + k * WS_ANSWER_CAP;
            ssize_t got = io_read(i, pf[i].fd, a + ans_len[k], WS_ANSWER_CAP - ans_len[k]);
            if (got < 0 && errno == EAGAIN)
                continue;
            if (got <= 0) {
                fprintf(stderr, "idle_conns: #%ld: the server closed before its 101\n", i);
                return -1;
            }
            ans_len[k] += (size_t)got;
            size_t head = 0;
            char why[200];
            int rc = wsc_answer(a, ans_len[k], accept[k], &head, why, sizeof why);
            if (rc == 0 && ans_len[k] == WS_ANSWER_CAP)
                snprintf(why, sizeof why, "the 101 answer is longer than %d bytes", WS_ANSWER_CAP);
            if (rc < 0 || (rc == 0 && ans_len[k] == WS_ANSWER_CAP)) {
                fprintf(stderr, "idle_conns: #%ld: %s\n", i, why);
                return -1;
            }
            if (rc == 0)
                continue;
            if (ws_frames(i, pf[i].fd, (unsigned char *)a + head, ans_len[k] - head) < 0)
                return -1;
            pf[i].events = 0;
            left--;
        }
    }
    return 0;
}

/* A held session became readable: 0 if it was only a ping (or TLS's
 * housekeeping). */
static int ws_held_read(long i, int fd)
{
    unsigned char b[256];
    ssize_t n = io_read(i, fd, b, sizeof b);
    if (n < 0 && errno == EAGAIN)
        return 0;
    if (n <= 0) {
        fprintf(stderr, "idle_conns: #%ld: the server closed a held session\n", i);
        return -1;
    }
    return ws_frames(i, fd, b, (size_t)n);
}
#else
static int ws_wave(struct pollfd *pf, long base, long n, const char *host, long port, double deadline)
{
    (void)pf, (void)base, (void)n, (void)host, (void)port, (void)deadline;
    return -1;
}
static int ws_held_read(long i, int fd)
{
    (void)i, (void)fd;
    return -1;
}
#endif

/* ---------------------------------------------------------------- plain */

/* Non-blocking connects of base..base+n-1, waited for. */
static int connect_wave(const struct sockaddr_in *sa, struct pollfd *pf, long base, long n, double deadline)
{
    for (long i = base; i < base + n; i++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            perror("idle_conns: socket");
            return -1;
        }
        if (connect(fd, (const struct sockaddr *)sa, sizeof *sa) < 0 && errno != EINPROGRESS) {
            fprintf(stderr, "idle_conns: connect #%ld: %s\n", i, strerror(errno));
            return -1;
        }
        pf[i].fd = fd;
        pf[i].events = POLLOUT;
    }
    long left = n;
    while (left > 0 && !stop) {
        if (now() > deadline) {
            fprintf(stderr, "idle_conns: %ld connects still pending after 10 s\n", left);
            return -1;
        }
        int r = poll(pf + base, (nfds_t)n, 100);
        if (r < 0 && errno != EINTR)
            return -1;
        for (long i = base; r > 0 && i < base + n; i++) {
            if (!pf[i].revents || pf[i].events == 0)
                continue;
            int err = 0;
            socklen_t el = sizeof err;
            getsockopt(pf[i].fd, SOL_SOCKET, SO_ERROR, &err, &el);
            if (err) {
                fprintf(stderr, "idle_conns: connect #%ld: %s\n", i, strerror(err));
                return -1;
            }
            pf[i].events = 0;
            left--;
        }
    }
    return 0;
}

/* Holds every connection until stopped or the end; -1 if the server closed
 * one or sent it data. */
static int hold_all(struct pollfd *pf, long conns, bool tls, bool ws, double end)
{
    for (long i = 0; i < conns; i++)
        pf[i].events = POLLIN; /* an idle server sends nothing: POLLIN means it closed us */
    while (!stop && now() < end) {
        int r = poll(pf, (nfds_t)conns, 200);
        if (r > 0 && !tls && !ws) {
            fprintf(stderr, "idle_conns: the server closed or wrote to a held connection\n");
            return -1;
        }
        for (long i = 0; r > 0 && i < conns; i++)
            if (pf[i].revents && (ws ? ws_held_read(i, pf[i].fd) : tls_held_read(i)) < 0)
                return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1";
    long port = -1, conns = -1, hold = 60, wave = 256;
    bool tls = false, ws = false;
    static const struct option lo[] = {
        { "port", required_argument, NULL, 'p' },
        { "host", required_argument, NULL, 'H' },
        { "conns", required_argument, NULL, 'n' },
        { "hold", required_argument, NULL, 't' },
        { "wave", required_argument, NULL, 'w' },
        { "tls", no_argument, NULL, 'L' },
        { "ws", no_argument, NULL, 'W' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int o;
    while ((o = getopt_long(argc, argv, "p:H:n:t:w:h", lo, NULL)) != -1) {
        int bad = 0;
        switch (o) {
        case 'p': bad = num(optarg, 1, 65535, &port); break;
        case 'H': host = optarg; break;
        case 'n': bad = num(optarg, 1, 19000, &conns); break;
        case 't': bad = num(optarg, 0, 86400, &hold); break;
        case 'w': bad = num(optarg, 1, 4096, &wave); break;
        case 'L': tls = true; break;
        case 'W': ws = true; break;
        case 'h': usage(stdout); return 0;
        default: bad = 1;
        }
        if (bad) {
            usage(stderr);
            return 2;
        }
    }
    if (port < 0 || conns < 0 || optind != argc) {
        usage(stderr);
        return 2;
    }
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "idle_conns: --host must be an IPv4 address\n");
        return 2;
    }
    if (tls && tls_init(conns) < 0)
        return 2;
#ifdef IDLE_TLS
    use_tls = tls;
    if (ws && !(ws_rx = calloc((size_t)conns, sizeof *ws_rx))) {
        perror("idle_conns");
        return 1;
    }
#else
    if (ws) {
        fprintf(stderr, "idle_conns: built without OpenSSL, so --ws is not available\n");
        return 2;
    }
#endif
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
        if (rl.rlim_cur != RLIM_INFINITY && (long)rl.rlim_cur < conns + 16) {
            fprintf(stderr, "idle_conns: file limit %ld too small for %ld connections\n", (long)rl.rlim_cur,
                    conns);
            return 2;
        }
    }
    struct sigaction sact;
    memset(&sact, 0, sizeof sact);
    sact.sa_handler = on_sig;
    sigaction(SIGINT, &sact, NULL);
    sigaction(SIGTERM, &sact, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct pollfd *pf = calloc((size_t)conns, sizeof *pf);
    if (!pf)
        return 1;
    double t0 = now();
    for (long base = 0; base < conns && !stop; base += wave) {
        long n = conns - base < wave ? conns - base : wave;
        if (connect_wave(&sa, pf, base, n, now() + 10) < 0)
            return 1;
        if (tls && !stop && tls_wave(pf, base, n, now() + 10) < 0)
            return 1;
        if (ws && !stop && ws_wave(pf, base, n, host, port, now() + 10) < 0)
            return 1;
    }
    if (stop)
        return 0;
    printf("connected %ld%s in %.2f s\n", conns,
           tls && ws ? " (TLS, WebSocket)"
           : tls     ? " (TLS)"
           : ws      ? " (WebSocket)"
                     : "",
           now() - t0);
    fflush(stdout);
    return hold_all(pf, conns, tls, ws, now() + (double)hold) < 0 ? 1 : 0;
}
