/* SPDX-License-Identifier: MIT */
/*
 * Runs of whole pages for the send path's bulk memory: the chunks send
 * buffers are carved from, the blocks a backed-up send queue copies into,
 * and big queue rings.
 *
 * Why not malloc. A burst makes and frees a great deal of these (a 100 MB
 * echo burst of tiny packets resized queue rings 30,000 times, 550 MB in
 * all), and in glibc's per-thread arenas they were interleaved with small
 * allocations that stay. Freed, the big ones left free chunks between live
 * ones; malloc_trim returns the pages inside a free chunk but keeps the one
 * with its header and the ones it shares with its neighbours, so a server
 * that had served one burst kept 0.5-1.7 MB more than before it, whatever
 * its sessions held. Mapped runs go back whole.
 *
 * Mapping costs system calls, so freed runs are kept for reuse, by size (in
 * pages, up to CACHED_PAGES), at most CACHE_MAX bytes in all; a worker that
 * goes quiet after load gives them all back (cp__pages_trim, from its trim).
 * Bigger runs are mapped and unmapped each time, as malloc would.
 */
#include "mem/mem.h"

#include <stdlib.h>

#define CACHED_PAGES 64u                /* runs up to 256 KiB are kept for reuse */
#define CACHE_MAX (16u * 1024u * 1024u) /* bytes kept in all */

typedef struct run {
    struct run *next;
} run;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static run *cache[CACHED_PAGES + 1]; /* by size in pages */
static size_t cached, in_use;        /* bytes (under lock) */

#ifdef CP_ASAN
/* ASan sees uses after free only in malloc's memory: no reuse, no mapping. */
void *cp__pages_get(size_t bytes)
{
    void *p = aligned_alloc(CP_PAGE, bytes);
    if (p) {
        pthread_mutex_lock(&lock);
        in_use += bytes;
        pthread_mutex_unlock(&lock);
    }
    return p;
}

void cp__pages_put(void *p, size_t bytes)
{
    if (!p)
        return;
    pthread_mutex_lock(&lock);
    in_use -= bytes;
    pthread_mutex_unlock(&lock);
    free(p);
}
#else
void *cp__pages_get(size_t bytes)
{
    size_t np = bytes / CP_PAGE;
    run *r = NULL;
    pthread_mutex_lock(&lock);
    if (np <= CACHED_PAGES && (r = cache[np]) != NULL) {
        cache[np] = r->next;
        cached -= bytes;
    }
    in_use += bytes;
    pthread_mutex_unlock(&lock);
    if (!r && !(r = cp__pages_map(bytes, CP_PAGE))) {
        pthread_mutex_lock(&lock);
        in_use -= bytes;
        pthread_mutex_unlock(&lock);
    }
    return r;
}

void cp__pages_put(void *p, size_t bytes)
{
    if (!p)
        return;
    size_t np = bytes / CP_PAGE;
    pthread_mutex_lock(&lock);
    in_use -= bytes;
    if (np <= CACHED_PAGES && cached + bytes <= CACHE_MAX) {
        run *r = p;
        r->next = cache[np];
        cache[np] = r;
        cached += bytes;
        p = NULL;
    }
    pthread_mutex_unlock(&lock);
    if (p)
        cp__pages_unmap(p, bytes);
}
#endif

void cp__pages_trim(void)
{
    run *all[CACHED_PAGES + 1];
    pthread_mutex_lock(&lock);
    for (size_t np = 1; np <= CACHED_PAGES; np++) {
        all[np] = cache[np];
        cache[np] = NULL;
    }
    cached = 0;
    pthread_mutex_unlock(&lock);
    for (size_t np = 1; np <= CACHED_PAGES; np++) {
        while (all[np]) {
            run *next = all[np]->next;
            cp__pages_unmap(all[np], np * CP_PAGE);
            all[np] = next;
        }
    }
}

size_t cp__pages_in_use(void)
{
    pthread_mutex_lock(&lock);
    size_t n = in_use;
    pthread_mutex_unlock(&lock);
    return n;
}
