/* SPDX-License-Identifier: MIT */
/*
 * Sessions: the connect / receive / send / disconnect state machine.
 *
 * Every session lives on one worker (its owner) for its whole life; all of its
 * callbacks and all changes to its I/O state happen there, which is why one
 * session's callbacks never run concurrently and need no lock. Other threads
 * reach a session through messages to the owner (cp__send_msg).
 *
 * Lifetime: the session's memory is reference counted. The service's table
 * holds one reference from creation until the session is finished; the owner's
 * own holders (every armed operation, the dirty list) share one, taken by the
 * first and dropped by the last of them (holds), so a message costs no atomic
 * operation on the session; a message in flight to the owner holds one; the
 * user may hold more (cp_session_ref). Disconnecting cancels the armed operations
 * and queues one more "close" completion behind them; when the last of them
 * has completed (ops_pending reaches 0) the session is finished: it leaves the
 * service's table, which drops the table's reference. The memory goes when the
 * last reference does, on whatever thread that is, and that path touches
 * nothing but the session itself.
 */
#include "net/net.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define IOV_CAP 64
#define SEND_BYTES_CAP (256u * 1024u)

static void on_recv_cqe(cp_worker *w, cp_op *op, int res, unsigned flags, const uint8_t *data);
static void on_send_cqe(cp_worker *w, cp_op *op, int res, unsigned flags, const uint8_t *data);
static void on_connect_cqe(cp_worker *w, cp_op *op, int res, unsigned flags, const uint8_t *data);
static void session_accept(cp_worker *w, cp_session *s, int fd);
static void session_connect(cp_worker *w, cp_session *s, int fd);
static void on_close_cqe(cp_worker *w, cp_op *op, int res, unsigned flags, const uint8_t *data);
static void on_timeout(cp_worker *w, void *sp);
static void send_start(cp_session *s);

#define SESSION_OF(op, field) ((cp_session *)((char *)(op)-offsetof(cp_session, field)))

/* ------------------------------------------------------------------ timeouts */

/* The timer holds no reference: it lives in the owner's heap only while the
 * session is connected, and closing removes it. */

/* The partial-packet and idle deadlines, UINT64_MAX when not running. While
 * the receive is paused (flow.c) the peer cannot finish a packet, so that
 * clock stands still (the resume moves it on by the pause); and while we
 * pause it for its rate or its share of a round the peer is not idle. */
static uint64_t packet_deadline(const cp_session *s)
{
    cp_service *svc = s->svc;
    if (!svc->packet_timeout_ns || !s->carry_len || s->rx_block)
        return UINT64_MAX;
    return s->pkt_start_ns + svc->packet_timeout_ns;
}

static uint64_t idle_deadline(const cp_session *s)
{
    cp_service *svc = s->svc;
    if (!svc->idle_timeout_ns || (s->rx_block & (CP_RX_RATE | CP_RX_SHARE)))
        return UINT64_MAX;
    return s->last_rx_ns + svc->idle_timeout_ns;
}

static uint64_t first_deadline(const cp_session *s)
{
    return s->svc->first_packet_ns && !s->first_seen ? s->first_deadline_ns : UINT64_MAX;
}

/* The nearest of the three. */
static uint64_t timeout_deadline(const cp_session *s)
{
    uint64_t p = packet_deadline(s), i = idle_deadline(s), f = first_deadline(s);
    uint64_t d = p < i ? p : i;
    return f < d ? f : d;
}

/* The timer watches a deadline of the connected session's. */
static bool timed(const cp_service *svc)
{
    return svc->idle_timeout_ns || svc->packet_timeout_ns || svc->first_packet_ns;
}

/* With only a packet timeout and no packet under way the timer stays
 * disarmed: the next packet that starts arms it. */
static void timeout_rearm(cp_worker *w, cp_session *s)
{
    uint64_t when = timeout_deadline(s);
    if (when != UINT64_MAX)
        cp__timer_arm_at(w, &s->tmo, when);
}

/* Receives only stamp last_rx_ns, so the idle deadline moves later without
 * touching the heap and the timer, when it fires early, re-arms itself. A
 * packet deadline is the one that can come earlier than the armed one: the
 * timer moves then, once per packet left unfinished, and not even then while
 * an earlier packet's deadline is still armed. */
void cp__session_packet_started(cp_session *s)
{
    cp_service *svc = s->svc;
    if (!svc->packet_timeout_ns || atomic_load_explicit(&s->state, memory_order_relaxed) >= CP_S_CLOSING)
        return;
    uint64_t when = s->pkt_start_ns + svc->packet_timeout_ns;
    if (s->tmo.heap_index == UINT32_MAX || when < s->tmo.deadline_ns)
        cp__timer_arm_at(s->owner, &s->tmo, when);
}

/* Decided by the deadlines the timer is armed at: a timer that fires either
 * closes the session or moves on to a deadline still ahead (re-arming at one
 * already past would fire again in the same pass, for ever). */
static void on_timeout(cp_worker *w, void *sp)
{
    cp_session *s = sp;
    uint64_t now = cp__now_ns();
    if (first_deadline(s) <= now)
        cp__session_close(s, CP_REASON_FIRST_PACKET_TIMEOUT, -ETIMEDOUT);
    else if (packet_deadline(s) <= now)
        cp__session_close(s, CP_REASON_PACKET_TIMEOUT, -ETIMEDOUT);
    else if (idle_deadline(s) <= now)
        cp__session_close(s, CP_REASON_IDLE_TIMEOUT, -ETIMEDOUT);
    else
        timeout_rearm(w, s);
}

void cp__session_timeout_rearm(cp_session *s)
{
    /* Only a connected session's timer watches these deadlines: in a
     * filter's handshake it is the handshake's (session_connected arms it
     * after), in a drain the drain's, which they must not move. */
    if (atomic_load_explicit(&s->state, memory_order_relaxed) != CP_S_CONNECTED)
        return;
    if (timed(s->svc))
        timeout_rearm(s->owner, s);
}

static void flush_posted(cp_worker *w, cp_posted *p);

/* Sessions come from a slab of their own, so that idle ones stay packed
 * together whatever bursts did to malloc's heaps (slab.c). */
static cp_slab session_slab = CP_SLAB_INIT(sizeof(cp_session));

cp_session *cp__session_new(cp_service *svc, cp_worker *owner, bool is_client)
{
    cp_session *s = cp__slab_alloc(&session_slab);
    if (!s)
        return NULL;
    atomic_init(&s->rc, 1); /* the service table's reference, no ticket yet */
    atomic_init(&s->state, CP_S_NEW);
    atomic_init(&s->svc, svc);
    s->ctx = svc->ctx;
    s->owner = owner;
    s->is_client = is_client;
    s->h.fd = -1;
    s->flush.fn = flush_posted;
    s->rd.cb = on_recv_cqe;
    s->rd.kind = CP_OP_RECV;
    s->wr.cb = on_send_cqe;
    s->wr.kind = CP_OP_SEND;
    s->cl.cb = on_close_cqe;
    s->tmo.fn = on_timeout;
    s->tmo.arg = s;
    s->tmo.heap_index = UINT32_MAX;
    cp__rx_init(s);
    cp__session_work_init(s);
    pthread_mutex_init(&s->glock, NULL);
    return s;
}

static void held_drop(cp_session *s);
static int queue_owned(cp_session *s, cp_sendbuf *b);

static const cp_filter_ops *ops_of(const cp_filter *f) { return f->kind->ops; }

/* How many filters the session has (they are attached all at once). */
static int filters_n(const cp_session *s)
{
    int n = 0;
    while (n < CP_FILTERS_MAX && s->flt[n])
        n++;
    return n;
}

/* f's place in the chain, 0 the outermost. */
static int filter_at(const cp_filter *f)
{
    int i = 0;
    while (f->s->flt[i] != f)
        i++;
    return i;
}

/* The filter toward the framer, or NULL: the framer itself. */
static cp_filter *filter_inner(const cp_filter *f)
{
    int i = filter_at(f) + 1;
    return i < CP_FILTERS_MAX ? f->s->flt[i] : NULL;
}

/* The filter's own wire queue, or NULL when it frames its source in place. */
static cp_sendq *filter_own_wire(cp_filter *f) { return ops_of(f)->wire(f); }

/* The queue of what f made (its own, or its source framed in place). */
static cp_sendq *filter_wire(cp_filter *f)
{
    cp_sendq *q = filter_own_wire(f);
    return q ? q : cp__filter_source(f);
}

/* The filters' wire queues and the filters themselves, outermost first. */
static void filter_drop(cp_session *s)
{
    for (int i = 0; i < CP_FILTERS_MAX && s->flt[i]; i++) {
        cp_sendq *q = filter_own_wire(s->flt[i]);
        if (q)
            cp__sendq_clear(q);
    }
    for (int i = 0; i < CP_FILTERS_MAX && s->flt[i]; i++) {
        cp_filter *f = s->flt[i];
        s->flt[i] = NULL;
        ops_of(f)->detach(f);
    }
}

cp_filter *cp__session_filter(const cp_session *s, const cp_filter_ops *ops)
{
    for (int i = 0; i < CP_FILTERS_MAX && s->flt[i]; i++)
        if (ops_of(s->flt[i]) == ops)
            return s->flt[i];
    return NULL;
}

size_t cp__filter_pass(cp_filter *f, const uint8_t *data, size_t n)
{
    cp_filter *in = filter_inner(f);
    return in ? ops_of(in)->input(in, data, n) : cp__session_input(f->s, data, n);
}

cp_sendq *cp__filter_source(cp_filter *f)
{
    cp_filter *in = filter_inner(f);
    return in ? filter_wire(in) : &f->s->sq;
}

/* What the filters' own wire queues hold. */
static size_t filters_mem(const cp_session *s)
{
    size_t m = 0;
    for (int i = 0; i < CP_FILTERS_MAX && s->flt[i]; i++) {
        cp_sendq *q = filter_own_wire(s->flt[i]);
        if (q)
            m += cp__sendq_mem(q);
    }
    return m;
}

static void session_free(cp_session *s)
{
    cp__carry_free(s->carry, s->carry_cap);
    cp__rx_free(s);
    cp__sendq_clear(&s->sq);
    filter_drop(s);
    held_drop(s);
    cp__free(s->groups);
    pthread_mutex_destroy(&s->glock);
    cp__slab_free(&session_slab, s);
}

#define RC_REFS UINT64_C(0xffffffff)
#define RC_TICKET (UINT64_C(1) << 32)

void cp__session_ref(cp_session *s) { atomic_fetch_add_explicit(&s->rc, 1, memory_order_relaxed); }

void cp__session_unref(cp_session *s)
{
    if (s && (atomic_fetch_sub_explicit(&s->rc, 1, memory_order_acq_rel) & RC_REFS) == 1)
        session_free(s);
}

/* The user's references are the library's too; builds with the misuse
 * checks also count them apart, so that a cp_session_unref without its
 * cp_session_ref is named while the session is still alive, instead of
 * freeing it under the library's own holders. */
void cp_session_ref(cp_session *s)
{
#ifdef CP_ASSERTS
    atomic_fetch_add_explicit(&s->user_refs, 1, memory_order_relaxed);
#endif
    cp__session_ref(s);
}

void cp_session_unref(cp_session *s)
{
    if (!s)
        return;
#ifdef CP_ASSERTS
    int left = atomic_fetch_sub_explicit(&s->user_refs, 1, memory_order_relaxed);
    CP_ASSERT(left > 0, "cp_session_unref: more references dropped than cp_session_ref took");
#endif
    cp__session_unref(s);
}

/* Owner only: the first holder takes the shared reference, the last drops it
 * (which may free the session: the caller's last touch). */
static void hold(cp_session *s)
{
    if (s->holds++ == 0)
        cp__session_ref(s);
}

static void unhold(cp_session *s)
{
    if (--s->holds == 0)
        cp__session_unref(s);
}

/* A connection the kernel timed out: with data unacknowledged, the user
 * timeout fired (keepalive never probes while data is in flight);
 * without, keepalive did. Where the system cannot say, what the session
 * still had to write decides. */
static cp_reason dead_peer_reason(const cp_session *s)
{
    const cp_service *svc = s->svc;
    if (!svc->user_timeout_ms)
        return svc->ka_idle_ms ? CP_REASON_KEEPALIVE : CP_REASON_IO_ERROR;
    if (!svc->ka_idle_ms)
        return CP_REASON_USER_TIMEOUT;
    int unacked = cp__sock_unacked(s->h.fd);
    bool in_flight = unacked >= 0 ? unacked > 0 : s->sq.count > 0 || s->wr.armed;
    return in_flight ? CP_REASON_USER_TIMEOUT : CP_REASON_KEEPALIVE;
}

static cp_reason reason_of(const cp_session *s, int err)
{
    switch (-err) {
    case ECONNRESET:
    case ECONNABORTED:
    case EPIPE: return CP_REASON_RESET;
    case ETIMEDOUT: return dead_peer_reason(s);
    default: return CP_REASON_IO_ERROR;
    }
}

static bool connected(const cp_session *s)
{
    return atomic_load_explicit(&s->state, memory_order_relaxed) == CP_S_CONNECTED;
}

/* Connected, or draining after cp_session_shutdown: what is queued still goes out. */
static bool writing(const cp_session *s)
{
    int st = atomic_load_explicit(&s->state, memory_order_relaxed);
    return st == CP_S_CONNECTED || st == CP_S_DRAINING;
}

/* Bytes may go out: a filter's handshake writes before the session is
 * connected. */
static bool wire_open(const cp_session *s)
{
    int st = atomic_load_explicit(&s->state, memory_order_relaxed);
    return st == CP_S_HANDSHAKING || st == CP_S_CONNECTED || st == CP_S_DRAINING;
}

/* The socket still takes the wire queue: open, or a close requested a
 * moment ago (DISCONNECTING), whose filters' last words go out by
 * cp__session_wire_flush from the queue's head. Bytes written meanwhile
 * must leave the queue, or that flush would send them a second time. */
static bool wire_live(const cp_session *s)
{
    return wire_open(s) || atomic_load_explicit(&s->state, memory_order_relaxed) == CP_S_DISCONNECTING;
}

/* The queue the socket is written from: the filter's wire queue, or the
 * user's own. */
static cp_sendq *wire_queue(cp_session *s) { return s->flt[0] ? filter_wire(s->flt[0]) : &s->sq; }

/* Nothing queued and nothing in flight. */
static bool all_written(cp_session *s)
{
    if (s->sq.count || s->wr.armed)
        return false;
    for (int i = 0; i < CP_FILTERS_MAX && s->flt[i]; i++) {
        cp_sendq *q = filter_own_wire(s->flt[i]);
        if (q && q->count)
            return false;
    }
    return true;
}

static void drain_begin(cp_session *s);
static void drain_step(cp_session *s);
static void drain_peer_eof(cp_session *s);

/* ------------------------------------------------------------------ finish */

/* Every completion has arrived: leave the service, drop the table reference. */
static void session_finish(cp_session *s)
{
    atomic_store(&s->state, CP_S_CLOSED);
    cp__carry_free(s->carry, s->carry_cap);
    s->carry = NULL;
    s->carry_len = s->carry_cap = 0;
    cp__rx_free(s);
    cp__sendq_clear(&s->sq);
    filter_drop(s);
    held_drop(s);
    cp__session_sq_sample(s); /* nothing queued: out of the histogram */
    cp_service *svc = s->svc;
    /* Release: a thread that reads NULL through cp_session_service sees
     * everything the session did before, on_disconnected included. */
    atomic_store_explicit(&s->svc, NULL, memory_order_release);
    cp__service_session_done(svc, s); /* drops the table's reference */
}

/* An armed operation finally completed. */
static void op_done(cp_session *s)
{
    if (--s->ops_pending == 0 && atomic_load(&s->state) == CP_S_CLOSING)
        session_finish(s);
}

static void on_close_cqe(cp_worker *w, cp_op *op, int res, unsigned flags, const uint8_t *data)
{
    CP_UNUSED(w), CP_UNUSED(res), CP_UNUSED(flags), CP_UNUSED(data);
    cp_session *s = SESSION_OF(op, cl);
    op->armed = 0;
    op_done(s);
    unhold(s);
}

/* ------------------------------------------------------------------ close */

/* The filters' last words before a hard close, innermost first. */
static void filters_closing(cp_session *s, cp_reason reason)
{
    for (int i = filters_n(s) - 1; i >= 0; i--)
        if (ops_of(s->flt[i])->closing)
            ops_of(s->flt[i])->closing(s->flt[i], (int)reason);
}

void cp__session_close(cp_session *s, cp_reason reason, int err)
{
    int st = atomic_load(&s->state);
    if (st >= CP_S_CLOSING)
        return;
    if (s->flt[0] && st >= CP_S_HANDSHAKING)
        filters_closing(s, reason);
    atomic_store(&s->state, CP_S_CLOSING);
    cp_worker *w = s->owner;
    cp_service *svc = s->svc;
    cp__timer_cancel(w, &s->tmo);
    cp__rx_reset(s, false);
    if (s->h.fd >= 0)
        w->port->be->close(w, &s->h);
    /* The carry buffer stays until the session finishes: a packet handler
     * that disconnects may still be reading its body from it. */
    cp__group_leave_all(s);
    cp__session_work_close(s);

    if (s->was_connected) {
        cp__stat_add(&svc->st.disconnected, 1);
        cp__stat_add(&svc->st.by_reason[reason], 1);
        if (svc->h.on_disconnected)
            svc->h.on_disconnected(s, reason, err);
    } else if (reason == CP_REASON_TLS || reason == CP_REASON_HANDSHAKE_TIMEOUT ||
               reason == CP_REASON_WEBSOCKET || reason == CP_REASON_PROXY) {
        /* A handshake (or upgrade, or PROXY header) that failed: the
         * session was never connected, but the operator wants to see it. */
        cp__stat_add(&svc->st.by_reason[reason], 1);
    }
    if (!s->was_connected && s->is_client) {
        cp__stat_add(&svc->st.connect_failed, 1);
        if (!err)
            err = -ECANCELED;
        if (svc->h.on_connect_error)
            svc->h.on_connect_error(svc, s->data, err);
        else if (svc->h.on_connect_failed)
            svc->h.on_connect_failed(svc, err);
    }

    /* The close completion queues behind every cancellation the backend just
     * issued, so finishing never races a late completion of this pass. */
    s->cl.armed = 1;
    s->ops_pending++;
    hold(s);
    cp__worker_defer(w, &s->cl, 0);
}

/* ------------------------------------------------------------------ receive */

static void arm_recv(cp_session *s)
{
    cp_worker *w = s->owner;
    int r = w->port->be->recv(w, &s->h, &s->rd);
    if (r < 0) {
        cp__session_close(s, CP_REASON_IO_ERROR, r);
        return;
    }
    s->ops_pending++;
    hold(s);
}

/* Received bytes for a connected session, or one in a filter's handshake. */
static void recv_input(cp_worker *w, cp_session *s, const uint8_t *data, size_t n)
{
    cp__note_recv(w);
    w->feeder = &s->feeder;
    size_t packets = s->flt[0] ? ops_of(s->flt[0])->input(s->flt[0], data, n) : cp__session_input(s, data, n);
    w->feeder = NULL;
    cp__rx_account(s, n, packets);
}

static void proxy_input(cp_worker *w, cp_session *s, const uint8_t *data, size_t n);

static void on_recv_cqe(cp_worker *w, cp_op *op, int res, unsigned flags, const uint8_t *data)
{
    cp_session *s = SESSION_OF(op, rd);
    if (res > 0) {
        int st = atomic_load_explicit(&s->state, memory_order_relaxed);
        if (st == CP_S_CONNECTED || st == CP_S_HANDSHAKING || st == CP_S_PROXY) {
            s->last_rx_ns = w->now_ns;
            cp__traffic_add(&cp__traffic(s->svc, w)->bytes_in, (uint64_t)res);
            if (st == CP_S_PROXY) /* before the header is read, never after it */
                proxy_input(w, s, data, (size_t)res);
            else
                recv_input(w, s, data, (size_t)res);
        }
        /* Draining: what the peer still sends is read and dropped, so that
         * closing never resets a connection over unread bytes. */
    } else if (res == 0) {
        if (atomic_load(&s->state) == CP_S_DRAINING)
            drain_peer_eof(s);
        else /* a filter's stream ended without its own end (TLS close_notify): truncated */
            cp__session_close(s, CP_REASON_PEER_CLOSED, s->flt[0] ? -ECONNABORTED : 0);
    } else if (res != -ECANCELED && res != -ENOBUFS) {
        cp__session_close(s, reason_of(s, res), res);
    }
    if (flags & CP_CQE_MORE)
        return;
    /* A multishot receive that ended without an error (or ran out of provided
     * buffers) is simply armed again. */
    bool rearm = (wire_open(s) || atomic_load_explicit(&s->state, memory_order_relaxed) == CP_S_PROXY) &&
                 !s->peer_eof && (res > 0 || res == -ENOBUFS);
    op_done(s);
    if (rearm)
        arm_recv(s);
    unhold(s);
}

/* ------------------------------------------------------------------ start */

static void on_handshake_timeout(cp_worker *w, void *sp)
{
    CP_UNUSED(w);
    cp__session_close(sp, CP_REASON_HANDSHAKE_TIMEOUT, -ETIMEDOUT);
}

/* f's handshake begins, under its own deadline (the session's timer);
 * false if it failed (the session is closed). */
static bool filter_start(cp_filter *f)
{
    cp_session *s = f->s;
    s->tmo.fn = on_handshake_timeout;
    cp__timer_arm(s->owner, &s->tmo, f->kind->handshake_ms);
    int r = ops_of(f)->start(f);
    if (r < 0)
        cp__session_close(s, r == -ENOMEM ? CP_REASON_NO_MEMORY : (cp_reason)f->kind->fail_reason, r);
    return r >= 0;
}

/* TCP is up on a service with filters: their handshakes come first, the
 * outermost's first, with the receive armed for them; each filter calls
 * cp__filter_up when it is done, which starts the next one in. */
static void filter_begin(cp_session *s, int from)
{
    cp_service *svc = s->svc;
    if (!atomic_compare_exchange_strong(&s->state, &from, CP_S_HANDSHAKING))
        return;
    for (int i = 0; i < svc->nfilters; i++) {
        cp_filter_kind *k = svc->filters[i];
        cp_filter *f = k->ops->attach(k, s);
        if (!f) { /* what was attached goes with the session */
            cp__session_close(s, CP_REASON_NO_MEMORY, -ENOMEM);
            return;
        }
        f->kind = k;
        s->flt[i] = f;
    }
    if (from != CP_S_PROXY) /* else the receive that read the header is still armed */
        arm_recv(s);
    if (atomic_load(&s->state) == CP_S_HANDSHAKING && filter_start(s->flt[0]))
        send_start(s);
}

/* from is CP_S_NEW (accepted), CP_S_CONNECTING (client) or, with a filter,
 * CP_S_HANDSHAKING. A close requested meanwhile wins: its message finishes
 * the session, never reported connected. */
static void session_connected(cp_session *s, int from)
{
    cp_service *svc = s->svc;
    if (svc->nfilters && !s->flt[0]) {
        filter_begin(s, from);
        return;
    }
    if (!atomic_compare_exchange_strong(&s->state, &from, CP_S_CONNECTED))
        return;
    s->was_connected = true;
    cp__stat_add(&svc->st.connected, 1);
    if (timed(svc)) {
        s->last_rx_ns = s->owner->now_ns = cp__now_ns();
        s->first_deadline_ns = s->last_rx_ns + svc->first_packet_ns;
        timeout_rearm(s->owner, s);
    }
    if (svc->h.on_connected)
        svc->h.on_connected(s);
    /* on_connected may have started a graceful close; a filter's handshake
     * armed the receive already, and so did the PROXY header's reading. */
    if (writing(s) && !s->flt[0] && from != CP_S_PROXY)
        arm_recv(s);
    /* A stop that began while this session started saw it not connected
     * (close_all) and left it to this: it drains or closes like the rest. */
    if (atomic_load(&svc->stopping)) {
        uint32_t drain = atomic_load(&svc->stop_drain_ms);
        if (!drain)
            cp__session_request_close(s, CP_REASON_STOPPING);
        else
            (void)cp__session_shutdown(s, drain, CP_REASON_STOPPING); /* -ENOTCONN: drained already */
    }
}

void cp__filter_up(cp_filter *f)
{
    cp_session *s = f->s;
    cp_filter *in = filter_inner(f);
    if (in) {
        /* What the next one writes leaves at the round's end: f may be in
         * the middle of its own input still. */
        if (filter_start(in))
            cp__session_wire_ready(s);
        return;
    }
    cp__timer_cancel(s->owner, &s->tmo);
    s->tmo.fn = on_timeout;
    session_connected(s, CP_S_HANDSHAKING);
}

/* The queue is written in its turn among the worker's writes (port.c), once
 * however many sends came before it; none is posted while a write is in
 * flight (its completion goes on). */
static void flush_later(cp_session *s)
{
    if (!s->dirty && !s->wr.armed) {
        s->dirty = true;
        hold(s); /* the posted item's */
        cp__post_write(s->owner, &s->flush);
    }
}

void cp__session_wire_ready(cp_session *s)
{
    if (wire_open(s))
        flush_later(s);
}

size_t cp__session_queued_mem(const cp_session *s) { return cp__sendq_mem(&s->sq) + filters_mem(s); }

void cp__session_sq_sample(cp_session *s)
{
    size_t mem = cp__session_queued_mem(s);
    cp_traffic *t = cp__traffic(s->svc, s->owner);
    /* Unsigned arithmetic: a queue that shrank adds the difference's
     * two's complement, and the worker's sum comes out right. */
    cp__own_add(&t->sq_mem, (uint64_t)mem - (uint64_t)s->sq_seen);
    s->sq_seen = mem;
    unsigned b = cp__metrics_bucket(mem);
    if (b == s->sq_bucket)
        return;
    if (s->sq_bucket)
        cp__own_add(&t->sq_hist[s->sq_bucket], UINT64_MAX); /* minus one */
    if (b)
        cp__own_add(&t->sq_hist[b], 1);
    s->sq_bucket = (uint8_t)b;
}

size_t cp__session_queue_room(const cp_session *s)
{
    size_t used = filters_mem(s);
    return used < s->svc->send_queue_limit ? s->svc->send_queue_limit - used : 0;
}

/* The service's TCP options on a new connection: 0, or -errno when a dead
 * peer option the user asked for cannot be had (the session must not run
 * without the promise it was given). */
static int set_tcp_options(cp_session *s)
{
    const cp_service *svc = s->svc;
    /* TCP_NODELAY lives at IPPROTO_TCP. The C++ IOCP core cport replaces set it
     * at SOL_SOCKET, where it has no effect, so its small writes waited for
     * Nagle's algorithm (flaws::f12_tcp_nodelay_really_set checks this level). */
    if (svc->nodelay)
        cp__sock_setint(s->h.fd, IPPROTO_TCP, TCP_NODELAY, 1);
    int r = 0;
    if (svc->ka_idle_ms)
        r = cp__sock_keepalive(s->h.fd, svc->ka_idle_ms, svc->ka_interval_ms, svc->ka_probes);
    if (!r && svc->user_timeout_ms)
        r = cp__sock_user_timeout(s->h.fd, svc->user_timeout_ms);
    return r;
}

/* Both start functions run from a message that holds a reference: a stop may
 * have disconnected the session before its start arrived, in which case the
 * session is already finishing and only the descriptor needs closing. */
void cp__session_start_accepted(cp_worker *w, void *sp, void *fdp, uintptr_t c)
{
    cp_session *s = sp;
    if (atomic_load(&s->state) != CP_S_NEW) {
        cp__sock_close((int)(intptr_t)fdp);
        cp__session_unref(s);
        return;
    }
    session_accept(w, s, (int)(intptr_t)fdp);
    cp__session_unref(s);
}

/* ------------------------------------------------------------------ PROXY header */

/* A step of the receive path rather than a filter: it runs only until the
 * header is read, and then leaves the session as if it had never been there
 * (no filter in the chain, nothing per receive). */

static void on_proxy_timeout(cp_worker *w, void *sp)
{
    CP_UNUSED(w);
    cp__session_close(sp, CP_REASON_PROXY, -ETIMEDOUT);
}

/* Accepted on a service with proxy_protocol: read the header first, under
 * its deadline (the session's timer). */
static void proxy_begin(cp_session *s)
{
    int from = CP_S_NEW;
    if (!atomic_compare_exchange_strong(&s->state, &from, CP_S_PROXY))
        return;
    s->tmo.fn = on_proxy_timeout;
    cp__timer_arm(s->owner, &s->tmo, s->svc->proxy_timeout_ms);
    arm_recv(s);
}

/* Bytes that followed the header go on as received input, if the session
 * is still reading (on_connected may have closed it). */
static void proxy_rest(cp_worker *w, cp_session *s, const uint8_t *rest, size_t n)
{
    int st = atomic_load_explicit(&s->state, memory_order_relaxed);
    if (n && (st == CP_S_CONNECTED || st == CP_S_HANDSHAKING))
        recv_input(w, s, rest, n);
}

/* The header was read, with the client's address (len 0: the socket's
 * stands): the session goes on as any accepted one would, unless the caps
 * by address refuse it. rest: the bytes that followed the header. */
static void proxy_done(cp_worker *w, cp_session *s, const cp_sockaddr *addr, socklen_t len,
                       const uint8_t *rest, size_t nrest)
{
    cp__timer_cancel(w, &s->tmo);
    s->tmo.fn = on_timeout;
    if (len) {
        s->peer = *addr;
        s->peer_len = len;
    }
    int cause = cp__service_admit_session(s->svc, s);
    if (cause >= 0) {
        cp__service_refused(s->svc, cause);
        /* Never connected: nothing is reported, the refusal is counted. */
        cp__session_close(s, CP_REASON_LOCAL, 0);
        return;
    }
    session_connected(s, CP_S_PROXY);
    proxy_rest(w, s, rest, nrest);
}

/* The header may come in pieces (a proxy writes it whole, but TCP need not
 * deliver it so): a partial one waits in carry, which is free until the
 * session connects. */
static void proxy_input(cp_worker *w, cp_session *s, const uint8_t *data, size_t n)
{
    cp_sockaddr addr;
    socklen_t len;
    if (!s->carry_len) {
        int h = cp__proxy_parse(data, n, &addr, &len);
        if (h > 0) {
            proxy_done(w, s, &addr, len, data + h, n - (size_t)h);
            return;
        }
        if (h == 0) {
            s->carry = cp__malloc(CP_PROXY_MAX);
            if (!s->carry) {
                cp__session_close(s, CP_REASON_NO_MEMORY, -ENOMEM);
                return;
            }
            s->carry_cap = CP_PROXY_MAX;
            memcpy(s->carry, data, n); /* n < CP_PROXY_MAX: else the parser said malformed */
            s->carry_len = (uint32_t)n;
            return;
        }
    } else {
        size_t take = n < CP_PROXY_MAX - s->carry_len ? n : CP_PROXY_MAX - s->carry_len;
        memcpy(s->carry + s->carry_len, data, take);
        s->carry_len += (uint32_t)take;
        int h = cp__proxy_parse(s->carry, s->carry_len, &addr, &len);
        if (h > 0) {
            /* What followed the header: the end of carry, then the rest of data. */
            uint8_t *c = s->carry;
            size_t clen = s->carry_len, cap = s->carry_cap;
            s->carry = NULL;
            s->carry_len = s->carry_cap = 0;
            /* A byte stream may be handed on in two pieces, as TCP may
             * deliver it: no buffer to join them. */
            proxy_done(w, s, &addr, len, c + h, clen - (size_t)h);
            proxy_rest(w, s, data + take, n - take);
            cp__carry_free(c, cap);
            return;
        }
        if (h == 0 && s->carry_len < CP_PROXY_MAX)
            return;
    }
    cp__session_close(s, CP_REASON_PROXY, -EPROTO);
}

static void session_accept(cp_worker *w, cp_session *s, int fd)
{
    s->h.fd = fd; /* the peer's address came with the accept (listener.c) */
    /* A draining stop serves a connection it accepted (session_connected). */
    bool refuse = atomic_load(&s->svc->stopping) && !atomic_load(&s->svc->stop_drain_ms);
    int r = refuse ? -ESHUTDOWN : w->port->be->attach(w, &s->h);
    if (r == 0)
        r = set_tcp_options(s);
    if (r < 0) {
        cp__session_close(s, CP_REASON_IO_ERROR, r);
        return;
    }
    if (s->svc->proxy)
        proxy_begin(s);
    else
        session_connected(s, CP_S_NEW);
}

static void on_connect_cqe(cp_worker *w, cp_op *op, int res, unsigned flags, const uint8_t *data)
{
    CP_UNUSED(w), CP_UNUSED(flags), CP_UNUSED(data);
    cp_session *s = SESSION_OF(op, wr);
    s->wr.cb = on_send_cqe;
    s->wr.kind = CP_OP_SEND;
    if (atomic_load(&s->state) == CP_S_CONNECTING) {
        if (res < 0) {
            cp__session_close(s, CP_REASON_IO_ERROR, res);
        } else {
            s->peer_len = sizeof s->peer;
            if (getpeername(s->h.fd, (struct sockaddr *)&s->peer, &s->peer_len) < 0) {
                /* Not connected after all (the peer vanished in between). */
                cp__session_close(s, CP_REASON_IO_ERROR, cp__sock_err());
            } else {
                session_connected(s, CP_S_CONNECTING);
            }
        }
    }
    op_done(s);
    unhold(s);
}

/* The socket was made by the thread that asked for the connect, so that a
 * connect that cannot even start fails there, synchronously. */
void cp__session_start_connect(cp_worker *w, void *sp, void *fdp, uintptr_t c)
{
    cp_session *s = sp;
    session_connect(w, s, (int)(intptr_t)fdp);
    cp__session_unref(s);
}

static void session_connect(cp_worker *w, cp_session *s, int fd)
{
    cp_service *svc = s->svc;
    int from = CP_S_NEW;
    if (!atomic_compare_exchange_strong(&s->state, &from, CP_S_CONNECTING)) {
        cp__sock_close(fd);
        return; /* a close was requested first; its message finishes it */
    }
    int r = -ESHUTDOWN;
    if (atomic_load(&svc->stopping)) {
        cp__sock_close(fd);
    } else {
        s->h.fd = fd;
        r = w->port->be->attach(w, &s->h);
    }
    if (r == 0)
        r = set_tcp_options(s);
    if (r == 0) {
        s->wr.cb = on_connect_cqe;
        s->wr.kind = CP_OP_CONNECT;
        r = w->port->be->connect(w, &s->h, &s->wr, (struct sockaddr *)&svc->addr, svc->addr_len);
        if (r == 0) {
            s->ops_pending++;
            hold(s);
            return;
        }
        s->wr.cb = on_send_cqe;
        s->wr.kind = CP_OP_SEND;
    }
    cp__session_close(s, CP_REASON_IO_ERROR, r);
}

/* ------------------------------------------------------------------ send */

/* n bytes of the wire queue were written. */
static void sent(cp_session *s, size_t n)
{
    cp__traffic_add(&cp__traffic(s->svc, s->owner)->bytes_out, n);
    /* The queue says what the bytes complete of its own (a framed queue:
     * not the frame headers); then each filter, outermost first, what that
     * completes of the queue inside it. The last answer is the user's. */
    n = cp__sendq_consume(wire_queue(s), n);
    for (int i = 0; i < CP_FILTERS_MAX && s->flt[i]; i++)
        if (ops_of(s->flt[i])->written)
            n = ops_of(s->flt[i])->written(s->flt[i], n);
    cp__session_sq_sample(s);
    if (s->rx_block & CP_RX_SENDQ)
        cp__rx_sendq_check(s);
    if (s->svc->h.on_sent && n)
        s->svc->h.on_sent(s, n);
}

/* Inner filters first, so that what one makes is in the next one's source. */
static void filters_encode(cp_session *s)
{
    for (int i = filters_n(s) - 1; i >= 0; i--)
        if (cp__filter_source(s->flt[i])->count)
            ops_of(s->flt[i])->encode(s->flt[i]);
}

/* A filter turns the round's whole queue into wire bytes at once (TLS: as
 * few records as it can), while no write is in flight: what comes meanwhile
 * waits and joins the next batch. In a handshake only what an inner
 * filter made is there (a WebSocket upgrade inside TLS). */
static void encode_due(cp_session *s)
{
    if (s->flt[0] && !s->wr.armed && wire_open(s))
        filters_encode(s);
}

static void send_start(cp_session *s)
{
    cp_worker *w = s->owner;
    struct iovec iov[IOV_CAP];
    encode_due(s);
    cp_sendq *q = wire_queue(s);
    while (wire_open(s) && q->count && !s->wr.armed) {
        int n = cp__sendq_gather(q, iov, IOV_CAP, SEND_BYTES_CAP);
        cp__note_send(w);
        int r = w->port->be->send(w, &s->h, &s->wr, iov, n);
        if (r == CP_PENDING) {
            if (w->port->be->send_holds_bufs)
                cp__sendq_pending(q, n); /* the queue must not move those entries */
            s->ops_pending++;
            hold(s);
            return;
        }
        if (r < 0) {
            cp__session_close(s, reason_of(s, r), r);
            return;
        }
        sent(s, (size_t)r);
        encode_due(s);
    }
    if (s->drain_marked && all_written(s))
        drain_step(s);
}

static void on_send_cqe(cp_worker *w, cp_op *op, int res, unsigned flags, const uint8_t *data)
{
    CP_UNUSED(w), CP_UNUSED(flags), CP_UNUSED(data);
    cp_session *s = SESSION_OF(op, wr);
    cp__sendq_landed(wire_queue(s));
    if (res >= 0 && wire_live(s))
        sent(s, (size_t)res);
    else if (res < 0 && res != -EAGAIN && wire_open(s))
        cp__session_close(s, reason_of(s, res), res);
    op_done(s);
    /* What came during the write waits its turn among the worker's writes
     * (port.c): written at once, it would let the sessions whose writes
     * complete every round write every round, in small pieces, while the
     * rest wait. */
    if (wire_open(s) && (wire_queue(s)->count || s->flt[0] || s->drain_marked))
        flush_later(s);
    unhold(s);
}

/* One write, best effort, and never a close of its own: the caller closes
 * right after, with the reason that matters (a failed write only loses the
 * alert). */
void cp__session_wire_flush(cp_filter *from)
{
    cp_session *s = from->s;
    cp_worker *w = s->owner;
    if (s->wr.armed || s->h.fd < 0 || !wire_live(s))
        return;
    /* What the filter made goes through the filters outside it (a
     * WebSocket Close inside TLS), never through itself again. */
    for (int i = filter_at(from) - 1; i >= 0; i--)
        if (cp__filter_source(s->flt[i])->count)
            ops_of(s->flt[i])->encode(s->flt[i]);
    cp_sendq *q = wire_queue(s);
    if (!q->count)
        return;
    struct iovec iov[IOV_CAP];
    int n = cp__sendq_gather(q, iov, IOV_CAP, SEND_BYTES_CAP);
    int r = w->port->be->send(w, &s->h, &s->wr, iov, n);
    if (r == CP_PENDING) {
        if (w->port->be->send_holds_bufs)
            cp__sendq_pending(q, n);
        s->ops_pending++;
        hold(s);
    } else if (r > 0) {
        sent(s, (size_t)r);
    }
}

static int err_of_reason(cp_reason reason)
{
    return reason == CP_REASON_SEND_OVERFLOW ? -ENOBUFS : reason == CP_REASON_NO_MEMORY ? -ENOMEM : 0;
}

static void msg_close(cp_worker *w, void *sp, void *reason, uintptr_t c)
{
    CP_UNUSED(w);
    cp_session *s = sp;
    cp__session_close(s, (cp_reason)(intptr_t)reason, err_of_reason((cp_reason)(intptr_t)reason));
    cp__session_unref(s);
}

/* A disconnect asked for by the user, by a stopping service, or by a queue
 * overflow. The state changes at once, so sends are refused and the receive
 * loop stops handing out packets from this moment; the close itself (which
 * runs on_disconnected and leaves groups) is a message to the owner, so it
 * never runs inside a callback that is still in progress or under a lock a
 * broadcast holds. */
int cp__session_request_close(cp_session *s, cp_reason reason)
{
    int st = atomic_load(&s->state);
    do {
        if (st >= CP_S_DISCONNECTING)
            return -ENOTCONN;
    } while (!atomic_compare_exchange_weak(&s->state, &st, CP_S_DISCONNECTING));
    cp__session_ref(s);
    /* Urgent: the close must not wait behind the messages queued for the
     * owner before it (a flood of broadcasts), which it makes moot anyway:
     * sends are refused from now on, and posts and timer starts still on
     * their way are settled by the close (session_work.c). */
    cp__send_msg_urgent(s->owner, msg_close, s, (void *)(intptr_t)reason);
    return 0;
}

/* On the owner: append b to the queue, which takes over the caller's
 * reference (dropped if b is not queued); the write happens at the end of the
 * round. */
static int queue_owned(cp_session *s, cp_sendbuf *b)
{
    int r = 0;
    if (!b) {
        drain_begin(s); /* cp_session_shutdown's place in the order */
        return 0;
    }
    if (!writing(s) || s->drain_marked) {
        r = -ENOTCONN;
    } else if (b->len == 0) {
        r = 0; /* nothing to queue */
    } else if ((r = cp__sendq_push(&s->sq, b,
                                   s->flt[0] ? cp__session_queue_room(s) : s->svc->send_queue_limit)) < 0) {
        /* -ENOBUFS: what the queue would pin passes the limit (sendq.c). */
        cp__session_request_close(s, r == -ENOBUFS ? CP_REASON_SEND_OVERFLOW : CP_REASON_NO_MEMORY);
    } else {
        cp__traffic_add(&cp__traffic(s->svc, s->owner)->packets_out, 1);
        /* The first send of a round samples the queue (a write in flight
         * posts no flush, so a stalled queue's growth shows here). */
        if (s->sq_round != s->owner->round) {
            s->sq_round = s->owner->round;
            cp__session_sq_sample(s);
        }
        if (cp__session_queued_mem(s) > s->svc->sq_high)
            cp__rx_sendq_check(s);
        flush_later(s);
        return 0;
    }
    cp_sendbuf_unref(b);
    return r;
}

/* Posted by a send that queued bytes: writes the queue, once per round
 * however many sends there were. */
static void flush_posted(cp_worker *w, cp_posted *p)
{
    CP_UNUSED(w);
    cp_session *s = (cp_session *)((char *)p - offsetof(cp_session, flush));
    s->dirty = false;
    /* What the round queued, once per round rather than per send (a
     * finished session has left the histogram, and its service). */
    if (atomic_load_explicit(&s->state, memory_order_relaxed) != CP_S_CLOSED)
        cp__session_sq_sample(s);
    send_start(s);
    unhold(s);
}

/* ------------------------------------------------------------------ order */

/*
 * Sends to one session are written in happens-before order: if one send call
 * returns before another starts, on any threads, the first is written first.
 *
 * The owner appends its own sends to the queue directly; any other thread
 * sends a message, and messages from different workers travel in different
 * per-round batches, so they can arrive in any order, and behind the owner's
 * own later sends. So every send from another thread takes a ticket from the
 * session's counter in the same locked add that takes its message's
 * reference (the high half of rc). The owner applies tickets in order: a
 * message whose ticket is not the next one waits in the held list. An owner's
 * own send reads the counter (a plain load): if every ticket handed out has
 * been applied it goes straight to the queue; otherwise it waits behind them
 * in the held list, before any ticket handed out later. The counter is one
 * atomic object, so the order of its increments and loads respects every
 * happens-before edge between the calls, whatever carried it (a job queue, a
 * post, a timer, the user's own lock).
 */

typedef struct cp_held {
    cp_sendbuf *b;
    uint32_t key; /* a ticket; or, for the owner's own send, the tickets handed out before it */
    bool own;     /* the owner's own send: goes before the ticket numbered key */
} cp_held;


static void held_drop(cp_session *s)
{
    for (uint32_t i = 0; i < s->nheld; i++)
        cp_sendbuf_unref(s->held[i].b);
    cp__free(s->held);
    s->held = NULL;
    s->nheld = s->capheld = 0;
}

/* Where e goes among the held entries, counted from tx_applied so that the
 * 32-bit tickets may wrap. An owner's send with key k sorts just before the
 * ticket k; entries with the same place keep their arrival order. */
static uint64_t held_rank(const cp_session *s, const cp_held *e)
{
    return (uint64_t)(uint32_t)(e->key - s->tx_applied) * 2 + (e->own ? 0 : 1);
}

static void held_insert(cp_session *s, cp_held e)
{
    if (s->nheld == s->capheld) {
        uint32_t cap = s->capheld ? s->capheld * 2 : 8;
        cp_held *h = cp__realloc(s->held, sizeof *h * cap);
        if (!h) {
            cp_sendbuf_unref(e.b);
            cp__session_request_close(s, CP_REASON_NO_MEMORY);
            return;
        }
        s->held = h;
        s->capheld = cap;
    }
    uint64_t rank = held_rank(s, &e);
    uint32_t i = s->nheld;
    while (i > 0 && held_rank(s, &s->held[i - 1]) > rank) {
        s->held[i] = s->held[i - 1];
        i--;
    }
    s->held[i] = e;
    s->nheld++;
}

/* Applies the held entries whose turn has come. */
static void held_release(cp_session *s)
{
    uint32_t n = 0;
    while (n < s->nheld) {
        cp_held *e = &s->held[n];
        if (e->own ? (int32_t)(s->tx_applied - e->key) < 0 : e->key != s->tx_applied)
            break;
        if (!e->own)
            s->tx_applied++;
        n++;
        queue_owned(s, e->b);
    }
    if (n == 0)
        return;
    memmove(s->held, s->held + n, sizeof *s->held * (s->nheld - n));
    s->nheld -= n;
    if (s->nheld == 0) {
        /* Out-of-order arrivals come in episodes (a burst from several
         * threads); between them the list would stay with an idle session,
         * whose 1 KiB budget has no room for even 8 places (128 bytes). */
        cp__free(s->held);
        s->held = NULL;
        s->capheld = 0;
    }
}

/* The owner's own send: straight to the queue unless a ticket handed out
 * before it has not been applied yet. */
static int send_own(cp_session *s, cp_sendbuf *b)
{
    uint32_t issued = (uint32_t)(atomic_load_explicit(&s->rc, memory_order_relaxed) >> 32);
    if (issued == s->tx_applied)
        return queue_owned(s, b);
    held_insert(s, (cp_held){ .b = b, .key = issued, .own = true });
    return 0;
}

static void msg_send(cp_worker *w, void *sp, void *bp, uintptr_t ticket)
{
    CP_UNUSED(w);
    cp_session *s = sp;
    if (!writing(s)) {
        cp_sendbuf_unref(bp);
    } else if ((uint32_t)ticket == s->tx_applied && s->nheld == 0) {
        s->tx_applied++;
        queue_owned(s, bp); /* the message's reference */
    } else {
        held_insert(s, (cp_held){ .b = bp, .key = (uint32_t)ticket, .own = false });
        held_release(s);
    }
    cp__session_unref(s);
}

/* Any thread: b (or NULL, a shutdown) takes its place in s's send order, with
 * the caller's reference to b: straight from the owner, or as a message that
 * takes its reference to s and its ticket in one add. */
static int send_ordered(cp_session *s, cp_sendbuf *b)
{
    if (cp__self == s->owner)
        return send_own(s, b);
    uint64_t old = atomic_fetch_add_explicit(&s->rc, RC_TICKET | 1, memory_order_relaxed);
    cp__send_msg_c(s->owner, msg_send, s, b, (uintptr_t)(uint32_t)(old >> 32));
    return 0;
}

/* Any thread: queue b on s, taking over one reference the caller owns (it
 * goes to the queue, or rides with the message to the owner, or is dropped if
 * s refuses the buffer). */
static int session_send_owned(cp_session *s, cp_sendbuf *b)
{
    /* A session not connected yet (accepted but not started, connecting, in
     * its TLS handshake; a broadcast or a send by id can find one) is refused
     * like a closed one, and takes no ticket: the owner drops a message that
     * finds its session not writing, so that ticket would never be applied
     * and every later send would wait behind it for good. */
    int st = atomic_load_explicit(&s->state, memory_order_acquire);
    if (st < CP_S_CONNECTED || st >= CP_S_DRAINING) {
        cp_sendbuf_unref(b);
        return -ENOTCONN;
    }
    return send_ordered(s, b);
}

int cp__session_send(cp_session *s, cp_sendbuf *b)
{
    cp_sendbuf_ref(b); /* the queue's own; the caller keeps its reference */
    return session_send_owned(s, b);
}

int cp_session_send(cp_session *s, cp_sendbuf *b)
{
    if (!s || !b)
        return -EINVAL;
    return cp__session_send(s, b);
}

/* Below this a copy costs less than a lend (a view's allocation, and the
 * receive buffer it keeps whole while queued). */
#define LEND_MIN 4096u

cp_sendbuf *cp_sendbuf_from_recv(cp_session *s, const void *data, size_t len)
{
    if (!s || (!data && len))
        return NULL;
    cp_worker *w = s->owner;
    cp_loan loan;
    if (len >= LEND_MIN && cp__self == w && w->port->be->rx_lend &&
        w->port->be->rx_lend(w, data, len, &loan)) {
        cp_sendbuf *b = cp__sendbuf_view(data, len, &loan);
        if (b)
            return b;
        loan.put(loan.arg, loan.tag);
    }
    return cp_sendbuf_copy(data, len);
}

int cp_session_send_copy(cp_session *s, const void *data, size_t len)
{
    if (!s || (!data && len))
        return -EINVAL;
    cp_sendbuf *b = cp_sendbuf_copy(data, len);
    if (!b)
        return -ENOMEM;
    return session_send_owned(s, b); /* the copy's only reference */
}

/* ------------------------------------------------------------------ graceful close */

/*
 * cp_session_shutdown: the state moves to DRAINING at once (new sends are
 * refused), and the shutdown takes its place in the session's order like a
 * send (a NULL buffer): sends that happened before it are still queued, and
 * nothing after it is. When its turn comes on the owner (drain_begin), the
 * deadline is armed; when the queue is empty and no write is in flight, the
 * write side is shut (FIN), so the peer reads everything and then the end of
 * the stream. What the peer still sends is read and dropped; its FIN closes
 * the session (CP_REASON_LOCAL, err 0). The deadline closes it hard
 * (CP_REASON_LOCAL, err -ETIMEDOUT).
 */

static void on_drain_deadline(cp_worker *w, void *sp)
{
    CP_UNUSED(w);
    cp_session *s = sp;
    cp__session_close(s, (cp_reason)s->drain_reason, -ETIMEDOUT);
}

static void drain_begin(cp_session *s)
{
    if (atomic_load(&s->state) != CP_S_DRAINING || s->drain_marked)
        return;
    s->drain_marked = true;
    /* What the peer still sends is read and dropped: no reason to pause. */
    cp__rx_reset(s, true);
    /* The idle and packet timeouts no longer matter: the session's one timer
     * now watches the deadline. */
    s->tmo.fn = on_drain_deadline;
    cp__timer_arm_at(s->owner, &s->tmo, s->drain_deadline_ns);
    if (all_written(s))
        drain_step(s);
}

/* Everything queued has been written: the filter's end of stream (TLS
 * close_notify), written too, then FIN, then wait for the peer's. */
static void drain_step(cp_session *s)
{
    if (s->wr_shut || atomic_load(&s->state) != CP_S_DRAINING)
        return;
    /* Inner filters first: a WebSocket Close goes inside TLS, before its
     * close_notify. */
    for (int i = filters_n(s) - 1; i >= 0; i--) {
        if (s->flt_finished & (1u << i))
            continue;
        s->flt_finished |= (uint8_t)(1u << i);
        cp_filter *f = s->flt[i];
        if (ops_of(f)->finish(f)) {
            send_start(s); /* comes back here once it is written */
            return;
        }
    }
    s->wr_shut = true;
    int r = cp__sock_shutdown_wr(s->h.fd);
    if (r < 0)
        cp__session_close(s, reason_of(s, r), r);
    else if (s->peer_eof)
        cp__session_close(s, (cp_reason)s->drain_reason, 0);
}

static void drain_peer_eof(cp_session *s)
{
    s->peer_eof = true;
    if (s->wr_shut)
        cp__session_close(s, (cp_reason)s->drain_reason, 0);
}

int cp_session_shutdown(cp_session *s, uint32_t timeout_ms)
{
    if (!s || timeout_ms == 0)
        return -EINVAL;
    return cp__session_shutdown(s, timeout_ms, CP_REASON_LOCAL);
}

/* The state moves from `from` to DRAINING, and the caller that won that
 * change writes the deadline and the reason, once, before the owner can
 * see the drain (the caller then publishes it). */
static bool drain_enter(cp_session *s, int from, uint32_t timeout_ms, cp_reason reason)
{
    if (!atomic_compare_exchange_strong(&s->state, &from, CP_S_DRAINING))
        return false;
    s->drain_deadline_ns = cp__now_ns() + (uint64_t)timeout_ms * 1000000u;
    s->drain_reason = (uint8_t)reason;
    return true;
}

int cp__session_shutdown(cp_session *s, uint32_t timeout_ms, cp_reason reason)
{
    if (!drain_enter(s, CP_S_CONNECTED, timeout_ms, reason))
        return -ENOTCONN;
    return send_ordered(s, NULL); /* NULL: the shutdown's place in the order */
}

int cp__session_refuse(cp_session *s, uint32_t timeout_ms, cp_reason reason)
{
    if (!drain_enter(s, CP_S_HANDSHAKING, timeout_ms, reason))
        return -ENOTCONN;
    drain_begin(s); /* on the owner, and nothing of the user's is queued to come before it */
    cp__session_wire_ready(s);
    return 0;
}

/* ------------------------------------------------------------------ disconnect */

int cp_session_disconnect(cp_session *s)
{
    if (!s)
        return -EINVAL;
    return cp__session_request_close(s, CP_REASON_LOCAL);
}

/* ------------------------------------------------------------------ accessors */

uint64_t cp_session_id(const cp_session *s) { return s->id; }
cp_service *cp_session_service(const cp_session *s)
{
    return atomic_load_explicit(&s->svc, memory_order_acquire);
}
void *cp_session_ctx(const cp_session *s) { return s->ctx; }
void *cp_session_data(const cp_session *s) { return s->data; }
void cp_session_set_data(cp_session *s, void *data) { s->data = data; }
int cp_session_connected(const cp_session *s) { return connected(s); }

int cp_session_peer(const cp_session *s, char *buf, size_t len)
{
    if (!s || !buf || !len)
        return -EINVAL;
    return cp__addr_str((const struct sockaddr *)&s->peer, s->peer_len, buf, len);
}
