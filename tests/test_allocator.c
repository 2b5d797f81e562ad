/* SPDX-License-Identifier: MIT */
/*
 * cp_set_allocator: every allocation of the library goes through the
 * allocator the user set, and everything the library frees came from it.
 * Set before any other call (each test is its own process); refused once
 * the library has allocated, and with a NULL function.
 */
#include "helpers.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* A counting allocator that remembers what it handed out. */
enum { SET = 1 << 20 };
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static void **live;
static size_t nlive, allocs, frees, foreign_frees;

static size_t slot_of(void *p)
{
    return (size_t)(((uintptr_t)p >> 4) * 0x9E3779B97F4A7C15ull >> 44) & (SET - 1);
}

static void remember(void *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&lock);
    size_t i = slot_of(p);
    while (live[i] && live[i] != (void *)1)
        i = (i + 1) & (SET - 1);
    live[i] = p;
    nlive++;
    allocs++;
    pthread_mutex_unlock(&lock);
}

static void forget(void *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&lock);
    size_t i = slot_of(p);
    while (live[i] && live[i] != p)
        i = (i + 1) & (SET - 1);
    if (live[i] == p) {
        live[i] = (void *)1;
        nlive--;
        frees++;
    } else {
        foreign_frees++;
    }
    pthread_mutex_unlock(&lock);
}

static void *count_malloc(size_t n)
{
    void *p = malloc(n);
    remember(p);
    return p;
}

static void *count_calloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    remember(p);
    return p;
}

static void *count_realloc(void *old, size_t n)
{
    forget(old);
    void *p = realloc(old, n);
    remember(p);
    return p;
}

static void count_free(void *p)
{
    forget(p);
    free(p);
}

Test(allocator, every_allocation_goes_through_the_one_set)
{
    live = calloc(SET, sizeof *live);
    cr_assert_not_null(live);
    cr_assert_eq(cp_set_allocator(count_malloc, count_realloc, count_calloc, count_free), 0);

    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 64, 0);
    for (int round = 0; round < 3; round++) {
        int fd[16];
        for (int i = 0; i < 16; i++)
            fd[i] = cpt_xconnect(e.sport);
        for (int i = 0; i < 16; i++) {
            cr_assert_eq(cpt_send_packet(fd[i], 7, "hello", 5), 0);
            cpt_xrecv_packet_eq(fd[i], 7, "hello", 5);
        }
        for (int i = 0; i < 16; i++)
            cpt_close(fd[i]);
    }
    cpt_env_stop(&e);

    pthread_mutex_lock(&lock);
    size_t a = allocs, f = frees, foreign = foreign_frees, still = nlive;
    pthread_mutex_unlock(&lock);
    cr_assert_gt(a, 0, "the library allocated nothing through the allocator");
    cr_assert_eq(foreign, 0, "%zu frees of memory the allocator did not hand out", foreign);
    /* What stays: process-wide caches (the pools of big send buffers are
     * empty here, as nothing was that big), and the live-object registry of
     * builds with misuse checks. */
    cr_assert_leq(still, 4, "%zu of %zu allocations not freed after the port was destroyed", still, a);
    cr_assert_geq(f + still, a);
}

Test(allocator, refused_once_the_library_has_allocated)
{
    cp_port *p;
    cr_assert_eq(cp_port_create(&p, NULL), 0);
    cr_assert_eq(cp_set_allocator(malloc, realloc, calloc, free), -EBUSY);
    cr_assert_eq(cp_port_destroy(p), 0);
}

Test(allocator, refused_with_a_null_function)
{
    cr_assert_eq(cp_set_allocator(NULL, realloc, calloc, free), -EINVAL);
    cr_assert_eq(cp_set_allocator(malloc, NULL, calloc, free), -EINVAL);
    cr_assert_eq(cp_set_allocator(malloc, realloc, NULL, free), -EINVAL);
    cr_assert_eq(cp_set_allocator(malloc, realloc, calloc, NULL), -EINVAL);
    /* Nothing was set: the library still works on its own allocator. */
    cp_port *p;
    cr_assert_eq(cp_port_create(&p, NULL), 0);
    cr_assert_eq(cp_port_destroy(p), 0);
}
