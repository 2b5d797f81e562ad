/* SPDX-License-Identifier: MIT */
/*
 * Memory of cport's own, below every layer: the page cache (pages.c) and
 * slabs (slab.c). Nothing here is public.
 */
#ifndef CP_MEM_H
#define CP_MEM_H

#include "base.h"

/* ------------------------------------------------------------------ pages and slabs */

/* AddressSanitizer builds: the slabs and the page cache hand out malloc's
 * memory, so that ASan sees every use after free (slab.c, pages.c). */
#if defined(__SANITIZE_ADDRESS__)
#  define CP_ASAN 1
#elif defined(__has_feature)
#  if __has_feature(address_sanitizer)
#    define CP_ASAN 1
#  endif
#endif

/* Runs of whole pages for the send path's bulk memory, kept for reuse until
 * a worker trims (pages.c). Any thread. Not zeroed. */
void *cp__pages_get(size_t bytes); /* bytes: a multiple of CP_PAGE */
void cp__pages_put(void *p, size_t bytes);
void cp__pages_trim(void);
size_t cp__pages_in_use(void); /* bytes handed out and not given back */
static inline size_t cp__pages_round(size_t n) { return (n + CP_PAGE - 1) & ~(size_t)(CP_PAGE - 1); }


/* Memory lent out by its owner (a backend's receive buffer, lent to a send
 * buffer by cp_sendbuf_from_recv): put(arg, tag) gives it back, once, on any
 * thread, possibly after the owner is gone; pin is how many bytes the loan
 * keeps alive meanwhile. */
typedef struct cp_loan {
    void (*put)(void *arg, uint32_t tag);
    void *arg;
    uint32_t tag;
    uint32_t pin;
} cp_loan;

/* Objects of one size in blocks of pages of their own (slab.c). Any thread. */
typedef struct cp_slab {
    pthread_mutex_t lock;
    size_t size;               /* of an object; a multiple of 16 */
    cp_queue avail;            /* blocks with a free place, fullest first (slab.c) */
    struct slab_block *spare;  /* an empty block, kept for the next object */
    size_t blocks;             /* mapped, the spare included */
    struct cp_slab *next_slab; /* on the list cp__slab_trim walks, once it mapped a block */
    bool listed;
} cp_slab;
#define CP_SLAB_INIT(obj_size)                                                                               \
  {                                                                                                          \
    PTHREAD_MUTEX_INITIALIZER, ((obj_size) + 15u) & ~(size_t)15u, { NULL, NULL }, NULL, 0, NULL, false       \
  }
void *cp__slab_alloc(cp_slab *sl); /* zeroed, or NULL */
void cp__slab_free(cp_slab *sl, void *obj);
/* Gives back the pages of every slab's spare block (a worker's trim). */
void cp__slab_trim(void);
size_t cp__slab_blocks(cp_slab *sl);
/* False in sanitizer builds: objects are calloc's then (slab.c says why). */
extern const bool cp__slab_maps_pages;

#endif
