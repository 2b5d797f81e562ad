/* SPDX-License-Identifier: MIT */
/*
 * Framing: {u16 size, u16 id} little-endian, size counting the 4-byte header.
 *
 * Received bytes arrive in a buffer the backend lends for one call, so whole
 * packets are handed to handlers straight from it. Only the bytes of a packet
 * that is not complete yet are copied, into the session's carry buffer, which
 * is sized to that one packet and released as soon as it has been handled: a
 * session between packets holds no receive memory at all.
 *
 * The encoder is here too, beside the decoder (the end of the file): a
 * packet is a send buffer with the header written in place.
 */
#include "net/net.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Raw mode keeps at most this many unconsumed bytes (or max_packet if larger). */
#define RAW_CARRY_MIN (64u * 1024u)

static bool still_connected(const cp_session *s) { return atomic_load(&s->state) == CP_S_CONNECTED; }

/* An unfinished packet (raw mode: bytes on_recv left) begins in this receive:
 * its partial-packet clock starts now. */
static void partial_started(cp_session *s)
{
    s->pkt_start_ns = s->owner->now_ns;
    cp__session_packet_started(s);
}

/* A carry of a page or more is a run of pages (pages.c): under a burst
 * every session's carry comes and goes with its partial packets, and in
 * malloc's heap they were what still churned, keeping a worker's arena
 * resident after the burst. A smaller one (a header, a small packet's
 * start) is malloc's, so that thousands of sessions each waiting on a few
 * bytes do not take a page each. */
static uint8_t *carry_alloc(size_t cap) { return cap >= CP_PAGE ? cp__pages_get(cap) : cp__malloc(cap); }

void cp__carry_free(uint8_t *c, size_t cap)
{
    if (cap >= CP_PAGE)
        cp__pages_put(c, cap);
    else
        cp__free(c);
}

static bool carry_reserve(cp_session *s, size_t cap)
{
    if (s->carry_cap >= cap)
        return true;
    if (cap >= CP_PAGE)
        cap = cp__pages_round(cap);
    uint8_t *c = carry_alloc(cap);
    if (!c) {
        cp__session_close(s, CP_REASON_NO_MEMORY, -ENOMEM);
        return false;
    }
    if (s->carry_len)
        /* NOLINTNEXTLINE(clang-analyzer-core.NonNullParamChecker): carry_len > 0 means carry is allocated */
        memcpy(c, s->carry, s->carry_len);
    cp__carry_free(s->carry, s->carry_cap);
    s->carry = c;
    s->carry_cap = (uint32_t)cap;
    return true;
}

static void carry_release(cp_session *s)
{
    cp__carry_free(s->carry, s->carry_cap);
    s->carry = NULL;
    s->carry_len = s->carry_cap = 0;
}

/* Validates a header; returns the packet size, or 0 after closing the session. */
static size_t header_size(cp_session *s, const uint8_t *hdr)
{
    size_t size = cp_get_u16(hdr);
    if (size < CP_PACKET_HEADER) {
        cp__session_close(s, CP_REASON_BAD_HEADER, -EPROTO);
        return 0;
    }
    if (size > s->svc->max_packet) {
        cp__session_close(s, CP_REASON_TOO_BIG, -EMSGSIZE);
        return 0;
    }
    return size;
}

/* Hands one packet to its handler. Returns false if the session is closing. */
static bool dispatch(cp_session *s, const uint8_t *pkt, size_t size)
{
    /* The first packet's deadline is gone; the timer, if armed for it,
     * moves on when it fires. */
    s->first_seen = true;
    cp_service *svc = s->svc;
    uint16_t id = cp_get_u16(pkt + 2);
    cp__route_count(s, id);
    cp_packet_fn fn = id < svc->nroutes ? svc->routes[id] : NULL;
    if (!fn)
        fn = svc->h.on_packet;
    if (fn && fn(s, id, pkt + CP_PACKET_HEADER, size - CP_PACKET_HEADER) < 0) {
        cp__session_close(s, CP_REASON_HANDLER, 0);
        return false;
    }
    return still_connected(s);
}

/* Pauses that a handler (or the packet rate limit) decides while a receive is
 * being handled take effect at once: the rest of the receive waits. The
 * fair share is counted per receive, so it never stops one halfway. */
#define STOP_BITS (CP_RX_SENDQ | CP_RX_QUEUE | CP_RX_RATE)

/* The receive's bytes from p on wait in carry (the backlog) until the session
 * is read again. At most the rest of one receive. */
static void backlog_keep(cp_session *s, const uint8_t *p, size_t n)
{
    if (!n || !carry_reserve(s, n))
        return;
    /* NOLINTNEXTLINE(clang-analyzer-core.NonNullParamChecker): carry_reserve succeeded: carry is allocated */
    memcpy(s->carry, p, n);
    s->carry_len = (uint32_t)n;
    s->rx_backlog = true;
    s->pkt_start_ns = s->owner->now_ns; /* waiting is not the peer's doing */
}

/* Where parsing a receive has got to: the bytes not parsed yet, and how many
 * packets were handed to handlers. */
typedef struct rx_cursor {
    const uint8_t *p;
    size_t n;
    uint64_t packets;
} rx_cursor;

/* Moves bytes from the front of the receive to the end of carry until carry
 * holds `want` (or the receive runs out). True once carry holds `want`. */
static bool carry_fill(cp_session *s, rx_cursor *c, size_t want)
{
    size_t take = want - s->carry_len;
    if (take > c->n)
        take = c->n;
    memcpy(s->carry + s->carry_len, c->p, take);
    s->carry_len += (uint32_t)take;
    c->p += take;
    c->n -= take;
    return s->carry_len >= want;
}

/* A pause decided while this receive was being handled keeps the rest of it
 * (the bytes at c) in the backlog. True if it did. */
static bool pause_taken(cp_session *s, const rx_cursor *c)
{
    if (!(s->rx_block & STOP_BITS))
        return false;
    backlog_keep(s, c->p, c->n);
    return true;
}

/* The packet finished in carry is over a rate: it stays there, with the
 * rest of the receive (the bytes at c) behind it, as the backlog. */
static void carry_backlog(cp_session *s, const rx_cursor *c)
{
    size_t have = s->carry_len;
    if (!carry_reserve(s, have + c->n))
        return;
    if (c->n)
        memcpy(s->carry + have, c->p, c->n);
    s->carry_len = (uint32_t)(have + c->n);
    s->rx_backlog = true;
    s->pkt_start_ns = s->owner->now_ns; /* waiting is not the peer's doing */
}

/* Finishes the packet started by an earlier receive, from the front of this
 * one, and hands it to its handler. False if parsing stops here: the packet
 * is still incomplete, or the session is closing or paused. */
static bool carry_finish(cp_session *s, rx_cursor *c)
{
    if (s->carry_len < CP_PACKET_HEADER && !carry_fill(s, c, CP_PACKET_HEADER))
        return false;
    size_t size = header_size(s, s->carry);
    if (!size || !carry_reserve(s, size) || !carry_fill(s, c, size))
        return false;
    uint16_t id = cp_get_u16(s->carry + 2);
    if (cp__rx_limited(s->svc, id) && !cp__rx_rate_packet(s, id)) {
        if (still_connected(s))
            carry_backlog(s, c); /* over the rate: the packet and the rest wait */
        return false;
    }
    c->packets++;
    bool ok = dispatch(s, s->carry, size);
    if (s->carry) /* the handler may have closed the session, which frees it */
        carry_release(s);
    return ok && !pause_taken(s, c);
}

/* Hands the whole packets at the front of the receive to their handlers,
 * stopping at an incomplete one (for which carry is reserved). False if
 * parsing stops here: the session is closing or paused. */
static bool whole_packets(cp_session *s, rx_cursor *c)
{
    while (c->n >= CP_PACKET_HEADER) {
        size_t size = header_size(s, c->p);
        if (!size)
            return false;
        if (c->n < size)
            return carry_reserve(s, size);
        uint16_t id = cp_get_u16(c->p + 2);
        if (cp__rx_limited(s->svc, id) && !cp__rx_rate_packet(s, id)) {
            if (still_connected(s))          /* not cut as a flooder */
                backlog_keep(s, c->p, c->n); /* this packet is over the rate: it waits */
            return false;
        }
        c->packets++;
        if (!dispatch(s, c->p, size))
            return false;
        c->p += size;
        c->n -= size;
        if (pause_taken(s, c))
            return false;
    }
    return true;
}

/* The incomplete packet at the end of the receive waits in carry. */
static void tail_keep(cp_session *s, const rx_cursor *c)
{
    if (c->n) {
        if (!carry_reserve(s, c->n > CP_PACKET_HEADER ? c->n : CP_PACKET_HEADER))
            return;
        memcpy(s->carry, c->p, c->n);
        s->carry_len = (uint32_t)c->n;
    }
    /* A packet that began in this receive starts the partial-packet clock
     * (one that began earlier was finished first, or parsing stopped). */
    if (s->carry_len)
        partial_started(s);
}

static size_t packet_parse(cp_session *s, const uint8_t *p, size_t n)
{
    rx_cursor c = { p, n, 0 };
    if ((!s->carry_len || carry_finish(s, &c)) && whole_packets(s, &c))
        tail_keep(s, &c);
    if (c.packets)
        cp__traffic_add(&cp__traffic(s->svc, s->owner)->packets_in, c.packets);
    return c.packets;
}

static size_t raw_deliver(cp_session *s, const uint8_t *p, size_t n)
{
    size_t (*on_recv)(cp_session *, const uint8_t *, size_t) = s->svc->h.on_recv;
    size_t used = on_recv ? on_recv(s, p, n) : n;
    return used > n ? n : used;
}

static void raw_input(cp_session *s, const uint8_t *p, size_t n)
{
    s->first_seen = true; /* raw framing: bytes count as the first packet */
    size_t limit = s->svc->raw_limit                    ? s->svc->raw_limit
                   : s->svc->max_packet > RAW_CARRY_MIN ? s->svc->max_packet
                                                        : RAW_CARRY_MIN;
    if (s->carry_len) {
        if (s->carry_len + n > limit) {
            cp__session_close(s, CP_REASON_TOO_BIG, -EMSGSIZE);
            return;
        }
        if (!carry_reserve(s, s->carry_len + n))
            return;
        memcpy(s->carry + s->carry_len, p, n);
        s->carry_len += (uint32_t)n;
        size_t used = raw_deliver(s, s->carry, s->carry_len);
        if (!still_connected(s))
            return;
        if (used == s->carry_len) {
            carry_release(s);
        } else if (used) {
            memmove(s->carry, s->carry + used, s->carry_len - used);
            s->carry_len -= (uint32_t)used;
            partial_started(s);
        }
        return;
    }
    size_t used = raw_deliver(s, p, n);
    if (used == n || !still_connected(s))
        return;
    if (n - used > limit) {
        cp__session_close(s, CP_REASON_TOO_BIG, -EMSGSIZE);
        return;
    }
    if (!carry_reserve(s, n - used))
        return;
    memcpy(s->carry, p + used, n - used);
    s->carry_len = (uint32_t)(n - used);
    partial_started(s);
}

/* Handles the backlog (with any bytes that arrived behind it) unless the
 * session is paused again; what is left stays in carry, in order. */
static size_t backlog_run(cp_session *s)
{
    uint8_t *buf = s->carry;
    size_t len = s->carry_len, cap = s->carry_cap;
    s->carry = NULL;
    s->carry_len = s->carry_cap = 0;
    s->rx_backlog = false;
    size_t packets = packet_parse(s, buf, len);
    cp__carry_free(buf, cap);
    return packets;
}

static size_t packet_input(cp_session *s, const uint8_t *p, size_t n)
{
    if (!s->rx_backlog)
        return packet_parse(s, p, n);
    /* Bytes behind a backlog (delivered after the pause was decided) queue
     * behind it. */
    if (!carry_reserve(s, (size_t)s->carry_len + n))
        return 0;
    memcpy(s->carry + s->carry_len, p, n);
    s->carry_len += (uint32_t)n;
    return s->rx_block & STOP_BITS ? 0 : backlog_run(s);
}

void cp__session_backlog(cp_session *s)
{
    if (!s->rx_backlog || s->rx_block || !still_connected(s))
        return;
    cp_worker *w = s->owner;
    cp_feeder *outer = w->feeder;
    w->feeder = &s->feeder;
    backlog_run(s);
    w->feeder = outer;
}

size_t cp__session_input(cp_session *s, const uint8_t *data, size_t n)
{
    if (s->svc->framing == CP_FRAMING_RAW) {
        raw_input(s, data, n);
        return 0;
    }
    return packet_input(s, data, n);
}

/* ------------------------------------------------------------------ encoder */

/* A packet buffer is a send buffer whose first CP_PACKET_HEADER bytes are the
 * header: the id is written at open, the size at close, when it is known.
 * cp_packet_make opens one as a shortcut (allowed while the user has a buffer
 * open), cp_packet_open as the user's one open buffer. */
static cp_sendbuf *packet_open(uint16_t id, size_t body_cap, bool for_user)
{
    if (body_cap > CP_PACKET_MAX - CP_PACKET_HEADER)
        return NULL;
    size_t cap = CP_PACKET_HEADER + body_cap;
    cp_sendbuf *b = for_user ? cp_sendbuf_open(cap) : cp__sendbuf_open(cap);
    if (!b)
        return NULL;
    cp_put_u16(b->data + 2, id);
    return b;
}

cp_sendbuf *cp_packet_open(uint16_t id, size_t body_cap) { return packet_open(id, body_cap, true); }

uint8_t *cp_packet_body(cp_sendbuf *b) { return b->data + CP_PACKET_HEADER; }

/* Writes the header's size for a body of body_len; the packet's length, or
 * 0 when the body is more than was reserved: the caller's length is wrong,
 * or it wrote past the buffer. Neither a clipped body nor the bytes past the
 * capacity may go out under a header that claims them, so the buffer then
 * closes empty (sending it sends nothing) and the caller hears why. */
static size_t packet_seal(cp_sendbuf *b, size_t body_len)
{
    if (b->cap < CP_PACKET_HEADER || body_len > b->cap - CP_PACKET_HEADER)
        return 0;
    size_t size = CP_PACKET_HEADER + body_len; /* <= CP_PACKET_MAX: cap was checked at open */
    cp_put_u16(b->data, (uint16_t)size);
    return size;
}

int cp_packet_close(cp_sendbuf *b, size_t body_len)
{
    if (!b)
        return -EINVAL;
    size_t size = packet_seal(b, body_len);
    cp_sendbuf_close(b, size);
    return size ? 0 : -EMSGSIZE;
}

cp_sendbuf *cp_packet_make(uint16_t id, const void *body, size_t body_len)
{
    cp_sendbuf *b = packet_open(id, body_len, false);
    if (!b)
        return NULL;
    if (body_len)
        memcpy(cp_packet_body(b), body, body_len);
    cp__sendbuf_close(b, packet_seal(b, body_len)); /* cannot fail: body_len is the capacity */
    return b;
}
