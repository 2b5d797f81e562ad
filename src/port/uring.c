/* SPDX-License-Identifier: MIT */
/*
 * The io_uring backend: one ring per worker.
 *
 * Receives are multishot; accepts are bounded per round (prep_accept says
 * why). Receives pick buffers from a provided-
 * buffer ring that belongs to the worker, so an idle session owns no receive
 * memory; a buffer goes back to the ring as soon as the completion's callback
 * has consumed it. Every newly armed receive is rechecked once, right after
 * the io_uring_enter that armed it (recheck_recvs says why). Sends are send or
 * sendmsg operations whose msghdr and iovec copy live in a per-worker pool of
 * send slots until the completion arrives. All submissions of a round go to
 * the kernel in one io_uring_enter; when some of them complete inside it (a
 * send to a socket with room does), their completions are taken before the
 * worker waits, in a second one (ur_poll). Sockets sit in a registered file table
 * (index = descriptor), so requests skip the kernel's file lookup; a close
 * empties its slot with a queued request (clear_slot).
 *
 * user_data packs the op pointer with a 16-bit generation (bumped at every
 * submission): a completion whose generation differs from the op's is stale
 * and is dropped. Closing a handle cancels its armed operations by user_data;
 * each then completes (usually with -ECANCELED) and only then is the owner
 * told, so the owner's memory outlives every completion that names it.
 *
 * Ring set-up: SINGLE_ISSUER + DEFER_TASKRUN where the kernel has them, else
 * COOP_TASKRUN, else nothing. Other threads never touch a ring: a worker wakes
 * another with an IORING_OP_MSG_RING on its own ring; any other thread writes
 * the worker's eventfd, which a read operation on the ring keeps watching.
 */
#include "port/port.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#define UR_ENTRIES 1024
#define UR_CQ_ENTRIES 8192
#define UR_BGID 1
#define UR_NBUFS 512           /* power of two */
#define UR_BUFSZ (32u * 1024u) /* large enough for 16 KiB messages in one piece */
#define UR_IOV 64
#define UR_BATCH 64
#define UR_RECHECK 64              /* receives rechecked per poll(2) call */
#define UR_FILES 65536             /* registered-file table size at most (index = fd) */
#define UR_HELD_MAX (UR_NBUFS / 4) /* provided buffers that held completions may keep */
#define UR_RING_MIN 32             /* provided buffers in the ring at least (see ring_refill) */
#define UR_RING_SHRINK 1024        /* batches that never use half of the ring before it halves */
#define UR_COPY_MAX (64u << 20)    /* bytes held as copies past UR_HELD_MAX, per worker */
#define UR_LEND_MAX (UR_NBUFS / 4) /* provided buffers lent out at once (ur_lend) */

#ifndef WAKE_MSG_RING_DEFAULT
#  define WAKE_MSG_RING_DEFAULT 1
#endif

#define TAG_WAKE 1u
#define TAG_IGNORE 2u
#define TAG_MSG_WAKE 3u /* a wake-up posted by another worker's ring (IORING_OP_MSG_RING) */
#define PTR_MASK ((UINT64_C(1) << 48) - 1)

typedef struct ur_slot {
    struct msghdr mh;
    struct iovec iov[UR_IOV];
    struct ur_slot *next;
} ur_slot;

/*
 * Provided buffers lent out (cp_sendbuf_from_recv): a handler forwards the
 * bytes it was given without a copy, and the buffer stays out of the ring
 * until the last view of it is released, on any thread, possibly after the
 * worker has gone. So the buffers' mapping belongs to this record, shared by
 * the worker and the views: it is unmapped by the last of them. A buffer's
 * count is 0 while it is not lent; lending it makes it 2, the view's and the
 * worker's, which the worker drops when the completion's delivery is over
 * (recycle); each further view of it adds one. Whoever drops the last gives
 * the buffer back: the worker itself (an echo's write completed) to its free
 * stack directly, another thread to ret, which the worker takes at its next
 * refill.
 */
typedef struct ur_lent {
    _Atomic(cp_worker *) w; /* the owner: on its thread the free stack is at hand */
    atomic_uint refs;       /* the worker's, and one per buffer lent */
    atomic_bool any_returned;
    pthread_mutex_t lock; /* ret, nret */
    unsigned nret;
    uint16_t ret[UR_NBUFS];
    atomic_uint count[UR_NBUFS];
    uint8_t *bufs; /* UR_NBUFS * UR_BUFSZ bytes */
} ur_lent;

/* A receive completion held back because its session was paused (see
 * "Holding completions back"), with the provided buffer it names. */
typedef struct ur_held {
    struct ur_held *next;
    cp_op *op;
    int res;
    unsigned flags;
    uint8_t *copy; /* the bytes, when the ring's share for holding was used up */
} ur_held;

/* A handle's held completions, oldest first, are a list at h->be (which
 * IOCP uses for its own record; io_uring has none). */
static inline bool has_held(const cp_handle *h) { return h->be != NULL; }

typedef struct ur_state {
    struct io_uring ring;
    int evfd;
    uint64_t evval;
    bool wake_armed;
    bool ring_up;
    struct io_uring_buf_ring *br;
    uint8_t *bufs;
    struct ur_lent *lent; /* owns the mapping at bufs */
    int cur_bid;          /* the buffer of the completion being delivered, or -1 */
    uint16_t *free_bids;  /* buffers out of the ring and unused, the most recently freed on top */
    unsigned nfree;
    unsigned in_ring;   /* buffers added to the ring that no completion has named yet */
    unsigned ring_goal; /* how many ring_refill keeps there (UR_RING_MIN..UR_NBUFS) */
    unsigned ring_low;  /* the fewest left after a batch since the goal last changed */
    unsigned ring_batches;
    bool ring_starved; /* a receive found no buffer (ENOBUFS) since the last refill */
    ur_slot *free_slots;
    cp_queue recheck; /* handles whose multishot receive was armed since the last poll */
    cp_queue replay;  /* resumed handles that still have completions held */
    ur_held *free_held;
    unsigned nheld;      /* completions held (each keeps a provided buffer) */
    size_t copied;       /* bytes of held completions kept as copies */
    unsigned nfiles;     /* size of the registered-file table; 0 = none */
    unsigned clear_mark; /* submission-queue tail after the last slot clear queued by ur_close */
    int msg_fd;          /* a duplicate of the ring's descriptor for other workers' MSG_RING
                           * wake-ups, open until ur_fini (after every worker has stopped) */
} ur_state;

static void lent_unref(ur_lent *l)
{
    if (atomic_fetch_sub_explicit(&l->refs, 1, memory_order_acq_rel) != 1)
        return;
    munmap(l->bufs, (size_t)UR_NBUFS * UR_BUFSZ);
    pthread_mutex_destroy(&l->lock);
    cp__free(l);
}

/* A view's release, any thread, or the worker's part of a loan (recycle):
 * the last reference hands the buffer back. */
static void lent_put(void *arg, uint32_t bid)
{
    ur_lent *l = arg;
    if (atomic_fetch_sub_explicit(&l->count[bid], 1, memory_order_acq_rel) != 1)
        return;
    cp_worker *owner = atomic_load_explicit(&l->w, memory_order_relaxed);
    if (owner && cp__self == owner) { /* the owner, alive: it holds a reference of its own */
        ur_state *st = owner->be;
        st->free_bids[st->nfree++] = (uint16_t)bid;
        atomic_fetch_sub_explicit(&l->refs, 1, memory_order_relaxed);
        return;
    }
    pthread_mutex_lock(&l->lock);
    l->ret[l->nret++] = (uint16_t)bid;
    atomic_store_explicit(&l->any_returned, true, memory_order_release);
    pthread_mutex_unlock(&l->lock);
    lent_unref(l);
}

/* How a worker wakes another worker of its port (threads that are not workers
 * always write the eventfd): 1 = IORING_OP_MSG_RING from the waker's own ring,
 * 0 = the eventfd. Chosen once by the probe; CP_URING_WAKE=eventfd|msgring
 * overrides it (for measurements). */
static int wake_msg_ring;
/* CP_URING_WAKE as read by cp__uring_read_env: -1 unset, else as above. */
static int wake_env = -1;

void cp__uring_read_env(void)
{
    /* NOLINTNEXTLINE(concurrency-mt-unsafe): called once, before any thread of the library exists */
    const char *env = getenv("CP_URING_WAKE");
    if (env && !strcmp(env, "eventfd"))
        wake_env = 0;
    else if (env && !strcmp(env, "msgring"))
        wake_env = 1;
}

static uint64_t ud_of(const cp_op *op) { return (uint64_t)(uintptr_t)op | ((uint64_t)op->gen << 48); }

static struct io_uring_sqe *get_sqe(ur_state *st)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&st->ring);
    while (!sqe) {
        /* The submission queue is full: hand it to the kernel and go on. */
        io_uring_submit(&st->ring);
        sqe = io_uring_get_sqe(&st->ring);
    }
    return sqe;
}

/* Operations on a registered socket name it by its table index (its fd) and
 * skip the kernel's per-request file lookup and reference (fget/fput). */
static void use_file(struct io_uring_sqe *sqe, const cp_handle *h)
{
    if (h->fixed)
        sqe->flags |= IOSQE_FIXED_FILE;
}

static void submit_op(ur_state *st, struct io_uring_sqe *sqe, cp_handle *h, cp_op *op)
{
    op->gen++;
    op->h = h;
    op->armed = 1;
    io_uring_sqe_set_data64(sqe, ud_of(op));
}

/* ------------------------------------------------------------------ set-up */

static int ring_init(struct io_uring *ring, unsigned extra)
{
    static const unsigned tries[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
        IORING_SETUP_COOP_TASKRUN,
        0,
    };
    int r = -EINVAL;
    for (size_t i = 0; i < sizeof tries / sizeof tries[0]; i++) {
        struct io_uring_params p = { .flags = tries[i] | extra | IORING_SETUP_CQSIZE |
                                              IORING_SETUP_SUBMIT_ALL,
                                     .cq_entries = UR_CQ_ENTRIES };
        r = io_uring_queue_init_params(UR_ENTRIES, ring, &p);
        if (r != -EINVAL)
            return r;
    }
    return r;
}

static void probe_once(void);
static int probe_result;
static const char *probe_why;

static void *probe_thread(void *unused);

/* The probe runs once, on a thread of its own (see ur_thread_init on why no
 * ring is set up or torn down on the caller's thread). */
int cp__uring_probe(const char **why)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, probe_once);
    *why = probe_why;
    return probe_result;
}

static void probe_once(void)
{
    pthread_t t;
    if (pthread_create(&t, NULL, probe_thread, NULL) != 0) {
        probe_result = -EAGAIN;
        probe_why = "could not start the probe thread";
        return;
    }
    pthread_join(t, NULL);
}

/* The kernel.io_uring_disabled sysctl at 2 forbids io_uring to everyone. */
static int probe_sysctl(const char **why)
{
    int r = 0;
    FILE *f = fopen("/proc/sys/kernel/io_uring_disabled", "r");
    if (f) {
        int v = 0;
        if (fscanf(f, "%d", &v) == 1 && v == 2) {
            r = -EPERM;
            *why = "io_uring is disabled by the kernel.io_uring_disabled sysctl";
        }
        fclose(f);
    }
    return r;
}

static const char *ring_init_failure(int r)
{
    return r == -ENOSYS  ? "the kernel has no io_uring (ENOSYS)"
           : r == -EPERM ? "io_uring is not permitted here (EPERM: seccomp, container or sysctl)"
                         : "io_uring_setup failed";
}

static bool has_needed_ops(const struct io_uring_probe *p)
{
    return p && io_uring_opcode_supported(p, IORING_OP_SENDMSG) &&
           io_uring_opcode_supported(p, IORING_OP_ACCEPT) && io_uring_opcode_supported(p, IORING_OP_RECV) &&
           io_uring_opcode_supported(p, IORING_OP_ASYNC_CANCEL);
}

/* Sets wake_msg_ring: MSG_RING where the kernel has it (and CQE_SKIP), unless
 * CP_URING_WAKE (read once, cp__uring_read_env) says otherwise. */
static void choose_wake(const struct io_uring *ring, const struct io_uring_probe *p)
{
    if (p && io_uring_opcode_supported(p, IORING_OP_MSG_RING) && (ring->features & IORING_FEAT_CQE_SKIP))
        wake_msg_ring = WAKE_MSG_RING_DEFAULT;
    if (wake_env == 0)
        wake_msg_ring = 0;
    else if (wake_env == 1 && p && io_uring_opcode_supported(p, IORING_OP_MSG_RING))
        wake_msg_ring = 1;
}

/* Checks the operations cport needs and chooses the wake-up on the way. */
static int probe_ops(struct io_uring *ring, const char **why)
{
    int r = 0;
    struct io_uring_probe *p = io_uring_get_probe_ring(ring);
    if (!has_needed_ops(p)) {
        r = -ENOTSUP;
        *why = "the kernel's io_uring lacks an operation cport needs";
    }
    choose_wake(ring, p);
    if (p)
        io_uring_free_probe(p);
    return r;
}

/* Provided-buffer rings (5.19) and multishot receive (6.0) are the newest
 * features used; registering a ring proves the former. */
static int probe_buf_ring(struct io_uring *ring, const char **why)
{
    int r = 0;
    struct io_uring_buf_ring *br = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1,
                                        0);
    struct io_uring_buf_reg reg = { .ring_addr = (uintptr_t)br, .ring_entries = 8, .bgid = 7 };
    if (br == MAP_FAILED || io_uring_register_buf_ring(ring, &reg, 0) < 0) {
        r = -ENOTSUP;
        *why = "the kernel's io_uring has no provided-buffer rings";
    }
    if (br != MAP_FAILED)
        munmap(br, 4096);
    return r;
}

/* Sets up a ring and checks, on it, what cport uses. */
static int probe_ring(const char **why)
{
    struct io_uring ring;
    int r = ring_init(&ring, 0);
    if (r < 0) {
        *why = ring_init_failure(r);
        return r;
    }
    r = probe_ops(&ring, why);
    if (!r)
        r = probe_buf_ring(&ring, why);
    io_uring_queue_exit(&ring);
    return r;
}

static void *probe_thread(void *unused)
{
    CP_UNUSED(unused);
    const char *reason = NULL;
    int r = probe_sysctl(&reason);
    if (!r)
        r = probe_ring(&reason);
    probe_result = r;
    probe_why = reason;
    return NULL;
}

/* Rings are created and torn down on the worker's own thread. SINGLE_ISSUER
 * binds a ring to the thread that creates it, and tearing a ring down
 * interrupts the tearing thread's next blocking call with EINTR, which must
 * not happen to the thread of a user who calls cp_port_create/destroy. */
static int ur_init(cp_worker *w)
{
    ur_state *st = cp__zalloc(sizeof *st);
    if (!st)
        return -ENOMEM;
    st->msg_fd = -1;
    cp__queue_init(&st->recheck);
    cp__queue_init(&st->replay);
    st->evfd = eventfd(0, EFD_CLOEXEC);
    if (st->evfd < 0) {
        int err = -errno;
        cp__free(st);
        return err;
    }
    w->be = st;
    return 0;
}

static void ur_thread_fini(cp_worker *w);
static void ring_refill(ur_state *st);

static int ur_thread_init(cp_worker *w)
{
    ur_state *st = w->be;
    int r = ring_init(&st->ring, 0);
    if (r < 0)
        return r;
    st->ring_up = true;
    if (wake_msg_ring)
        st->msg_fd = fcntl(st->ring.ring_fd, F_DUPFD_CLOEXEC, 0);
    /* Saves the ring-file lookup on every io_uring_enter; optional. */
    (void)io_uring_register_ring_fd(&st->ring);
    /* A sparse file table indexed by descriptor number, so that sends and
     * receives skip the per-request file lookup; optional. Descriptors at or
     * above its size are used unregistered. */
    struct rlimit rl;
    unsigned nfiles = UR_FILES;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < nfiles)
        nfiles = (unsigned)rl.rlim_cur;
    if (io_uring_register_files_sparse(&st->ring, nfiles) == 0)
        st->nfiles = nfiles;
    size_t brsz = sizeof(struct io_uring_buf) * UR_NBUFS;
    st->br = mmap(NULL, brsz, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    st->bufs = mmap(NULL, (size_t)UR_NBUFS * UR_BUFSZ, PROT_READ | PROT_WRITE,
                    MAP_ANONYMOUS | MAP_PRIVATE | MAP_NORESERVE, -1, 0);
    if (st->br == MAP_FAILED || st->bufs == MAP_FAILED || !(st->lent = cp__zalloc(sizeof *st->lent))) {
        r = -ENOMEM;
        goto fail;
    }
    atomic_init(&st->lent->refs, 1);
    pthread_mutex_init(&st->lent->lock, NULL);
    st->lent->bufs = st->bufs;
    atomic_store_explicit(&st->lent->w, w, memory_order_relaxed);
    st->cur_bid = -1;
    struct io_uring_buf_reg reg = { .ring_addr = (uintptr_t)st->br,
                                    .ring_entries = UR_NBUFS,
                                    .bgid = UR_BGID };
    if ((r = io_uring_register_buf_ring(&st->ring, &reg, 0)) < 0)
        goto fail;
    io_uring_buf_ring_init(st->br);
    if (!(st->free_bids = cp__malloc(sizeof *st->free_bids * UR_NBUFS))) {
        r = -ENOMEM;
        goto fail;
    }
    for (unsigned i = 0; i < UR_NBUFS; i++) /* buffer 0 on top */
        st->free_bids[i] = (uint16_t)(UR_NBUFS - 1 - i);
    st->nfree = UR_NBUFS;
    st->ring_goal = st->ring_low = UR_RING_MIN;
    atomic_store_explicit(&w->m->rbufs, UR_NBUFS, memory_order_relaxed);
    ring_refill(st);
    return 0;
fail:
    ur_thread_fini(w);
    return r;
}

/* Gives the free send slots and held-completion records back to malloc. */
/* Send slots and held-completion records come and go by the thousand in a
 * burst; from slabs (slab.c) rather than malloc, they leave no resident heap
 * behind once the trim has freed the spare ones. */
static cp_slab slot_slab = CP_SLAB_INIT(sizeof(ur_slot));
static cp_slab held_slab = CP_SLAB_INIT(sizeof(ur_held));

static void free_spares(ur_state *st)
{
    while (st->free_slots) {
        ur_slot *n = st->free_slots->next;
        cp__slab_free(&slot_slab, st->free_slots);
        st->free_slots = n;
    }
    while (st->free_held) {
        ur_held *n = st->free_held->next;
        cp__slab_free(&held_slab, st->free_held);
        st->free_held = n;
    }
}

static void ur_thread_fini(cp_worker *w)
{
    ur_state *st = w->be;
    if (st->ring_up) {
        /* Wake-ups for other workers may still wait in the submission queue. */
        if (io_uring_sq_ready(&st->ring))
            io_uring_submit(&st->ring);
        io_uring_queue_exit(&st->ring);
    }
    st->ring_up = false;
    if (st->br && st->br != MAP_FAILED)
        munmap(st->br, sizeof(struct io_uring_buf) * UR_NBUFS);
    /* The mapping goes with the last view of a lent buffer, if any is left;
     * views released from now on, here too, take the locked way back. */
    if (st->lent) {
        atomic_store_explicit(&st->lent->w, NULL, memory_order_relaxed);
        lent_unref(st->lent);
    } else if (st->bufs && st->bufs != MAP_FAILED)
        munmap(st->bufs, (size_t)UR_NBUFS * UR_BUFSZ);
    st->lent = NULL;
    st->br = NULL;
    st->bufs = NULL;
    cp__free(st->free_bids);
    st->free_bids = NULL;
    /* Held-completion records: closing every handle gave them back. */
    free_spares(st);
}

static void ur_fini(cp_worker *w)
{
    ur_state *st = w->be;
    if (!st)
        return;
    close(st->evfd);
    if (st->msg_fd >= 0)
        close(st->msg_fd);
    cp__free(st);
    w->be = NULL;
}

/*
 * A worker waking another worker of the same port puts an IORING_OP_MSG_RING
 * on its own ring: the target gets a completion (and returns from its wait)
 * without an eventfd write on this side or a read to re-arm on the other, and
 * the request goes to the kernel with this worker's next io_uring_enter,
 * which follows at once (wake-ups are sent at the end of a round). Other
 * threads, and a worker whose target has no ring yet, write the eventfd.
 */
static void ur_wake(cp_worker *w)
{
    ur_state *st = w->be;
    cp_worker *self = cp__self;
    if (wake_msg_ring && self && self != w && self->port == w->port && st->msg_fd >= 0) {
        ur_state *me = self->be;
        if (me && me->ring_up) {
            struct io_uring_sqe *sqe = get_sqe(me);
            io_uring_prep_msg_ring(sqe, st->msg_fd, 0, TAG_MSG_WAKE, 0);
            sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
            io_uring_sqe_set_data64(sqe, TAG_IGNORE);
            return;
        }
    }
    uint64_t one = 1;
    while (write(st->evfd, &one, sizeof one) < 0 && errno == EINTR)
        ;
}

/* ------------------------------------------------------------------ operations */

/* True while the submission queue entry before position mark has not been
 * handed to the kernel yet. */
static bool sq_pending(ur_state *st, unsigned mark)
{
    return (int)(mark - __atomic_load_n(st->ring.sq.khead, __ATOMIC_ACQUIRE)) > 0;
}

/* Registering costs one system call per connection and saves a file lookup
 * and an atomic reference count pair on every send. A close queues the
 * clearing of its slot (ur_close), so a clear still waiting in the
 * submission queue may be for this very descriptor number, closed and reused
 * since: it is submitted first, or this registration would be undone by it. */
static int ur_attach(cp_worker *w, cp_handle *h)
{
    ur_state *st = w->be;
    h->fixed = 0;
    if (h->fd < 0 || (unsigned)h->fd >= st->nfiles)
        return 0;
    if (sq_pending(st, st->clear_mark)) {
        io_uring_submit(&st->ring);
        if (sq_pending(st, st->clear_mark))
            return 0; /* the kernel took only part of it: stay unregistered */
    }
    if (io_uring_register_files_update(&st->ring, (unsigned)h->fd, &h->fd, 1) == 1)
        h->fixed = 1;
    return 0;
}

/*
 * Accepts are bounded per round, as on epoll: a single-shot accept, and when
 * it completes, up to K-1 more accept4(2) calls in the same pass; then the
 * accept is armed again for the next round. A multishot accept would not do:
 * the kernel accepts again for as long as the backlog is not empty, so a
 * connect storm put thousands of accept completions in the completion queue
 * at once, and every other session's completions waited behind them for
 * dozens of rounds (neighbours' round trips of 50-130 ms; docs/reliability.md,
 * issue 14).
 */
static void prep_accept(ur_state *st, cp_handle *h, cp_op *op)
{
    struct io_uring_sqe *sqe = get_sqe(st);
    io_uring_prep_accept(sqe, h->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    use_file(sqe, h);
    submit_op(st, sqe, h, op);
    h->rd = op;
}

static int ur_accept(cp_worker *w, cp_handle *h, cp_op *op)
{
    prep_accept(w->be, h, op);
    return 0;
}

static bool accept_error_is_transient(int err)
{
    /* The connection died in the backlog, or a signal interrupted: the
     * listener itself is fine and the next pending connection may be taken
     * (the same list as epoll.c's). */
    return err == ECONNABORTED || err == EINTR || err == EPROTO || err == EPERM || err == ENETDOWN ||
           err == ENOPROTOOPT || err == EHOSTDOWN || err == ENONET || err == EHOSTUNREACH ||
           err == EOPNOTSUPP || err == ENETUNREACH;
}

/* Hands one accept result to the owner while the accept stays armed; false
 * if the owner closed the listener from its callback. */
static bool accept_deliver(cp_worker *w, cp_op *op, int res)
{
    cp_handle *h = op->h;
    if (res != -EINTR)
        op->cb(w, op, res, CP_CQE_MORE, NULL);
    return h->rd == op && h->fd >= 0;
}

enum { ACCEPT_OPEN, ACCEPT_CLOSED, ACCEPT_FAILED };

/* Takes up to batch-1 more pending connections after the one the completion
 * brought. ACCEPT_OPEN: the listener is drained (or the batch is done) and
 * still open; ACCEPT_CLOSED: a callback closed it; ACCEPT_FAILED: a hard
 * error (EMFILE ...) disarmed it and its callback has run, as on epoll. */
static int accept_pending(cp_worker *w, cp_handle *h, cp_op *op, unsigned batch)
{
    for (unsigned i = 1; i < batch; i++) {
        int fd = accept4(h->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        int err = fd < 0 ? errno : 0;
        if (err == EAGAIN || err == EWOULDBLOCK)
            return ACCEPT_OPEN;
        if (err && !accept_error_is_transient(err)) {
            h->rd = NULL;
            op->armed = 0;
            op->cb(w, op, -err, 0, NULL);
            return ACCEPT_FAILED;
        }
        if (!accept_deliver(w, op, err ? -err : fd))
            return ACCEPT_CLOSED;
    }
    return ACCEPT_OPEN;
}

/* The single-shot accept completed with a descriptor or a transient error:
 * deliver it, take up to K-1 more pending connections, and arm the accept
 * again. Returns false if the completion is a final one for dispatch to
 * deliver (ECANCELED, hard errors). */
static bool accept_more(cp_worker *w, ur_state *st, cp_op *op, int res)
{
    if (res < 0 && !accept_error_is_transient(-res))
        return false;
    cp_handle *h = op->h;
    unsigned batch = op->batch ? op->batch : 64;
    int state = accept_deliver(w, op, res) ? accept_pending(w, h, op, batch) : ACCEPT_CLOSED;
    if (state == ACCEPT_OPEN) {
        prep_accept(st, h, op);
    } else if (state == ACCEPT_CLOSED && h->rd == op) {
        /* Closed from a callback: nothing is in the kernel to be cancelled,
         * so the final completion is delivered here, after this pass. */
        h->rd = NULL;
        op->armed = 0;
        cp__worker_defer(w, op, -ECANCELED);
    }
    return true;
}

/* Asks the kernel to cancel op. The cancellation's own completion is
 * ignored; op ends with its -ECANCELED (or earlier) completion. */
static void cancel_op(ur_state *st, const cp_op *op)
{
    struct io_uring_sqe *sqe = get_sqe(st);
    io_uring_prep_cancel64(sqe, ud_of(op), 0);
    io_uring_sqe_set_data64(sqe, TAG_IGNORE);
}

static void prep_recv(ur_state *st, cp_handle *h, cp_op *op, bool multishot)
{
    struct io_uring_sqe *sqe = get_sqe(st);
    if (multishot)
        io_uring_prep_recv_multishot(sqe, h->fd, NULL, 0, 0);
    else
        io_uring_prep_recv(sqe, h->fd, NULL, 0, 0);
    use_file(sqe, h);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = UR_BGID;
    submit_op(st, sqe, h, op);
    h->rd = op;
}

/* A hot socket (one that had more to read than its session would take) is
 * read one buffer per submission, so the kernel cannot read ahead of the
 * session; it goes back to multishot once a read finds it drained. */
static void arm_multishot(ur_state *st, cp_handle *h, cp_op *op)
{
    if (h->hot) {
        prep_recv(st, h, op, false);
        return;
    }
    prep_recv(st, h, op, true);
    cp__hlist_push(&st->recheck, h); /* rechecked once it is armed: see recheck_recvs */
}

/* A receive armed while paused is parked: armed for the core, not in the
 * kernel until the resume. */
static void park(cp_handle *h, cp_op *op)
{
    op->gen++;
    op->h = h;
    op->armed = 1;
    op->parked = 1;
    h->rd = op;
}

static void replay_add(ur_state *st, cp_handle *h);

static int ur_recv(cp_worker *w, cp_handle *h, cp_op *op)
{
    ur_state *st = w->be;
    if (h->rd_paused)
        park(h, op);
    else
        arm_multishot(st, h, op);
    return 0;
}

/*
 * Pausing cancels the multishot receive in the kernel (unless a recheck's
 * cancellation is already on its way): its final -ECANCELED completion is
 * swallowed by dispatch, which parks the op, or arms it again if the resume
 * came first. What the kernel had received before the cancellation still
 * arrives, as ordinary completions.
 */
static void ur_recv_pause(cp_worker *w, cp_handle *h)
{
    ur_state *st = w->be;
    h->rd_paused = 1;
    cp_op *op = h->rd;
    if (!op || op->kind != CP_OP_RECV || op->parked || op->kicked || h->fd < 0)
        return;
    op->kicked = 2;
    cancel_op(st, op);
}

static void ur_recv_resume(cp_worker *w, cp_handle *h)
{
    ur_state *st = w->be;
    h->rd_paused = 0;
    if (has_held(h))
        replay_add(st, h); /* what was held back is delivered first, next poll */
    cp_op *op = h->rd;
    if (op && op->parked && h->fd >= 0) {
        op->parked = 0;
        arm_multishot(st, h, op);
    }
    /* Otherwise a cancellation is on its way: its completion re-arms. */
}

static int ur_connect(cp_worker *w, cp_handle *h, cp_op *op, const struct sockaddr *sa, socklen_t len)
{
    ur_state *st = w->be;
    struct io_uring_sqe *sqe = get_sqe(st);
    /* The address is the service's and outlives the operation. */
    io_uring_prep_connect(sqe, h->fd, sa, len);
    use_file(sqe, h);
    submit_op(st, sqe, h, op);
    h->wr = op;
    return 0;
}

static int ur_send(cp_worker *w, cp_handle *h, cp_op *op, const struct iovec *iov, int iovcnt)
{
    ur_state *st = w->be;
    ur_slot *slot = st->free_slots;
    if (slot) {
        st->free_slots = slot->next;
    } else if (!(slot = cp__slab_alloc(&slot_slab))) {
        return -ENOMEM;
    }
    if (iovcnt > UR_IOV)
        iovcnt = UR_IOV;
    struct io_uring_sqe *sqe = get_sqe(st);
    if (iovcnt == 1) {
        /* A plain send skips importing a msghdr: most sends are one buffer. */
        io_uring_prep_send(sqe, h->fd, iov[0].iov_base, iov[0].iov_len, MSG_NOSIGNAL);
    } else {
        memcpy(slot->iov, iov, sizeof *iov * (size_t)iovcnt);
        memset(&slot->mh, 0, sizeof slot->mh);
        slot->mh.msg_iov = slot->iov;
        slot->mh.msg_iovlen = (size_t)iovcnt;
        io_uring_prep_sendmsg(sqe, h->fd, &slot->mh, MSG_NOSIGNAL);
    }
    use_file(sqe, h);
    submit_op(st, sqe, h, op);
    op->be = slot;
    h->wr = op;
    return CP_PENDING;
}

static bool held_drop(ur_state *st, cp_handle *h);

/* Empties a registered socket's table slot by a request queued behind every
 * request already prepared for it (they name the slot, not the descriptor,
 * and so still find the socket), instead of a register call per close. */
static void clear_slot(ur_state *st, cp_handle *h)
{
    static int none = -1;
    struct io_uring_sqe *sqe = get_sqe(st);
    io_uring_prep_files_update(sqe, &none, 1, h->fd);
    if (st->ring.features & IORING_FEAT_CQE_SKIP)
        sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
    io_uring_sqe_set_data64(sqe, TAG_IGNORE);
    st->clear_mark = st->ring.sq.sqe_tail;
    h->fixed = 0;
}

static void ur_close(cp_worker *w, cp_handle *h)
{
    ur_state *st = w->be;
    /* A receive whose last completion was held (and is now dropped) is no
     * longer in the kernel: it ends as a parked one does, or the core would
     * wait for its final completion for ever. */
    if (has_held(h) && held_drop(st, h) && h->rd && h->rd->kind == CP_OP_RECV)
        h->rd->parked = 1;
    cp__hlist_remove(h);
    cp_op *ops[2] = { h->rd, h->wr };
    for (int i = 0; i < 2; i++) {
        if (!ops[i])
            continue;
        if (ops[i]->parked) {
            /* Not in the kernel: nothing to cancel, it ends here. */
            ops[i]->parked = 0;
            ops[i]->armed = 0;
            h->rd = NULL;
            cp__worker_defer(w, ops[i], -ECANCELED);
            continue;
        }
        cancel_op(st, ops[i]);
    }
    if (h->fixed) {
        /* The socket stays in the table until the clear runs, at this
         * round's submission; the descriptor number may be reused before
         * then (ur_attach takes care). */
        clear_slot(st, h);
    } else if (io_uring_sq_ready(&st->ring)) {
        /* An operation prepared in this round but not yet submitted names
         * the descriptor and would find it closed (EBADF) or reused: submit
         * first so it starts, then cancel. */
        io_uring_submit(&st->ring);
    }
    /* The armed operations hold their own reference to the socket, so it is
     * really closed (and the peer told) when the last of them completes. */
    if (h->fd >= 0) {
        close(h->fd);
        h->fd = -1;
    }
}

/* ------------------------------------------------------------------ completions */

static void arm_wake(ur_state *st)
{
    struct io_uring_sqe *sqe = get_sqe(st);
    io_uring_prep_read(sqe, st->evfd, &st->evval, sizeof st->evval, 0);
    io_uring_sqe_set_data64(sqe, TAG_WAKE);
    st->wake_armed = true;
}

/* A buffer the worker is done with: on top of the free ones, for the next
 * ring_refill. */
static void recycle(ur_state *st, unsigned bid)
{
    /* A lent buffer: the worker drops its part of the loan, and the buffer
     * comes back now if its views are gone already, else with the last of
     * them (a count is raised from 0 only on this thread). */
    if (atomic_load_explicit(&st->lent->count[bid], memory_order_acquire) != 0)
        lent_put(st->lent, bid);
    else
        st->free_bids[st->nfree++] = (uint16_t)bid;
}

/* Buffers whose views were released on other threads. */
static void take_returned(ur_state *st)
{
    ur_lent *l = st->lent;
    if (!atomic_load_explicit(&l->any_returned, memory_order_acquire))
        return;
    pthread_mutex_lock(&l->lock);
    for (unsigned i = 0; i < l->nret; i++)
        st->free_bids[st->nfree++] = l->ret[i];
    l->nret = 0;
    atomic_store_explicit(&l->any_returned, false, memory_order_relaxed);
    pthread_mutex_unlock(&l->lock);
}

/* The backend's rx_lend: the buffer of the completion being delivered, if
 * [p, p + n) lies in it and fewer than UR_LEND_MAX are out. */
static bool ur_lend(cp_worker *w, const uint8_t *p, size_t n, cp_loan *loan)
{
    ur_state *st = w->be;
    if (st->cur_bid < 0)
        return false;
    ur_lent *l = st->lent;
    unsigned bid = (unsigned)st->cur_bid;
    if (!cp__bytes_within(p, n, st->bufs + (size_t)bid * UR_BUFSZ, UR_BUFSZ))
        return false;
    if (atomic_load_explicit(&l->count[bid], memory_order_relaxed) == 0) {
        if (atomic_load_explicit(&l->refs, memory_order_relaxed) > UR_LEND_MAX)
            return false;
        atomic_fetch_add_explicit(&l->refs, 1, memory_order_relaxed);
        atomic_store_explicit(&l->count[bid], 2, memory_order_relaxed);
    } else {
        atomic_fetch_add_explicit(&l->count[bid], 1, memory_order_relaxed);
    }
    *loan = (cp_loan){ .put = lent_put, .arg = l, .tag = bid, .pin = UR_BUFSZ };
    return true;
}

/*
 * Which provided buffers the kernel gets. The ring is a queue: the kernel
 * takes buffers from its head, and a buffer added at its tail comes back only
 * after every buffer ahead of it. With all 512 in the ring, each receive wrote
 * into the buffer used longest ago, 16 MiB back and out of the caches: at
 * 16 KiB echo the kernel's copy into it cost 2.3 times its copy of the same
 * bytes out of the send buffer. So the ring holds only about as many buffers
 * as the receives between two polls take (ring_goal), topped up before each
 * io_uring_enter from the free ones, the most recently freed first; the rest
 * wait unused. With DEFER_TASKRUN receives run only inside this thread's
 * io_uring_enter, so a batch sees what one poll took. The goal doubles when a
 * batch leaves less than a quarter of it in the ring, or a receive found
 * none (it ends with ENOBUFS and the session arms it again); it halves after
 * UR_RING_SHRINK batches that never took half.
 */
static void ring_adapt(ur_state *st)
{
    if (st->in_ring < st->ring_low)
        st->ring_low = st->in_ring;
    if ((st->ring_starved || st->in_ring < st->ring_goal / 4) && st->ring_goal < UR_NBUFS) {
        st->ring_goal *= 2;
        st->ring_low = st->ring_goal;
        st->ring_batches = 0;
    } else if (++st->ring_batches >= UR_RING_SHRINK) {
        if (st->ring_low >= st->ring_goal / 2 && st->ring_goal > UR_RING_MIN)
            st->ring_goal /= 2;
        st->ring_low = st->ring_goal;
        st->ring_batches = 0;
    }
    st->ring_starved = false;
}

static void ring_refill(ur_state *st)
{
    int mask = io_uring_buf_ring_mask(UR_NBUFS), n = 0;
    take_returned(st);
    while (st->in_ring < st->ring_goal && st->nfree) {
        unsigned bid = st->free_bids[--st->nfree];
        io_uring_buf_ring_add(st->br, st->bufs + (size_t)bid * UR_BUFSZ, UR_BUFSZ, (unsigned short)bid, mask,
                              n++);
        st->in_ring++;
    }
    if (n)
        io_uring_buf_ring_advance(st->br, n); /* published at once: one store */
}

/*
 * Why every newly armed multishot receive is rechecked.
 *
 * A multishot receive that finds the socket empty arms an internal poll. If
 * bytes and the peer's reset both arrive while that first attempt holds the
 * socket (they wait in the socket backlog and are processed when it lets go,
 * before the poll is on the socket's wait queue), no wake-up is left to come:
 * the poll is armed with IN|HUP|ERR already set and one reference. The kernel
 * then receives the bytes (a completion with IORING_CQE_F_MORE) and decides
 * from the socket's "bytes left" hint whether to receive again. That hint
 * (tcp_inq_hint) reports 1 after a FIN but 0 after a reset, so the receive
 * stops, stays armed, and is never woken again: the reset is lost and the
 * session never ends (kernel 6.18; upstream a68ed2df7213 fixed the case of
 * several wake-ups, not this one of a single activation). Seen as
 * tests/fuzz/crashes/fuzz_session-uring-session-never-ends, reproduced
 * deterministically by tests/fuzz/repro/uring_mshot_lost_reset.c.
 *
 * A hang needs the reset to have happened before the receive's poll was armed,
 * and the poll is armed inside the io_uring_enter that submits the receive. So
 * once that call has returned, one poll(2) over the receives it armed tells
 * which sockets were already reset or failed then. Each of those has its
 * receive cancelled (op->kicked), and the -ECANCELED completion is swallowed
 * here and replaced with a single-shot receive, which reads what is left and
 * then the error. A reset that comes later wakes the armed poll normally.
 * Steady traffic costs nothing: one poll(2) per round that armed receives,
 * after the io_uring_enter that submitted them (which then does not wait).
 */
/* Whether h's receive is armed in the kernel and not being cancelled. */
static bool recv_in_kernel(const cp_handle *h)
{
    const cp_op *op = h->rd;
    return h->fd >= 0 && op && op->kind == CP_OP_RECV && op->armed && !op->kicked && !op->parked;
}

static void recheck_recvs(ur_state *st)
{
    while (!cp__queue_empty(&st->recheck)) {
        struct pollfd pf[UR_RECHECK];
        cp_handle *hs[UR_RECHECK];
        nfds_t n = 0;
        cp_handle *h;
        while (n < UR_RECHECK && (h = cp__hlist_pop(&st->recheck)) != NULL) {
            if (!recv_in_kernel(h))
                continue;
            pf[n] = (struct pollfd){ .fd = h->fd, .events = POLLRDHUP };
            hs[n++] = h;
        }
        if (!n || poll(pf, n, 0) <= 0)
            continue;
        for (nfds_t i = 0; i < n; i++) {
            if (!(pf[i].revents & (POLLHUP | POLLERR)))
                continue;
            hs[i]->rd->kicked = 1; /* 1: a recheck's; 2: a pause's (ur_recv_pause) */
            cancel_op(st, hs[i]->rd);
        }
    }
}

/*
 * Holding completions back.
 *
 * Pausing a session's receive cancels its multishot receive, but whatever the
 * kernel had already received for it sits in the completion queue, and one
 * io_uring_enter can read a megabyte from one busy socket (32 buffers) before
 * the worker sees any of it. Delivering all of that to a session that asked
 * not to be read would defeat the pause (a burst's replies would pass the
 * send-queue limit in one round). So a receive completion for a paused
 * handle, or for one that still has completions held, is held back with its
 * provided buffer, in order, and delivered when the handle is resumed (at the
 * start of the next poll). The socket is then marked hot and read one buffer
 * per submission, so the next pause finds at most one buffer in flight. Other
 * sockets need the ring too: past a quarter of it per worker (UR_HELD_MAX), a
 * held completion keeps a copy of its bytes instead of its buffer. What is
 * held is bounded by what the kernel had read ahead when the pause came,
 * once per pause, since the socket is hot afterwards.
 */
static bool handle_hold(ur_state *st, cp_handle *h, cp_op *op, int res, unsigned flags, const uint8_t *data)
{
    uint8_t *copy = NULL;
    if ((flags & IORING_CQE_F_BUFFER) && st->nheld >= UR_HELD_MAX) {
        /* The ring's share is used: keep a copy, and the buffer goes back.
         * Copies have a cap of their own: past it (which a working pause
         * never reaches) the completion is delivered, out of turn at worst,
         * rather than memory growing without bound. */
        /* In whole pages (pages.c): copies made and dropped in a burst left
         * malloc's heap full of holes that kept their pages after it. */
        size_t n = cp__pages_round((size_t)res);
        if (res <= 0 || st->copied + n > UR_COPY_MAX || !(copy = cp__pages_get(n)))
            return false;
        memcpy(copy, data, (size_t)res);
        st->copied += n;
    }
    ur_held *e = st->free_held;
    if (e)
        st->free_held = e->next;
    else if (!(e = cp__slab_alloc(&held_slab))) {
        if (copy) {
            st->copied -= cp__pages_round((size_t)res);
            cp__pages_put(copy, cp__pages_round((size_t)res));
        }
        return false;
    }
    *e = (ur_held){ .op = op, .res = res, .flags = flags, .copy = copy };
    if (copy) {
        recycle(st, flags >> IORING_CQE_BUFFER_SHIFT);
        e->flags &= ~(unsigned)IORING_CQE_F_BUFFER;
    } else if (flags & IORING_CQE_F_BUFFER) {
        st->nheld++;
    }
    ur_held **at = (ur_held **)&h->be;
    while (*at)
        at = &(*at)->next;
    *at = e;
    h->hot = 1;
    return true;
}

static void held_free(ur_state *st, ur_held *e)
{
    if (e->flags & IORING_CQE_F_BUFFER) {
        recycle(st, e->flags >> IORING_CQE_BUFFER_SHIFT);
        st->nheld--;
    }
    if (e->copy) {
        st->copied -= cp__pages_round((size_t)e->res);
        cp__pages_put(e->copy, cp__pages_round((size_t)e->res));
    }
    e->next = st->free_held;
    st->free_held = e;
}

/* A resumed handle's held completions are delivered at the start of the
 * next poll. Each handle keeps its own completions in order (h->be); the
 * worker only lists the handles. */
static void replay_add(ur_state *st, cp_handle *h)
{
    if (h->on_replay)
        return;
    h->on_replay = 1;
    cp__queue_insert_head(&st->replay, &h->replay);
}

/* Closing: the handle's held completions are dropped (their buffers go back
 * to the ring) and it leaves the replay list, since its memory may go before
 * the next poll. Returns true if one of them was final (the receive's last,
 * without IORING_CQE_F_MORE). */
static bool held_drop(ur_state *st, cp_handle *h)
{
    bool final = false;
    ur_held *e = h->be;
    h->be = NULL;
    while (e) {
        ur_held *next = e->next;
        final |= !(e->flags & IORING_CQE_F_MORE);
        held_free(st, e);
        e = next;
    }
    if (h->on_replay) {
        cp__queue_remove(&h->replay); /* from st->replay, or from replay_held's walk */
        h->on_replay = 0;
    }
    return final;
}

static void deliver(cp_worker *w, ur_state *st, cp_op *op, int res, unsigned flags, const uint8_t *data);

/* Start of a poll: each resumed handle gets its held completions, oldest
 * first, until none is left or a delivery pauses it again (the rest stay, in
 * order, for its next resume), or closes it (held_drop then drops the rest,
 * ending the receive if its final completion was among them). Completions
 * that arrive meanwhile queue behind them on the handle. */
static void replay_held(cp_worker *w, ur_state *st)
{
    /* A handle resumed during the walk goes on st->replay afresh, for the
     * next poll (unless the walk has yet to reach it); one closed during it
     * leaves the walk (held_drop). */
    cp_queue walk;
    cp__queue_move(&st->replay, &walk);
    cp_queue *n;
    while ((n = cp__queue_pop_head(&walk)) != NULL) {
        cp_handle *h = CP_QUEUE_DATA(n, cp_handle, replay);
        h->on_replay = 0;
        while (h->be && !h->rd_paused) {
            ur_held *e = h->be;
            h->be = e->next;
            const uint8_t *data = e->copy;
            if (e->flags & IORING_CQE_F_BUFFER) {
                st->cur_bid = (int)(e->flags >> IORING_CQE_BUFFER_SHIFT);
                data = st->bufs + (size_t)st->cur_bid * UR_BUFSZ;
            }
            deliver(w, st, e->op, e->res, e->flags, data);
            st->cur_bid = -1;
            held_free(st, e);
        }
    }
}

/* A completion of op that is due for the core. */
static void deliver(cp_worker *w, ur_state *st, cp_op *op, int res, unsigned flags, const uint8_t *data)
{
    bool more = flags & IORING_CQE_F_MORE;
    if (!more) {
        cp_handle *h = op->h;
        /* This submission is over: a cancellation sent for it (a pause's,
         * after its final completion was held) found nothing, and must not
         * make the next pause think one is still on its way. */
        op->kicked = 0;
        /* A single read that did not fill its buffer drained the socket. */
        if (h->rd == op && h->hot && res >= 0 && (unsigned)res < UR_BUFSZ)
            h->hot = 0;
        cp__op_detach(h, op);
        if (op->kind == CP_OP_SEND && op->be) {
            ur_slot *slot = op->be;
            op->be = NULL;
            slot->next = st->free_slots;
            st->free_slots = slot;
        }
    }
    op->cb(w, op, res, more ? CP_CQE_MORE : 0, data);
}

/* The op a completion names, or NULL if the completion is for an earlier
 * submission of the op (its generation differs): such a one is dropped. */
static cp_op *current_op(uint64_t ud)
{
    cp_op *op = (cp_op *)(uintptr_t)(ud & PTR_MASK);
    return (uint16_t)(ud >> 48) == op->gen ? op : NULL;
}

/* The final completion of a receive this backend cancelled itself (op->kicked:
 * 1 by recheck_recvs, 2 by a pause). True if it is swallowed. */
static bool kick_swallowed(ur_state *st, cp_op *op, int res, unsigned flags)
{
    if ((flags & IORING_CQE_F_MORE) || !op->kicked)
        return false;
    int why = op->kicked;
    op->kicked = 0;
    if (res != -ECANCELED || op->h->fd < 0)
        return false;
    /* Cancelled by recheck_recvs or a pause, not by a close:
     * the core sees no gap. Paused: park until the resume.
     * Else receive on (after a recheck, with a single-shot
     * receive: see recheck_recvs). */
    if (op->h->rd_paused)
        park(op->h, op);
    else if (why == 1)
        prep_recv(st, op->h, op, false);
    else
        arm_multishot(st, op->h, op);
    return true;
}

/* A completion of op's current submission: accepts go on taking connections,
 * a cancellation of our own is swallowed, a paused handle's receive is held,
 * the rest is delivered. False if it was held (its buffer, or a copy, stays
 * with it). */
static bool complete_op(cp_worker *w, ur_state *st, cp_op *op, int res, unsigned flags, const uint8_t *data)
{
    if (op->kind == CP_OP_ACCEPT && accept_more(w, st, op, res))
        return true;
    if (kick_swallowed(st, op, res, flags))
        return true;
    cp_handle *h = op->h;
    /* A paused handle's receive completions are held, and so are
     * those behind completions it still holds, in turn. */
    if (op->kind == CP_OP_RECV && h->fd >= 0 && (has_held(h) || h->rd_paused) &&
        handle_hold(st, h, op, res, flags, data))
        return false;
    deliver(w, st, op, res, flags, data);
    return true;
}

static void dispatch(cp_worker *w, ur_state *st, uint64_t ud, int res, unsigned flags)
{
    if (ud == TAG_WAKE) {
        st->wake_armed = false;
        return;
    }
    if (ud == TAG_MSG_WAKE)
        return;
    bool has_buf = flags & IORING_CQE_F_BUFFER;
    unsigned bid = flags >> IORING_CQE_BUFFER_SHIFT;
    if (has_buf)
        st->in_ring--;
    else if (res == -ENOBUFS)
        st->ring_starved = true;
    const uint8_t *data = has_buf ? st->bufs + (size_t)bid * UR_BUFSZ : NULL;
    cp_op *op = ud == TAG_IGNORE ? NULL : current_op(ud);
    st->cur_bid = has_buf ? (int)bid : -1;
    bool done = !op || complete_op(w, st, op, res, flags, data);
    st->cur_bid = -1;
    if (!done)
        return; /* the buffer (or a copy) stays with the held completion */
    if (has_buf)
        recycle(st, bid);
}

/* Submits what the round prepared without asking for completions; true if
 * that alone produced some (operations that finished during the call). */
static bool submit_only(ur_state *st)
{
    if (!io_uring_sq_ready(&st->ring))
        return false;
    io_uring_submit(&st->ring);
    return io_uring_cq_ready(&st->ring) > 0;
}

/* Submits the round's work and, unless the round has enough to do already,
 * asks the kernel for completions, waiting up to timeout_ms when nothing is
 * ready. Returns io_uring_enter's result (0 when no call was needed). */
static int ur_enter(ur_state *st, int timeout_ms, bool recheck)
{
    if (io_uring_cq_ready(&st->ring) >= UR_BATCH) {
        /* This round's batch is already in the completion queue: submit, but
         * do not ask for more. With DEFER_TASKRUN, asking would run every
         * pending receive into a provided buffer, growing a backlog that this
         * worker takes 64 at a time until the buffers run out (each receive
         * then ends with ENOBUFS and is re-armed). Nothing to submit: no
         * system call at all. */
        return io_uring_sq_ready(&st->ring) ? io_uring_submit(&st->ring) : 0;
    }
    if (timeout_ms == 0 || recheck)
        return io_uring_submit_and_get_events(&st->ring);
    if (submit_only(st)) {
        /* Some of what was just submitted finished inside that call (a send
         * to a socket with room does): take those completions in this round
         * and wait in the next. Waiting now would return at once on them
         * anyway, and the worker would then sleep for every single receive:
         * at 1000 echo connections that was one receive per io_uring_enter
         * and 25k sleeps a second; this way, three and 3k. */
        return 0;
    }
    struct io_uring_cqe *cqe;
    struct __kernel_timespec ts = { .tv_sec = timeout_ms / 1000, .tv_nsec = (timeout_ms % 1000) * 1000000L };
    return io_uring_submit_and_wait_timeout(&st->ring, &cqe, 1, timeout_ms > 0 ? &ts : NULL, NULL);
}

/* Takes one batch of completions (at most UR_BATCH) and delivers it. One
 * batch per round: the round's sends and hand-offs then go out before more
 * input is taken, which keeps queues short under floods. */
static int take_batch(cp_worker *w, ur_state *st)
{
    struct io_uring_cqe *cqes[UR_BATCH];
    unsigned n = io_uring_peek_batch_cqe(&st->ring, cqes, UR_BATCH);
    if (!n)
        return 0;
    /* Copy out and release the slots first: callbacks submit more work. */
    struct {
        uint64_t ud;
        int res;
        unsigned flags;
    } c[UR_BATCH];
    for (unsigned i = 0; i < n; i++) {
        c[i].ud = cqes[i]->user_data, c[i].res = cqes[i]->res, c[i].flags = cqes[i]->flags;
        /* The op sits in its session, which the kernel's work since the
         * last round has usually pushed out of the cache: start loading
         * every one of the batch now, not one miss after another. */
        if (c[i].ud > TAG_MSG_WAKE)
            __builtin_prefetch((const void *)(uintptr_t)(c[i].ud & PTR_MASK));
    }
    io_uring_cq_advance(&st->ring, n);
    for (unsigned i = 0; i < n; i++)
        dispatch(w, st, c[i].ud, c[i].res, c[i].flags);
    ring_adapt(st);
    return (int)n;
}

static int ur_poll(cp_worker *w, int timeout_ms)
{
    ur_state *st = w->be;
    if (!st->wake_armed)
        arm_wake(st);
    /* Receives armed since the last poll are rechecked right after the
     * io_uring_enter below has armed them, and before any blocking wait (which
     * a lost reset would make endless): a round that armed receives does not
     * wait, it only collects what is ready. */
    bool recheck = !cp__queue_empty(&st->recheck);
    ring_refill(st);
    atomic_store_explicit(&w->m->rbufs_free, st->in_ring + st->nfree, memory_order_relaxed);
    atomic_store_explicit(&w->m->rbufs_held, st->nheld, memory_order_relaxed);
    /* Buffers lent: one reference each to the record, besides the worker's. */
    atomic_store_explicit(&w->m->rbufs_lent, atomic_load_explicit(&st->lent->refs, memory_order_relaxed) - 1,
                          memory_order_relaxed);
    int r = ur_enter(st, timeout_ms, recheck);
    if (recheck && !io_uring_sq_ready(&st->ring))
        recheck_recvs(st); /* its cancellations go out with the next submission */
    if (r < 0 && r != -ETIME && r != -EINTR && r != -EBUSY)
        return r;
    w->now_ns = cp__now_ns();
    if (!cp__queue_empty(&st->replay))
        replay_held(w, st);
    return take_batch(w, st);
}

/*
 * After a load the worker keeps what it touched: every page of the provided
 * buffers that a receive filled (16 MiB per worker after one burst, as the
 * ring hands its buffers out in turn), a send slot per send that was in
 * flight at once and a record per completion that was held at once. Called
 * between rounds, when every buffer but the held ones is back in the ring:
 * the slots and records go back to malloc, and, when nothing is held, the
 * buffers' pages are dropped (MADV_DONTNEED; the next receive into one
 * faults in a zeroed page; a held buffer still has its session's bytes). That
 * is safe only while the kernel cannot be writing into a buffer of the ring,
 * which DEFER_TASKRUN guarantees: receives then run only inside this
 * thread's own io_uring_enter calls. Without it they may run from task work
 * at any kernel entry, so the pages stay.
 */
static void ur_trim(cp_worker *w)
{
    ur_state *st = w->be;
    free_spares(st);
    /* Nor while a buffer is lent: its views still send its bytes. */
    if (st->bufs && !st->nheld && atomic_load_explicit(&st->lent->refs, memory_order_acquire) == 1 &&
        (st->ring.flags & IORING_SETUP_DEFER_TASKRUN))
        (void)madvise(st->bufs, (size_t)UR_NBUFS * UR_BUFSZ, MADV_DONTNEED);
}

/* A refusal (-EBUSY while completions overflow) is left to the next poll,
 * which submits again. */
static void ur_submit(cp_worker *w)
{
    ur_state *st = w->be;
    if (io_uring_sq_ready(&st->ring))
        (void)io_uring_submit(&st->ring);
}

static int ur_busy(cp_worker *w)
{
    ur_state *st = w->be;
    return !cp__queue_empty(&st->replay) || io_uring_cq_ready(&st->ring) > 0;
}

const cp_backend_ops cp__uring_backend = {
    .name = "io_uring",
    .init = ur_init,
    .fini = ur_fini,
    .thread_init = ur_thread_init,
    .thread_fini = ur_thread_fini,
    .poll = ur_poll,
    .busy = ur_busy,
    .submit = ur_submit,
    /* At 25% its writes stayed smaller than epoll's and the chat clients'
     * reader fell behind in some runs (bench/RESULTS.md). */
    .fanout_pause_pct = 50,
    .wake = ur_wake,
    .attach = ur_attach,
    .accept = ur_accept,
    .connect = ur_connect,
    .recv = ur_recv,
    .send = ur_send,
    .recv_pause = ur_recv_pause,
    .recv_resume = ur_recv_resume,
    .send_holds_bufs = true,
    .close = ur_close,
    .trim = ur_trim,
    .rx_lend = ur_lend,
};
