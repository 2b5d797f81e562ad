/* SPDX-License-Identifier: MIT */
/*
 * The send queue's framed entries: a buffer sent with the WebSocket frame
 * header its close wrote into its headroom (sendbuf.h), so that a shared
 * buffer goes to every WebSocket session without a copy. The queue must
 * count, gather, consume, compact and pop such an entry as header and bytes
 * together.
 */
#include "helpers.h"
#include "internal.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The RFC 6455 header of an unmasked final binary message of len bytes. */
static size_t expected_head(size_t len, uint8_t *h)
{
    h[0] = 0x82;
    if (len < 126) {
        h[1] = (uint8_t)len;
        return 2;
    }
    if (len <= 0xffff) {
        h[1] = 126;
        h[2] = (uint8_t)(len >> 8);
        h[3] = (uint8_t)len;
        return 4;
    }
    h[1] = 127;
    for (int i = 0; i < 8; i++)
        h[2 + i] = (uint8_t)((uint64_t)len >> (56 - 8 * i));
    return 10;
}

static cp_sendbuf *filled(size_t len, uint8_t seed)
{
    cp_sendbuf *b = cp_sendbuf_open(len);
    cr_assert_not_null(b);
    for (size_t i = 0; i < len; i++)
        cp_sendbuf_data(b)[i] = (uint8_t)(seed + i * 7);
    cp_sendbuf_close(b, len);
    return b;
}

/* Appends what b looks like framed to out at *n. */
static void frame_into(cp_sendbuf *b, uint8_t *out, size_t *n)
{
    size_t len = cp_sendbuf_len(b);
    *n += expected_head(len, out + *n);
    memcpy(out + *n, cp_sendbuf_data(b), len);
    *n += len;
}

/* Everything the queue would write, in order. */
static size_t gather_all(cp_sendq *q, uint8_t *out)
{
    struct iovec iov[64];
    int n = cp__sendq_gather(q, iov, 64, SIZE_MAX);
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        memcpy(out + total, iov[i].iov_base, iov[i].iov_len);
        total += iov[i].iov_len;
    }
    return total;
}

Test(sendq, a_closed_buffer_carries_its_frame_header)
{
    static const size_t sizes[] = { 0, 5, 125, 126, 300, 65535, 65536, 70000 };
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        cp_sendbuf *b = filled(sizes[i], 1);
        uint8_t want[10];
        size_t hl = expected_head(sizes[i], want);
        cr_assert_eq(cp__sendbuf_head_len(sizes[i]), hl, "size %zu", sizes[i]);
        cr_assert(memcmp(cp_sendbuf_data(b) - hl, want, hl) == 0, "the header of a %zu-byte buffer",
                  sizes[i]);
        cr_assert_eq((uintptr_t)cp_sendbuf_data(b) % 8, 0, "a buffer's bytes stay 8-byte aligned");
        cp_sendbuf_unref(b);
    }
    cp_sendbuf *p = cp_packet_make(7, "abc", 3);
    cr_assert_eq(cp_sendbuf_data(p)[-2], 0x82);
    cr_assert_eq(cp_sendbuf_data(p)[-1], 7, "a packet's header counts its own 4 bytes");
    cp_sendbuf_unref(p);
}

Test(sendq, framed_entries_gather_consume_and_pop_with_their_headers)
{
    cp_sendq q = { 0 };
    cp_sendbuf *a = filled(10, 1), *b = filled(300, 2), *c = filled(4, 3);
    uint8_t want[400], got[400];
    size_t wn = 0;
    frame_into(a, want, &wn);
    frame_into(b, want, &wn);
    memcpy(want + wn, cp_sendbuf_data(c), 4); /* a plain entry among framed ones */
    wn += 4;
    q.framed = true;
    cr_assert_eq(cp__sendq_push(&q, a, SIZE_MAX), 0);
    cr_assert_eq(cp__sendq_push(&q, b, SIZE_MAX), 0);
    q.framed = false; /* an entry pushed before the queue became framed (an HTTP answer) */
    cr_assert_eq(cp__sendq_push(&q, c, SIZE_MAX), 0);
    cr_assert_eq(q.bytes, wn);
    cr_assert_eq(gather_all(&q, got), wn);
    cr_assert(memcmp(got, want, wn) == 0);

    /* A write that ends inside the second header, then one inside its bytes:
     * what each completes of the user's bytes leaves the headers out. */
    cr_assert_eq(cp__sendq_consume(&q, 12 + 1), 10);
    cr_assert_eq(gather_all(&q, got), wn - 13);
    cr_assert(memcmp(got, want + 13, wn - 13) == 0);
    cr_assert_null(cp__sendq_pop(&q), "a partly written entry is not taken out");
    cr_assert_eq(cp__sendq_consume(&q, 3 + 100), 100);
    cr_assert_eq(cp__sendq_consume(&q, 200), 200);
    cr_assert_eq(q.bytes, 4);
    cp_sendbuf *popped = cp__sendq_pop(&q);
    cr_assert_eq(popped, c);
    cr_assert_eq(q.count, 0);
    cr_assert_eq(q.bytes, 0);
    cp_sendbuf_unref(popped);
    cp__sendq_clear(&q);
}

/* A backed-up queue copies small buffers into its own blocks: a framed
 * entry's header must be copied with its bytes. */
Test(sendq, compaction_keeps_the_frame_headers)
{
    enum { N = 600 };
    cp_sendq q = { .framed = true };
    uint8_t *want = malloc(N * 80), *got = malloc(N * 80);
    size_t wn = 0;
    for (int i = 0; i < N; i++) {
        cp_sendbuf *b = filled((size_t)(i % 60), (uint8_t)i);
        frame_into(b, want, &wn);
        cr_assert_eq(cp__sendq_push(&q, b, 64 * 1024), 0, "push %d", i);
    }
    cr_assert_eq(q.bytes, wn);
    cr_assert_lt(q.count, N / 4, "the queue kept %u entries: nothing was compacted", q.count);
    size_t total = 0;
    while (q.count) {
        struct iovec iov[64];
        int n = cp__sendq_gather(&q, iov, 64, SIZE_MAX);
        size_t step = 0;
        for (int i = 0; i < n; i++) {
            memcpy(got + total + step, iov[i].iov_base, iov[i].iov_len);
            step += iov[i].iov_len;
        }
        cp__sendq_consume(&q, step);
        total += step;
    }
    cr_assert_eq(total, wn);
    cr_assert(memcmp(got, want, wn) == 0);
    cp__sendq_clear(&q);
    free(want);
    free(got);
}

/* A filter's own buffer (framing: an HTTP answer, a control frame) among
 * the user's: written in order, counted as none of the user's bytes. */
static cp_sendbuf *own(size_t len, uint8_t seed)
{
    cp_sendbuf *b = filled(len, seed);
    b->framing = (uint32_t)len;
    return b;
}

/* What consume reports is what on_sent tells the user: only their bytes
 * (not headers, not a filter's own buffers, not a framing prefix), however
 * the writes fall and whatever the queue copied into blocks. */
Test(sendq, consume_counts_the_users_bytes_through_compaction)
{
    enum { N = 900 };
    cp_sendq q = { .framed = true };
    uint8_t *want = malloc(N * 80), *got = malloc(N * 80);
    size_t wn = 0, user = 0, counted = 0;
    for (int i = 0; i < N; i++) {
        bool is_own = i % 7 == 3;
        cp_sendbuf *b = is_own ? own((size_t)(i % 20) + 2, (uint8_t)i) : filled((size_t)(i % 60), (uint8_t)i);
        if (i % 7 == 5 && cp_sendbuf_len(b) >= 6)
            b->framing = 6; /* a framing prefix (a client's masked copy: its own frame header) */
        frame_into(b, want, &wn);
        if (!is_own)
            user += cp_sendbuf_len(b) - b->framing;
        cr_assert_eq(cp__sendq_push(&q, b, 64 * 1024), 0, "push %d", i);
        if (i % 50 == 49) { /* writes of odd sizes between pushes, some inside headers */
            struct iovec iov[4];
            int n = cp__sendq_gather(&q, iov, 4, SIZE_MAX);
            size_t step = n ? iov[0].iov_len / 2 + 1 : 0;
            if (step > q.bytes)
                step = q.bytes;
            counted += cp__sendq_consume(&q, step);
        }
    }
    cr_assert_lt(q.count, N / 4, "the queue kept %u entries: nothing was compacted", q.count);
    size_t left = q.bytes, total = wn - left;
    while (q.count) {
        struct iovec iov[64];
        int n = cp__sendq_gather(&q, iov, 64, SIZE_MAX);
        size_t step = 0;
        for (int i = 0; i < n; i++) {
            memcpy(got + total + step, iov[i].iov_base, iov[i].iov_len);
            step += iov[i].iov_len;
        }
        if (step > 777)
            step = 777; /* ends inside blocks and headers */
        counted += cp__sendq_consume(&q, step);
        total += step;
    }
    cr_assert_eq(total, wn);
    cr_assert(memcmp(got + (wn - left), want + (wn - left), left) == 0, "the bytes, in order");
    cr_assert_eq(counted, user, "consume counted %zu of the user's %zu bytes", counted, user);
    cp__sendq_clear(&q);
    free(want);
    free(got);
}

/* A queue that holds one entry at a time (a packet per round, an idle
 * session) has no ring: the entry sits in place of the ring's pointer,
 * and the second entry brings the ring. */
Test(sendq, one_entry_needs_no_ring)
{
    cp_sendq q = { 0 };
    uint8_t got[64];
    for (int round = 0; round < 3; round++) {
        cp_sendbuf *a = filled(20, (uint8_t)round);
        cr_assert_eq(cp__sendq_push(&q, a, SIZE_MAX), 0);
        cr_assert_eq(q.cap, 0, "one entry took a ring of %u places", q.cap);
        cr_assert_eq(q.mem, cp__sendbuf_charge(a), "the queue counts the entry alone, no ring");
        cr_assert_eq(gather_all(&q, got), 20);
        cr_assert(memcmp(got, cp_sendbuf_data(a), 20) == 0);
        cr_assert_eq(cp__sendq_consume(&q, 7), 7);
        cr_assert_eq(gather_all(&q, got), 13);
        cr_assert_eq(cp__sendq_consume(&q, 13), 13);
        cr_assert_eq(q.count, 0);
    }
    cp_sendbuf *a = filled(5, 1), *b = filled(6, 2);
    cr_assert_eq(cp__sendq_push(&q, a, SIZE_MAX), 0);
    cr_assert_eq(cp__sendq_push(&q, b, SIZE_MAX), 0);
    cr_assert_gt(q.cap, 0, "a second entry brings the ring");
    cr_assert_eq(gather_all(&q, got), 11);
    cr_assert(memcmp(got, cp_sendbuf_data(a), 5) == 0 && memcmp(got + 5, cp_sendbuf_data(b), 6) == 0,
              "the first entry moved into the ring in its place");
    cp_sendbuf *p = cp__sendq_pop(&q);
    cr_assert_eq(p, a);
    cp_sendbuf_unref(p);
    cp__sendq_clear(&q);
}
