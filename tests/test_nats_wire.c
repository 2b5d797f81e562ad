/* SPDX-License-Identifier: MIT */
/*
 * The NATS protocol as the bus reads and writes it (src/bus/nats_wire.c): each
 * server operation parsed whole, in any case, split anywhere (0 until it is
 * complete), binary payloads with CR and LF inside, and malformed input
 * refused with -EPROTO or -EMSGSIZE instead of being buffered or misread.
 * No sockets: runs once.
 */
#include "helpers.h"

#include "bus/nats_wire.h"

#include <errno.h>
#include <string.h>

#define MAXP (1024u * 1024u)

static long parse_str(const char *s, cp_nats_op *op)
{
    return cp__nats_parse((const uint8_t *)s, strlen(s), MAXP, op);
}

Test(nats_wire, parses_every_server_operation, .timeout = 10)
{
    cp_nats_op op;
    cr_assert_eq(parse_str("PING\r\n", &op), 6);
    cr_assert_eq(op.kind, CP_NATS_PING);
    cr_assert_eq(parse_str("pong\r\n", &op), 6);
    cr_assert_eq(op.kind, CP_NATS_PONG);
    cr_assert_eq(parse_str("+OK\r\n", &op), 5);
    cr_assert_eq(op.kind, CP_NATS_OK);
    cr_assert_eq(parse_str("-ERR 'Slow Consumer'\r\n", &op), 22);
    cr_assert_eq(op.kind, CP_NATS_ERR);
    cr_assert_eq(op.len, 13);
    cr_assert_eq(memcmp(op.data, "Slow Consumer", 13), 0);
    const char *info = "INFO {\"server_id\":\"x\",\"max_payload\":1048576} \r\n";
    cr_assert_eq(parse_str(info, &op), (long)strlen(info));
    cr_assert_eq(op.kind, CP_NATS_INFO);
    cr_assert_eq(op.len, strlen("{\"server_id\":\"x\",\"max_payload\":1048576}"));
    cr_assert_eq(op.data[0], '{');
}

Test(nats_wire, msg_with_and_without_reply_and_a_binary_payload, .timeout = 10)
{
    cp_nats_op op;
    static const char m1[] = "MSG room.a 7 5\r\na\r\nb\0\r\n";
    cr_assert_eq(cp__nats_parse((const uint8_t *)m1, sizeof m1 - 1, MAXP, &op), (long)sizeof m1 - 1);
    cr_assert_eq(op.kind, CP_NATS_MSG);
    cr_assert_eq(op.subject_len, 6);
    cr_assert_eq(memcmp(op.subject, "room.a", 6), 0);
    cr_assert_eq(op.sid, 7);
    cr_assert_eq(op.reply_len, 0);
    cr_assert_eq(op.len, 5);
    cr_assert_eq(memcmp(op.data, "a\r\nb\0", 5), 0);
    cr_assert_eq(parse_str("msg\tq 12  _INBOX.x   0\r\n\r\n", &op), 26);
    cr_assert_eq(op.sid, 12);
    cr_assert_eq(op.reply_len, 8);
    cr_assert_eq(memcmp(op.reply, "_INBOX.x", 8), 0);
    cr_assert_eq(op.len, 0);
}

Test(nats_wire, an_operation_split_anywhere_waits_for_the_rest, .timeout = 10)
{
    static const char two[] = "MSG s 1 3\r\nabc\r\nPING\r\n";
    size_t first = strlen("MSG s 1 3\r\nabc\r\n");
    for (size_t cut = 0; cut < first; cut++) {
        cp_nats_op op;
        cr_assert_eq(cp__nats_parse((const uint8_t *)two, cut, MAXP, &op), 0, "cut at %zu", cut);
    }
    cp_nats_op op;
    long r = cp__nats_parse((const uint8_t *)two, sizeof two - 1, MAXP, &op);
    cr_assert_eq(r, (long)first);
    cr_assert_eq(cp__nats_parse((const uint8_t *)two + r, sizeof two - 1 - (size_t)r, MAXP, &op), 6);
    cr_assert_eq(op.kind, CP_NATS_PING);
}

Test(nats_wire, malformed_input_is_refused, .timeout = 10)
{
    cp_nats_op op;
    const char *bad[] = {
        "HELLO\r\n",                        /* unknown operation */
        "HMSG s 1 2 4\r\nab\r\n",           /* headers were never asked for */
        "PING\n",                           /* LF without CR */
        "\r\n",                             /* empty line */
        "MSG s 1\r\n",                      /* no size */
        "MSG s x 1\r\na\r\n",               /* sid not a number */
        "MSG s 1 -1\r\n",                   /* negative size */
        "MSG s 1 a b 1\r\n",                /* too many arguments */
        "MSG s 1 3\r\nabcd\r\n",            /* payload longer than its size */
        "MSG s 1 99999999999999999999\r\n", /* size overflows */
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        cr_assert_eq(parse_str(bad[i], &op), -EPROTO, "%s", bad[i]);
    cr_assert_eq(cp__nats_parse((const uint8_t *)"MSG s 1 11\r\n", 12, 10, &op), -EMSGSIZE);
}

Test(nats_wire, a_control_line_has_a_limit, .timeout = 10)
{
    static uint8_t buf[CP_NATS_CONTROL_MAX + 8];
    memset(buf, 'A', sizeof buf);
    cp_nats_op op;
    /* Without an end of line, more bytes are awaited until the limit. */
    cr_assert_eq(cp__nats_parse(buf, CP_NATS_CONTROL_MAX, MAXP, &op), 0);
    cr_assert_eq(cp__nats_parse(buf, sizeof buf, MAXP, &op), -EPROTO);
    /* A line of exactly the limit is read. */
    memcpy(buf, "INFO ", 5);
    buf[CP_NATS_CONTROL_MAX] = '\r';
    buf[CP_NATS_CONTROL_MAX + 1] = '\n';
    cr_assert_eq(cp__nats_parse(buf, CP_NATS_CONTROL_MAX + 2, MAXP, &op), (long)CP_NATS_CONTROL_MAX + 2);
    cr_assert_eq(op.kind, CP_NATS_INFO);
}

Test(nats_wire, subjects_and_queue_names, .timeout = 10)
{
    cr_assert(cp__nats_subject_ok("room.1", 0));
    cr_assert(cp__nats_subject_ok("a", 0));
    cr_assert(!cp__nats_subject_ok("", 0));
    cr_assert(!cp__nats_subject_ok(".a", 0));
    cr_assert(!cp__nats_subject_ok("a.", 0));
    cr_assert(!cp__nats_subject_ok("a..b", 0));
    cr_assert(!cp__nats_subject_ok("a b", 0));
    cr_assert(!cp__nats_subject_ok("a\r\nPUB", 0));
    cr_assert(!cp__nats_subject_ok("a.*", 0));
    cr_assert(cp__nats_subject_ok("a.*", 1));
    cr_assert(cp__nats_subject_ok("a.*.c", 1));
    cr_assert(cp__nats_subject_ok("a.>", 1));
    cr_assert(cp__nats_subject_ok(">", 1));
    cr_assert(!cp__nats_subject_ok("a.>.c", 1));
    cr_assert(!cp__nats_subject_ok("a.b*", 1));
    cr_assert(cp__nats_queue_ok("match"));
    cr_assert(!cp__nats_queue_ok(""));
    cr_assert(!cp__nats_queue_ok("a b"));
}

Test(nats_wire, client_operations_are_formatted_or_refused_when_too_long, .timeout = 10)
{
    char out[128];
    cr_assert_eq(cp__nats_pub_head(out, sizeof out, "room.1", 42), strlen("PUB room.1 42\r\n"));
    cr_assert_str_eq(out, "PUB room.1 42\r\n");
    cr_assert_eq(cp__nats_sub(out, sizeof out, "mm", "workers", 3), strlen("SUB mm workers 3\r\n"));
    cr_assert_str_eq(out, "SUB mm workers 3\r\n");
    cr_assert_eq(cp__nats_sub(out, sizeof out, "mm", NULL, 4), strlen("SUB mm 4\r\n"));
    cr_assert_eq(cp__nats_unsub(out, sizeof out, 4), strlen("UNSUB 4\r\n"));
    char line[512];
    size_t n = cp__nats_connect(line, sizeof line, "srv");
    cr_assert(n > 0 && strstr(line, "\"echo\":false") && strstr(line, "\"verbose\":false"));
    cr_assert_eq(memcmp(line, "CONNECT {", 9), 0);
    cr_assert_eq(memcmp(line + n - 3, "}\r\n", 3), 0);
    cr_assert_eq(cp__nats_connect(out, sizeof out, "srv"), 0, "too long for 128 bytes: refused, not cut");
    cr_assert_eq(cp__nats_pub_head(out, 8, "room.1", 42), 0);
}
