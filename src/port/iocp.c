/* SPDX-License-Identifier: MIT */
/*
 * Windows backend: I/O completion ports.
 *
 * One completion port is shared by every worker of a cp_port, as IOCP is meant
 * to be used: each worker waits in GetQueuedCompletionStatusEx for up to
 * IO_EVENTS completions at a time. A session still belongs to one worker for
 * life (docs/design.md, "Threads"), so a completion that another worker
 * dequeues is handed to the owner through the owner's lock-free inbox, batched
 * per round like any other cross-worker message. That is the per-session
 * serialization without a lock on the hot path; with one worker every
 * completion is local.
 *
 * Waking one particular worker cannot go through the shared port (any worker
 * may dequeue a posted packet), so wake() queues a no-op APC to the worker's
 * thread; the worker waits alertably, so the APC ends its wait at once.
 *
 * Operations:
 * - accept: K AcceptEx kept pending per listener, each with its own socket;
 *   a finished one is handed over (SO_UPDATE_ACCEPT_CONTEXT) and re-posted.
 * - connect: bind to the wildcard address, ConnectEx, SO_UPDATE_CONNECT_CONTEXT.
 * - receive: a zero-byte WSARecv waits for input without holding memory (an
 *   idle session owns no receive buffer); when it completes, the owner reads
 *   inline into its worker buffer until the socket is drained or its fair
 *   share is used, then posts the next zero-byte WSARecv.
 * - send: a non-blocking WSASend of the whole iovec list is tried first; only
 *   when it would block is the same list posted as an overlapped WSASend, whose
 *   completion carries the bytes written.
 * - close: closesocket() aborts whatever is pending. The core gets its
 *   -ECANCELED completions at once (deferred, as with epoll); the backend's own
 *   per-socket record stays until the aborted overlapped operations have come
 *   back, because the kernel owns their OVERLAPPEDs until then.
 *
 * Sockets are opened overlapped and non-blocking (sys.c), never inherited.
 * DisconnectEx with TF_REUSE_SOCKET is not used: closing and opening sockets
 * is the path that works on Windows and on Wine alike (docs/design.md).
 */
#include "port/port.h"

#include <mswsock.h>
#include <stdlib.h>
#include <string.h>
#include <winternl.h>

#define IO_EVENTS 64
#define READS_PER_PASS 4
#define ADDR_SPACE (sizeof(struct sockaddr_storage) + 16)

enum io_what { IO_RECV0 = 1, IO_SEND, IO_CONNECT, IO_ACCEPT, IO_DISCONNECT };

#define POOL_MAX 1024 /* recycled sockets kept per address family */

typedef struct io_sock io_sock;

/* One overlapped operation the kernel may own. */
typedef struct io_ov {
    OVERLAPPED ov;
    io_sock *is;
    uint8_t what;
    uint8_t pending; /* posted, completion not yet processed */
    SOCKET as;       /* accept: the socket the connection will land on */
} io_ov;

/* An accept slot: AcceptEx writes both addresses after the operation. */
typedef struct io_acc {
    io_ov o;
    char addr[2 * ADDR_SPACE];
} io_acc;

/* The backend's record of one socket (cp_handle.be). */
struct io_sock {
    cp_handle *h; /* NULL once closed: completions are then only reaped */
    cp_worker *owner;
    SOCKET s;
    int outstanding; /* posted operations whose completion has not arrived */
    int family;
    io_ov rd, wr;
    io_ov *dc;      /* DisconnectEx in flight (socket reuse only) */
    cp_op *late_wr; /* closed with a send in flight: its -ECANCELED waits for it */
    io_acc *acc;    /* listener: K accept slots */
    int nacc;
};

typedef struct io_shared {
    HANDLE iocp;
    int refs;
    LPFN_ACCEPTEX acceptex;
    LPFN_CONNECTEX connectex;
    LPFN_DISCONNECTEX disconnectex;
    atomic_int zombies; /* closed io_socks still waiting for completions */
    /* Socket reuse (cp_port_opts.iocp_reuse_sockets): disconnected sockets
     * wait here, per family, for the next AcceptEx. Workers of any thread
     * put and take, under the lock; the lists are short. */
    bool reuse;
    SRWLOCK pool_lock;
    SOCKET pool[2][POOL_MAX];
    int npool[2];
} io_shared;

typedef struct io_worker {
    _Atomic(HANDLE) thread; /* a real handle to the worker's thread, for APCs */
    OVERLAPPED_ENTRY ev[IO_EVENTS];
} io_worker;

static io_shared *shared_of(cp_worker *w) { return w->port->be_shared; }

static int status_errno(const io_ov *o)
{
    NTSTATUS st = (NTSTATUS)o->ov.Internal;
    return st == 0 ? 0 : cp__win_errno(RtlNtStatusToDosError(st));
}

/* ------------------------------------------------------------------ socket reuse */

static int family_index(int family) { return family == AF_INET6; }

/* Keeps a disconnected socket for a later AcceptEx, or closes it. */
static void pool_put(io_shared *sh, int family, SOCKET s)
{
    int f = family_index(family);
    AcquireSRWLockExclusive(&sh->pool_lock);
    bool kept = sh->npool[f] < POOL_MAX;
    if (kept)
        sh->pool[f][sh->npool[f]++] = s;
    ReleaseSRWLockExclusive(&sh->pool_lock);
    if (!kept)
        closesocket(s);
}

static SOCKET pool_take(io_shared *sh, int family)
{
    int f = family_index(family);
    SOCKET s = INVALID_SOCKET;
    AcquireSRWLockExclusive(&sh->pool_lock);
    if (sh->npool[f] > 0)
        s = sh->pool[f][--sh->npool[f]];
    ReleaseSRWLockExclusive(&sh->pool_lock);
    return s;
}

static void pool_close_all(io_shared *sh)
{
    for (int f = 0; f < 2; f++)
        while (sh->npool[f] > 0)
            closesocket(sh->pool[f][--sh->npool[f]]);
}

/* ------------------------------------------------------------------ set-up */

static int load_extensions(io_shared *sh)
{
    SOCKET s = socket(AF_INET, SOCK_STREAM, IPPROTO_TCP);
    if (s == INVALID_SOCKET)
        return cp__sock_err();
    GUID ga = WSAID_ACCEPTEX, gc = WSAID_CONNECTEX, gd = WSAID_DISCONNECTEX;
    DWORD n = 0;
    int r = 0;
    if (WSAIoctl(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &ga, sizeof ga, &sh->acceptex, sizeof sh->acceptex,
                 &n, NULL, NULL) != 0 ||
        WSAIoctl(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &gc, sizeof gc, &sh->connectex, sizeof sh->connectex,
                 &n, NULL, NULL) != 0 ||
        WSAIoctl(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &gd, sizeof gd, &sh->disconnectex,
                 sizeof sh->disconnectex, &n, NULL, NULL) != 0)
        r = cp__sock_err();
    closesocket(s);
    return r;
}

static bool running_on_wine(void)
{
    HMODULE nt = GetModuleHandleW(L"ntdll.dll");
    return nt && GetProcAddress(nt, "wine_get_version") != NULL;
}

static int io_init(cp_worker *w)
{
    io_worker *iw = cp__zalloc(sizeof *iw);
    if (!iw)
        return -ENOMEM;
    io_shared *sh = w->port->be_shared;
    if (!sh) {
        WSADATA wd;
        if (WSAStartup(MAKEWORD(2, 2), &wd) != 0) {
            cp__free(iw);
            return -ENOTSUP;
        }
        sh = cp__zalloc(sizeof *sh);
        int r = sh ? 0 : -ENOMEM;
        if (sh && !(sh->iocp = CreateIoCompletionPort(INVALID_HANDLE_VALUE, NULL, 0, 0)))
            r = -cp__win_errno(GetLastError());
        if (!r)
            r = load_extensions(sh);
        if (r) {
            if (sh && sh->iocp)
                CloseHandle(sh->iocp);
            cp__free(sh);
            cp__free(iw);
            WSACleanup();
            return r;
        }
        InitializeSRWLock(&sh->pool_lock);
        sh->reuse = w->port->reuse_sockets;
        if (sh->reuse && running_on_wine()) {
            /* Wine accepts DisconnectEx(TF_REUSE_SOCKET) but the recycled
             * socket then fails every operation (WSAESHUTDOWN/WSAENOTSOCK). */
            cp__log(CP_LOG_WARN, "iocp: socket reuse is not implemented by Wine; closing sockets instead");
            sh->reuse = false;
        }
        w->port->be_shared = sh;
    }
    sh->refs++;
    w->be = iw;
    return 0;
}

static void complete(cp_worker *w, io_ov *o);

/* The last worker is gone: reap the completions of sockets closed near the
 * end, so their records are freed rather than leaked. */
static void reap_zombies(cp_worker *w, io_shared *sh)
{
    OVERLAPPED_ENTRY ev[IO_EVENTS];
    for (int tries = 0; atomic_load(&sh->zombies) > 0 && tries < 100; tries++) {
        ULONG n = 0;
        if (!GetQueuedCompletionStatusEx(sh->iocp, ev, IO_EVENTS, &n, 10, FALSE))
            continue;
        for (ULONG i = 0; i < n; i++)
            if (ev[i].lpOverlapped)
                complete(w, (io_ov *)ev[i].lpOverlapped);
    }
}

static void io_fini(cp_worker *w)
{
    io_worker *iw = w->be;
    io_shared *sh = shared_of(w);
    if (iw) {
        HANDLE t = atomic_load(&iw->thread);
        if (t)
            CloseHandle(t);
        cp__free(iw);
        w->be = NULL;
    }
    if (sh && --sh->refs == 0) {
        cp_worker *saved = cp__self;
        cp__self = w;
        reap_zombies(w, sh);
        cp__self = saved;
        pool_close_all(sh);
        CloseHandle(sh->iocp);
        cp__free(sh);
        w->port->be_shared = NULL;
        WSACleanup();
    }
}

static int io_thread_init(cp_worker *w)
{
    io_worker *iw = w->be;
    HANDLE t = NULL;
    if (!DuplicateHandle(GetCurrentProcess(), GetCurrentThread(), GetCurrentProcess(), &t, 0, FALSE,
                         DUPLICATE_SAME_ACCESS))
        return -cp__win_errno(GetLastError());
    atomic_store(&iw->thread, t);
    return 0;
}

static void CALLBACK wake_apc(ULONG_PTR unused) { CP_UNUSED(unused); }

static void io_wake(cp_worker *w)
{
    io_worker *iw = w->be;
    HANDLE t = iw ? atomic_load(&iw->thread) : NULL;
    /* No handle yet: the worker has not reached its loop, where it looks at
     * its inbox before waiting. */
    if (t)
        QueueUserAPC(wake_apc, t, 0);
}

/* ------------------------------------------------------------------ sockets */

static int io_attach(cp_worker *w, cp_handle *h)
{
    io_sock *is = cp__zalloc(sizeof *is);
    if (!is)
        return -ENOMEM;
    is->h = h;
    is->owner = w;
    is->s = (SOCKET)h->fd;
    is->rd.is = is->wr.is = is;
    is->rd.what = IO_RECV0;
    is->rd.as = is->wr.as = INVALID_SOCKET;
    io_shared *sh = shared_of(w);
    /* A recycled socket is still associated with this port, and Windows
     * refuses a second association with ERROR_INVALID_PARAMETER. */
    if (!CreateIoCompletionPort((HANDLE)is->s, sh->iocp, 0, 0) &&
        !(sh->reuse && GetLastError() == ERROR_INVALID_PARAMETER)) {
        int r = -cp__win_errno(GetLastError());
        cp__free(is);
        return r;
    }
    if (sh->reuse) {
        struct sockaddr_storage ss;
        int len = sizeof ss;
        is->family = getsockname(is->s, (struct sockaddr *)&ss, &len) == 0 ? ss.ss_family : AF_INET;
    }
    h->be = is;
    return 0;
}


static void posted(io_ov *o)
{
    o->pending = 1;
    o->is->outstanding++;
}

/* Posts the zero-byte receive that waits for input. */
static void post_recv0(cp_worker *w, io_sock *is)
{
    cp_handle *h = is->h;
    WSABUF b = { 0, NULL };
    DWORD flags = 0;
    memset(&is->rd.ov, 0, sizeof is->rd.ov);
    if (WSARecv(is->s, &b, 1, NULL, &flags, &is->rd.ov, NULL) == 0 || WSAGetLastError() == WSA_IO_PENDING) {
        posted(&is->rd);
        return;
    }
    cp__op_finish(w, h, h->rd, cp__sock_err(), NULL);
}

/* Reads inline until the socket is drained (then the next zero-byte receive
 * waits for input), the op is disarmed, or the fair share is used (then the
 * handle waits on the ready list for the next round). */
static void do_recv(cp_worker *w, io_sock *is)
{
    cp_handle *h = is->h;
    cp_op *op = h->rd;
    if (h->rd_paused)
        return; /* io_recv_resume reads again */
    for (int i = 0; i < READS_PER_PASS; i++) {
        int n = recv(is->s, (char *)w->rbuf, (int)w->rbuf_size, 0);
        if (n > 0) {
            cp__rbuf_enter(w);
            op->cb(w, op, n, CP_CQE_MORE, w->rbuf);
            cp__rbuf_settle(w);
            if (is->h != h || h->rd != op || h->rd_paused)
                return; /* closed, disarmed or paused by the callback */
            if ((size_t)n < w->rbuf_size) {
                post_recv0(w, is);
                return;
            }
            continue;
        }
        if (n == 0) {
            cp__op_finish(w, h, op, 0, NULL);
            return;
        }
        int err = cp__sock_err();
        if (err == -EINTR) {
            i--;
            continue;
        }
        if (err == -EAGAIN)
            post_recv0(w, is);
        else
            cp__op_finish(w, h, op, err, NULL);
        return;
    }
    cp__hlist_push(&w->ready, h);
}

static int post_accept(cp_worker *w, io_sock *is, io_acc *a)
{
    io_ov *o = &a->o;
    io_shared *sh = shared_of(w);
    o->as = sh->reuse ? pool_take(sh, is->family) : INVALID_SOCKET;
    if (o->as == INVALID_SOCKET) {
        int fd = cp__sock_stream(is->family);
        if (fd < 0)
            return fd;
        o->as = (SOCKET)fd;
    }
    memset(&o->ov, 0, sizeof o->ov);
    DWORD n = 0;
    if (!shared_of(w)->acceptex(is->s, o->as, a->addr, 0, ADDR_SPACE, ADDR_SPACE, &n, &o->ov) &&
        WSAGetLastError() != ERROR_IO_PENDING) {
        int r = cp__sock_err();
        closesocket(o->as);
        o->as = INVALID_SOCKET;
        return r;
    }
    posted(o);
    return 0;
}

/* Posts every idle accept slot. 0 if at least one accept is pending. */
static int fill_accepts(cp_worker *w, io_sock *is)
{
    int err = 0, pending = 0;
    for (int i = 0; i < is->nacc; i++) {
        io_acc *a = &is->acc[i];
        if (!a->o.pending && !err)
            err = post_accept(w, is, a);
        pending += a->o.pending;
    }
    return pending ? 0 : err;
}

static void on_accept_done(cp_worker *w, io_sock *is, io_ov *o, int err)
{
    cp_handle *h = is->h;
    cp_op *op = h->rd;
    SOCKET as = o->as;
    o->as = INVALID_SOCKET;
    if (!err) {
        SOCKET ls = is->s;
        u_long yes = 1;
        if (setsockopt(as, SOL_SOCKET, SO_UPDATE_ACCEPT_CONTEXT, (const char *)&ls, sizeof ls) != 0 ||
            ioctlsocket(as, FIONBIO, &yes) != 0)
            err = cp__sock_err();
    }
    if (!op) { /* not armed any more (cannot happen while a slot was pending) */
        closesocket(as);
        return;
    }
    if (err) {
        closesocket(as);
        /* The connection died before it was taken: the listener is fine. */
        op->cb(w, op, -ECONNABORTED, CP_CQE_MORE, NULL);
    } else {
        op->cb(w, op, (int)as, CP_CQE_MORE, NULL);
    }
    if (is->h != h || h->rd != op)
        return;
    int r = fill_accepts(w, is);
    if (r < 0)
        cp__op_finish(w, h, op, r, NULL); /* out of descriptors or memory: the listener backs off */
}

/* A completion, on the socket's owner. */
static void complete(cp_worker *w, io_ov *o)
{
    io_sock *is = o->is;
    o->pending = 0;
    is->outstanding--;
    int err = status_errno(o);
    if (!is->h) {
        /* Closed: only reap, and release the send that was in flight. */
        if (o == &is->wr && is->late_wr) {
            cp_op *op = is->late_wr;
            is->late_wr = NULL;
            op->armed = 0;
            op->cb(w, op, -ECANCELED, 0, NULL);
        }
        if (o->what == IO_DISCONNECT) {
            if (err)
                closesocket(is->s);
            else
                pool_put(shared_of(w), is->family, is->s);
        }
        if (o->as != INVALID_SOCKET) {
            closesocket(o->as);
            o->as = INVALID_SOCKET;
        }
        if (is->outstanding == 0) {
            cp__free(is->acc);
            cp__free(is->dc);
            cp__free(is);
            atomic_fetch_sub(&shared_of(w)->zombies, 1);
        }
        return;
    }
    cp_handle *h = is->h;
    switch (o->what) {
    case IO_RECV0:
        if (!h->rd)
            return;
        if (err)
            cp__op_finish(w, h, h->rd, -err, NULL);
        else
            do_recv(w, is);
        return;
    case IO_SEND:
        if (h->wr)
            cp__op_finish(w, h, h->wr, err ? -err : (int)o->ov.InternalHigh, NULL);
        return;
    case IO_CONNECT:
        if (!err && setsockopt(is->s, SOL_SOCKET, SO_UPDATE_CONNECT_CONTEXT, NULL, 0) != 0)
            err = -cp__sock_err();
        if (h->wr)
            cp__op_finish(w, h, h->wr, -err, NULL);
        return;
    case IO_ACCEPT: on_accept_done(w, is, o, err ? -err : 0); return;
    }
}

static void forwarded(cp_worker *w, void *o, void *unused, uintptr_t c)
{
    CP_UNUSED(unused);
    complete(w, o);
}

static int io_poll(cp_worker *w, int timeout_ms)
{
    io_worker *iw = w->be;
    io_shared *sh = shared_of(w);
    ULONG n = 0;
    BOOL ok = GetQueuedCompletionStatusEx(sh->iocp, iw->ev, IO_EVENTS, &n,
                                          timeout_ms < 0 ? INFINITE : (DWORD)timeout_ms, TRUE);
    w->now_ns = cp__now_ns();
    if (!ok)
        n = 0; /* timed out, or an APC (a wake-up) ended the wait */
    /* Handles queued before this pass get their turn after the new events;
     * those queued during it wait for the next pass. */
    cp_queue ready;
    cp__queue_move(&w->ready, &ready);
    for (ULONG i = 0; i < n; i++) {
        io_ov *o = (io_ov *)iw->ev[i].lpOverlapped;
        if (!o)
            continue;
        if (o->is->owner == w)
            complete(w, o);
        else
            cp__send_msg(o->is->owner, forwarded, o, NULL);
    }
    /* A handle closed meanwhile has left the list (io_close). */
    cp_handle *h;
    while ((h = cp__hlist_pop(&ready)) != NULL) {
        io_sock *is = h->be;
        if (h->fd >= 0 && is && h->rd && h->rd->kind == CP_OP_RECV && !is->rd.pending)
            do_recv(w, is);
    }
    return (int)n;
}

static int io_busy(cp_worker *w) { return !cp__queue_empty(&w->ready); }

static int io_accept(cp_worker *w, cp_handle *h, cp_op *op)
{
    io_sock *is = h->be;
    if (!is->acc) {
        struct sockaddr_storage ss;
        int len = sizeof ss;
        if (getsockname(is->s, (struct sockaddr *)&ss, &len) != 0)
            return cp__sock_err();
        is->family = ss.ss_family;
        is->nacc = op->batch ? op->batch : 16;
        is->acc = cp__zalloc(sizeof *is->acc * (size_t)is->nacc);
        if (!is->acc)
            return -ENOMEM;
        for (int i = 0; i < is->nacc; i++) {
            is->acc[i].o.is = is;
            is->acc[i].o.what = IO_ACCEPT;
            is->acc[i].o.as = INVALID_SOCKET;
        }
    }
    h->rd = op;
    op->armed = 1;
    int r = fill_accepts(w, is);
    if (r < 0) {
        /* Nothing could be posted (out of descriptors): report it as a failed
         * accept, so the listener backs off and tries again. */
        h->rd = NULL;
        op->armed = 0;
        cp__worker_defer(w, op, r);
    }
    return 0;
}

static int io_recv(cp_worker *w, cp_handle *h, cp_op *op)
{
    h->rd = op;
    op->armed = 1;
    cp__hlist_push(&w->ready, h); /* try a read first: input may already be waiting */
    return 0;
}

/* A paused socket posts no zero-byte receive; one already pending completes
 * into do_recv, which sees the pause and posts none. */
static void io_recv_pause(cp_worker *w, cp_handle *h)
{
    CP_UNUSED(w);
    h->rd_paused = 1;
}

static void io_recv_resume(cp_worker *w, cp_handle *h)
{
    h->rd_paused = 0;
    io_sock *is = h->be;
    if (h->rd && h->rd->kind == CP_OP_RECV && is && !is->rd.pending)
        cp__hlist_push(&w->ready, h);
}

static int io_connect(cp_worker *w, cp_handle *h, cp_op *op, const struct sockaddr *sa, socklen_t len)
{
    io_sock *is = h->be;
    struct sockaddr_storage any;
    memset(&any, 0, sizeof any);
    any.ss_family = sa->sa_family;
    int alen = sa->sa_family == AF_INET6 ? (int)sizeof(struct sockaddr_in6) : (int)sizeof(struct sockaddr_in);
    /* ConnectEx needs a bound socket. */
    if (bind(is->s, (struct sockaddr *)&any, alen) != 0)
        return cp__sock_err();
    is->wr.what = IO_CONNECT;
    memset(&is->wr.ov, 0, sizeof is->wr.ov);
    if (!shared_of(w)->connectex(is->s, sa, (int)len, NULL, 0, NULL, &is->wr.ov) &&
        WSAGetLastError() != ERROR_IO_PENDING)
        return cp__sock_err();
    posted(&is->wr);
    h->wr = op;
    op->armed = 1;
    return 0;
}

static int io_send(cp_worker *w, cp_handle *h, cp_op *op, const struct iovec *iov, int iovcnt)
{
    io_sock *is = h->be;
    WSABUF b[64];
    if (iovcnt > 64)
        iovcnt = 64;
    for (int i = 0; i < iovcnt; i++) {
        b[i].buf = iov[i].iov_base;
        b[i].len = (ULONG)iov[i].iov_len;
    }
    DWORD sent = 0;
    if (WSASend(is->s, b, (DWORD)iovcnt, &sent, 0, NULL, NULL) == 0)
        return (int)sent;
    int err = cp__sock_err();
    if (err != -EAGAIN)
        return err;
    /* The socket buffer is full: let the kernel take the list when it can. The
     * WSABUF array itself is captured by the call; the bytes stay queued on
     * the session until the completion reports them written. */
    is->wr.what = IO_SEND;
    memset(&is->wr.ov, 0, sizeof is->wr.ov);
    if (WSASend(is->s, b, (DWORD)iovcnt, NULL, 0, &is->wr.ov, NULL) != 0 &&
        WSAGetLastError() != WSA_IO_PENDING)
        return cp__sock_err();
    posted(&is->wr);
    h->wr = op;
    op->armed = 1;
    return CP_PENDING;
}

static void free_sock(cp_worker *w, void *isp, void *unused, uintptr_t c)
{
    CP_UNUSED(w);
    CP_UNUSED(unused);
    io_sock *is = isp;
    cp__free(is->acc);
    cp__free(is->dc);
    cp__free(is);
}

/* Socket reuse: cancel what is pending and disconnect; the socket goes to
 * the pool when DisconnectEx completes. False if it could not be started
 * (the caller closes the socket instead). */
static bool disconnect_for_reuse(cp_worker *w, io_sock *is)
{
    if (!is->dc && !(is->dc = cp__zalloc(sizeof *is->dc)))
        return false;
    is->dc->is = is;
    is->dc->what = IO_DISCONNECT;
    is->dc->as = INVALID_SOCKET;
    CancelIoEx((HANDLE)is->s, NULL);
    if (!shared_of(w)->disconnectex(is->s, &is->dc->ov, TF_REUSE_SOCKET, 0) &&
        WSAGetLastError() != ERROR_IO_PENDING)
        return false;
    posted(is->dc);
    return true;
}

static void io_close(cp_worker *w, cp_handle *h)
{
    cp__hlist_remove(h);
    io_sock *is = h->be;
    if (is && h->wr && is->wr.pending && is->wr.what == IO_SEND) {
        /* The kernel may read the buffers of an overlapped send until its
         * (aborted) completion comes back, and the session keeps them only
         * while the send is armed: so that completion, not this close, ends
         * the send. */
        is->late_wr = h->wr;
        h->wr = NULL;
    }
    cp_op *ops[2] = { h->rd, h->wr };
    h->rd = h->wr = NULL;
    for (int i = 0; i < 2; i++) {
        if (ops[i]) {
            ops[i]->armed = 0;
            cp__worker_defer(w, ops[i], -ECANCELED);
        }
    }
    h->be = NULL;
    if (h->fd >= 0) {
        if (!is || !shared_of(w)->reuse || is->acc || !disconnect_for_reuse(w, is)) {
            /* Cancel first: Wine's closesocket alone never completes a pending
             * overlapped send (the session would wait for it for ever). */
            CancelIoEx((HANDLE)(SOCKET)h->fd, NULL);
            closesocket((SOCKET)h->fd); /* aborts every pending operation on it */
        }
        h->fd = -1;
    }
    if (!is)
        return;
    is->h = NULL;
    if (is->outstanding > 0)
        atomic_fetch_add(&shared_of(w)->zombies, 1);
    else /* not now: a completion being processed up the stack may still use it */
        cp__send_msg(w, free_sock, is, NULL);
}

const cp_backend_ops cp__iocp_backend = {
    .rx_lend = cp__rbuf_lend,
    .name = "iocp",
    .init = io_init,
    .fini = io_fini,
    .thread_init = io_thread_init,
    .poll = io_poll,
    .busy = io_busy,
    .wake = io_wake,
    .attach = io_attach,
    .accept = io_accept,
    .connect = io_connect,
    .recv = io_recv,
    .recv_pause = io_recv_pause,
    .recv_resume = io_recv_resume,
    .send = io_send,
    .send_holds_bufs = true,
    .close = io_close,
};
