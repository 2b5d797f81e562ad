/* SPDX-License-Identifier: MIT */
/*
 * What the two WebSocket fuzz targets (fuzz_ws_frames, fuzz_ws_upgrade)
 * share: the records of the server's sessions with the callback checks, the
 * wait for every session to end, and a raw RFC 6455 client's pieces (the
 * accept key, frames, a strict reader of what a server sends). Static, so
 * each target stays one file to build; define FUZZ_NAME before including.
 */
#ifndef CP_FUZZ_WS_H
#define CP_FUZZ_WS_H

#include <cport.h>

#include "fuzz_common.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#ifndef FUZZ_NAME
#  error "define FUZZ_NAME before including fuzz_ws.h"
#endif

static inline void fail(const char *what, long a, long b)
{
    fprintf(stderr, "%s: VIOLATION: %s (%ld, %ld)\n", FUZZ_NAME, what, a, b);
    abort();
}

/* ------------------------------------------------------------------ the server's sessions */

#define MAX_RECS 512

typedef struct rec {
    cp_session *s; /* referenced in on_connected, unref'd after the input */
    uint64_t id;
    atomic_int state;  /* 0 connected, 1 disconnected */
    atomic_int inside; /* a callback of this session is running */
    atomic_int reason; /* on_disconnected's */
} rec;

static _Atomic(rec *) g_by_port[65536]; /* by the client's port */
static rec *g_recs[MAX_RECS];
static atomic_int g_nrecs;
static atomic_long g_connected, g_disconnected;

static inline void rec_enter(cp_session *s, rec **out)
{
    rec *r = cp_session_data(s);
    if (!r)
        fail("callback of a session without a record (never connected?)", 0, 0);
    if (atomic_load(&r->state) != 0)
        fail("callback after on_disconnected", 0, 0);
    if (atomic_fetch_add(&r->inside, 1) != 0)
        fail("callbacks of one session overlap", 0, 0);
    *out = r;
}

static inline void rec_leave(rec *r) { atomic_fetch_sub(&r->inside, 1); }

/* on_connected: a record for the session, found by its client's port. */
static inline void rec_connected(cp_session *s)
{
    if (cp_session_data(s))
        fail("on_connected twice", 0, 0);
    rec *r = calloc(1, sizeof *r);
    if (!r)
        abort();
    r->s = s;
    r->id = cp_session_id(s);
    cp_session_ref(s);
    cp_session_set_data(s, r);
    int i = atomic_fetch_add(&g_nrecs, 1);
    if (i >= MAX_RECS)
        fail("too many sessions in one input", i, MAX_RECS);
    g_recs[i] = r;
    char peer[64];
    if (cp_session_peer(s, peer, sizeof peer) > 0) {
        const char *c = strrchr(peer, ':');
        if (c)
            atomic_store(&g_by_port[atoi(c + 1) & 0xffff], r);
    }
    atomic_fetch_add(&g_connected, 1);
}

/* on_disconnected: a WebSocket session on these services ends for these
 * reasons only (no timeouts, TLS or stop are configured; an upgrade that
 * failed never connected). */
static inline void rec_disconnected(cp_session *s, cp_reason reason, int err)
{
    rec *r;
    rec_enter(s, &r);
    switch (reason) {
    case CP_REASON_PEER_CLOSED:
    case CP_REASON_RESET:
    case CP_REASON_LOCAL:
    case CP_REASON_IO_ERROR:
    case CP_REASON_BAD_HEADER:
    case CP_REASON_TOO_BIG:
    case CP_REASON_HANDLER:
    case CP_REASON_SEND_OVERFLOW:
    case CP_REASON_WEBSOCKET: break;
    default: fail("a connected WebSocket session ended for a reason it cannot have", reason, err);
    }
    if (cp_session_send_copy(s, "x", 1) != -ENOTCONN)
        fail("send inside on_disconnected did not return -ENOTCONN", 0, 0);
    atomic_store(&r->reason, (int)reason);
    rec_leave(r);
    atomic_store(&r->state, 1);
    atomic_fetch_add(&g_disconnected, 1);
}

static inline rec *rec_by_port(uint16_t port) { return port ? atomic_load(&g_by_port[port]) : NULL; }

/* Every session of the services must end: on_connected == on_disconnected,
 * nothing live, nothing left to accept (listen_fds, fuzz_common.h). */
static inline void recs_wait_ended(cp_service *const *svcs, const int *listen_fds, int n, uint64_t us)
{
    patience p = patience_start(us);
    for (;;) {
        long con = atomic_load(&g_connected), dis = atomic_load(&g_disconnected);
        uint64_t live = 0;
        unsigned backlog = 0;
        for (int i = 0; i < n; i++) {
            cp_service_stats st;
            cp_service_stats_get(svcs[i], &st);
            live += st.sessions;
            backlog += accept_backlog(listen_fds[i]);
        }
        if (con == dis && live == 0 && backlog == 0) {
            /* An accept just taken may not be in the table yet (io_uring
             * posts it for the listener's worker to handle): look again. */
            sleep_us(2000);
            live = 0;
            backlog = 0;
            for (int i = 0; i < n; i++) {
                cp_service_stats st;
                cp_service_stats_get(svcs[i], &st);
                live += st.sessions;
                backlog += accept_backlog(listen_fds[i]);
            }
            if (live == 0 && backlog == 0 && atomic_load(&g_connected) == con)
                return;
            continue;
        }
        if (patience_out(&p)) {
            fprintf(stderr,
                    "%s: on_connected %ld on_disconnected %ld, sessions live %llu, to accept %u "
                    "(this thread stalled %llu ms meanwhile, not counted)\n",
                    FUZZ_NAME, con, dis, (unsigned long long)live, backlog,
                    (unsigned long long)(p.stalled / 1000));
            fail("sessions did not all end after the clients closed", con, dis);
        }
        sleep_us(1000);
    }
}

/* After the wait: every record ended with on_disconnected; they go. */
static inline void recs_release(void)
{
    int n = atomic_load(&g_nrecs);
    for (int i = 0; i < n; i++) {
        rec *r = g_recs[i];
        if (atomic_load(&r->state) != 1)
            fail("a session ended without on_disconnected", i, 0);
        cp_session_unref(r->s);
        free(r);
        g_recs[i] = NULL;
    }
    atomic_store(&g_nrecs, 0);
    for (size_t p = 0; p < 65536; p++)
        atomic_store_explicit(&g_by_port[p], NULL, memory_order_relaxed);
}

/* ------------------------------------------------------------------ a raw client's pieces */

enum { WS_CONT = 0, WS_TEXT = 1, WS_BINARY = 2, WS_CLOSE = 8, WS_PING = 9, WS_PONG = 10 };

/* RFC 6455's own example key and its answer. */
#define WS_KEY "dGhlIHNhbXBsZSBub25jZQ=="
#define WS_KEY_ACCEPT "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

/* The Sec-WebSocket-Accept for key (keylen bytes): base64(SHA-1(key GUID)). */
static inline void ws_accept_of(const char *key, size_t keylen, char out[29])
{
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    if (!c || !EVP_DigestInit_ex(c, EVP_sha1(), NULL) || !EVP_DigestUpdate(c, key, keylen) ||
        !EVP_DigestUpdate(c, guid, sizeof guid - 1) || !EVP_DigestFinal_ex(c, md, &mdlen) || mdlen != 20)
        abort();
    EVP_MD_CTX_free(c);
    EVP_EncodeBlock((unsigned char *)out, md, (int)mdlen);
}

/* A frame's header: b0 as given (FIN, RSV, opcode), the length in the class
 * asked for (0: 7 bits, clipped below 126; 1: 16 bits; 2: 64 bits), masked
 * with mask when it is not NULL. Returns its length (at most 14). */
static inline size_t ws_head(uint8_t *h, uint8_t b0, uint64_t len, int cls, const uint8_t *mask)
{
    size_t n = 2;
    h[0] = b0;
    if (cls == 0) {
        h[1] = (uint8_t)(len < 126 ? len : 125);
    } else if (cls == 1) {
        h[1] = 126;
        h[2] = (uint8_t)(len >> 8);
        h[3] = (uint8_t)len;
        n = 4;
    } else {
        h[1] = 127;
        for (int i = 0; i < 8; i++)
            h[2 + i] = (uint8_t)(len >> (56 - 8 * i));
        n = 10;
    }
    if (mask) {
        h[1] |= 0x80;
        memcpy(h + n, mask, 4);
        n += 4;
    }
    return n;
}

static inline void ws_mask(uint8_t *p, size_t n, const uint8_t mask[4])
{
    for (size_t i = 0; i < n; i++)
        p[i] ^= mask[i & 3];
}

/* A whole masked frame of op with payload p (at most 125 bytes for control
 * frames); returns its length. */
static inline size_t ws_frame(uint8_t *out, uint8_t op, const void *p, size_t n, const uint8_t mask[4])
{
    size_t h = ws_head(out, (uint8_t)(0x80 | op), n, n < 126 ? 0 : n <= 0xffff ? 1 : 2, mask);
    memcpy(out + h, p, n);
    ws_mask(out + h, n, mask);
    return h + n;
}

/* What a server sends, read strictly: every frame unmasked, whole (FIN; a
 * server's messages are single frames), no reserved bit, an opcode a server
 * sends (binary, Close, ping, pong), the length in its shortest form,
 * control frames at most 125 bytes, and nothing at all after a Close. */
typedef struct ws_reader {
    uint8_t hdr[10];
    uint8_t hlen;
    bool in_payload;
    uint8_t op;
    uint64_t left;
    uint8_t ctl[125];
    uint8_t ctl_len;
    bool closed; /* a Close was read */
} ws_reader;

typedef struct ws_reader_cb {
    void *u;
    void (*binary)(void *u, const uint8_t *p, size_t n); /* payload bytes of a binary message */
    void (*binary_end)(void *u);                         /* its end */
    void (*control)(void *u, uint8_t op, const uint8_t *p, size_t n);
} ws_reader_cb;

/* The header in r->hdr is whole: check it, begin the payload. */
static inline void ws_reader_begin(ws_reader *r)
{
    uint8_t b0 = r->hdr[0], l7 = r->hdr[1] & 0x7f;
    uint64_t len = l7;
    if (l7 == 126) {
        len = (uint64_t)r->hdr[2] << 8 | r->hdr[3];
        if (len < 126)
            fail("the server sent a 16-bit length that fits 7 bits", (long)len, 0);
    } else if (l7 == 127) {
        len = 0;
        for (int i = 0; i < 8; i++)
            len = len << 8 | r->hdr[2 + i];
        if (len <= 0xffff)
            fail("the server sent a 64-bit length that fits 16 bits", (long)len, 0);
    }
    if (!(b0 & 0x80) || (b0 & 0x70))
        fail("the server sent a fragment or a reserved bit", b0, 0);
    r->op = b0 & 0x0f;
    if (r->op != WS_BINARY && r->op != WS_CLOSE && r->op != WS_PING && r->op != WS_PONG)
        fail("the server sent an opcode it has no use for", r->op, 0);
    if (r->op >= WS_CLOSE && len > 125)
        fail("the server sent a control frame over 125 bytes", r->op, (long)len);
    r->left = len;
    r->ctl_len = 0;
    r->in_payload = true;
}

static inline void ws_reader_end(ws_reader *r, const ws_reader_cb *cb)
{
    r->in_payload = false;
    r->hlen = 0;
    if (r->op == WS_BINARY) {
        cb->binary_end(cb->u);
        return;
    }
    if (r->op == WS_CLOSE) {
        if (r->ctl_len == 1)
            fail("the server sent a Close with a 1-byte body", 0, 0);
        r->closed = true;
    }
    cb->control(cb->u, r->op, r->ctl, r->ctl_len);
}

static inline void ws_reader_feed(ws_reader *r, const uint8_t *p, size_t n, const ws_reader_cb *cb)
{
    while (n) {
        if (r->closed)
            fail("the server sent bytes after its Close", (long)n, p[0]);
        if (!r->in_payload) {
            r->hdr[r->hlen++] = *p++;
            n--;
            if (r->hlen == 2 && (r->hdr[1] & 0x80))
                fail("the server sent a masked frame", r->hdr[0], r->hdr[1]);
            size_t need = 2;
            if (r->hlen >= 2)
                need += (r->hdr[1] & 0x7f) == 126 ? 2 : (r->hdr[1] & 0x7f) == 127 ? 8 : 0;
            if (r->hlen < need)
                continue;
            ws_reader_begin(r);
            if (!r->left)
                ws_reader_end(r, cb);
            continue;
        }
        size_t t = r->left < n ? (size_t)r->left : n;
        if (r->op == WS_BINARY) {
            cb->binary(cb->u, p, t);
        } else {
            memcpy(r->ctl + r->ctl_len, p, t);
            r->ctl_len = (uint8_t)(r->ctl_len + t);
        }
        p += t;
        n -= t;
        r->left -= t;
        if (!r->left)
            ws_reader_end(r, cb);
    }
}

/* A Close frame's code: 0 for none (an empty body). */
static inline unsigned ws_close_code(const uint8_t *p, size_t n)
{
    return n >= 2 ? (unsigned)(p[0] << 8 | p[1]) : 0;
}

#endif
