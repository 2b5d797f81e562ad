/* SPDX-License-Identifier: MIT */
/*
 * loadgen — load generator for cport benchmarks, independent of cport.
 *
 * Raw epoll, one thread (or --threads N, connections split between threads;
 * chat mode adds one sender thread so that the offered load stays on schedule
 * even when the receive side is busy). Every byte that comes back is checked.
 *
 *   --mode echo    N connections each keep D messages of S bytes in flight. The
 *                  bytes are a pseudo-random stream per connection; the echo
 *                  must return exactly that stream. Round trip latency per
 *                  message (queued -> last byte back).
 *   --mode packet  same, but the stream is framed packets {u16 size,u16 id}+body
 *                  of S bytes each (S includes the 4-byte header).
 *   --mode chat    N clients each send R packets/s of S bytes; body = sender u32,
 *                  sequence u32, send time ns u64, filler (all verified). Every
 *                  client must receive every packet of every sender (itself
 *                  included), each sender's packets in order. Delivery latency.
 *   --mode churn   N slots; each slot connects, sends one S-byte message, checks
 *                  the echo, closes, repeats. Connections per second.
 *
 * --tls: every connection speaks TLS (OpenSSL, non-blocking, in the same epoll
 * loop). A connection counts as connected once its handshake is done, so the
 * timed phase starts after every handshake (churn: each connection's handshake
 * is part of its connect+echo time). Nothing is verified unless --tls-ca.
 *
 * --ws: every connection is a WebSocket (RFC 6455) session, over TLS too with
 * --tls: the upgrade is part of connecting; each message (chat: each packet)
 * goes as one masked binary frame; the payloads of the server's binary
 * messages form the stream that the mode checks, whatever their boundaries.
 * Needs OpenSSL at build time (SHA-1 for the handshake).
 *
 * Last stdout line: RESULT key=value ... (msgs= is the unit of work: messages,
 * deliveries or connections). Exit 0 only if errors=0; 1 on errors; 2 on bad
 * arguments.
 */
#ifndef _GNU_SOURCE
#  define _GNU_SOURCE
#endif
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifdef LOADGEN_TLS
#  include <arpa/inet.h>
#  include <limits.h>
#  include <openssl/err.h>
#  include <openssl/ssl.h>
#  include <openssl/x509v3.h>
#  define WSC_OPENSSL
#  include <openssl/rand.h>
#else
typedef struct ssl_st SSL; /* never created without OpenSSL */
#endif
#include "ws_client.h"

/* ------------------------------------------------------------------ options */

enum mode { M_ECHO, M_PACKET, M_CHAT, M_CHURN };
static const char *const mode_names[] = { "echo", "packet", "chat", "churn" };

static struct {
    enum mode mode;
    const char *host, *port;
    int conns, size, depth, threads;
    double duration, rate, drain, settle, connect_timeout;
    uint64_t seed;
    int64_t poll_ns; /* 0: wait in epoll; else sleep, then poll without waiting */
    bool tls;
    const char *tls_ca; /* verify the server against this CA file; NULL: no verification */
    long server_pid;    /* --server-pid: report its CPU over the load window; 0 = off */
    bool ws;            /* --ws: WebSocket sessions */
    const char *ws_path;
} O = {
    .mode = M_ECHO,
    .host = "127.0.0.1",
    .port = NULL,
    .conns = 100,
    .size = 64,
    .depth = 1,
    .threads = 1,
    .duration = 5,
    .rate = 1,
    .drain = 2,
    .settle = 0.1,
    .connect_timeout = 10,
    .seed = 0x5eed,
    .ws_path = "/",
};

static struct sockaddr_storage srv_addr;
static socklen_t srv_addrlen;

#define CHAT_ID 1
#define CHAT_HDR 20 /* size,id,sender,seq,ts */
#define SYNC_SEQ 0xFFFFFFFFu
#define RBUF_SIZE (256 * 1024)
#define MAX_CHAT_CONNS 4096
#define MAX_EVENTS 1024

/* -------------------------------------------------------------- shared state */

enum phase { PH_CONNECT, PH_SYNC, PH_RUN, PH_DRAIN, PH_ABORT };

static struct {
    _Atomic int phase;
    _Atomic int connected;
    _Atomic int synced;
    _Atomic int sync_req;
    _Atomic int failed;
    _Atomic int stopped;         /* threads done sending (chat) */
    _Atomic uint64_t total_sent; /* chat: packets sent by all clients */
    _Atomic int err_prints;
    _Atomic int pongs; /* chat --ws: a receiver left a pong for the sender thread */
    _Atomic int64_t t0, t_end, t_deadline;
} G;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ------------------------------------------------------------- latency hist */

#define HSUB 32
#define HBUCKETS (64 * HSUB)

struct hist {
    uint64_t c[HBUCKETS];
    uint64_t n, max;
};

static int hidx(uint64_t v)
{
    if (v < 2 * HSUB)
        return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - 5;
    return shift * HSUB + (int)(v >> shift);
}

static uint64_t hval(int idx)
{
    if (idx < 2 * HSUB)
        return (uint64_t)idx;
    int shift = idx / HSUB - 1;
    uint64_t mant = (uint64_t)(idx - shift * HSUB);
    return (mant << shift) + ((1ull << shift) >> 1);
}

static inline void hist_add(struct hist *h, int64_t v)
{
    if (v < 0)
        v = 0;
    h->c[hidx((uint64_t)v)]++;
    h->n++;
    if ((uint64_t)v > h->max)
        h->max = (uint64_t)v;
}

static void hist_merge(struct hist *d, const struct hist *s)
{
    for (int i = 0; i < HBUCKETS; i++)
        d->c[i] += s->c[i];
    d->n += s->n;
    if (s->max > d->max)
        d->max = s->max;
}

static double hist_pct_us(const struct hist *h, double p)
{
    if (!h->n)
        return 0;
    uint64_t want = (uint64_t)ceil(p * (double)h->n), acc = 0;
    if (want < 1)
        want = 1;
    for (int i = 0; i < HBUCKETS; i++) {
        acc += h->c[i];
        if (acc >= want) {
            uint64_t v = hval(i);
            return (double)(v < h->max ? v : h->max) / 1000.0;
        }
    }
    return (double)h->max / 1000.0;
}

/* ------------------------------------------------------ deterministic bytes */

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

/* The echo streams are windows of one fixed pseudo-random pattern whose length
 * is a prime: stream `seed` at offset `off` is pattern[(seed + off) mod PAT_LEN].
 * Generating and checking are then memcpy/memcmp, so the loadgen stays cheap
 * with large messages, and any lost, duplicated, reordered or misrouted run of
 * bytes shifts the window and is caught (unless the shift is a multiple of the
 * prime, 1048573). */
#define PAT_LEN 1048573u
static unsigned char *pattern;

static int pattern_init(void)
{
    pattern = malloc(PAT_LEN);
    if (!pattern)
        return -1;
    for (size_t i = 0; i < PAT_LEN; i++)
        pattern[i] = (unsigned char)(mix64(O.seed * 0x9e3779b97f4a7c15ull + i) >> 56);
    return 0;
}

static void gen_stream(uint64_t seed, uint64_t off, unsigned char *dst, size_t len)
{
    size_t pos = (size_t)((seed % PAT_LEN + off % PAT_LEN) % PAT_LEN);
    while (len) {
        size_t n = PAT_LEN - pos;
        if (n > len)
            n = len;
        memcpy(dst, pattern + pos, n);
        dst += n;
        len -= n;
        pos = 0;
    }
}

static inline void put16(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}
static inline void put32(unsigned char *p, uint32_t v)
{
    put16(p, v & 0xffff);
    put16(p + 2, v >> 16);
}
static inline void put64(unsigned char *p, uint64_t v)
{
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}
static inline uint32_t get16(const unsigned char *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8; }
static inline uint32_t get32(const unsigned char *p) { return get16(p) | get16(p + 2) << 16; }
static inline uint64_t get64(const unsigned char *p)
{
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

/* Packet stream: packet k = {size S, id (k ^ seed) & 0xffff} + body; the bodies,
 * back to back, are gen_stream(seed). */
static void gen_packets(uint64_t seed, uint64_t off, unsigned char *dst, size_t len)
{
    uint64_t S = (uint64_t)O.size;
    while (len) {
        uint64_t k = off / S;
        size_t o = (size_t)(off % S);
        size_t take = (size_t)S - o;
        if (take > len)
            take = len;
        size_t end = o + take, i = o;
        if (i < 4) {
            unsigned char hdr[4];
            put16(hdr, (uint32_t)S);
            put16(hdr + 2, (uint32_t)((k ^ seed) & 0xffff));
            while (i < 4 && i < end)
                *dst++ = hdr[i++];
        }
        if (i < end) {
            gen_stream(seed, k * (S - 4) + (i - 4), dst, end - i);
            dst += end - i;
        }
        off += take;
        len -= take;
    }
}

static inline uint64_t conn_seed(int idx) { return mix64(O.seed ^ ((uint64_t)idx << 20) ^ 0xc0ffee); }

/* Chat filler: 8-byte words h + j*K (little-endian), h from sender and seq. */
static inline uint64_t filler_word0(uint32_t sender, uint32_t seq)
{
    return mix64(O.seed + ((uint64_t)sender << 32 | seq));
}
#define FILLER_K 0x9e3779b97f4a7c15ull

static void filler_fill(uint32_t sender, uint32_t seq, unsigned char *dst, size_t len)
{
    uint64_t h = filler_word0(sender, seq);
    size_t j = 0;
    for (; j + 8 <= len; j += 8, h += FILLER_K)
        put64(dst + j, h);
    for (unsigned k = 0; j < len; j++, k++)
        dst[j] = (unsigned char)(h >> (8 * k));
}

static bool filler_ok(uint32_t sender, uint32_t seq, const unsigned char *src, size_t len)
{
    uint64_t h = filler_word0(sender, seq);
    size_t j = 0;
    for (; j + 8 <= len; j += 8, h += FILLER_K)
        if (get64(src + j) != h)
            return false;
    for (unsigned k = 0; j < len; j++, k++)
        if (src[j] != (unsigned char)(h >> (8 * k)))
            return false;
    return true;
}

/* ---------------------------------------------------------------- workers */

#define WS_HS_CAP 2048

/* --ws: a connection's WebSocket state, allocated only with --ws */
struct wsconn {
    bool up;  /* the 101 arrived: connected */
    char *hs; /* the upgrade: the request, then the answer as it arrives */
    size_t hs_len, hs_sent, req_len;
    char accept[29];     /* the Sec-WebSocket-Accept to expect */
    struct wsc_rx rx;    /* the server's frames */
    unsigned char *wout; /* echo, churn: wire bytes a short write left */
    size_t wout_off, wout_len, wout_cap;
    uint64_t tx_left; /* echo, churn: payload bytes of the frame being made */
    uint32_t tx_mask;
    bool pong_due; /* a pong waits for a frame boundary (chat: under mu) */
    unsigned char pong_len;
    unsigned char pong[125];
};

struct lconn {
    int fd;
    int wfd; /* chat: the sender thread's copy; closed only at exit */
    int idx; /* global client index */
    bool connected, out_armed, dead, synced, busy;
    /* --tls: connected means the handshake is done; tcp_up that the TCP
     * connect is. tls_more: the last read stopped with plaintext still inside
     * OpenSSL, which epoll cannot see, so the caller reads again. */
    bool tcp_up, tls_more;
    SSL *ssl;
    struct wsconn *ws; /* --ws */
    uint64_t seed;
    /* echo / packet / churn */
    uint64_t sent, target, recvd; /* stream positions */
    uint64_t started, done;       /* messages */
    int64_t *ts;                  /* send time of in-flight messages, ring of depth */
    int64_t cstart;               /* churn: connect start */
    uint64_t cycle;
    /* chat */
    unsigned char *carry;
    size_t carry_len;
    uint32_t *next; /* next expected sequence from each sender */
    /* chat, owned by the sender thread */
    unsigned char *out; /* unsent bytes after a short write */
    size_t out_off, out_len, out_cap;
    uint32_t seq; /* packets this client has sent */
    bool send_failed;
    /* chat over TLS: the sender thread and the receiving worker use the one
     * SSL, which OpenSSL does not allow at the same time; with --ws it also
     * guards the pong left for the sender */
    pthread_mutex_t mu;
};

struct worker {
    int id;
    pthread_t th;
    int ep;
    struct lconn *c;
    int n, first;
    unsigned char *rbuf, *sbuf, *xbuf;
    struct hist h;
    uint64_t msgs, bytes_in, errors, lost, ooo, outstanding;
    int64_t last_ns;
    bool started, running;
    int64_t last_poll;
    uint64_t rng; /* --ws: frame masks */
};

/* chat: one thread sends for every client, on schedule, so that a busy
 * receive side never makes the offered load bursty */
static struct {
    pthread_t th;
    uint64_t sent, errors;
    unsigned char buf[WSC_HDR_MAX + 65536];
    int *pend; /* clients with unsent bytes */
    int npend;
    uint64_t rng; /* --ws: frame masks */
} SND;

static struct worker *W;

static void report(const char *fmt, ...)
{
    if (atomic_fetch_add(&G.err_prints, 1) >= 20)
        return;
    va_list ap;
    va_start(ap, fmt);
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "loadgen: %s\n", line);
}

static void tls_free(struct lconn *c);

static void conn_close(struct worker *w, struct lconn *c)
{
    if (c->fd >= 0) {
        if (O.mode == M_CHAT) {
            /* the sender thread may still write to it: keep the number (and
             * the SSL), stop the socket */
            epoll_ctl(w->ep, EPOLL_CTL_DEL, c->fd, NULL);
            shutdown(c->fd, SHUT_RDWR);
        } else {
            tls_free(c);
            close(c->fd);
        }
    }
    c->fd = -1;
    c->out_armed = false;
    c->tls_more = false;
}

static void conn_fail(struct worker *w, struct lconn *c, const char *what, int err)
{
    w->errors++;
    if (err)
        report("conn %d: %s: %s", c->idx, what, strerror(err));
    else
        report("conn %d: %s", c->idx, what);
    conn_close(w, c);
    c->dead = true;
    if ((O.mode == M_ECHO || O.mode == M_PACKET) && c->started > c->done) {
        /* already an error: its in-flight messages are not also "lost" */
        w->outstanding -= c->started - c->done;
        c->done = c->started;
    }
    if (!c->connected && O.mode != M_CHURN)
        atomic_store(&G.failed, 1);
}

static void set_interest(struct worker *w, struct lconn *c, bool out)
{
    if (c->fd < 0 || out == c->out_armed)
        return;
    struct epoll_event ev = { .events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c };
    if (epoll_ctl(w->ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
        conn_fail(w, c, "epoll_ctl", errno);
        return;
    }
    c->out_armed = out;
}

/* ----- transport: the socket itself, or TLS over it (--tls)
 *
 * conn_read and conn_write behave like read and write (EAGAIN when OpenSSL
 * waits for the socket, 0 from a read at the end), so every mode runs the same
 * code over both; plain connections pay one predictable branch per call. */

#ifdef LOADGEN_TLS
static SSL_CTX *tls_ctx;
static _Atomic int tls_shown;

static int tls_init(void)
{
    tls_ctx = SSL_CTX_new(TLS_client_method());
    if (!tls_ctx)
        return -1;
    SSL_CTX_set_min_proto_version(tls_ctx, TLS1_2_VERSION);
    /* A short write keeps the rest for the caller; a retry may come from another
     * buffer (chat's backlog) with the same bytes. */
    SSL_CTX_set_mode(tls_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* Read what the socket has in one read instead of a record header and a
     * body, so the loadgen's own cost per message stays low. */
    SSL_CTX_set_read_ahead(tls_ctx, 1);
    /* A server that closes without close_notify ends the stream like a plain
     * one does (read returns 0). */
    SSL_CTX_set_options(tls_ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
    if (O.tls_ca) {
        if (access(O.tls_ca, R_OK) < 0) {
            fprintf(stderr, "loadgen: CA file %s: %s\n", O.tls_ca, strerror(errno));
            return -1;
        }
        if (SSL_CTX_load_verify_locations(tls_ctx, O.tls_ca, NULL) != 1) {
            fprintf(stderr, "loadgen: CA file %s: %s\n", O.tls_ca,
                    ERR_reason_error_string(ERR_peek_last_error()));
            return -1;
        }
        SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_PEER, NULL);
    }
    return 0;
}

static void tls_lock(struct lconn *c)
{
    if (O.mode == M_CHAT)
        pthread_mutex_lock(&c->mu);
}

static void tls_unlock(struct lconn *c)
{
    if (O.mode == M_CHAT)
        pthread_mutex_unlock(&c->mu);
}

/* OpenSSL's reason for the last failure, and its queue emptied so that it
 * never shows up in the next call's SSL_get_error. */
static const char *tls_reason(const struct lconn *c)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    long v = c->ssl ? SSL_get_verify_result(c->ssl) : X509_V_OK;
    ERR_clear_error();
    if (v != X509_V_OK)
        return X509_verify_cert_error_string(v);
    return r ? r : "unknown error";
}

/* rc <= 0 from SSL_read/SSL_write -> read()/write() conventions. A WANT_WRITE
 * from a read (a KeyUpdate to answer while the socket is full) is taken as
 * EAGAIN: the answer goes out with the next write or read. */
static ssize_t tls_error(struct lconn *c, int rc, bool writing)
{
    int e = SSL_get_error(c->ssl, rc);
    switch (e) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE: errno = EAGAIN; return -1;
    case SSL_ERROR_ZERO_RETURN:
        if (!writing)
            return 0;
        errno = EPIPE;
        return -1;
    case SSL_ERROR_SYSCALL:
        ERR_clear_error();
        if (!errno)
            errno = writing ? EPIPE : EIO;
        return -1;
    default:
        report("conn %d: TLS %s: %s", c->idx, writing ? "write" : "read", tls_reason(c));
        errno = EPROTO;
        return -1;
    }
}

/* Reads until the socket has nothing more (or buf is full): with read-ahead,
 * OpenSSL may hold whole records that epoll no longer reports. */
static ssize_t tls_read(struct lconn *c, unsigned char *buf, size_t len)
{
    size_t got = 0;
    ssize_t rc = 0;
    tls_lock(c);
    c->tls_more = false;
    for (;;) {
        int n = SSL_read(c->ssl, buf + got, len - got > INT_MAX ? INT_MAX : (int)(len - got));
        if (n > 0) {
            got += (size_t)n;
            if (!SSL_has_pending(c->ssl))
                break;
            if (got == len) {
                c->tls_more = true;
                break;
            }
            continue;
        }
        if (got) {
            /* hand over what came first; a failure shows again in the next read */
            ERR_clear_error();
            break;
        }
        rc = tls_error(c, n, false);
        break;
    }
    tls_unlock(c);
    return got ? (ssize_t)got : rc;
}

/* Writes all of p or until the socket is full; what it returns was sent (a
 * record cut short stays in OpenSSL and is not counted: the retry starts with
 * those bytes again, which every caller does). */
static ssize_t tls_write(struct lconn *c, const unsigned char *p, size_t len)
{
    size_t done = 0;
    ssize_t rc = 0;
    tls_lock(c);
    while (done < len) {
        int n = SSL_write(c->ssl, p + done, len - done > INT_MAX ? INT_MAX : (int)(len - done));
        if (n > 0) {
            done += (size_t)n;
            continue;
        }
        if (done)
            ERR_clear_error();
        else
            rc = tls_error(c, n, true);
        break;
    }
    tls_unlock(c);
    return done ? (ssize_t)done : rc;
}

static int tls_start(struct lconn *c)
{
    c->ssl = SSL_new(tls_ctx);
    if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1)
        return -1;
    SSL_set_connect_state(c->ssl);
    unsigned char ip[16];
    bool literal = inet_pton(AF_INET, O.host, ip) == 1 || inet_pton(AF_INET6, O.host, ip) == 1;
    /* SNI carries names only; verification checks the name or the address */
    if (!literal && SSL_set_tlsext_host_name(c->ssl, O.host) != 1)
        return -1;
    if (O.tls_ca) {
        X509_VERIFY_PARAM *vp = SSL_get0_param(c->ssl);
        if ((literal ? X509_VERIFY_PARAM_set1_ip_asc(vp, O.host) : SSL_set1_host(c->ssl, O.host)) != 1)
            return -1;
    }
    return 0;
}

/* 1 done, 0 waiting for the socket, -1 failed (the reason in what) */
static int tls_handshake(struct lconn *c, bool *want_out, char *what, size_t whatlen)
{
    int n = SSL_do_handshake(c->ssl);
    if (n == 1)
        return 1;
    int e = SSL_get_error(c->ssl, n);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        *want_out = e == SSL_ERROR_WANT_WRITE;
        return 0;
    }
    if (e == SSL_ERROR_SYSCALL && ERR_peek_last_error() == 0)
        snprintf(what, whatlen, "TLS handshake: %s", errno ? strerror(errno) : "closed by the server");
    else
        snprintf(what, whatlen, "TLS handshake: %s", tls_reason(c));
    ERR_clear_error();
    return -1;
}

/* The first connection's protocol, once, so a run's log says what it measured. */
static void tls_show(const struct lconn *c)
{
    if (atomic_exchange(&tls_shown, 1))
        return;
    int nid = SSL_get_negotiated_group(c->ssl);
    const char *group = nid > 0 ? OBJ_nid2sn(nid) : NULL;
    fprintf(stderr, "loadgen: TLS %s, cipher %s, group %s%s\n", SSL_get_version(c->ssl),
            SSL_get_cipher_name(c->ssl), group ? group : "-",
            O.tls_ca ? ", server verified" : ", server not verified");
}

/* close_notify before a clean close, as a well-behaved client sends it */
static void tls_bye(struct lconn *c)
{
    if (c->ssl && SSL_shutdown(c->ssl) < 0)
        ERR_clear_error();
}

static void tls_free(struct lconn *c)
{
    SSL_free(c->ssl);
    c->ssl = NULL;
}
#else
static int tls_init(void) { return -1; }
static ssize_t tls_read(struct lconn *c, unsigned char *buf, size_t len) { return -1; }
static ssize_t tls_write(struct lconn *c, const unsigned char *p, size_t len) { return -1; }
static int tls_start(struct lconn *c) { return -1; }
static int tls_handshake(struct lconn *c, bool *want_out, char *what, size_t whatlen) { return -1; }
static void tls_show(const struct lconn *c) {}
static void tls_bye(struct lconn *c) {}
static void tls_free(struct lconn *c) {}
#endif

static inline ssize_t conn_read(struct lconn *c, unsigned char *buf, size_t len)
{
    if (c->ssl)
        return tls_read(c, buf, len);
    return read(c->fd, buf, len);
}

/* fd: chat's sender writes to its own copy of the descriptor (wfd) */
static inline ssize_t conn_write(struct lconn *c, int fd, const unsigned char *p, size_t len)
{
    if (c->ssl)
        return tls_write(c, p, len);
    return write(fd, p, len);
}

/* ----- WebSocket (--ws), above the transport
 *
 * The upgrade runs once the transport is up (with --tls, after the
 * handshake). The server's frames are parsed in the buffer they were read
 * into, their payloads moved to its front, so the modes' stream code runs
 * unchanged on them. Echo and churn make one frame per message as the stream
 * advances (a short write keeps the rest in wout); chat frames each packet in
 * the sender thread, whose own queue keeps what a short write left. A pong
 * goes out between two whole frames; in chat the sender thread sends it. */

static void stream_bytes(const struct lconn *c, uint64_t off, unsigned char *dst, size_t len);

static void ws_reset(struct wsconn *ws)
{
    ws->up = false;
    ws->hs_len = ws->hs_sent = ws->req_len = 0;
    memset(&ws->rx, 0, sizeof ws->rx);
    ws->wout_off = ws->wout_len = 0;
    ws->tx_left = 0;
    ws->pong_due = false;
}

static uint64_t ws_seed(void)
{
    uint64_t s = mix64((uint64_t)now_ns());
#ifdef LOADGEN_TLS
    if (RAND_bytes((unsigned char *)&s, sizeof s) != 1)
        ERR_clear_error();
#endif
    return s;
}

/* A ping was parsed: its pong is due (only the latest ping needs one). In
 * chat the sender thread sends it, so it is left under the lock. */
static void ws_take_ping(struct lconn *c)
{
    struct wsconn *ws = c->ws;
    ws->rx.ping = false;
    if (O.mode == M_CHAT)
        pthread_mutex_lock(&c->mu);
    memcpy(ws->pong, ws->rx.ping_data, ws->rx.ping_len);
    ws->pong_len = ws->rx.ping_len;
    ws->pong_due = true;
    if (O.mode == M_CHAT) {
        pthread_mutex_unlock(&c->mu);
        atomic_store(&G.pongs, 1);
    }
}

/* The frames just read into buf[0..n): the length of their payloads, now at
 * the front of buf, or -1 (the reason in what) on a protocol error or a
 * close, which ends the connection. */
static ssize_t ws_payload(struct lconn *c, unsigned char *buf, size_t n, char *what, size_t whatlen)
{
    const char *why;
    long got = wsc_rx_feed(&c->ws->rx, buf, n, &why);
    if (got < 0) {
        snprintf(what, whatlen, "WebSocket: %s", why);
        return -1;
    }
    if (c->ws->rx.closed) {
        snprintf(what, whatlen, "closed by the server (WebSocket close, code %u)", c->ws->rx.close_code);
        return -1;
    }
    if (c->ws->rx.ping)
        ws_take_ping(c);
    return got;
}

/* The upgrade, a step per event: 1 done, 0 waiting for the socket, -1 failed
 * (the reason in what). */
static int ws_upgrade(struct worker *w, struct lconn *c, char *what, size_t whatlen)
{
#ifdef LOADGEN_TLS
    struct wsconn *ws = c->ws;
    if (!ws->req_len) {
        char key[25];
        int n = -1;
        if (wsc_key(key) == 0 && wsc_accept_for(key, ws->accept) == 0)
            n = wsc_request(ws->hs, WS_HS_CAP, O.host, O.port, O.ws_path, key);
        if (n < 0) {
            snprintf(what, whatlen, "WebSocket: cannot make the upgrade request");
            return -1;
        }
        ws->req_len = (size_t)n;
    }
    while (ws->hs_sent < ws->req_len) {
        ssize_t n = conn_write(c, c->fd, (unsigned char *)ws->hs + ws->hs_sent, ws->req_len - ws->hs_sent);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                set_interest(w, c, true);
                return 0;
            }
            snprintf(what, whatlen, "WebSocket upgrade: write: %s", strerror(errno));
            return -1;
        }
        ws->hs_sent += (size_t)n; /* once all is sent, hs collects the answer */
    }
    set_interest(w, c, false);
    for (;;) {
        if (ws->hs_len == WS_HS_CAP) {
            snprintf(what, whatlen, "WebSocket: the upgrade's answer is longer than %d bytes", WS_HS_CAP);
            return -1;
        }
        ssize_t n = conn_read(c, (unsigned char *)ws->hs + ws->hs_len, WS_HS_CAP - ws->hs_len);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && errno == EAGAIN)
                return 0;
            snprintf(what, whatlen, "WebSocket upgrade: %s",
                     n == 0 ? "closed by the server" : strerror(errno));
            return -1;
        }
        ws->hs_len += (size_t)n;
        size_t head = 0;
        char why[160];
        int rc = wsc_answer(ws->hs, ws->hs_len, ws->accept, &head, why, sizeof why);
        if (rc < 0)
            snprintf(what, whatlen, "WebSocket: %s", why);
        if (rc <= 0) {
            if (rc < 0)
                return -1;
            continue;
        }
        /* frames right behind the 101 (a ping); data cannot come before any was sent */
        ssize_t got = ws_payload(c, (unsigned char *)ws->hs + head, ws->hs_len - head, what, whatlen);
        if (got < 0)
            return -1;
        if (got > 0) {
            snprintf(what, whatlen, "WebSocket: data before any was sent");
            return -1;
        }
        ws->up = true;
        return 1;
    }
#else
    (void)w, (void)c;
    snprintf(what, whatlen, "WebSocket: built without OpenSSL");
    return -1;
#endif
}

/* Echo, churn: frames of the stream's next messages into dst (a due pong
 * first, at a frame boundary); the wire bytes made. Each message of S bytes
 * is one frame; a frame longer than cap is made over several calls. */
static size_t ws_make(struct worker *w, struct lconn *c, unsigned char *dst, size_t cap)
{
    struct wsconn *ws = c->ws;
    uint64_t S = (uint64_t)O.size;
    size_t n = 0;
    if (ws->pong_due && ws->tx_left == 0) {
        n = wsc_control(dst, WSC_PONG, ws->pong, ws->pong_len, wsc_rand(&w->rng));
        ws->pong_due = false;
    }
    while (c->sent < c->target) {
        if (ws->tx_left == 0) {
            if (cap - n < WSC_HDR_MAX)
                break;
            ws->tx_mask = wsc_rand(&w->rng);
            n += wsc_frame_header(dst + n, WSC_BINARY, S, ws->tx_mask);
            ws->tx_left = S;
        }
        size_t take = ws->tx_left < cap - n ? (size_t)ws->tx_left : cap - n;
        if (!take)
            break;
        stream_bytes(c, c->sent, dst + n, take);
        wsc_mask(dst + n, take, ws->tx_mask, (size_t)((S - ws->tx_left) & 3));
        n += take;
        c->sent += take;
        ws->tx_left -= take;
    }
    return n;
}

/* Keeps what a short write left (wout is empty whenever frames are made). */
static bool ws_keep(struct wsconn *ws, const unsigned char *p, size_t len)
{
    if (len > ws->wout_cap) {
        size_t cap = ws->wout_cap ? ws->wout_cap : 4096;
        while (cap < len)
            cap *= 2;
        unsigned char *q = realloc(ws->wout, cap);
        if (!q)
            return false;
        ws->wout = q;
        ws->wout_cap = cap;
    }
    memcpy(ws->wout, p, len);
    ws->wout_off = 0;
    ws->wout_len = len;
    return true;
}

static void ws_flush(struct worker *w, struct lconn *c)
{
    struct wsconn *ws = c->ws;
    while (c->fd >= 0) {
        if (ws->wout_off < ws->wout_len) {
            ssize_t n = conn_write(c, c->fd, ws->wout + ws->wout_off, ws->wout_len - ws->wout_off);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN)
                    break;
                conn_fail(w, c, "write", errno);
                return;
            }
            ws->wout_off += (size_t)n;
            if (ws->wout_off < ws->wout_len)
                break;
            ws->wout_off = ws->wout_len = 0;
        }
        size_t len = ws_make(w, c, w->sbuf, RBUF_SIZE);
        if (!len)
            break;
        ssize_t n = conn_write(c, c->fd, w->sbuf, len);
        if (n < 0 && errno != EINTR && errno != EAGAIN) {
            conn_fail(w, c, "write", errno);
            return;
        }
        size_t done = n > 0 ? (size_t)n : 0;
        if (done < len && !ws_keep(ws, w->sbuf + done, len - done)) {
            conn_fail(w, c, "write", ENOMEM);
            return;
        }
        if (n < 0 && errno == EAGAIN)
            break;
    }
    if (c->fd >= 0)
        set_interest(w, c, ws->wout_off < ws->wout_len || c->sent < c->target || ws->pong_due);
}

/* Churn: a close frame (1000) before a clean close, as a well-behaved client
 * sends it; the server's answer is not waited for. */
static void ws_bye(struct worker *w, struct lconn *c)
{
    static const unsigned char normal[2] = { 1000 >> 8, 1000 & 255 };
    unsigned char f[8];
    size_t n = wsc_control(f, WSC_CLOSE, normal, 2, wsc_rand(&w->rng));
    if (conn_write(c, c->fd, f, n) < 0)
        errno = 0; /* closing anyway */
}

static int start_connect(struct worker *w, struct lconn *c)
{
    int fd = socket(srv_addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        c->fd = -1;
        conn_fail(w, c, "socket", errno);
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->wfd = fd;
    c->connected = c->tcp_up = false;
    c->out_armed = true;
    if (c->ws)
        ws_reset(c->ws);
    if (connect(fd, (struct sockaddr *)&srv_addr, srv_addrlen) < 0 && errno != EINPROGRESS) {
        conn_fail(w, c, "connect", errno);
        return -1;
    }
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT, .data.ptr = c };
    if (epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        conn_fail(w, c, "epoll_ctl add", errno);
        return -1;
    }
    return 0;
}

/* ----- echo / packet */

static void stream_bytes(const struct lconn *c, uint64_t off, unsigned char *dst, size_t len)
{
    if (O.mode == M_PACKET)
        gen_packets(c->seed, off, dst, len);
    else
        gen_stream(c->seed, off, dst, len);
}

static void echo_flush(struct worker *w, struct lconn *c)
{
    if (c->ws) {
        ws_flush(w, c);
        return;
    }
    while (c->fd >= 0 && c->sent < c->target) {
        size_t chunk = (size_t)(c->target - c->sent);
        if (chunk > RBUF_SIZE)
            chunk = RBUF_SIZE;
        stream_bytes(c, c->sent, w->sbuf, chunk);
        ssize_t n = conn_write(c, c->fd, w->sbuf, chunk);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            conn_fail(w, c, "write", errno);
            return;
        }
        c->sent += (uint64_t)n;
        if ((size_t)n < chunk)
            break;
    }
    if (c->fd >= 0)
        set_interest(w, c, c->sent < c->target);
}

static void echo_queue(struct worker *w, struct lconn *c, int64_t now)
{
    c->ts[c->started % (uint64_t)O.depth] = now;
    c->started++;
    c->target += (uint64_t)O.size;
    w->outstanding++;
}

static bool verify(struct worker *w, struct lconn *c, uint64_t off, const unsigned char *got, size_t n)
{
    stream_bytes(c, off, w->xbuf, n);
    if (memcmp(w->xbuf, got, n) == 0)
        return true;
    size_t i = 0;
    while (got[i] == w->xbuf[i])
        i++;
    char what[160];
    snprintf(what, sizeof what, "byte %llu of the stream is 0x%02x, expected 0x%02x (message %llu)",
             (unsigned long long)(off + i), got[i], w->xbuf[i],
             (unsigned long long)((off + i) / (uint64_t)O.size));
    conn_fail(w, c, what, 0);
    return false;
}

static void echo_readable(struct worker *w, struct lconn *c)
{
    ssize_t n = conn_read(c, w->rbuf, RBUF_SIZE);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        conn_fail(w, c, n == 0 ? "closed by the server" : "read", n == 0 ? 0 : errno);
        return;
    }
    if (c->ws) {
        char what[160];
        n = ws_payload(c, w->rbuf, (size_t)n, what, sizeof what);
        if (n < 0) {
            conn_fail(w, c, what, 0);
            return;
        }
        if (n == 0) {
            if (c->ws->pong_due)
                echo_flush(w, c);
            return;
        }
    }
    int64_t now = now_ns();
    if (c->recvd + (uint64_t)n > c->sent) {
        conn_fail(w, c, "received more bytes than were sent", 0);
        return;
    }
    if (!verify(w, c, c->recvd, w->rbuf, (size_t)n))
        return;
    c->recvd += (uint64_t)n;
    w->bytes_in += (uint64_t)n;
    bool more = false;
    uint64_t S = (uint64_t)O.size, D = (uint64_t)O.depth;
    while ((c->done + 1) * S <= c->recvd) {
        hist_add(&w->h, now - c->ts[c->done % D]);
        c->done++;
        w->msgs++;
        w->outstanding--;
        w->last_ns = now;
        if (w->running) {
            echo_queue(w, c, now);
            more = true;
        }
    }
    if (more || (c->ws && c->ws->pong_due))
        echo_flush(w, c);
}

/* ----- churn */

static void churn_start(struct worker *w, struct lconn *c, int64_t now)
{
    c->cstart = now;
    c->cycle++;
    c->seed = conn_seed(c->idx) ^ mix64(c->cycle);
    c->sent = c->recvd = 0;
    c->target = (uint64_t)O.size;
    c->busy = true;
    w->outstanding++;
    start_connect(w, c);
    if (c->dead) {
        c->busy = false;
        w->outstanding--;
    }
}

static void churn_readable(struct worker *w, struct lconn *c, int64_t *now)
{
    ssize_t n = conn_read(c, w->rbuf, RBUF_SIZE);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        c->busy = false;
        w->outstanding--;
        conn_fail(w, c, n == 0 ? "closed by the server" : "read", n == 0 ? 0 : errno);
        return;
    }
    if (c->ws) {
        char what[160];
        n = ws_payload(c, w->rbuf, (size_t)n, what, sizeof what);
        if (n < 0) {
            c->busy = false;
            w->outstanding--;
            conn_fail(w, c, what, 0);
            return;
        }
        if (c->ws->pong_due)
            echo_flush(w, c);
        if (c->fd < 0) {
            c->busy = false;
            w->outstanding--;
            return;
        }
        if (n == 0)
            return;
    }
    if (c->recvd + (uint64_t)n > c->sent || !verify(w, c, c->recvd, w->rbuf, (size_t)n)) {
        if (c->fd >= 0)
            conn_fail(w, c, "received more bytes than were sent", 0);
        c->busy = false;
        w->outstanding--;
        return;
    }
    c->recvd += (uint64_t)n;
    w->bytes_in += (uint64_t)n;
    if (c->recvd < c->target)
        return;
    *now = now_ns();
    hist_add(&w->h, *now - c->cstart);
    w->msgs++;
    w->last_ns = *now;
    w->outstanding--;
    c->busy = false;
    if (c->ws)
        ws_bye(w, c);
    tls_bye(c);
    conn_close(w, c);
    if (w->running)
        churn_start(w, c, *now);
}

/* ----- chat */

static void send_failed(struct lconn *c, int err)
{
    if (!c->send_failed) {
        c->send_failed = true;
        SND.errors++;
        report("conn %d: write: %s", c->idx, strerror(err));
    }
}

/* Sender thread: write, or queue behind what is already waiting. */
static void chat_write(struct lconn *c, const unsigned char *p, size_t len)
{
    if (c->send_failed)
        return;
    if (c->out_len == c->out_off) {
        c->out_off = c->out_len = 0;
        for (;;) {
            ssize_t n = conn_write(c, c->wfd, p, len);
            if (n == (ssize_t)len)
                return;
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno != EAGAIN) {
                    send_failed(c, errno);
                    return;
                }
                n = 0;
            }
            p += n;
            len -= (size_t)n;
            break;
        }
        SND.pend[SND.npend++] = c->idx;
    }
    if (c->out_len + len > c->out_cap) {
        if (c->out_off) {
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
            c->out_len -= c->out_off;
            c->out_off = 0;
        }
        size_t cap = c->out_cap ? c->out_cap : 4096;
        while (cap < c->out_len + len)
            cap *= 2;
        unsigned char *q = realloc(c->out, cap);
        if (!q) {
            send_failed(c, ENOMEM);
            return;
        }
        c->out = q;
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, p, len);
    c->out_len += len;
}

/* Sender thread: retry the clients that have unsent bytes. */
static void chat_flush_pending(struct lconn *all)
{
    for (int i = 0; i < SND.npend;) {
        struct lconn *c = &all[SND.pend[i]];
        while (!c->send_failed && c->out_off < c->out_len) {
            ssize_t n = conn_write(c, c->wfd, c->out + c->out_off, c->out_len - c->out_off);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno != EAGAIN)
                    send_failed(c, errno);
                break;
            }
            c->out_off += (size_t)n;
        }
        if (c->send_failed || c->out_off == c->out_len) {
            c->out_off = c->out_len = 0;
            SND.pend[i] = SND.pend[--SND.npend];
        } else {
            i++;
        }
    }
}

static void chat_send(struct lconn *c, uint32_t seq)
{
    unsigned char *p = SND.buf + WSC_HDR_MAX; /* room for a frame header in front */
    put16(p, (uint32_t)O.size);
    put16(p + 2, CHAT_ID);
    put32(p + 4, (uint32_t)c->idx);
    put32(p + 8, seq);
    filler_fill((uint32_t)c->idx, seq, p + CHAT_HDR, (size_t)O.size - CHAT_HDR);
    put64(p + 12, (uint64_t)now_ns());
    if (c->ws) {
        size_t h = wsc_hdr_len((uint64_t)O.size);
        uint32_t mask = wsc_rand(&SND.rng);
        wsc_frame_header(p - h, WSC_BINARY, (uint64_t)O.size, mask);
        wsc_mask(p, (size_t)O.size, mask, 0);
        chat_write(c, p - h, h + (size_t)O.size);
        return;
    }
    chat_write(c, p, (size_t)O.size);
}

/* Sender thread, chat --ws: the pongs the receivers left, each between two
 * whole frames of its client's stream. */
static void chat_send_pongs(struct lconn *all)
{
    if (!atomic_exchange(&G.pongs, 0))
        return;
    for (int i = 0; i < O.conns; i++) {
        struct lconn *c = &all[i];
        unsigned char f[6 + 125], data[125];
        size_t len = 0;
        pthread_mutex_lock(&c->mu);
        bool due = c->ws->pong_due;
        if (due) {
            len = c->ws->pong_len;
            memcpy(data, c->ws->pong, len);
            c->ws->pong_due = false;
        }
        pthread_mutex_unlock(&c->mu);
        if (due)
            chat_write(c, f, wsc_control(f, WSC_PONG, data, len, wsc_rand(&SND.rng)));
    }
}

static void chat_packet(struct worker *w, struct lconn *c, const unsigned char *p, int64_t now)
{
    uint32_t size = get16(p), id = get16(p + 2);
    uint32_t sender = get32(p + 4), seq = get32(p + 8);
    int64_t ts = (int64_t)get64(p + 12);
    char what[160];
    if (size != (uint32_t)O.size || id != CHAT_ID || sender >= (uint32_t)O.conns) {
        snprintf(what, sizeof what, "bad packet header: size %u id %u sender %u", size, id, sender);
        conn_fail(w, c, what, 0);
        return;
    }
    if (!filler_ok(sender, seq, p + CHAT_HDR, (size_t)O.size - CHAT_HDR) || ts > now ||
        ts < atomic_load(&G.t0) - 60000000000LL) {
        snprintf(what, sizeof what, "corrupt packet from sender %u seq %u", sender, seq);
        conn_fail(w, c, what, 0);
        return;
    }
    if (seq == SYNC_SEQ) {
        if (!c->synced) {
            c->synced = true;
            atomic_fetch_add(&G.synced, 1);
        }
        return;
    }
    uint32_t *nx = &c->next[sender];
    if (seq != *nx) {
        if (w->ooo++ < 5)
            report("conn %d: from sender %u got seq %u, expected %u", c->idx, sender, seq, *nx);
        if (seq < *nx)
            return; /* duplicate or late: not a new delivery */
    }
    *nx = seq + 1;
    w->msgs++;
    w->last_ns = now;
    hist_add(&w->h, now - ts);
}

static void chat_readable(struct worker *w, struct lconn *c)
{
    unsigned char *b = w->rbuf;
    if (c->carry_len)
        memcpy(b, c->carry, c->carry_len);
    ssize_t n = conn_read(c, b + c->carry_len, RBUF_SIZE);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        conn_fail(w, c, n == 0 ? "closed by the server" : "read", n == 0 ? 0 : errno);
        return;
    }
    if (c->ws) {
        char what[160];
        n = ws_payload(c, b + c->carry_len, (size_t)n, what, sizeof what);
        if (n < 0) {
            conn_fail(w, c, what, 0);
            return;
        }
    }
    int64_t now = now_ns();
    w->bytes_in += (uint64_t)n;
    size_t total = c->carry_len + (size_t)n, p = 0;
    while (total - p >= 4) {
        size_t size = get16(b + p);
        if (size != (size_t)O.size) {
            char what[96];
            snprintf(what, sizeof what, "bad packet size %zu in the stream", size);
            conn_fail(w, c, what, 0);
            return;
        }
        if (total - p < size)
            break;
        chat_packet(w, c, b + p, now);
        if (c->fd < 0)
            return;
        p += size;
    }
    c->carry_len = total - p;
    if (c->carry_len)
        memcpy(c->carry, b + p, c->carry_len);
}

/* Send j of the global schedule: client j % N, evenly spread over each period. */
static int64_t chat_due(uint64_t j, int64_t t0)
{
    double period = 1e9 / O.rate;
    uint64_t round = j / (uint64_t)O.conns;
    int k = (int)(j % (uint64_t)O.conns);
    return t0 + (int64_t)((double)round * period + (double)k * period / O.conns);
}

static void sleep_until(int64_t t);

static void *sender_main(void *arg)
{
    struct lconn *all = arg;
    int sync_seen = 0;
    uint64_t j = 0;
    bool done_sending = false;
    for (;;) {
        int ph = atomic_load(&G.phase);
        if (ph == PH_ABORT)
            break;
        int64_t now = now_ns();
        if (SND.npend)
            chat_flush_pending(all);
        if (O.ws)
            chat_send_pongs(all);
        int64_t wake = now + 1000000;
        if (ph == PH_SYNC) {
            int req = atomic_load(&G.sync_req);
            if (req != sync_seen) {
                sync_seen = req;
                chat_send(&all[0], SYNC_SEQ);
            }
        } else if (ph >= PH_RUN) {
            int64_t t0 = atomic_load(&G.t0), t_end = atomic_load(&G.t_end);
            int64_t due;
            while (!done_sending && (due = chat_due(j, t0)) <= now) {
                if (due >= t_end) {
                    done_sending = true;
                    break;
                }
                struct lconn *c = &all[j % (uint64_t)O.conns];
                chat_send(c, c->seq++);
                j++;
            }
            if (!done_sending && chat_due(j, t0) >= t_end)
                done_sending = true;
            if (done_sending && atomic_load(&G.stopped) == 0) {
                SND.sent = j;
                atomic_store(&G.total_sent, j);
                atomic_store(&G.stopped, 1);
            }
            if (done_sending && (SND.npend == 0 || now >= atomic_load(&G.t_deadline)))
                break;
            if (!done_sending && (due = chat_due(j, t0)) < wake)
                wake = due;
        }
        sleep_until(wake);
    }
    return NULL;
}

/* ----- event loop */

static void setup_fail(struct worker *w, struct lconn *c, const char *what, int err)
{
    if (O.mode == M_CHURN) {
        c->busy = false;
        w->outstanding--;
    }
    conn_fail(w, c, what, err);
}

/* Until the TCP connect (with --tls the handshake, with --ws the upgrade) is done. */
static void conn_setup(struct worker *w, struct lconn *c, unsigned ev)
{
    if (!c->tcp_up) {
        if (!(ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
            return;
        int err = 0;
        socklen_t l = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0)
            err = errno;
        if (err) {
            setup_fail(w, c, "connect", err);
            return;
        }
        c->tcp_up = true;
        if (O.tls && tls_start(c) < 0) {
            setup_fail(w, c, "TLS setup", ENOMEM);
            return;
        }
    }
    if (c->ssl) {
        char what[200];
        bool out = false;
        int rc = tls_handshake(c, &out, what, sizeof what);
        if (rc < 0)
            setup_fail(w, c, what, 0);
        else if (rc == 0)
            set_interest(w, c, out);
        if (rc <= 0)
            return;
        tls_show(c);
    }
    if (c->ws && !c->ws->up) {
        char what[200];
        int rc = ws_upgrade(w, c, what, sizeof what);
        if (rc < 0)
            setup_fail(w, c, what, 0);
        if (rc <= 0)
            return;
    }
    c->connected = true;
    if (O.mode == M_CHURN) {
        echo_flush(w, c);
        return;
    }
    atomic_fetch_add(&G.connected, 1);
    set_interest(w, c, false);
    if (c->ws && c->ws->pong_due && O.mode != M_CHAT)
        echo_flush(w, c); /* a ping came with the 101 */
}

static void on_event(struct worker *w, struct lconn *c, unsigned ev)
{
    if (c->fd < 0)
        return;
    if (!c->connected) {
        conn_setup(w, c, ev);
        return;
    }
    int64_t now = 0;
    /* the do-while loops again only when TLS left plaintext behind (tls_more) */
    switch (O.mode) {
    case M_ECHO:
    case M_PACKET:
        if (ev & EPOLLOUT)
            echo_flush(w, c);
        if (c->fd >= 0 && (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)))
            do
                echo_readable(w, c);
            while (c->tls_more && c->fd >= 0);
        break;
    case M_CHURN:
        if (ev & EPOLLOUT)
            echo_flush(w, c);
        if (c->fd >= 0 && (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)))
            do
                churn_readable(w, c, &now);
            while (c->tls_more && c->fd >= 0);
        break;
    case M_CHAT:
        if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP))
            do
                chat_readable(w, c);
            while (c->tls_more && c->fd >= 0);
        break;
    }
}

static void worker_start(struct worker *w, int64_t now)
{
    w->started = w->running = true;
    for (int i = 0; i < w->n; i++) {
        struct lconn *c = &w->c[i];
        if (O.mode == M_CHURN) {
            churn_start(w, c, now);
        } else if (O.mode != M_CHAT && c->fd >= 0) {
            for (int d = 0; d < O.depth; d++)
                echo_queue(w, c, now);
            echo_flush(w, c);
        }
    }
}

/* epoll_pwait2 (Linux 5.11) for sub-millisecond timeouts; epoll_wait before that */
static int wait_events(int ep, struct epoll_event *evs, int max, const struct timespec *to)
{
    static _Atomic int no_pwait2;
    if (!atomic_load_explicit(&no_pwait2, memory_order_relaxed)) {
        int n = epoll_pwait2(ep, evs, max, to, NULL);
        if (n >= 0 || errno != ENOSYS)
            return n;
        atomic_store(&no_pwait2, 1);
    }
    long long ms = ((long long)to->tv_sec * 1000000000 + to->tv_nsec + 999999) / 1000000;
    return epoll_wait(ep, evs, max, (int)ms);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    static _Thread_local struct epoll_event evs[MAX_EVENTS];
    if (O.mode != M_CHURN)
        for (int i = 0; i < w->n; i++)
            start_connect(w, &w->c[i]);

    for (;;) {
        int64_t now = now_ns();
        int ph = atomic_load(&G.phase);
        if (ph == PH_ABORT)
            break;
        int64_t wake = now + 2000000; /* before the run: poll the phase every 2 ms */
        if (ph >= PH_RUN) {
            int64_t t_end = atomic_load(&G.t_end), dl = atomic_load(&G.t_deadline);
            if (!w->started)
                worker_start(w, now);
            if (w->running && now >= t_end) {
                w->running = false;
            }
            if (O.mode == M_CHAT) {
                /* the sender thread sends; receivers wait for everything it sent */
                if (ph == PH_DRAIN && w->msgs >= (uint64_t)w->n * atomic_load(&G.total_sent))
                    break;
            } else if (!w->running && w->outstanding == 0) {
                break;
            }
            if (now >= dl) {
                if (O.mode == M_CHAT) {
                    uint64_t want = (uint64_t)w->n * atomic_load(&G.total_sent);
                    w->lost = want > w->msgs ? want - w->msgs : 0;
                } else {
                    w->lost = w->outstanding;
                }
                if (w->lost)
                    report("thread %d: %llu %s still missing at the end of the drain", w->id,
                           (unsigned long long)w->lost, O.mode == M_CHAT ? "deliveries" : "messages");
                break;
            }
            if (w->running && t_end < wake)
                wake = t_end;
            if (!w->running && dl < wake)
                wake = dl;
        }
        if (wake - now > 10000000)
            wake = now + 10000000;
        struct timespec to = { 0, 0 };
        if (O.poll_ns && ph >= PH_RUN) {
            /* paced: never block in epoll, so the server's writes never wake us */
            int64_t next = w->last_poll + O.poll_ns;
            if (next > now) {
                sleep_until(next < wake ? next : wake);
                if (next > now_ns())
                    continue;
            }
            w->last_poll = now_ns();
        } else if (wake > now) {
            to.tv_sec = (wake - now) / 1000000000;
            to.tv_nsec = (wake - now) % 1000000000;
        }
        int n = wait_events(w->ep, evs, MAX_EVENTS, &to);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            report("epoll_wait: %s", strerror(errno));
            w->errors++;
            atomic_store(&G.failed, 1);
            break;
        }
        for (int i = 0; i < n; i++)
            on_event(w, evs[i].data.ptr, evs[i].events);
    }
    return NULL;
}

/* ------------------------------------------------------------------- main */

static void usage(FILE *f)
{
    fprintf(f, "usage: loadgen --port P [--host H] [--mode echo|packet|chat|churn] [options]\n"
               "  --conns N          connections / chat clients / churn slots (default 100)\n"
               "  --size S           message bytes; packet/chat: whole packet incl. 4-byte header\n"
               "                     (packet 5..65535, chat 20..65535; default 64)\n"
               "  --depth D          echo/packet: messages in flight per connection (default 1)\n"
               "  --rate R           chat: packets per second per client (default 1)\n"
               "  --duration SEC     length of the load window (default 5)\n"
               "  --threads T        event-loop threads, connections split between them (default 1);\n"
               "                     chat mode always adds one thread that does all the sending\n"
               "  --drain SEC        wait at most this long after the window for in-flight data (default 2)\n"
               "  --settle SEC       pause between 'all connected' and the start (default 0.1)\n"
               "  --connect-timeout SEC  (default 10)\n"
               "  --seed N           content seed (default 0x5eed)\n"
               "  --poll-interval US receive side: instead of sleeping in epoll_wait, sleep US\n"
               "                     microseconds and poll (0 = off, default); the server's writes\n"
               "                     then never have to wake the loadgen, which also reads bigger\n"
               "                     batches; adds up to US to the measured latency\n"
               "  --tls              speak TLS on every connection (OpenSSL); the load starts once\n"
               "                     every handshake is done (churn: each connection's handshake is\n"
               "                     part of its time); prints the TLS version and cipher on stderr\n"
               "  --tls-ca FILE      verify the server's certificate against FILE and its name\n"
               "                     against --host (implies --tls; default: no verification)\n"
               "  --server-pid PID   read that process's CPU time (/proc/PID/stat) when the load\n"
               "                     starts and after it; RESULT gains srv_cpu_s and srv_us_per_msg\n"
               "  --ws               WebSocket sessions (RFC 6455; wss with --tls): the upgrade is part\n"
               "                     of connecting; each message (chat: each packet) goes as one masked\n"
               "                     binary frame; the server's binary messages' payloads are the\n"
               "                     stream, whatever their boundaries (needs OpenSSL at build time)\n"
               "  --ws-path PATH     the upgrade request's path (implies --ws; default /)\n"
               "Prints a summary and a final 'RESULT key=value...' line. Exit 0 iff errors=0.\n");
}

static bool parse_num(const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi))
        return false;
    *out = v;
    return true;
}

static int parse_args(int argc, char **argv)
{
    static const struct option lo[] = {
        { "mode", required_argument, NULL, 'm' },
        { "host", required_argument, NULL, 'H' },
        { "port", required_argument, NULL, 'p' },
        { "conns", required_argument, NULL, 'c' },
        { "size", required_argument, NULL, 's' },
        { "depth", required_argument, NULL, 'd' },
        { "duration", required_argument, NULL, 't' },
        { "rate", required_argument, NULL, 'r' },
        { "threads", required_argument, NULL, 'T' },
        { "drain", required_argument, NULL, 'D' },
        { "settle", required_argument, NULL, 'S' },
        { "connect-timeout", required_argument, NULL, 'C' },
        { "seed", required_argument, NULL, 'x' },
        { "poll-interval", required_argument, NULL, 'P' },
        { "tls", no_argument, NULL, 'L' },
        { "tls-ca", required_argument, NULL, 'A' },
        { "server-pid", required_argument, NULL, 'Q' },
        { "ws", no_argument, NULL, 'W' },
        { "ws-path", required_argument, NULL, 'w' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int o;
    double v;
    while ((o = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (o) {
        case 'm': {
            int m = -1;
            for (int i = 0; i < 4; i++)
                if (strcmp(optarg, mode_names[i]) == 0)
                    m = i;
            if (m < 0)
                return -1;
            O.mode = (enum mode)m;
            break;
        }
        case 'H': O.host = optarg; break;
        case 'p':
            if (!parse_num(optarg, 1, 65535, &v) || v != floor(v))
                return -1;
            O.port = optarg;
            break;
        case 'c':
            if (!parse_num(optarg, 1, 1e6, &v))
                return -1;
            O.conns = (int)v;
            break;
        case 's':
            if (!parse_num(optarg, 1, 1 << 24, &v))
                return -1;
            O.size = (int)v;
            break;
        case 'd':
            if (!parse_num(optarg, 1, 1 << 16, &v))
                return -1;
            O.depth = (int)v;
            break;
        case 't':
            if (!parse_num(optarg, 0.01, 86400, &v))
                return -1;
            O.duration = v;
            break;
        case 'r':
            if (!parse_num(optarg, 0.001, 1e6, &v))
                return -1;
            O.rate = v;
            break;
        case 'T':
            if (!parse_num(optarg, 1, 64, &v))
                return -1;
            O.threads = (int)v;
            break;
        case 'D':
            if (!parse_num(optarg, 0, 600, &v))
                return -1;
            O.drain = v;
            break;
        case 'S':
            if (!parse_num(optarg, 0, 600, &v))
                return -1;
            O.settle = v;
            break;
        case 'C':
            if (!parse_num(optarg, 0.1, 600, &v))
                return -1;
            O.connect_timeout = v;
            break;
        case 'x': {
            char *end;
            errno = 0;
            O.seed = strtoull(optarg, &end, 0);
            if (errno || *end || end == optarg)
                return -1;
            break;
        }
        case 'P':
            if (!parse_num(optarg, 0, 1e6, &v))
                return -1;
            O.poll_ns = (int64_t)(v * 1000);
            break;
        case 'L': O.tls = true; break;
        case 'A':
            O.tls = true;
            O.tls_ca = optarg;
            break;
        case 'Q':
            if (!parse_num(optarg, 1, 1e9, &v) || v != floor(v))
                return -1;
            O.server_pid = (long)v;
            break;
        case 'W': O.ws = true; break;
        case 'w':
            /* one token of a request line: no spaces or control characters */
            if (optarg[0] != '/' || strlen(optarg) > 1024 || strpbrk(optarg, " \t\r\n"))
                return -1;
            O.ws = true;
            O.ws_path = optarg;
            break;
        case 'h': usage(stdout); exit(0);
        default: return -1;
        }
    }
    if (optind != argc || !O.port)
        return -1;
    if (O.mode == M_PACKET && (O.size < 5 || O.size > 65535))
        return -1;
    if (O.mode == M_CHAT && (O.size < CHAT_HDR || O.size > 65535 || O.conns > MAX_CHAT_CONNS))
        return -1;
    if (O.threads > O.conns)
        O.threads = O.conns;
    return 0;
}

static int resolve(void)
{
    struct addrinfo hints, *res;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    int rc = getaddrinfo(O.host, O.port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "loadgen: %s:%s: %s\n", O.host, O.port, gai_strerror(rc));
        return -1;
    }
    memcpy(&srv_addr, res->ai_addr, res->ai_addrlen);
    srv_addrlen = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

static double cpu_self_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* --server-pid: that process's utime+stime (all its threads) in seconds, or
 * -1 if it cannot be read (gone). Read when the load starts and after it, so
 * the connect phase (with --tls, every handshake) is left out. */
static double cpu_server_s(void)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", O.server_pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    /* the fields after "pid (comm) " start at field 3; comm may hold spaces */
    const char *p = strrchr(buf, ')');
    unsigned long long ut, st;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static void sleep_until(int64_t t)
{
    int64_t now = now_ns();
    if (t <= now)
        return;
    struct timespec ts = { (t - now) / 1000000000, (t - now) % 1000000000 };
    nanosleep(&ts, NULL);
}

/* Wait until *v >= want, or the deadline, or a failure. */
static bool wait_count(_Atomic int *v, int want, int64_t deadline, int resync_every_ms)
{
    int64_t next_sync = now_ns() + (int64_t)resync_every_ms * 1000000;
    while (atomic_load(v) < want) {
        if (atomic_load(&G.failed) || now_ns() > deadline)
            return false;
        if (resync_every_ms && now_ns() > next_sync) {
            atomic_fetch_add(&G.sync_req, 1);
            next_sync = now_ns() + (int64_t)resync_every_ms * 1000000;
        }
        sleep_until(now_ns() + 1000000);
    }
    return true;
}

int main(int argc, char **argv)
{
    if (parse_args(argc, argv) < 0) {
        usage(stderr);
        return 2;
    }
    if (resolve() < 0)
        return 2;
#ifndef LOADGEN_TLS
    if (O.tls) {
        fprintf(stderr, "loadgen: built without OpenSSL, so --tls is not available\n");
        return 2;
    }
    if (O.ws) {
        fprintf(stderr,
                "loadgen: built without OpenSSL, so --ws is not available (its handshake needs SHA-1)\n");
        return 2;
    }
#endif
    if (O.tls && tls_init() < 0)
        return 2;
    if (pattern_init() < 0) {
        perror("loadgen");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        (rlim_t)O.conns + 32 + (rlim_t)O.threads > rl.rlim_cur) {
        fprintf(stderr, "loadgen: %d connections need more than the %llu open files allowed\n", O.conns,
                (unsigned long long)rl.rlim_cur);
        return 2;
    }

    W = calloc((size_t)O.threads, sizeof *W);
    struct lconn *all = calloc((size_t)O.conns, sizeof *all);
    if (!W || !all) {
        perror("loadgen");
        return 1;
    }
    for (int i = 0; i < O.conns; i++) {
        struct lconn *c = &all[i];
        c->fd = c->wfd = -1;
        c->idx = i;
        c->seed = conn_seed(i);
        if (O.mode == M_ECHO || O.mode == M_PACKET)
            c->ts = calloc((size_t)O.depth, sizeof *c->ts);
        if (O.mode == M_CHAT) {
            c->next = calloc((size_t)O.conns, sizeof *c->next);
            c->carry = malloc((size_t)O.size);
            if (O.tls || O.ws)
                pthread_mutex_init(&c->mu, NULL);
        }
        if (O.ws) {
            c->ws = calloc(1, sizeof *c->ws);
            if (!c->ws || !(c->ws->hs = malloc(WS_HS_CAP))) {
                perror("loadgen");
                return 1;
            }
        }
        if (((O.mode == M_ECHO || O.mode == M_PACKET) && !c->ts) ||
            (O.mode == M_CHAT && (!c->next || !c->carry))) {
            perror("loadgen");
            return 1;
        }
    }
    for (int t = 0; t < O.threads; t++) {
        struct worker *w = &W[t];
        w->id = t;
        w->first = (int)((int64_t)O.conns * t / O.threads);
        w->n = (int)((int64_t)O.conns * (t + 1) / O.threads) - w->first;
        w->c = all + w->first;
        w->ep = epoll_create1(EPOLL_CLOEXEC);
        /* rbuf: room for a carried partial packet in front of a full read */
        w->rbuf = malloc(RBUF_SIZE + 65536);
        w->sbuf = malloc(RBUF_SIZE + 65536);
        w->xbuf = malloc(RBUF_SIZE + 65536);
        w->rng = ws_seed();
        if (w->ep < 0 || !w->rbuf || !w->sbuf || !w->xbuf) {
            perror("loadgen");
            return 1;
        }
    }

    atomic_store(&G.phase, PH_CONNECT);
    int64_t start = now_ns();
    for (int t = 0; t < O.threads; t++)
        if (pthread_create(&W[t].th, NULL, worker_main, &W[t]) != 0) {
            perror("loadgen: pthread_create");
            return 1;
        }
    if (O.mode == M_CHAT) {
        SND.rng = ws_seed();
        SND.pend = calloc((size_t)O.conns, sizeof *SND.pend);
        if (!SND.pend || pthread_create(&SND.th, NULL, sender_main, all) != 0) {
            perror("loadgen: sender thread");
            return 1;
        }
    }

    bool ok = true;
    const char *fail_what = NULL;
    if (O.mode != M_CHURN &&
        !wait_count(&G.connected, O.conns, start + (int64_t)(O.connect_timeout * 1e9), 0)) {
        ok = false;
        fail_what = "not all connections were established";
    }
    if (ok && O.mode == M_CHAT) {
        atomic_store(&G.sync_req, 1);
        atomic_store(&G.phase, PH_SYNC);
        if (!wait_count(&G.synced, O.conns, now_ns() + 10000000000LL, 300)) {
            ok = false;
            fail_what = "not every client received the sync packet within 10 s";
        }
    }
    uint64_t sent_total = 0;
    int64_t t0 = 0, t_end = 0;
    double cpu0 = 0, srv0 = -1;
    if (ok) {
        sleep_until(now_ns() + (int64_t)(O.settle * 1e9));
        cpu0 = cpu_self_s();
        if (O.server_pid)
            srv0 = cpu_server_s();
        t0 = now_ns();
        t_end = t0 + (int64_t)(O.duration * 1e9);
        atomic_store(&G.t0, t0);
        atomic_store(&G.t_end, t_end);
        atomic_store(&G.t_deadline, t_end + (int64_t)(O.drain * 1e9));
        atomic_store(&G.phase, PH_RUN);
        if (O.mode == M_CHAT) {
            /* once the sender is done, the receivers know what to expect */
            while (atomic_load(&G.stopped) < 1 && now_ns() < t_end + 5000000000LL)
                sleep_until(now_ns() + 1000000);
            sent_total = atomic_load(&G.total_sent);
            atomic_store(&G.phase, PH_DRAIN);
        }
    } else {
        report("%s (%d of %d connected)", fail_what, atomic_load(&G.connected), O.conns);
        atomic_store(&G.phase, PH_ABORT);
    }
    for (int t = 0; t < O.threads; t++)
        pthread_join(W[t].th, NULL);
    if (O.mode == M_CHAT) {
        if (atomic_load(&G.phase) != PH_ABORT && atomic_load(&G.stopped) < 1)
            atomic_store(&G.phase, PH_ABORT); /* never finished sending: stop it */
        pthread_join(SND.th, NULL);
    }

    double lg_cpu = ok ? cpu_self_s() - cpu0 : 0;
    double srv1 = O.server_pid && srv0 >= 0 ? cpu_server_s() : -1;
    struct hist h;
    memset(&h, 0, sizeof h);
    uint64_t msgs = 0, errors = ok ? 0 : 1, lost = 0, ooo = 0, bytes_in = 0;
    int64_t last = t_end;
    for (int t = 0; t < O.threads; t++) {
        struct worker *w = &W[t];
        hist_merge(&h, &w->h);
        msgs += w->msgs;
        errors += w->errors;
        lost += w->lost;
        ooo += w->ooo;
        bytes_in += w->bytes_in;
        if (w->last_ns > last)
            last = w->last_ns;
    }
    if (O.mode == M_CHAT && ok && atomic_load(&G.stopped) < 1) {
        report("the sender did not finish sending");
        errors++;
    }
    errors += SND.errors;
    errors += lost + ooo;
    double secs = ok ? (double)(last - t0) / 1e9 : 0;
    double rate = secs > 0 ? (double)msgs / secs : 0;
    if (O.server_pid && ok && srv1 < 0) {
        report("cannot read the CPU time of --server-pid %ld (/proc/%ld/stat)", O.server_pid, O.server_pid);
        errors++;
    }
    double p50 = hist_pct_us(&h, 0.50), p99 = hist_pct_us(&h, 0.99), mx = (double)h.max / 1000.0;
    const char *mn = mode_names[O.mode];

    switch (O.mode) {
    case M_ECHO:
    case M_PACKET:
        printf("%s: %d conns x %d B, depth %d, %d thread(s): %llu msgs in %.3f s = %.0f msgs/s "
               "(%.1f MB/s each way); rtt p50 %.1f us, p99 %.1f us, max %.1f us; lost %llu, errors %llu\n",
               mn, O.conns, O.size, O.depth, O.threads, (unsigned long long)msgs, secs, rate,
               secs > 0 ? (double)bytes_in / secs / 1e6 : 0, p50, p99, mx, (unsigned long long)lost,
               (unsigned long long)errors);
        printf("RESULT mode=%s conns=%d size=%d depth=%d threads=%d msgs=%llu secs=%.3f msgs_per_s=%.0f "
               "p50_us=%.1f p99_us=%.1f max_us=%.1f lost=%llu lg_cpu_s=%.2f tls=%d ws=%d errors=%llu",
               mn, O.conns, O.size, O.depth, O.threads, (unsigned long long)msgs, secs, rate, p50, p99, mx,
               (unsigned long long)lost, lg_cpu, (int)O.tls, (int)O.ws, (unsigned long long)errors);
        break;
    case M_CHAT:
        printf("chat: %d clients x %g pkt/s x %d B, %d thread(s): sent %llu, %llu deliveries in %.3f s = "
               "%.0f deliveries/s; latency p50 %.1f us, p99 %.1f us, max %.1f us; lost %llu, out-of-order "
               "%llu, "
               "errors %llu\n",
               O.conns, O.rate, O.size, O.threads, (unsigned long long)sent_total, (unsigned long long)msgs,
               secs, rate, p50, p99, mx, (unsigned long long)lost, (unsigned long long)ooo,
               (unsigned long long)errors);
        printf("RESULT mode=chat conns=%d size=%d rate=%g threads=%d sent=%llu msgs=%llu deliveries=%llu "
               "secs=%.3f msgs_per_s=%.0f deliveries_per_s=%.0f p50_us=%.1f p99_us=%.1f max_us=%.1f "
               "lost=%llu out_of_order=%llu lg_cpu_s=%.2f tls=%d ws=%d errors=%llu",
               O.conns, O.size, O.rate, O.threads, (unsigned long long)sent_total, (unsigned long long)msgs,
               (unsigned long long)msgs, secs, rate, rate, p50, p99, mx, (unsigned long long)lost,
               (unsigned long long)ooo, lg_cpu, (int)O.tls, (int)O.ws, (unsigned long long)errors);
        break;
    case M_CHURN:
        printf("churn: %d slots x %d B: %llu connections in %.3f s = %.0f conns/s; "
               "connect+echo p50 %.1f us, p99 %.1f us, max %.1f us; errors %llu\n",
               O.conns, O.size, (unsigned long long)msgs, secs, rate, p50, p99, mx,
               (unsigned long long)errors);
        printf("RESULT mode=churn conns=%d size=%d threads=%d msgs=%llu secs=%.3f msgs_per_s=%.0f "
               "p50_us=%.1f p99_us=%.1f max_us=%.1f lost=%llu lg_cpu_s=%.2f tls=%d ws=%d errors=%llu",
               O.conns, O.size, O.threads, (unsigned long long)msgs, secs, rate, p50, p99, mx,
               (unsigned long long)lost, lg_cpu, (int)O.tls, (int)O.ws, (unsigned long long)errors);
        break;
    }
    if (O.server_pid && srv1 >= 0)
        printf(" srv_cpu_s=%.3f srv_us_per_msg=%.4f", srv1 - srv0,
               msgs ? (srv1 - srv0) * 1e6 / (double)msgs : 0.0);
    printf("\n");
    fflush(stdout);
    return errors ? 1 : 0;
}
