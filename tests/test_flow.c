/* SPDX-License-Identifier: MIT */
/*
 * Receive flow control (issue 14): a session is not read while its peer is
 * over the receive rate limit, while its own send queue is above the high
 * watermark, or once it has had its share of a worker round. The peer is
 * then pushed back by TCP instead of being cut, and the time its receive
 * spends paused is not held against it (packet and idle timeouts).
 *
 * Bounds are loose where timing is involved (the machine may be loaded) but
 * each still separates a working limit from a missing one by a wide margin.
 */
#include "helpers.h"
#include "internal.h" /* a session's send queue size, read on its worker */

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* The most bytes one receive hands to a session: epoll's and IOCP's read
 * buffer (io_uring's provided buffers are smaller). A rate limit may run
 * ahead by this much, since a receive is always consumed whole. */
#define ONE_RECEIVE (64u * 1024u)

/* ------------------------------------------------------------------ client threads */

/* Writes one buffer to a socket on its own thread. */
typedef struct writer {
    int fd;
    const uint8_t *p;
    size_t n;
    int rc;
    pthread_t th;
} writer;

static void *writer_main(void *arg)
{
    writer *wr = arg;
    wr->rc = cpt_send_all(wr->fd, wr->p, wr->n);
    return NULL;
}

static void writer_start(writer *wr, int fd, const void *p, size_t n)
{
    *wr = (writer){ .fd = fd, .p = p, .n = n };
    cr_assert_eq(pthread_create(&wr->th, NULL, writer_main, wr), 0);
}

static int writer_join(writer *wr)
{
    pthread_join(wr->th, NULL);
    return wr->rc;
}

/* Writes the same chunk again and again, as fast as the socket takes it,
 * until stopped. */
typedef struct flood {
    int fd;
    const uint8_t *chunk;
    size_t n;
    atomic_bool stop;
    atomic_llong sent;
    pthread_t th;
} flood;

static void *flood_main(void *arg)
{
    flood *f = arg;
    while (!atomic_load(&f->stop)) {
        if (cpt_send_all(f->fd, f->chunk, f->n) != 0)
            break;
        atomic_fetch_add(&f->sent, (long long)f->n);
    }
    return NULL;
}

static void flood_start(flood *f, int fd, const uint8_t *chunk, size_t n)
{
    f->fd = fd;
    f->chunk = chunk;
    f->n = n;
    atomic_init(&f->stop, false);
    atomic_init(&f->sent, 0);
    cr_assert_eq(pthread_create(&f->th, NULL, flood_main, f), 0);
}

/* Stops the flood: a send blocked on a paused session is woken by shutting
 * the socket down, after which fd is only good for closing. */
static void flood_stop(flood *f)
{
    atomic_store(&f->stop, true);
    shutdown(f->fd, SHUT_RDWR);
    pthread_join(f->th, NULL);
}

/* Packets of the given sizes (header included), in turn, until at least
 * total bytes; bodies are test patterns. *len gets the length. */
static uint8_t *packets_make(const uint16_t *sizes, int nsizes, size_t total, size_t *len, uint32_t seed)
{
    uint8_t *buf = malloc(total + 65536);
    cr_assert_not_null(buf);
    size_t off = 0;
    for (int i = 0; off < total; i++) {
        uint16_t size = sizes[i % nsizes];
        cpt_put_header(buf + off, size, (uint16_t)(i & 0x7fff));
        cpt_fill(buf + off + 4, size - 4u, off, seed);
        off += size;
    }
    *len = off;
    return buf;
}

/* A chunk of n packets of size bytes each. */
static uint8_t *chunk_make(uint16_t size, int n, size_t *len)
{
    const uint16_t sizes[] = { size };
    return packets_make(sizes, 1, (size_t)size * (size_t)n, len, 7);
}

static long long rec_packets(cpt_env *e) { return atomic_load(&e->t->recs[0].packets); }

static double secs_since(uint64_t t0_ns) { return (double)(cpt_now_ns() - t0_ns) / 1e9; }

/* ------------------------------------------------------------------ bursts */

/* One connection: a thread writes the whole burst while this one reads every
 * reply; all of it must come back, unchanged (the server echoes). */
static void burst_round(cpt_env *e, const uint8_t *burst, size_t len, int round)
{
    int fd = cpt_xconnect(e->sport);
    uint8_t *back = malloc(len);
    cr_assert_not_null(back);
    writer wr;
    writer_start(&wr, fd, burst, len);
    int rc = cpt_recv_exact(fd, back, len);
    int wrc = writer_join(&wr);
    cp_service_stats st = cpt_stats(e->svc);
    cr_assert_eq(rc, 0, "burst %d: the replies stopped short (%d); sessions cut for overflow so far: %llu",
                 round, rc, (unsigned long long)st.by_reason[CP_REASON_SEND_OVERFLOW]);
    cr_assert_eq(wrc, 0, "burst %d: writing failed (%d)", round, wrc);
    cr_assert(memcmp(back, burst, len) == 0, "burst %d: the replies differ from the requests", round);
    free(back);
    cpt_close(fd);
}

/* The bug of issue 14: a client that wrote a 2 MB burst of 1 KiB packets
 * while reading every reply was cut on io_uring ("send queue limit exceeded"),
 * because one pass of the ring read far more of it than the session's send
 * queue could take. Default options: a 1 MiB send queue limit. */
Test(flow, burst_2mb_reading_client_not_cut, .timeout = 90)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 16, 0);
    static const uint16_t sizes[] = { 1024 };
    size_t len;
    uint8_t *burst = packets_make(sizes, 1, 2u << 20, &len, 1);
    for (int i = 0; i < 10; i++)
        burst_round(&e, burst, len, i);
    free(burst);
    cp_service_stats st = cpt_stats(e.svc);
    cr_assert_eq(st.by_reason[CP_REASON_SEND_OVERFLOW], 0);
    cr_assert_eq(atomic_load(&e.t->reasons[CP_REASON_SEND_OVERFLOW]), 0);
    cpt_env_stop(&e);
}

/* The same with packets of the two extreme sizes in turn: most receives end
 * inside a packet, and one packet is 64 KiB of queue. */
Test(flow, burst_4mb_of_tiny_and_largest_packets_not_cut, .timeout = 90)
{
    cp_server_opts o = { .session.max_packet = 65535 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 16, 0);
    static const uint16_t sizes[] = { 4, 65535 };
    size_t len;
    uint8_t *burst = packets_make(sizes, 2, 4u << 20, &len, 2);
    for (int i = 0; i < 5; i++)
        burst_round(&e, burst, len, i);
    free(burst);
    cp_service_stats st = cpt_stats(e.svc);
    cr_assert_eq(st.by_reason[CP_REASON_SEND_OVERFLOW], 0);
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ rate limit */

/* A client floods a server that allows R packets a second after a burst of
 * B: what the server handled stays within B + R * elapsed + one receive, and
 * not far below R * elapsed (the limit is not stricter than asked); the
 * flooder is not cut, only slowed down. */
Test(flow, rate_limit_throttles_without_cutting, .timeout = 30)
{
    enum { R = 2000, B = 1000, PKT = 128 };
    cp_server_opts o = { .session.recv_rate_packets = R, .session.recv_burst_packets = B };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 4, CPT_NO_ECHO);
    size_t clen;
    uint8_t *chunk = chunk_make(PKT, 128, &clen);
    uint64_t t0 = cpt_now_ns();
    int fd = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    flood f;
    flood_start(&f, fd, chunk, clen);
    cpt_sleep_ms(1500); /* a sleep: the window over which the rate is measured */
    long long n = rec_packets(&e);
    double el = secs_since(t0);
    int cut = atomic_load(&e.t->disconnected);
    long long sent = atomic_load(&f.sent) / PKT;
    flood_stop(&f);
    cpt_close(fd);
    long long most = B + (long long)(R * el) + ONE_RECEIVE / PKT;
    cr_assert_eq(cut, 0, "the flooder was cut (reason %d)", atomic_load(&e.t->recs[0].reason));
    cr_assert_leq(n, most, "%lld packets handled in %.2f s; the limit allows %lld (%lld sent)", n, el, most,
                  sent);
    cr_assert_geq(n, (long long)(R * el / 2), "only %lld packets handled in %.2f s at %d/s", n, el, R);
    free(chunk);
    cpt_env_stop(&e);
}

/* The other side of the limit: a client well under it is never held up. It
 * sends 400 packets at a quarter of the rate (burst only 10), and the server
 * has handled them all soon after the last one is sent; a limit several
 * times stricter than the one asked for would still be working through
 * them seconds later. The packets are large, so that one receive (consumed
 * whole, whatever the limit) cannot catch up a backlog of them. Scheduling
 * stalls on a loaded machine delay the client too, so they build no backlog.
 * (Not a test of the pause itself: without a limit this passes too.) */
Test(flow, rate_limit_leaves_a_client_under_it_alone, .timeout = 30)
{
    enum { R = 1000, B = 10, N = 400, PKT = 16384 };
    const unsigned gap_us = 4 * 1000000u / R;
    cp_server_opts o = { .session.recv_rate_packets = R,
                         .session.recv_burst_packets = B,
                         .session.max_packet = PKT };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 4, CPT_NO_ECHO);
    size_t len;
    uint8_t *pkt = chunk_make(PKT, 1, &len);
    int fd = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    uint64_t t0 = cpt_now_ns();
    for (int i = 0; i < N; i++) {
        cpt_xsend(fd, pkt, len);
        cpt_sleep_us(gap_us); /* a sleep: the client sends at a set pace */
    }
    double sending = secs_since(t0);
    uint64_t t1 = cpt_now_ns();
    CPT_AWAIT(rec_packets(&e) == N, 1500,
              "%lld of %d packets handled %.2f s after the last was sent (%.2f s of sending)",
              rec_packets(&e), N, secs_since(t1), sending);
    cr_assert_eq(atomic_load(&e.t->disconnected), 0);
    free(pkt);
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* The byte limit: as the packet one, counted in bytes read. */
Test(flow, rate_limit_bytes, .timeout = 30)
{
    enum { R = 256 * 1024, B = 64 * 1024, PKT = 128 };
    cp_server_opts o = { .session.recv_rate_bytes = R, .session.recv_burst_bytes = B };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 4, CPT_NO_ECHO);
    size_t clen;
    uint8_t *chunk = chunk_make(PKT, 128, &clen);
    uint64_t t0 = cpt_now_ns();
    int fd = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    flood f;
    flood_start(&f, fd, chunk, clen);
    cpt_sleep_ms(1500);                  /* a sleep: the window over which the rate is measured */
    long long n = rec_packets(&e) * PKT; /* bytes of whole packets: at most what was read */
    double el = secs_since(t0);
    int cut = atomic_load(&e.t->disconnected);
    flood_stop(&f);
    cpt_close(fd);
    long long most = B + (long long)(R * el) + ONE_RECEIVE;
    cr_assert_eq(cut, 0, "the flooder was cut (reason %d)", atomic_load(&e.t->recs[0].reason));
    cr_assert_leq(n, most, "%lld bytes handled in %.2f s; the limit allows %lld", n, el, most);
    cr_assert_geq(n, (long long)(R * el / 2), "only %lld bytes handled in %.2f s at %d/s", n, el, R);
    free(chunk);
    cpt_env_stop(&e);
}

/* Raw framing under a byte rate: an echo of 768 KiB at 512 KiB/s (burst
 * 128 KiB) comes back whole and in order, and takes about as long as the
 * limit says. */
Test(flow, raw_echo_under_byte_rate, .timeout = 30)
{
    enum { R = 512 * 1024, B = 128 * 1024, LEN = 768 * 1024 };
    cp_server_opts o = { .session.framing = CP_FRAMING_RAW,
                         .session.recv_rate_bytes = R,
                         .session.recv_burst_bytes = B };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 4, CPT_RAW);
    uint8_t *out = malloc(LEN), *back = malloc(LEN);
    cr_assert(out && back);
    cpt_fill(out, LEN, 0, 9);
    uint64_t t0 = cpt_now_ns();
    int fd = cpt_xconnect(e.sport);
    writer wr;
    writer_start(&wr, fd, out, LEN);
    int rc = cpt_recv_exact(fd, back, LEN);
    int wrc = writer_join(&wr);
    double el = secs_since(t0), least = (double)(LEN - B - ONE_RECEIVE) / R;
    cr_assert_eq(rc, 0, "the echo stopped short: %d", rc);
    cr_assert_eq(wrc, 0);
    cr_assert_eq(cpt_check_pattern(back, LEN, 0, 9), -1, "the echo differs");
    cr_assert_geq(el, least * 0.8, "%d bytes echoed in %.2f s: the limit allows no less than %.2f s", LEN, el,
                  least);
    cr_assert_eq(atomic_load(&e.t->disconnected), 0);
    free(out);
    free(back);
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ send-queue watermarks */

/* A server whose reply to every request is four times as large, and that
 * records the most bytes it saw queued on a session. */
enum { REQ = 1024, REPLY = 4096 };

typedef struct amp_ctx {
    cpt_track *t;
    atomic_llong max_queued;
    uint8_t reply[REPLY];
} amp_ctx;

static int amp_on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    cpt_on_packet(s, id, body, len);
    cpt_track *t = cp_session_ctx(s);
    amp_ctx *c = t->user;
    int rc = cp_session_send_copy(s, c->reply, REPLY);
    if (rc != 0 && rc != -ENOTCONN)
        atomic_fetch_add(&t->failures, 1);
    /* Handlers run on the session's worker, the only writer of its queue;
     * what it pins is what the watermarks and the limit count. */
    long long q = (long long)cp__sendq_mem(&s->sq);
    if (q > atomic_load(&c->max_queued))
        atomic_store(&c->max_queued, q);
    return 0;
}

static amp_ctx *amp_start(cpt_env *e, const cp_server_opts *o)
{
    amp_ctx *c = calloc(1, sizeof *c);
    cr_assert_not_null(c);
    cpt_put_header(c->reply, REPLY, 2);
    cpt_fill(c->reply + 4, REPLY - 4, 0, 3);
    cp_handlers h = cpt_track_handlers();
    h.on_packet = amp_on_packet;
    cpt_env_start(e, 2, o, &h, 4, CPT_NO_ECHO);
    c->t = e->t;
    e->t->user = c;
    return c;
}

/* The most a session's queue may hold under the watermark: the high
 * watermark (half the 1 MiB default limit) plus the replies to one receive. */
#define AMP_QUEUE_BOUND ((512u << 10) + (ONE_RECEIVE / REQ + 1) * REPLY)

/* A client writes requests as fast as it can while reading the (four times
 * larger) replies slowly: its requests wait in the kernel while the server's
 * queue is above the high watermark, so it is never cut, and the queue
 * stays well below its limit. Without the watermark the server reads every
 * request at once and the replies overflow the queue. */
Test(flow, watermark_pauses_reading_not_cutting, .timeout = 60)
{
    enum { N = 2048 };
    cpt_env e;
    amp_ctx *c = amp_start(&e, NULL);
    size_t len;
    uint8_t *reqs = chunk_make(REQ, N, &len);
    int fd = cpt_connect(CPT_HOST4, e.sport, 64 * 1024);
    cr_assert_geq(fd, 0);
    writer wr;
    writer_start(&wr, fd, reqs, len);
    uint8_t body[REPLY];
    int got = 0, rc = 0;
    for (; got < N; got++) {
        uint16_t id;
        size_t blen;
        if ((rc = cpt_recv_packet(fd, &id, body, sizeof body, &blen)) != 0)
            break;
        if (blen != REPLY - 4 || memcmp(body, c->reply + 4, blen) != 0) {
            rc = -EBADMSG;
            break;
        }
        if (got % 8 == 7)
            cpt_sleep_ms(1); /* a sleep: a slow reader, about 32 MB/s at most */
    }
    if (rc != 0)
        shutdown(fd, SHUT_RDWR); /* the writer may be blocked on a dead session */
    int wrc = writer_join(&wr);
    cr_assert_eq(rc, 0, "reply %d of %d: %d (reason %d)", got, N, rc, atomic_load(&e.t->recs[0].reason));
    cr_assert_eq(wrc, 0);
    cr_assert_eq(atomic_load(&e.t->disconnected), 0, "the slow reader was cut");
    long long maxq = atomic_load(&c->max_queued);
    cr_assert_leq(maxq, (long long)AMP_QUEUE_BOUND, "%lld bytes were queued (bound %u)", maxq,
                  (unsigned)AMP_QUEUE_BOUND);
    cpt_close(fd);
    free(reqs);
    cpt_env_stop(&e);
    free(c);
}

/* Replies 2048 times larger than the requests: 8 KiB for every empty 4-byte
 * packet. One 64 KiB receive holds 16,384 such requests, 128 MiB of replies:
 * handled whole, the first receive passed the 1 MiB limit at once and a
 * client that reads every reply was cut. A pause decided inside a receive
 * now stops it there (the rest waits in the backlog), so the queue stays
 * within one reply of the high watermark. */
enum { BIG_REPLY = 8192 };

typedef struct big_ctx {
    atomic_llong max_queued;
    uint8_t reply[BIG_REPLY];
} big_ctx;

static big_ctx big;

static int big_on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    cpt_on_packet(s, id, body, len);
    (void)cp_session_send_copy(s, big.reply, BIG_REPLY);
    long long q = (long long)cp__sendq_mem(&s->sq);
    if (q > atomic_load(&big.max_queued))
        atomic_store(&big.max_queued, q);
    return 0;
}

Test(flow, huge_amplification_reader_not_cut, .timeout = 60)
{
    enum { N = 4000 };
    memset(&big, 0, sizeof big);
    cpt_put_header(big.reply, BIG_REPLY, 2);
    cp_handlers h = cpt_track_handlers();
    h.on_packet = big_on_packet;
    cpt_env e;
    cpt_env_start(&e, 2, NULL, &h, 4, CPT_NO_ECHO);
    uint8_t *reqs = calloc(N, 4);
    cr_assert_not_null(reqs);
    for (int i = 0; i < N; i++)
        cpt_put_header(reqs + 4 * i, 4, 1);
    int fd = cpt_xconnect(e.sport);
    cpt_xsend(fd, reqs, 4 * N); /* all of it at once: 16 KB, a single receive */
    uint8_t body[BIG_REPLY];
    int got = 0, rc = 0;
    for (; got < N; got++) {
        uint16_t id;
        size_t blen;
        if ((rc = cpt_recv_packet(fd, &id, body, sizeof body, &blen)) != 0)
            break;
    }
    cr_assert_eq(rc, 0, "reply %d of %d: %d (reason %d)", got, N, rc, atomic_load(&e.t->recs[0].reason));
    cr_assert_eq(atomic_load(&e.t->disconnected), 0, "the reader was cut");
    long long maxq = atomic_load(&big.max_queued);
    cr_assert_leq(maxq, (long long)(512u << 10) + 2 * BIG_REPLY, "%lld bytes were queued", maxq);
    cpt_close(fd);
    free(reqs);
    cpt_env_stop(&e);
}

/* A low packet rate against one receive full of tiny packets: 16,000 4-byte
 * packets at once, at 10 a second with bursts of 20. Counted per receive,
 * all of them ran at once and the session then owed 27 minutes of silence;
 * now each packet is taken from the limit as it is handled, the rest wait,
 * and the rate holds from the first receive. */
Test(flow, rate_limit_holds_inside_one_receive, .timeout = 30)
{
    enum { R = 10, B = 20, N = 16000 };
    cp_server_opts o = { .session.recv_rate_packets = R, .session.recv_burst_packets = B };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 4, CPT_NO_ECHO);
    uint8_t *reqs = calloc(N, 4);
    cr_assert_not_null(reqs);
    for (int i = 0; i < N; i++)
        cpt_put_header(reqs + 4 * i, 4, 1);
    int fd = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    uint64_t t0 = cpt_now_ns();
    cpt_xsend(fd, reqs, 4 * N);
    CPT_AWAIT(rec_packets(&e) >= B, 5000, "the burst was not handled: %lld", rec_packets(&e));
    cpt_sleep_ms(1500); /* a sleep: the window over which the rate must hold */
    long long n = rec_packets(&e);
    double el = secs_since(t0);
    cr_assert_leq(n, B + (long long)(R * el) + 2, "%lld packets handled in %.2f s at %d/s, burst %d", n, el,
                  R, B);
    cr_assert_geq(n, B + (long long)(R * (el - 1.0) / 2), "only %lld packets in %.2f s", n, el);
    cr_assert_eq(atomic_load(&e.t->disconnected), 0);
    cpt_close(fd);
    free(reqs);
    cpt_env_stop(&e);
}

/* A client that writes requests and never reads a reply: it is stalled, not
 * cut. Its session stops being read at the high watermark, its own sends
 * block, and the server's queue stays where it stopped. */
Test(flow, watermark_stalls_a_client_that_never_reads, .timeout = 30)
{
    cpt_env e;
    amp_ctx *c = amp_start(&e, NULL);
    size_t clen;
    uint8_t *chunk = chunk_make(REQ, 16, &clen);
    int fd = cpt_connect(CPT_HOST4, e.sport, 64 * 1024);
    cr_assert_geq(fd, 0);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    flood f;
    flood_start(&f, fd, chunk, clen);
    cpt_sleep_ms(1500); /* a sleep: the flood runs long enough to reach the watermark and stay there */
    int cut = atomic_load(&e.t->disconnected);
    long long handled = rec_packets(&e), sent = atomic_load(&f.sent);
    long long maxq = atomic_load(&c->max_queued);
    flood_stop(&f);
    cpt_close(fd);
    cr_assert_eq(cut, 0, "the client was cut (reason %d) after %lld requests",
                 atomic_load(&e.t->recs[0].reason), handled);
    cr_assert_leq(maxq, (long long)AMP_QUEUE_BOUND, "%lld bytes were queued", maxq);
    cr_assert_gt(handled, 0);
    cr_assert_lt(sent, 64ll << 20, "the client wrote %lld bytes without being pushed back", sent);
    free(chunk);
    cpt_env_stop(&e);
    free(c);
}

/* The watermark does not remove the limit: a client that never reads while
 * the server keeps sending to it (and keeps sending requests itself, so its
 * receive is paused by the watermark) is still cut at the limit. */
Test(flow, a_client_that_never_reads_is_still_cut_at_the_limit, .timeout = 30)
{
    cpt_env e;
    amp_ctx *c = amp_start(&e, NULL);
    size_t clen;
    uint8_t *chunk = chunk_make(REQ, 16, &clen);
    int fd = cpt_connect(CPT_HOST4, e.sport, 64 * 1024);
    cr_assert_geq(fd, 0);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    flood f;
    flood_start(&f, fd, chunk, clen);
    uint64_t id = e.t->recs[0].id, deadline = cpt_now_ms() + 10000;
    cp_sendbuf *b = cp_packet_make(3, c->reply + 4, REPLY - 4);
    cr_assert_not_null(b);
    while (atomic_load(&e.t->disconnected) == 0 && cpt_now_ms() < deadline) {
        if (cp_service_send_to(e.svc, id, b) != 0)
            break;
        cpt_sleep_us(100); /* a sleep: paces the server's sends */
    }
    cp_sendbuf_unref(b);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 5000, "the client that never reads was not cut");
    flood_stop(&f);
    cpt_close(fd);
    cr_assert_eq(atomic_load(&e.t->recs[0].reason), CP_REASON_SEND_OVERFLOW, "cut for reason %d",
                 atomic_load(&e.t->recs[0].reason));
    free(chunk);
    cpt_env_stop(&e);
    free(c);
}

/* ------------------------------------------------------------------ pauses and timeouts */

/* One worker, one session flooding pkt-byte packets for 1.5 s under the
 * options o (a rate limit that pauses it): what was cut and handled then.
 * The flood is still running; the caller stops it and frees the chunk. */
typedef struct paused_flood {
    flood f;
    int fd, cut;
    long long handled;
    uint8_t *chunk;
} paused_flood;

static void paused_flood_run(paused_flood *p, cpt_env *e, const cp_server_opts *o, uint16_t pkt)
{
    cpt_env_start(e, 1, o, NULL, 4, CPT_NO_ECHO);
    size_t clen;
    p->chunk = chunk_make(pkt, 16, &clen);
    p->fd = cpt_xconnect(e->sport);
    CPT_AWAIT(atomic_load(&e->t->connected) == 1, 5000, "not connected");
    flood_start(&p->f, p->fd, p->chunk, clen);
    cpt_sleep_ms(1500); /* a sleep: the paused session is flooded for this window */
    p->cut = atomic_load(&e->t->disconnected);
    p->handled = rec_packets(e);
}

/* A flooder of whole packets on a session paused by its rate limit for much
 * longer than the packet timeout: most receives end inside a packet (1028
 * bytes do not divide a read), and that packet cannot be finished while the
 * session is not read, so the pause must not count against it. */
Test(flow, pause_does_not_count_against_packet_timeout, .timeout = 30)
{
    enum { R = 100, B = 20, PKT = 1028 };
    cp_server_opts o = { .session.recv_rate_packets = R,
                         .session.recv_burst_packets = B,
                         .session.packet_timeout_ms = 100 };
    cpt_env e;
    paused_flood p;
    paused_flood_run(&p, &e, &o, PKT);
    int fd = p.fd, cut = p.cut;
    long long handled = p.handled;
    uint8_t *chunk = p.chunk;
    flood_stop(&p.f);
    cpt_close(fd);
    cr_assert_eq(cut, 0, "cut (reason %d) after %lld packets", atomic_load(&e.t->recs[0].reason), handled);
    /* The session was paused: one receive is far more than 1.5 s allows. */
    cr_assert_leq(handled, B + R * 2 + ONE_RECEIVE / PKT);
    /* The timeout still works for a peer that stops inside a packet. */
    int fd2 = cpt_xconnect(e.sport);
    uint8_t half[16] = { 0 };
    cpt_put_header(half, 100, 1);
    cpt_xsend(fd2, half, sizeof half);
    CPT_AWAIT(atomic_load(&e.t->reasons[CP_REASON_PACKET_TIMEOUT]) == 1, 3000,
              "a packet left unfinished was not timed out");
    cpt_close(fd2);
    free(chunk);
    cpt_env_stop(&e);
}

/* A session paused by its rate limit for longer than the idle timeout is not
 * idle: it is we who do not read it. One worker, so a stuck worker shows as
 * a neighbour that is not served. */
Test(flow, idle_timeout_not_fired_by_rate_pause, .timeout = 30)
{
    enum { R = 50, B = 10, PKT = 1028 };
    cp_server_opts o = { .session.recv_rate_packets = R,
                         .session.recv_burst_packets = B,
                         .session.idle_timeout_ms = 200 };
    cpt_env e;
    paused_flood p;
    paused_flood_run(&p, &e, &o, PKT);
    int fd = p.fd, cut = p.cut;
    long long handled = p.handled;
    uint8_t *chunk = p.chunk;
    /* The worker still serves others (it is not spinning on the timer). */
    int fd2 = cpt_xconnect(e.sport);
    cpt_set_rcvtimeo(fd2, 2000);
    uint8_t ping[4];
    cpt_put_header(ping, 4, 5);
    cpt_xsend(fd2, ping, sizeof ping);
    CPT_AWAIT(atomic_load(&e.t->packets) > handled, 2000, "the worker no longer serves a second session");
    cpt_close(fd2);
    flood_stop(&p.f);
    cpt_close(fd);
    cr_assert_eq(cut, 0, "cut (reason %d) after %lld packets", atomic_load(&e.t->recs[0].reason), handled);
    cr_assert_leq(handled, B + R * 2 + ONE_RECEIVE / PKT, "the session was never paused");
    free(chunk);
    cpt_env_stop(&e);
}

/* A session paused with its peer's close already received (io_uring holds
 * such completions back until the resume) must still finish when it is
 * closed during the pause: here by stopping the service. The packets fit
 * one receive and are more than the burst, so the first receive pauses the
 * session; whether the close was received right behind them, and held, is
 * up to the kernel's timing, hence several sessions. */
Test(flow, stop_while_a_paused_session_holds_its_peers_close, .timeout = 30)
{
    enum { R = 10, B = 1, PKT = 1028, N = 20, C = 8 };
    cp_server_opts o = { .session.recv_rate_packets = R, .session.recv_burst_packets = B };
    cpt_env e;
    cpt_env_start(&e, 1, &o, NULL, C, CPT_NO_ECHO);
    size_t len;
    uint8_t *data = chunk_make(PKT, N, &len);
    int fd[C];
    for (int i = 0; i < C; i++) {
        fd[i] = cpt_xconnect(e.sport);
        /* All of it and the FIN are there before the session's first receive. */
        cpt_xsend(fd[i], data, len);
        shutdown(fd[i], SHUT_WR);
    }
    CPT_AWAIT(atomic_load(&e.t->packets) >= C, 5000, "not every session was read");
    cpt_sleep_ms(200); /* a sleep: a close seen while paused would show in this window */
    cr_assert_eq(atomic_load(&e.t->disconnected), 0, "a close was seen: a session was not paused");
    uint64_t t0 = cpt_now_ms();
    cpt_xstop(e.svc);
    e.svc = NULL;
    cr_assert_lt(cpt_now_ms() - t0, 2000);
    for (int i = 0; i < C; i++)
        cpt_close(fd[i]);
    free(data);
    cpt_track_stopped(e.t);
    cpt_track_xcheck(e.t);
    cpt_track_free(e.t);
    cpt_xport_destroy(e.port);
    cpt_leak_end(&e.leak);
}
