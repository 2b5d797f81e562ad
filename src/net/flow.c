/* SPDX-License-Identifier: MIT */
/*
 * Receive flow control: when a session is not read.
 *
 * Memory that grows with a peer's input must have a bound, and the pressure
 * at that bound must go back to the peer, not into a queue: so the answer to
 * "too much" is to stop reading the session that brings it. Its bytes then
 * wait in its socket buffer and its TCP window closes; the peer's sends block,
 * and nothing it sends costs this process anything until it is read again.
 * Readers that keep up are never cut for it. Three reasons pause a session's
 * receive, each a bit of rx_block; it reads again when none holds:
 *
 * - RATE: a receive rate limit (packets/s and bytes/s, each with a burst,
 *   and packets/s of one id: flood control, below) is spent. The limit is a
 *   GCRA, the token bucket written as a time: each
 *   packet (byte) moves the theoretical arrival time on by 1/rate, and the
 *   peer is over its burst when that time runs more than burst/rate ahead of
 *   now. A receive is always consumed whole (it may run ahead by one
 *   receive's worth); then the session rests until half its burst is back,
 *   so a flooder costs one pause and one resume per half burst.
 * - SENDQ: its send queue is above the high watermark: it is not read until
 *   the queue is back below the low one. A peer that sends requests without
 *   reading the replies is then throttled by its own window, and only a peer
 *   that stops reading altogether reaches the queue's limit and is cut.
 * - QUEUE: a job queue its handlers pushed to is over its bound (jobq.c):
 *   it is read again when that queue is back below its low mark.
 * - SHARE: it has had its fair share of this worker's round (SHARE_BYTES):
 *   the rest waits for the next round, after this round's writes, so one fast
 *   sender cannot fill queues with a whole ring's worth of input in one go or
 *   hold up its neighbours.
 *
 * Time the receive spends paused does not count against the peer: an
 * unfinished packet's clock (packet timeout) moves on by the pause, and a
 * session paused by its rate limit or share is not idle. A session paused by
 * its own send queue is: its peer is not reading.
 */
#include "net/net.h"

#include <errno.h>
#include <stdlib.h>

/* Input one session may bring in one round: four of epoll's 64 KiB reads,
 * eight of io_uring's 32 KiB buffers. */
#define SHARE_BYTES (256u * 1024u)
#define NS_PER_S UINT64_C(1000000000)

static void rx_pause(cp_session *s)
{
    cp_worker *w = s->owner;
    s->rx_turned_ns = w->now_ns;
    w->port->be->recv_pause(w, &s->h);
}

static void rx_resume(cp_session *s)
{
    cp_worker *w = s->owner;
    uint64_t now = cp__now_ns();
    /* The peer could not finish a packet while it was not read (a packet
     * may also have begun in bytes delivered after the pause). */
    uint64_t since = s->pkt_start_ns > s->rx_turned_ns ? s->pkt_start_ns : s->rx_turned_ns;
    if (s->carry_len && now > since)
        s->pkt_start_ns += now - since;
    s->rx_turned_ns = now; /* flood control's calm (flood_calm) */
    w->port->be->recv_resume(w, &s->h);
}

/* Connected, or in a filter's handshake (which reads too). */
bool cp__session_reading(const cp_session *s)
{
    int st = atomic_load_explicit(&s->state, memory_order_relaxed);
    return (st == CP_S_CONNECTED || st == CP_S_HANDSHAKING) && s->h.fd >= 0;
}

void cp__rx_block(cp_session *s, unsigned why)
{
    if (!cp__session_reading(s) || (s->rx_block & why))
        return;
    if (!s->rx_block)
        rx_pause(s);
    s->rx_block |= (uint8_t)why;
}

static void msg_backlog(cp_worker *w, void *sp, void *unused, uintptr_t c)
{
    CP_UNUSED(w), CP_UNUSED(unused), CP_UNUSED(c);
    cp__session_backlog(sp);
    cp__session_unref(sp);
}

void cp__rx_unblock(cp_session *s, unsigned why)
{
    if (!(s->rx_block & why))
        return;
    /* A peer we did not read for its rate or share was not idle meanwhile:
     * its idle clock starts again now. */
    if (s->rx_block & why & (CP_RX_RATE | CP_RX_SHARE) && s->last_rx_ns < s->owner->now_ns)
        s->last_rx_ns = s->owner->now_ns;
    s->rx_block &= (uint8_t)~why;
    if (!cp__session_reading(s))
        return;
    if (!s->rx_block) {
        rx_resume(s);
        if (s->rx_backlog) {
            /* Handled from a message: this may run inside a send's
             * completion or a timer, where packets must not be dispatched. */
            cp__session_ref(s);
            cp__send_msg(s->owner, msg_backlog, s, NULL);
        }
    }
    /* The timeouts do not run while paused (session.c): their deadlines
     * are back, or the idle one is now that only the send queue holds. */
    cp__session_timeout_rearm(s);
}

void cp__rx_reset(cp_session *s, bool resume)
{
    cp_worker *w = s->owner;
    if (s->rx_tmo.heap_index != UINT32_MAX)
        cp__timer_cancel(w, &s->rx_tmo);
    bool was = s->rx_block != 0;
    /* A session on the share list stays there (it holds a reference) and is
     * skipped at the round's end. */
    s->rx_block = 0;
    if (was && resume && s->h.fd >= 0)
        w->port->be->recv_resume(w, &s->h);
}

/* ------------------------------------------------------------------ rate */

static void on_rate_rested(cp_worker *w, void *sp)
{
    CP_UNUSED(w);
    cp__rx_unblock(sp, CP_RX_RATE);
}

/* Moves *tat on by n units at rate per second; returns how far past the
 * burst window it now runs ahead of now (0: within the burst). */
static uint64_t gcra_take(uint64_t *tat, uint64_t now, uint64_t n, uint32_t rate, uint64_t window)
{
    uint64_t t = *tat > now ? *tat : now;
    t += n * NS_PER_S / rate;
    *tat = t;
    return t - now > window ? t - now - window : 0;
}

/* How far a theoretical arrival time runs ahead of now: the part of the
 * burst window in use. */
static uint64_t ahead_of(uint64_t tat, uint64_t now) { return tat > now ? tat - now : 0; }

/* When the session may read again: when half of the burst is back. */
static uint64_t rested_at(uint64_t tat, uint64_t window) { return tat - window / 2; }

static void rate_rest_until(cp_session *s, uint64_t until)
{
    cp__rx_block(s, CP_RX_RATE);
    if (s->rx_block & CP_RX_RATE)
        cp__timer_arm_at(s->owner, &s->rx_tmo, until);
}

/* ------------------------------------------------------------------ flood */

/*
 * Flood control's second threshold (flood_ms). Throttling alone already
 * bounds what a flooder costs this process; the cut is for the peer that
 * would otherwise be throttled for ever. What tells it from an honest bursty
 * client is not how much arrives at once: a paused session's bytes wait in
 * the kernel, so when it is read again a whole socket buffer of them comes
 * in one go whoever sent them, and a count of packets past the burst would
 * measure the pause rather than the peer. It is that the pressure never
 * lets up. So a session is "over" from the first packet (or receive, for
 * the bytes limit) a limit refuses, and stays over until that same limit
 * finds it calm (flood_calm): the peer has fallen back well under the rate,
 * or it has been read for half a burst's time without being refused. A
 * flooder never is: each time its rest ends (half a burst back) its waiting
 * bytes spend that half at once and are refused again, so it stays over,
 * however its bytes are delivered, and is cut at the first refusal past
 * flood_ms (a rest is cut short to reach that refusal in time). An
 * honest burst of N packets over a burst B is over for about (N - B) / rate
 * seconds and then calm; a peer at or under the rate is never refused at
 * all. The limit that made the session over is remembered (flood_by), so
 * that packets on an id without a limit, or under another limit, cannot
 * make a flooder of one id look calm. Timer lateness can only make a
 * flooder look calm for a moment (delaying its cut), never make an honest
 * peer look over.
 */
#define FLOOD_PKTS 0u  /* the session's packet limit */
#define FLOOD_BYTES 1u /* its byte limit */
#define FLOOD_ID 2u    /* + the index of an id's limit */

/* Whether the session has been read for half a window since its last pause
 * (so, without a refusal): it was not held back meanwhile. */
static bool read_freely(const cp_session *s, uint64_t window)
{
    uint64_t now = s->owner->now_ns;
    return now > s->rx_turned_ns && now - s->rx_turned_ns > window / 2;
}

/* Limit by, of the given window, refused: the session is over from now on,
 * unless it already was. Returns how long it may still be held back before
 * it is cut (UINT64_MAX: flood control is off), or 0 when that time has
 * come: it is closed. An over state that the session has since been read
 * freely through is stale (its limit saw no packet after it to call it
 * calm: a peer that flooded one id and went quiet): a new one begins. */
static uint64_t flood_over(cp_session *s, unsigned by, uint64_t window)
{
    cp_service *svc = s->svc;
    if (!svc->flood_ms)
        return UINT64_MAX;
    /* Milliseconds, truncated to 32 bits: the difference below is right
     * across the wrap for any span under 49 days. */
    uint32_t now = (uint32_t)(s->owner->now_ns / 1000000u) | 1u;
    if (!s->flood_since || read_freely(s, window)) {
        s->flood_since = now;
        s->flood_by = (uint8_t)by;
    }
    uint32_t held = now - s->flood_since;
    if (held < svc->flood_ms)
        return (uint64_t)(svc->flood_ms - held) * 1000000u;
    cp__session_close(s, CP_REASON_FLOOD, 0);
    return 0;
}

/* Limit by took a packet (receive) with ahead of its window already in
 * use: the peer is calm if it has three quarters of the burst to spare, or
 * if it has been read for half a window since its last pause and not been
 * refused meanwhile. The second is for a peer at the rate itself after one
 * burst: GCRA keeps its spare part of the burst where the burst left it
 * (about half, after a rest), so it would never look calm by the first. */
static void flood_calm(cp_session *s, unsigned by, uint64_t ahead, uint64_t window)
{
    if (s->flood_since && s->flood_by == by && (ahead <= window / 4 || read_freely(s, window)))
        s->flood_since = 0;
}

/* A limit refused: throttle the session until half that limit's burst is
 * back, or cut it as a flooder. A rest that would outlast the threshold
 * (a byte limit after one large receive, a slow id's) ends when the
 * threshold is reached instead: the session is read then, and its next
 * refusal cuts it; without that, the cut would wait for the rest. */
static void rate_over(cp_session *s, unsigned by, uint64_t window, uint64_t until)
{
    uint64_t left = flood_over(s, by, window);
    if (!left)
        return;
    /* 1 ms on, so that the truncated milliseconds have reached it. */
    if (left != UINT64_MAX && s->owner->now_ns + left + 1000000u < until)
        until = s->owner->now_ns + left + 1000000u;
    rate_rest_until(s, until);
}

/* The per-id limits' state, at the session's first packet on a limited id:
 * zeroed, every limit's burst is there. */
static bool route_tat_alloc(cp_session *s)
{
    s->route_tat = cp__zalloc(sizeof *s->route_tat * s->svc->nlimits);
    if (s->route_tat)
        return true;
    cp__session_close(s, CP_REASON_NO_MEMORY, -ENOMEM);
    return false;
}

void cp__rx_free(cp_session *s)
{
    cp__free(s->route_tat);
    s->route_tat = NULL;
}

/* Packets are taken one at a time while the receive is handled (packet.c),
 * so a packet over the rate waits in the backlog instead of running up a
 * debt: a single 64 KiB receive of 4-byte packets would otherwise cost a
 * session limited to 10 packets a second half an hour of silence. Both the
 * id's limit and the session's must allow a packet before either is taken,
 * so a refused packet costs neither budget anything. */
bool cp__rx_rate_packet(cp_session *s, uint16_t id)
{
    cp_service *svc = s->svc;
    uint64_t now = s->owner->now_ns;
    const struct cp_id_limit *l = NULL;
    uint32_t li = 0;
    uint64_t ahead_id = 0, ahead_pkts = 0;
    if (id < svc->nlimit_ids && svc->limit_of[id]) {
        li = svc->limit_of[id] - 1u;
        l = &svc->limits[li];
        if (!s->route_tat && !route_tat_alloc(s))
            return false;
        ahead_id = ahead_of(s->route_tat[li], now);
        if (ahead_id > l->win_ns) {
            rate_over(s, FLOOD_ID + li, l->win_ns, rested_at(now + ahead_id, l->win_ns));
            return false;
        }
    }
    if (svc->rate_pkts) {
        ahead_pkts = ahead_of(s->tat_pkts, now);
        if (ahead_pkts > svc->win_pkts_ns) {
            rate_over(s, FLOOD_PKTS, svc->win_pkts_ns, rested_at(now + ahead_pkts, svc->win_pkts_ns));
            return false;
        }
        s->tat_pkts = now + ahead_pkts + svc->pkt_cost_ns;
        flood_calm(s, FLOOD_PKTS, ahead_pkts, svc->win_pkts_ns);
    }
    if (l) {
        s->route_tat[li] = now + ahead_id + l->cost_ns;
        flood_calm(s, FLOOD_ID + li, ahead_id, l->win_ns);
    }
    return true;
}

/* Bytes are counted per receive (a receive is read whole). */
static void rate_account(cp_session *s, size_t n)
{
    cp_service *svc = s->svc;
    uint64_t now = s->owner->now_ns;
    uint64_t ahead = ahead_of(s->tat_bytes, now);
    if (gcra_take(&s->tat_bytes, now, n, svc->rate_bytes, svc->win_bytes_ns))
        rate_over(s, FLOOD_BYTES, svc->win_bytes_ns, rested_at(s->tat_bytes, svc->win_bytes_ns));
    else
        flood_calm(s, FLOOD_BYTES, ahead, svc->win_bytes_ns);
}

/* ------------------------------------------------------------------ share */

static void share_account(cp_session *s, size_t n)
{
    cp_worker *w = s->owner;
    if (s->rx_round != w->round) {
        s->rx_round = w->round;
        s->rx_round_bytes = 0;
    }
    s->rx_round_bytes += (uint32_t)n;
    if (s->rx_round_bytes < SHARE_BYTES || (s->rx_block & CP_RX_SHARE))
        return;
    cp__rx_block(s, CP_RX_SHARE);
    if (!(s->rx_block & CP_RX_SHARE))
        return;
    cp__session_ref(s); /* the posted item's */
    cp__post_round_end(w, &s->share_end);
}

/* Posted when a session used its share: the round is over, it reads again. */
static void share_end_posted(cp_worker *w, cp_posted *p)
{
    CP_UNUSED(w);
    cp_session *s = (cp_session *)((char *)p - offsetof(cp_session, share_end));
    cp__rx_unblock(s, CP_RX_SHARE);
    cp__session_unref(s);
}

void cp__rx_account(cp_session *s, size_t n, size_t packets)
{
    if (!cp__session_reading(s))
        return;
    CP_UNUSED(packets); /* taken one at a time, cp__rx_rate_packet */
    if (s->svc->rate_bytes)
        rate_account(s, n);
    if (cp__session_reading(s)) /* not cut as a flooder */
        share_account(s, n);
}

/* ------------------------------------------------------------------ send queue */

void cp__rx_sendq_check(cp_session *s)
{
    /* What the limit counts too: the user's queue and what a filter made of it. */
    size_t q = cp__session_queued_mem(s);
    if (q > s->svc->sq_high)
        cp__rx_block(s, CP_RX_SENDQ);
    else if (q < s->svc->sq_low)
        cp__rx_unblock(s, CP_RX_SENDQ);
}

static void msg_unblock(cp_worker *w, void *sp, void *why, uintptr_t c)
{
    CP_UNUSED(w), CP_UNUSED(c);
    cp__rx_unblock(sp, (unsigned)(uintptr_t)why);
    cp__session_unref(sp);
}

void cp__rx_unblock_later(cp_session *s, unsigned why)
{
    cp__session_ref(s);
    cp__send_msg(s->owner, msg_unblock, s, (void *)(uintptr_t)why);
}

/* A session as a job queue's feeder (jobq.c, "Bounds"). */
#define SESSION_OF_FEEDER(f) ((cp_session *)((char *)(f)-offsetof(cp_session, feeder)))

static bool feeder_waiting(cp_feeder *f) { return (SESSION_OF_FEEDER(f)->rx_block & CP_RX_QUEUE) != 0; }

static void feeder_hold(cp_feeder *f) { cp__session_ref(SESSION_OF_FEEDER(f)); }

static void feeder_pause(cp_feeder *f) { cp__rx_block(SESSION_OF_FEEDER(f), CP_RX_QUEUE); }

static void feeder_resume(cp_feeder *f)
{
    cp_session *s = SESSION_OF_FEEDER(f);
    cp__rx_unblock_later(s, CP_RX_QUEUE);
    cp__session_unref(s);
}

static const cp_feeder_ops session_feeder = { feeder_waiting, feeder_hold, feeder_pause, feeder_resume };

void cp__rx_init(cp_session *s)
{
    s->feeder.ops = &session_feeder;
    s->rx_tmo.fn = on_rate_rested;
    s->rx_tmo.arg = s;
    s->rx_tmo.heap_index = UINT32_MAX;
    s->share_end.fn = share_end_posted;
}
