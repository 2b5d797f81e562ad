/* SPDX-License-Identifier: MIT */
/*
 * Send buffers: open/close from the per-thread chunk, copies, packet buffers,
 * reference counting across threads, chunk recycling while buffers live.
 * No sockets: runs once.
 */
#include "helpers.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

Test(sendbuf, open_write_close_keeps_written_bytes, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_sendbuf *b = cp_sendbuf_open(100);
    cr_assert_not_null(b);
    uint8_t *d = cp_sendbuf_data(b);
    cr_assert_not_null(d);
    memset(d, 'a', 100); /* the whole capacity is writable */
    memcpy(d, "hello", 5);
    cp_sendbuf_close(b, 5);
    cr_assert_eq(cp_sendbuf_len(b), 5);
    cr_assert_eq(memcmp(cp_sendbuf_data(b), "hello", 5), 0);
    cp_sendbuf_unref(b);

    b = cp_sendbuf_open(64);
    cr_assert_not_null(b);
    cp_sendbuf_close(b, 0);
    cr_assert_eq(cp_sendbuf_len(b), 0);
    cp_sendbuf_unref(b);
    cpt_leak_end(&leak);
}

/* Consecutive buffers of one chunk never overlap, also when the first was
 * closed shorter than its capacity. */
Test(sendbuf, consecutive_buffers_do_not_overlap, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    enum { N = 64 };
    cp_sendbuf *bs[N];
    for (int i = 0; i < N; i++) {
        size_t cap = 16 + (size_t)i * 37;
        bs[i] = cp_sendbuf_open(cap);
        cr_assert_not_null(bs[i]);
        memset(cp_sendbuf_data(bs[i]), 0xEE, cap);
        size_t len = cap / 2 + 1;
        cpt_fill(cp_sendbuf_data(bs[i]), len, 0, (uint32_t)i);
        cp_sendbuf_close(bs[i], len);
    }
    for (int i = 0; i < N; i++) {
        size_t len = (16 + (size_t)i * 37) / 2 + 1;
        cr_assert_eq(cp_sendbuf_len(bs[i]), len);
        cr_assert_eq(cpt_check_pattern(cp_sendbuf_data(bs[i]), len, 0, (uint32_t)i), -1,
                     "buffer %d was overwritten by a later one", i);
        cp_sendbuf_unref(bs[i]);
    }
    cpt_leak_end(&leak);
}

Test(sendbuf, copy_holds_a_copy, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    uint8_t src[300];
    cpt_fill(src, sizeof src, 0, 1);
    cp_sendbuf *b = cp_sendbuf_copy(src, sizeof src);
    cr_assert_not_null(b);
    memset(src, 0, sizeof src);
    cr_assert_eq(cp_sendbuf_len(b), 300);
    cr_assert_eq(cpt_check_pattern(cp_sendbuf_data(b), 300, 0, 1), -1);
    cp_sendbuf_unref(b);

    b = cp_sendbuf_copy("", 0);
    cr_assert_not_null(b);
    cr_assert_eq(cp_sendbuf_len(b), 0);
    cp_sendbuf_unref(b);
    cpt_leak_end(&leak);
}

/* Buffers larger than any chunk: a 1 MiB open and a 4 MiB copy. */
Test(sendbuf, large_buffers, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    size_t big = 4u << 20;
    uint8_t *src = malloc(big);
    cr_assert_not_null(src);
    cpt_fill(src, big, 0, 2);
    cp_sendbuf *c = cp_sendbuf_copy(src, big);
    cr_assert_not_null(c);
    free(src);
    cp_sendbuf *o = cp_sendbuf_open(1u << 20);
    cr_assert_not_null(o);
    cpt_fill(cp_sendbuf_data(o), 1u << 20, 0, 3);
    cp_sendbuf_close(o, 1u << 20);
    cp_sendbuf *small = cp_sendbuf_copy("x", 1);
    cr_assert_eq(cp_sendbuf_len(c), big);
    cr_assert_eq(cpt_check_pattern(cp_sendbuf_data(c), big, 0, 2), -1);
    cr_assert_eq(cp_sendbuf_len(o), 1u << 20);
    cr_assert_eq(cpt_check_pattern(cp_sendbuf_data(o), 1u << 20, 0, 3), -1);
    cr_assert_eq(cp_sendbuf_data(small)[0], 'x');
    cp_sendbuf_unref(c);
    cp_sendbuf_unref(o);
    cp_sendbuf_unref(small);
    cpt_leak_end(&leak);
}

Test(sendbuf, packet_make_writes_little_endian_header, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_sendbuf *b = cp_packet_make(0x1234, "abc", 3);
    cr_assert_not_null(b);
    cr_assert_eq(cp_sendbuf_len(b), 7);
    const uint8_t *d = cp_sendbuf_data(b);
    cr_assert(d[0] == 7 && d[1] == 0 && d[2] == 0x34 && d[3] == 0x12, "header %02x %02x %02x %02x", d[0],
              d[1], d[2], d[3]);
    cr_assert_eq(memcmp(d + 4, "abc", 3), 0);
    cp_sendbuf_unref(b);

    b = cp_packet_make(65535, NULL, 0);
    cr_assert_not_null(b);
    cr_assert_eq(cp_sendbuf_len(b), 4);
    d = cp_sendbuf_data(b);
    cr_assert(d[0] == 4 && d[1] == 0 && d[2] == 0xff && d[3] == 0xff);
    cp_sendbuf_unref(b);
    cpt_leak_end(&leak);
}

Test(sendbuf, packet_make_size_limit, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    uint8_t *body = malloc(70000);
    cr_assert_not_null(body);
    cpt_fill(body, 70000, 0, 4);
    cp_sendbuf *b = cp_packet_make(9, body, 65531);
    cr_assert_not_null(b, "a 65535-byte packet must be possible");
    cr_assert_eq(cp_sendbuf_len(b), 65535);
    const uint8_t *d = cp_sendbuf_data(b);
    cr_assert(d[0] == 0xff && d[1] == 0xff);
    cr_assert_eq(cpt_check_pattern(d + 4, 65531, 0, 4), -1);
    cp_sendbuf_unref(b);
    cr_assert_null(cp_packet_make(9, body, 65532), "size 65536 does not fit the header");
    cr_assert_null(cp_packet_make(9, body, 70000));
    free(body);
    cpt_leak_end(&leak);
}

/* A packet written in place: the id goes in at open, the size at close, and
 * the bytes equal those of cp_packet_make with the same body. */
Test(sendbuf, packet_open_writes_in_place_and_close_fills_the_header, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_sendbuf *b = cp_packet_open(0x1234, 100);
    cr_assert_not_null(b);
    uint8_t *body = cp_packet_body(b);
    cr_assert_eq(body, cp_sendbuf_data(b) + CP_PACKET_HEADER);
    memset(body, 0xEE, 100); /* the whole capacity is writable */
    memcpy(body, "hello", 5);
    cr_assert_eq(cp_packet_close(b, 5), 0);
    cr_assert_eq(cp_sendbuf_len(b), 9);
    cp_sendbuf *m = cp_packet_make(0x1234, "hello", 5);
    cr_assert_eq(memcmp(cp_sendbuf_data(b), cp_sendbuf_data(m), 9), 0, "differs from cp_packet_make");
    const uint8_t *d = cp_sendbuf_data(b);
    cr_assert(d[0] == 9 && d[1] == 0 && d[2] == 0x34 && d[3] == 0x12, "header %02x %02x %02x %02x", d[0],
              d[1], d[2], d[3]);
    cp_sendbuf_unref(m);
    cp_sendbuf_unref(b);

    b = cp_packet_open(7, 0);
    cr_assert_not_null(b);
    cr_assert_eq(cp_packet_close(b, 0), 0);
    cr_assert_eq(cp_sendbuf_len(b), 4);
    d = cp_sendbuf_data(b);
    cr_assert(d[0] == 4 && d[1] == 0 && d[2] == 7 && d[3] == 0);
    cp_sendbuf_unref(b);
    cpt_leak_end(&leak);
}

/* Packets closed much shorter than reserved give the rest back: the next
 * buffers of the thread do not overlap them. */
Test(sendbuf, packet_closed_short_then_next_buffers_do_not_overlap, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    enum { N = 32 };
    cp_sendbuf *bs[N];
    for (int i = 0; i < N; i++) {
        bs[i] = cp_packet_open((uint16_t)i, 2000);
        cr_assert_not_null(bs[i]);
        memset(cp_packet_body(bs[i]), 0xEE, 2000);
        cpt_fill(cp_packet_body(bs[i]), 10 + (size_t)i, 0, (uint32_t)i);
        cr_assert_eq(cp_packet_close(bs[i], 10 + (size_t)i), 0);
    }
    for (int i = 0; i < N; i++) {
        const uint8_t *d = cp_sendbuf_data(bs[i]);
        cr_assert_eq(cp_sendbuf_len(bs[i]), 14 + (size_t)i);
        cr_assert(d[0] == 14 + i && d[1] == 0 && d[2] == i && d[3] == 0, "packet %d header", i);
        cr_assert_eq(cpt_check_pattern(d + 4, 10 + (size_t)i, 0, (uint32_t)i), -1, "packet %d overwritten",
                     i);
        cp_sendbuf_unref(bs[i]);
    }
    cpt_leak_end(&leak);
}

Test(sendbuf, packet_open_size_limit, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cr_assert_null(cp_packet_open(1, CP_PACKET_MAX - CP_PACKET_HEADER + 1),
                   "size 65536 does not fit the header");
    cr_assert_null(cp_packet_open(1, SIZE_MAX));
    cp_sendbuf *b = cp_packet_open(1, CP_PACKET_MAX - CP_PACKET_HEADER);
    cr_assert_not_null(b, "a 65535-byte packet must be possible");
    cpt_fill(cp_packet_body(b), 65531, 0, 5);
    cr_assert_eq(cp_packet_close(b, 65531), 0);
    const uint8_t *d = cp_sendbuf_data(b);
    cr_assert_eq(cp_sendbuf_len(b), 65535);
    cr_assert(d[0] == 0xff && d[1] == 0xff && d[2] == 1 && d[3] == 0);
    cr_assert_eq(cpt_check_pattern(d + 4, 65531, 0, 5), -1);
    cp_sendbuf_unref(b);
    cpt_leak_end(&leak);
}

/* A body longer than reserved is refused: -EMSGSIZE, and the buffer is
 * closed empty, so sending it can never put a wrong frame on the wire. The
 * thread's next buffer is fine. */
Test(sendbuf, packet_close_longer_than_reserved_is_refused, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cr_assert_eq(cp_packet_close(NULL, 0), -EINVAL);
    cp_sendbuf *b = cp_packet_open(3, 16);
    cr_assert_not_null(b);
    cr_assert_eq(cp_packet_close(b, 17), -EMSGSIZE);
    cr_assert_eq(cp_sendbuf_len(b), 0, "a refused packet must hold no bytes");
    cp_sendbuf *next = cp_packet_open(4, 16);
    cr_assert_not_null(next);
    memcpy(cp_packet_body(next), "ok", 2);
    cr_assert_eq(cp_packet_close(next, 2), 0);
    cr_assert_eq(memcmp(cp_sendbuf_data(next), "\x06\x00\x04\x00ok", 6), 0);
    cp_sendbuf_unref(b);
    cp_sendbuf_unref(next);

    b = cp_packet_open(3, 0);
    cr_assert_eq(cp_packet_close(b, SIZE_MAX), -EMSGSIZE);
    cp_sendbuf_unref(b);
    cpt_leak_end(&leak);
}

typedef struct ref_arg {
    cp_sendbuf *b;
    int rounds;
} ref_arg;

static void *ref_unref_main(void *arg)
{
    ref_arg *a = arg;
    for (int i = 0; i < a->rounds; i++) {
        cp_sendbuf_ref(a->b);
        cp_sendbuf_ref(a->b);
        cp_sendbuf_unref(a->b);
        cp_sendbuf_unref(a->b);
    }
    return NULL;
}

/* Eight threads take and drop references on one buffer at once; its content
 * stays intact and the last unref frees it (LeakSanitizer / ASan). */
Test(sendbuf, refs_from_many_threads, .timeout = 30)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_sendbuf *b = cp_sendbuf_copy("refcounted", 10);
    cr_assert_not_null(b);
    pthread_t th[8];
    ref_arg a = { .b = b, .rounds = 200000 };
    for (int i = 0; i < 8; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, ref_unref_main, &a), 0);
    for (int i = 0; i < 8; i++)
        pthread_join(th[i], NULL);
    cr_assert_eq(cp_sendbuf_len(b), 10);
    cr_assert_eq(memcmp(cp_sendbuf_data(b), "refcounted", 10), 0);
    cp_sendbuf_unref(b);
    cpt_leak_end(&leak);
}

/* A reference handed to other threads: each drops its own; the buffer lives
 * until the last one. */
typedef struct handoff {
    cp_sendbuf *b;
    atomic_int *creator_dropped;
    int ok;
} handoff;

static void *drop_later_main(void *arg)
{
    handoff *h = arg;
    uint64_t deadline = cpt_now_ms() + 5000;
    while (!atomic_load(h->creator_dropped) && cpt_now_ms() < deadline)
        cpt_sleep_ms(1);
    h->ok = cp_sendbuf_len(h->b) == 10 && !memcmp(cp_sendbuf_data(h->b), "0123456789", 10);
    cp_sendbuf_unref(h->b);
    return NULL;
}

Test(sendbuf, last_unref_on_another_thread, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_sendbuf *b = cp_sendbuf_copy("0123456789", 10);
    handoff h[4];
    pthread_t th[4];
    atomic_int creator_dropped = 0;
    for (int i = 0; i < 4; i++) {
        cp_sendbuf_ref(b);
        h[i] = (handoff){ .b = b, .creator_dropped = &creator_dropped };
        pthread_create(&th[i], NULL, drop_later_main, &h[i]);
    }
    cp_sendbuf_unref(b); /* the creator lets go first */
    atomic_store(&creator_dropped, 1);
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        cr_assert(h[i].ok, "thread %d saw a damaged buffer", i);
    }
    cpt_leak_end(&leak);
}

/* Many buffers are opened and released while some are kept: chunks are
 * recycled, but never while a buffer cut from them is alive. */
typedef struct churn_arg {
    uint32_t seed;
    int bad;
} churn_arg;

static void *churn_main(void *arg)
{
    churn_arg *c = arg;
    enum { KEEP = 64, ROUNDS = 100000 };
    cp_sendbuf *kept[KEEP] = { 0 };
    size_t keptlen[KEEP] = { 0 };
    uint32_t keptseed[KEEP] = { 0 };
    unsigned rnd = c->seed;
    for (int i = 0; i < ROUNDS; i++) {
        rnd = rnd * 1103515245u + 12345u;
        size_t cap = 1 + (rnd >> 8) % 2000;
        cp_sendbuf *b = cp_sendbuf_open(cap);
        if (!b) {
            c->bad++;
            break;
        }
        size_t len = cap - (rnd >> 20) % (cap > 1 ? cap / 2 : 1);
        uint32_t sd = c->seed * 1000003u + (uint32_t)i;
        cpt_fill(cp_sendbuf_data(b), len, 0, sd);
        cp_sendbuf_close(b, len);
        int slot = (int)((rnd >> 4) % KEEP);
        if (i % 7 == 0) {
            if (kept[slot]) {
                if (cp_sendbuf_len(kept[slot]) != keptlen[slot] ||
                    cpt_check_pattern(cp_sendbuf_data(kept[slot]), keptlen[slot], 0, keptseed[slot]) != -1)
                    c->bad++;
                cp_sendbuf_unref(kept[slot]);
            }
            kept[slot] = b;
            keptlen[slot] = len;
            keptseed[slot] = sd;
        } else {
            if (cpt_check_pattern(cp_sendbuf_data(b), len, 0, sd) != -1)
                c->bad++;
            cp_sendbuf_unref(b);
        }
    }
    for (int k = 0; k < KEEP; k++) {
        if (!kept[k])
            continue;
        if (cp_sendbuf_len(kept[k]) != keptlen[k] ||
            cpt_check_pattern(cp_sendbuf_data(kept[k]), keptlen[k], 0, keptseed[k]) != -1)
            c->bad++;
        cp_sendbuf_unref(kept[k]);
    }
    return NULL;
}

Test(sendbuf, chunk_recycling_never_reuses_live_buffers, .timeout = 60)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    churn_arg a = { .seed = 1 };
    churn_main(&a);
    cr_assert_eq(a.bad, 0, "%d buffers damaged (chunk reused while a buffer lived)", a.bad);
    cpt_leak_end(&leak);
}

/* The same churn on four threads at once (each thread has its own chunk; the
 * pool is shared), and buffers opened on one thread released on another. */
typedef struct xfer {
    cp_sendbuf *bufs[1000];
    uint32_t seeds[1000];
    size_t lens[1000];
} xfer;

static void *xfer_release_main(void *arg)
{
    xfer *x = arg;
    int bad = 0;
    for (int i = 0; i < 1000; i++) {
        if (cpt_check_pattern(cp_sendbuf_data(x->bufs[i]), x->lens[i], 0, x->seeds[i]) != -1)
            bad++;
        cp_sendbuf_unref(x->bufs[i]);
    }
    return (void *)(intptr_t)bad;
}

Test(sendbuf, chunks_shared_between_threads, .timeout = 60)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    churn_arg a[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        a[i] = (churn_arg){ .seed = (uint32_t)(10 + i) };
        cr_assert_eq(pthread_create(&th[i], NULL, churn_main, &a[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(a[i].bad, 0, "thread %d: %d damaged buffers", i, a[i].bad);
    }
    /* Opened here, released on another thread, while this thread opens more. */
    xfer *x = calloc(1, sizeof *x);
    cr_assert_not_null(x);
    for (int i = 0; i < 1000; i++) {
        x->lens[i] = 1 + (size_t)i % 700;
        x->seeds[i] = 7000u + (uint32_t)i;
        x->bufs[i] = cp_sendbuf_open(x->lens[i]);
        cr_assert_not_null(x->bufs[i]);
        cpt_fill(cp_sendbuf_data(x->bufs[i]), x->lens[i], 0, x->seeds[i]);
        cp_sendbuf_close(x->bufs[i], x->lens[i]);
    }
    pthread_t rel;
    pthread_create(&rel, NULL, xfer_release_main, x);
    churn_arg mine = { .seed = 99 };
    churn_main(&mine);
    void *res;
    pthread_join(rel, &res);
    cr_assert_eq((int)(intptr_t)res, 0, "buffers damaged before their release on another thread");
    cr_assert_eq(mine.bad, 0);
    free(x);
    cpt_leak_end(&leak);
}

/* Threads that used send buffers and exited give their chunk back (checked by
 * LeakSanitizer in the sanitizer build; by heap accounting otherwise). */
static void *short_lived_main(void *arg)
{
    (void)arg;
    cp_sendbuf *b = cp_sendbuf_open(100);
    if (b) {
        cp_sendbuf_close(b, 50);
        cp_sendbuf_unref(b);
    }
    return NULL;
}

Test(sendbuf, exiting_threads_return_their_chunk, .timeout = 30)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    for (int i = 0; i < 20; i++) {
        pthread_t th;
        pthread_create(&th, NULL, short_lived_main, NULL);
        pthread_join(th, NULL);
    }
    size_t h0 = cpt_heap_in_use();
    for (int i = 0; i < 500; i++) {
        pthread_t th;
        pthread_create(&th, NULL, short_lived_main, NULL);
        pthread_join(th, NULL);
    }
    size_t h1 = cpt_heap_in_use();
    if (h0 && h1 > h0)
        cr_assert_lt(h1 - h0, 256u << 10, "heap grew %zu bytes over 500 short-lived threads", h1 - h0);
    cpt_leak_end(&leak);
}

/* A buffer opened on one thread and closed on another keeps the length it was
 * closed at, whatever the opening thread does next: before the fix, the
 * opener's next open found the buffer still marked open on its own side and
 * "kept it whole", rewriting its length to the full capacity (1000 instead
 * of 10), though it was closed and might already be queued on a session.
 * The next thing the opener does is each of the ways a buffer is opened; the
 * first buffer opens as a plain buffer and as a packet, small (cut from the
 * thread's chunk) and large (allocated alone); and the next buffer must not
 * overlap the bytes the first one was closed with. */
typedef struct far_close {
    cp_sendbuf *b;
    size_t len;
    bool packet;
} far_close;

static void *far_close_main(void *arg)
{
    far_close *f = arg;
    if (f->packet)
        cp_packet_close(f->b, f->len - CP_PACKET_HEADER);
    else
        cp_sendbuf_close(f->b, f->len);
    return NULL;
}

enum { NEXT_OPEN, NEXT_PACKET_OPEN, NEXT_COPY, NEXT_PACKET_MAKE, NEXT_KINDS };

static cp_sendbuf *open_next(int kind, size_t cap)
{
    static uint8_t junk[1000];
    memset(junk, 0xEE, sizeof junk);
    cp_sendbuf *b = NULL;
    switch (kind) {
    case NEXT_OPEN:
        b = cp_sendbuf_open(cap);
        memset(cp_sendbuf_data(b), 0xEE, cap);
        cp_sendbuf_close(b, cap);
        break;
    case NEXT_PACKET_OPEN:
        b = cp_packet_open(7, cap);
        memset(cp_packet_body(b), 0xEE, cap);
        cp_packet_close(b, cap);
        break;
    case NEXT_COPY: b = cp_sendbuf_copy(junk, cap); break;
    case NEXT_PACKET_MAKE: b = cp_packet_make(7, junk, cap); break;
    }
    return b;
}

Test(sendbuf, closed_on_another_thread_keeps_its_length, .timeout = 30)
{
    enum { ROUNDS = 200, CAP = 1000, LEN = 10 };
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    for (int round = 0; round < ROUNDS; round++) {
        int kind = round % NEXT_KINDS;
        bool packet = round / NEXT_KINDS % 2;
        size_t cap = round / (2 * NEXT_KINDS) % 2 ? 20000 : CAP; /* alone, or from the chunk */
        far_close f = { .len = LEN, .packet = packet };
        f.b = packet ? cp_packet_open(3, cap - CP_PACKET_HEADER) : cp_sendbuf_open(cap);
        cr_assert_not_null(f.b);
        uint8_t *d = cp_sendbuf_data(f.b);
        cpt_fill(d + CP_PACKET_HEADER, LEN - CP_PACKET_HEADER, 0, (uint32_t)round);
        pthread_t th;
        cr_assert_eq(pthread_create(&th, NULL, far_close_main, &f), 0);
        pthread_join(th, NULL);
        cp_sendbuf *next = open_next(kind, CAP - CP_PACKET_HEADER);
        cr_assert_not_null(next);
        cr_assert_eq(cp_sendbuf_len(f.b), LEN,
                     "round %d (next: kind %d, packet %d, cap %zu): length %zu after "
                     "the opener's next buffer, closed at %d on another thread",
                     round, kind, packet, cap, cp_sendbuf_len(f.b), LEN);
        cr_assert_eq(cpt_check_pattern(d + CP_PACKET_HEADER, LEN - CP_PACKET_HEADER, 0, (uint32_t)round), -1,
                     "round %d: the next buffer overwrote the closed one", round);
        cp_sendbuf_unref(next);
        cp_sendbuf_unref(f.b);
    }
    cpt_leak_end(&leak);
}
