/* SPDX-License-Identifier: MIT */
/*
 * Slabs (src/mem/slab.c): objects of one size packed in blocks of pages of
 * their own. Sessions live there so that idle ones cost their size whatever
 * bursts left in malloc's heaps (cport issue 14). What must hold: objects
 * are distinct and zeroed, a freed place is used again before a new block is
 * mapped, blocks that empty out are given back (one is kept), and all of it
 * from many threads at once.
 */
#include "internal.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct obj {
    uint64_t words[96]; /* 768 bytes, about a session (a multiple of 16, as the slab rounds) */
} obj;

static const size_t PER_BLOCK = (64u * 1024u - 64u) / sizeof(obj);

static void fill(obj *o, uint64_t v)
{
    for (size_t i = 0; i < 96; i++)
        o->words[i] = v;
}

static bool holds(const obj *o, uint64_t v)
{
    for (size_t i = 0; i < 96; i++)
        if (o->words[i] != v)
            return false;
    return true;
}

Test(slab, objects_are_zeroed_distinct_and_packed)
{
    static cp_slab sl = CP_SLAB_INIT(sizeof(obj));
    enum { N = 1000 };
    obj **o = calloc(N, sizeof *o);
    for (size_t i = 0; i < N; i++) {
        o[i] = cp__slab_alloc(&sl);
        cr_assert_not_null(o[i]);
        cr_assert(holds(o[i], 0), "object %zu not zeroed", i);
        fill(o[i], i + 1);
    }
    for (size_t i = 0; i < N; i++)
        cr_assert(holds(o[i], i + 1), "object %zu overwritten by another", i);
    if (cp__slab_maps_pages) {
        size_t want = (N + PER_BLOCK - 1) / PER_BLOCK;
        cr_assert_eq(cp__slab_blocks(&sl), want, "%zu objects took %zu blocks, %zu would do", (size_t)N,
                     cp__slab_blocks(&sl), want);
    }
    for (size_t i = 0; i < N; i++)
        cp__slab_free(&sl, o[i]);
    if (cp__slab_maps_pages)
        cr_assert_eq(cp__slab_blocks(&sl), 1, "all objects freed, %zu blocks still mapped (1 spare kept)",
                     cp__slab_blocks(&sl));
    /* A reused place comes back zeroed too. */
    obj *again = cp__slab_alloc(&sl);
    cr_assert(holds(again, 0));
    cp__slab_free(&sl, again);
    free(o);
}

Test(slab, freed_places_are_used_before_a_new_block)
{
    static cp_slab sl = CP_SLAB_INIT(sizeof(obj));
    if (!cp__slab_maps_pages)
        cr_skip_test("sanitizer build: objects come from calloc");
    size_t n = PER_BLOCK * 3;
    obj **o = calloc(n, sizeof *o);
    for (size_t i = 0; i < n; i++)
        o[i] = cp__slab_alloc(&sl);
    cr_assert_eq(cp__slab_blocks(&sl), 3);
    /* Every other object goes, then as many come back: no new block. */
    for (size_t i = 0; i < n; i += 2)
        cp__slab_free(&sl, o[i]);
    for (size_t i = 0; i < n; i += 2)
        o[i] = cp__slab_alloc(&sl);
    cr_assert_eq(cp__slab_blocks(&sl), 3, "freed places unused: %zu blocks", cp__slab_blocks(&sl));
    /* Two blocks emptied out: one is unmapped, one kept as the spare. */
    for (size_t i = PER_BLOCK; i < n; i++)
        cp__slab_free(&sl, o[i]);
    cr_assert_eq(cp__slab_blocks(&sl), 2, "%zu blocks mapped for one block's objects", cp__slab_blocks(&sl));
    for (size_t i = 0; i < PER_BLOCK; i++)
        cp__slab_free(&sl, o[i]);
    cr_assert_eq(cp__slab_blocks(&sl), 1);
    free(o);
}

static cp_slab mt_slab = CP_SLAB_INIT(sizeof(obj));

static void *churn(void *arg)
{
    uint64_t tag = (uint64_t)(uintptr_t)arg << 32;
    enum { LIVE = 300, ROUNDS = 20000 };
    obj *live[LIVE] = { 0 };
    uint64_t val[LIVE] = { 0 };
    uint32_t seed = (uint32_t)(uintptr_t)arg * 2654435761u + 1;
    for (uint64_t r = 1; r <= ROUNDS; r++) {
        seed = seed * 1103515245u + 12345u;
        size_t k = (seed >> 8) % LIVE;
        if (live[k]) {
            if (!holds(live[k], val[k]))
                return (void *)1;
            cp__slab_free(&mt_slab, live[k]);
            live[k] = NULL;
        } else {
            live[k] = cp__slab_alloc(&mt_slab);
            if (!live[k] || !holds(live[k], 0))
                return (void *)2;
            fill(live[k], val[k] = tag | r);
        }
    }
    for (size_t k = 0; k < LIVE; k++) {
        if (live[k] && !holds(live[k], val[k]))
            return (void *)1;
        cp__slab_free(&mt_slab, live[k]);
    }
    return NULL;
}

Test(slab, threads_alloc_and_free_at_once)
{
    enum { T = 4 };
    pthread_t th[T];
    for (uintptr_t i = 0; i < T; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, churn, (void *)(i + 1)), 0);
    for (int i = 0; i < T; i++) {
        void *r;
        pthread_join(th[i], &r);
        cr_assert_null(r, "thread %d: %s", i,
                       r == (void *)1 ? "an object changed under its owner" : "a bad object");
    }
    if (cp__slab_maps_pages)
        cr_assert_eq(cp__slab_blocks(&mt_slab), 1, "%zu blocks left after every object went",
                     cp__slab_blocks(&mt_slab));
}

#ifdef __linux__
#  include <sys/mman.h>
#  include <unistd.h>

/* Pages of [p, p + len) in memory now. */
static size_t resident_pages(void *p, size_t len)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE), n = len / pg, in = 0;
    unsigned char *v = calloc(n, 1);
    cr_assert_eq(mincore(p, len, v), 0);
    for (size_t i = 0; i < n; i++)
        in += v[i] & 1;
    free(v);
    return in;
}
#endif

/* The block kept when the last object of a slab goes gives its pages back
 * when a worker trims: a slab that is empty then costs nothing, whatever it
 * held before. (Not at once: a slab going from one object to none and back
 * every round would pay a system call each time.) */
Test(slab, the_spare_block_holds_no_memory)
{
#ifdef __linux__
    static cp_slab sl = CP_SLAB_INIT(sizeof(obj));
    if (!cp__slab_maps_pages)
        cr_skip_test("sanitizer build: objects come from calloc");
    obj **o = calloc(PER_BLOCK, sizeof *o);
    for (size_t i = 0; i < PER_BLOCK; i++)
        fill(o[i] = cp__slab_alloc(&sl), i + 1);
    void *block = (void *)((uintptr_t)o[0] & ~(uintptr_t)(64u * 1024u - 1));
    cr_assert_geq(resident_pages(block, 64u * 1024u), 15, "a full block is in memory");
    for (size_t i = 0; i < PER_BLOCK; i++)
        cp__slab_free(&sl, o[i]);
    cr_assert_eq(cp__slab_blocks(&sl), 1, "the block is kept as the spare");
    cp__slab_trim(); /* what a worker does once quiet after load */
    cr_assert_eq(resident_pages(block, 64u * 1024u), 0, "the spare block still holds %zu pages",
                 resident_pages(block, 64u * 1024u));
    /* Taken again, it works as a fresh block. */
    obj *a = cp__slab_alloc(&sl), *b = cp__slab_alloc(&sl);
    cr_assert(holds(a, 0) && holds(b, 0) && a != b);
    cr_assert_eq(cp__slab_blocks(&sl), 1);
    cp__slab_free(&sl, a);
    cp__slab_free(&sl, b);
    free(o);
#else
    cr_skip_test("mincore is Linux's");
#endif
}
