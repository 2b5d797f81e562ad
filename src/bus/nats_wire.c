/* SPDX-License-Identifier: MIT */
#include "bus/nats_wire.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

/* The arguments of a control line, split on spaces and tabs. A MSG line has
 * at most four (subject, sid, reply, size). */
#define ARGS_MAX 5

typedef struct span {
    const char *p;
    size_t n;
} span;

static int is_blank(char c) { return c == ' ' || c == '\t'; }

/* Splits line[0, n) into at most max arguments; -1 if there are more. */
static int split_args(const char *line, size_t n, span *args, int max)
{
    int k = 0;
    size_t i = 0;
    for (;;) {
        while (i < n && is_blank(line[i]))
            i++;
        if (i == n)
            return k;
        if (k == max)
            return -1;
        size_t start = i;
        while (i < n && !is_blank(line[i]))
            i++;
        args[k++] = (span){ line + start, i - start };
    }
}

/* A decimal number of at most 19 digits (below 2^63); -1 otherwise. */
static int parse_u64(span s, uint64_t *out)
{
    if (s.n == 0 || s.n > 19)
        return -1;
    uint64_t v = 0;
    for (size_t i = 0; i < s.n; i++) {
        if (s.p[i] < '0' || s.p[i] > '9')
            return -1;
        v = v * 10 + (uint64_t)(s.p[i] - '0');
    }
    *out = v;
    return 0;
}

/* Whether word (upper case) is the operation name op[0, n), in any case. */
static int op_is(span op, const char *word)
{
    size_t n = strlen(word);
    if (op.n != n)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = op.p[i];
        if (c >= 'a' && c <= 'z')
            c = (char)(c - 'a' + 'A');
        if (c != word[i])
            return 0;
    }
    return 1;
}

/* MSG <subject> <sid> [reply-to] <#bytes>\r\n<payload>\r\n. line is the
 * control line without its CRLF; body is what follows it in the buffer. */
static long parse_msg(const char *line, size_t line_n, const uint8_t *body, size_t body_n, size_t max_payload,
                      cp_nats_op *op)
{
    span a[ARGS_MAX];
    int k = split_args(line, line_n, a, ARGS_MAX);
    if (k != 4 && k != 5)
        return -EPROTO;
    uint64_t sid, size;
    if (parse_u64(a[2], &sid) < 0 || parse_u64(a[k - 1], &size) < 0)
        return -EPROTO;
    if (size > max_payload)
        return -EMSGSIZE;
    if (body_n < size + 2)
        return 0;
    if (body[size] != '\r' || body[size + 1] != '\n')
        return -EPROTO;
    op->kind = CP_NATS_MSG;
    op->subject = a[1].p;
    op->subject_len = a[1].n;
    op->sid = sid;
    op->reply = k == 5 ? a[3].p : "";
    op->reply_len = k == 5 ? a[3].n : 0;
    op->data = body;
    op->len = (size_t)size;
    return (long)size + 2;
}

/* The text after the operation name, without surrounding blanks (and, for
 * -ERR, without the single quotes the server puts around it). */
static void rest_of_line(const char *line, size_t n, span op, int unquote, const uint8_t **data, size_t *len)
{
    const char *p = op.p + op.n, *end = line + n;
    while (p < end && is_blank(*p))
        p++;
    while (end > p && is_blank(end[-1]))
        end--;
    if (unquote && end - p >= 2 && *p == '\'' && end[-1] == '\'')
        p++, end--;
    *data = (const uint8_t *)p;
    *len = (size_t)(end - p);
}

/* An operation without a payload: INFO, PING, PONG, +OK, -ERR. 0, or -EPROTO
 * for an unknown name (HMSG included: the client never asks for headers). */
static int parse_simple(const char *line, size_t n, span name, cp_nats_op *op)
{
    op->data = NULL;
    op->len = 0;
    if (op_is(name, "PING"))
        op->kind = CP_NATS_PING;
    else if (op_is(name, "PONG"))
        op->kind = CP_NATS_PONG;
    else if (op_is(name, "+OK"))
        op->kind = CP_NATS_OK;
    else if (op_is(name, "-ERR"))
        op->kind = CP_NATS_ERR;
    else if (op_is(name, "INFO"))
        op->kind = CP_NATS_INFO;
    else
        return -EPROTO;
    if (op->kind == CP_NATS_INFO || op->kind == CP_NATS_ERR)
        rest_of_line(line, n, name, op->kind == CP_NATS_ERR, &op->data, &op->len);
    return 0;
}

long cp__nats_parse(const uint8_t *buf, size_t n, size_t max_payload, cp_nats_op *op)
{
    size_t look = n < CP_NATS_CONTROL_MAX + 2 ? n : CP_NATS_CONTROL_MAX + 2;
    const uint8_t *lf = memchr(buf, '\n', look);
    if (!lf)
        return n >= CP_NATS_CONTROL_MAX + 2 ? -EPROTO : 0;
    size_t line_n = (size_t)(lf - buf);
    if (line_n == 0 || buf[line_n - 1] != '\r')
        return -EPROTO;
    line_n--; /* without the CR */
    const char *line = (const char *)buf;
    size_t head = line_n + 2;
    span name;
    if (split_args(line, line_n, &name, 1) == 0)
        return -EPROTO; /* an empty line (-1, more than a name, is fine here) */
    if (op_is(name, "MSG")) {
        long body = parse_msg(line, line_n, buf + head, n - head, max_payload, op);
        return body > 0 ? (long)head + body : body;
    }
    if (parse_simple(line, line_n, name, op) < 0)
        return -EPROTO;
    return (long)head;
}

/* ------------------------------------------------------------------ names */

static int name_char_ok(char c) { return c > ' ' && c < 0x7f; }

int cp__nats_subject_ok(const char *s, int wildcards)
{
    if (!s || !*s)
        return 0;
    /* One pass, token by token: n counts the token's bytes, wild says it
     * held a wildcard character. */
    size_t n = 0;
    int wild = 0;
    char first = 0;
    for (const char *p = s;; p++) {
        char c = *p;
        if (c != '.' && c != '\0') {
            if (!name_char_ok(c))
                return 0;
            if (n++ == 0)
                first = c;
            wild |= c == '*' || c == '>';
            continue;
        }
        if (n == 0)
            return 0; /* an empty token: a leading, trailing or double dot */
        if (wild && (!wildcards || n != 1 || (first == '>' && c != '\0')))
            return 0; /* a wildcard is a whole token; '>' only the last */
        if (c == '\0')
            return 1;
        n = 0;
        wild = 0;
    }
}

int cp__nats_queue_ok(const char *s)
{
    if (!s || !*s)
        return 0;
    for (; *s; s++)
        if (!name_char_ok(*s))
            return 0;
    return 1;
}

/* ------------------------------------------------------------------ client ops */

/* snprintf's result as a length: 0 when it did not fit. */
static size_t fitted(int r, size_t cap) { return r > 0 && (size_t)r < cap ? (size_t)r : 0; }

/* len in decimal at out; its length. */
static size_t put_decimal(char *out, uint64_t v)
{
    char tmp[20];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

/* Written by hand, not with snprintf: it runs once per publish, and
 * snprintf was a tenth of a publish's cost. */
size_t cp__nats_pub_head(char *out, size_t cap, const char *subject, size_t len)
{
    size_t sn = strlen(subject);
    if (sn + 4 + 1 + 20 + 2 >= cap)
        return 0;
    memcpy(out, "PUB ", 4);
    memcpy(out + 4, subject, sn);
    size_t n = 4 + sn;
    out[n++] = ' ';
    n += put_decimal(out + n, len);
    out[n++] = '\r';
    out[n++] = '\n';
    out[n] = '\0';
    return n;
}

size_t cp__nats_sub(char *out, size_t cap, const char *subject, const char *queue, uint64_t sid)
{
    if (queue && *queue)
        return fitted(snprintf(out, cap, "SUB %s %s %llu\r\n", subject, queue, (unsigned long long)sid), cap);
    return fitted(snprintf(out, cap, "SUB %s %llu\r\n", subject, (unsigned long long)sid), cap);
}

size_t cp__nats_unsub(char *out, size_t cap, uint64_t sid)
{
    return fitted(snprintf(out, cap, "UNSUB %llu\r\n", (unsigned long long)sid), cap);
}

size_t cp__nats_connect(char *out, size_t cap, const char *name)
{
    return fitted(snprintf(out, cap,
                           "CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"headers\":false,"
                           "\"lang\":\"c\",\"version\":\"cport\",\"protocol\":1,\"name\":\"%s\"}\r\n",
                           name ? name : "cport"),
                  cap);
}
