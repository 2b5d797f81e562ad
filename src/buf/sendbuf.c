/*
 * Send buffers: reference counted, immutable once closed, carved from a
 * per-thread chunk so that opening one takes no lock.
 *
 * A chunk is referenced by the thread that carves from it and by every live
 * buffer cut from it. The carving thread takes the references of all the
 * buffers a chunk can hold at once, when the chunk becomes its own, and hands
 * one to each buffer it cuts (spare): cutting a buffer costs no atomic
 * operation. When the thread moves on to a fresh chunk it drops its own
 * reference and the spare ones; the chunk returns to a small global pool when
 * its last buffer is released (the pool keeps a bounded number, the rest go
 * back to malloc).
 * Buffers too large for a chunk are allocated on their own, in power-of-two
 * size classes up to 128 KiB, and kept in a bounded pool per class when
 * released: a 16 KiB echo allocates and frees one such buffer per message, and
 * handing it back to malloc each time made glibc trim and re-fault the
 * worker's heap on every message (one madvise per message, 2x the CPU of a raw
 * server at 200 connections).
 */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK_SIZE (32u * 1024u)
#define ALONE_THRESHOLD (CHUNK_SIZE / 4)
#define POOL_MAX 256
#define ALIGN 16u
#define BIG_MIN_SHIFT 14u /* 16 KiB */
#define BIG_CLASSES 4u    /* 16, 32, 64, 128 KiB */
#define BIG_NONE UINT32_MAX
#define BIG_POOL_BYTES (4u << 20) /* kept per class at most */

/* No buffer takes less than ALIGN bytes of a chunk. */
#define CHUNK_MAX_BUFS (CHUNK_SIZE / ALIGN)

typedef struct cp_chunk {
    atomic_uint refs;
    uint32_t used;
    uint32_t spare; /* references held for buffers not cut yet (carving thread only) */
    struct cp_chunk *next_free;
    _Alignas(16) uint8_t mem[CHUNK_SIZE];
} cp_chunk;

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static cp_chunk *pool;
static unsigned pool_n;

static struct {
    cp_sendbuf *head; /* linked through the first bytes of data */
    unsigned n;
} big_pool[BIG_CLASSES];

static _Thread_local cp_chunk *tls_chunk;
static _Thread_local cp_sendbuf *tls_open;
static pthread_key_t tls_key;
static pthread_once_t tls_once = PTHREAD_ONCE_INIT;

static void chunk_unref(cp_chunk *c, unsigned n)
{
    if (atomic_fetch_sub_explicit(&c->refs, n, memory_order_acq_rel) != n)
        return;
    pthread_mutex_lock(&pool_lock);
    if (pool_n < POOL_MAX) {
        c->next_free = pool;
        pool = c;
        pool_n++;
        c = NULL;
    }
    pthread_mutex_unlock(&pool_lock);
    free(c);
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
    cp_chunk *c = NULL;
    pthread_mutex_lock(&pool_lock);
    if (pool) {
        c = pool;
        pool = c->next_free;
        pool_n--;
    }
    pthread_mutex_unlock(&pool_lock);
    if (!c && !(c = malloc(sizeof *c)))
        return NULL;
    atomic_init(&c->refs, 1 + CHUNK_MAX_BUFS); /* the carving thread's, and its spare ones */
    c->spare = CHUNK_MAX_BUFS;
    c->used = 0;
    c->next_free = NULL;
    return c;
}

static cp_sendbuf *big_get(size_t cap)
{
    size_t need = sizeof(cp_sendbuf) + cap;
    uint32_t cls = 0;
    while (cls < BIG_CLASSES && ((size_t)1 << (BIG_MIN_SHIFT + cls)) < need)
        cls++;
    if (cls == BIG_CLASSES) {
        cp_sendbuf *b = malloc(need);
        if (b)
            b->big_class = BIG_NONE;
        return b;
    }
    cp_sendbuf *b = NULL;
    pthread_mutex_lock(&pool_lock);
    if ((b = big_pool[cls].head) != NULL) {
        memcpy(&big_pool[cls].head, b->data, sizeof b);
        big_pool[cls].n--;
    }
    pthread_mutex_unlock(&pool_lock);
    if (!b && !(b = malloc((size_t)1 << (BIG_MIN_SHIFT + cls))))
        return NULL;
    b->big_class = cls;
    return b;
}

static void big_put(cp_sendbuf *b)
{
    uint32_t cls = b->big_class;
    if (cls != BIG_NONE) {
        pthread_mutex_lock(&pool_lock);
        if (big_pool[cls].n < (BIG_POOL_BYTES >> (BIG_MIN_SHIFT + cls))) {
            memcpy(b->data, &big_pool[cls].head, sizeof b);
            big_pool[cls].head = b;
            big_pool[cls].n++;
            b = NULL;
        }
        pthread_mutex_unlock(&pool_lock);
    }
    free(b);
}

static size_t round_up(size_t n) { return (n + ALIGN - 1) & ~(size_t)(ALIGN - 1); }

/* Commits the buffer open on this thread (if any) at its current length. */
static void commit_open(void)
{
    cp_sendbuf *b = tls_open;
    if (!b)
        return;
    tls_open = NULL;
    if (b->chunk)
        b->chunk->used += (uint32_t)round_up(sizeof *b + b->len);
}

/* The shortcuts (copy, packet) may run while the user has a buffer open:
 * they close theirs at once, and the open one is kept whole. */
static cp_sendbuf *sendbuf_open(size_t cap)
{
    if (cap > UINT32_MAX - 64)
        return NULL;
    if (tls_open) {
        /* The previous buffer was never closed: keep it whole. */
        tls_open->len = tls_open->cap;
        commit_open();
    }
    cp_sendbuf *b;
    if (cap > ALONE_THRESHOLD) {
        b = big_get(cap);
        if (!b)
            return NULL;
        b->chunk = NULL;
    } else {
        size_t need = round_up(sizeof *b + cap);
        if (!tls_chunk || CHUNK_SIZE - tls_chunk->used < need) {
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
        tls_chunk->spare--; /* the buffer's reference to its chunk */
        tls_open = b;
    }
    atomic_init(&b->refs, 1);
    b->len = 0;
    b->cap = (uint32_t)cap;
    return b;
}

#ifdef CP_ASSERTS
/* The buffer cp_sendbuf_open gave this thread and cp_sendbuf_close has not
 * closed yet, of any size (tls_open knows only those carved from a chunk). */
static _Thread_local cp_sendbuf *user_open;
#endif

cp_sendbuf *cp_sendbuf_open(size_t cap)
{
#ifdef CP_ASSERTS
    CP_ASSERT(!user_open, "cp_sendbuf_open: a send buffer is already open on this thread (close it first)");
    return user_open = sendbuf_open(cap);
#else
    return sendbuf_open(cap);
#endif
}

uint8_t *cp_sendbuf_data(cp_sendbuf *b) { return b->data; }

void cp_sendbuf_close(cp_sendbuf *b, size_t len)
{
    b->len = (uint32_t)(len > b->cap ? b->cap : len);
    if (tls_open == b)
        commit_open();
#ifdef CP_ASSERTS
    if (user_open == b)
        user_open = NULL;
#endif
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
        big_put(b);
}

cp_sendbuf *cp_sendbuf_copy(const void *data, size_t len)
{
    cp_sendbuf *b = sendbuf_open(len);
    if (!b)
        return NULL;
    if (len)
        memcpy(b->data, data, len);
    cp_sendbuf_close(b, len);
    return b;
}

/* A packet buffer is a send buffer whose first CP_PACKET_HEADER bytes are the
 * header: the id is written at open, the size at close, when it is known.
 * cp_packet_make opens one as a shortcut (allowed while the user has a buffer
 * open), cp_packet_open as the user's one open buffer. */
static cp_sendbuf *packet_open(uint16_t id, size_t body_cap, bool for_user)
{
    if (body_cap > CP_PACKET_MAX - CP_PACKET_HEADER)
        return NULL;
    size_t cap = CP_PACKET_HEADER + body_cap;
    cp_sendbuf *b = for_user ? cp_sendbuf_open(cap) : sendbuf_open(cap);
    if (!b)
        return NULL;
    cp_put_u16(b->data + 2, id);
    return b;
}

cp_sendbuf *cp_packet_open(uint16_t id, size_t body_cap) { return packet_open(id, body_cap, true); }

uint8_t *cp_packet_body(cp_sendbuf *b) { return b->data + CP_PACKET_HEADER; }

int cp_packet_close(cp_sendbuf *b, size_t body_len)
{
    if (!b)
        return -EINVAL;
    if (b->cap < CP_PACKET_HEADER || body_len > b->cap - CP_PACKET_HEADER) {
        /* More than was reserved: the caller's length is wrong, or it wrote
         * past the buffer. Neither a clipped body nor the bytes past the
         * capacity may go out under a header that claims them, so the buffer
         * closes empty (sending it sends nothing) and the caller hears why. */
        cp_sendbuf_close(b, 0);
        return -EMSGSIZE;
    }
    size_t size = CP_PACKET_HEADER + body_len; /* <= CP_PACKET_MAX: cap was checked at open */
    cp_put_u16(b->data, (uint16_t)size);
    cp_sendbuf_close(b, size);
    return 0;
}

cp_sendbuf *cp_packet_make(uint16_t id, const void *body, size_t body_len)
{
    cp_sendbuf *b = packet_open(id, body_len, false);
    if (!b)
        return NULL;
    if (body_len)
        memcpy(cp_packet_body(b), body, body_len);
    cp_packet_close(b, body_len); /* cannot fail: body_len is the capacity */
    return b;
}
