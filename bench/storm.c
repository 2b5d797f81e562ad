/* SPDX-License-Identifier: MIT */
/*
 * storm — neighbours' echo latency while other clients churn connections.
 *
 *   storm --port P [--host H] [--mode rst|connect|flood] [--procs N] [--rate R]
 *         [--neighbours K] [--interval MS] [--size S] [--duration SEC]
 *         [--storm-nice N] [--tls [--slots K]] [--flood-id ID] [--samples FILE]
 *
 * K neighbour connections (default 20) each send S bytes (default 64) every
 * MS milliseconds (default 10; their sends are spread over the period) and
 * wait for the echo: one message in flight per neighbour; a reply later than
 * the next tick makes that neighbour skip ticks, not queue messages. The
 * round-trip times are what the tool reports.
 *
 * Meanwhile N forked processes (default 2) churn connections as fast as they
 * can, or at R connects per second in all (default 0 = as fast as possible):
 *   rst      connect, then close at once with SO_LINGER {1, 0}: the server
 *            accepts a connection that is already reset;
 *   connect  connect, send one S-byte message, close normally (FIN).
 *   flood    (issue 19) each process is one connection that sends cport
 *            packets {u16 size, u16 id} of S bytes with id --flood-id
 *            (default 9), numbered (u32 after the header), paced at its share
 *            of R packets a second (default 10000), never holding back: what
 *            the socket does not take is sent as soon as it does. It reads
 *            the echoes (cport-server --mode packet), checks they come in
 *            order with nothing missing, and reports when the server began to
 *            hold it back (the send time of the first packet whose echo took
 *            over 100 ms, from the flood's start), when its socket first
 *            refused bytes (the server's receive paused and the kernel
 *            buffers full), and when it was disconnected, if it was. The
 *            neighbours' messages are then packets too (id 1), so the same
 *            server echoes both.
 * The storm starts 0.5 s after the neighbours and stops 0.5 s before them, so
 * the neighbours' figures cover the storm only (samples outside it are dropped).
 * --storm-nice N (0..19) runs the storm processes at that nice value: with
 * the neighbours on the same CPU, their round trips otherwise include the
 * time they wait for that CPU behind the storm, which is not the server's.
 *
 * Each round trip is also split at the kernel's receive timestamp of the echo
 * (see sample): srv_* is the send-to-echo part, wake_* the rest.
 *
 * --tls (connect mode only): everything speaks TLS (OpenSSL, TLS 1.2 or later,
 * no certificate check). The neighbours complete their handshakes before the
 * storm; they run OpenSSL over memory BIOs and move the ciphertext themselves,
 * so the receive timestamps still split their round trips. Each storm
 * connection is a new full handshake: connect, handshake, send S bytes, read
 * the echo back (so it counts only once the server has served it), send
 * close_notify, close. connects then counts completed handshakes. Each storm
 * process keeps K of them going at once (--slots, default 1), non-blocking,
 * so --procs 2 --slots 500 puts 1000 handshakes on the server at the start:
 * a reconnect storm, which a server that ran every pending handshake in one
 * go would answer with a long stall. No --rate with --tls.
 *
 * --samples FILE writes every round trip the figures count, one per line:
 * "<send time, us after the storm began> <round trip us> <send-to-echo us>",
 * to see when in the storm the slow ones came.
 *
 * --mode flood prints "connected" once the neighbours are (the flood begins
 * 0.5 s later), and a line "FLOOD sent= echoed= order_errors= throttle_pkt=
 * throttle_us= blocked_us= cut_us=" before RESULT: the first packet held
 * back and its send time after the first packet's; when the socket first
 * refused bytes and when the connection was cut, from the flood's start
 * (-1: never).
 * Last line: RESULT mode=... procs=N connects=C connects_per_s=X connect_errors=E
 *            samples=K p50_us=... p99_us=... max_us=... srv_p99_us=... srv_max_us=...
 *            wake_p99_us=... wake_max_us=... neighbour_errors=E
 * Exit 0 unless a neighbour failed (closed, wrong bytes, could not connect) or
 * arguments were bad (2). Connect errors of the storm are counted, not fatal
 * (a full accept backlog refuses connections; that is part of the picture).
 */
#ifndef _GNU_SOURCE
#  define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifdef STORM_TLS
#  include <openssl/err.h>
#  include <openssl/ssl.h>
#else
typedef struct ssl_st SSL; /* never created without OpenSSL */
typedef struct bio_st BIO;
#endif

#define MAX_NEIGHBOURS 1000
#define MAX_PROCS 64
#define MARGIN_NS 500000000LL

typedef struct {
    const char *host, *samples;
    long port, procs, rate, neighbours, interval_ms, size, duration, storm_nice, slots;
    long flood_id;
    int rst, tls, flood;
} opts;

typedef struct {
    _Atomic long connects;
    _Atomic long errors;
    /* flood mode, summed (counts) or the first process's (times, us from the
     * flood's start; -1 never) */
    _Atomic long fl_sent, fl_echoed, fl_order_errors;
    _Atomic long fl_throttle_us, fl_throttle_pkt, fl_blocked_us, fl_cut_us;
} storm_counts;

typedef struct {
    int fd;
    int64_t sent_at; /* 0 = nothing in flight */
    int64_t sent_rt; /* the same in CLOCK_REALTIME, the clock of receive timestamps */
    int64_t rx_rt;   /* the kernel's receive timestamp of the echo's last bytes */
    int64_t next_send;
    long got;
    SSL *ssl;     /* --tls: over the memory BIOs below, never the socket */
    BIO *rb, *wb; /* ciphertext in (from the socket) and out (to it) */
} neighbour;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: storm --port P [--host H] [--mode rst|connect|flood] [--procs N] [--rate R]\n"
               "             [--neighbours K] [--interval MS] [--size S] [--duration SEC]\n"
               "             [--storm-nice N] [--tls [--slots K]] [--flood-id ID] [--samples FILE]\n");
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

static int parse(int argc, char **argv, opts *o)
{
    *o = (opts){ .host = "127.0.0.1",
                 .port = -1,
                 .procs = 2,
                 .neighbours = 20,
                 .interval_ms = 10,
                 .size = 64,
                 .duration = 5,
                 .slots = 1,
                 .flood_id = 9,
                 .rst = 1 };
    static const struct option lo[] = {
        { "port", required_argument, NULL, 'p' },
        { "host", required_argument, NULL, 'H' },
        { "mode", required_argument, NULL, 'm' },
        { "procs", required_argument, NULL, 'n' },
        { "rate", required_argument, NULL, 'r' },
        { "neighbours", required_argument, NULL, 'k' },
        { "interval", required_argument, NULL, 'i' },
        { "size", required_argument, NULL, 's' },
        { "duration", required_argument, NULL, 'd' },
        { "storm-nice", required_argument, NULL, 'N' },
        { "tls", no_argument, NULL, 'L' },
        { "slots", required_argument, NULL, 'K' },
        { "samples", required_argument, NULL, 'S' },
        { "flood-id", required_argument, NULL, 'F' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        int bad = 0;
        switch (c) {
        case 'p': bad = num(optarg, 1, 65535, &o->port); break;
        case 'H': o->host = optarg; break;
        case 'm':
            if (!strcmp(optarg, "rst"))
                o->rst = 1;
            else if (!strcmp(optarg, "connect"))
                o->rst = 0;
            else if (!strcmp(optarg, "flood"))
                o->rst = 0, o->flood = 1;
            else
                bad = 1;
            break;
        case 'n': bad = num(optarg, 0, MAX_PROCS, &o->procs); break;
        case 'r': bad = num(optarg, 0, 10000000, &o->rate); break;
        case 'k': bad = num(optarg, 1, MAX_NEIGHBOURS, &o->neighbours); break;
        case 'i': bad = num(optarg, 1, 10000, &o->interval_ms); break;
        case 's': bad = num(optarg, 1, 65536, &o->size); break;
        case 'd': bad = num(optarg, 2, 3600, &o->duration); break;
        case 'N': bad = num(optarg, 0, 19, &o->storm_nice); break;
        case 'L': o->tls = 1; break;
        case 'K': bad = num(optarg, 1, 10000, &o->slots); break;
        case 'S': o->samples = optarg; break;
        case 'F': bad = num(optarg, 2, 65535, &o->flood_id); break;
        case 'h': usage(stdout); exit(0);
        default: bad = 1;
        }
        if (bad)
            return -1;
    }
    if (o->tls && (o->rst || o->rate)) {
        fprintf(stderr, "storm: --tls storms are unpaced connect storms (--mode connect, no --rate)\n");
        return -1;
    }
    if (o->flood && (o->tls || o->size < 8 || o->size > 65535)) {
        fprintf(stderr, "storm: --mode flood sends packets of 8..65535 bytes, without TLS\n");
        return -1;
    }
    if (o->flood && !o->rate)
        o->rate = 10000;
    if (!o->tls && o->slots != 1) {
        fprintf(stderr, "storm: --slots is for --tls storms\n");
        return -1;
    }
    return o->port < 0 || optind != argc ? -1 : 0;
}

static int connect_to(const opts *o, struct sockaddr_in *sa)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)sa, sizeof *sa) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* ------------------------------------------------------------------ TLS */

#ifdef STORM_TLS
static SSL_CTX *tls_ctx;

static int tls_init(void)
{
    tls_ctx = SSL_CTX_new(TLS_client_method());
    if (!tls_ctx)
        return -1;
    SSL_CTX_set_min_proto_version(tls_ctx, TLS1_2_VERSION);
    /* the storm's connections read what the socket has in one read */
    SSL_CTX_set_read_ahead(tls_ctx, 1);
    SSL_CTX_set_options(tls_ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
    return 0;
}

/* Sends all the ciphertext the neighbour's SSL has written (the socket blocks). */
static int tls_flush(neighbour *n)
{
    char buf[16384];
    int k;
    while ((k = BIO_read(n->wb, buf, (int)sizeof buf)) > 0) {
        for (int off = 0; off < k;) {
            ssize_t w = send(n->fd, buf + off, (size_t)(k - off), MSG_NOSIGNAL);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                return -1;
            off += (int)w;
        }
    }
    return 0;
}

/* A neighbour's handshake, before the storm, over its blocking socket. */
static int tls_neighbour_start(neighbour *n)
{
    n->ssl = SSL_new(tls_ctx);
    n->rb = BIO_new(BIO_s_mem());
    n->wb = BIO_new(BIO_s_mem());
    if (!n->ssl || !n->rb || !n->wb)
        return -1;
    BIO_set_mem_eof_return(n->rb, -1); /* drained means "more to come", not the end */
    SSL_set_bio(n->ssl, n->rb, n->wb);
    SSL_set_connect_state(n->ssl);
    for (;;) {
        int rc = SSL_do_handshake(n->ssl);
        if (tls_flush(n) < 0)
            return -1;
        if (rc == 1)
            return 0;
        if (SSL_get_error(n->ssl, rc) != SSL_ERROR_WANT_READ)
            return -1;
        char buf[16384];
        ssize_t r = recv(n->fd, buf, sizeof buf, 0);
        if (r <= 0 || BIO_write(n->rb, buf, (int)r) != (int)r)
            return -1;
    }
}

/* The plaintext in ciphertext just received (it may be none: a session
 * ticket); its length, or -1 on failure. */
static long tls_take(neighbour *n, const char *in, ssize_t len, char *out, long cap)
{
    if (BIO_write(n->rb, in, (int)len) != (int)len)
        return -1;
    long got = 0;
    while (got < cap) {
        int k = SSL_read(n->ssl, out + got, (int)(cap - got));
        if (k > 0) {
            got += k;
            continue;
        }
        if (SSL_get_error(n->ssl, k) != SSL_ERROR_WANT_READ)
            return -1;
        break;
    }
    return tls_flush(n) < 0 ? -1 : got; /* e.g. the answer to a KeyUpdate */
}

static int tls_send(neighbour *n, const char *p, long len)
{
    if (SSL_write(n->ssl, p, (int)len) != (int)len) /* into memory: all or nothing */
        return -1;
    return tls_flush(n);
}

/* One storm connection of a TLS storm process, non-blocking. */
typedef struct storm_slot {
    int fd;
    SSL *ssl;
    enum { SL_CONNECT, SL_HANDSHAKE, SL_WRITE, SL_READ } state;
    long got; /* echo bytes back so far */
} storm_slot;

static void slot_close(storm_slot *sl)
{
    SSL_free(sl->ssl);
    sl->ssl = NULL;
    if (sl->fd >= 0)
        close(sl->fd);
    sl->fd = -1;
    ERR_clear_error();
}

/* Starts the slot's next connection; the events to wait for in *ev. */
static int slot_open(storm_slot *sl, const struct sockaddr_in *sa, short *ev)
{
    sl->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (sl->fd < 0 ||
        (connect(sl->fd, (const struct sockaddr *)sa, sizeof *sa) < 0 && errno != EINPROGRESS)) {
        slot_close(sl);
        return -1;
    }
    sl->state = SL_CONNECT;
    sl->got = 0;
    *ev = POLLOUT;
    return 0;
}

/* An OpenSSL call that did not finish: wait (0) or fail (-1). */
static int slot_wait(storm_slot *sl, int rc, short *ev)
{
    int e = SSL_get_error(sl->ssl, rc);
    if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
        return -1;
    *ev = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
    return 0;
}

/* Moves the slot on as far as it goes: 1 its connection is done (echo back,
 * close_notify sent), 0 waiting (*ev), -1 failed. */
static int slot_step(const opts *o, storm_slot *sl, const char *msg, char *buf, short *ev)
{
    int rc;
    switch (sl->state) {
    case SL_CONNECT: {
        int err = 0;
        socklen_t el = sizeof err;
        if (getsockopt(sl->fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0 || err)
            return -1;
        sl->ssl = SSL_new(tls_ctx);
        if (!sl->ssl || SSL_set_fd(sl->ssl, sl->fd) != 1)
            return -1;
        SSL_set_connect_state(sl->ssl);
        sl->state = SL_HANDSHAKE;
    } /* fall through */
    case SL_HANDSHAKE:
        if ((rc = SSL_do_handshake(sl->ssl)) != 1)
            return slot_wait(sl, rc, ev);
        sl->state = SL_WRITE;
        /* fall through */
    case SL_WRITE:
        if ((rc = SSL_write(sl->ssl, msg, (int)o->size)) <= 0)
            return slot_wait(sl, rc, ev);
        sl->state = SL_READ;
        /* fall through */
    case SL_READ:
        while (sl->got < o->size) {
            if ((rc = SSL_read(sl->ssl, buf + sl->got, (int)(o->size - sl->got))) <= 0)
                return slot_wait(sl, rc, ev);
            sl->got += rc;
        }
        if (memcmp(buf, msg, (size_t)o->size) != 0)
            return -1;
        SSL_shutdown(sl->ssl);
        return 1;
    }
    return -1;
}

/* One TLS storm process: --slots connections at a time until the end. */
static void tls_storm_proc(const opts *o, const struct sockaddr_in *sa, int64_t start, int64_t end,
                           storm_counts *counts)
{
    long k = o->slots;
    storm_slot *sl = calloc((size_t)k, sizeof *sl);
    struct pollfd *pf = calloc((size_t)k, sizeof *pf);
    char *msg = calloc(1, (size_t)o->size), *buf = malloc((size_t)o->size);
    if (!sl || !pf || !msg || !buf)
        _exit(1);
    while (now_ns() < start)
        usleep(1000);
    for (long i = 0; i < k; i++) {
        sl[i].fd = -1;
        if (slot_open(&sl[i], sa, &pf[i].events) < 0)
            atomic_fetch_add(&counts->errors, 1);
        pf[i].fd = sl[i].fd;
    }
    while (now_ns() < end) {
        if (poll(pf, (nfds_t)k, 10) < 0 && errno != EINTR)
            break;
        for (long i = 0; i < k; i++) {
            if (sl[i].fd >= 0 && !pf[i].revents)
                continue;
            int r = sl[i].fd >= 0 ? slot_step(o, &sl[i], msg, buf, &pf[i].events) : -1;
            if (r == 0)
                continue;
            atomic_fetch_add(r > 0 ? &counts->connects : &counts->errors, 1);
            slot_close(&sl[i]);
            if (slot_open(&sl[i], sa, &pf[i].events) < 0)
                atomic_fetch_add(&counts->errors, 1);
            pf[i].fd = sl[i].fd; /* -1 (ignored by poll) until the next round retries */
        }
    }
    for (long i = 0; i < k; i++)
        slot_close(&sl[i]);
    free(sl);
    free(pf);
    free(msg);
    free(buf);
}
#else
static int tls_init(void)
{
    fprintf(stderr, "storm: built without OpenSSL, so --tls is not available\n");
    return -1;
}
static int tls_neighbour_start(neighbour *n)
{
    (void)n;
    return -1;
}
static long tls_take(neighbour *n, const char *in, ssize_t len, char *out, long cap)
{
    (void)n, (void)in, (void)len, (void)out, (void)cap;
    return -1;
}
static int tls_send(neighbour *n, const char *p, long len)
{
    (void)n, (void)p, (void)len;
    return -1;
}
static void tls_storm_proc(const opts *o, const struct sockaddr_in *sa, int64_t start, int64_t end,
                           storm_counts *counts)
{
    (void)o, (void)sa, (void)start, (void)end, (void)counts;
}
#endif

/* ------------------------------------------------------------------ flood */

static void put16(char *p, unsigned v)
{
    p[0] = (char)(v & 0xff);
    p[1] = (char)(v >> 8);
}

static uint32_t get32(const char *p)
{
    const unsigned char *u = (const unsigned char *)p;
    return (uint32_t)u[0] | (uint32_t)u[1] << 8 | (uint32_t)u[2] << 16 | (uint32_t)u[3] << 24;
}

/* Packet k of the flood: header, then k, then filler. */
static void flood_packet(const opts *o, char *p, uint32_t k)
{
    put16(p, (unsigned)o->size);
    put16(p + 2, (unsigned)o->flood_id);
    for (int i = 0; i < 4; i++)
        p[4 + i] = (char)(k >> (8 * i));
    memset(p + 8, 'f', (size_t)o->size - 8);
}

/* Reads the echoes there are; -1 once the connection is gone. */
static int flood_read(const opts *o, int fd, char *rb, long *have, uint32_t *next_echo,
                      const int64_t *sent_at, int64_t start, storm_counts *counts, int first)
{
    for (;;) {
        ssize_t r = recv(fd, rb + *have, 65536 - (size_t)*have, MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
            return -1;
        if (r < 0)
            return 0;
        *have += r;
        long off = 0;
        int64_t t = now_ns();
        for (; *have - off >= o->size; off += o->size) {
            uint32_t k = get32(rb + off + 4);
            if (k != *next_echo)
                atomic_fetch_add(&counts->fl_order_errors, 1);
            *next_echo = k + 1;
            atomic_fetch_add(&counts->fl_echoed, 1);
            /* The first packet the server held back: its echo took long.
             * Timed from the first packet's send, so that a flooder that
             * got its CPU late does not count its own lateness. */
            if (first && atomic_load(&counts->fl_throttle_us) < 0 && sent_at[k] &&
                t - sent_at[k] > 100000000LL) {
                atomic_store(&counts->fl_throttle_us, (long)((sent_at[k] - sent_at[0]) / 1000));
                atomic_store(&counts->fl_throttle_pkt, (long)k);
            }
        }
        memmove(rb, rb + off, (size_t)(*have - off));
        *have -= off;
    }
}

/* One flooder: one connection, packets at its share of the rate, every
 * packet sent as soon as the socket takes it (a backlog is caught up, never
 * dropped), until the deadline or the server cuts it. */
static void flood_proc(const opts *o, struct sockaddr_in *sa, int64_t start, int64_t end,
                       storm_counts *counts, int first)
{
    int fd = connect_to(o, sa);
    if (fd < 0) {
        atomic_fetch_add(&counts->errors, 1);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    double rate = (double)o->rate / (double)o->procs;
    long cap = (long)(rate * (double)(end - start) / 1e9) + 16;
    int64_t *sent_at = calloc((size_t)cap, sizeof *sent_at);
    char *wb = malloc((size_t)o->size * 64), *rb = malloc(65536);
    if (!sent_at || !wb || !rb)
        _exit(1);
    long have = 0;
    uint32_t next_echo = 0, k = 0; /* k: packets wholly sent */
    long part = 0;                 /* bytes of packet k already sent */
    while (now_ns() < start)
        usleep(1000);
    int cut = 0;
    while (!cut) {
        int64_t t = now_ns();
        if (t >= end)
            break;
        long due = (long)((double)(t - start) * rate / 1e9) + 1;
        if (due > cap)
            due = cap;
        while ((long)k < due) {
            long n = due - (long)k > 64 ? 64 : due - (long)k;
            for (long i = 0; i < n; i++)
                flood_packet(o, wb + i * o->size, k + (uint32_t)i);
            ssize_t w = send(fd, wb + part, (size_t)(n * o->size - part), MSG_DONTWAIT | MSG_NOSIGNAL);
            if (w < 0 && errno != EAGAIN && errno != EINTR) {
                cut = 1;
                break;
            }
            if (w <= 0) {
                if (first && atomic_load(&counts->fl_blocked_us) < 0)
                    atomic_store(&counts->fl_blocked_us, (long)((now_ns() - start) / 1000));
                break;
            }
            int64_t ts = now_ns();
            long done = (part + w) / o->size;
            for (long i = 0; i < done; i++)
                sent_at[k + (uint32_t)i] = ts;
            k += (uint32_t)done;
            part = (part + w) % o->size;
            atomic_fetch_add(&counts->fl_sent, done);
        }
        if (!cut && flood_read(o, fd, rb, &have, &next_echo, sent_at, start, counts, first) < 0)
            cut = 1;
        if (cut) {
            if (first)
                atomic_store(&counts->fl_cut_us, (long)((now_ns() - start) / 1000));
            break;
        }
        struct pollfd pf = { .fd = fd, .events = POLLIN };
        poll(&pf, 1, 1);
    }
    close(fd);
    free(sent_at);
    free(wb);
    free(rb);
}

/* One storm process: churns connections until the deadline, at its share of
 * the rate (0 = unpaced). */
static void storm_proc(const opts *o, struct sockaddr_in *sa, int64_t start, int64_t end,
                       storm_counts *counts)
{
    if (o->tls) {
        tls_storm_proc(o, sa, start, end, counts);
        return;
    }
    if (o->flood)
        return; /* main runs flood_proc */
    char *msg = calloc(1, (size_t)o->size);
    int64_t gap = o->rate ? 1000000000LL * o->procs / o->rate : 0;
    int64_t next = start;
    while (now_ns() < start)
        usleep(1000);
    while (now_ns() < end) {
        if (gap) {
            int64_t t = now_ns();
            if (t < next) {
                struct timespec ts = { .tv_sec = (next - t) / 1000000000LL,
                                       .tv_nsec = (next - t) % 1000000000LL };
                nanosleep(&ts, NULL);
            }
            next += gap;
        }
        int fd = connect_to(o, sa);
        if (fd < 0) {
            atomic_fetch_add(&counts->errors, 1);
            continue;
        }
        if (o->rst) {
            struct linger lg = { .l_onoff = 1, .l_linger = 0 };
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        } else if (send(fd, msg, (size_t)o->size, MSG_NOSIGNAL) < 0) {
            atomic_fetch_add(&counts->errors, 1);
        }
        close(fd);
        atomic_fetch_add(&counts->connects, 1);
    }
    free(msg);
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static int64_t realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* One round trip, split at the kernel's receive timestamp of the echo
 * (SO_TIMESTAMPNS; on loopback it is taken when the server's send hands the
 * bytes to the loopback device): srv is the send-to-echo part (request
 * delivery, the server, the echo's send), wake the rest (the echo's delivery
 * to this socket and this process getting its CPU back). */
typedef struct {
    int64_t sent, rtt, srv, wake;
} sample;

static void take_timestamp(neighbour *n, struct msghdr *mh)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(c), sizeof ts);
            n->rx_rt = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
        }
    }
}

/* Reads what is there of one neighbour's echo; returns 1 when the whole
 * message is back (and stores its round trip), 0 if not yet, -1 on failure. */
static int neighbour_read(const opts *o, neighbour *n, const char *pattern, sample *out)
{
    char buf[65536], plain[65536];
    union {
        char b[CMSG_SPACE(sizeof(struct timespec)) * 2];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = { .iov_base = buf, .iov_len = sizeof buf };
    struct msghdr mh = { .msg_iov = &iov,
                         .msg_iovlen = 1,
                         .msg_control = ctl.b,
                         .msg_controllen = sizeof ctl.b };
    ssize_t r = recvmsg(n->fd, &mh, MSG_DONTWAIT);
    if (r < 0)
        return errno == EAGAIN || errno == EINTR ? 0 : -1;
    if (r == 0)
        return -1;
    take_timestamp(n, &mh);
    const char *data = buf;
    if (n->ssl) {
        r = tls_take(n, buf, r, plain, (long)sizeof plain);
        if (r <= 0)
            return (int)r; /* -1 failed; 0 nothing for us yet */
        data = plain;
    }
    if (n->got + r > o->size || memcmp(data, pattern + n->got, (size_t)r))
        return -1;
    n->got += r;
    if (n->got < o->size)
        return 0;
    out->sent = n->sent_at;
    out->rtt = now_ns() - n->sent_at;
    out->srv = n->rx_rt ? n->rx_rt - n->sent_rt : out->rtt;
    out->wake = out->rtt - out->srv;
    n->sent_at = 0;
    n->rx_rt = 0;
    n->got = 0;
    return 1;
}

/* Sends every neighbour whose tick has come; a neighbour still waiting for
 * its echo skips ticks until it arrives. */
static int neighbours_send(const opts *o, neighbour *ns, const char *pattern, int64_t t)
{
    int64_t period = o->interval_ms * 1000000LL;
    for (long i = 0; i < o->neighbours; i++) {
        neighbour *n = &ns[i];
        if (n->sent_at || t < n->next_send)
            continue;
        while (n->next_send <= t)
            n->next_send += period;
        if (n->ssl ? tls_send(n, pattern, o->size) < 0
                   : send(n->fd, pattern, (size_t)o->size, MSG_NOSIGNAL) != o->size)
            return -1;
        n->sent_at = now_ns();
        n->sent_rt = realtime_ns();
    }
    return 0;
}

static int64_t next_event(const opts *o, const neighbour *ns, int64_t end)
{
    int64_t e = end;
    for (long i = 0; i < o->neighbours; i++)
        if (!ns[i].sent_at && ns[i].next_send < e)
            e = ns[i].next_send;
    return e;
}

static int run_neighbours(const opts *o, neighbour *ns, struct pollfd *pf, int64_t begin, int64_t end,
                          sample *samples, long cap, long *nsamples)
{
    char *pattern = malloc((size_t)o->size);
    for (long i = 0; i < o->size; i++)
        pattern[i] = (char)('a' + i % 26);
    if (o->flood) { /* a packet of id 1, which the server echoes as it is */
        put16(pattern, (unsigned)o->size);
        put16(pattern + 2, 1);
    }
    int64_t period = o->interval_ms * 1000000LL;
    int64_t t0 = now_ns();
    for (long i = 0; i < o->neighbours; i++)
        ns[i].next_send = t0 + period * i / o->neighbours;
    int err = 0;
    while (!err) {
        int64_t t = now_ns();
        if (t >= end)
            break;
        if (neighbours_send(o, ns, pattern, t) < 0) {
            err = 1;
            break;
        }
        int64_t wait = next_event(o, ns, end) - now_ns();
        for (long i = 0; i < o->neighbours; i++)
            pf[i] = (struct pollfd){ .fd = ns[i].fd, .events = POLLIN };
        int r = poll(pf, (nfds_t)o->neighbours, wait > 0 ? (int)((wait + 999999) / 1000000) : 0);
        if (r < 0 && errno != EINTR)
            err = 1;
        for (long i = 0; r > 0 && i < o->neighbours; i++) {
            if (!pf[i].revents)
                continue;
            int64_t sent = ns[i].sent_at;
            sample smp;
            int k = neighbour_read(o, &ns[i], pattern, &smp);
            if (k < 0)
                err = 1;
            else if (k > 0 && sent >= begin && sent < end - MARGIN_NS && *nsamples < cap)
                samples[(*nsamples)++] = smp;
        }
    }
    free(pattern);
    return err ? -1 : 0;
}

static int write_samples(const char *path, const sample *s, long n, int64_t begin)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    for (long i = 0; i < n; i++)
        fprintf(f, "%lld %lld %lld\n", (long long)((s[i].sent - begin) / 1000), (long long)(s[i].rtt / 1000),
                (long long)(s[i].srv / 1000));
    return fclose(f);
}

int main(int argc, char **argv)
{
    opts o;
    if (parse(argc, argv, &o) < 0) {
        usage(stderr);
        return 2;
    }
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)o.port) };
    if (inet_pton(AF_INET, o.host, &sa.sin_addr) != 1) {
        usage(stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    if (o.tls && tls_init() < 0)
        return 2;
    neighbour *ns = calloc((size_t)o.neighbours, sizeof *ns);
    struct pollfd *pf = calloc((size_t)o.neighbours, sizeof *pf);
    for (long i = 0; i < o.neighbours; i++) {
        if ((ns[i].fd = connect_to(&o, &sa)) < 0) {
            fprintf(stderr, "storm: neighbour %ld cannot connect: %s\n", i, strerror(errno));
            return 1;
        }
        int one = 1;
        setsockopt(ns[i].fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(ns[i].fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
        if (o.tls && tls_neighbour_start(&ns[i]) < 0) {
            fprintf(stderr, "storm: neighbour %ld: TLS handshake failed\n", i);
            return 1;
        }
    }
    storm_counts *counts = mmap(NULL, sizeof *counts, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1,
                                0);
    if (counts == MAP_FAILED)
        return 1;
    atomic_store(&counts->fl_throttle_us, -1);
    atomic_store(&counts->fl_throttle_pkt, -1);
    atomic_store(&counts->fl_blocked_us, -1);
    atomic_store(&counts->fl_cut_us, -1);
    if (o.flood) { /* flood.sh waits for this to read the server's memory before the flood */
        printf("connected\n");
        fflush(stdout);
    }
    int64_t t0 = now_ns();
    int64_t begin = t0 + MARGIN_NS, stop = t0 + o.duration * 1000000000LL + MARGIN_NS;
    pid_t kids[MAX_PROCS];
    for (long i = 0; i < o.procs; i++) {
        if ((kids[i] = fork()) == 0) {
            if (o.storm_nice && nice((int)o.storm_nice) < 0)
                perror("storm: nice");
            if (o.flood)
                flood_proc(&o, &sa, begin, stop, counts, i == 0);
            else
                storm_proc(&o, &sa, begin, stop, counts);
            _exit(0);
        }
    }
    long cap = o.neighbours * (o.duration * 1000 / o.interval_ms + 1);
    sample *samples = malloc(sizeof *samples * (size_t)cap);
    long n = 0;
    int r = run_neighbours(&o, ns, pf, begin, stop + MARGIN_NS, samples, cap, &n);
    for (long i = 0; i < o.procs; i++)
        waitpid(kids[i], NULL, 0);
    if (o.samples && write_samples(o.samples, samples, n, begin) < 0)
        fprintf(stderr, "storm: cannot write %s: %s\n", o.samples, strerror(errno));
    int64_t *rtt = malloc(sizeof *rtt * (size_t)(n + 1)), *srv = malloc(sizeof *srv * (size_t)(n + 1)),
            *wake = malloc(sizeof *wake * (size_t)(n + 1));
    for (long i = 0; i < n; i++)
        rtt[i] = samples[i].rtt, srv[i] = samples[i].srv, wake[i] = samples[i].wake;
    qsort(rtt, (size_t)n, sizeof *rtt, cmp_i64);
    qsort(srv, (size_t)n, sizeof *srv, cmp_i64);
    qsort(wake, (size_t)n, sizeof *wake, cmp_i64);
    long c = atomic_load(&counts->connects);
    double secs = (double)(stop - begin) / 1e9;
#define PCT(a, q) (n ? (long long)((a)[n * (q) / 100] / 1000) : 0LL)
#define MAXV(a) (n ? (long long)((a)[n - 1] / 1000) : 0LL)
    if (o.flood) {
        printf("flood: %ld packets sent at %ld/s, %ld echoed (%ld out of order); held back from packet %ld, "
               "%.1f ms after the first; socket full at %.1f ms, cut at %.1f ms (-0.001: never)\n",
               atomic_load(&counts->fl_sent), o.rate, atomic_load(&counts->fl_echoed),
               atomic_load(&counts->fl_order_errors), atomic_load(&counts->fl_throttle_pkt),
               atomic_load(&counts->fl_throttle_us) / 1e3, atomic_load(&counts->fl_blocked_us) / 1e3,
               atomic_load(&counts->fl_cut_us) / 1e3);
        printf("FLOOD sent=%ld echoed=%ld order_errors=%ld throttle_pkt=%ld throttle_us=%ld blocked_us=%ld "
               "cut_us=%ld\n",
               atomic_load(&counts->fl_sent), atomic_load(&counts->fl_echoed),
               atomic_load(&counts->fl_order_errors), atomic_load(&counts->fl_throttle_pkt),
               atomic_load(&counts->fl_throttle_us), atomic_load(&counts->fl_blocked_us),
               atomic_load(&counts->fl_cut_us));
    }
    printf("storm %s%s: %ld connects in %.1f s (%.0f/s, %ld errors); neighbours %ld samples, "
           "p50 %.2f ms p99 %.2f ms max %.2f ms (send-to-echo part p99 %.2f ms, wake part p99 %.2f ms)%s\n",
           o.flood ? "flood"
           : o.rst ? "rst"
                   : "connect",
           o.tls ? " (TLS)" : "", c, secs, c / secs, atomic_load(&counts->errors), n, PCT(rtt, 50) / 1e3,
           PCT(rtt, 99) / 1e3, MAXV(rtt) / 1e3, PCT(srv, 99) / 1e3, PCT(wake, 99) / 1e3,
           r < 0 ? " NEIGHBOUR FAILED" : "");
    printf("RESULT mode=%s procs=%ld connects=%ld connects_per_s=%.0f connect_errors=%ld samples=%ld "
           "p50_us=%lld p99_us=%lld max_us=%lld srv_p99_us=%lld srv_max_us=%lld wake_p99_us=%lld "
           "wake_max_us=%lld neighbour_errors=%d tls=%d\n",
           o.flood ? "flood"
           : o.rst ? "rst"
                   : "connect",
           o.procs, c, c / secs, atomic_load(&counts->errors), n, PCT(rtt, 50), PCT(rtt, 99), MAXV(rtt),
           PCT(srv, 99), MAXV(srv), PCT(wake, 99), MAXV(wake), r < 0, o.tls);
    return r < 0 ? 1 : 0;
}
