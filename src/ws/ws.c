/* SPDX-License-Identifier: MIT */
/*
 * WebSocket (RFC 6455) as a byte-stream filter: docs/design.md, "WebSocket".
 *
 * A server session first reads an HTTP upgrade request (llhttp parses it;
 * the request is kept in a small state freed once the session is upgraded),
 * answers 101 or an HTTP error, then reads frames: the payloads of binary
 * messages go to the framer as the session's byte stream, unmasked in place
 * in the buffer the backend lent for the call; control frames are answered
 * (pong, the close handshake); anything RFC 6455 forbids ends the session
 * with the matching Close code. What a server session sends needs no copy
 * and no queue of the filter's: each buffer's frame header sits in its
 * headroom (sendbuf.h) and the session's own queue is framed (sendq.c), so
 * the filter's own frames (pong, Close) join the user's there. An idle
 * server session keeps 48 bytes here (ws_filter); what it needs only for a
 * while (the upgrade, a control frame arriving) or only with pings is made
 * when needed (ws_side). A client's frames are masked copies in a queue of
 * its own (ws_client).
 */
#include "net/net.h"
#include "ws/ws_digest.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <llhttp.h>

#ifndef _WIN32
#  include <arpa/inet.h>
#endif

#define MAX_REQUEST_DEFAULT 8192u
#define UPGRADE_MS_DEFAULT 10000u
#define CLOSE_DRAIN_MS 1000u /* after our Close: the peer's answer and FIN, at most this long */
#define CTL_MAX 125u         /* a control frame's payload */

enum { OP_CONT = 0, OP_TEXT = 1, OP_BINARY = 2, OP_CLOSE = 8, OP_PING = 9, OP_PONG = 10 };

enum {
    WS_NORMAL = 1000,
    WS_GOING_AWAY = 1001,
    WS_PROTOCOL = 1002,
    WS_UNSUPPORTED = 1003,
    WS_BAD_DATA = 1007,
    WS_POLICY = 1008,
    WS_TOO_BIG = 1009,
    WS_INTERNAL = 1011
};

struct cp_ws {
    cp_filter_kind kind; /* first: net holds the kind (net.h) */
    _Atomic uint32_t refs;
    cp_ws_opts o; /* its strings are the copies below */
    char *path, *subprotocol, *page, *host;
    char **origins;
};

/* ------------------------------------------------------------------ per session */

enum { H_HOST, H_ORIGIN, H_UPGRADE, H_KEY, H_VERSION, H_PROTOCOL, H_ACCEPT, H_EXTENSIONS, H_N };
static const char *const header_names[H_N] = { "host",
                                               "origin",
                                               "upgrade",
                                               "sec-websocket-key",
                                               "sec-websocket-version",
                                               "sec-websocket-protocol",
                                               "sec-websocket-accept",
                                               "sec-websocket-extensions" };

typedef struct span {
    uint32_t off, len;
    bool set;
} span;

/* The upgrade request while it is read; freed once it is answered. */
typedef struct upgrade {
    llhttp_t p;
    uint32_t seen;  /* request bytes fed so far */
    char field[24]; /* the header name being read (longer names matter to no one) */
    uint8_t flen;   /* its length; past the field's size: a name we ignore */
    int cur;        /* the header whose value is being read, or H_N */
    bool done;      /* the request is complete */
    span url, h[H_N];
    char *arena; /* the values, one after the other */
    uint32_t alen, acap;
    char accept[29]; /* a client's: the Sec-WebSocket-Accept the server must answer */
} upgrade;

/* What a session needs only for a while, or only with pings: made when
 * first needed and dropped when nothing needs it (side_release), so that an
 * idle server session without pings keeps none of it. */
typedef struct ws_side {
    upgrade *up;    /* the request (a client's: the answer), until it is handled */
    cp_wtimer ping; /* armed while ping_interval_ms is set */
    uint8_t ctl_len;
    uint8_t ctl[CTL_MAX]; /* a control frame's payload while it arrives */
    uint16_t close_code;  /* F_CLOSE_DUE's (0: a Close without a code) */
} ws_side;

enum {                    /* ws_filter.flags */
       F_OPEN = 1,        /* upgraded: frames from here on */
       F_FAILED = 2,      /* an error, or the peer's Close: the rest is dropped */
       F_CLOSE_SENT = 4,  /* our Close is queued */
       F_PONG_SEEN = 16,  /* a pong since our last ping */
       F_IN_PAYLOAD = 32, /* the frame's header is done, payload bytes follow */
       F_CLOSE_DUE = 64,  /* our Close waits for the drain to write what came before */
};

/* A session's filter: all that an idle server session keeps (48 bytes). */
typedef struct ws_filter {
    cp_filter base; /* first (net.h); base.kind is the cp_ws */
    ws_side *x;     /* NULL when nothing needs it */
    /* The frame being read: its first two header bytes, the extended
     * length as it arrives (then the payload bytes still to come), the mask. */
    uint64_t left;
    uint32_t msg_len; /* the unfinished message's bytes so far */
    uint8_t mask[4];
    uint8_t h0, h1;
    uint8_t hlen;   /* header bytes read */
    uint8_t mpos;   /* the mask's phase */
    uint8_t msg_op; /* OP_TEXT or OP_BINARY while a message is unfinished, else 0 */
    uint8_t utf8;   /* text: the validator's state */
    uint8_t flags;
} ws_filter;

/* A client's filter: its frames are masked copies (a mask per frame), made
 * into a queue of its own; each copy's header is its framing (sendbuf.h),
 * so the queue itself says which written bytes were the user's. */
typedef struct ws_client {
    ws_filter f;
    cp_sendq wire;
    uint32_t rnd; /* masks: xorshift32, seeded from the system (cp__ws_random) */
} ws_client;

static const cp_filter_ops ws_ops;

static ws_filter *ws_of(cp_filter *f) { return (ws_filter *)(void *)f; }
static ws_client *client_of(ws_filter *f) { return (ws_client *)(void *)f; }
static const cp_ws *ws_kind(const ws_filter *f) { return (const cp_ws *)(const void *)f->base.kind; }
static bool is_client(const ws_filter *f) { return f->base.s->is_client; }
static bool has(const ws_filter *f, uint8_t flag) { return (f->flags & flag) != 0; }
static uint8_t frame_op(const ws_filter *f) { return f->h0 & 0x0f; }

static bool connected(const cp_session *s) { return atomic_load(&s->state) == CP_S_CONNECTED; }

/* ------------------------------------------------------------------ UTF-8 */

/* Björn Höhrmann's DFA would be a table; this is the same check by ranges
 * (RFC 3629), in a byte: the low two bits say how many continuation bytes
 * are still due, the next three which range the next one must be in. */
enum { UTF8_OK = 0, UTF8_BAD = 0xff };
static const uint8_t utf8_lo[5] = { 0x80, 0xa0, 0x80, 0x90, 0x80 };
static const uint8_t utf8_hi[5] = { 0xbf, 0xbf, 0x9f, 0xbf, 0x8f };

static uint8_t utf8_due(unsigned need, unsigned range) { return (uint8_t)(need | range << 2); }

static uint8_t utf8_step(uint8_t st, uint8_t c)
{
    unsigned need = st & 3u, range = st >> 2;
    if (need) {
        if (c < utf8_lo[range] || c > utf8_hi[range])
            return UTF8_BAD;
        return utf8_due(need - 1, 0);
    }
    if (c < 0x80)
        return UTF8_OK;
    if (c < 0xc2 || c > 0xf4)
        return UTF8_BAD;
    if (c < 0xe0)
        return utf8_due(1, 0);
    if (c == 0xe0)
        return utf8_due(2, 1);
    if (c == 0xed)
        return utf8_due(2, 2); /* no surrogates */
    if (c < 0xf0)
        return utf8_due(2, 0);
    if (c == 0xf0)
        return utf8_due(3, 3);
    if (c == 0xf4)
        return utf8_due(3, 4); /* not past U+10FFFF */
    return utf8_due(3, 0);
}

static uint8_t utf8_run(uint8_t st, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n && st != UTF8_BAD; i++)
        st = utf8_step(st, p[i]);
    return st;
}

/* ------------------------------------------------------------------ sending */

/* A client's next mask: RFC 6455 wants one per frame, unpredictable to a
 * page's script (which a native client has not); xorshift32 over a random
 * seed keeps it cheap. */
static uint32_t next_mask(ws_client *c)
{
    uint32_t x = c->rnd;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return c->rnd = x;
}

/* Writes the header of a client's len-byte frame of op at h, with a fresh
 * mask, also put in mask; returns its length. */
static size_t client_head(ws_client *c, uint8_t *h, uint8_t op, size_t len, uint8_t mask[4])
{
    size_t hl = 2;
    h[0] = (uint8_t)(0x80 | op);
    if (len < 126) {
        h[1] = (uint8_t)len;
    } else if (len <= 0xffff) {
        h[1] = 126;
        h[2] = (uint8_t)(len >> 8);
        h[3] = (uint8_t)len;
        hl = 4;
    } else {
        h[1] = 127;
        for (int i = 0; i < 8; i++)
            h[2 + i] = (uint8_t)((uint64_t)len >> (56 - 8 * i));
        hl = 10;
    }
    uint32_t m = next_mask(c);
    memcpy(mask, &m, 4);
    h[1] |= 0x80;
    memcpy(h + hl, mask, 4);
    return hl + 4;
}

static void mask_copy(uint8_t *dst, const uint8_t *src, size_t n, const uint8_t mask[4])
{
    for (size_t i = 0; i < n; i++)
        dst[i] = src[i] ^ mask[i & 3];
}

/* A client's message: its own masked copy (each frame has a mask of its
 * own, so nothing can be shared). NULL when out of memory. */
static cp_sendbuf *masked_copy(ws_client *c, cp_sendbuf *b, uint32_t *hl)
{
    size_t len = cp_sendbuf_len(b);
    uint8_t h[14], mask[4];
    *hl = (uint32_t)client_head(c, h, OP_BINARY, len, mask);
    cp_sendbuf *m = cp_sendbuf_open(*hl + len);
    if (!m)
        return NULL;
    memcpy(cp_sendbuf_data(m), h, *hl);
    mask_copy(cp_sendbuf_data(m) + *hl, cp_sendbuf_data(b), len, mask);
    cp_sendbuf_close(m, *hl + len);
    m->framing = *hl; /* the header is not the user's (on_sent) */
    return m;
}

/* The user's buffers, masked into the client's queue; false when out of
 * memory (the session is closing). */
static bool client_encode(ws_client *c)
{
    cp_sendq *src = cp__filter_source(&c->f.base);
    cp_sendbuf *b;
    while ((b = cp__sendq_pop(src)) != NULL) {
        uint32_t hl = 0;
        cp_sendbuf *m = masked_copy(c, b, &hl);
        cp_sendbuf_unref(b);
        if (!m || cp__sendq_push(&c->wire, m, SIZE_MAX) < 0) {
            if (m)
                cp_sendbuf_unref(m);
            cp__session_request_close(c->f.base.s, CP_REASON_NO_MEMORY);
            return false;
        }
    }
    return true;
}

/* Bytes of a client's own at the end of its queue; false when out of
 * memory. */
static bool client_push(ws_client *c, const void *p, size_t n)
{
    cp_sendbuf *b = cp_sendbuf_copy(p, n);
    if (!b)
        return false;
    b->framing = (uint32_t)n; /* none of it the user's (on_sent) */
    if (cp__sendq_push(&c->wire, b, SIZE_MAX) < 0) {
        cp_sendbuf_unref(b);
        return false;
    }
    return true;
}

/* The same, after what the user queued before them (an echo the peer
 * asked for before its bad frame goes out before our Close). */
static bool client_own(ws_client *c, const void *p, size_t n)
{
    return client_encode(c) && client_push(c, p, n);
}

/* A server's bytes of its own in the session's queue, after the user's:
 * an HTTP answer, or (op != 0, in the framed queue of an upgraded session)
 * a control frame whose header its close wrote, with op put in. None of
 * them counts as the user's (on_sent). False when out of memory. */
static bool server_own(ws_filter *f, uint8_t op, const void *p, size_t n)
{
    cp_session *s = f->base.s;
    cp_sendbuf *b = cp_sendbuf_copy(p, n);
    if (!b)
        return false;
    if (op) /* the header ends where the bytes begin (sendbuf.h) */
        cp_sendbuf_data(b)[-(ptrdiff_t)cp__sendbuf_head_len(n)] = (uint8_t)(0x80 | op);
    b->framing = (uint32_t)n;
    if (cp__sendq_push(&s->sq, b, SIZE_MAX) < 0) {
        cp_sendbuf_unref(b);
        return false;
    }
    return true;
}

/* One control frame of the filter's own, after the user's bytes queued
 * before it (encoded first, unless this is a hard close, which drops them):
 * false when out of memory. */
static bool own_frame(ws_filter *f, uint8_t op, const uint8_t *p, size_t n, bool after_user)
{
    if (!is_client(f))
        return server_own(f, op, p, n);
    ws_client *c = client_of(f);
    uint8_t frame[14 + CTL_MAX], mask[4];
    size_t hl = client_head(c, frame, op, n, mask);
    mask_copy(frame + hl, p, n, mask);
    return after_user ? client_own(c, frame, hl + n) : client_push(c, frame, hl + n);
}

/* The filter's own bytes, written at the round's end; false when out of
 * memory (the session is closed then). */
static bool own_done(ws_filter *f, bool ok)
{
    if (!ok) {
        cp__session_close(f->base.s, CP_REASON_NO_MEMORY, -ENOMEM);
        return false;
    }
    cp__session_wire_ready(f->base.s);
    return true;
}

/* An HTTP answer or request. */
static bool own_bytes(ws_filter *f, const void *p, size_t n)
{
    return own_done(f, is_client(f) ? client_own(client_of(f), p, n) : server_own(f, 0, p, n));
}

static bool control(ws_filter *f, uint8_t op, const uint8_t *p, size_t n)
{
    return own_done(f, own_frame(f, op, p, n, true));
}

static bool send_close(ws_filter *f, uint16_t code)
{
    f->flags |= F_CLOSE_SENT;
    uint8_t c[2] = { (uint8_t)(code >> 8), (uint8_t)code };
    return control(f, OP_CLOSE, c, code ? 2 : 0);
}

/* The Close code a hard close sends for reason; 0: none (the stream is
 * gone, or a Close went out already). */
static uint16_t close_code_of(int reason)
{
    switch (reason) {
    case CP_REASON_LOCAL: return WS_NORMAL;
    case CP_REASON_STOPPING: return WS_GOING_AWAY;
    case CP_REASON_TOO_BIG: return WS_TOO_BIG;
    case CP_REASON_FLOOD: return WS_POLICY; /* the peer broke the service's rate policy */
    case CP_REASON_PEER_CLOSED:
    case CP_REASON_RESET:
    case CP_REASON_IO_ERROR:
    case CP_REASON_TLS:
    case CP_REASON_HANDSHAKE_TIMEOUT:
    case CP_REASON_KEEPALIVE:
    case CP_REASON_USER_TIMEOUT:
    case CP_REASON_WEBSOCKET: return 0;
    default: return WS_INTERNAL;
    }
}

/* A hard close: our Close with the reason's code, written at once and best
 * effort (nothing here may close the session again), after what the
 * session had queued. */
static void ws_closing(cp_filter *bf, int reason)
{
    ws_filter *f = ws_of(bf);
    uint16_t code = close_code_of(reason);
    if (!has(f, F_OPEN) || has(f, F_CLOSE_SENT) || !code)
        return;
    f->flags |= F_CLOSE_SENT;
    uint8_t c[2] = { (uint8_t)(code >> 8), (uint8_t)code };
    if (own_frame(f, OP_CLOSE, c, 2, false))
        cp__session_wire_flush(&f->base);
}

static ws_side *side_get(ws_filter *f);

/* Our Close with code ends the graceful close that begins now: ws_finish
 * writes it once the drain has written what came before. Not at once: a
 * send another thread made before this moment may still be on its way to
 * the queue, and no data frame may follow a Close. False if the drain does
 * not begin (the session is closing already, or no memory for the code). */
static bool close_after_drain(ws_filter *f, uint16_t code, int reason)
{
    ws_side *x = side_get(f);
    if (!x)
        return false;
    x->close_code = code;
    f->flags |= F_CLOSE_DUE;
    if (cp__session_shutdown(f->base.s, CLOSE_DRAIN_MS, reason) == 0)
        return true;
    f->flags &= (uint8_t)~F_CLOSE_DUE;
    return false;
}

/* An error of the peer's: the graceful close, our Close with code at its
 * end (the peer reads the Close, answers, closes). */
static void ws_fail(ws_filter *f, uint16_t code)
{
    cp_session *s = f->base.s;
    f->flags |= F_FAILED;
    if (close_after_drain(f, code, CP_REASON_WEBSOCKET))
        return;
    if (!has(f, F_CLOSE_SENT) && !send_close(f, code))
        return;
    cp__session_wire_flush(&f->base);
    cp__session_close(s, CP_REASON_WEBSOCKET, -EPROTO);
}

/* A server's frames are the user's buffers in the session's framed queue:
 * nothing to do. A client's are masked copies. */
static void ws_encode(cp_filter *bf)
{
    if (is_client(ws_of(bf)))
        (void)client_encode(client_of(ws_of(bf)));
}

/* A draining session has written everything: our Close, with the code of
 * why it drains (the peer's error, or its own Close's code), unless one
 * went out already. */
static bool ws_finish(cp_filter *bf)
{
    ws_filter *f = ws_of(bf);
    if (!has(f, F_OPEN) || has(f, F_CLOSE_SENT))
        return false;
    cp_session *s = bf->s;
    uint16_t code = s->drain_reason == CP_REASON_STOPPING ? WS_GOING_AWAY : WS_NORMAL;
    /* NOLINTNEXTLINE(clang-analyzer-core.NullDereference): F_CLOSE_DUE keeps x (side_release) */
    return send_close(f, has(f, F_CLOSE_DUE) ? f->x->close_code : code);
}

/* ------------------------------------------------------------------ the upgrade */

static bool arena_room(upgrade *u, size_t n)
{
    if (u->alen + n <= u->acap)
        return true;
    uint32_t cap = u->acap ? u->acap * 2 : 256;
    while (cap < u->alen + n)
        cap *= 2;
    char *a = cp__realloc(u->arena, cap);
    if (!a)
        return false;
    u->arena = a;
    u->acap = cap;
    return true;
}

/* Appends to sp, which must be the last span in the arena (pieces of one
 * value come in a row; a header sent again was moved to the end first). */
static bool arena_add(upgrade *u, span *sp, const char *at, size_t n)
{
    if (!arena_room(u, n + 1))
        return false;
    if (!sp->set) {
        sp->set = true;
        sp->off = u->alen;
        sp->len = 0;
    } else if (sp->off + sp->len != u->alen) {
        return false; /* pieces of one value always come in a row */
    }
    memcpy(u->arena + u->alen, at, n);
    u->alen += (uint32_t)n;
    sp->len += (uint32_t)n;
    return true;
}

static upgrade *up_of(llhttp_t *p) { return (upgrade *)(void *)p; }

/* The session is upgraded: pings begin, one interval from now (the timer's
 * first turn cannot come during the upgrade, which may take longer). */
static void pings_start(ws_filter *f)
{
    uint32_t every = ws_kind(f)->o.ping_interval_ms;
    ws_side *x = every ? side_get(f) : NULL; /* there still: the upgrade's */
    if (!x)
        return;
    f->flags |= F_PONG_SEEN;
    cp__timer_arm(f->base.s->owner, &x->ping, every);
}

/* The request (or answer) is handled, or the session ends: its state goes. */
static void upgrade_drop(ws_filter *f)
{
    if (!f->x || !f->x->up)
        return;
    cp__free(f->x->up->arena);
    cp__free(f->x->up);
    f->x->up = NULL;
}

static int on_url(llhttp_t *p, const char *at, size_t n)
{
    return arena_add(up_of(p), &up_of(p)->url, at, n) ? 0 : -1;
}

static int on_field(llhttp_t *p, const char *at, size_t n)
{
    upgrade *u = up_of(p);
    for (size_t i = 0; i < n; i++) {
        if (u->flen < sizeof u->field)
            u->field[u->flen] = (char)(at[i] >= 'A' && at[i] <= 'Z' ? at[i] + 32 : at[i]);
        if (u->flen < UINT8_MAX)
            u->flen++;
    }
    return 0;
}

static int on_field_done(llhttp_t *p)
{
    upgrade *u = up_of(p);
    u->cur = H_N;
    for (int i = 0; i < H_N; i++)
        if (u->flen == strlen(header_names[i]) && !memcmp(u->field, header_names[i], u->flen))
            u->cur = i;
    u->flen = 0;
    /* A header sent twice: its values are joined as one list (RFC 9110),
     * the first one moved to the end of the arena so the list is one span. */
    if (u->cur < H_N && u->h[u->cur].set) {
        span *sp = &u->h[u->cur];
        if (!arena_room(u, (size_t)sp->len + 3))
            return -1;
        memcpy(u->arena + u->alen, u->arena + sp->off, sp->len);
        sp->off = u->alen;
        u->alen += sp->len;
        if (!arena_add(u, sp, ", ", 2))
            return -1;
    }
    return 0;
}

static int on_value(llhttp_t *p, const char *at, size_t n)
{
    upgrade *u = up_of(p);
    if (u->cur == H_N)
        return 0;
    /* The span must stay one run: a value that resumes after another was
     * added is joined by moving it (never happens with one header at a time). */
    return arena_add(u, &u->h[u->cur], at, n) ? 0 : -1;
}

static int on_value_done(llhttp_t *p)
{
    upgrade *u = up_of(p);
    if (u->cur < H_N) {
        if (!u->h[u->cur].set) /* an empty value */
            u->h[u->cur] = (span){ u->alen, 0, true };
        /* A byte after the value, for value()'s terminating NUL. */
        if (!arena_room(u, 1))
            return -1;
        u->arena[u->alen++] = '\0';
    }
    u->cur = H_N;
    return 0;
}

static int on_complete(llhttp_t *p)
{
    up_of(p)->done = true;
    /* A request that is no upgrade stops here (its answer closes the
     * session); an upgrade's stop is llhttp's own HPE_PAUSED_UPGRADE. */
    return llhttp_get_upgrade(p) ? 0 : HPE_PAUSED;
}

static llhttp_settings_t http_settings;
static pthread_once_t http_once = PTHREAD_ONCE_INIT;

static void http_settings_make(void)
{
    llhttp_settings_init(&http_settings);
    http_settings.on_url = on_url;
    http_settings.on_header_field = on_field;
    http_settings.on_header_field_complete = on_field_done;
    http_settings.on_header_value = on_value;
    http_settings.on_header_value_complete = on_value_done;
    http_settings.on_message_complete = on_complete;
}

/* A header's value as a string in the arena (each value is followed by a
 * spare byte, on_value_done), spaces trimmed; "" if absent. */
static const char *value(upgrade *u, int h)
{
    span *sp = &u->h[h];
    if (!sp->set)
        return "";
    char *v = u->arena + sp->off;
    size_t n = sp->len;
    while (n && (v[n - 1] == ' ' || v[n - 1] == '\t'))
        n--;
    while (n && (*v == ' ' || *v == '\t')) {
        v++;
        n--;
    }
    v[n] = '\0';
    return v;
}

/* True if the comma-separated list has token (case-insensitive). */
static bool has_token(const char *list, const char *token)
{
    size_t tl = strlen(token);
    const char *p = list;
    while (*p) {
        while (*p == ' ' || *p == '\t' || *p == ',')
            p++;
        const char *e = p;
        while (*e && *e != ',')
            e++;
        const char *t = e;
        while (t > p && (t[-1] == ' ' || t[-1] == '\t'))
            t--;
        if ((size_t)(t - p) == tl && !strncasecmp(p, token, tl))
            return true;
        p = e;
    }
    return false;
}

static const char *status_text(int code)
{
    switch (code) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 426: return "Upgrade Required";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return code < 500 ? "Refused" : "Error";
    }
}

/* An HTTP answer that ends the session: written at once, then the close. */
static void http_refuse(ws_filter *f, int code, const char *extra, const char *body)
{
    char head[512];
    size_t blen = body ? strlen(body) : 0;
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Length: %zu\r\n%s%s\r\n", code,
                     status_text(code), blen, body ? "Content-Type: text/html; charset=utf-8\r\n" : "",
                     extra ? extra : "");
    upgrade_drop(f);
    f->flags |= F_FAILED;
    if (!own_bytes(f, head, (size_t)n) || (blen && !own_bytes(f, body, blen)))
        return;
    /* Gracefully: a client still sending (a body, a pipelined request)
     * would otherwise get a reset for the unread bytes, which can destroy
     * the answer before it reads it. */
    cp_session *s = f->base.s;
    cp_reason why = code == 200 ? CP_REASON_LOCAL : CP_REASON_WEBSOCKET;
    if (cp__session_refuse(s, CLOSE_DRAIN_MS, why) < 0) {
        cp__session_wire_flush(&f->base);
        cp__session_close(s, why, code == 200 ? 0 : -EPROTO);
    }
}

/* A Sec-WebSocket-Key: the base64 of 16 bytes, so 24 characters ending "==". */
static bool key_valid(const char *k)
{
    if (strlen(k) != 24 || k[22] != '=' || k[23] != '=')
        return false;
    for (int i = 0; i < 22; i++) {
        char c = k[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' ||
              c == '/'))
            return false;
    }
    return true;
}

static bool path_matches(const char *want, const char *url)
{
    if (!want)
        return true;
    size_t n = strcspn(url, "?");
    return strlen(want) == n && !memcmp(want, url, n);
}

static bool origin_allowed(const cp_ws *ws, const char *origin)
{
    if (!ws->origins)
        return true;
    for (char **o = ws->origins; *o; o++)
        if (!strcasecmp(*o, origin))
            return true;
    return false;
}

/* The request is complete: answer it. True if the session is upgraded. */
static bool upgrade_answer(ws_filter *f)
{
    upgrade *u = f->x->up;
    const cp_ws *ws = ws_kind(f);
    if (!u->url.set && !arena_add(u, &u->url, "/", 1)) {
        http_refuse(f, 500, NULL, NULL);
        return false;
    }
    /* The URL first: value() writes a NUL after each span it reads. */
    char *url = u->arena + u->url.off;
    char urlbuf[256];
    size_t ul = u->url.len < sizeof urlbuf - 1 ? u->url.len : sizeof urlbuf - 1;
    memcpy(urlbuf, url, ul);
    urlbuf[ul] = '\0';
    const char *host = value(u, H_HOST), *origin = value(u, H_ORIGIN);
    const char *up = value(u, H_UPGRADE), *key = value(u, H_KEY), *ver = value(u, H_VERSION);
    const char *protos = value(u, H_PROTOCOL);
    bool is_upgrade = llhttp_get_upgrade(&u->p) && has_token(up, "websocket");
    if (!path_matches(ws->path, urlbuf)) {
        http_refuse(f, 404, NULL, NULL);
        return false;
    }
    if (u->p.method != HTTP_GET) {
        http_refuse(f, 405, "Allow: GET\r\n", NULL);
        return false;
    }
    if (!is_upgrade) {
        if (ws->page)
            http_refuse(f, 200, NULL, ws->page);
        else
            http_refuse(f, 426, "Upgrade: websocket\r\n", NULL);
        return false;
    }
    if (u->p.http_major != 1 || u->p.http_minor < 1 || !key_valid(key)) {
        http_refuse(f, 400, NULL, NULL);
        return false;
    }
    if (strcmp(ver, "13") != 0) {
        http_refuse(f, 426, "Sec-WebSocket-Version: 13\r\n", NULL);
        return false;
    }
    if (!origin_allowed(ws, origin)) {
        http_refuse(f, 403, NULL, NULL);
        return false;
    }
    if (ws->subprotocol && !has_token(protos, ws->subprotocol)) {
        http_refuse(f, 400, NULL, NULL);
        return false;
    }
    if (ws->o.on_upgrade) {
        cp_ws_request rq = { urlbuf, host, origin, protos };
        int st = ws->o.on_upgrade(&rq, ws->o.upgrade_arg);
        if (st) {
            http_refuse(f, st >= 400 && st <= 599 ? st : 403, NULL, NULL);
            return false;
        }
    }
    char accept[CP_WS_ACCEPT_LEN + 1];
    if (cp__ws_accept_key(key, accept) < 0) {
        http_refuse(f, 500, NULL, NULL);
        return false;
    }
    char head[384];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Accept: %s\r\n%s%s%s\r\n",
                     accept, ws->subprotocol ? "Sec-WebSocket-Protocol: " : "",
                     ws->subprotocol ? ws->subprotocol : "", ws->subprotocol ? "\r\n" : "");
    upgrade_drop(f);
    if (!own_bytes(f, head, (size_t)n))
        return false;
    /* From here on every buffer queued is one binary message, its header
     * in its headroom. */
    f->base.s->sq.framed = true;
    f->flags |= F_OPEN;
    pings_start(f);
    cp__filter_up(&f->base); /* on_connected */
    return connected(f->base.s);
}

/* ------------------------------------------------------------------ a client's upgrade */

/* The Host a client sends: the option, or the address it connects to. */
static void host_of(const ws_filter *f, char *out, size_t n)
{
    if (ws_kind(f)->host) {
        snprintf(out, n, "%s", ws_kind(f)->host);
        return;
    }
    const cp_service *svc = atomic_load(&f->base.s->svc);
    char a[64] = "localhost";
    if (svc->addr.ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)(const void *)&svc->addr;
        inet_ntop(AF_INET6, &v6->sin6_addr, a, sizeof a);
        snprintf(out, n, "[%s]:%u", a, (unsigned)ntohs(v6->sin6_port));
    } else {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)(const void *)&svc->addr;
        inet_ntop(AF_INET, &v4->sin_addr, a, sizeof a);
        snprintf(out, n, "%s:%u", a, (unsigned)ntohs(v4->sin_port));
    }
}

/* A client's upgrade request, with a fresh key whose answer it keeps. */
static int client_request(ws_filter *f)
{
    ws_client *c = client_of(f);
    uint8_t nonce[16];
    if (cp__ws_random(nonce, sizeof nonce) < 0 || cp__ws_random(&c->rnd, sizeof c->rnd) < 0)
        return -EIO;
    if (!c->rnd)
        c->rnd = 0x9e3779b9u; /* xorshift must not start at 0 */
    char key[25];
    cp__ws_base64(nonce, sizeof nonce, key);
    if (cp__ws_accept_key(key, f->x->up->accept) < 0)
        return -EIO;
    char host[96], req[640];
    host_of(f, host, sizeof host);
    const char *proto = ws_kind(f)->subprotocol;
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s%s%s\r\n",
                     ws_kind(f)->path ? ws_kind(f)->path : "/", host, key,
                     proto ? "Sec-WebSocket-Protocol: " : "", proto ? proto : "", proto ? "\r\n" : "");
    if (n < 0 || (size_t)n >= sizeof req)
        return -EINVAL;
    return own_bytes(f, req, (size_t)n) ? 0 : -ENOMEM;
}

/* The server did not upgrade: the connect failed (on_connect_failed). */
static void client_fail(ws_filter *f, int err)
{
    upgrade_drop(f);
    f->flags |= F_FAILED;
    cp__session_close(f->base.s, CP_REASON_WEBSOCKET, err);
}

/* The server's 101: checked as RFC 6455 asks. True if the session is up. */
static bool client_answer(ws_filter *f)
{
    upgrade *u = f->x->up;
    const char *up = value(u, H_UPGRADE), *acc = value(u, H_ACCEPT), *ext = value(u, H_EXTENSIONS);
    const char *proto = value(u, H_PROTOCOL), *want = ws_kind(f)->subprotocol;
    if (u->p.status_code != 101) {
        client_fail(f, -ECONNREFUSED);
        return false;
    }
    /* Upgrade and Connection must name the upgrade (RFC 6455 4.1; llhttp's
     * flag says Connection has the token); an extension or subprotocol we
     * did not ask for is a failure too. */
    if (!llhttp_get_upgrade(&u->p) || !has_token(up, "websocket") || strcmp(acc, u->accept) != 0 || *ext ||
        strcmp(proto, want ? want : "") != 0) {
        client_fail(f, -EPROTO);
        return false;
    }
    upgrade_drop(f);
    f->flags |= F_OPEN;
    pings_start(f);
    cp__filter_up(&f->base); /* on_connected */
    return connected(f->base.s);
}

static size_t frames_input(ws_filter *f, uint8_t *p, size_t n);

/* The request (or a client's answer) is read: true if it upgraded. */
static bool upgrade_done(ws_filter *f) { return is_client(f) ? client_answer(f) : upgrade_answer(f); }

static size_t upgrade_input(ws_filter *f, uint8_t *p, size_t n)
{
    upgrade *u = f->x->up;
    uint32_t cap = ws_kind(f)->o.max_request;
    size_t room = cap - u->seen;
    size_t take = n < room ? n : room;
    llhttp_errno_t e = take ? llhttp_execute(&u->p, (const char *)p, take) : HPE_OK;
    if (e == HPE_PAUSED_UPGRADE) {
        size_t used = (size_t)((const uint8_t *)llhttp_get_error_pos(&u->p) - p);
        if (!upgrade_done(f))
            return 0;
        return frames_input(f, p + used, n - used);
    }
    if (e == HPE_PAUSED) { /* a whole request (or answer) that is no upgrade */
        upgrade_done(f);
        return 0;
    }
    u->seen += (uint32_t)take;
    if (e == HPE_OK && take == n && u->seen < cap)
        return 0; /* more to come */
    if (is_client(f))
        client_fail(f, -EPROTO);
    else
        http_refuse(f, e == HPE_OK ? 431 : 400, NULL, NULL);
    return 0;
}

/* ------------------------------------------------------------------ frames */

static void on_ping_timer(cp_worker *w, void *arg);

/* The side state, made on first need; NULL when out of memory. */
static ws_side *side_get(ws_filter *f)
{
    if (f->x)
        return f->x;
    ws_side *x = cp__zalloc(sizeof *x);
    if (!x)
        return NULL;
    x->ping.fn = on_ping_timer;
    x->ping.arg = f;
    x->ping.heap_index = UINT32_MAX;
    return f->x = x;
}

/* Nothing needs the side state any more: it goes (an idle server session
 * without pings keeps none). */
static void side_release(ws_filter *f)
{
    ws_side *x = f->x;
    if (!x || x->up || x->ctl_len || ws_kind(f)->o.ping_interval_ms || has(f, F_CLOSE_DUE) ||
        (has(f, F_IN_PAYLOAD) && frame_op(f) >= OP_CLOSE))
        return;
    cp__free(x);
    f->x = NULL;
}

/* XORs the mask over n payload bytes at p, eight at a time: the mask
 * repeats every four bytes, so from phase k the same eight-byte word
 * serves every step. */
static void unmask(ws_filter *f, uint8_t *p, size_t n)
{
    unsigned k = f->mpos;
    size_t i = 0;
    if (n >= 16) {
        uint8_t m8[8];
        for (unsigned j = 0; j < 8; j++)
            m8[j] = f->mask[(k + j) & 3];
        uint64_t m, v;
        memcpy(&m, m8, 8);
        for (; i + 8 <= n; i += 8) {
            memcpy(&v, p + i, 8);
            v ^= m;
            memcpy(p + i, &v, 8);
        }
    }
    for (; i < n; i++)
        p[i] ^= f->mask[k++ & 3];
    f->mpos = (uint8_t)(k & 3);
}

static bool close_code_valid(uint16_t c)
{
    return (c >= 1000 && c <= 1003) || (c >= 1007 && c <= 1014) || (c >= 3000 && c <= 4999);
}

/* The peer's Close: answered with its code, then the graceful close. */
static void on_close_frame(ws_filter *f)
{
    const ws_side *x = f->x;
    if (x->ctl_len == 1) {
        ws_fail(f, WS_PROTOCOL);
        return;
    }
    uint16_t code = 0;
    if (x->ctl_len >= 2) {
        code = (uint16_t)(x->ctl[0] << 8 | x->ctl[1]);
        if (!close_code_valid(code)) {
            ws_fail(f, WS_PROTOCOL);
            return;
        }
        if (utf8_run(UTF8_OK, x->ctl + 2, x->ctl_len - 2u) != UTF8_OK) {
            ws_fail(f, WS_BAD_DATA);
            return;
        }
    }
    /* Answered at the drain's end, after what was sent before, as in ws_fail. */
    f->flags |= F_FAILED; /* nothing after a Close counts */
    if (!close_after_drain(f, code, CP_REASON_PEER_CLOSED) && !has(f, F_CLOSE_SENT))
        (void)send_close(f, code); /* draining already, or out of memory: at once */
}

static void frame_end(ws_filter *f)
{
    f->flags &= (uint8_t)~F_IN_PAYLOAD;
    f->hlen = 0;
    uint8_t op = frame_op(f);
    if (op >= OP_CLOSE) {
        ws_side *x = f->x;
        if (op == OP_PING) {
            if (!has(f, F_CLOSE_SENT))
                control(f, OP_PONG, x->ctl, x->ctl_len);
        } else if (op == OP_PONG) {
            f->flags |= F_PONG_SEEN;
        } else {
            on_close_frame(f);
        }
        x->ctl_len = 0;
        return;
    }
    if (!(f->h0 & 0x80)) /* not the message's last frame */
        return;
    if (f->msg_op == OP_TEXT && f->utf8 != UTF8_OK) {
        ws_fail(f, WS_BAD_DATA);
        return;
    }
    f->msg_op = 0;
    f->msg_len = 0;
}

/* The largest message the session takes. */
static uint32_t max_message(const ws_filter *f)
{
    const cp_ws *ws = ws_kind(f);
    return ws->o.max_message ? ws->o.max_message : atomic_load(&f->base.s->svc)->max_packet;
}

/* The frame's header is whole: check it. False if the session ends. */
static bool frame_begin(ws_filter *f, uint64_t len)
{
    uint8_t b0 = f->h0, op = frame_op(f);
    bool fin = b0 >> 7;
    if (b0 & 0x70) { /* reserved bits, and no extension to give them a meaning */
        ws_fail(f, WS_PROTOCOL);
        return false;
    }
    if (op >= OP_CLOSE) {
        if (op > OP_PONG || !fin || len > CTL_MAX) {
            ws_fail(f, WS_PROTOCOL);
            return false;
        }
        if (!side_get(f)) {
            cp__session_close(f->base.s, CP_REASON_NO_MEMORY, -ENOMEM);
            return false;
        }
    } else if (op > OP_BINARY || (op == OP_CONT) != (f->msg_op != 0)) {
        /* a reserved opcode, a continuation of nothing, a new message inside
         * an unfinished one */
        ws_fail(f, WS_PROTOCOL);
        return false;
    } else {
        if (op != OP_CONT) {
            if (op == OP_TEXT && !ws_kind(f)->o.allow_text) {
                ws_fail(f, WS_UNSUPPORTED);
                return false;
            }
            f->msg_op = op;
            f->utf8 = UTF8_OK;
        }
        if (len > max_message(f) - f->msg_len) {
            ws_fail(f, WS_TOO_BIG);
            return false;
        }
        f->msg_len += (uint32_t)len;
    }
    f->mpos = 0;
    f->left = len;
    f->flags |= F_IN_PAYLOAD;
    return true;
}

/* The header's length, once its second byte is in: 2, the extended
 * length, and a client's mask. */
static uint8_t header_need(const ws_filter *f, bool masked)
{
    uint8_t l7 = f->h1 & 0x7f;
    return (uint8_t)(2 + (l7 == 126 ? 2 : l7 == 127 ? 8 : 0) + (masked ? 4 : 0));
}

static bool header_whole(const ws_filter *f, bool masked)
{
    return f->hlen >= 2 && f->hlen == header_need(f, masked);
}

/* Header bytes from p, kept as they come (no copy of the header is
 * needed); returns how many it took, and sets *ok when the header is whole
 * and checked. */
static size_t header_take(ws_filter *f, const uint8_t *p, size_t n, bool *ok)
{
    bool masked = !is_client(f); /* a client's frames are masked, a server's are not */
    size_t used = 0;
    *ok = false;
    if (f->hlen == 0 && n >= 2) { /* the usual case: the whole header is here */
        f->h1 = p[1];
        size_t need = header_need(f, masked);
        if (n >= need) {
            f->h0 = p[0];
            if (!(p[1] & 0x80) == masked) {
                ws_fail(f, WS_PROTOCOL);
                return 2;
            }
            size_t ext = need - 2 - (masked ? 4 : 0);
            f->left = 0;
            for (size_t i = 0; i < ext; i++)
                f->left = f->left << 8 | p[2 + i];
            if (masked)
                memcpy(f->mask, p + 2 + ext, 4);
            f->hlen = (uint8_t)need;
            used = need;
        }
    }
    while (used < n && !header_whole(f, masked)) {
        uint8_t c = p[used++], i = f->hlen++;
        if (i == 0) {
            f->h0 = c;
            f->left = 0;
            continue;
        }
        if (i == 1) {
            f->h1 = c;
            if (!(c & 0x80) == masked) {
                ws_fail(f, WS_PROTOCOL);
                return used;
            }
        } else if (i < header_need(f, masked) - (masked ? 4 : 0)) {
            f->left = f->left << 8 | c;
        } else {
            f->mask[i - (header_need(f, masked) - 4)] = c;
        }
    }
    if (!header_whole(f, masked))
        return used;
    uint8_t l7 = f->h1 & 0x7f;
    uint64_t len = l7 < 126 ? l7 : f->left;
    if (l7 == 127 && len >> 63) {
        ws_fail(f, WS_PROTOCOL);
        return used;
    }
    *ok = frame_begin(f, len);
    return used;
}

static size_t frames_input(ws_filter *f, uint8_t *p, size_t n)
{
    size_t packets = 0;
    cp_session *s = f->base.s;
    bool masked = !is_client(f);
    while (n && !has(f, F_FAILED) && connected(s)) {
        if (!has(f, F_IN_PAYLOAD)) {
            bool ok;
            size_t used = header_take(f, p, n, &ok);
            p += used;
            n -= used;
            if (!ok)
                continue; /* more header to come, or the session ends */
            if (!f->left)
                frame_end(f);
            continue;
        }
        size_t take = f->left < n ? (size_t)f->left : n;
        if (masked)
            unmask(f, p, take); /* in place: the backend lends its buffer to the call */
        if (frame_op(f) >= OP_CLOSE) {
            /* NOLINTNEXTLINE(clang-analyzer-core.NullDereference): frame_begin made x for a control frame */
            memcpy(f->x->ctl + f->x->ctl_len, p, take);
            f->x->ctl_len = (uint8_t)(f->x->ctl_len + take);
        } else {
            if (f->msg_op == OP_TEXT && (f->utf8 = utf8_run(f->utf8, p, take)) == UTF8_BAD) {
                ws_fail(f, WS_BAD_DATA);
                break;
            }
            packets += cp__filter_pass(&f->base, p, take);
        }
        p += take;
        n -= take;
        f->left -= take;
        if (!f->left)
            frame_end(f);
    }
    return packets;
}

static size_t ws_input(cp_filter *bf, const uint8_t *data, size_t n)
{
    ws_filter *f = ws_of(bf);
    /* The bytes are the backend's receive buffer (or TLS's plaintext),
     * lent to this call and written by no one else: unmasking in place is
     * what the backend contract allows (port/backend.h). */
    uint8_t *p = (uint8_t *)(uintptr_t)data;
    if (has(f, F_FAILED))
        return 0;
    size_t packets = f->x && f->x->up ? upgrade_input(f, p, n) : frames_input(f, p, n);
    side_release(f);
    return packets;
}

/* ------------------------------------------------------------------ pings */

static void on_ping_timer(cp_worker *w, void *arg)
{
    ws_filter *f = arg;
    if (!connected(f->base.s) || has(f, F_FAILED))
        return;
    if (!has(f, F_PONG_SEEN)) {
        ws_fail(f, WS_POLICY);
        return;
    }
    f->flags &= (uint8_t)~F_PONG_SEEN;
    if (control(f, OP_PING, NULL, 0))
        cp__timer_arm(w, &f->x->ping, ws_kind(f)->o.ping_interval_ms);
}

/* ------------------------------------------------------------------ the filter */

/* A server's filters are small and many: a slab keeps them packed. */
static cp_slab filter_slab = CP_SLAB_INIT(sizeof(ws_filter));

static cp_filter *ws_attach(cp_filter_kind *k, cp_session *s)
{
    CP_UNUSED(k);
    if (!s->is_client) {
        ws_filter *f = cp__slab_alloc(&filter_slab);
        if (f)
            f->base.s = s;
        return f ? &f->base : NULL;
    }
    ws_client *c = cp__zalloc(sizeof *c);
    if (!c)
        return NULL;
    c->f.base.s = s;
    return &c->f.base;
}

static int ws_start(cp_filter *bf)
{
    ws_filter *f = ws_of(bf);
    pthread_once(&http_once, http_settings_make);
    ws_side *x = side_get(f);
    upgrade *u = x ? cp__zalloc(sizeof *u) : NULL;
    if (!u)
        return -ENOMEM;
    llhttp_init(&u->p, is_client(f) ? HTTP_RESPONSE : HTTP_REQUEST, &http_settings);
    u->cur = H_N;
    x->up = u;
    if (is_client(f)) {
        int r = client_request(f);
        if (r < 0)
            return r;
    }
    return 0;
}

static void ws_detach(cp_filter *bf)
{
    ws_filter *f = ws_of(bf);
    if (f->x) {
        cp__timer_cancel(bf->s->owner, &f->x->ping);
        upgrade_drop(f);
        cp__free(f->x);
    }
    if (!is_client(f)) {
        cp__slab_free(&filter_slab, f);
        return;
    }
    cp__free(client_of(f));
}

static cp_sendq *ws_wire(cp_filter *bf)
{
    ws_filter *f = ws_of(bf);
    return is_client(f) ? &client_of(f)->wire : NULL;
}

static void kind_ref(cp_filter_kind *k) { cp_ws_ref((cp_ws *)(void *)k); }
static void kind_unref(cp_filter_kind *k) { cp_ws_unref((cp_ws *)(void *)k); }

static const cp_filter_ops ws_ops = {
    .attach = ws_attach,
    .wire = ws_wire,
    .start = ws_start,
    .input = ws_input,
    .encode = ws_encode,
    .finish = ws_finish,
    .closing = ws_closing,
    .detach = ws_detach,
    .kind_ref = kind_ref,
    .kind_unref = kind_unref,
};

/* ------------------------------------------------------------------ public */

static char *dup_or_null(const char *s, bool *bad)
{
    if (!s)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = cp__malloc(n);
    if (!d)
        *bad = true;
    else
        memcpy(d, s, n);
    return d;
}

static void ws_free(cp_ws *ws)
{
    cp__free(ws->path);
    cp__free(ws->subprotocol);
    cp__free(ws->page);
    cp__free(ws->host);
    if (ws->origins)
        for (char **o = ws->origins; *o; o++)
            cp__free(*o);
    cp__free(ws->origins);
    cp__free(ws);
}

int cp_ws_create(cp_ws **out, const cp_ws_opts *o)
{
    if (!out || !o)
        return -EINVAL;
    *out = NULL;
    if ((o->max_request && o->max_request < 64) || (o->path && o->path[0] != '/') ||
        (o->subprotocol && !o->subprotocol[0]))
        return -EINVAL;
    cp_ws *ws = cp__zalloc(sizeof *ws);
    if (!ws)
        return -ENOMEM;
    atomic_init(&ws->refs, 1);
    ws->kind.ops = &ws_ops;
    ws->kind.handshake_ms = o->upgrade_timeout_ms ? o->upgrade_timeout_ms : UPGRADE_MS_DEFAULT;
    ws->kind.fail_reason = CP_REASON_WEBSOCKET;
    ws->o = *o;
    if (!ws->o.max_request)
        ws->o.max_request = MAX_REQUEST_DEFAULT;
    bool bad = false;
    ws->path = dup_or_null(o->path, &bad);
    ws->subprotocol = dup_or_null(o->subprotocol, &bad);
    ws->page = dup_or_null(o->page, &bad);
    ws->host = dup_or_null(o->host, &bad);
    if (o->origins) {
        size_t n = 0;
        while (o->origins[n])
            n++;
        ws->origins = cp__calloc(n + 1, sizeof *ws->origins);
        bad |= !ws->origins;
        for (size_t i = 0; ws->origins && i < n; i++)
            ws->origins[i] = dup_or_null(o->origins[i], &bad);
    }
    if (bad) {
        ws_free(ws);
        return -ENOMEM;
    }
    ws->o.path = ws->path;
    ws->o.subprotocol = ws->subprotocol;
    ws->o.page = ws->page;
    ws->o.origins = (const char *const *)ws->origins;
    *out = ws;
    return 0;
}

void cp_ws_ref(cp_ws *ws) { atomic_fetch_add_explicit(&ws->refs, 1, memory_order_relaxed); }

void cp_ws_unref(cp_ws *ws)
{
    if (ws && atomic_fetch_sub_explicit(&ws->refs, 1, memory_order_acq_rel) == 1)
        ws_free(ws);
}
