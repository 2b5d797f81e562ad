/* SPDX-License-Identifier: MIT */
/*
 * fuzz_nats: the NATS protocol parser the bus reads a server with
 * (src/bus/nats_wire.c, cp__nats_parse) under libFuzzer. The input is a
 * byte stream from a "server"; it is parsed operation by operation as the
 * bus does, and each result is checked:
 *   - a parse takes at least one byte and at most what it was given;
 *   - every pointer it returns lies inside the bytes it took, a MSG's payload
 *     is followed by CRLF and is never above max_payload;
 *   - the same operation cut short anywhere is "incomplete" (0), never an
 *     error or another operation: a server's bytes arrive in any pieces.
 * Any difference abort()s.
 */
#include "bus/nats_wire.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PAYLOAD 4096u

static void check_inside(const uint8_t *base, size_t n, const void *p, size_t len)
{
    const uint8_t *q = p;
    if (len && (q < base || q + len > base + n))
        abort();
}

static void check_op(const uint8_t *buf, long r, const cp_nats_op *op)
{
    size_t n = (size_t)r;
    if (op->kind < CP_NATS_INFO || op->kind > CP_NATS_ERR)
        abort();
    if (op->kind == CP_NATS_MSG) {
        check_inside(buf, n, op->subject, op->subject_len);
        check_inside(buf, n, op->reply, op->reply_len);
        check_inside(buf, n, op->data, op->len);
        if (op->subject_len == 0 || op->len > MAX_PAYLOAD)
            abort();
        if (op->data + op->len + 2 != buf + n || buf[n - 2] != '\r' || buf[n - 1] != '\n')
            abort();
    } else if (op->data) {
        check_inside(buf, n, op->data, op->len);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t used = 0;
    while (used < size) {
        cp_nats_op op;
        long r = cp__nats_parse(data + used, size - used, MAX_PAYLOAD, &op);
        if (r == 0 || r == -EPROTO || r == -EMSGSIZE)
            break;
        if (r < 0 || (size_t)r > size - used)
            abort();
        check_op(data + used, r, &op);
        /* Cut short: only ever "not yet". */
        size_t cuts[3] = { (size_t)r - 1, (size_t)r / 2, 1 };
        for (int i = 0; i < 3; i++) {
            cp_nats_op part;
            if (cuts[i] && cuts[i] < (size_t)r &&
                cp__nats_parse(data + used, cuts[i], MAX_PAYLOAD, &part) != 0)
                abort();
        }
        used += (size_t)r;
    }
    return 0;
}
