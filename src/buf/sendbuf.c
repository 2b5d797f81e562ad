/* SPDX-License-Identifier: MIT */
/*
 * Send buffers: reference counted, immutable once closed, carved from a
 * per-thread chunk so that opening one takes no lock.
 *
 * A chunk is referenced by the thread that carves from it and by every live
 * buffer cut from it. The carving thread takes the references of all the
 * buffers a chunk can hold at once, when the chunk becomes its own, and hands
 * one to each buffer it cuts (spare): cutting a buffer costs no atomic
 * operation. When the thread moves on to a fresh chunk it drops its own
 * reference and the spare ones; the chunk goes back to the page cache
 * (pages.c) when its last buffer is released.
 * Buffers too large for a chunk are allocated on their own (malloc), in
 * classes of power-of-two capacity (16 KiB to 128 KiB of data, plus the
 * header), and kept in a bounded pool per class when released: a 16 KiB
 * echo allocates and frees one such buffer per message, and handing it back
 * to malloc each time made glibc trim and re-fault the worker's heap on every
 * message (one madvise per message, 2x the CPU of a raw server at 200
 * connections). A class is a power of two of data, not of allocation: a
 * 16 KiB message then takes a 16 KiB class, not a 32 KiB one, which matters
 * now that a send queue is charged what its buffers pin. (Whole pages would
 * add a page to each: 64 KiB of data and the header are 17 pages.)
 *
 * Send queues charge every buffer what it may keep alive (cp__sendbuf_charge)
 * and, when they back up, copy small buffers into blocks of their own
 * (cp__sendbuf_block_new/grow): see sendq.c. Chunks and blocks are whole
 * pages from the page cache, apart from malloc's heaps (pages.c says why).
 */
#include "buf/sendbuf.h"

#include <errno.h>
#include <stdlib.h>
#include <stddef.h>
#include <string.h>

#define CHUNK_BYTES (32u * 1024u) /* a chunk, its header included */
#define CHUNK_HEAD 16u
#define CHUNK_DATA (CHUNK_BYTES - CHUNK_HEAD)
#define ALONE_THRESHOLD (CHUNK_BYTES / 4)
#define ALIGN 16u
#define BIG_MIN_SHIFT 14u /* 16 KiB */
#define BIG_CLASSES 4u    /* 16, 32, 64, 128 KiB */
#define BIG_NONE UINT32_MAX
#define BIG_POOL_BYTES (4u << 20) /* kept per class at most */
/* A view's header and tail, allocated alone. */
#define VIEW_BYTES (sizeof(cp_sendbuf) + sizeof(cp__sendbuf_view_tail))
/* What malloc adds to an allocation (glibc: an 8-byte header, 16-byte steps). */
#define MALLOC_OVERHEAD 16u

/* No buffer takes less than ALIGN bytes of a chunk. */
#define CHUNK_MAX_BUFS (CHUNK_DATA / ALIGN)

typedef struct cp_chunk {
    atomic_uint refs;
    uint32_t used;
    uint32_t spare; /* references held for buffers not cut yet (carving thread only) */
    _Alignas(16) uint8_t mem[CHUNK_DATA];
} cp_chunk;
_Static_assert(sizeof(cp_chunk) == CHUNK_BYTES, "a chunk is whole pages");
_Static_assert(offsetof(cp_sendbuf, data) % 8 == 0, "a buffer's bytes are 8-byte aligned");
_Static_assert(offsetof(cp_sendbuf, data) == offsetof(cp_sendbuf, head) + CP_SENDBUF_HEADROOM,
               "the headroom ends where the bytes begin");
_Static_assert(CP_SENDBUF_HEADROOM >= 10, "the headroom takes the longest frame header");

static _Thread_local cp_chunk *tls_chunk;
static _Thread_local cp_sendbuf *tls_open;
static pthread_key_t tls_key;
static pthread_once_t tls_once = PTHREAD_ONCE_INIT;

static void chunk_unref(cp_chunk *c, unsigned n)
{
    if (atomic_fetch_sub_explicit(&c->refs, n, memory_order_acq_rel) == n)
        cp__pages_put(c, sizeof *c);
}

/* Runs when a thread that carved buffers exits: drop its chunk reference. */
static void tls_release(void *chunk)
{
    /* The chunk comes as the key's value: with emutls (mingw) the
     * _Thread_local variables may already be gone when key destructors run. */
    if (chunk) {
        cp_chunk *c = chunk;
        chunk_unref(c, 1 + c->spare);
    }
}

static void tls_key_make(void) { pthread_key_create(&tls_key, tls_release); }

static cp_chunk *chunk_get(void)
{
    cp_chunk *c = cp__pages_get(sizeof *c);
    if (!c)
        return NULL;
    atomic_init(&c->refs, 1 + CHUNK_MAX_BUFS); /* the carving thread's, and its spare ones */
    c->spare = CHUNK_MAX_BUFS;
    c->used = 0;
    return c;
}

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
    cp_sendbuf *head; /* linked through the first bytes of data */
    unsigned n;
} big_pool[BIG_CLASSES];

static size_t big_bytes(uint32_t cls) { return sizeof(cp_sendbuf) + ((size_t)1 << (BIG_MIN_SHIFT + cls)); }

static cp_sendbuf *big_get(size_t cap)
{
    uint32_t cls = 0;
    while (cls < BIG_CLASSES && ((size_t)1 << (BIG_MIN_SHIFT + cls)) < cap)
        cls++;
    if (cls == BIG_CLASSES) {
        cp_sendbuf *b = cp__malloc(sizeof(cp_sendbuf) + cap);
        if (b)
            b->big_class = BIG_NONE;
        return b;
    }
    cp_sendbuf *b = NULL;
    pthread_mutex_lock(&pool_lock);
    if ((b = big_pool[cls].head) != NULL) {
        /* NOLINTNEXTLINE(bugprone-sizeof-expression): a pooled buffer's first bytes hold the next pointer */
        memcpy(&big_pool[cls].head, b->data, sizeof b);
        big_pool[cls].n--;
    }
    pthread_mutex_unlock(&pool_lock);
    if (!b && !(b = cp__malloc(big_bytes(cls))))
        return NULL;
    b->big_class = cls;
    return b;
}

/* A buffer allocated alone goes back: a block to the page cache, a big
 * buffer of a class to its pool (while the pool has room). */
static void alone_put(cp_sendbuf *b)
{
    uint32_t cls = b->big_class;
    if (cls == CP_SENDBUF_VIEW) {
        cp__sendbuf_view_tail t;
        memcpy(&t, b->data, sizeof t);
        cp__free(b);
        t.loan.put(t.loan.arg, t.loan.tag);
        return;
    }
    if (cls == CP_SENDBUF_BLOCK) {
        cp__pages_put(b, cp__sendbuf_block_charge(b->cap));
        return;
    }
    if (cls < BIG_CLASSES) {
        pthread_mutex_lock(&pool_lock);
        if (big_pool[cls].n < (BIG_POOL_BYTES >> (BIG_MIN_SHIFT + cls))) {
            /* NOLINTNEXTLINE(bugprone-sizeof-expression): a pooled buffer's first bytes hold the next pointer */
            memcpy(b->data, &big_pool[cls].head, sizeof b);
            big_pool[cls].head = b;
            big_pool[cls].n++;
            b = NULL;
        }
        pthread_mutex_unlock(&pool_lock);
    }
    cp__free(b);
}

void cp__sendbuf_trim(void)
{
    /* This thread's chunk goes too, unless a buffer is open in it: it is
     * given back when the buffers cut from it are. */
    if (tls_chunk && !tls_open) {
        cp_chunk *c = tls_chunk;
        tls_chunk = NULL;
        pthread_setspecific(tls_key, NULL);
        chunk_unref(c, 1 + c->spare);
    }
    /* The big pools: unlinked under the lock, freed outside it. */
    cp_sendbuf *bigs[BIG_CLASSES];
    pthread_mutex_lock(&pool_lock);
    for (uint32_t c = 0; c < BIG_CLASSES; c++) {
        bigs[c] = big_pool[c].head;
        big_pool[c].head = NULL;
        big_pool[c].n = 0;
    }
    pthread_mutex_unlock(&pool_lock);
    for (uint32_t c = 0; c < BIG_CLASSES; c++) {
        while (bigs[c]) {
            cp_sendbuf *next;
            /* NOLINTNEXTLINE(bugprone-sizeof-expression): a pooled buffer's first bytes hold the next pointer */
            memcpy(&next, bigs[c]->data, sizeof next);
            cp__free(bigs[c]);
            bigs[c] = next;
        }
    }
}

static size_t round_up(size_t n) { return (n + ALIGN - 1) & ~(size_t)(ALIGN - 1); }

/* What malloc really takes for n bytes, about: an 8-byte header in 16-byte
 * steps, and large blocks are mapped pages. */
static size_t malloc_cost(size_t n)
{
    if (n >= (128u << 10))
        return (n + 4095) & ~(size_t)4095;
    return round_up(n) + MALLOC_OVERHEAD;
}

const size_t cp__sendbuf_chunk_charge = sizeof(cp_chunk);

size_t cp__sendbuf_alone_charge(const cp_sendbuf *b)
{
    if (cp__sendbuf_is_view(b))
        return ((const cp__sendbuf_view_tail *)(const void *)b->data)->loan.pin + malloc_cost(VIEW_BYTES);
    if (b->big_class == CP_SENDBUF_BLOCK)
        return cp__sendbuf_block_charge(b->cap);
    if (b->big_class < BIG_CLASSES)
        return malloc_cost(big_bytes(b->big_class));
    return malloc_cost(sizeof(cp_sendbuf) + b->cap);
}

size_t cp__sendbuf_pooled(void)
{
    pthread_mutex_lock(&pool_lock);
    size_t n = 0;
    for (uint32_t c = 0; c < BIG_CLASSES; c++)
        n += big_pool[c].n * big_bytes(c);
    pthread_mutex_unlock(&pool_lock);
    return n;
}

size_t cp__sendbuf_block_charge(size_t cap) { return cp__pages_round(sizeof(cp_sendbuf) + cap); }

cp_sendbuf *cp__sendbuf_block_new(size_t cap)
{
    if (cap > UINT32_MAX - 2 * CP_PAGE)
        return NULL;
    size_t run = cp__sendbuf_block_charge(cap);
    cp_sendbuf *b = cp__pages_get(run);
    if (!b)
        return NULL;
    atomic_init(&b->refs, 1);
    b->len = 0;
    b->framing = 0;
    b->cap = (uint32_t)(run - sizeof *b); /* the whole run */
    b->big_class = CP_SENDBUF_BLOCK;
    b->chunk = NULL;
    return b;
}

cp_sendbuf *cp__sendbuf_block_grow(cp_sendbuf *b, size_t cap)
{
    if (cap <= b->cap)
        return b;
    cp_sendbuf *n = cp__sendbuf_block_new(cap);
    if (!n)
        return NULL;
    memcpy(n->data, b->data, b->len);
    n->len = b->len;
    n->framing = b->framing;
    alone_put(b);
    return n;
}

cp_sendbuf *cp__sendbuf_view(const uint8_t *p, size_t len, const cp_loan *loan)
{
    if (len > UINT32_MAX - 64)
        return NULL;
    cp_sendbuf *b = cp__malloc(VIEW_BYTES);
    if (!b)
        return NULL;
    atomic_init(&b->refs, 1);
    b->len = b->cap = (uint32_t)len;
    b->framing = 0;
    b->big_class = CP_SENDBUF_VIEW;
    b->chunk = NULL;
    cp__sendbuf_view_tail t = { .bytes = p, .loan = *loan };
    memcpy(b->data, &t, sizeof t);
    return b;
}

/* Moves this thread's chunk past its open buffer, which keeps its first
 * `keep` bytes of data. */
static void commit_open(uint32_t keep)
{
    cp_sendbuf *b = tls_open;
    tls_open = NULL;
    b->chunk->used += (uint32_t)round_up(sizeof *b + keep);
}

/* The shortcuts (copy, packet) may run while the user has a buffer open:
 * they close theirs at once, and the open one is kept whole. */
cp_sendbuf *cp__sendbuf_open(size_t cap)
{
    if (cap > UINT32_MAX - 64)
        return NULL;
    if (tls_open) {
        /* This thread has not closed its last buffer: the user has it open
         * while a shortcut runs, or closed it on another thread (its length
         * is then that thread's, and the buffer may be queued already), or
         * will close it there later. Its whole capacity stays reserved, and
         * its length is not touched: only the capacity, which this thread
         * wrote, is read. */
        commit_open(tls_open->cap);
    }
    cp_sendbuf *b;
    if (cap > ALONE_THRESHOLD) {
        b = big_get(cap);
        if (!b)
            return NULL;
        b->chunk = NULL;
    } else {
        size_t need = round_up(sizeof *b + cap);
        if (!tls_chunk || CHUNK_DATA - tls_chunk->used < need) {
            pthread_once(&tls_once, tls_key_make);
            cp_chunk *c = chunk_get();
            if (!c)
                return NULL;
            if (tls_chunk)
                chunk_unref(tls_chunk, 1 + tls_chunk->spare);
            pthread_setspecific(tls_key, c); /* the exit hook's chunk */
            tls_chunk = c;
        }
        b = (cp_sendbuf *)(tls_chunk->mem + tls_chunk->used);
        b->chunk = tls_chunk;
        b->big_class = BIG_NONE; /* read by cp__sendbuf_is_block */
        tls_chunk->spare--;      /* the buffer's reference to its chunk */
        tls_open = b;
    }
    atomic_init(&b->refs, 1);
    b->len = 0;
    b->framing = 0;
    b->cap = (uint32_t)cap;
    return b;
}

#ifdef CP_ASSERTS
/* The misuse check for a second cp_sendbuf_open on one thread must know
 * whether the thread's last buffer has been closed, which may have happened
 * on another thread, and the buffer may even have been released and its
 * memory given to another buffer since. So, only in these builds, the
 * buffers the user opened and has not closed yet are kept in a set under a
 * mutex, each with the serial number of the thread that opened it; a
 * thread's user_open (of any size: tls_open knows only those carved from a
 * chunk) is its last one, which may or may not still be in the set. */
typedef struct user_open_rec {
    const cp_sendbuf *b;
    uint64_t thread;
} user_open_rec;
static pthread_mutex_t user_open_lock = PTHREAD_MUTEX_INITIALIZER;
static user_open_rec *user_open_set;
static size_t user_open_n, user_open_cap;
static atomic_uint_fast64_t thread_serials;
static _Thread_local uint64_t thread_serial; /* 0 until the thread opens its first buffer */
static _Thread_local const cp_sendbuf *user_open;

static uint64_t my_serial(void)
{
    if (!thread_serial)
        thread_serial = atomic_fetch_add_explicit(&thread_serials, 1, memory_order_relaxed) + 1;
    return thread_serial;
}

/* True if this thread's last buffer has not been closed (on any thread). */
static bool user_open_still(void)
{
    if (!user_open)
        return false;
    bool open = false;
    pthread_mutex_lock(&user_open_lock);
    for (size_t i = 0; i < user_open_n && !open; i++)
        open = user_open_set[i].b == user_open && user_open_set[i].thread == thread_serial;
    pthread_mutex_unlock(&user_open_lock);
    if (!open)
        user_open = NULL;
    return open;
}

static void user_open_add(const cp_sendbuf *b)
{
    user_open = b;
    pthread_mutex_lock(&user_open_lock);
    if (user_open_n == user_open_cap) {
        size_t cap = user_open_cap ? user_open_cap * 2 : 16;
        user_open_rec *r = cp__realloc(user_open_set, sizeof *r * cap);
        if (r) {
            user_open_set = r;
            user_open_cap = cap;
        }
    }
    if (user_open_n < user_open_cap) /* else this buffer goes unchecked */
        user_open_set[user_open_n++] = (user_open_rec){ b, my_serial() };
    pthread_mutex_unlock(&user_open_lock);
}

/* The user closes b, on any thread. */
static void user_open_forget(const cp_sendbuf *b)
{
    if (user_open == b)
        user_open = NULL;
    pthread_mutex_lock(&user_open_lock);
    for (size_t i = user_open_n; i-- > 0;) {
        if (user_open_set[i].b == b) {
            user_open_set[i] = user_open_set[--user_open_n];
            break;
        }
    }
    pthread_mutex_unlock(&user_open_lock);
}
#endif

cp_sendbuf *cp_sendbuf_open(size_t cap)
{
#ifdef CP_ASSERTS
    CP_ASSERT(!user_open_still(),
              "cp_sendbuf_open: a send buffer is already open on this thread (close it first)");
    cp_sendbuf *b = cp__sendbuf_open(cap);
    if (b)
        user_open_add(b);
    return b;
#else
    return cp__sendbuf_open(cap);
#endif
}

/* A view's bytes are received bytes lent out: readable, and written by
 * nobody (cp_sendbuf_from_recv's buffers are closed). */
uint8_t *cp_sendbuf_data(cp_sendbuf *b) { return (uint8_t *)(uintptr_t)cp__sendbuf_bytes(b); }

/* Any thread: a buffer opened on one thread may be written and closed on
 * another. Only the thread that carved it moves its chunk on, and only when
 * it closes the buffer itself; otherwise cp__sendbuf_open does, without touching
 * the buffer's length (see there). */
void cp__sendbuf_frame(cp_sendbuf *b)
{
    size_t len = b->len, hl = cp__sendbuf_head_len(len);
    uint8_t *h = b->head + CP_SENDBUF_HEADROOM - hl; /* ends where data begins */
    h[0] = 0x82;                                     /* FIN, binary */
    if (hl == 2) {
        h[1] = (uint8_t)len;
    } else if (hl == 4) {
        h[1] = 126;
        h[2] = (uint8_t)(len >> 8);
        h[3] = (uint8_t)len;
    } else {
        h[1] = 127;
        for (int i = 0; i < 8; i++)
            h[2 + i] = (uint8_t)((uint64_t)len >> (56 - 8 * i));
    }
}

void cp__sendbuf_close(cp_sendbuf *b, size_t len)
{
    b->len = (uint32_t)(len > b->cap ? b->cap : len);
    cp__sendbuf_frame(b);
    if (tls_open == b)
        commit_open(b->len); /* closed on the thread that carved it: the rest is free again */
}

void cp_sendbuf_close(cp_sendbuf *b, size_t len)
{
#ifdef CP_ASSERTS
    user_open_forget(b);
#endif
    cp__sendbuf_close(b, len);
}

size_t cp_sendbuf_len(const cp_sendbuf *b) { return b->len; }

void cp_sendbuf_ref(cp_sendbuf *b) { atomic_fetch_add_explicit(&b->refs, 1, memory_order_relaxed); }

void cp_sendbuf_unref(cp_sendbuf *b)
{
    if (!b)
        return;
    /* Holding the only reference, no other thread can take one (that needs a
     * reference already): release without the atomic decrement. The acquire
     * pairs with the release of whoever dropped the one before. */
    unsigned refs = atomic_load_explicit(&b->refs, memory_order_acquire);
    CP_ASSERT(refs != 0, "cp_sendbuf_unref: the buffer has no reference left (released twice?)");
    if (refs != 1 && atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) != 1)
        return;
#ifdef CP_ASSERTS
    /* The last release writes nothing to the count (see above), so a second
     * one would find 1 there again: mark the buffer released, so that it is
     * caught while its memory is still the library's (its chunk, its pool). */
    atomic_store_explicit(&b->refs, 0, memory_order_relaxed);
#endif
    if (b->chunk)
        chunk_unref(b->chunk, 1);
    else
        alone_put(b);
}

cp_sendbuf *cp_sendbuf_copy(const void *data, size_t len)
{
    cp_sendbuf *b = cp__sendbuf_open(len);
    if (!b)
        return NULL;
    if (len)
        memcpy(b->data, data, len);
    cp__sendbuf_close(b, len);
    return b;
}
