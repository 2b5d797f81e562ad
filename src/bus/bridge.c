/* SPDX-License-Identifier: MIT */
/*
 * A group bridged over the bus: one room across servers.
 *
 * Out: the group's tap sees every buffer the group broadcasts and publishes
 * it to the subject behind a 20-byte envelope (magic, the bus's origin, a
 * sequence number). The payload buffer itself is queued on the broker
 * connection: no copy. In: a message on the subject from another origin is
 * checked (whole packets only, so a broken or hostile peer cannot break
 * the members' framing), its sequence number compared with the origin's
 * last (a jump is a gap: messages lost), and its packets are broadcast to
 * the local members as one shared buffer, without the tap (or it would go
 * round again).
 *
 * Order: a sender's packets reach the group in order on its server; each
 * broadcast publishes under the bus's lock, so they leave in that order;
 * the broker keeps a publisher's order; and the receiving bus delivers one
 * connection's messages in order, on one worker at a time.
 */
#include "bus/bus.h"
#include "bus/nats_wire.h"

#include <errno.h>
#include <string.h>

/* Origins remembered for gap counting: servers restart with new origins,
 * so the oldest seen is forgotten past this many. */
#define PEERS_MAX 1024u

typedef struct peer_seq {
    uint64_t origin, last, seen;
} peer_seq;

struct cp_bus_bridge {
    cp__group_tap tap; /* first: the tap's callbacks get the bridge */
    /* The bus list's (dropped by whoever takes the bridge off the list and
     * ends it), the group's while the tap is set, each tap call's. The
     * subscription names it as its arg without one: cp__bus_bridge_end
     * unsubscribes, which waits out a delivery under way, before it drops
     * the list's. */
    atomic_uint refs;
    atomic_bool ended;
    cp_bus *bus; /* referenced */
    cp_group *g; /* referenced */
    cp_bus_sub *sub;
    uint64_t seq; /* under the bus's lock */
    char *subject;
    /* On the broker connection's worker only (one at a time). */
    peer_seq *peers;
    uint32_t npeers, cappeers;
    uint64_t tick;
};

static void bridge_ref(cp__group_tap *t) { atomic_fetch_add(&((cp_bus_bridge *)t)->refs, 1); }

static void bridge_unref(cp__group_tap *t)
{
    cp_bus_bridge *br = (cp_bus_bridge *)t;
    if (atomic_fetch_sub_explicit(&br->refs, 1, memory_order_acq_rel) != 1)
        return;
    cp__group_unref(br->g);
    cp__bus_unref(br->bus);
    cp__free(br->peers);
    cp__free(br->subject);
    cp__free(br);
}

static void bridge_tap(cp__group_tap *t, cp_sendbuf *b, const cp_session *skip)
{
    cp_bus_bridge *br = (cp_bus_bridge *)t;
    (void)skip; /* the sender is local: every remote member gets it */
    cp__bus_publish_room(br->bus, br->subject, &br->seq, b);
}

/* Whether data is a run of whole packets ({u16 size, u16 id}, size >= 4). */
static bool whole_packets(const uint8_t *p, size_t n)
{
    size_t off = 0;
    while (off < n) {
        if (n - off < CP_PACKET_HEADER)
            return false;
        size_t size = cp_get_u16(p + off);
        if (size < CP_PACKET_HEADER || size > n - off)
            return false;
        off += size;
    }
    return n > 0;
}

/* The origin's entry, made (or the oldest one reused) if new; NULL when it is
 * new, after making it. */
static peer_seq *peer_find(cp_bus_bridge *br, uint64_t origin, uint64_t seq)
{
    br->tick++;
    for (uint32_t i = 0; i < br->npeers; i++)
        if (br->peers[i].origin == origin) {
            br->peers[i].seen = br->tick;
            return &br->peers[i];
        }
    peer_seq *slot = NULL;
    if (br->npeers < br->cappeers) {
        slot = &br->peers[br->npeers++];
    } else if (br->cappeers < PEERS_MAX) {
        uint32_t cap = br->cappeers ? br->cappeers * 2 : 8;
        peer_seq *a = cp__realloc(br->peers, sizeof *a * cap);
        if (a) {
            br->peers = a;
            br->cappeers = cap;
            slot = &br->peers[br->npeers++];
        }
    }
    if (!slot && br->npeers) {
        slot = &br->peers[0];
        for (uint32_t i = 1; i < br->npeers; i++)
            if (br->peers[i].seen < slot->seen)
                slot = &br->peers[i];
    }
    if (slot)
        *slot = (peer_seq){ origin, seq, br->tick };
    return NULL;
}

static void bridge_recv(void *arg, const cp_bus_msg *m)
{
    cp_bus_bridge *br = arg;
    if (m->len < CP_BUS_ENVELOPE || memcmp(m->data, CP_BUS_MAGIC, 4) != 0) {
        cp__bus_count_dropped(br->bus, 1);
        return;
    }
    uint64_t origin = cp_get_u64(m->data + 4), seq = cp_get_u64(m->data + 12);
    if (origin == br->bus->origin)
        return; /* our own, back from a broker that echoes (Redis) */
    peer_seq *p = peer_find(br, origin, seq);
    if (p) {
        if (seq <= p->last) {
            cp__bus_count_dropped(br->bus, 1); /* not newer: a replay */
            return;
        }
        if (seq > p->last + 1)
            cp__bus_count_gaps(br->bus, seq - p->last - 1);
        p->last = seq;
    }
    const uint8_t *body = m->data + CP_BUS_ENVELOPE;
    size_t n = m->len - CP_BUS_ENVELOPE;
    if (!whole_packets(body, n)) {
        cp__bus_count_dropped(br->bus, 1);
        return;
    }
    cp_sendbuf *b = cp_sendbuf_copy(body, n);
    if (!b) {
        cp__bus_count_dropped(br->bus, 1);
        return;
    }
    cp__group_broadcast_local(br->g, b);
    cp_sendbuf_unref(b);
}

void cp__bus_bridge_end(cp_bus_bridge *br)
{
    if (atomic_exchange(&br->ended, true))
        return;
    cp__group_clear_tap(br->g, &br->tap);
    cp_bus_unsubscribe(br->sub);
    bridge_unref(&br->tap); /* the bus list's */
}

/* The group was destroyed: the bridge leaves the bus. Whoever takes it off
 * the bus's list owns the list's reference and ends it: here, or
 * cp_bus_destroy if it got there first. */
static void bridge_closed(cp__group_tap *t)
{
    cp_bus_bridge *br = (cp_bus_bridge *)t;
    if (cp__bus_bridge_remove(br->bus, br))
        cp__bus_bridge_end(br);
}

int cp_group_bridge(cp_group *g, cp_bus *bus, const char *subject)
{
    if (!g || !bus || !subject || !cp__nats_subject_ok(subject, 0))
        return -EINVAL;
    cp_bus_bridge *br = cp__zalloc(sizeof *br);
    size_t sn = strlen(subject) + 1;
    char *copy = cp__malloc(sn);
    if (!br || !copy) {
        cp__free(br);
        cp__free(copy);
        return -ENOMEM;
    }
    memcpy(copy, subject, sn);
    br->tap = (cp__group_tap){ bridge_tap, bridge_closed, bridge_ref, bridge_unref };
    atomic_init(&br->refs, 1);
    br->subject = copy;
    br->bus = bus;
    cp__bus_ref(bus);
    br->g = g;
    cp__group_ref(g);
    int r = cp_bus_subscribe(&br->sub, bus, subject, NULL, bridge_recv, br, NULL);
    if (r < 0) {
        atomic_store(&br->ended, true);
        bridge_unref(&br->tap);
        return r;
    }
    r = cp__bus_bridge_add(bus, br);
    if (r == 0) {
        r = cp__group_set_tap(g, &br->tap);
        if (r < 0)
            cp__bus_bridge_remove(bus, br);
    }
    if (r < 0) {
        atomic_store(&br->ended, true);
        cp_bus_unsubscribe(br->sub);
        bridge_unref(&br->tap);
    }
    return r;
}
