/* SPDX-License-Identifier: MIT */
/*
 * cport-soak: a chaos soak of a cport packet-echo server, in one process.
 *
 * The program starts a cport server on 127.0.0.1 (CP_FRAMING_PACKET, echo of
 * every packet, max_packet 4096, send queue limit 256 KiB, 2 s partial-packet
 * timeout) and N client threads with plain sockets. Until the duration is
 * over, each client thread connects again and again and, each time, picks a
 * behaviour at random:
 *
 *   echo       well-behaved: bursts of whole packets; every byte must come
 *              back, in order (a missing, wrong or late byte is a failure);
 *              then it closes, or half-closes and expects the server's EOF
 *   partial    whole packets, then part of a packet (header or body), then
 *              waits for the server's packet timeout or closes / resets
 *   garbage    random bytes, then waits for the server to close (or closes)
 *   halfclose  packets, then shutdown(SHUT_WR) at once; what comes back must
 *              be a prefix of the echo
 *   reset      packets, then close with SO_LINGER 0 at a random moment
 *   noread     a small receive buffer, sends echo packets and never reads:
 *              the server must cut it off (send queue overflow)
 *   churn      connect and close at once
 *
 * At the end it waits for the server to have no session, reads the stats,
 * stops the service and destroys the port, and checks: on_connected ==
 * on_disconnected (callbacks and stats), no session left, no callback after
 * on_disconnected (its record is freed there: a late callback is a
 * use-after-free that AddressSanitizer reports), every echo client got every
 * byte. Built with -DCP_SANITIZE=ON, LeakSanitizer checks at exit. Exits 0
 * only if everything held.
 *
 *   cport-soak [--duration S] [--clients N] [--backend auto|epoll|uring]
 *              [--workers N] [--seed X] [--only KIND]
 */
#include <cport.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_PACKET 4096
#define IO_TIMEOUT_MS 5000

enum { K_ECHO, K_PARTIAL, K_GARBAGE, K_HALFCLOSE, K_RESET, K_NOREAD, K_CHURN, K_COUNT };
static const char *const kind_name[K_COUNT] = { "echo",  "partial", "garbage", "halfclose",
                                                "reset", "noread",  "churn" };
/* Out of 100 (--only KIND puts all the weight on one). */
static int kind_weight[K_COUNT] = { 45, 10, 10, 10, 10, 8, 7 };

/* ------------------------------------------------------------------ server side */

typedef struct srec {
    uint32_t magic;
    atomic_int inside;
    uint16_t peer_port;
    atomic_llong packets, sent;
    struct srec *prev, *next; /* the live list, for a report of stuck sessions */
} srec;

static pthread_mutex_t live_mu = PTHREAD_MUTEX_INITIALIZER;
static srec live_head = { .prev = &live_head, .next = &live_head };
/* The behaviour each client local port was last used for. */
static _Atomic unsigned char port_kind[65536];
#define SREC_MAGIC 0x50a4c0deu

static struct {
    atomic_llong connected, disconnected, packets, bytes;
    atomic_llong reasons[CP_REASON_COUNT_];
    atomic_llong violations;
} srv;

static void violation(const char *what)
{
    atomic_fetch_add(&srv.violations, 1);
    fprintf(stderr, "cport-soak: VIOLATION: %s\n", what);
}

static srec *enter(cp_session *s)
{
    srec *r = cp_session_data(s);
    if (!r || r->magic != SREC_MAGIC) {
        violation("callback of a session without a live record (after on_disconnected?)");
        return NULL;
    }
    if (atomic_fetch_add(&r->inside, 1) != 0)
        violation("callbacks of one session overlap");
    return r;
}

static void leave(srec *r)
{
    if (r)
        atomic_fetch_sub(&r->inside, 1);
}

static void s_connected(cp_session *s)
{
    srec *r = calloc(1, sizeof *r);
    if (!r)
        abort();
    r->magic = SREC_MAGIC;
    char peer[64];
    if (cp_session_peer(s, peer, sizeof peer) > 0 && strrchr(peer, ':'))
        r->peer_port = (uint16_t)atoi(strrchr(peer, ':') + 1);
    pthread_mutex_lock(&live_mu);
    r->next = &live_head;
    r->prev = live_head.prev;
    live_head.prev->next = r;
    live_head.prev = r;
    pthread_mutex_unlock(&live_mu);
    cp_session_set_data(s, r);
    atomic_fetch_add(&srv.connected, 1);
}

static int s_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    srec *r = enter(s);
    cp_sendbuf *b = cp_packet_make(id, body, len);
    if (b) {
        cp_session_send(s, b);
        cp_sendbuf_unref(b);
    }
    atomic_fetch_add(&srv.packets, 1);
    if (r)
        atomic_fetch_add(&r->packets, 1);
    atomic_fetch_add(&srv.bytes, (long long)len + 4);
    leave(r);
    return 0;
}

static void s_sent(cp_session *s, size_t n)
{
    srec *r = enter(s);
    if (r)
        atomic_fetch_add(&r->sent, (long long)n);
    leave(r);
}

static void s_disconnected(cp_session *s, cp_reason reason, int err)
{
    srec *r = enter(s);
    if (reason > CP_REASON_NONE && reason < CP_REASON_COUNT_)
        atomic_fetch_add(&srv.reasons[reason], 1);
    else
        violation("on_disconnected with a reason out of range");
    if (cp_session_send_copy(s, "x", 1) != -ENOTCONN)
        violation("send inside on_disconnected did not return -ENOTCONN");
    leave(r);
    if (r) {
        pthread_mutex_lock(&live_mu);
        r->prev->next = r->next;
        r->next->prev = r->prev;
        pthread_mutex_unlock(&live_mu);
        r->magic = 0;
        free(r);
    }
    cp_session_set_data(s, NULL);
    atomic_fetch_add(&srv.disconnected, 1);
}

/* ------------------------------------------------------------------ clients */

static uint16_t g_port;
static uint64_t g_deadline_ms;
static uint64_t g_seed = 1;
static _Thread_local int cur_kind;

static struct {
    atomic_llong connects, connect_errors;
    atomic_llong kinds[K_COUNT];
    atomic_llong bytes_sent, bytes_echoed; /* all clients */
    atomic_llong echo_owed, echo_got;      /* well-behaved clients */
    atomic_llong echo_failures;
    atomic_llong partial_cut_by_timeout, garbage_closed_by_server, noread_cut_off;
    atomic_llong halfclose_prefix_ok, halfclose_eof;
    atomic_llong halfclose_bad;
} cl;

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t rnd(uint64_t *st)
{
    /* splitmix64 */
    uint64_t z = (*st += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static unsigned urand(uint64_t *st, unsigned n) { return n ? (unsigned)(rnd(st) % n) : 0; }

static void set_timeouts(int fd, unsigned ms)
{
    struct timeval tv = { .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static int connect_server(int rcvbuf)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (rcvbuf > 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    set_timeouts(fd, IO_TIMEOUT_MS);
    struct sockaddr_in a = { .sin_family = AF_INET,
                             .sin_port = htons(g_port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        int e = errno;
        close(fd);
        atomic_fetch_add(&cl.connect_errors, 1);
        return -e;
    }
    atomic_fetch_add(&cl.connects, 1);
    struct sockaddr_in l;
    socklen_t ll = sizeof l;
    if (getsockname(fd, (struct sockaddr *)&l, &ll) == 0)
        /* NOLINTNEXTLINE(clang-analyzer-core.CallAndMessage): getsockname returned 0, so it filled l */
        atomic_store(&port_kind[ntohs(l.sin_port)], (unsigned char)cur_kind);
    return fd;
}

static void close_reset(int fd)
{
    struct linger lg = { .l_onoff = 1, .l_linger = 0 };
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

static int send_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        atomic_fetch_add(&cl.bytes_sent, w);
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Receives exactly n bytes: 0, 1 at EOF, or -errno. */
static int recv_exact(int fd, uint8_t *p, size_t n)
{
    while (n) {
        ssize_t r = recv(fd, p, n, 0);
        if (r == 0)
            return 1;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        atomic_fetch_add(&cl.bytes_echoed, r);
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

/* Reads until EOF/reset (returns 0) or timeout (-ETIMEDOUT). Received bytes
 * go to buf (up to cap) and *got. */
static int read_until_closed(int fd, unsigned ms, uint8_t *buf, size_t cap, size_t *got)
{
    uint64_t until = now_ms() + ms;
    size_t g = 0;
    uint8_t tmp[16384];
    for (;;) {
        int left = (int)(until - now_ms());
        if ((int64_t)(until - now_ms()) <= 0)
            break;
        struct pollfd pf = { .fd = fd, .events = POLLIN };
        int pr = poll(&pf, 1, left);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr <= 0)
            break;
        ssize_t r = recv(fd, tmp, sizeof tmp, MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
            if (got)
                *got = g;
            return 0;
        }
        if (r > 0) {
            atomic_fetch_add(&cl.bytes_echoed, r);
            if (buf && g < cap)
                memcpy(buf + g, tmp, (size_t)r < cap - g ? (size_t)r : cap - g);
            g += (size_t)r;
        }
    }
    if (got)
        *got = g;
    return -ETIMEDOUT;
}

/* Builds one packet {size, id} + pattern body at p; returns its size. */
static size_t make_packet(uint8_t *p, uint64_t *st, size_t max_body)
{
    size_t body = urand(st, 4) == 0 ? 0 : urand(st, (unsigned)max_body + 1);
    uint16_t size = (uint16_t)(body + 4);
    uint16_t id = (uint16_t)rnd(st);
    p[0] = (uint8_t)size;
    p[1] = (uint8_t)(size >> 8);
    p[2] = (uint8_t)id;
    p[3] = (uint8_t)(id >> 8);
    for (size_t i = 0; i < body; i++)
        p[4 + i] = (uint8_t)rnd(st);
    return size;
}

static void echo_fail(const char *what, int rc)
{
    atomic_fetch_add(&cl.echo_failures, 1);
    /* Client threads call this: strerror may share one buffer among threads,
     * strerror_r (GNU's, under _GNU_SOURCE) does not. */
    char buf[128];
    fprintf(stderr, "cport-soak: ECHO FAILURE: %s (%d: %s)\n", what, rc,
            rc < 0 ? strerror_r(-rc, buf, sizeof buf) : "eof");
}

static void run_echo(uint64_t *st, uint8_t *out, uint8_t *in)
{
    int fd = connect_server(0);
    if (fd < 0)
        return;
    int rounds = 1 + (int)urand(st, 40);
    bool failed = false;
    for (int r = 0; r < rounds && !failed && now_ms() < g_deadline_ms; r++) {
        int burst = 1 + (int)urand(st, 8);
        size_t n = 0;
        for (int i = 0; i < burst; i++)
            n += make_packet(out + n, st, urand(st, 8) == 0 ? MAX_PACKET - 4 : 256);
        /* Send in one, or in random pieces. */
        size_t off = 0;
        int rc = 0;
        while (off < n && rc == 0) {
            size_t piece = urand(st, 3) == 0 ? 1 + urand(st, (unsigned)(n - off)) : n - off;
            rc = send_all(fd, out + off, piece);
            off += piece;
        }
        atomic_fetch_add(&cl.echo_owed, (long long)n);
        if (rc == 0)
            rc = recv_exact(fd, in, n);
        if (rc != 0) {
            echo_fail("the echo did not come back", rc);
            failed = true;
        } else if (memcmp(in, out, n) != 0) {
            echo_fail("the echo differs from what was sent", 0);
            failed = true;
        } else {
            atomic_fetch_add(&cl.echo_got, (long long)n);
        }
    }
    if (!failed && urand(st, 2) == 0) {
        /* Half-close and expect the server to close too. */
        shutdown(fd, SHUT_WR);
        size_t extra = 0;
        if (read_until_closed(fd, IO_TIMEOUT_MS, NULL, 0, &extra) != 0 || extra != 0)
            echo_fail("no clean EOF after a half-close", -ETIMEDOUT);
    }
    close(fd);
}

static void run_partial(uint64_t *st, uint8_t *out)
{
    int fd = connect_server(0);
    if (fd < 0)
        return;
    size_t n = 0;
    int whole = (int)urand(st, 3);
    for (int i = 0; i < whole; i++)
        n += make_packet(out + n, st, 200);
    size_t last = make_packet(out + n, st, 600);
    size_t cut = last < 5 ? 1 + urand(st, 3) : 1 + urand(st, (unsigned)last - 1); /* 1..last-1 bytes */
    if (cut >= last)
        cut = last - 1;
    if (cut == 0)
        cut = 1;
    send_all(fd, out, n + cut);
    switch (urand(st, 3)) {
    case 0: { /* wait for the packet timeout (2 s) */
        if (read_until_closed(fd, 4000, NULL, 0, NULL) == 0)
            atomic_fetch_add(&cl.partial_cut_by_timeout, 1);
        close(fd);
        break;
    }
    case 1: close(fd); break;
    default: close_reset(fd); break;
    }
}

static void run_garbage(uint64_t *st, uint8_t *out)
{
    int fd = connect_server(0);
    if (fd < 0)
        return;
    size_t n = 1 + urand(st, 4096);
    for (size_t i = 0; i < n; i++)
        out[i] = (uint8_t)rnd(st);
    if (urand(st, 2))
        out[0] = out[1] = 0; /* make sure: a bad header first */
    send_all(fd, out, n);
    if (urand(st, 2)) {
        if (read_until_closed(fd, 3000, NULL, 0, NULL) == 0)
            atomic_fetch_add(&cl.garbage_closed_by_server, 1);
        close(fd);
    } else {
        close_reset(fd);
    }
}

static void run_halfclose(uint64_t *st, uint8_t *out, uint8_t *in, size_t cap)
{
    int fd = connect_server(0);
    if (fd < 0)
        return;
    size_t n = 0;
    int k = 1 + (int)urand(st, 6);
    for (int i = 0; i < k; i++)
        n += make_packet(out + n, st, 512);
    send_all(fd, out, n);
    shutdown(fd, SHUT_WR);
    size_t got = 0;
    if (read_until_closed(fd, IO_TIMEOUT_MS, in, cap, &got) == 0)
        atomic_fetch_add(&cl.halfclose_eof, 1);
    if (got <= n && memcmp(in, out, got) == 0) {
        atomic_fetch_add(&cl.halfclose_prefix_ok, 1);
    } else {
        atomic_fetch_add(&cl.halfclose_bad, 1);
        fprintf(stderr, "cport-soak: FAILURE: a half-closed client got bytes that are not its echo\n");
    }
    close(fd);
}

static void run_reset(uint64_t *st, uint8_t *out)
{
    int fd = connect_server(0);
    if (fd < 0)
        return;
    size_t n = 0;
    int k = (int)urand(st, 8);
    for (int i = 0; i < k; i++)
        n += make_packet(out + n, st, 1024);
    if (n)
        send_all(fd, out, urand(st, 2) ? n : urand(st, (unsigned)n) + 1);
    if (urand(st, 2))
        usleep(urand(st, 3000));
    close_reset(fd);
}

static void run_noread(uint64_t *st, uint8_t *out)
{
    int fd = connect_server(4096);
    if (fd < 0)
        return;
    set_timeouts(fd, 200);
    size_t n = 0;
    for (int i = 0; i < 8; i++)
        n += make_packet(out + n, st, MAX_PACKET - 4);
    uint64_t until = now_ms() + 1000 + urand(st, 2000);
    bool cut = false;
    while (now_ms() < until) {
        ssize_t w = send(fd, out, n, MSG_NOSIGNAL);
        if (w < 0 && errno != EAGAIN && errno != EINTR) {
            cut = true; /* EPIPE / ECONNRESET: the server closed us */
            break;
        }
        if (w > 0)
            atomic_fetch_add(&cl.bytes_sent, w);
        if (w >= 0 && (size_t)w < n)
            break; /* the stream is no longer packet-aligned: stop sending */
    }
    if (!cut) {
        /* Our send buffer is full or we stopped: has the server closed? */
        struct pollfd pf = { .fd = fd, .events = POLLIN };
        uint64_t wait_until = now_ms() + 3000;
        while (!cut && now_ms() < wait_until) {
            /* Not reading the echo: only look for the close (RDHUP/ERR). */
            pf.events = POLLRDHUP;
            if (poll(&pf, 1, 100) > 0 && (pf.revents & (POLLRDHUP | POLLERR | POLLHUP)))
                cut = true;
        }
    }
    if (cut)
        atomic_fetch_add(&cl.noread_cut_off, 1);
    close_reset(fd);
}

static void *client_main(void *arg)
{
    uint64_t st = g_seed * 1000003u + (uint64_t)(uintptr_t)arg;
    size_t cap = 8 * (MAX_PACKET + 4) + 16;
    uint8_t *out = malloc(cap), *in = malloc(cap);
    if (!out || !in)
        abort();
    while (now_ms() < g_deadline_ms) {
        unsigned w = urand(&st, 100), acc = 0;
        int k = 0;
        for (k = 0; k < K_COUNT - 1; k++) {
            acc += (unsigned)kind_weight[k];
            if (w < acc)
                break;
        }
        atomic_fetch_add(&cl.kinds[k], 1);
        cur_kind = k;
        switch (k) {
        case K_ECHO: run_echo(&st, out, in); break;
        case K_PARTIAL: run_partial(&st, out); break;
        case K_GARBAGE: run_garbage(&st, out); break;
        case K_HALFCLOSE: run_halfclose(&st, out, in, cap); break;
        case K_RESET: run_reset(&st, out); break;
        case K_NOREAD: run_noread(&st, out); break;
        default: {
            int fd = connect_server(0);
            if (fd >= 0)
                close(fd);
        }
        }
    }
    free(out);
    free(in);
    return NULL;
}

/* ------------------------------------------------------------------ main */

static void usage(void)
{
    fprintf(stderr, "usage: cport-soak [--duration S] [--clients N] [--backend auto|epoll|uring] "
                    "[--workers N] [--seed X]\n"
                    "                  [--only echo|partial|garbage|halfclose|reset|noread|churn]\n");
    /* NOLINTNEXTLINE(concurrency-mt-unsafe): option parsing, before any other thread starts */
    exit(2);
}

int main(int argc, char **argv)
{
    unsigned duration = 60, nclients = 200;
    int workers = 0;
    cp_backend backend = CP_BACKEND_AUTO;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            usage();
        if (!strcmp(a, "--duration"))
            duration = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--clients"))
            nclients = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--workers"))
            workers = atoi(v);
        else if (!strcmp(a, "--only")) {
            int k = 0;
            while (k < K_COUNT && strcmp(v, kind_name[k]) != 0)
                k++;
            if (k == K_COUNT)
                usage();
            for (int j = 0; j < K_COUNT; j++)
                kind_weight[j] = j == k ? 100 : 0;
        } else if (!strcmp(a, "--seed"))
            g_seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--backend")) {
            if (!strcmp(v, "epoll"))
                backend = CP_BACKEND_EPOLL;
            else if (!strcmp(v, "uring"))
                backend = CP_BACKEND_URING;
            else if (!strcmp(v, "auto"))
                backend = CP_BACKEND_AUTO;
            else
                usage();
        } else
            usage();
        i++;
    }
    if (nclients < 1 || nclients > 5000 || duration < 1)
        usage();
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < 2 * nclients + 256) {
        rl.rlim_cur = rl.rlim_max < 2 * nclients + 256 ? rl.rlim_max : 2 * nclients + 256;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    cp_port *port;
    cp_port_opts po = { .workers = workers, .backend = backend };
    int rc = cp_port_create(&port, &po);
    if (rc != 0) {
        fprintf(stderr, "cport-soak: cp_port_create: %s\n", cp_strerror(rc));
        return 1;
    }
    cp_handlers h = { .on_connected = s_connected,
                      .on_packet = s_packet,
                      .on_sent = s_sent,
                      .on_disconnected = s_disconnected };
    cp_server_opts so = { .host = "127.0.0.1", .port = 0, .max_sessions = 2 * nclients + 100 };
    so.session.framing = CP_FRAMING_PACKET;
    so.session.max_packet = MAX_PACKET;
    so.session.send_queue_limit = 256 * 1024;
    so.session.packet_timeout_ms = 2000;
    cp_service *svc;
    rc = cp_server_start(&svc, port, &so, &h, NULL);
    if (rc != 0) {
        fprintf(stderr, "cport-soak: cp_server_start: %s\n", cp_strerror(rc));
        cp_port_destroy(port);
        return 1;
    }
    g_port = cp_service_listen_port(svc);
    printf("cport-soak: backend %s, %d workers, port %u, %u clients, %u s, seed %llu\n",
           cp_port_backend_name(port), cp_port_workers(port), g_port, nclients, duration,
           (unsigned long long)g_seed);
    fflush(stdout);

    uint64_t t0 = now_ms();
    g_deadline_ms = t0 + (uint64_t)duration * 1000u;
    pthread_t *th = calloc(nclients, sizeof *th);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    unsigned started = 0;
    for (unsigned i = 0; i < nclients; i++) {
        if (pthread_create(&th[i], &attr, client_main, (void *)(uintptr_t)(i + 1)) != 0)
            break;
        started++;
    }
    pthread_attr_destroy(&attr);
    if (started < nclients)
        fprintf(stderr, "cport-soak: only %u client threads started\n", started);
    while (now_ms() < g_deadline_ms) {
        /* NOLINTNEXTLINE(concurrency-mt-unsafe): its MT-unsafe mark is for SIGCHLD, which this program does not use */
        sleep(1);
        uint64_t s = (now_ms() - t0) / 1000;
        if (s % 10 == 0) {
            cp_service_stats st;
            cp_service_stats_get(svc, &st);
            printf("  %3llus: sessions %llu connected %llu disconnected %llu packets %llu echo ok %lld B\n",
                   (unsigned long long)s, (unsigned long long)st.sessions, (unsigned long long)st.connected,
                   (unsigned long long)st.disconnected, (unsigned long long)st.packets_in,
                   (long long)atomic_load(&cl.echo_got));
            fflush(stdout);
        }
    }
    for (unsigned i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    free(th);
    uint64_t t1 = now_ms();

    /* Every client socket is closed: the server must drain to zero sessions. */
    cp_service_stats st;
    uint64_t settle = now_ms() + 15000;
    for (;;) {
        cp_service_stats_get(svc, &st);
        if (st.sessions == 0 && st.connected == st.disconnected &&
            (long long)st.connected == atomic_load(&srv.connected) &&
            (long long)st.disconnected == atomic_load(&srv.disconnected))
            break;
        if (now_ms() > settle)
            break;
        usleep(10000);
    }
    if (st.sessions != 0) {
        printf("  STUCK: %llu sessions still live %.1f s after every client closed:\n",
               (unsigned long long)st.sessions, 15.0);
        pthread_mutex_lock(&live_mu);
        int shown = 0;
        for (srec *r = live_head.next; r != &live_head && shown < 40; r = r->next, shown++)
            printf("    peer port %u (client behaviour %s): %lld packets in, %lld bytes sent\n", r->peer_port,
                   kind_name[atomic_load(&port_kind[r->peer_port]) % K_COUNT], (long long)r->packets,
                   (long long)r->sent);
        pthread_mutex_unlock(&live_mu);
    }
    rc = cp_service_stop(svc);
    int prc = cp_port_destroy(port);

    long long con = atomic_load(&srv.connected), dis = atomic_load(&srv.disconnected);
    printf("cport-soak: %.1f s of chaos, backend %s\n", (double)(t1 - t0) / 1000.0,
           backend == CP_BACKEND_EPOLL   ? "epoll"
           : backend == CP_BACKEND_URING ? "uring"
                                         : "auto");
    printf("  clients: %lld connects (%lld connect errors), %lld bytes sent, %lld bytes received\n",
           (long long)cl.connects, (long long)cl.connect_errors, (long long)cl.bytes_sent,
           (long long)cl.bytes_echoed);
    printf("  behaviours:");
    for (int k = 0; k < K_COUNT; k++)
        printf(" %s %lld", kind_name[k], (long long)cl.kinds[k]);
    printf("\n");
    printf("  faults seen through: partial cut by packet timeout %lld, garbage closed by server %lld, "
           "noread cut off %lld, halfclose EOF %lld (prefix ok %lld, bad %lld)\n",
           (long long)cl.partial_cut_by_timeout, (long long)cl.garbage_closed_by_server,
           (long long)cl.noread_cut_off, (long long)cl.halfclose_eof, (long long)cl.halfclose_prefix_ok,
           (long long)cl.halfclose_bad);
    printf("  echo (well-behaved): %lld bytes owed, %lld bytes verified, %lld failures\n",
           (long long)cl.echo_owed, (long long)cl.echo_got, (long long)cl.echo_failures);
    printf("  server: on_connected %lld on_disconnected %lld; stats connected %llu disconnected %llu "
           "sessions %llu rejected %llu accept_errors %llu; packets %lld bytes in %llu out %llu\n",
           con, dis, (unsigned long long)st.connected, (unsigned long long)st.disconnected,
           (unsigned long long)st.sessions, (unsigned long long)st.rejected,
           (unsigned long long)st.accept_errors, (long long)srv.packets, (unsigned long long)st.bytes_in,
           (unsigned long long)st.bytes_out);
    printf("  reasons:");
    for (int r = 1; r < CP_REASON_COUNT_; r++)
        if (srv.reasons[r])
            printf(" %s %lld", cp_reason_str((cp_reason)r), (long long)srv.reasons[r]);
    printf("\n");

    bool ok = true;
#define CHECK(cond, msg)                                                                                     \
  do {                                                                                                       \
    if (!(cond)) {                                                                                           \
      printf("  FAILED: %s\n", msg);                                                                         \
      ok = false;                                                                                            \
    }                                                                                                        \
  } while (0)
    CHECK(rc == 0, "cp_service_stop did not return 0");
    CHECK(prc == 0, "cp_port_destroy did not return 0");
    CHECK(con == dis, "on_connected != on_disconnected");
    CHECK(st.connected == st.disconnected && st.sessions == 0, "sessions left in the server (stats)");
    CHECK((long long)st.connected == con, "stats.connected != on_connected calls");
    CHECK(atomic_load(&srv.violations) == 0, "callback contract violations");
    CHECK(cl.echo_failures == 0, "a well-behaved client did not get every byte back");
    CHECK(cl.echo_owed == cl.echo_got, "echo bytes owed != echo bytes verified");
    CHECK(cl.halfclose_bad == 0, "a half-closed client got bytes that were not its echo");
    CHECK(con > 0 && cl.echo_got > 0, "nothing happened");
    printf("cport-soak: %s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
}
