/* SPDX-License-Identifier: MIT */
/*
 * The listener keeps accepts pending and hands each new connection to a
 * worker (round-robin), where its session lives from then on.
 *
 * Accept errors: a connection that died in the backlog is skipped (the backend
 * keeps the accept armed). Running out of descriptors or memory (EMFILE,
 * ENFILE, ENOBUFS, ENOMEM) disarms the accept; the listener then waits on a
 * timer, backing off from 10 ms to 1 s, and tries again. It never recurses,
 * never spins while descriptors are exhausted, and never stops for good:
 * pending connections wait in the kernel's backlog until descriptors free up.
 */
#include "net/net.h"

#include <errno.h>
#include <stdlib.h>

#define BACKOFF_MIN_MS 10
#define BACKOFF_MAX_MS 1000

struct cp_listener {
    cp_service *svc;
    cp_worker *w;
    cp_handle h;
    cp_op acc;
    cp_wtimer retry;
    uint32_t backoff_ms;
    /* Owner worker only. The first step (begin) and the close are two
     * messages to the owner that may arrive in either order: begin may wait
     * in the starting worker's outbox until that worker's round ends, while a
     * stop on another thread pushes the close straight into the inbox. A
     * close that comes first only marks the listener closing; begin then
     * closes the socket and finishes the listener instead of starting it. */
    bool begun;
    bool armed;
    bool closing;
};

static void on_accept_cqe(cp_worker *w, cp_op *op, int res, unsigned flags, const uint8_t *data);

static void listener_done(cp_listener *l)
{
    cp_service *svc = l->svc;
    cp__free(l);
    cp__service_listener_done(svc);
    cp__service_object_done(svc);
}

static void arm(cp_listener *l)
{
    int r = l->w->port->be->accept(l->w, &l->h, &l->acc);
    if (r < 0) {
        /* Cannot even submit: treat like a resource error and retry later. */
        cp__log(CP_LOG_WARN, "listener: cannot arm accept: %s", cp_strerror(r));
        cp__timer_arm(l->w, &l->retry, l->backoff_ms);
        return;
    }
    l->armed = true;
}

static void retry_fire(cp_worker *w, void *arg)
{
    CP_UNUSED(w);
    cp_listener *l = arg;
    if (!l->closing)
        arm(l);
}

static void new_connection(cp_listener *l, int fd)
{
    cp_service *svc = l->svc;
    l->backoff_ms = BACKOFF_MIN_MS;
    cp__stat_add(&svc->st.accepted, 1);
    /* The caps by address are decided here, before a session exists; the
     * session keeps the address (one getpeername per connection). */
    cp_sockaddr peer;
    socklen_t peer_len = sizeof peer;
    if (getpeername(fd, &peer.sa, &peer_len) < 0)
        peer_len = 0;
    bool counted = false;
    int cause = cp__service_admit_accept(svc, &peer, peer_len, &counted);
    if (cause >= 0) {
        cp__sock_close(fd);
        cp__service_refused(svc, cause);
        return;
    }
    cp_worker *owner = cp__pick_worker(svc->port);
    cp_session *s = cp__session_new(svc, owner, false);
    int r = s ? cp__service_add_session(svc, s) : -ENOMEM;
    if (r < 0) {
        /* Beyond max_sessions (or out of memory): close at once, and count it. */
        cp__sock_close(fd);
        if (s)
            cp__session_unref(s);
        cp_addr_key k;
        if (counted && cp__addr_key(&peer.sa, peer_len, &k)) /* no session will release it */
            cp__addrcap_release(svc->caps, k);
        if (r != -ESHUTDOWN)
            cp__service_refused(svc, CP_REFUSED_MAX_SESSIONS);
        return;
    }
    s->peer = peer;
    s->peer_len = peer_len;
    s->addr_counted = counted;
    cp__session_ref(s); /* the start message's reference */
    if (owner == l->w)
        cp__session_start_accepted(owner, s, (void *)(intptr_t)fd, 0);
    else
        cp__send_msg(owner, cp__session_start_accepted, s, (void *)(intptr_t)fd);
}

static void on_accept_cqe(cp_worker *w, cp_op *op, int res, unsigned flags, const uint8_t *data)
{
    CP_UNUSED(data);
    cp_listener *l = (cp_listener *)((char *)op - offsetof(cp_listener, acc));
    if (res >= 0) {
        if (l->closing)
            cp__sock_close(res);
        else
            new_connection(l, res);
    } else if (res != -ECANCELED && !(flags & CP_CQE_MORE)) {
        cp__stat_add(&l->svc->st.accept_errors, 1);
        cp__log(CP_LOG_WARN, "listener: accept paused for %u ms: %s", l->backoff_ms, cp_strerror(res));
    }
    if (flags & CP_CQE_MORE)
        return;
    l->armed = false;
    if (l->closing) {
        listener_done(l);
        return;
    }
    if (res == -ECANCELED || res >= 0) {
        arm(l);
        return;
    }
    cp__timer_arm(w, &l->retry, l->backoff_ms);
    l->backoff_ms = l->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : l->backoff_ms * 2;
}

static void listener_begin(cp_worker *w, void *lp, void *unused, uintptr_t c)
{
    CP_UNUSED(unused);
    cp_listener *l = lp;
    l->begun = true;
    if (l->closing) {
        /* The stop's close came first and left the listener to this step. */
        cp__sock_close(l->h.fd);
        l->h.fd = -1;
        listener_done(l);
        return;
    }
    int r = w->port->be->attach(w, &l->h);
    if (r < 0) {
        cp__log(CP_LOG_ERROR, "listener: cannot watch the socket: %s", cp_strerror(r));
        cp__sock_close(l->h.fd);
        l->h.fd = -1;
        return; /* stays inert until the service stops */
    }
    arm(l);
}

static void listener_close(cp_worker *w, void *lp, void *unused, uintptr_t c)
{
    CP_UNUSED(unused);
    cp_listener *l = lp;
    l->closing = true;
    if (!l->begun)
        return; /* the first step is still on its way: it finishes the listener */
    cp__timer_cancel(w, &l->retry);
    bool was_armed = l->armed;
    if (l->h.fd >= 0)
        w->port->be->close(w, &l->h);
    if (!was_armed)
        listener_done(l);
    /* else: the accept completes with -ECANCELED and finishes the listener */
}

int cp__listener_start(cp_service *svc, int backlog, int accepts, bool reuseport)
{
    const struct sockaddr *sa = (const struct sockaddr *)&svc->addr;
    int fd = cp__sock_listener(sa, svc->addr_len, backlog, reuseport);
    if (fd < 0)
        return fd;
    socklen_t len = sizeof svc->addr;
    getsockname(fd, (struct sockaddr *)&svc->addr, &len);
    svc->addr_len = len;

    cp_listener *l = cp__zalloc(sizeof *l);
    if (!l) {
        cp__sock_close(fd);
        return -ENOMEM;
    }
    l->svc = svc;
    l->w = cp__pick_worker(svc->port);
    l->h.fd = fd;
    l->acc.cb = on_accept_cqe;
    l->acc.kind = CP_OP_ACCEPT;
    l->acc.batch = (uint16_t)accepts;
    l->retry.fn = retry_fire;
    l->retry.arg = l;
    l->retry.heap_index = UINT32_MAX;
    l->backoff_ms = BACKOFF_MIN_MS;
    svc->listener = l;
    pthread_mutex_lock(&svc->lock);
    svc->objects++;
    pthread_mutex_unlock(&svc->lock);
    cp__send_msg(l->w, listener_begin, l, NULL);
    return 0;
}

void cp__listener_stop(cp_service *svc)
{
    /* Urgent, so that the stop does not wait behind a backlog of messages
     * to the listener's worker; it may overtake the first step (see begun). */
    cp__send_msg_urgent(svc->listener->w, listener_close, svc->listener, NULL);
}
