/* SPDX-License-Identifier: MIT */
/*
 * The kernel side of docs/reliability.md finding 2, without cport: an
 * io_uring multishot receive whose poll is armed while bytes and the peer's
 * reset are both already queued gives one completion for the bytes (with
 * IORING_CQE_F_MORE) and then nothing, ever: the reset is lost.
 *
 * IORING_RECVSEND_POLL_FIRST makes the receive arm its poll without trying
 * first, which is what happens by chance when the bytes and the reset land
 * while the first attempt holds the socket (fuzz_session). The poll then
 * starts with IN|HUP|ERR and one reference; the kernel receives the bytes,
 * sees "0 bytes left" (tcp_inq_hint reports 1 after a FIN, but 0 after a
 * reset) and waits for a wake-up that already happened.
 *
 *   cc -O2 tests/fuzz/repro/uring_mshot_lost_reset.c -luring -o lost_reset
 *   ./lost_reset          # multishot, reset: "stuck 20 of 20" on 6.18 (exit 1)
 *   ./lost_reset single   # single-shot receives: stuck 0 of 20
 *   ./lost_reset fin      # multishot, FIN instead of reset: stuck 0 of 20
 *
 * Each round also prints what poll(2) says right after the submission: the
 * socket is POLLHUP|POLLERR, which is what cport's recheck looks for.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <liburing.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define NB 8
#define BS 4096

int main(int argc, char **argv)
{
    int single = argc > 1 && !strcmp(argv[1], "single");
    int fin = argc > 1 && !strcmp(argv[1], "fin");
    struct io_uring ring;
    struct io_uring_params p = { .flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN };
    if (io_uring_queue_init_params(16, &ring, &p) < 0) {
        p.flags = 0;
        if (io_uring_queue_init_params(16, &ring, &p) < 0)
            return perror("io_uring"), 2;
    }
    struct io_uring_buf_ring *br = mmap(NULL, sizeof(struct io_uring_buf) * NB, PROT_READ | PROT_WRITE,
                                        MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    static char bufs[NB][BS];
    struct io_uring_buf_reg reg = { .ring_addr = (unsigned long)br, .ring_entries = NB, .bgid = 1 };
    if (io_uring_register_buf_ring(&ring, &reg, 0) < 0)
        return fprintf(stderr, "no provided-buffer rings\n"), 2;
    io_uring_buf_ring_init(br);
    for (int i = 0; i < NB; i++)
        io_uring_buf_ring_add(br, bufs[i], BS, (unsigned short)i, io_uring_buf_ring_mask(NB), i);
    io_uring_buf_ring_advance(br, NB);

    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t al = sizeof a;
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 8) ||
        getsockname(ls, (struct sockaddr *)&a, &al))
        return perror("listen"), 2;
    int stuck = 0, rounds = 20;
    for (int it = 0; it < rounds; it++) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(c, (struct sockaddr *)&a, sizeof a))
            return perror("connect"), 2;
        int s = accept(ls, NULL, NULL);
        char msg[724];
        memset(msg, 'x', sizeof msg);
        if (write(c, msg, sizeof msg) != (ssize_t)sizeof msg)
            return perror("write"), 2;
        if (!fin) {
            struct linger lg = { 1, 0 };
            setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        }
        close(c);
        usleep(1000); /* bytes and reset (or FIN) are queued on s */

        struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
        if (single)
            io_uring_prep_recv(sqe, s, NULL, 0, 0);
        else
            io_uring_prep_recv_multishot(sqe, s, NULL, 0, 0);
        sqe->flags |= IOSQE_BUFFER_SELECT;
        sqe->buf_group = 1;
        sqe->ioprio |= IORING_RECVSEND_POLL_FIRST;
        sqe->user_data = 1;
        io_uring_submit(&ring);
        struct pollfd pf = { .fd = s, .events = POLLRDHUP };
        poll(&pf, 1, 0);

        int bytes = 0, cqes = 0, last = 1, done = 0;
        while (!done) {
            struct io_uring_cqe *cqe;
            struct __kernel_timespec ts = { .tv_sec = 0, .tv_nsec = 200 * 1000 * 1000 };
            if (io_uring_wait_cqe_timeout(&ring, &cqe, &ts) < 0)
                break; /* 200 ms without a completion */
            int res = cqe->res;
            unsigned f = cqe->flags;
            io_uring_cqe_seen(&ring, cqe);
            cqes++;
            if (f & IORING_CQE_F_BUFFER) {
                unsigned bid = f >> IORING_CQE_BUFFER_SHIFT;
                io_uring_buf_ring_add(br, bufs[bid], BS, (unsigned short)bid, io_uring_buf_ring_mask(NB), 0);
                io_uring_buf_ring_advance(br, 1);
            }
            if (res > 0)
                bytes += res;
            if (f & IORING_CQE_F_MORE)
                continue;
            if (res > 0) { /* single-shot: receive again */
                sqe = io_uring_get_sqe(&ring);
                io_uring_prep_recv(sqe, s, NULL, 0, 0);
                sqe->flags |= IOSQE_BUFFER_SELECT;
                sqe->buf_group = 1;
                sqe->user_data = 1;
                io_uring_submit(&ring);
                continue;
            }
            last = res;
            done = 1;
        }
        if (!done) {
            stuck++;
            sqe = io_uring_get_sqe(&ring);
            io_uring_prep_cancel64(sqe, 1, 0);
            sqe->user_data = 2;
            io_uring_submit(&ring);
            for (int k = 0; k < 2; k++) {
                struct io_uring_cqe *cqe;
                if (io_uring_wait_cqe(&ring, &cqe))
                    break;
                io_uring_cqe_seen(&ring, cqe);
            }
        }
        if (it < 3 || !done)
            printf("round %d: poll(2) after submit: %s%s%s; %d bytes in %d completions, then %s (%d)\n", it,
                   pf.revents & POLLHUP ? "HUP " : "", pf.revents & POLLERR ? "ERR " : "",
                   pf.revents & POLLRDHUP ? "RDHUP" : "", bytes, cqes,
                   done ? "the final completion" : "nothing for 200 ms: STUCK", done ? last : 0);
        close(s);
    }
    printf("%s receive, %s: stuck %d of %d\n", single ? "single-shot" : "multishot", fin ? "FIN" : "reset",
           stuck, rounds);
    return stuck ? 1 : 0;
}
