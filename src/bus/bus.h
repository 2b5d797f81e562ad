/* SPDX-License-Identifier: MIT */
/*
 * The bus layer: rooms across servers over a broker (NATS, Redis), above
 * services. The core (bus.c) keeps the broker connections, the
 * subscriptions, the pending-bytes account and the statistics; a broker
 * driver (nats.c, redis.c) turns them into its protocol; bridge.c joins a
 * group to a subject through the group's tap (net/net.h).
 *
 * Threads: every field below the lock is guarded by it. Input from the
 * broker arrives on the worker that owns the connection's session; publishes
 * come from any thread. A publish queues its bytes on the session under the
 * lock, so the order of the bytes on the wire is the order in which
 * publishes took the lock (cp_session_send keeps happens-before order).
 */
#ifndef CP_BUS_BUS_H
#define CP_BUS_BUS_H

#include "buf/sendbuf.h"
#include "net/net.h"

#define CP_BUS_NODES_MAX 16
#define CP_BUS_CONNS_MAX 2 /* Redis: a subscribing and a publishing connection */
#define CP_BUS_NAME_MAX 64

typedef struct cp_bus_node {
    char host[256];
    uint16_t port;
} cp_bus_node;

struct cp_bus_sub {
    cp_bus *bus;
    /* The handle's, the table's while subscribed, one per queued job, and
     * one per delivery under way. */
    atomic_uint refs;
    atomic_uint calls; /* deliveries running fn now */
    atomic_bool dead;  /* unsubscribed: nothing more is delivered */
    uint64_t sid;      /* NATS subscription id (slot and generation) */
    char *subject;
    char *queue; /* NULL: not in a queue group */
    cp_bus_fn fn;
    void *arg;
    cp_jobq *q;
};

/* A message's payload: its bytes, and the send buffer that holds them when
 * the caller has one (a driver may then queue the buffer itself instead of
 * copying the bytes; buf is NULL for cp_bus_publish's plain bytes). */
typedef struct cp_bus_payload {
    const uint8_t *data;
    size_t len;
    cp_sendbuf *buf;
} cp_bus_payload;

/* What a broker driver does for the core. Called with the bus's lock held,
 * except input (on the connection's worker, no lock). */
typedef struct cp_bus_driver {
    int conns; /* connections per broker node */
    /* After every connection is up: the handshake and a subscribe for each
     * live subscription. */
    int (*hello)(cp_bus *bus);
    /* Bytes the broker sent on connection i; returns what it consumed. */
    size_t (*input)(cp_bus *bus, cp_session *s, int i, const uint8_t *p, size_t n);
    /* Queues a publish of head (may be NULL) followed by the payload. */
    int (*publish)(cp_bus *bus, const char *subject, const uint8_t *head, size_t head_len,
                   const cp_bus_payload *p);
    int (*subscribe)(cp_bus *bus, cp_bus_sub *sub);
    int (*unsubscribe)(cp_bus *bus, cp_bus_sub *sub);
    int (*ping)(cp_bus *bus);
    /* Whether this broker can do what sub asks (wildcards, queue groups). */
    int (*sub_ok)(const char *subject, const char *queue);
    /* Connection i ended: its state goes (optional; on its worker). */
    void (*conn_closed)(cp_bus *bus, int i);
} cp_bus_driver;

typedef struct cp_bus_bridge cp_bus_bridge;

struct cp_bus {
    cp_port *port;
    const cp_bus_driver *drv;
    /* Who keeps the memory: the creator (dropped by cp_bus_destroy), the
     * ping timer and a retry timer not yet fired (dropped by the destroy's
     * cancel, or by the retry's own call), each subscription (dropped when
     * its last reference goes: a handle may outlive the destroy), and each
     * bridge (dropped when the bridge is freed). */
    atomic_uint refs;
    uint64_t origin; /* this bus's id in bridged messages */
    char name[CP_BUS_NAME_MAX + 1];
    size_t pending_limit;
    uint32_t ping_ms, backoff_max_ms;
    cp_bus_node nodes[CP_BUS_NODES_MAX];
    int nnodes;
    cp_service *svc[CP_BUS_NODES_MAX]; /* a client service per node */

    pthread_mutex_t lock;
    bool destroying;
    int node;                           /* the node in use or being tried */
    cp_session *conn[CP_BUS_CONNS_MAX]; /* referenced while connected */
    /* The driver's per-connection state (Redis: its reader), touched only by
     * the connection's input and conn_closed, on its worker. */
    void *drv_state[CP_BUS_CONNS_MAX];
    /* Small writes (lines, small messages) are appended to an open buffer
     * per connection, sent when full or by a post to the connection's
     * worker, which runs in its next round: a burst of publishes becomes
     * a few large entries in the session's queue, not one each. */
    cp_sendbuf *out[CP_BUS_CONNS_MAX];
    size_t out_len[CP_BUS_CONNS_MAX];
    bool flush_posted[CP_BUS_CONNS_MAX];
    int attempts; /* connects under way */
    bool up, was_up, failed;
    uint32_t backoff_ms;
    cp_timer *retry;  /* one-shot: the next connect */
    cp_timer *pinger; /* repeating */
    /* Pings sent since the broker last sent anything. Any bytes prove it
     * alive, not only a PONG: under a flood the answer waits behind
     * megabytes of messages. Atomic: input clears it without the lock. */
    atomic_uint pings_out;
    size_t max_payload; /* the broker's, when it said */
    /* Pending bytes: queued on the connection and not yet written. Each
     * message's end, in bytes queued since the connection came up, waits in
     * ends[] until on_sent passes it, so the messages a break loses can be
     * counted. */
    uint64_t queued, written;
    uint64_t *ends;
    size_t ends_head, ends_len, ends_cap;
    /* Subscriptions by slot; the sid carries the slot and a generation, so
     * a message for an ended subscription never reaches a new one. */
    cp_bus_sub **subs;
    uint32_t *gens;
    uint32_t nsubs, capsubs, free_slot;
    cp_bus_bridge **bridges;
    uint32_t nbridges, capbridges;

    struct {
        atomic_uint_fast64_t published, delivered, dropped, gaps, reconnects, slow_consumer;
    } st;
};

/* The core, for drivers (bus.c). */
/* Queues b on connection i (under the lock); counts its bytes as pending. A
 * message's last part passes msg_end so that a break counts it lost. */
int cp__bus_send(cp_bus *bus, int i, cp_sendbuf *b, bool msg_end);
/* Appends a copy of data to connection i's open buffer (under the lock). */
int cp__bus_append(cp_bus *bus, int i, const void *data, size_t len, bool msg_end);
static inline int cp__bus_send_copy(cp_bus *bus, int i, const void *data, size_t len)
{
    return cp__bus_append(bus, i, data, len, false);
}
/* A message arrived for the subscription with this sid (NATS) or subject
 * (Redis); delivers it to its fn. On the connection's worker, no lock. */
void cp__bus_deliver_sid(cp_bus *bus, uint64_t sid, const cp_bus_msg *m);
void cp__bus_deliver_subject(cp_bus *bus, const cp_bus_msg *m);
/* The broker answered a ping. */
void cp__bus_pong(cp_bus *bus);
/* The broker called this bus a slow consumer (it is about to cut it). */
void cp__bus_slow_consumer(cp_bus *bus);
/* Calls fn for each live subscription (under the lock, for hello). */
int cp__bus_each_sub(cp_bus *bus, int (*fn)(cp_bus *bus, cp_bus_sub *sub));
/* A bridged room message: b's bytes behind the envelope (magic, this bus's
 * origin, ++*seq), the sequence number taken under the lock, so that the
 * numbers go out in order. A publish that fails still takes its number:
 * receivers then count the loss as a gap. */
#define CP_BUS_ENVELOPE 20u
#define CP_BUS_MAGIC "cpb\x01"
int cp__bus_publish_room(cp_bus *bus, const char *subject, uint64_t *seq, cp_sendbuf *b);
void cp__bus_ref(cp_bus *bus);
void cp__bus_unref(cp_bus *bus);
/* Bridges: listed so that cp_bus_destroy ends them; -ESHUTDOWN once it began. */
int cp__bus_bridge_add(cp_bus *bus, cp_bus_bridge *br);
bool cp__bus_bridge_remove(cp_bus *bus, cp_bus_bridge *br); /* false: not listed */
void cp__bus_count_gaps(cp_bus *bus, uint64_t n);
void cp__bus_count_dropped(cp_bus *bus, uint64_t n);
/* The broker's limit on a message's payload (from NATS's INFO). */
void cp__bus_set_max_payload(cp_bus *bus, size_t n);

extern const cp_bus_driver cp__bus_nats;
#ifdef CP_HAVE_HIREDIS
extern const cp_bus_driver cp__bus_redis;
/* Bytes from Redis on connection i, read and handled (the fuzzer drives it
 * without a socket): 0, or -EPROTO / -EMSGSIZE / -ENOMEM when the
 * connection must go. */
int cp__bus_redis_feed(cp_bus *bus, int i, const uint8_t *p, size_t n);
void cp__bus_redis_conn_closed(cp_bus *bus, int i);
#endif

/* Bridges (bridge.c): called by cp_bus_destroy for each one it took off its
 * list (and by the group's destroy). */
void cp__bus_bridge_end(cp_bus_bridge *br);

#endif
