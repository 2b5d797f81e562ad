/* SPDX-License-Identifier: MIT */
/*
 * What a session's send queue keeps in memory (cport issue 14): the limit
 * counts what queued buffers pin, not their bytes; a queue behind a client
 * that does not read keeps no shared chunk alive and holds tiny packets at
 * about their size; a drained burst leaves nothing behind; a reader that
 * keeps up is never cut.
 *
 * The queue's numbers are read on the session's worker through a post
 * (internal.h); the memory the process really holds is the heap in use
 * (Linux only: elsewhere those checks are skipped).
 */
#include "helpers.h"
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ probes */

typedef struct probe {
    atomic_int done;
    int connected;
    size_t mem, bytes;
    size_t pinned; /* what the queued entries really keep alive, counted here */
    uint32_t count, cap;
    size_t idle; /* what the session itself takes: its struct and what it allocated */
} probe;

/* Walks the queue: distinct chunks, other allocations, the ring. */
static size_t really_pinned(const cp_sendq *q)
{
    enum { MAXC = 4096 };
    static const void *seen[MAXC];
    size_t n = 0, sum = q->cap * sizeof *q->ring;
    for (uint32_t i = 0; i < q->count; i++) {
        /* Without a ring, the one entry is in place of its pointer (sendq.c);
         * the low three bits are tags. */
        uintptr_t v = q->cap ? q->ring[(q->head + i) & (q->cap - 1)] : q->one;
        const cp_sendbuf *b = (const cp_sendbuf *)(v & ~(uintptr_t)7);
        if (!b->chunk) {
            sum += cp__sendbuf_charge(b);
            continue;
        }
        size_t k = 0;
        while (k < n && seen[k] != b->chunk)
            k++;
        if (k == n && n < MAXC) {
            seen[n++] = b->chunk;
            sum += cp__sendbuf_charge(b);
        }
    }
    return sum;
}

static void probe_fn(cp_session *s, void *arg)
{
    probe *p = arg;
    p->pinned = really_pinned(&s->sq);
    p->connected = cp_session_connected(s);
    p->mem = cp__sendq_mem(&s->sq);
    p->bytes = s->sq.bytes;
    p->count = s->sq.count;
    p->cap = s->sq.cap;
    /* The held list's entries are a pointer and two words (16 bytes). */
    p->idle = sizeof *s + s->sq.cap * sizeof *s->sq.ring + s->capheld * 16u +
              s->capgroups * sizeof *s->groups + s->carry_cap;
    atomic_store(&p->done, 1);
}

/* The queue of s as its worker sees it now. */
static probe xprobe(cp_session *s)
{
    probe p;
    memset(&p, 0, sizeof p);
    cr_assert_eq(cp_session_post(s, probe_fn, &p), 0, "the session is gone");
    CPT_AWAIT(atomic_load(&p.done), 5000, "the probe did not run");
    cr_assert_geq(p.mem, p.pinned, "the queue accounts %zu bytes and pins %zu", p.mem, p.pinned);
    return p;
}

/* Memory in use now, in bytes: malloc's heap but for the free buffers
 * sendbuf.c keeps in its pools, plus the runs of pages the send path took
 * from the page cache (chunks, queue blocks and big rings: pages.c) and has
 * not given back; 0 where it is not measured. */
static size_t heap_now(void)
{
#ifdef __linux__
    size_t h = cpt_heap_in_use();
    return h ? h - cp__sendbuf_pooled() + cp__pages_in_use() : 0;
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------ sending on the worker */

/* Queues a 64 KiB buffer on s unless that much is queued already. */
static void big_fn(cp_session *s, void *arg)
{
    atomic_int *done = arg;
    if (s->sq.bytes < (64u << 10)) {
        cp_sendbuf *b = cp_sendbuf_open(64u << 10);
        memset(cp_sendbuf_data(b), 0, 64u << 10);
        cp_sendbuf_close(b, 64u << 10);
        cp_session_send(s, b);
        cp_sendbuf_unref(b);
    }
    atomic_store(done, 1);
}

/* Sends big buffers to s (whose client never reads) until the kernel takes
 * no more: bytes stay queued. What is queued next stays in the queue. */
static void fill_socket(cp_session *s)
{
    int full = 0;
    for (int k = 0; k < 2000 && full < 3; k++) {
        atomic_int done;
        atomic_init(&done, 0);
        cr_assert_eq(cp_session_post(s, big_fn, &done), 0);
        CPT_AWAIT(atomic_load(&done), 5000, "the post did not run");
        cpt_sleep_ms(5); /* a sleep: a socket with room would take the queued bytes in this window */
        full = xprobe(s).bytes ? full + 1 : 0;
    }
    cr_assert_eq(full, 3, "the socket never filled up");
}

/* A batch of sends run on the session's worker. */
typedef struct batch {
    int packets;      /* 4-byte packets to send */
    int churn;        /* after each, this many 4000-byte buffers are made and dropped */
    atomic_int *left; /* batches still to run */
    atomic_int *refused;
} batch;

static void batch_fn(cp_session *s, void *arg)
{
    batch *b = arg;
    static const uint8_t junk[4000];
    for (int i = 0; i < b->packets; i++) {
        cp_sendbuf *p = cp_packet_make(7, NULL, 0);
        if (!p || cp_session_send(s, p) != 0)
            atomic_fetch_add(b->refused, 1);
        cp_sendbuf_unref(p);
        for (int k = 0; k < b->churn; k++)
            cp_sendbuf_unref(cp_sendbuf_copy(junk, sizeof junk));
    }
    atomic_fetch_sub(b->left, 1);
}

/* Posts `posts` batches to each session in turn (one batch per round or so,
 * so that the queues are written, fill the sockets and stay backed up) and
 * waits until all of them have run. */
static void run_batches(cp_session **s, int nsess, int posts, int packets, int churn, atomic_int *refused)
{
    atomic_int left;
    atomic_init(&left, posts * nsess);
    batch b = { .packets = packets, .churn = churn, .left = &left, .refused = refused };
    for (int k = 0; k < posts; k++) {
        for (int i = 0; i < nsess; i++)
            cr_assert_eq(cp_session_post(s[i], batch_fn, &b), 0);
        if (k % 8 == 7)
            cpt_sleep_ms(1); /* a sleep: paces the posts, one batch per round or so */
    }
    CPT_AWAIT(atomic_load(&left) == 0, 20000, "%d batches did not run", atomic_load(&left));
}

/* ------------------------------------------------------------------ pinning */

/* Two clients that never read (their sockets full) get one 4-byte packet at a time, while the
 * worker carves and drops 36 KB of other buffers between two of them, so
 * each tiny packet comes from a chunk of its own. Queued as they are, 2000
 * of them would keep 2000 chunks (64 MiB) alive while counting 8 KB; the
 * queue must count the chunks and copy the packets out, releasing them. */
Test(send_memory, queued_tiny_packets_pin_no_chunks, .timeout = 60)
{
    enum { NS = 2, POSTS = 200, PER = 10, CHURN = 9 };
    const size_t limit = 1u << 20;
    cp_server_opts o = { .session.send_queue_limit = limit };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, NS, CPT_KEEP_REFS | CPT_NO_ECHO);
    int fd[NS];
    for (int i = 0; i < NS; i++)
        cr_assert_geq(fd[i] = cpt_connect(CPT_HOST4, e.sport, 4096), 0);
    CPT_AWAIT(atomic_load(&e.t->connected) == NS, 5000, "not connected");
    cp_session *s[NS];
    for (int i = 0; i < NS; i++)
        fill_socket(s[i] = e.t->recs[i].s);
    size_t heap0 = heap_now();

    atomic_int refused;
    atomic_init(&refused, 0);
    run_batches(s, NS, POSTS, PER, CHURN, &refused);
    cr_assert_eq(atomic_load(&refused), 0, "%d tiny packets refused: the queues were cut",
                 atomic_load(&refused));
    for (int i = 0; i < NS; i++) {
        probe p = xprobe(s[i]);
        cr_assert(p.connected, "session %d was cut holding %zu bytes", i, p.bytes);
        cr_assert_leq(p.mem, limit, "session %d accounts %zu bytes, past the limit", i, p.mem);
        cr_assert_geq(p.mem, p.bytes, "session %d accounts %zu bytes for %zu queued", i, p.mem, p.bytes);
    }
    size_t heap1 = heap_now();
    if (heap0 && heap1) {
        /* What the queues may hold (2 x the limit), the pool's churn, slack. */
        size_t grew = heap1 > heap0 ? heap1 - heap0 : 0;
        cr_assert_lt(grew, NS * 2 * limit + (4u << 20),
                     "the heap grew by %zu KiB while %d sessions held %d tiny packets", grew >> 10, NS,
                     POSTS * PER);
    }
    for (int i = 0; i < NS; i++)
        cpt_close(fd[i]);
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ tiny packets */

/* Four clients that never read (their sockets full) get 30,000 4-byte
 * packets each (120 KB, under the 256 KiB limit). Each queued packet used to
 * cost a 32-byte buffer and an 8-byte ring slot: 1.2 MB per session for
 * 120 KB counted. Now the queue
 * holds them at about their size, and what it accounts is what the heap
 * holds. */
Test(send_memory, tiny_packets_cost_about_their_size, .timeout = 60)
{
    enum { NS = 4, POSTS = 200, PER = 150 };
    const size_t limit = 256u << 10;
    cp_server_opts o = { .session.send_queue_limit = limit };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, NS, CPT_KEEP_REFS | CPT_NO_ECHO);
    int fd[NS];
    for (int i = 0; i < NS; i++)
        cr_assert_geq(fd[i] = cpt_connect(CPT_HOST4, e.sport, 4096), 0);
    CPT_AWAIT(atomic_load(&e.t->connected) == NS, 5000, "not connected");
    cp_session *s[NS];
    size_t before[NS];
    for (int i = 0; i < NS; i++) {
        fill_socket(s[i] = e.t->recs[i].s);
        before[i] = xprobe(s[i]).bytes;
    }
    size_t heap0 = heap_now();

    atomic_int refused;
    atomic_init(&refused, 0);
    run_batches(s, NS, POSTS, PER, 0, &refused);
    cr_assert_eq(atomic_load(&refused), 0, "%d tiny packets refused", atomic_load(&refused));
    size_t queued = 0;
    for (int i = 0; i < NS; i++) {
        probe p = xprobe(s[i]);
        cr_assert(p.connected);
        cr_assert_leq(p.mem, limit);
        cr_assert_geq(p.mem, p.bytes);
        /* Coalesced: a handful of entries, not one per packet. */
        cr_assert_lt(p.count, p.bytes / 64 + 64, "session %d: %u entries for %zu bytes", i, p.count, p.bytes);
        queued += p.bytes - before[i];
    }
    cr_assert_eq(queued, (size_t)NS * POSTS * PER * 4, "%zu bytes of tiny packets queued", queued);
    size_t heap1 = heap_now();
    if (heap0 && heap1) {
        size_t grew = heap1 > heap0 ? heap1 - heap0 : 0;
        cr_assert_lt(grew, NS * 2 * limit, "the heap grew by %zu KiB for %zu KiB of tiny packets queued",
                     grew >> 10, queued >> 10);
    }
    for (int i = 0; i < NS; i++)
        cpt_close(fd[i]);
    cpt_env_stop(&e);
}

/* A client that never reads, fed 4-byte packets until its queue is cut: the
 * cut comes when about limit bytes are queued (the packets are copied out
 * of their chunks, so each costs its size), not after limit / 32 KiB
 * packets, and the queue never accounts more than the limit. */
typedef struct fill {
    size_t limit;
    size_t max_mem;
    long accepted;
    atomic_int done;
} fill;

static void fill_fn(cp_session *s, void *arg)
{
    fill *f = arg;
    for (int i = 0; i < 1000; i++) {
        cp_sendbuf *p = cp_packet_make(7, NULL, 0);
        int rc = cp_session_send(s, p);
        cp_sendbuf_unref(p);
        if (rc != 0) {
            atomic_store(&f->done, 1);
            return;
        }
        f->accepted++;
        if (cp__sendq_mem(&s->sq) > f->max_mem)
            f->max_mem = cp__sendq_mem(&s->sq);
    }
    if (cp_session_post(s, fill_fn, f) != 0)
        atomic_store(&f->done, 1);
}

Test(send_memory, never_reading_client_is_cut_by_what_its_queue_holds, .timeout = 60)
{
    const size_t limit = 64u << 10;
    cp_server_opts o = { .session.send_queue_limit = limit };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 2, CPT_KEEP_REFS | CPT_NO_ECHO);
    int fd = cpt_connect(CPT_HOST4, e.sport, 4096);
    cr_assert_geq(fd, 0);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    fill f = { .limit = limit };
    cr_assert_eq(cp_session_post(e.t->recs[0].s, fill_fn, &f), 0);
    CPT_AWAIT(atomic_load(&f.done), 20000, "%ld packets accepted and still not cut", f.accepted);
    CPT_AWAIT(atomic_load(&e.t->recs[0].disconnected) == 1, 5000, "not disconnected");
    cr_assert_eq(atomic_load(&e.t->recs[0].reason), CP_REASON_SEND_OVERFLOW, "reason %s",
                 cp_reason_str((cp_reason)atomic_load(&e.t->recs[0].reason)));
    cr_assert_leq(f.max_mem, limit, "the queue accounted %zu bytes", f.max_mem);
    cr_assert_geq(f.accepted, (long)(limit / 8), "cut after %ld packets of 4 bytes", f.accepted);
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ after a burst */

/* One shared 4-byte buffer queued 20,000 times in one round (under a large
 * limit nothing is copied), then written and read: the ring that held them
 * is freed, and the idle session is back under 1 KiB. */
typedef struct burst {
    cp_sendbuf *b;
    int n;
    atomic_int done;
} burst;

static void burst_fn(cp_session *s, void *arg)
{
    burst *u = arg;
    for (int i = 0; i < u->n; i++)
        cp_session_send(s, u->b);
    atomic_store(&u->done, 1);
}

Test(send_memory, drained_burst_leaves_an_idle_session_small, .timeout = 60)
{
    enum { N = 20000 };
    cp_server_opts o = { .session.send_queue_limit = 64u << 20 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 2, CPT_KEEP_REFS | CPT_NO_ECHO);
    int fd = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    cp_session *s = e.t->recs[0].s;
    burst u = { .b = cp_packet_make(7, NULL, 0), .n = N };
    cr_assert_eq(cp_session_post(s, burst_fn, &u), 0);
    CPT_AWAIT(atomic_load(&u.done), 5000, "the burst did not run");
    uint8_t *buf = malloc(4 * N);
    cr_assert_eq(cpt_recv_exact(fd, buf, 4 * N), 0, "the burst did not arrive");
    free(buf);
    cp_sendbuf_unref(u.b);
    probe p;
    uint64_t until = cpt_now_ms() + 5000;
    do /* the last write's completion may land after the client read it */
        p = xprobe(s);
    while (p.count && cpt_now_ms() < until);
    cr_assert_eq(p.count, 0);
    cr_assert_leq(p.cap, 32, "the emptied queue kept a ring of %u places", p.cap);
    cr_assert_eq(p.mem, p.cap * sizeof(uintptr_t), "the emptied queue accounts %zu bytes", p.mem);
    cr_assert_leq(p.idle, 1024, "an idle session takes %zu bytes (its struct: %zu)", p.idle,
                  sizeof(cp_session));
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* Many small packets from two user threads at once (their messages arrive
 * out of order, so the held list grows too), then drained: every session's
 * queue, ring and held list are back to idle size. */
typedef struct flood {
    cp_session **s;
    int nsess, n;
} flood;

static void *flood_main(void *arg)
{
    flood *f = arg;
    for (int i = 0; i < f->n; i++) {
        cp_sendbuf *b = cp_packet_make(7, NULL, 0);
        for (int k = 0; k < f->nsess; k++)
            cp_session_send(f->s[k], b);
        cp_sendbuf_unref(b);
    }
    return NULL;
}

Test(send_memory, sessions_are_idle_size_after_a_burst_from_threads, .timeout = 60)
{
    enum { NS = 8, T = 2, N = 20000 };
    cp_server_opts o = { .session.send_queue_limit = 1u << 20 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, NS, CPT_KEEP_REFS | CPT_NO_ECHO);
    int fd[NS];
    cp_session *s[NS];
    for (int i = 0; i < NS; i++)
        fd[i] = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == NS, 5000, "not connected");
    for (int i = 0; i < NS; i++)
        s[i] = e.t->recs[i].s;
    flood f = { .s = s, .nsess = NS, .n = N };
    pthread_t th[T];
    for (int i = 0; i < T; i++)
        pthread_create(&th[i], NULL, flood_main, &f);
    for (int i = 0; i < T; i++)
        pthread_join(th[i], NULL);
    uint8_t *buf = malloc(4 * N * T);
    for (int i = 0; i < NS; i++)
        cr_assert_eq(cpt_recv_exact(fd[i], buf, 4 * N * T), 0, "session %d: the burst did not arrive", i);
    free(buf);
    for (int i = 0; i < NS; i++) {
        probe p;
        uint64_t until = cpt_now_ms() + 5000;
        do
            p = xprobe(s[i]);
        while (p.count && cpt_now_ms() < until);
        cr_assert(p.connected, "session %d was cut", i);
        cr_assert_eq(p.count, 0);
        cr_assert_leq(p.idle, 1024, "session %d takes %zu bytes idle (its struct: %zu)", i, p.idle,
                      sizeof(cp_session));
    }
    for (int i = 0; i < NS; i++)
        cpt_close(fd[i]);
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ readers that keep up */

/* 2 MB of 1 KiB packets echoed to a client that reads all the while and
 * keeps at most 512 KiB unanswered: the echoes come from shared chunks, and
 * however they queue up (with io_uring a whole window's echoes can be
 * queued in one round) the reader is never cut by the default 1 MiB
 * limit. */
typedef struct reader {
    int fd;
    uint8_t *buf;
    size_t want;
    atomic_size_t got;
    ssize_t rc; /* the failed receive's */
} reader;

/* Reads the echoes as fast as they come, in big pieces. */
static void *reader_main(void *arg)
{
    reader *r = arg;
    size_t got = 0;
    while (got < r->want) {
        size_t n = r->want - got < (64u << 10) ? r->want - got : (64u << 10);
        if ((r->rc = cpt_recv_some(r->fd, r->buf + got, n)) <= 0)
            return NULL;
        got += (size_t)r->rc;
        atomic_store(&r->got, got);
    }
    return NULL;
}

Test(send_memory, reader_that_keeps_up_is_never_cut, .timeout = 60)
{
    enum { N = 2048, BODY = 1020, SIZE = BODY + 4 };
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 2, 0);
    int fd = cpt_xconnect(e.sport);
    reader r = { .fd = fd, .buf = malloc((size_t)N * SIZE), .want = (size_t)N * SIZE };
    cr_assert_not_null(r.buf);
    pthread_t th;
    pthread_create(&th, NULL, reader_main, &r);
    uint8_t body[BODY];
    for (int i = 0; i < N; i++) {
        uint64_t until = cpt_now_ms() + 10000;
        while ((size_t)i * SIZE - atomic_load(&r.got) > (512u << 10) && cpt_now_ms() < until)
            cpt_sleep_us(100);
        cpt_fill(body, sizeof body, (uint64_t)i * BODY, 3);
        cr_assert_eq(cpt_send_packet(fd, (uint16_t)(i & 0x7fff), body, sizeof body), 0, "send %d failed", i);
    }
    pthread_join(th, NULL);
    cr_assert_eq(atomic_load(&r.got), r.want, "%zu of %zu echoed bytes arrived (receive: %zd; server: %s)",
                 atomic_load(&r.got), r.want, r.rc,
                 atomic_load(&e.t->disconnected) ? cp_reason_str((cp_reason)atomic_load(&e.t->recs[0].reason))
                                                 : "connected");
    for (int i = 0; i < N; i++) {
        const uint8_t *p = r.buf + (size_t)i * SIZE;
        cr_assert(p[0] == (SIZE & 0xff) && p[1] == (SIZE >> 8) && p[2] == (i & 0xff) &&
                      p[3] == ((i >> 8) & 0x7f),
                  "echo %d: bad header", i);
        cr_assert_eq(cpt_check_pattern(p + 4, BODY, (uint64_t)i * BODY, 3), -1, "echo %d: bad body", i);
    }
    free(r.buf);
    cr_assert_eq(atomic_load(&e.t->disconnected), 0);
    cpt_close(fd);
    cpt_env_stop(&e);
}
