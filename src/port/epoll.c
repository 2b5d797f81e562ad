/* SPDX-License-Identifier: MIT */
/*
 * The epoll backend: readiness turned into completions.
 *
 * Each socket is registered once, edge-triggered for input and output, when it
 * is attached; nothing calls epoll_ctl again until it is closed, so steady
 * traffic costs no epoll_ctl at all. An armed receive reads into the worker's
 * buffer when the socket is readable and reports the bytes as a completion; a
 * send is written inline at flush time and only after EAGAIN waits for
 * EPOLLOUT, which completes it with -EAGAIN ("writable, gather again").
 *
 * Edge triggering means an edge that arrives while no operation is armed is
 * gone, so arming a receive or an accept always tries once (via the ready
 * list) instead of waiting for the next edge. A handle that still has input
 * after its fair share of reads goes on the ready list too, so one busy socket
 * cannot starve the others.
 */
#include "port/port.h"

#include <errno.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define EP_EVENTS 256
#define READS_PER_PASS 4

typedef struct ep_state {
    int epfd;
    int evfd;
    cp_handle evh;
    struct epoll_event ev[EP_EVENTS];
} ep_state;

static int ep_init(cp_worker *w)
{
    ep_state *st = cp__zalloc(sizeof *st);
    if (!st)
        return -ENOMEM;
    st->epfd = epoll_create1(EPOLL_CLOEXEC);
    st->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (st->epfd < 0 || st->evfd < 0) {
        int err = -errno;
        if (st->epfd >= 0)
            close(st->epfd);
        if (st->evfd >= 0)
            close(st->evfd);
        cp__free(st);
        return err;
    }
    st->evh.fd = st->evfd;
    struct epoll_event e = { .events = EPOLLIN, .data.ptr = &st->evh };
    if (epoll_ctl(st->epfd, EPOLL_CTL_ADD, st->evfd, &e) < 0) {
        int err = -errno;
        close(st->epfd);
        close(st->evfd);
        cp__free(st);
        return err;
    }
    w->be = st;
    return 0;
}

static void ep_fini(cp_worker *w)
{
    ep_state *st = w->be;
    if (!st)
        return;
    close(st->epfd);
    close(st->evfd);
    cp__free(st);
    w->be = NULL;
}

static void ep_wake(cp_worker *w)
{
    ep_state *st = w->be;
    uint64_t one = 1;
    /* EAGAIN means the counter is already non-zero: the worker will wake. */
    while (write(st->evfd, &one, sizeof one) < 0 && errno == EINTR)
        ;
}


static int ep_attach(cp_worker *w, cp_handle *h)
{
    ep_state *st = w->be;
    struct epoll_event e = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = h };
    if (epoll_ctl(st->epfd, EPOLL_CTL_ADD, h->fd, &e) < 0)
        return -errno;
    return 0;
}

static bool accept_error_is_transient(int err)
{
    /* The connection died in the backlog, or a signal interrupted: the
     * listener itself is fine and the next pending connection may be taken. */
    return err == ECONNABORTED || err == EINTR || err == EPROTO || err == EPERM || err == ENETDOWN ||
           err == ENOPROTOOPT || err == EHOSTDOWN || err == ENONET || err == EHOSTUNREACH ||
           err == EOPNOTSUPP || err == ENETUNREACH;
}

static void do_accept(cp_worker *w, cp_handle *h, cp_op *op)
{
    unsigned batch = op->batch ? op->batch : 64;
    for (unsigned i = 0; i < batch; i++) {
        int fd = accept4(h->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            op->cb(w, op, fd, CP_CQE_MORE, NULL);
            if (h->rd != op)
                return;
            continue;
        }
        int err = errno;
        if (err == EAGAIN || err == EWOULDBLOCK)
            return;
        if (accept_error_is_transient(err)) {
            if (err != EINTR)
                op->cb(w, op, -err, CP_CQE_MORE, NULL);
            if (h->rd != op)
                return;
            continue;
        }
        /* EMFILE, ENFILE, ENOBUFS, ENOMEM and anything unknown: disarm and let
         * the owner decide when to try again. Never loop on it here. */
        cp__op_finish(w, h, op, -err, NULL);
        return;
    }
    cp__hlist_push(&w->ready, h); /* fair share used; more may be pending */
}

static void do_recv(cp_worker *w, cp_handle *h, cp_op *op)
{
    for (int i = 0; i < READS_PER_PASS; i++) {
        ssize_t n = read(h->fd, w->rbuf, w->rbuf_size);
        if (n > 0) {
            cp__rbuf_enter(w);
            op->cb(w, op, (int)n, CP_CQE_MORE, w->rbuf);
            cp__rbuf_settle(w);
            if (h->rd != op || h->rd_paused)
                return;
            /* A short read drained the socket and the next bytes bring a new
             * edge, unless the peer's FIN (or an error) came with these
             * bytes: then no edge follows, so read on to see it. */
            if ((size_t)n < w->rbuf_size && !h->hup)
                return;
            continue;
        }
        if (n == 0) {
            cp__op_finish(w, h, op, 0, NULL);
            return;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return;
        if (errno == EINTR) {
            i--;
            continue;
        }
        cp__op_finish(w, h, op, -errno, NULL);
        return;
    }
    cp__hlist_push(&w->ready, h);
}

static void do_input(cp_worker *w, cp_handle *h)
{
    cp_op *op = h->rd;
    if (!op)
        return;
    if (op->kind == CP_OP_ACCEPT)
        do_accept(w, h, op);
    else if (!h->rd_paused)
        do_recv(w, h, op);
}

static void do_output(cp_worker *w, cp_handle *h)
{
    cp_op *op = h->wr;
    if (!op)
        return;
    if (op->kind == CP_OP_CONNECT) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(h->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        cp__op_finish(w, h, op, -err, NULL);
    } else {
        cp__op_finish(w, h, op, -EAGAIN, NULL);
    }
}

static int ep_poll(cp_worker *w, int timeout_ms)
{
    ep_state *st = w->be;
    int n = epoll_wait(st->epfd, st->ev, EP_EVENTS, timeout_ms);
    if (n < 0)
        return -errno;
    w->now_ns = cp__now_ns();
    /* Handles queued before this pass get their turn after the new events;
     * those queued during it wait for the next pass. */
    cp_queue ready;
    cp__queue_move(&w->ready, &ready);
    for (int i = 0; i < n; i++) {
        cp_handle *h = st->ev[i].data.ptr;
        uint32_t e = st->ev[i].events;
        if (h == &st->evh) {
            uint64_t v;
            while (read(st->evfd, &v, sizeof v) < 0 && errno == EINTR)
                ;
            continue;
        }
        /* Closed earlier in this pass: its memory lives until the deferred
         * completions run, after this loop, so reading fd is safe. */
        if (h->fd < 0)
            continue;
        if (e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
            h->hup = 1;
        if (e & (EPOLLOUT | EPOLLERR | EPOLLHUP))
            do_output(w, h);
        if (h->fd >= 0 && (e & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP)))
            do_input(w, h);
    }
    /* A handle closed meanwhile has left the list (ep_close). */
    cp_handle *h;
    while ((h = cp__hlist_pop(&ready)) != NULL) {
        if (h->fd >= 0)
            do_input(w, h);
    }
    return n;
}

static int ep_busy(cp_worker *w) { return !cp__queue_empty(&w->ready); }

static int ep_accept(cp_worker *w, cp_handle *h, cp_op *op)
{
    h->rd = op;
    op->armed = 1;
    cp__hlist_push(&w->ready, h);
    return 0;
}

static int ep_recv(cp_worker *w, cp_handle *h, cp_op *op)
{
    h->rd = op;
    op->armed = 1;
    cp__hlist_push(&w->ready, h);
    return 0;
}

static int ep_connect(cp_worker *w, cp_handle *h, cp_op *op, const struct sockaddr *sa, socklen_t len)
{
    int r;
    do {
        r = connect(h->fd, sa, len);
    } while (r < 0 && errno == EINTR);
    if (r < 0 && errno != EINPROGRESS)
        return -errno;
    h->wr = op;
    op->armed = 1;
    if (r == 0) {
        /* Connected at once (loopback can): report it after this pass. */
        h->wr = NULL;
        cp__worker_defer(w, op, 0);
        op->armed = 0;
    }
    return 0;
}

static int ep_send(cp_worker *w, cp_handle *h, cp_op *op, const struct iovec *iov, int iovcnt)
{
    struct msghdr mh = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)iovcnt };
    for (;;) {
        ssize_t r = sendmsg(h->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r >= 0)
            return (int)r;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            h->wr = op;
            op->armed = 1;
            return CP_PENDING;
        }
        return -errno;
    }
}

/* Pausing leaves the socket in the epoll set: its edges while paused are
 * lost, which is why the resume tries a read (via the ready list). */
static void ep_recv_pause(cp_worker *w, cp_handle *h)
{
    CP_UNUSED(w);
    h->rd_paused = 1;
}

static void ep_recv_resume(cp_worker *w, cp_handle *h)
{
    h->rd_paused = 0;
    if (h->rd && h->fd >= 0)
        cp__hlist_push(&w->ready, h);
}

static void ep_close(cp_worker *w, cp_handle *h)
{
    cp__hlist_remove(h);
    cp_op *ops[2] = { h->rd, h->wr };
    h->rd = h->wr = NULL;
    for (int i = 0; i < 2; i++) {
        if (ops[i]) {
            ops[i]->armed = 0;
            cp__worker_defer(w, ops[i], -ECANCELED);
        }
    }
    if (h->fd >= 0) {
        /* close() also removes it from the epoll set: it is never dup'ed. */
        close(h->fd);
        h->fd = -1;
    }
}

const cp_backend_ops cp__epoll_backend = {
    .rx_lend = cp__rbuf_lend,
    .name = "epoll",
    .init = ep_init,
    .fini = ep_fini,
    .poll = ep_poll,
    .busy = ep_busy,
    .wake = ep_wake,
    .attach = ep_attach,
    .accept = ep_accept,
    .connect = ep_connect,
    .recv = ep_recv,
    .send = ep_send,
    .writes_per_round = 128,
    .fanout_pause_pct = 25,
    .recv_pause = ep_recv_pause,
    .recv_resume = ep_recv_resume,
    .close = ep_close,
};
