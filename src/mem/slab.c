/* SPDX-License-Identifier: MIT */
/*
 * Slabs: objects of one size packed into 64 KiB blocks of pages mapped for
 * them alone (cp__pages_map), not taken from malloc.
 *
 * Why not malloc: an idle session must cost what its struct costs, also
 * after a burst. A burst fills malloc's heaps with send buffers, queue
 * blocks and rings and frees them again; glibc then keeps every page that
 * still holds anything, and a session allocated during or after the burst
 * lands in a hole between freed chunks, on a page of its own. 1000 sessions
 * measured 1.4-2.0 KiB of RSS each after a burst that way, 0.9 KiB before
 * one. In a slab they sit side by side, pages are touched only as objects
 * are first handed out, and a block whose objects are all gone is unmapped.
 *
 * One lock per slab: objects come and go at connection rate (tens of
 * thousands per second at most), not per message.
 *
 * Sanitizer builds use calloc and free instead, so that AddressSanitizer
 * still sees every use after free of a session.
 */
#include "mem/mem.h"

#include <stdlib.h>
#include <string.h>

#ifdef CP_ASAN
#  define SLAB_USES_MALLOC 1
#endif

#ifdef SLAB_USES_MALLOC
const bool cp__slab_maps_pages = false;
#else
const bool cp__slab_maps_pages = true;
#endif

#ifdef SLAB_USES_MALLOC

void *cp__slab_alloc(cp_slab *sl) { return cp__calloc(1, sl->size); }

void cp__slab_free(cp_slab *sl, void *obj)
{
    (void)sl;
    cp__free(obj);
}

void cp__slab_trim(void) {}

#else

/* The head of each block, at its start; objects follow it. */
typedef struct slab_block {
    cp_queue link;  /* in the slab's list of blocks with a free place (avail) */
    void *free;     /* objects given back, linked through their first bytes */
    uint32_t used;  /* objects handed out and not given back */
    uint32_t fresh; /* objects never handed out yet, at the end */
} slab_block;

#  define BLOCK_SIZE CP_PAGES_ALIGN_MAX /* 64 KiB */
#  define FIRST_OFF ((sizeof(slab_block) + 63u) & ~(size_t)63u)

static uint32_t per_block(const cp_slab *sl) { return (uint32_t)((BLOCK_SIZE - FIRST_OFF) / sl->size); }

static slab_block *block_of(void *obj)
{
    return (slab_block *)((uintptr_t)obj & ~(uintptr_t)(BLOCK_SIZE - 1));
}

/* The slabs that have mapped a block, for cp__slab_trim. A slab is a
 * static object that lives as long as the process, so it is never taken
 * off. */
static pthread_mutex_t slabs_lock = PTHREAD_MUTEX_INITIALIZER;
static cp_slab *slabs;

static void slab_list(cp_slab *sl)
{
    pthread_mutex_lock(&slabs_lock);
    sl->next_slab = slabs;
    slabs = sl;
    pthread_mutex_unlock(&slabs_lock);
}

static void block_init(const cp_slab *sl, slab_block *b)
{
    b->free = NULL;
    b->used = 0;
    b->fresh = per_block(sl);
}

/* The first block with a free place, or NULL. CP_SLAB_INIT cannot point the
 * list's head at itself (it is not told the slab's name), so the head starts
 * all NULL and the first allocation sets it up; a free always comes after an
 * allocation. */
static slab_block *first_avail(cp_slab *sl)
{
    if (!sl->avail.next)
        cp__queue_init(&sl->avail);
    if (cp__queue_empty(&sl->avail))
        return NULL;
    return CP_QUEUE_DATA(cp__queue_head(&sl->avail), slab_block, link);
}

void *cp__slab_alloc(cp_slab *sl)
{
    pthread_mutex_lock(&sl->lock);
    slab_block *b = first_avail(sl);
    if (!b && (b = sl->spare) != NULL) {
        sl->spare = NULL;
        block_init(sl, b);
        cp__queue_insert_head(&sl->avail, &b->link);
    }
    if (!b) {
        pthread_mutex_unlock(&sl->lock);
        slab_block *nb = cp__pages_map(BLOCK_SIZE, BLOCK_SIZE);
        if (!nb)
            return NULL;
        block_init(sl, nb);
        pthread_mutex_lock(&sl->lock);
        if (!sl->listed) {
            sl->listed = true;
            slab_list(sl);
        }
        sl->blocks++;
        cp__queue_insert_head(&sl->avail, &(b = nb)->link);
    }
    void *obj;
    if (b->free) {
        obj = b->free;
        memcpy(&b->free, obj, sizeof b->free);
    } else {
        /* Handed out from the front: a block's pages are touched in order. */
        obj = (uint8_t *)b + FIRST_OFF + (size_t)(per_block(sl) - b->fresh) * sl->size;
        b->fresh--;
    }
    b->used++;
    if (!b->free && !b->fresh)
        cp__queue_remove(&b->link); /* full */
    pthread_mutex_unlock(&sl->lock);
    memset(obj, 0, sl->size);
    return obj;
}

void cp__slab_free(cp_slab *sl, void *obj)
{
    if (!obj)
        return;
    slab_block *b = block_of(obj), *unmap = NULL;
    pthread_mutex_lock(&sl->lock);
    bool was_full = !b->free && !b->fresh;
    memcpy(obj, &b->free, sizeof b->free);
    b->free = obj;
    b->used--;
    if (was_full) {
        /* At the tail: new objects go to the fuller blocks at the front
         * first, so that lightly used blocks can empty out. */
        cp__queue_insert_tail(&sl->avail, &b->link);
    } else if (!b->used) {
        /* Empty: one block is kept for the next object, the rest go back.
         * The spare keeps its pages until a worker trims (cp__slab_trim):
         * a slab that goes from one object to none and back every round
         * (a burst's ring) then costs no system call per round. */
        cp__queue_remove(&b->link);
        if (sl->spare) {
            unmap = b;
            sl->blocks--;
        } else {
            sl->spare = b;
        }
    }
    pthread_mutex_unlock(&sl->lock);
    if (unmap)
        cp__pages_unmap(unmap, BLOCK_SIZE);
}

/* The spare blocks give their pages back (the system maps them again when
 * they are touched), so an empty slab costs no memory; a spare's head is
 * written again when it is taken (block_init). Under the slab's lock, as
 * another thread may take the spare as soon as it is released. */
void cp__slab_trim(void)
{
    pthread_mutex_lock(&slabs_lock);
    cp_slab *sl = slabs;
    pthread_mutex_unlock(&slabs_lock);
    for (; sl; sl = sl->next_slab) {
        pthread_mutex_lock(&sl->lock);
        if (sl->spare)
            cp__pages_discard(sl->spare, BLOCK_SIZE);
        pthread_mutex_unlock(&sl->lock);
    }
}

#endif

size_t cp__slab_blocks(cp_slab *sl)
{
    pthread_mutex_lock(&sl->lock);
    size_t n = sl->blocks;
    pthread_mutex_unlock(&sl->lock);
    return n;
}
