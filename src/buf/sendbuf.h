/* SPDX-License-Identifier: MIT */
/*
 * The send buffer layer (sendbuf.c): reference-counted buffers carved from
 * per-thread chunks. Nothing here is public.
 */
#ifndef CP_SENDBUF_H
#define CP_SENDBUF_H

#include "base.h"
#include "mem/mem.h"

/* ------------------------------------------------------------------ send buffers */

/* Room before a buffer's bytes for the one frame header that is the same
 * for every recipient: the buffer sent as one WebSocket binary message (RFC
 * 6455; a server's frames are unmasked, so nothing in the header depends on
 * the session, and it is at most 10 bytes). It is written when the buffer is
 * closed, before anyone else can see it, so WebSocket sessions send a shared
 * buffer with its header in one piece and without a copy (the WebSocket
 * layer; sendq.c's framed entries). 12, after the 4-byte framing count,
 * keeps data 8-byte aligned. */
#define CP_SENDBUF_HEADROOM 12

struct cp_sendbuf {
    atomic_uint refs;
    uint32_t len;
    uint32_t cap;
    uint32_t big_class;     /* allocated alone: its size class, or BIG_NONE */
    struct cp_chunk *chunk; /* NULL for buffers allocated alone */
    /* How many bytes at the start of data are not the user's, which on_sent
     * does not count: all of a filter's own buffer (an HTTP answer, a
     * WebSocket control frame), a masked copy's frame header. In a send
     * queue's block: how many of its bytes, wherever they are, came from
     * such parts (sendq.c). 0 for the user's buffers. */
    uint32_t framing;
    uint8_t head[CP_SENDBUF_HEADROOM];
    uint8_t data[];
};

/* The length of the frame header of a len-byte message: 2, 4 or 10. */
static inline size_t cp__sendbuf_head_len(size_t len) { return len < 126 ? 2 : len <= 0xffff ? 4 : 10; }
/* Writes the frame header for b's current length just before b->data. On
 * the thread that closes b, or on a queue's own block (never shared). */
void cp__sendbuf_frame(cp_sendbuf *b);

/* big_class of a block a send queue copied small buffers into (sendq.c):
 * allocated alone, never shared, freed by the last unref. */
#define CP_SENDBUF_BLOCK (UINT32_MAX - 1)
/* big_class of a view: a buffer whose bytes are memory it does not own, a
 * received buffer a backend lent out (cp_sendbuf_from_recv). Its header is
 * allocated alone, followed by a cp__sendbuf_view_tail in place of data; the
 * last unref frees it and puts the loan back. A view has no headroom before
 * its bytes, so a WebSocket session's framed queue takes a copy of it
 * instead (sendq.c). */
#define CP_SENDBUF_VIEW (UINT32_MAX - 2)

typedef struct cp__sendbuf_view_tail {
    const uint8_t *bytes;
    cp_loan loan; /* its pin is the view's charge */
} cp__sendbuf_view_tail;

static inline bool cp__sendbuf_is_view(const cp_sendbuf *b) { return b->big_class == CP_SENDBUF_VIEW; }
/* The bytes a buffer sends: its data, or a view's lent memory. */
static inline const uint8_t *cp__sendbuf_bytes(const cp_sendbuf *b)
{
    return cp__sendbuf_is_view(b) ? ((const cp__sendbuf_view_tail *)(const void *)b->data)->bytes : b->data;
}
/* A closed view of len bytes at p (one reference) that takes over the loan,
 * or NULL out of memory (the caller then still holds the loan). */
cp_sendbuf *cp__sendbuf_view(const uint8_t *p, size_t len, const cp_loan *loan);

/* The memory b may keep alive while it is referenced, about what malloc
 * took for it: for a buffer carved from a chunk, the whole chunk (any one
 * buffer can keep it); for one allocated alone, its allocation. */
extern const size_t cp__sendbuf_chunk_charge;
size_t cp__sendbuf_alone_charge(const cp_sendbuf *b);
static inline size_t cp__sendbuf_charge(const cp_sendbuf *b)
{
    return b->chunk ? cp__sendbuf_chunk_charge : cp__sendbuf_alone_charge(b);
}
/* A send queue's private block of cap bytes (len 0, one reference), and the
 * same block grown to cap bytes (realloc: it may move; NULL leaves b as it
 * was). */
/* A send queue's own blocks (sendq.c): whole pages, of at least cap bytes
 * of data; growing one may move it. What a block of cap bytes is charged. */
cp_sendbuf *cp__sendbuf_block_new(size_t cap);
cp_sendbuf *cp__sendbuf_block_grow(cp_sendbuf *b, size_t cap);
size_t cp__sendbuf_block_charge(size_t cap);
/* Bytes of free big buffers kept in the pools. */
size_t cp__sendbuf_pooled(void);
/* Bytes the free pools of chunks and big buffers hold (for tests). */
static inline bool cp__sendbuf_is_block(const cp_sendbuf *b) { return b->big_class == CP_SENDBUF_BLOCK; }
/* Gives the pooled free chunks and large buffers back to malloc (a worker
 * calls it when it goes quiet after load; the pools refill on demand). */
void cp__sendbuf_trim(void);
/* The library's own buffers (copies, packets): opened and closed at once,
 * allowed while the user has a buffer open on the thread, and not seen by
 * the misuse check of a second open buffer. */
cp_sendbuf *cp__sendbuf_open(size_t cap);
void cp__sendbuf_close(cp_sendbuf *b, size_t len);

#endif
