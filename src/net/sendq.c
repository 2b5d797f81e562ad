/* SPDX-License-Identifier: MIT */
/*
 * A session's send queue: the buffers queued on it and not yet written, in
 * order, as a ring of references. Owner thread only; the session decides
 * when to write (session.c), this file keeps the ring, its counts, and what
 * the queue's memory is.
 *
 * Memory. The queue accounts (mem) what its entries may keep alive, not just
 * their bytes: a buffer carved from a shared 32 KiB chunk keeps the whole
 * chunk alive while it is queued, so a 4-byte packet queued behind a client
 * that never reads can pin 32 KiB. Each entry is charged what it may pin
 * (cp__sendbuf_charge): its chunk, or its own allocation; a chunk is charged
 * once for all the entries from it while it has one of CP_SENDQ_CHUNKS slots
 * (the usual case: a session's packets come from its own worker's chunk and
 * one or two others). Past that, a run of consecutive entries from one chunk
 * is charged once, by its last entry (the last to leave: ALONE_TAG; the
 * others carry COVERED_TAG), so a backlog of packets from chunks a worker
 * filled one after the other costs a chunk per chunk, not per packet. The
 * ring's slots count too. send_queue_limit is compared with this number.
 *
 * Compaction. Honest charges alone would cut a reader that is only a little
 * behind, and would let the chunks stay pinned. So once mem passes a quarter
 * of the limit (the queue is backed up), the entries worth copying (carved
 * from a chunk, or a small buffer in a big allocation) are copied into
 * blocks the queue owns, consecutive ones coalesced into one block of up to
 * BLOCK_MAX bytes, and the shared buffers are released; while the queue
 * stays backed up, new small buffers are appended to its tail block
 * directly. A tiny packet then costs its bytes, and no chunk stays pinned.
 * Entries that a pending send reads (inflight, from the head: io_uring and
 * IOCP read the buffers when the socket has room) are never touched;
 * compaction goes only through entries it has not seen yet (tidy), so its
 * cost is paid once per entry. Below the quarter (a reader that keeps up)
 * nothing is copied: a broadcast's one buffer stays shared.
 *
 * No ring for one entry: a queue that never holds more than one (a session
 * that writes a packet at a time, a WebSocket session after its upgrade
 * answer) keeps it in place of the ring's pointer.
 *
 * Shrinking. When the queue empties, a ring bigger than SQ_CAP_KEEP is freed
 * (a burst's ring would otherwise stay with the session for good; see
 * ring_free for what it costs a session that fills a big ring every round);
 * blocks are freed as they are written.
 */
#include "net/net.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define SQ_CAP_MIN 8u
#define SQ_CAP_KEEP 32u            /* an emptied queue keeps a ring this big at most */
#define SQ_REGROW_MAX 256u         /* a freed ring comes back at most this big at once */
#define ALONE_TAG ((uintptr_t)1)   /* charged its chunk itself (the chunk had no slot) */
#define COVERED_TAG ((uintptr_t)2) /* its chunk is charged by a later entry (of its run) */
#define FRAMED_TAG ((uintptr_t)4)  /* sent with the frame header in its headroom (a framed queue's) */
#define TAGS (ALONE_TAG | COVERED_TAG | FRAMED_TAG)
#define BLOCK_MIN 256u /* a new block's first capacity (a page's, in fact) */
/* Small buffers coalesce up to this: a block of 16 KiB of pages. */
#define BLOCK_MAX (16u * 1024u - sizeof(cp_sendbuf))

static cp_sendbuf *buf_of(uintptr_t v) { return (cp_sendbuf *)(v & ~TAGS); }
/* The place of the i-th entry from the head. Without a ring (cap 0) the
 * one entry's place is the queue's own field, which a const queue's caller
 * only reads. */
static uintptr_t *slot(const cp_sendq *q, uint32_t i)
{
    return q->cap ? &q->ring[(q->head + i) & (q->cap - 1)] : (uintptr_t *)(uintptr_t)&q->one;
}

/* The head entry has left. */
static void head_advance(cp_sendq *q)
{
    q->head = q->cap ? (q->head + 1) & (q->cap - 1) : 0;
    q->count--;
}
static cp_sendbuf *at(const cp_sendq *q, uint32_t i) { return buf_of(*slot(q, i)); }

/* An entry's bytes: a framed one's begin with its frame header. */
static size_t head_of(uintptr_t v) { return (v & FRAMED_TAG) ? cp__sendbuf_head_len(buf_of(v)->len) : 0; }
static const uint8_t *ent_bytes(uintptr_t v)
{
    size_t hl = head_of(v);
    return hl ? buf_of(v)->head + CP_SENDBUF_HEADROOM - hl : cp__sendbuf_bytes(buf_of(v));
}
static size_t ent_len(uintptr_t v) { return buf_of(v)->len + head_of(v); }

/* The bytes of entry v before the user's: its frame header (framed), then
 * its data's framing prefix (sendbuf.h). */
static size_t prefix_of(uintptr_t v) { return head_of(v) + buf_of(v)->framing; }

/* How many of entry v's bytes from off on are not the user's (a block,
 * which never moves, does not ask). */
static size_t framing_from(uintptr_t v, size_t off)
{
    size_t p = prefix_of(v);
    return p > off ? p - off : 0;
}

/* The user's bytes among t bytes of entry v written from off on (done: its
 * last byte is among them). Exact for a buffer, whose framing is a prefix;
 * a block, whose framing lies anywhere in it, counts when it is done, as a
 * whole. */
static size_t user_bytes(uintptr_t v, size_t off, size_t t, bool done)
{
    cp_sendbuf *b = buf_of(v);
    if (cp__sendbuf_is_block(b))
        return done ? b->len - b->framing : 0;
    size_t p = prefix_of(v), lo = off > p ? off : p, hi = off + t;
    return hi > lo ? hi - lo : 0;
}

/* ------------------------------------------------------------------ charges */

/* The slot charging chunk c, or -1. */
static int chunk_slot(const cp_sendq *q, const struct cp_chunk *c)
{
    for (int i = 0; i < CP_SENDQ_CHUNKS; i++)
        if (q->chunks[i].c == c)
            return i;
    return -1;
}

/* True if the tail entry charges b's chunk by itself: b can take that
 * charge over (a run of entries from one chunk is charged once, by its
 * last entry, which is the last to leave). */
static bool tail_carries(const cp_sendq *q, const cp_sendbuf *b)
{
    if (!q->count)
        return false;
    uintptr_t t = *slot(q, q->count - 1);
    return (t & ALONE_TAG) && buf_of(t)->chunk == b->chunk;
}

/* How a new entry b would be charged. */
enum { HOW_OWN = -1, HOW_CARRY = -2, HOW_ALONE = -3 }; /* else: its chunk's slot */
typedef struct plan {
    int how;       /* a slot of chunks[] (taken already, or free), or HOW_* */
    size_t charge; /* what mem grows by */
} plan;

static plan plan_for(const cp_sendq *q, const cp_sendbuf *b)
{
    if (!b->chunk)
        return (plan){ HOW_OWN, cp__sendbuf_charge(b) };
    int free_slot = -1;
    for (int i = 0; i < CP_SENDQ_CHUNKS; i++) {
        if (q->chunks[i].c == b->chunk)
            return (plan){ i, 0 };
        if (!q->chunks[i].c && free_slot < 0)
            free_slot = i;
    }
    if (tail_carries(q, b))
        return (plan){ HOW_CARRY, 0 };
    return (plan){ free_slot >= 0 ? free_slot : HOW_ALONE, cp__sendbuf_charge(b) };
}

size_t cp__sendq_charge(const cp_sendq *q, const cp_sendbuf *b) { return plan_for(q, b).charge; }

/* Charges b as a new entry as planned; returns the entry's ring value. */
static uintptr_t charge_take(cp_sendq *q, cp_sendbuf *b, plan p)
{
    uintptr_t v = (uintptr_t)b;
    q->mem += p.charge;
    if (p.how >= 0) {
        q->chunks[p.how].c = b->chunk;
        q->chunks[p.how].n++; /* 0 in a free slot */
    } else if (p.how == HOW_CARRY) {
        uintptr_t *t = slot(q, q->count - 1);
        *t = (*t & ~ALONE_TAG) | COVERED_TAG;
        v |= ALONE_TAG;
    } else if (p.how == HOW_ALONE) {
        v |= ALONE_TAG;
    }
    return v;
}

/* The entry v leaves the queue: its charge goes. */
static void charge_drop(cp_sendq *q, uintptr_t v)
{
    cp_sendbuf *b = buf_of(v);
    if (v & COVERED_TAG)
        return;
    if (b->chunk && !(v & ALONE_TAG)) {
        int i = chunk_slot(q, b->chunk);
        CP_ASSERT(i >= 0, "send queue: an entry's chunk has no slot");
        if (--q->chunks[i].n)
            return;
        q->chunks[i].c = NULL;
    }
    q->mem -= cp__sendbuf_charge(b);
}

/* ------------------------------------------------------------------ ring */

/* Rings are not malloc's: a burst resizes them all the time, and in
 * malloc's heap a small ring kept by an idle session (SQ_CAP_KEEP) landed
 * between the burst's freed chunks and kept a page of its own. Small rings
 * come from slabs by size (8 to 256 places), packed together; a ring of a
 * page or more is a run of pages (pages.c). */
#define RING_SLABS 6u /* 8, 16, ..., 256 places */
static cp_slab ring_slabs[RING_SLABS] = {
    CP_SLAB_INIT(8 * 8),  CP_SLAB_INIT(16 * 8),  CP_SLAB_INIT(32 * 8),
    CP_SLAB_INIT(64 * 8), CP_SLAB_INIT(128 * 8), CP_SLAB_INIT(256 * 8),
};

static cp_slab *ring_slab(uint32_t cap)
{
    uint32_t c = 0;
    while (c < RING_SLABS && (SQ_CAP_MIN << c) < cap)
        c++;
    return c < RING_SLABS ? &ring_slabs[c] : NULL;
}

static uintptr_t *ring_alloc(uint32_t cap)
{
    cp_slab *sl = ring_slab(cap);
    return sl ? cp__slab_alloc(sl) : cp__pages_get(sizeof(uintptr_t) * cap);
}

static void ring_release(uintptr_t *r, uint32_t cap)
{
    if (!r)
        return;
    cp_slab *sl = ring_slab(cap);
    if (sl)
        cp__slab_free(sl, r);
    else
        cp__pages_put(r, sizeof(uintptr_t) * cap);
}

/* Moves the entries to a ring of cap places (>= count). */
static int ring_resize(cp_sendq *q, uint32_t cap)
{
    uintptr_t *r = ring_alloc(cap);
    if (!r)
        return -ENOMEM;
    for (uint32_t i = 0; i < q->count; i++)
        r[i] = *slot(q, i);
    if (q->cap)
        ring_release(q->ring, q->cap);
    q->mem = q->mem - sizeof *r * q->cap + sizeof *r * cap;
    q->ring = r;
    q->head = 0;
    q->cap = cap;
    return 0;
}

static int ring_reserve(cp_sendq *q)
{
    if (q->count < q->cap || (!q->cap && !q->count))
        return 0;
    return ring_resize(q, q->cap ? q->cap * 2 : q->regrow ? q->regrow : SQ_CAP_MIN);
}

/* The queue is empty and its ring big: it goes, so that a burst's ring
 * does not stay with an idle session. A session that fills a big ring every
 * round gets it back in one allocation (regrow), not by doubling from 8; the
 * size it comes back at halves each time it was not outgrown. */
static void ring_free(cp_sendq *q)
{
    uint32_t back = q->cap == q->regrow ? q->cap / 2 : q->cap;
    q->regrow = back > SQ_REGROW_MAX ? SQ_REGROW_MAX : back > SQ_CAP_KEEP ? back : 0;
    q->mem -= sizeof *q->ring * q->cap;
    ring_release(q->ring, q->cap);
    q->ring = NULL;
    q->head = q->cap = 0;
}

/* ------------------------------------------------------------------ compaction */

/* A buffer whose bytes cost less copied than what it pins: carved from a
 * chunk, or a small part of a big allocation. Blocks are the queue's own. */
static bool worth_copying(const cp_sendbuf *b)
{
    if (b->chunk)
        return true;
    return !cp__sendbuf_is_block(b) && (size_t)b->len * 2 < cp__sendbuf_charge(b);
}

/* The block just before entry j that may take more bytes: the queue's own,
 * and not read by a pending send. */
static cp_sendbuf *block_before(const cp_sendq *q, uint32_t j)
{
    if (j == 0 || j <= q->inflight)
        return NULL;
    cp_sendbuf *b = at(q, j - 1);
    return cp__sendbuf_is_block(b) ? b : NULL;
}

/* The capacity blk should grow to for n more bytes: enough for all of them
 * if BLOCK_MAX allows, else BLOCK_MAX (the rest goes to a new block; the
 * queue is a byte stream, a buffer's bytes may span two blocks). Blocks
 * double as they fill, so that appending tiny packets one by one costs few
 * reallocs. */
static size_t grow_to(const cp_sendbuf *blk, size_t n)
{
    size_t need = (size_t)blk->len + n;
    if (need <= blk->cap || blk->cap >= BLOCK_MAX)
        return blk->cap;
    size_t cap = (size_t)blk->cap * 2;
    if (cap < need)
        cap = need;
    return cap > BLOCK_MAX ? BLOCK_MAX : cap;
}

static size_t new_block_cap(size_t n) { return n < BLOCK_MIN ? BLOCK_MIN : n; }

/* About what copying n bytes to the queue's tail (entry j) adds to mem. */
static size_t copy_cost(const cp_sendq *q, uint32_t j, size_t n)
{
    cp_sendbuf *blk = block_before(q, j);
    size_t cost = 0;
    if (blk) {
        size_t cap = grow_to(blk, n);
        size_t take = cap - blk->len < n ? cap - blk->len : n;
        cost = cp__sendbuf_block_charge(cap) - cp__sendbuf_charge(blk);
        n -= take;
    }
    return n ? cost + cp__sendbuf_block_charge(new_block_cap(n)) : cost;
}

/* Copies n bytes to the end of the entries before *j: into the block there
 * as far as it may grow, the rest into a new block at *j (the ring has that
 * slot). The first fr of them are not the user's (frame headers, a filter's
 * own bytes): the blocks count them. Out of memory, nothing is copied. */
static int copy_in(cp_sendq *q, uint32_t *j, const uint8_t *p, size_t n, size_t fr)
{
    cp_sendbuf *blk = block_before(q, *j);
    size_t take = 0;
    if (blk) {
        size_t cap = grow_to(blk, n);
        if (cap > blk->cap) {
            size_t old = cp__sendbuf_charge(blk);
            cp_sendbuf *g = cp__sendbuf_block_grow(blk, cap);
            if (!g)
                return -ENOMEM;
            q->mem += cp__sendbuf_charge(g) - old;
            *slot(q, *j - 1) = (uintptr_t)g;
            blk = g;
        }
        take = blk->cap - blk->len < n ? blk->cap - blk->len : n;
    }
    cp_sendbuf *nb = NULL;
    if (take < n) {
        if (!(nb = cp__sendbuf_block_new(new_block_cap(n - take))))
            return -ENOMEM;
        q->mem += cp__sendbuf_charge(nb);
        *slot(q, (*j)++) = (uintptr_t)nb;
    }
    size_t fr_blk = fr < take ? fr : take;
    if (take) {
        memcpy(blk->data + blk->len, p, take);
        blk->len += (uint32_t)take;
        blk->framing += (uint32_t)fr_blk;
    }
    if (nb) {
        memcpy(nb->data, p + take, n - take);
        nb->len = (uint32_t)(n - take);
        nb->framing = (uint32_t)(fr - fr_blk);
    }
    return 0;
}

/* Copies entry i (v) into the queue's blocks at *j and releases its buffer,
 * if it is worth copying; kept is the last entry staying before it. False if
 * the entry stays as it is (not worth it, or out of memory). */
static bool absorb(cp_sendq *q, uint32_t *j, uint32_t i, uintptr_t v, uintptr_t *kept)
{
    cp_sendbuf *b = buf_of(v);
    if (!worth_copying(b))
        return false;
    uint32_t off = i == 0 ? q->first_off : 0;
    if (copy_in(q, j, ent_bytes(v) + off, ent_len(v) - off, framing_from(v, off)) != 0)
        return false;
    if (i == 0)
        q->first_off = 0; /* the new block holds only the unsent bytes */
    if ((v & ALONE_TAG) && kept && (*kept & COVERED_TAG) && buf_of(*kept)->chunk == b->chunk)
        *kept = (*kept & ~COVERED_TAG) | ALONE_TAG; /* the run's charge stays with what stays */
    else
        charge_drop(q, v);
    cp_sendbuf_unref(b);
    return true;
}

/* Copies the entries worth it that compaction has not seen and no pending
 * send reads into the queue's blocks, and releases their buffers. Runs of
 * them coalesce; the other entries keep their places in the order. Out of
 * memory, an entry simply stays as it is. */
static void compact(cp_sendq *q)
{
    uint32_t lo = q->tidy > q->inflight ? q->tidy : q->inflight;
    uint32_t j = lo;
    uintptr_t *kept = lo ? slot(q, lo - 1) : NULL; /* the last entry staying before i */
    for (uint32_t i = lo; i < q->count; i++) {
        uintptr_t v = *slot(q, i);
        if (absorb(q, &j, i, v, kept))
            continue;
        kept = slot(q, j);
        *slot(q, j++) = v;
    }
    /* In-flight entries compaction could not see stay unseen until their
     * send lands (tidy below inflight); the rest has been seen. */
    if (q->tidy >= q->inflight)
        q->tidy = j;
    q->count = j;
    /* The ring grew with the entries now coalesced, and counts against the
     * limit: it shrinks to a quarter when it is less than an eighth full. */
    if (q->cap > SQ_CAP_KEEP && q->count < q->cap / 8)
        ring_resize(q, q->cap / 4); /* out of memory it simply stays */
}

/* ------------------------------------------------------------------ queue */

/* The queue is backed up: the entry v's bytes go to the tail block. */
static int push_copy(cp_sendq *q, uintptr_t v, size_t limit)
{
    cp_sendbuf *b = buf_of(v);
    size_t n = ent_len(v);
    if (q->mem + copy_cost(q, q->count, n) > limit)
        return -ENOBUFS;
    if (ring_reserve(q) < 0)
        return -ENOMEM;
    uint32_t j = q->count;
    if (copy_in(q, &j, ent_bytes(v), n, framing_from(v, 0)) < 0)
        return -ENOMEM;
    if (q->tidy == q->count)
        q->tidy = j;
    q->count = j;
    q->bytes += n;
    cp_sendbuf_unref(b);
    return 0;
}

/* Appends b as an entry, charged as planned. */
static int append(cp_sendq *q, cp_sendbuf *b, plan p, uintptr_t framed)
{
    if (ring_reserve(q) < 0)
        return -ENOMEM;
    uintptr_t v = charge_take(q, b, p) | framed;
    *slot(q, q->count) = v;
    q->count++;
    q->bytes += ent_len(v);
    return 0;
}

static int push(cp_sendq *q, cp_sendbuf *b, size_t limit, uintptr_t framed)
{
    q->soft = limit / 4;
    plan p = plan_for(q, b);
    /* The fast path: the queue is not backed up (a reader that keeps up, a
     * broadcast's shared buffer, an echo's reply from its chunk). */
    if (q->mem + p.charge <= q->soft && q->count)
        return append(q, b, p, framed);
    if (q->count && q->mem + p.charge > q->soft) {
        if (q->tidy < q->count) {
            compact(q);
            p = plan_for(q, b); /* compaction may have freed its chunk's slot */
        }
        if (worth_copying(b))
            return push_copy(q, (uintptr_t)b | framed, limit);
    }
    /* An empty queue takes any buffer the limit's bytes allow, whatever it
     * pins: a packet as big as the limit must always be sendable. */
    if (q->count ? q->mem + p.charge > limit : b->len > limit)
        return -ENOBUFS;
    return append(q, b, p, framed);
}

int cp__sendq_push(cp_sendq *q, cp_sendbuf *b, size_t limit)
{
    if (!q->framed || !cp__sendbuf_is_view(b))
        return push(q, b, limit, q->framed ? FRAMED_TAG : 0);
    /* A framed entry goes out with its frame header in the headroom just
     * before its bytes, which a view (received bytes lent out) does not
     * have: a copy is queued in its place, and stands for the caller's
     * reference. */
    cp_sendbuf *c = cp_sendbuf_copy(cp__sendbuf_bytes(b), b->len);
    if (!c)
        return -ENOMEM;
    int r = push(q, c, limit, FRAMED_TAG);
    if (r < 0) {
        cp_sendbuf_unref(c);
        return r;
    }
    cp_sendbuf_unref(b);
    return 0;
}

cp_sendbuf *cp__sendq_pop(cp_sendq *q)
{
    if (!q->count || q->first_off || q->inflight)
        return NULL;
    uintptr_t v = *slot(q, 0);
    head_advance(q);
    q->bytes -= ent_len(v);
    if (q->tidy)
        q->tidy--;
    charge_drop(q, v);
    return buf_of(v);
}

int cp__sendq_gather(cp_sendq *q, struct iovec *iov, int max_iov, size_t max_bytes)
{
    /* Backed up: what the send will read should pin no chunk either (entries
     * a landed send left behind have not been through compaction yet). */
    if (q->mem > q->soft && q->tidy < q->count && !q->inflight)
        compact(q);
    int n = 0;
    size_t bytes = 0;
    for (uint32_t i = 0; i < q->count && n < max_iov && bytes < max_bytes; i++) {
        uintptr_t v = *slot(q, i);
        size_t off = i == 0 ? q->first_off : 0;
        iov[n].iov_base = (void *)(ent_bytes(v) + off);
        iov[n].iov_len = ent_len(v) - off;
        bytes += iov[n].iov_len;
        n++;
    }
    return n;
}

size_t cp__sendq_consume(cp_sendq *q, size_t n)
{
    size_t user = 0;
    q->bytes -= n;
    while (n > 0) {
        uintptr_t v = *slot(q, 0);
        cp_sendbuf *b = buf_of(v);
        size_t rem = ent_len(v) - q->first_off;
        if (n < rem) {
            user += user_bytes(v, q->first_off, n, false);
            q->first_off += (uint32_t)n;
            break;
        }
        user += user_bytes(v, q->first_off, rem, true);
        n -= rem;
        q->first_off = 0;
        head_advance(q);
        if (q->tidy)
            q->tidy--;
        if (q->inflight)
            q->inflight--;
        charge_drop(q, v);
        cp_sendbuf_unref(b);
    }
    if (!q->count && q->cap > SQ_CAP_KEEP)
        ring_free(q);
    return user;
}

void cp__sendq_clear(cp_sendq *q)
{
    for (uint32_t i = 0; i < q->count; i++)
        cp_sendbuf_unref(at(q, i));
    if (q->cap)
        ring_release(q->ring, q->cap);
    *q = (cp_sendq){ .framed = q->framed };
}
