/*
 * A session's send queue: the buffers queued on it and not yet written, in
 * order, as a ring of references. Owner thread only; the session decides
 * when to write and what the queue may hold (session.c), this file keeps the
 * ring and its counts.
 */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>

#define SQ_CAP_MIN 8u

static cp_sendbuf *at(const cp_sendq *q, uint32_t i) { return q->ring[(q->head + i) & (q->cap - 1)]; }

int cp__sendq_push(cp_sendq *q, cp_sendbuf *b)
{
    if (q->count == q->cap) {
        uint32_t cap = q->cap ? q->cap * 2 : SQ_CAP_MIN;
        cp_sendbuf **r = malloc(sizeof *r * cap);
        if (!r)
            return -ENOMEM;
        for (uint32_t i = 0; i < q->count; i++)
            r[i] = at(q, i);
        free(q->ring);
        q->ring = r;
        q->head = 0;
        q->cap = cap;
    }
    q->ring[(q->head + q->count) & (q->cap - 1)] = b;
    q->count++;
    q->bytes += b->len;
    return 0;
}

int cp__sendq_gather(const cp_sendq *q, struct iovec *iov, int max_iov, size_t max_bytes)
{
    int n = 0;
    size_t bytes = 0;
    for (uint32_t i = 0; i < q->count && n < max_iov && bytes < max_bytes; i++) {
        cp_sendbuf *b = at(q, i);
        size_t off = i == 0 ? q->first_off : 0;
        iov[n].iov_base = b->data + off;
        iov[n].iov_len = b->len - off;
        bytes += iov[n].iov_len;
        n++;
    }
    return n;
}

void cp__sendq_consume(cp_sendq *q, size_t n)
{
    q->bytes -= n;
    while (n > 0) {
        cp_sendbuf *b = q->ring[q->head];
        size_t rem = b->len - q->first_off;
        if (n < rem) {
            q->first_off += (uint32_t)n;
            break;
        }
        n -= rem;
        q->first_off = 0;
        q->head = (q->head + 1) & (q->cap - 1);
        q->count--;
        cp_sendbuf_unref(b);
    }
}

void cp__sendq_clear(cp_sendq *q)
{
    for (uint32_t i = 0; i < q->count; i++)
        cp_sendbuf_unref(at(q, i));
    free(q->ring);
    *q = (cp_sendq){0};
}
