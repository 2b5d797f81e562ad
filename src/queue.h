/* SPDX-License-Identifier: MIT */
/*
 * The library's one intrusive list: a circular doubly linked list with a
 * sentinel head (the model is libuv's uv__queue and nginx's ngx_queue_t).
 *
 * Why this shape. Intrusive: a node lives inside the object it lists, so
 * putting an object on a list allocates nothing and cannot fail. Doubly
 * linked: a node leaves its list in O(1) wherever it is, without knowing the
 * list (a handle closed while it waits on a ready list, a block that fills
 * up). Circular with a sentinel: an empty list is a head that points at
 * itself, so no operation has a special case for the first or the last node,
 * and moving a whole list is a few pointer stores.
 *
 * The cost is two pointers per node where a singly linked list needs one:
 * lists that are only pushed and drained whole (free lists, the posted
 * items, the lock-free stacks and inboxes) stay singly linked.
 *
 * A head must be initialized (cp__queue_init) before use; a node need not be,
 * it is linked by an insert. A node is on at most one list at a time, and the
 * caller knows whether it is on one (these lists keep no count and no flag).
 * Nothing here locks: a list belongs to one thread or one lock.
 */
#ifndef CP_QUEUE_H
#define CP_QUEUE_H

#include <stdbool.h>
#include <stddef.h>

typedef struct cp_queue cp_queue;
struct cp_queue {
    cp_queue *next;
    cp_queue *prev;
};

/* The object that holds node ptr in its member field. */
#define CP_QUEUE_DATA(ptr, type, field) ((type *)(void *)((char *)(ptr)-offsetof(type, field)))

/* Every node of q from head to tail; the body must not remove n. */
#define CP_QUEUE_FOREACH(n, q) for ((n) = (q)->next; (n) != (q); (n) = (n)->next)

/* The same, reading the next node before the body runs, so that the body may
 * remove n (but no other node of q). */
#define CP_QUEUE_FOREACH_SAFE(n, tmp, q)                                                                     \
  for ((n) = (q)->next, (tmp) = (n)->next; (n) != (q); (n) = (tmp), (tmp) = (n)->next)

static inline void cp__queue_init(cp_queue *q) { q->next = q->prev = q; }

static inline bool cp__queue_empty(const cp_queue *q) { return q->next == q; }

/* The first and the last node; q itself when q is empty. */
static inline cp_queue *cp__queue_head(const cp_queue *q) { return q->next; }
static inline cp_queue *cp__queue_tail(const cp_queue *q) { return q->prev; }

static inline void cp__queue_insert_head(cp_queue *q, cp_queue *n)
{
    n->next = q->next;
    n->prev = q;
    q->next->prev = n;
    q->next = n;
}

static inline void cp__queue_insert_tail(cp_queue *q, cp_queue *n)
{
    n->prev = q->prev;
    n->next = q;
    q->prev->next = n;
    q->prev = n;
}

/* Takes n off its list. Its links are cleared, so that removing it twice
 * faults at once instead of corrupting the list it was on. */
static inline void cp__queue_remove(cp_queue *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    n->next = n->prev = NULL;
}

/* Takes the first node off q and returns it; NULL when q is empty. Draining
 * a list this way stays correct when what runs for one node removes others
 * (or puts the node back): the loop reads the list afresh each time. */
static inline cp_queue *cp__queue_pop_head(cp_queue *q)
{
    if (cp__queue_empty(q))
        return NULL;
    cp_queue *n = q->next;
    cp__queue_remove(n);
    return n;
}

/* Puts every node of from, in order, after the last node of to, and leaves
 * from empty. */
static inline void cp__queue_append(cp_queue *to, cp_queue *from)
{
    if (cp__queue_empty(from))
        return;
    from->next->prev = to->prev;
    to->prev->next = from->next;
    from->prev->next = to;
    to->prev = from->prev;
    cp__queue_init(from);
}

/* Moves every node of from, in order, to to (whatever to held is forgotten:
 * it need not be initialized), and leaves from empty. A worker takes a list
 * this way to walk it while new entries go to the list afresh. */
static inline void cp__queue_move(cp_queue *from, cp_queue *to)
{
    cp__queue_init(to);
    cp__queue_append(to, from);
}

#endif
