/* SPDX-License-Identifier: MIT */
/*
 * The NATS client protocol on the wire: what the server sends, parsed one
 * operation at a time, and what the client sends, formatted. Pure functions
 * over bytes, so the fuzzer and the unit tests reach them without a broker.
 * The protocol: https://docs.nats.io/reference/reference-protocols/nats-protocol
 */
#ifndef CP_BUS_NATS_WIRE_H
#define CP_BUS_NATS_WIRE_H

#include <stddef.h>
#include <stdint.h>

/* The server's limit on a control line (its max_control_line default); a
 * longer line is a protocol error rather than a reason to buffer forever. */
#define CP_NATS_CONTROL_MAX 4096u

typedef enum cp_nats_kind {
    CP_NATS_INFO = 1, /* data/len: the JSON object */
    CP_NATS_MSG,      /* subject, sid, reply (may be empty), data/len: the payload */
    CP_NATS_PING,
    CP_NATS_PONG,
    CP_NATS_OK,
    CP_NATS_ERR /* data/len: the server's message, quotes removed */
} cp_nats_kind;

typedef struct cp_nats_op {
    cp_nats_kind kind;
    const char *subject;
    size_t subject_len;
    const char *reply;
    size_t reply_len;
    uint64_t sid;
    const uint8_t *data;
    size_t len;
} cp_nats_op;

/* Parses the server operation at the start of buf[0, n). Returns the bytes it
 * takes (> 0), 0 when buf holds only the start of one, -EPROTO for bytes that
 * are not the protocol (an unknown operation, a malformed MSG line, a line
 * past CP_NATS_CONTROL_MAX, a payload not followed by CRLF), or -EMSGSIZE for
 * a MSG whose payload is larger than max_payload. The op's pointers point
 * into buf. */
long cp__nats_parse(const uint8_t *buf, size_t n, size_t max_payload, cp_nats_op *op);

/* A subject the client may publish to: tokens of printable, non-space ASCII
 * separated by single dots, no wildcards. With wildcards, a subject it may
 * subscribe to ('*' as a whole token, '>' as the whole last token). */
int cp__nats_subject_ok(const char *s, int wildcards);
/* A queue group name: printable, non-space ASCII, not empty. */
int cp__nats_queue_ok(const char *s);

/* "PUB <subject> <len>\r\n" into out (cap bytes); the length written, or 0
 * if it does not fit. */
size_t cp__nats_pub_head(char *out, size_t cap, const char *subject, size_t len);
/* "SUB <subject> [queue] <sid>\r\n" */
size_t cp__nats_sub(char *out, size_t cap, const char *subject, const char *queue, uint64_t sid);
/* "UNSUB <sid>\r\n" */
size_t cp__nats_unsub(char *out, size_t cap, uint64_t sid);
/* "CONNECT {...}\r\n" with verbose and pedantic off, echo off (a server
 * does not get its own publishes back), headers off, and the name. */
size_t cp__nats_connect(char *out, size_t cap, const char *name);

#endif
