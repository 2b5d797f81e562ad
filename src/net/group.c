/* SPDX-License-Identifier: MIT */
/*
 * Groups (rooms): a set of sessions with broadcast.
 *
 * The members are an immutable, reference-counted array. A change (add,
 * remove, a closing member leaving, destroy) builds a new array under the
 * group's writer lock and swaps it in; a broadcast takes a reference to the
 * current array and queues the buffer on each member with no lock held. The
 * lock that guards the swap against a broadcast taking the array covers two
 * loads and an increment, so a worker whose session leaves a room never
 * waits for user threads' broadcasts, however many of them overlap. (A
 * reader-preferring read-write lock did make it wait: overlapping broadcasts
 * always held a read lock, the member's leave starved on the write lock, the
 * worker blocked, and a service stop hung.)
 *
 * Queueing never touches a socket: members owned by the calling worker get
 * the buffer appended to their queue (written at the end of the round),
 * others get a message in the round's outbox; a thread that is not a worker
 * batches its messages and pushes them when the loop ends.
 *
 * References: the group holds one reference on each member session, taken
 * when it joins. A member taken out of the array may still be in older
 * arrays that broadcasts hold, so its reference is not dropped at once: it
 * goes into the new array's drop list and is dropped when that array is
 * freed. Every array holds a reference on the array that replaced it, so
 * arrays are freed oldest first, and when an array goes, the older arrays,
 * the only ones that can still name the sessions it drops, are gone already.
 * Each membership held by a session holds one reference on the group. Lock
 * order is the group's writer lock, then the session's glock; a closing
 * session copies its list of groups out under glock first and only then
 * takes each group's writer lock.
 */
#include "net/net.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

typedef struct members {
    /* The group's while current, each broadcast's, the predecessor's. */
    atomic_uint refs;
    bool own_all;         /* destroyed: drops its members' references too */
    struct members *next; /* the array that replaced this one (referenced) */
    uint32_t n;           /* members: m[0 .. n) */
    uint32_t ndrop;       /* references dropped when this array goes: m[n .. n + ndrop) */
    cp_session *m[];
} members;

struct cp_group {
    atomic_uint refs;
    pthread_mutex_t wlock;     /* changes: one at a time */
    pthread_mutex_t swap_lock; /* cur's swap against a broadcast taking it */
    bool dead;                 /* under wlock */
    members *cur;              /* written under both locks; NULL once destroyed */
    cp__group_tap *tap;        /* written under both locks, like cur */
};

static members *members_new(uint32_t n, uint32_t ndrop)
{
    members *a = cp__malloc(sizeof *a + sizeof(cp_session *) * ((size_t)n + ndrop));
    if (!a)
        return NULL;
    atomic_init(&a->refs, 1);
    a->own_all = false;
    a->next = NULL;
    a->n = n;
    a->ndrop = ndrop;
    return a;
}

/* Drops one reference to a; the last one frees it, then drops its reference
 * to the next array, and so on. */
static void members_release(members *a)
{
    while (a && atomic_fetch_sub_explicit(&a->refs, 1, memory_order_acq_rel) == 1) {
        for (uint32_t i = a->own_all ? 0 : a->n; i < a->n + a->ndrop; i++)
            cp__session_unref(a->m[i]);
        members *next = a->next;
        cp__free(a);
        a = next;
    }
}

/* The current array, referenced, or NULL once destroyed; and, when tap is
 * not NULL, the tap (referenced) or NULL. Any thread. */
static members *members_get(cp_group *g, cp__group_tap **tap)
{
    pthread_mutex_lock(&g->swap_lock);
    members *a = g->cur;
    if (a)
        atomic_fetch_add_explicit(&a->refs, 1, memory_order_relaxed);
    if (tap) {
        *tap = g->tap;
        if (*tap)
            (*tap)->ref(*tap);
    }
    pthread_mutex_unlock(&g->swap_lock);
    return a;
}

/* Under wlock: makes t the tap; returns the one it replaced (its reference
 * the caller drops with no lock held). */
static cp__group_tap *tap_swap(cp_group *g, cp__group_tap *t)
{
    pthread_mutex_lock(&g->swap_lock);
    cp__group_tap *old = g->tap;
    g->tap = t;
    pthread_mutex_unlock(&g->swap_lock);
    return old;
}

/* Under wlock: makes a the current array. Returns the one it replaced, whose
 * group reference the caller drops once it has let go of wlock. */
static members *members_swap(cp_group *g, members *a)
{
    members *old = g->cur;
    atomic_fetch_add_explicit(&a->refs, 1, memory_order_relaxed);
    old->next = a;
    pthread_mutex_lock(&g->swap_lock);
    g->cur = a;
    pthread_mutex_unlock(&g->swap_lock);
    return old;
}

static int members_find(const members *a, const cp_session *s)
{
    for (uint32_t i = 0; i < a->n; i++)
        if (a->m[i] == s)
            return (int)i;
    return -1;
}

static void group_unref(cp_group *g)
{
    if (atomic_fetch_sub_explicit(&g->refs, 1, memory_order_acq_rel) != 1)
        return;
    pthread_mutex_destroy(&g->wlock);
    pthread_mutex_destroy(&g->swap_lock);
    members_release(g->cur); /* NULL: destroyed */
    cp__free(g);
}

void cp__group_ref(cp_group *g) { atomic_fetch_add_explicit(&g->refs, 1, memory_order_relaxed); }

void cp__group_unref(cp_group *g) { group_unref(g); }

int cp_group_create(cp_group **out)
{
    if (!out)
        return -EINVAL;
    cp_group *g = cp__zalloc(sizeof *g);
    members *a = members_new(0, 0);
    if (!g || !a) {
        cp__free(g);
        cp__free(a);
        return -ENOMEM;
    }
    atomic_init(&g->refs, 1);
    pthread_mutex_init(&g->wlock, NULL);
    pthread_mutex_init(&g->swap_lock, NULL);
    g->cur = a;
    *out = g;
    return 0;
}

/* Removes g from s's list; returns true if it was there (a group ref to drop). */
static bool membership_drop(cp_session *s, cp_group *g)
{
    bool found = false;
    pthread_mutex_lock(&s->glock);
    for (uint32_t i = 0; i < s->ngroups; i++) {
        if (s->groups[i] == g) {
            s->groups[i] = s->groups[--s->ngroups];
            found = true;
            break;
        }
    }
    pthread_mutex_unlock(&s->glock);
    return found;
}

/* Adds g to s's list, with the references a membership holds. Checked under
 * glock: a session that starts closing after this point will find g in its
 * list and remove itself. */
static int membership_add(cp_session *s, cp_group *g)
{
    int r = 0;
    pthread_mutex_lock(&s->glock);
    if (atomic_load(&s->state) != CP_S_CONNECTED) {
        r = -ENOTCONN;
    } else if (s->ngroups == s->capgroups) {
        uint32_t cap = s->capgroups ? s->capgroups * 2 : 2;
        /* NOLINTNEXTLINE(bugprone-sizeof-expression): an array of pointers: the element size is a pointer's */
        cp_group **gs = cp__realloc(s->groups, sizeof *gs * cap);
        if (!gs) {
            r = -ENOMEM;
        } else {
            s->groups = gs;
            s->capgroups = cap;
        }
    }
    if (r == 0) {
        s->groups[s->ngroups++] = g;
        atomic_fetch_add_explicit(&g->refs, 1, memory_order_relaxed);
        cp__session_ref(s);
    }
    pthread_mutex_unlock(&s->glock);
    return r;
}

/* Under wlock: the array without s, whose reference it will drop. -ENOENT
 * if s is not a member; -ENOMEM. *old gets the replaced array. */
static int members_remove(cp_group *g, cp_session *s, members **old)
{
    if (g->dead)
        return -ENOENT;
    const members *cur = g->cur;
    int at = members_find(cur, s);
    if (at < 0)
        return -ENOENT;
    members *a = members_new(cur->n - 1, 1);
    if (!a)
        return -ENOMEM;
    /* NOLINTNEXTLINE(bugprone-sizeof-expression): an array of pointers: the element size is a pointer's */
    memcpy(a->m, cur->m, sizeof *a->m * (size_t)at);
    /* NOLINTNEXTLINE(bugprone-sizeof-expression): an array of pointers: the element size is a pointer's */
    memcpy(a->m + at, cur->m + at + 1, sizeof *a->m * (cur->n - 1 - (uint32_t)at));
    a->m[a->n] = s;
    *old = members_swap(g, a);
    return 0;
}

void cp_group_destroy(cp_group *g)
{
    if (!g)
        return;
    pthread_mutex_lock(&g->wlock);
    g->dead = true;
    members *last = g->cur;
    pthread_mutex_lock(&g->swap_lock);
    g->cur = NULL;
    cp__group_tap *tap = g->tap;
    g->tap = NULL;
    pthread_mutex_unlock(&g->swap_lock);
    /* Broadcasts may still hold it: the members' references go with it. */
    last->own_all = true;
    pthread_mutex_unlock(&g->wlock);
    if (tap) {
        tap->closed(tap);
        tap->unref(tap);
    }
    for (uint32_t i = 0; i < last->n; i++)
        /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): g holds the reference dropped after the loop */
        if (membership_drop(last->m[i], g))
            group_unref(g);
    members_release(last);
    /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): the references dropped in the loop were the members', not this one */
    group_unref(g);
}

int cp_group_add(cp_group *g, cp_session *s)
{
    if (!g || !s)
        return -EINVAL;
    int r = 0;
    members *old = NULL;
    pthread_mutex_lock(&g->wlock);
    if (g->dead) {
        r = -ESHUTDOWN;
    } else if (members_find(g->cur, s) >= 0) {
        r = -EEXIST;
    } else {
        members *a = members_new(g->cur->n + 1, 0);
        r = a ? membership_add(s, g) : -ENOMEM;
        if (r == 0) {
            /* NOLINTNEXTLINE(bugprone-sizeof-expression): an array of pointers: the element size is a pointer's */
            memcpy(a->m, g->cur->m, sizeof *a->m * g->cur->n);
            a->m[a->n - 1] = s;
            old = members_swap(g, a);
        } else {
            cp__free(a);
        }
    }
    pthread_mutex_unlock(&g->wlock);
    members_release(old);
    return r;
}

int cp_group_remove(cp_group *g, cp_session *s)
{
    if (!g || !s)
        return -EINVAL;
    members *old = NULL;
    pthread_mutex_lock(&g->wlock);
    int r = members_remove(g, s, &old);
    pthread_mutex_unlock(&g->wlock);
    if (r < 0)
        return r;
    members_release(old);
    if (membership_drop(s, g))
        group_unref(g);
    return 0;
}

/* On the owner, from the close: waits only for other changes of each group,
 * never for broadcasts. */
void cp__group_leave_all(cp_session *s)
{
    pthread_mutex_lock(&s->glock);
    cp_group **gs = s->groups;
    uint32_t n = s->ngroups;
    s->groups = NULL;
    s->ngroups = s->capgroups = 0;
    pthread_mutex_unlock(&s->glock);
    for (uint32_t i = 0; i < n; i++) {
        cp_group *g = gs[i];
        for (;;) {
            members *old = NULL;
            pthread_mutex_lock(&g->wlock);
            int r = members_remove(g, s, &old);
            pthread_mutex_unlock(&g->wlock);
            members_release(old);
            if (r != -ENOMEM)
                break;
            /* A closing session must leave: wait for memory, as a message
             * that cannot be allocated does (port.c). */
            cp__sleep_ms(1);
        }
        group_unref(g);
    }
    cp__free(gs);
}

size_t cp_group_size(cp_group *g)
{
    pthread_mutex_lock(&g->swap_lock);
    size_t n = g->cur ? g->cur->n : 0;
    pthread_mutex_unlock(&g->swap_lock);
    return n;
}

/* Queues b on every member of the current array but skip (NULL skips none),
 * holding a reference to the array and no lock. */
static int broadcast(cp_group *g, cp_sendbuf *b, const cp_session *skip, bool tapped)
{
    if (!g || !b)
        return -EINVAL;
    cp__group_tap *tap = NULL;
    members *a = members_get(g, tapped ? &tap : NULL);
    if (!a)
        return 0;
    int sent = 0;
    cp_port *port = a->n ? a->m[0]->owner->port : NULL;
    if (port)
        cp__batch_begin(port);
    for (uint32_t i = 0; i < a->n; i++)
        if (a->m[i] != skip && cp__session_send(a->m[i], b) == 0)
            sent++;
    if (port)
        cp__batch_end(port);
    members_release(a);
    if (tap) {
        tap->fn(tap, b, skip);
        tap->unref(tap);
    }
    return sent;
}

int cp_group_broadcast(cp_group *g, cp_sendbuf *b) { return broadcast(g, b, NULL, true); }

int cp_group_broadcast_except(cp_group *g, cp_sendbuf *b, const cp_session *skip)
{
    return broadcast(g, b, skip, true);
}

int cp__group_broadcast_local(cp_group *g, cp_sendbuf *b) { return broadcast(g, b, NULL, false); }

int cp__group_set_tap(cp_group *g, cp__group_tap *t)
{
    int r = 0;
    pthread_mutex_lock(&g->wlock);
    if (g->dead) {
        r = -ESHUTDOWN;
    } else if (g->tap) {
        r = -EBUSY;
    } else {
        t->ref(t);
        tap_swap(g, t);
    }
    pthread_mutex_unlock(&g->wlock);
    return r;
}

void cp__group_clear_tap(cp_group *g, cp__group_tap *t)
{
    cp__group_tap *old = NULL;
    pthread_mutex_lock(&g->wlock);
    if (g->tap == t)
        old = tap_swap(g, NULL);
    pthread_mutex_unlock(&g->wlock);
    if (old)
        old->unref(old);
}
