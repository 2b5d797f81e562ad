/* SPDX-License-Identifier: MIT */
/*
 * The bus core: broker connections over cport's own client sessions,
 * reconnects with backoff along the URL list, subscriptions, publishes
 * with a pending-bytes bound, and the statistics. The protocols are the
 * drivers' (nats.c, redis.c).
 *
 * A broker connection is a session of a client service (one service per
 * node of the URL list, raw framing). Everything that changes the
 * connection's state happens under the bus's lock: the session callbacks
 * (on the connection's worker), the retry and ping timers (on a worker),
 * and the user's calls (any thread). Timers are never cancelled with the
 * lock held: a cancel waits for a callback that may itself be waiting for
 * the lock.
 */
#include "bus/bus.h"
#include "bus/nats_wire.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#define BACKOFF_FIRST_MS 20u /* the first retry after a loss: well within 100 ms */
#define PENDING_DEFAULT (8u << 20)
#define PING_DEFAULT_MS 5000u
#define BACKOFF_MAX_DEFAULT_MS 2000u
/* The most bytes a broker connection keeps unconsumed: a whole message of
 * the largest payload the bus accepts (1 MiB, NATS's default) and its line. */
#define PAYLOAD_MAX (1u << 20)
#define RAW_LIMIT (PAYLOAD_MAX + 8192u)

static void bus_unref(cp_bus *bus);
static void schedule_retry(cp_bus *bus, bool next_node);

/* ------------------------------------------------------------------ URLs */

static int parse_node(cp_bus_node *nd, const char *s, size_t n)
{
    const char *colon = NULL;
    for (size_t i = n; i > 0; i--)
        if (s[i - 1] == ':') {
            colon = s + i - 1;
            break;
        }
    if (!colon || colon == s || (size_t)(colon - s) >= sizeof nd->host)
        return -EINVAL;
    size_t hn = (size_t)(colon - s);
    const char *h = s;
    if (*h == '[' && hn >= 2 && h[hn - 1] == ']') /* [::1]:4222 */
        h++, hn -= 2;
    unsigned long port = 0;
    const char *p = colon + 1, *end = s + n;
    if (p == end)
        return -EINVAL;
    for (; p < end; p++) {
        if (*p < '0' || *p > '9')
            return -EINVAL;
        port = port * 10 + (unsigned long)(*p - '0');
        if (port > 65535)
            return -EINVAL;
    }
    if (!port || !hn)
        return -EINVAL;
    memcpy(nd->host, h, hn);
    nd->host[hn] = '\0';
    nd->port = (uint16_t)port;
    return 0;
}

/* "scheme://h:p[,h:p...]": the driver and the nodes. */
static int parse_url(cp_bus *bus, const char *url)
{
    const char *sep = strstr(url, "://");
    if (!sep)
        return -EINVAL;
    size_t sn = (size_t)(sep - url);
    if (sn == 4 && !strncmp(url, "nats", 4))
        bus->drv = &cp__bus_nats;
    else if (sn == 5 && !strncmp(url, "redis", 5)) {
#ifdef CP_HAVE_HIREDIS
        bus->drv = &cp__bus_redis;
#else
        return -ENOTSUP;
#endif
    } else
        return -EINVAL;
    const char *p = sep + 3;
    while (*p) {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        if (bus->nnodes == CP_BUS_NODES_MAX || parse_node(&bus->nodes[bus->nnodes], p, n) < 0)
            return -EINVAL;
        bus->nnodes++;
        p += n + (comma ? 1 : 0);
        if (comma && !*p)
            return -EINVAL;
    }
    /* Redis has one node: its failover is Sentinel's or Cluster's business. */
    if (!bus->nnodes || (bus->drv->conns > 1 && bus->nnodes > 1))
        return -EINVAL;
    return 0;
}

static int name_ok(const char *s)
{
    size_t n = strlen(s);
    if (!n || n > CP_BUS_NAME_MAX)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              strchr("-_.:", *s)))
            return 0;
    return 1;
}

/* ------------------------------------------------------------------ pending bytes */

static size_t pending(const cp_bus *bus) { return (size_t)(bus->queued - bus->written); }

static int ends_push(cp_bus *bus, uint64_t end)
{
    if (bus->ends_len == bus->ends_cap) {
        size_t cap = bus->ends_cap ? bus->ends_cap * 2 : 64;
        uint64_t *a = cp__malloc(sizeof *a * cap);
        if (!a)
            return -ENOMEM;
        for (size_t i = 0; i < bus->ends_len; i++)
            a[i] = bus->ends[(bus->ends_head + i) % bus->ends_cap];
        cp__free(bus->ends);
        bus->ends = a;
        bus->ends_cap = cap;
        bus->ends_head = 0;
    }
    bus->ends[(bus->ends_head + bus->ends_len++) % bus->ends_cap] = end;
    return 0;
}

/* The connection broke: what was queued and not written is lost. */
static void pending_lost(cp_bus *bus)
{
    cp__stat_add(&bus->st.dropped, bus->ends_len);
    bus->ends_len = bus->ends_head = 0;
    bus->queued = bus->written = 0;
}

#define OUT_CAP (64u * 1024u)

static int conn_index(cp_session *s) { return (int)(uintptr_t)cp_session_data(s) - 1; }

/* Under the lock: connection i's open buffer goes to its session. */
static int out_flush(cp_bus *bus, int i)
{
    cp_sendbuf *b = bus->out[i];
    if (!b)
        return 0;
    bus->out[i] = NULL;
    cp__sendbuf_close(b, bus->out_len[i]);
    int r = cp_session_send(bus->conn[i], b);
    cp_sendbuf_unref(b);
    return r;
}

/* The connection broke: its open buffer is dropped. */
static void out_drop(cp_bus *bus, int i)
{
    if (!bus->out[i])
        return;
    cp__sendbuf_close(bus->out[i], 0);
    cp_sendbuf_unref(bus->out[i]);
    bus->out[i] = NULL;
}

/* Posted to the connection's worker when its buffer opens: sends what the
 * round (and other threads meanwhile) appended. */
static void flush_post(cp_session *s, void *arg)
{
    cp_bus *bus = arg;
    int i = conn_index(s);
    pthread_mutex_lock(&bus->lock);
    bus->flush_posted[i] = false;
    if (bus->conn[i] == s)
        out_flush(bus, i);
    pthread_mutex_unlock(&bus->lock);
}

int cp__bus_send(cp_bus *bus, int i, cp_sendbuf *b, bool msg_end)
{
    cp_session *s = bus->conn[i];
    if (!s)
        return -ENOTCONN;
    int r = out_flush(bus, i); /* what was appended goes first */
    if (r < 0)
        return r;
    if (msg_end && ends_push(bus, bus->queued + b->len) < 0)
        return -ENOMEM;
    r = cp_session_send(s, b);
    if (r < 0) {
        if (msg_end)
            bus->ends_len--;
        return r;
    }
    bus->queued += b->len;
    return 0;
}

/* Under the lock: an open buffer for connection i, and its flush posted. */
static int out_open(cp_bus *bus, int i)
{
    cp_sendbuf *b = cp__sendbuf_open(OUT_CAP);
    if (!b)
        return -ENOMEM;
    bus->out[i] = b;
    bus->out_len[i] = 0;
    if (!bus->flush_posted[i]) {
        int r = cp_session_post(bus->conn[i], flush_post, bus);
        if (r < 0) {
            out_drop(bus, i);
            return r;
        }
        bus->flush_posted[i] = true;
    }
    return 0;
}

int cp__bus_append(cp_bus *bus, int i, const void *data, size_t len, bool msg_end)
{
    if (!bus->conn[i])
        return -ENOTCONN;
    if (msg_end && ends_push(bus, bus->queued + len) < 0)
        return -ENOMEM;
    const uint8_t *p = data;
    size_t left = len;
    while (left) {
        int r = bus->out[i] ? 0 : out_open(bus, i);
        if (r < 0) {
            /* What part went in is written; the message is counted lost. */
            bus->queued += len - left;
            return r;
        }
        size_t take = OUT_CAP - bus->out_len[i] < left ? OUT_CAP - bus->out_len[i] : left;
        memcpy(bus->out[i]->data + bus->out_len[i], p, take);
        bus->out_len[i] += take;
        p += take;
        left -= take;
        if (bus->out_len[i] == OUT_CAP && (r = out_flush(bus, i)) < 0) {
            bus->queued += len - left;
            return r;
        }
    }
    bus->queued += len;
    return 0;
}

/* ------------------------------------------------------------------ connection */

static void connect_node(cp_bus *bus)
{
    cp_service *svc = bus->svc[bus->node];
    for (int i = 0; i < bus->drv->conns; i++) {
        int r = cp_client_connect_data(svc, (void *)(uintptr_t)(i + 1));
        if (r < 0) {
            cp__log(CP_LOG_WARN, "bus: connect to %s:%u: %s", bus->nodes[bus->node].host,
                    bus->nodes[bus->node].port, cp_strerror(r));
            bus->failed = true;
            continue;
        }
        bus->attempts++;
    }
    if (!bus->attempts)
        schedule_retry(bus, true);
}

static void retry_fire(void *arg)
{
    cp_bus *bus = arg;
    pthread_mutex_lock(&bus->lock);
    cp_timer *t = bus->retry;
    bus->retry = NULL;
    if (!bus->destroying) {
        bus->failed = false;
        connect_node(bus);
    }
    pthread_mutex_unlock(&bus->lock);
    cp_timer_cancel(t); /* from its own callback: only gives the handle back */
    bus_unref(bus);     /* the timer's */
}

/* Under the lock, once every connection of an attempt has ended: try again
 * after the backoff, on the next node if next_node. */
static void schedule_retry(cp_bus *bus, bool next_node)
{
    if (bus->destroying || bus->retry)
        return;
    if (next_node)
        bus->node = (bus->node + 1) % bus->nnodes;
    uint32_t delay = bus->backoff_ms;
    bus->backoff_ms = bus->backoff_ms * 2 > bus->backoff_max_ms ? bus->backoff_max_ms : bus->backoff_ms * 2;
    atomic_fetch_add(&bus->refs, 1);
    if (cp_timer_start(&bus->retry, bus->port, delay, 0, retry_fire, bus, NULL) < 0) {
        bus->retry = NULL;
        atomic_fetch_sub(&bus->refs, 1); /* the creator's is still held */
    }
}

/* Under the lock: a connection of the current attempt ended (failed, or
 * broke after it was up). The others of the attempt are closed; the last one
 * to end schedules the retry. */
static void conn_ended(cp_bus *bus)
{
    bus->attempts--;
    if (bus->up) {
        bus->up = false;
        pending_lost(bus);
    }
    for (int i = 0; i < bus->drv->conns; i++)
        if (bus->conn[i])
            cp_session_disconnect(bus->conn[i]);
    if (!bus->attempts)
        schedule_retry(bus, bus->failed || !bus->was_up);
}

static void on_connected(cp_session *s)
{
    cp_bus *bus = cp_service_ctx(cp_session_service(s));
    int i = conn_index(s);
    pthread_mutex_lock(&bus->lock);
    cp_session_ref(s);
    bus->conn[i] = s;
    bus->flush_posted[i] = false;
    bool all = true;
    for (int k = 0; k < bus->drv->conns; k++)
        all = all && bus->conn[k];
    if (bus->destroying || bus->failed) {
        cp_session_disconnect(s);
    } else if (all) {
        bus->up = true;
        atomic_store(&bus->pings_out, 0);
        bus->backoff_ms = BACKOFF_FIRST_MS;
        if (bus->was_up)
            cp__stat_add(&bus->st.reconnects, 1);
        bus->was_up = true;
        int r = bus->drv->hello(bus);
        if (r < 0) {
            cp__log(CP_LOG_WARN, "bus: handshake: %s", cp_strerror(r));
            cp_session_disconnect(s);
        }
    }
    pthread_mutex_unlock(&bus->lock);
}

static void on_connect_error(cp_service *svc, void *data, int err)
{
    cp_bus *bus = cp_service_ctx(svc);
    (void)data;
    pthread_mutex_lock(&bus->lock);
    cp__log(CP_LOG_INFO, "bus: cannot reach %s:%u: %s", bus->nodes[bus->node].host,
            bus->nodes[bus->node].port, cp_strerror(err));
    bus->failed = true;
    conn_ended(bus);
    pthread_mutex_unlock(&bus->lock);
}

static void on_disconnected(cp_session *s, cp_reason reason, int err)
{
    cp_bus *bus = cp_service_ctx(cp_session_service(s));
    int i = conn_index(s);
    pthread_mutex_lock(&bus->lock);
    if (bus->up && !bus->destroying)
        cp__log(CP_LOG_WARN, "bus: lost %s:%u (%s%s%s)", bus->nodes[bus->node].host,
                bus->nodes[bus->node].port, cp_reason_str(reason), err ? ": " : "",
                err ? cp_strerror(err) : "");
    out_drop(bus, i);
    bus->conn[i] = NULL;
    conn_ended(bus);
    pthread_mutex_unlock(&bus->lock);
    if (bus->drv->conn_closed)
        bus->drv->conn_closed(bus, i);
    cp_session_unref(s);
}

static size_t on_recv(cp_session *s, const uint8_t *data, size_t len)
{
    cp_bus *bus = cp_service_ctx(cp_session_service(s));
    atomic_store_explicit(&bus->pings_out, 0, memory_order_relaxed);
    return bus->drv->input(bus, s, conn_index(s), data, len);
}

static void on_sent(cp_session *s, size_t bytes)
{
    cp_bus *bus = cp_service_ctx(cp_session_service(s));
    pthread_mutex_lock(&bus->lock);
    if (bus->conn[conn_index(s)] == s) {
        bus->written += bytes;
        while (bus->ends_len && bus->ends[bus->ends_head] <= bus->written) {
            bus->ends_head = (bus->ends_head + 1) % bus->ends_cap;
            bus->ends_len--;
        }
    }
    pthread_mutex_unlock(&bus->lock);
}

static const cp_handlers bus_handlers = {
    .on_connected = on_connected,
    .on_recv = on_recv,
    .on_sent = on_sent,
    .on_disconnected = on_disconnected,
    .on_connect_error = on_connect_error,
};

/* ------------------------------------------------------------------ pings */

static void ping_fire(void *arg)
{
    cp_bus *bus = arg;
    pthread_mutex_lock(&bus->lock);
    if (bus->up) {
        if (atomic_load(&bus->pings_out) >= 2) {
            cp__log(CP_LOG_WARN, "bus: %s:%u does not answer pings", bus->nodes[bus->node].host,
                    bus->nodes[bus->node].port);
            for (int i = 0; i < bus->drv->conns; i++)
                if (bus->conn[i])
                    cp_session_disconnect(bus->conn[i]);
        } else if (bus->drv->ping(bus) == 0) {
            atomic_fetch_add(&bus->pings_out, 1);
        }
    }
    pthread_mutex_unlock(&bus->lock);
}

void cp__bus_pong(cp_bus *bus) { atomic_store(&bus->pings_out, 0); }

void cp__bus_slow_consumer(cp_bus *bus) { cp__stat_add(&bus->st.slow_consumer, 1); }

void cp__bus_set_max_payload(cp_bus *bus, size_t n)
{
    pthread_mutex_lock(&bus->lock);
    bus->max_payload = n < PAYLOAD_MAX ? n : PAYLOAD_MAX;
    pthread_mutex_unlock(&bus->lock);
}

/* ------------------------------------------------------------------ subscriptions */

static _Thread_local cp_bus_sub *tl_calling; /* the subscription whose fn runs here */

static void sub_unref(cp_bus_sub *sub)
{
    if (atomic_fetch_sub_explicit(&sub->refs, 1, memory_order_acq_rel) != 1)
        return;
    cp_bus *bus = sub->bus;
    if (sub->q)
        cp_jobq_unref(sub->q);
    cp__free(sub->subject);
    cp__free(sub->queue);
    cp__free(sub);
    bus_unref(bus);
}

/* Runs fn unless the subscription ended. The count of calls under way and
 * the dead flag are both sequentially consistent: either this call sees the
 * flag, or cp_bus_unsubscribe sees the call and waits for it. */
static void call_fn(cp_bus_sub *sub, const cp_bus_msg *m)
{
    atomic_fetch_add(&sub->calls, 1);
    if (!atomic_load(&sub->dead)) {
        cp_bus_sub *outer = tl_calling;
        tl_calling = sub;
        sub->fn(sub->arg, m);
        tl_calling = outer;
    }
    atomic_fetch_sub(&sub->calls, 1);
}

typedef struct bus_job {
    cp_bus_sub *sub;
    cp_bus_msg m;
    char text[]; /* subject, reply, then the payload */
} bus_job;

static void job_run(void *arg)
{
    bus_job *j = arg;
    call_fn(j->sub, &j->m);
    sub_unref(j->sub);
    cp__free(j);
}

/* A copy of m for the subscription's job queue. */
static int deliver_job(cp_bus_sub *sub, const cp_bus_msg *m)
{
    size_t sn = strlen(m->subject) + 1, rn = strlen(m->reply) + 1;
    bus_job *j = cp__malloc(sizeof *j + sn + rn + m->len);
    if (!j)
        return -ENOMEM;
    char *subject = j->text, *reply = j->text + sn;
    uint8_t *data = (uint8_t *)j->text + sn + rn;
    memcpy(subject, m->subject, sn);
    memcpy(reply, m->reply, rn);
    if (m->len)
        memcpy(data, m->data, m->len);
    j->sub = sub;
    j->m = (cp_bus_msg){ .subject = subject, .data = data, .len = m->len, .reply = reply };
    atomic_fetch_add(&sub->refs, 1);
    int r = cp_jobq_push(sub->q, job_run, j);
    if (r < 0) {
        atomic_fetch_sub(&sub->refs, 1);
        cp__free(j);
    }
    return r;
}

static void deliver(cp_bus *bus, cp_bus_sub *sub, const cp_bus_msg *m)
{
    cp__stat_add(&bus->st.delivered, 1);
    if (!sub->q)
        call_fn(sub, m);
    else if (deliver_job(sub, m) < 0)
        cp__stat_add(&bus->st.dropped, 1);
}

void cp__bus_deliver_sid(cp_bus *bus, uint64_t sid, const cp_bus_msg *m)
{
    uint32_t slot = (uint32_t)sid - 1;
    pthread_mutex_lock(&bus->lock);
    cp_bus_sub *sub = slot < bus->capsubs ? bus->subs[slot] : NULL;
    if (sub && sub->sid == sid)
        atomic_fetch_add(&sub->refs, 1);
    else
        sub = NULL;
    pthread_mutex_unlock(&bus->lock);
    if (!sub)
        return; /* ended: an UNSUB crossed the message on the wire */
    deliver(bus, sub, m);
    sub_unref(sub);
}

void cp__bus_deliver_subject(cp_bus *bus, const cp_bus_msg *m)
{
    /* Every subscription to the subject gets it. They are copied out
     * referenced first, so that no lock is held while fn runs. */
    cp_bus_sub *some[16], **hit = some;
    uint32_t n = 0, cap = 16;
    pthread_mutex_lock(&bus->lock);
    for (uint32_t i = 0; i < bus->capsubs; i++) {
        cp_bus_sub *sub = bus->subs[i];
        if (!sub || strcmp(sub->subject, m->subject) != 0)
            continue;
        if (n == cap) {
            /* NOLINTNEXTLINE(bugprone-sizeof-expression): an array of pointers: the element size is a pointer's */
            cp_bus_sub **more = cp__malloc(sizeof *more * cap * 2);
            if (!more)
                break;
            /* NOLINTNEXTLINE(bugprone-sizeof-expression): an array of pointers: the element size is a pointer's */
            memcpy(more, hit, sizeof *more * n);
            if (hit != some)
                cp__free(hit);
            hit = more;
            cap *= 2;
        }
        atomic_fetch_add(&sub->refs, 1);
        hit[n++] = sub;
    }
    pthread_mutex_unlock(&bus->lock);
    for (uint32_t i = 0; i < n; i++) {
        deliver(bus, hit[i], m);
        sub_unref(hit[i]);
    }
    if (hit != some)
        cp__free(hit);
}

int cp__bus_each_sub(cp_bus *bus, int (*fn)(cp_bus *bus, cp_bus_sub *sub))
{
    for (uint32_t i = 0; i < bus->capsubs; i++) {
        if (!bus->subs[i])
            continue;
        int r = fn(bus, bus->subs[i]);
        if (r < 0)
            return r;
    }
    return 0;
}

/* Under the lock: a free slot in the table, grown if needed. */
static int slot_take(cp_bus *bus, uint32_t *slot)
{
    if (bus->nsubs == bus->capsubs) {
        uint32_t cap = bus->capsubs ? bus->capsubs * 2 : 16;
        /* NOLINTNEXTLINE(bugprone-sizeof-expression): an array of pointers: the element size is a pointer's */
        cp_bus_sub **subs = cp__realloc(bus->subs, sizeof *subs * cap);
        if (!subs)
            return -ENOMEM;
        bus->subs = subs;
        uint32_t *gens = cp__realloc(bus->gens, sizeof *gens * cap);
        if (!gens)
            return -ENOMEM;
        bus->gens = gens;
        for (uint32_t i = bus->capsubs; i < cap; i++) {
            subs[i] = NULL;
            gens[i] = 0;
        }
        bus->free_slot = bus->capsubs;
        bus->capsubs = cap;
    }
    while (bus->subs[bus->free_slot])
        bus->free_slot = (bus->free_slot + 1) % bus->capsubs;
    *slot = bus->free_slot;
    return 0;
}

static cp_bus_sub *sub_new(cp_bus *bus, const char *subject, const char *queue, cp_bus_fn fn, void *arg,
                           cp_jobq *q)
{
    cp_bus_sub *sub = cp__zalloc(sizeof *sub);
    if (!sub)
        return NULL;
    size_t sn = strlen(subject) + 1, qn = queue ? strlen(queue) + 1 : 0;
    sub->subject = cp__malloc(sn);
    sub->queue = qn ? cp__malloc(qn) : NULL;
    if (!sub->subject || (qn && !sub->queue)) {
        cp__free(sub->subject);
        cp__free(sub);
        return NULL;
    }
    memcpy(sub->subject, subject, sn);
    if (qn)
        memcpy(sub->queue, queue, qn);
    sub->bus = bus;
    sub->fn = fn;
    sub->arg = arg;
    sub->q = q;
    if (q)
        cp_jobq_ref(q);
    atomic_init(&sub->refs, 2); /* the handle's and the table's */
    atomic_fetch_add(&bus->refs, 1);
    return sub;
}

int cp_bus_subscribe(cp_bus_sub **out, cp_bus *bus, const char *subject, const char *queue, cp_bus_fn fn,
                     void *arg, cp_jobq *q)
{
    if (!out || !bus || !subject || !fn)
        return -EINVAL;
    int r = bus->drv->sub_ok(subject, queue);
    if (r < 0)
        return r;
    cp_bus_sub *sub = sub_new(bus, subject, queue, fn, arg, q);
    if (!sub)
        return -ENOMEM;
    uint32_t slot = 0;
    pthread_mutex_lock(&bus->lock);
    r = bus->destroying ? -ESHUTDOWN : slot_take(bus, &slot);
    if (r == 0) {
        sub->sid = ((uint64_t)++bus->gens[slot] << 32) | (slot + 1);
        bus->subs[slot] = sub;
        bus->nsubs++;
        /* Not up: the hello after the connect subscribes it. A failed send
         * means the connection is breaking, and the same holds. */
        if (bus->up)
            bus->drv->subscribe(bus, sub);
    }
    pthread_mutex_unlock(&bus->lock);
    if (r < 0) {
        atomic_store(&sub->refs, 1);
        sub_unref(sub);
        return r;
    }
    *out = sub;
    return 0;
}

int cp_bus_unsubscribe(cp_bus_sub *sub)
{
    if (!sub)
        return -EINVAL;
    cp_bus *bus = sub->bus;
    atomic_store(&sub->dead, true);
    bool listed = false;
    pthread_mutex_lock(&bus->lock);
    uint32_t slot = (uint32_t)sub->sid - 1;
    if (slot < bus->capsubs && bus->subs[slot] == sub) {
        bus->subs[slot] = NULL;
        bus->nsubs--;
        listed = true;
        if (bus->up)
            bus->drv->unsubscribe(bus, sub);
    }
    pthread_mutex_unlock(&bus->lock);
    if (listed)
        sub_unref(sub);
    /* A call under way on another thread finishes before this returns. */
    if (tl_calling != sub)
        while (atomic_load(&sub->calls))
            cp__sleep_ms(1);
    sub_unref(sub);
    return 0;
}

/* ------------------------------------------------------------------ publish */

/* Under the lock: head (may be empty) and the payload as one message to
 * subject. */
static int publish_locked(cp_bus *bus, const char *subject, const uint8_t *head, size_t head_len,
                          const cp_bus_payload *p)
{
    size_t len = head_len + p->len;
    if (bus->destroying)
        return -ESHUTDOWN;
    if (!bus->up)
        return -ENOTCONN;
    if (len > bus->max_payload)
        return -EMSGSIZE;
    if (pending(bus) + len > bus->pending_limit)
        return -EAGAIN;
    int r = bus->drv->publish(bus, subject, head, head_len, p);
    if (r == -ENOMEM) {
        /* Part of the message may be queued already: the stream can only
         * start again on a new connection. */
        for (int i = 0; i < bus->drv->conns; i++)
            if (bus->conn[i])
                cp_session_disconnect(bus->conn[i]);
    }
    return r;
}

/* One message to subject; with seq, a bridged room message: behind the
 * envelope (magic, this bus's origin, ++*seq), its number taken under the
 * lock so that numbers leave in order. */
static int publish(cp_bus *bus, const char *subject, uint64_t *seq, const cp_bus_payload *p)
{
    uint8_t env[CP_BUS_ENVELOPE];
    pthread_mutex_lock(&bus->lock);
    if (seq) {
        /* NOLINTNEXTLINE(bugprone-not-null-terminated-result): bytes on the wire, not a C string */
        memcpy(env, CP_BUS_MAGIC, 4);
        cp_put_u64(env + 4, bus->origin);
        cp_put_u64(env + 12, ++*seq);
    }
    int r = publish_locked(bus, subject, env, seq ? sizeof env : 0, p);
    pthread_mutex_unlock(&bus->lock);
    /* Lost: a room message that did not go (nobody can retry it), or any
     * message while the connection was down. The other errors of a plain
     * publish are the caller's to act on (-EAGAIN: wait and retry). */
    if (r == 0)
        cp__stat_add(&bus->st.published, 1);
    else if (seq || r == -ENOTCONN)
        cp__stat_add(&bus->st.dropped, 1);
    return r;
}

int cp__bus_publish_room(cp_bus *bus, const char *subject, uint64_t *seq, cp_sendbuf *b)
{
    cp_bus_payload p = { cp__sendbuf_bytes(b), b->len, b };
    return publish(bus, subject, seq, &p);
}

void cp__bus_ref(cp_bus *bus) { atomic_fetch_add(&bus->refs, 1); }
void cp__bus_unref(cp_bus *bus) { bus_unref(bus); }
void cp__bus_count_gaps(cp_bus *bus, uint64_t n) { cp__stat_add(&bus->st.gaps, n); }
void cp__bus_count_dropped(cp_bus *bus, uint64_t n) { cp__stat_add(&bus->st.dropped, n); }

int cp__bus_bridge_add(cp_bus *bus, cp_bus_bridge *br)
{
    int r = 0;
    pthread_mutex_lock(&bus->lock);
    if (bus->destroying) {
        r = -ESHUTDOWN;
    } else if (bus->nbridges == bus->capbridges) {
        uint32_t cap = bus->capbridges ? bus->capbridges * 2 : 8;
        /* NOLINTNEXTLINE(bugprone-sizeof-expression): an array of pointers: the element size is a pointer's */
        cp_bus_bridge **a = cp__realloc(bus->bridges, sizeof *a * cap);
        if (a) {
            bus->bridges = a;
            bus->capbridges = cap;
        } else {
            r = -ENOMEM;
        }
    }
    if (r == 0)
        bus->bridges[bus->nbridges++] = br;
    pthread_mutex_unlock(&bus->lock);
    return r;
}

bool cp__bus_bridge_remove(cp_bus *bus, cp_bus_bridge *br)
{
    bool found = false;
    pthread_mutex_lock(&bus->lock);
    for (uint32_t i = 0; i < bus->nbridges && !found; i++)
        if (bus->bridges[i] == br) {
            bus->bridges[i] = bus->bridges[--bus->nbridges];
            found = true;
        }
    pthread_mutex_unlock(&bus->lock);
    return found;
}

int cp_bus_publish_buf(cp_bus *bus, const char *subject, cp_sendbuf *b)
{
    if (!bus || !subject || !b || !cp__nats_subject_ok(subject, 0))
        return -EINVAL;
    cp_bus_payload p = { cp__sendbuf_bytes(b), b->len, b };
    return publish(bus, subject, NULL, &p);
}

/* The bytes go straight into the connection's buffer: no send buffer of
 * their own. */
int cp_bus_publish(cp_bus *bus, const char *subject, const void *data, size_t len)
{
    if (!bus || !subject || (!data && len) || !cp__nats_subject_ok(subject, 0))
        return -EINVAL;
    cp_bus_payload p = { data, len, NULL };
    return publish(bus, subject, NULL, &p);
}

void cp_bus_stats_get(cp_bus *bus, cp_bus_stats *out)
{
    if (!bus || !out)
        return;
    out->published = atomic_load(&bus->st.published);
    out->delivered = atomic_load(&bus->st.delivered);
    out->dropped = atomic_load(&bus->st.dropped);
    out->gaps = atomic_load(&bus->st.gaps);
    out->reconnects = atomic_load(&bus->st.reconnects);
    out->slow_consumer = atomic_load(&bus->st.slow_consumer);
    pthread_mutex_lock(&bus->lock);
    out->pending_bytes = pending(bus);
    out->connected = bus->up;
    pthread_mutex_unlock(&bus->lock);
}

/* ------------------------------------------------------------------ create, destroy */

static uint64_t make_origin(void)
{
    static atomic_uint_fast64_t made;
    uint64_t x = cp__now_ns() ^ ((uint64_t)(uintptr_t)&x << 16) ^ (atomic_fetch_add(&made, 1) << 56);
    /* splitmix64: spreads the bits, so two servers started together differ. */
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return (x ^ (x >> 31)) | 1;
}

static int bus_opts_read(cp_bus *bus, const cp_bus_opts *o)
{
    if (!o->url || (o->name && !name_ok(o->name)))
        return -EINVAL;
    int r = parse_url(bus, o->url);
    if (r < 0)
        return r;
    snprintf(bus->name, sizeof bus->name, "%s", o->name ? o->name : "cport");
    bus->pending_limit = o->pending_limit ? o->pending_limit : PENDING_DEFAULT;
    bus->ping_ms = o->ping_interval_ms ? o->ping_interval_ms : PING_DEFAULT_MS;
    bus->backoff_max_ms = o->reconnect_max_ms ? o->reconnect_max_ms : BACKOFF_MAX_DEFAULT_MS;
    if (bus->backoff_max_ms < BACKOFF_FIRST_MS)
        bus->backoff_max_ms = BACKOFF_FIRST_MS;
    return 0;
}

static void bus_free(cp_bus *bus)
{
    cp__free(bus->ends);
    cp__free(bus->subs);
    cp__free(bus->gens);
    cp__free(bus->bridges);
    pthread_mutex_destroy(&bus->lock);
    cp__free(bus);
}

static void bus_unref(cp_bus *bus)
{
    if (atomic_fetch_sub_explicit(&bus->refs, 1, memory_order_acq_rel) == 1)
        bus_free(bus);
}

static int services_start(cp_bus *bus)
{
    for (int i = 0; i < bus->nnodes; i++) {
        cp_client_opts co = {
            .host = bus->nodes[i].host,
            .port = bus->nodes[i].port,
            .max_sessions = CP_BUS_CONNS_MAX,
            .session = { .framing = CP_FRAMING_RAW,
                         /* The pending bound comes first; the queue's own limit
                         * only stops a runaway (a small buffer may pin a chunk). */
                         .send_queue_limit = bus->pending_limit * 4 + (4u << 20),
                         .send_queue_high = bus->pending_limit * 4 + (4u << 20) },
        };
        int r = cp_client_start(&bus->svc[i], bus->port, &co, &bus_handlers, bus);
        if (r < 0)
            return r;
        cp__service_set_raw_limit(bus->svc[i], RAW_LIMIT);
    }
    return 0;
}

static void services_stop(cp_bus *bus)
{
    for (int i = 0; i < bus->nnodes; i++)
        if (bus->svc[i])
            cp_service_stop(bus->svc[i]);
}

int cp_bus_create(cp_bus **out, cp_port *port, const cp_bus_opts *opts)
{
    if (!out || !port || !opts)
        return -EINVAL;
    cp_bus *bus = cp__zalloc(sizeof *bus);
    if (!bus)
        return -ENOMEM;
    int r = bus_opts_read(bus, opts);
    if (r < 0) {
        cp__free(bus);
        return r;
    }
    bus->port = port;
    atomic_init(&bus->refs, 1);
    pthread_mutex_init(&bus->lock, NULL);
    bus->origin = make_origin();
    bus->max_payload = PAYLOAD_MAX;
    bus->backoff_ms = BACKOFF_FIRST_MS;
    r = services_start(bus);
    if (r == 0) {
        atomic_fetch_add(&bus->refs, 1); /* the pinger's */
        r = cp_timer_start(&bus->pinger, port, bus->ping_ms, bus->ping_ms, ping_fire, bus, NULL);
        if (r < 0)
            atomic_fetch_sub(&bus->refs, 1);
    }
    if (r < 0) {
        services_stop(bus);
        bus_free(bus);
        return r;
    }
    pthread_mutex_lock(&bus->lock);
    connect_node(bus);
    pthread_mutex_unlock(&bus->lock);
    *out = bus;
    return 0;
}

int cp_bus_destroy(cp_bus *bus)
{
    if (!bus)
        return -EINVAL;
    if (cp__on_worker(bus->port))
        return -EDEADLK;
    pthread_mutex_lock(&bus->lock);
    bus->destroying = true;
    cp_timer *retry = bus->retry;
    bus->retry = NULL;
    pthread_mutex_unlock(&bus->lock);
    if (retry && cp_timer_cancel(retry) == 0)
        bus_unref(bus);           /* it will not fire: its reference is ours to drop */
    cp_timer_cancel(bus->pinger); /* repeating: no call runs after it */
    bus_unref(bus);
    /* The bridges first: their taps publish through the connection. */
    pthread_mutex_lock(&bus->lock);
    cp_bus_bridge **brs = bus->bridges;
    uint32_t nbr = bus->nbridges;
    bus->bridges = NULL;
    bus->nbridges = bus->capbridges = 0;
    pthread_mutex_unlock(&bus->lock);
    for (uint32_t i = 0; i < nbr; i++)
        cp__bus_bridge_end(brs[i]);
    cp__free(brs);
    services_stop(bus);
    /* The subscriptions end: their handles still hold references. */
    pthread_mutex_lock(&bus->lock);
    cp_bus_sub **subs = bus->subs;
    uint32_t cap = bus->capsubs;
    bus->subs = NULL;
    bus->capsubs = bus->nsubs = 0;
    pthread_mutex_unlock(&bus->lock);
    for (uint32_t i = 0; i < cap; i++) {
        if (!subs[i])
            continue;
        atomic_store(&subs[i]->dead, true);
        sub_unref(subs[i]);
    }
    cp__free(subs);
    bus_unref(bus);
    return 0;
}
