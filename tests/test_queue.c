/* SPDX-License-Identifier: MIT */
/*
 * The intrusive list (src/queue.h) that every list of the library with
 * removal uses: the worker's ready list, the slab's blocks, a session's work
 * and timers, the port's job queues. What must hold: inserts at either end
 * keep their order, a node leaves from anywhere in O(1) with its neighbours
 * joined, a walk may remove the node it stands on, and whole lists move and
 * append in order, leaving the source empty.
 */
#include "internal.h"

#include <criterion/criterion.h>

typedef struct item {
    int value;
    cp_queue node;
} item;

static int value_of(cp_queue *n) { return CP_QUEUE_DATA(n, item, node)->value; }

/* The values of q from head to tail into out (at most max); how many. The
 * walk checks the back links too: each node's prev is the one before it. */
static int values(cp_queue *q, int *out, int max)
{
    int n = 0;
    cp_queue *it, *before = q;
    CP_QUEUE_FOREACH(it, q) {
        cr_assert_eq(it->prev, before, "back link broken at position %d", n);
        if (n < max)
            out[n] = value_of(it);
        n++;
        before = it;
    }
    cr_assert_eq(q->prev, before, "the head's prev is not the last node");
    return n;
}

#define ASSERT_VALUES(q, ...)                                                                                \
  do {                                                                                                       \
    const int want_[] = { __VA_ARGS__ };                                                                     \
    int got_[16];                                                                                            \
    int n_ = values((q), got_, 16);                                                                          \
    cr_assert_eq(n_, (int)(sizeof want_ / sizeof want_[0]), "length %d", n_);                                \
    for (int i_ = 0; i_ < n_; i_++)                                                                          \
      cr_assert_eq(got_[i_], want_[i_], "at %d: %d, expected %d", i_, got_[i_], want_[i_]);                  \
  } while (0)

Test(queue, starts_empty)
{
    cp_queue q;
    cp__queue_init(&q);
    cr_assert(cp__queue_empty(&q));
    cr_assert_eq(cp__queue_head(&q), &q);
    cr_assert_eq(cp__queue_tail(&q), &q);
    cr_assert_null(cp__queue_pop_head(&q));
    int none[1];
    cr_assert_eq(values(&q, none, 1), 0);
}

Test(queue, inserts_keep_their_order_at_either_end)
{
    cp_queue q;
    item it[4] = { { .value = 0 }, { .value = 1 }, { .value = 2 }, { .value = 3 } };
    cp__queue_init(&q);
    cp__queue_insert_tail(&q, &it[1].node);
    cp__queue_insert_tail(&q, &it[2].node);
    cp__queue_insert_head(&q, &it[0].node);
    cp__queue_insert_tail(&q, &it[3].node);
    cr_assert(!cp__queue_empty(&q));
    ASSERT_VALUES(&q, 0, 1, 2, 3);
    cr_assert_eq(cp__queue_head(&q), &it[0].node);
    cr_assert_eq(cp__queue_tail(&q), &it[3].node);
    cr_assert_eq(CP_QUEUE_DATA(cp__queue_head(&q), item, node), &it[0]);

    /* Pushed at the head and taken from the head: a stack, newest first, as
     * the worker's ready list is walked. */
    cp_queue s;
    cp__queue_init(&s);
    for (int i = 0; i < 4; i++) {
        cp__queue_remove(&it[i].node);
        cp__queue_insert_head(&s, &it[i].node);
    }
    cr_assert(cp__queue_empty(&q));
    for (int i = 3; i >= 0; i--)
        cr_assert_eq(value_of(cp__queue_pop_head(&s)), i);
    cr_assert(cp__queue_empty(&s));
}

Test(queue, remove_from_anywhere_joins_the_neighbours)
{
    cp_queue q;
    item it[5];
    cp__queue_init(&q);
    for (int i = 0; i < 5; i++) {
        it[i].value = i;
        cp__queue_insert_tail(&q, &it[i].node);
    }
    cp__queue_remove(&it[2].node); /* the middle */
    cr_assert_null(it[2].node.next, "a removed node keeps no links");
    cr_assert_null(it[2].node.prev);
    ASSERT_VALUES(&q, 0, 1, 3, 4);
    cp__queue_remove(&it[0].node); /* the head */
    ASSERT_VALUES(&q, 1, 3, 4);
    cp__queue_remove(&it[4].node); /* the tail */
    ASSERT_VALUES(&q, 1, 3);
    cp__queue_insert_head(&q, &it[2].node); /* a removed node can go back */
    ASSERT_VALUES(&q, 2, 1, 3);
    cp__queue_remove(&it[1].node);
    cp__queue_remove(&it[2].node);
    cp__queue_remove(&it[3].node); /* the last one */
    cr_assert(cp__queue_empty(&q));
    cr_assert_eq(q.prev, &q, "an emptied head points at itself both ways");
}

Test(queue, foreach_safe_may_remove_the_current_node)
{
    cp_queue q;
    item it[6];
    cp__queue_init(&q);
    for (int i = 0; i < 6; i++) {
        it[i].value = i;
        cp__queue_insert_tail(&q, &it[i].node);
    }
    cp_queue *n, *tmp;
    int seen = 0;
    CP_QUEUE_FOREACH_SAFE(n, tmp, &q) {
        cr_assert_eq(value_of(n), seen++, "visited out of order");
        if (value_of(n) % 2 == 0)
            cp__queue_remove(n);
    }
    cr_assert_eq(seen, 6, "removal cut the walk short");
    ASSERT_VALUES(&q, 1, 3, 5);
    CP_QUEUE_FOREACH_SAFE(n, tmp, &q)
        cp__queue_remove(n);
    cr_assert(cp__queue_empty(&q));
}

/* Draining by pop_head sees what the work for one node did to the others:
 * here the work for the first node removes the third, which is then never
 * visited, and puts the first back on another list. */
Test(queue, pop_head_drain_sees_removals_made_meanwhile)
{
    cp_queue q, later;
    item it[4];
    cp__queue_init(&q);
    cp__queue_init(&later);
    for (int i = 0; i < 4; i++) {
        it[i].value = i;
        cp__queue_insert_tail(&q, &it[i].node);
    }
    int order[4], n = 0;
    cp_queue *e;
    while ((e = cp__queue_pop_head(&q)) != NULL) {
        order[n++] = value_of(e);
        if (value_of(e) == 0) {
            cp__queue_remove(&it[2].node);
            cp__queue_insert_tail(&later, e);
        }
    }
    cr_assert_eq(n, 3);
    cr_assert_eq(order[0], 0);
    cr_assert_eq(order[1], 1);
    cr_assert_eq(order[2], 3);
    ASSERT_VALUES(&later, 0);
}

Test(queue, move_and_append_keep_order_and_empty_the_source)
{
    cp_queue a, b, to;
    item it[6];
    cp__queue_init(&a);
    cp__queue_init(&b);
    for (int i = 0; i < 3; i++) {
        it[i].value = i;
        cp__queue_insert_tail(&a, &it[i].node);
        it[i + 3].value = i + 3;
        cp__queue_insert_tail(&b, &it[i + 3].node);
    }
    to.next = to.prev = NULL; /* move needs no initialized destination */
    cp__queue_move(&a, &to);
    cr_assert(cp__queue_empty(&a));
    ASSERT_VALUES(&to, 0, 1, 2);
    /* The moved nodes are linked to the new head: one leaves it cleanly. */
    cp__queue_remove(&it[1].node);
    ASSERT_VALUES(&to, 0, 2);
    cp__queue_append(&to, &b);
    cr_assert(cp__queue_empty(&b));
    ASSERT_VALUES(&to, 0, 2, 3, 4, 5);
    cp__queue_append(&to, &b); /* an empty source changes nothing */
    ASSERT_VALUES(&to, 0, 2, 3, 4, 5);
    cp__queue_append(&a, &to); /* into an empty list */
    cr_assert(cp__queue_empty(&to));
    ASSERT_VALUES(&a, 0, 2, 3, 4, 5);
    cp__queue_move(&to, &b); /* an empty list moved */
    cr_assert(cp__queue_empty(&b));
}
