/* SPDX-License-Identifier: MIT */
/*
 * raw_uring_echo — a one-thread raw io_uring echo server, the io_uring peer.
 *
 * What a competent engineer writes for speed with liburing and no framework:
 *   - one ring, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN when the
 *     kernel has them (else COOP_TASKRUN, else plain);
 *   - multishot accept on the listener;
 *   - one multishot recv per connection into a provided-buffer ring
 *     (--bufs buffers of --buf bytes, default 4096 x 16 KiB);
 *   - the echo is sent straight from the received buffer (no copy) with
 *     IORING_OP_SEND; one send in flight per connection, later buffers queue
 *     behind it in order; a short send is re-submitted for the rest; the buffer
 *     goes back to the ring when its bytes are all sent;
 *   - a recv that ends with -ENOBUFS (all buffers busy) loses nothing (the bytes
 *     stay in the socket): the connection is re-armed once buffers come back;
 *   - SIGINT/SIGTERM arrive through a signalfd read on the ring.
 *
 * liburing 2.3 (Debian 12) has no io_uring_setup_buf_ring(): the buffer ring is
 * mmap()ed here and registered with io_uring_register_buf_ring().
 *
 *   raw_uring_echo --port P [--host H] [--buf BYTES] [--bufs N]
 *
 * Prints "listening on H:P" once ready; exits 0 on SIGINT/SIGTERM; usage and
 * exit 2 on bad arguments.
 */
#ifndef _GNU_SOURCE
#  define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <liburing.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define RING_ENTRIES 4096
#define BGID 0
#define NO_BUF 0xffffu

enum { OP_ACCEPT = 1, OP_RECV = 2, OP_SEND = 3, OP_SIGNAL = 4 };

static inline uint64_t ud(unsigned op, int fd) { return ((uint64_t)op << 32) | (uint32_t)fd; }

struct conn {
    uint16_t head, tail; /* queue of received buffers still to send (NO_BUF = empty) */
    uint8_t open;        /* fd is ours */
    uint8_t recv_armed;  /* a multishot recv is pending */
    uint8_t sending;     /* a send is in flight (for the head buffer) */
    uint8_t dead;        /* closing: an error, EOF or a failed send */
    uint8_t want_rearm;  /* recv ended with ENOBUFS; re-arm when buffers return */
    int next_wait;       /* link in the list of connections waiting for buffers */
};

struct bufinfo {
    uint32_t len, off; /* bytes held, bytes already sent */
    uint16_t next;     /* next buffer in the connection's queue */
};

static struct io_uring ring;
static struct io_uring_buf_ring *br;
static unsigned nbufs = 4096, bufsz = 16384, br_mask;
static char *bufbase;
static struct bufinfo *binfo;
static unsigned returned; /* buffers added to the ring since the last advance */
static int any_returned;  /* some buffer came back in this batch */
static struct conn *conns;
static int max_fds;
static int wait_head = -1; /* connections whose recv must be re-armed */

static void usage(FILE *f)
{
    fprintf(f, "usage: raw_uring_echo --port P [--host H] [--buf BYTES] [--bufs N]\n"
               "  one-thread raw io_uring echo server (multishot accept + recv, provided buffers)\n"
               "  --host H     address to bind (default 0.0.0.0)\n"
               "  --buf BYTES  size of each provided buffer (default 16384)\n"
               "  --bufs N     number of provided buffers, a power of two <= 32768 (default 4096)\n");
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < (1u << 20))
        max_fds = (int)rl.rlim_cur;
    else
        max_fds = 1 << 20;
}

static int open_listener(const char *host, const char *port, char *desc, size_t desclen)
{
    struct addrinfo hints, *res, *ai;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "raw_uring_echo: %s:%s: %s\n", host, port, gai_strerror(rc));
        return -1;
    }
    int fd = -1;
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, 0);
        if (fd < 0)
            continue;
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, SOMAXCONN) == 0) {
            char h[NI_MAXHOST], p[NI_MAXSERV];
            if (getnameinfo(ai->ai_addr, ai->ai_addrlen, h, sizeof h, p, sizeof p,
                            NI_NUMERICHOST | NI_NUMERICSERV) == 0)
                snprintf(desc, desclen, "%s:%s", h, p);
            break;
        }
        fprintf(stderr, "raw_uring_echo: bind/listen %s:%s: %s\n", host, port, strerror(errno));
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

static struct io_uring_sqe *get_sqe(void)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    while (!sqe) {
        io_uring_submit(&ring);
        sqe = io_uring_get_sqe(&ring);
    }
    return sqe;
}

static void recycle(uint16_t bid)
{
    io_uring_buf_ring_add(br, bufbase + (size_t)bid * bufsz, bufsz, bid, br_mask, (int)returned);
    returned++;
}

static void flush_returned(void)
{
    if (returned) {
        io_uring_buf_ring_advance(br, (int)returned);
        returned = 0;
        any_returned = 1;
    }
}

static void arm_recv(int fd)
{
    struct io_uring_sqe *sqe = get_sqe();
    io_uring_prep_recv_multishot(sqe, fd, NULL, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = BGID;
    io_uring_sqe_set_data64(sqe, ud(OP_RECV, fd));
    conns[fd].recv_armed = 1;
}

static void arm_accept(int lfd)
{
    struct io_uring_sqe *sqe = get_sqe();
    io_uring_prep_multishot_accept(sqe, lfd, NULL, NULL, SOCK_CLOEXEC);
    io_uring_sqe_set_data64(sqe, ud(OP_ACCEPT, lfd));
}

static void send_head(int fd)
{
    struct conn *c = &conns[fd];
    struct bufinfo *b = &binfo[c->head];
    struct io_uring_sqe *sqe = get_sqe();
    io_uring_prep_send(sqe, fd, bufbase + (size_t)c->head * bufsz + b->off, b->len - b->off, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, ud(OP_SEND, fd));
    c->sending = 1;
}

/* Close once nothing of ours is pending on the fd any more. */
static void maybe_close(int fd)
{
    struct conn *c = &conns[fd];
    if (!c->open || !c->dead || c->recv_armed || c->sending || c->want_rearm)
        return;
    while (c->head != NO_BUF) {
        uint16_t n = binfo[c->head].next;
        recycle(c->head);
        c->head = n;
    }
    c->tail = NO_BUF;
    c->open = 0;
    close(fd);
}

static void kill_conn(int fd)
{
    struct conn *c = &conns[fd];
    if (!c->dead) {
        c->dead = 1;
        if (c->recv_armed)
            shutdown(fd, SHUT_RDWR); /* makes the multishot recv end */
    }
    if (c->want_rearm) { /* still linked in the wait list; it is dropped there */
        return;
    }
    maybe_close(fd);
}

static void on_accept(int lfd, struct io_uring_cqe *cqe)
{
    if (!(cqe->flags & IORING_CQE_F_MORE))
        arm_accept(lfd);
    int fd = cqe->res;
    if (fd < 0)
        return;
    if (fd >= max_fds) {
        close(fd);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct conn *c = &conns[fd];
    memset(c, 0, sizeof *c);
    c->head = c->tail = NO_BUF;
    c->open = 1;
    c->next_wait = -1;
    arm_recv(fd);
}

static void on_recv(int fd, struct io_uring_cqe *cqe)
{
    struct conn *c = &conns[fd];
    int more = (cqe->flags & IORING_CQE_F_MORE) != 0;
    if (!more)
        c->recv_armed = 0;
    if (cqe->res > 0 && (cqe->flags & IORING_CQE_F_BUFFER)) {
        uint16_t bid = (uint16_t)(cqe->flags >> IORING_CQE_BUFFER_SHIFT);
        if (c->dead) {
            recycle(bid);
        } else {
            binfo[bid].len = (uint32_t)cqe->res;
            binfo[bid].off = 0;
            binfo[bid].next = NO_BUF;
            if (c->tail == NO_BUF)
                c->head = bid;
            else
                binfo[c->tail].next = bid;
            c->tail = bid;
            if (!c->sending)
                send_head(fd);
        }
        if (!more && !c->dead)
            arm_recv(fd); /* the kernel ended the multishot (e.g. overflow): re-arm */
    } else if (cqe->res == -ENOBUFS) {
        /* Every buffer is busy; the bytes wait in the socket. Re-arm once some come back. */
        if (!c->dead && !c->want_rearm) {
            c->want_rearm = 1;
            c->next_wait = wait_head;
            wait_head = fd;
        }
    } else if (!more) {
        kill_conn(fd); /* EOF or an error */
        return;
    }
    if (c->dead)
        maybe_close(fd);
}

static void on_send(int fd, struct io_uring_cqe *cqe)
{
    struct conn *c = &conns[fd];
    c->sending = 0;
    if (cqe->res < 0 || c->dead) {
        kill_conn(fd);
        return;
    }
    struct bufinfo *b = &binfo[c->head];
    b->off += (uint32_t)cqe->res;
    if (b->off >= b->len) {
        uint16_t bid = c->head;
        c->head = b->next;
        if (c->head == NO_BUF)
            c->tail = NO_BUF;
        recycle(bid);
    }
    if (c->head != NO_BUF)
        send_head(fd); /* the rest of a short send, or the next buffer */
}

static void rearm_waiting(void)
{
    while (wait_head >= 0) {
        int fd = wait_head;
        struct conn *c = &conns[fd];
        wait_head = c->next_wait;
        c->next_wait = -1;
        c->want_rearm = 0;
        if (c->dead)
            maybe_close(fd);
        else
            arm_recv(fd);
    }
}

static int setup_ring(void)
{
    static const unsigned tries[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
        IORING_SETUP_COOP_TASKRUN,
        0,
    };
    int rc = -EINVAL;
    for (size_t i = 0; i < sizeof tries / sizeof tries[0]; i++) {
        struct io_uring_params p;
        memset(&p, 0, sizeof p);
        p.flags = tries[i] | IORING_SETUP_CQSIZE;
        p.cq_entries = RING_ENTRIES * 4;
        rc = io_uring_queue_init_params(RING_ENTRIES, &ring, &p);
        if (rc == 0)
            return 0;
    }
    fprintf(stderr, "raw_uring_echo: io_uring_queue_init: %s\n", strerror(-rc));
    return -1;
}

static int setup_buffers(void)
{
    size_t rsz = (size_t)nbufs * sizeof(struct io_uring_buf);
    void *rmem = mmap(NULL, rsz, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (rmem == MAP_FAILED)
        return -1;
    br = rmem;
    io_uring_buf_ring_init(br);
    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof reg);
    reg.ring_addr = (uint64_t)(uintptr_t)br;
    reg.ring_entries = nbufs;
    reg.bgid = BGID;
    int rc = io_uring_register_buf_ring(&ring, &reg, 0);
    if (rc != 0) {
        fprintf(stderr, "raw_uring_echo: io_uring_register_buf_ring: %s\n", strerror(-rc));
        return -1;
    }
    bufbase = mmap(NULL, (size_t)nbufs * bufsz, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    binfo = calloc(nbufs, sizeof *binfo);
    if (bufbase == MAP_FAILED || !binfo)
        return -1;
    br_mask = (unsigned)io_uring_buf_ring_mask(nbufs);
    for (unsigned i = 0; i < nbufs; i++)
        recycle((uint16_t)i);
    flush_returned();
    return 0;
}

static int parse_num(const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    const char *host = "0.0.0.0";
    const char *port = NULL;
    static const struct option lo[] = {
        { "port", required_argument, NULL, 'p' }, { "host", required_argument, NULL, 'H' },
        { "buf", required_argument, NULL, 'b' },  { "bufs", required_argument, NULL, 'n' },
        { "help", no_argument, NULL, 'h' },       { NULL, 0, NULL, 0 },
    };
    int o;
    long v;
    while ((o = getopt_long(argc, argv, "p:H:b:n:h", lo, NULL)) != -1) {
        switch (o) {
        case 'p': port = optarg; break;
        case 'H': host = optarg; break;
        case 'b':
            if (parse_num(optarg, 1024, 1L << 20, &v)) {
                usage(stderr);
                return 2;
            }
            bufsz = (unsigned)v;
            break;
        case 'n':
            if (parse_num(optarg, 16, 32768, &v) || (v & (v - 1))) {
                usage(stderr);
                return 2;
            }
            nbufs = (unsigned)v;
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!port || optind != argc || parse_num(port, 0, 65535, &v)) {
        usage(stderr);
        return 2;
    }

    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC);
    conns = calloc((size_t)max_fds, sizeof *conns);
    if (sfd < 0 || !conns) {
        perror("raw_uring_echo: setup");
        return 1;
    }
    if (setup_ring() < 0 || setup_buffers() < 0) {
        fprintf(stderr, "raw_uring_echo: setup failed\n");
        return 1;
    }
    char desc[NI_MAXHOST + NI_MAXSERV + 2] = "?";
    int lfd = open_listener(host, port, desc, sizeof desc);
    if (lfd < 0)
        return 1;
    arm_accept(lfd);
    struct signalfd_siginfo si;
    struct io_uring_sqe *sqe = get_sqe();
    io_uring_prep_read(sqe, sfd, &si, sizeof si, 0);
    io_uring_sqe_set_data64(sqe, ud(OP_SIGNAL, sfd));
    io_uring_submit(&ring);

    printf("listening on %s\n", desc);
    fflush(stdout);

    for (;;) {
        int rc = io_uring_submit_and_wait(&ring, 1);
        if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
            fprintf(stderr, "raw_uring_echo: io_uring_submit_and_wait: %s\n", strerror(-rc));
            return 1;
        }
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        int stop = 0;
        io_uring_for_each_cqe(&ring, head, cqe)
        {
            seen++;
            uint64_t u = io_uring_cqe_get_data64(cqe);
            int fd = (int)(uint32_t)u;
            switch ((unsigned)(u >> 32)) {
            case OP_ACCEPT: on_accept(fd, cqe); break;
            case OP_RECV: on_recv(fd, cqe); break;
            case OP_SEND: on_send(fd, cqe); break;
            case OP_SIGNAL: stop = 1; break;
            default: break;
            }
        }
        io_uring_cq_advance(&ring, seen);
        flush_returned();
        if (wait_head >= 0 && any_returned)
            rearm_waiting();
        any_returned = 0;
        if (stop)
            break;
    }
    io_uring_queue_exit(&ring);
    for (int fd = 0; fd < max_fds; fd++)
        if (conns[fd].open)
            close(fd);
    free(conns);
    free(binfo);
    return 0;
}
