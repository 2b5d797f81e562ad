/*
 * Groups (rooms): a set of sessions with broadcast.
 *
 * Broadcast holds the group's read lock only while it queues one buffer
 * reference on each member. Queueing never touches a socket: members owned by
 * the calling worker get the buffer appended to their queue (written at the
 * end of the round), others get a message in the round's outbox; a thread
 * that is not a worker batches its messages and pushes them after unlocking.
 *
 * References: the group holds one reference on each member session; each
 * membership held by a session holds one reference on the group. Lock order is
 * group lock, then the session's glock; a closing session copies its list of
 * groups out under glock first and only then takes each group's lock.
 */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>

struct cp_group {
    atomic_uint refs;
    pthread_rwlock_t lock;
    bool dead;
    cp_session **m;
    size_t n, cap;
};

static void group_unref(cp_group *g)
{
    if (atomic_fetch_sub_explicit(&g->refs, 1, memory_order_acq_rel) != 1)
        return;
    pthread_rwlock_destroy(&g->lock);
    free(g->m);
    free(g);
}

int cp_group_create(cp_group **out)
{
    if (!out)
        return -EINVAL;
    cp_group *g = cp__xalloc(sizeof *g);
    if (!g)
        return -ENOMEM;
    atomic_init(&g->refs, 1);
    pthread_rwlock_init(&g->lock, NULL);
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

/* With g's write lock held: removes s from the member array. */
static bool members_remove(cp_group *g, cp_session *s)
{
    for (size_t i = 0; i < g->n; i++) {
        if (g->m[i] == s) {
            g->m[i] = g->m[--g->n];
            return true;
        }
    }
    return false;
}

void cp_group_destroy(cp_group *g)
{
    if (!g)
        return;
    pthread_rwlock_wrlock(&g->lock);
    g->dead = true;
    cp_session **m = g->m;
    size_t n = g->n;
    g->m = NULL;
    g->n = g->cap = 0;
    pthread_rwlock_unlock(&g->lock);
    for (size_t i = 0; i < n; i++) {
        if (membership_drop(m[i], g))
            group_unref(g);
        cp__session_unref(m[i]);
    }
    free(m);
    group_unref(g);
}

int cp_group_add(cp_group *g, cp_session *s)
{
    if (!g || !s)
        return -EINVAL;
    int r = 0;
    pthread_rwlock_wrlock(&g->lock);
    if (g->dead) {
        r = -ESHUTDOWN;
        goto out;
    }
    for (size_t i = 0; i < g->n; i++) {
        if (g->m[i] == s) {
            r = -EEXIST;
            goto out;
        }
    }
    if (g->n == g->cap) {
        size_t cap = g->cap ? g->cap * 2 : 16;
        cp_session **m = realloc(g->m, sizeof *m * cap);
        if (!m) {
            r = -ENOMEM;
            goto out;
        }
        g->m = m;
        g->cap = cap;
    }
    pthread_mutex_lock(&s->glock);
    /* Checked under glock: a session that starts closing after this point
     * will find g in its list and remove itself. */
    if (atomic_load(&s->state) != CP_S_CONNECTED) {
        r = -ENOTCONN;
    } else if (s->ngroups == s->capgroups) {
        uint32_t cap = s->capgroups ? s->capgroups * 2 : 2;
        cp_group **gs = realloc(s->groups, sizeof *gs * cap);
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
        g->m[g->n++] = s;
    }
    pthread_mutex_unlock(&s->glock);
out:
    pthread_rwlock_unlock(&g->lock);
    return r;
}

int cp_group_remove(cp_group *g, cp_session *s)
{
    if (!g || !s)
        return -EINVAL;
    pthread_rwlock_wrlock(&g->lock);
    bool was = members_remove(g, s);
    pthread_rwlock_unlock(&g->lock);
    if (!was)
        return -ENOENT;
    if (membership_drop(s, g))
        group_unref(g);
    cp__session_unref(s);
    return 0;
}

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
        pthread_rwlock_wrlock(&g->lock);
        bool was = members_remove(g, s);
        pthread_rwlock_unlock(&g->lock);
        if (was)
            cp__session_unref(s); /* never the last: the table still holds one */
        group_unref(g);
    }
    free(gs);
}

size_t cp_group_size(cp_group *g)
{
    pthread_rwlock_rdlock(&g->lock);
    size_t n = g->n;
    pthread_rwlock_unlock(&g->lock);
    return n;
}

/* Queues b on every member but skip (NULL skips none); see the file comment
 * for why the lock is held only while queueing. */
static int broadcast(cp_group *g, cp_sendbuf *b, const cp_session *skip)
{
    if (!g || !b)
        return -EINVAL;
    cp_port *port = NULL;
    int sent = 0;
    pthread_rwlock_rdlock(&g->lock);
    if (g->n)
        port = g->m[0]->owner->port;
    if (port)
        cp__batch_begin(port);
    for (size_t i = 0; i < g->n; i++)
        if (g->m[i] != skip && cp__session_send(g->m[i], b) == 0)
            sent++;
    pthread_rwlock_unlock(&g->lock);
    if (port)
        cp__batch_end(port);
    return sent;
}

int cp_group_broadcast(cp_group *g, cp_sendbuf *b) { return broadcast(g, b, NULL); }

int cp_group_broadcast_except(cp_group *g, cp_sendbuf *b, const cp_session *skip)
{
    return broadcast(g, b, skip);
}
