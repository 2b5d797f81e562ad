/* SPDX-License-Identifier: MIT */
/*
 * fuzz_redis: what the bus does with what a Redis server sends it
 * (src/bus/redis.c: hiredis's reader, then the bus's handling of each reply:
 * pushes of messages, pongs, errors, replies to PUBLISH) under libFuzzer.
 *
 * A real bus is made once on a real port, for redis://127.0.0.1:1 (nothing
 * listens there: it keeps retrying in the background, and its connections
 * never come up), with subscriptions to "a" and "room.b". Each input is a
 * byte stream, cut at byte 0's value into two pieces, fed to the subscribing
 * connection's reader as a server's bytes arrive. Checks: a delivery names a
 * subscribed subject, as a C string, and only reaches that subject's
 * subscription; a payload tagged with the bus's own origin never comes
 * back; and AddressSanitizer watches every access of the reader and the
 * handling. After each input the readers are freed, as when a connection
 * ends.
 */
#include "bus/bus.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static cp_port *g_port;
static cp_bus *g_bus;
static const char *const g_subjects[2] = { "a", "room.b" };
static cp_bus_sub *g_subs[2];

static void on_msg(void *arg, const cp_bus_msg *m)
{
    const char *want = arg;
    if (strcmp(m->subject, want) != 0 || (m->len && !m->data) || !m->reply)
        abort();
    if (m->len >= 12 && !memcmp(m->data, "cpo\x01", 4) && cp_get_u64(m->data + 4) == g_bus->origin)
        abort(); /* the tag is removed, and our own are dropped */
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    cp_port_opts po = { .workers = 1, .backend = CP_BACKEND_EPOLL };
    cp_bus_opts bo = { .url = "redis://127.0.0.1:1", .reconnect_max_ms = 2000 };
    if (cp_port_create(&g_port, &po) != 0 || cp_bus_create(&g_bus, g_port, &bo) != 0)
        abort();
    for (int i = 0; i < 2; i++)
        if (cp_bus_subscribe(&g_subs[i], g_bus, g_subjects[i], NULL, on_msg, (void *)g_subjects[i], NULL) !=
            0)
            abort();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t cut = data[0] < size - 1 ? data[0] : size - 1;
    const uint8_t *p = data + 1;
    size_t n = size - 1;
    int r = cp__bus_redis_feed(g_bus, 0, p, cut);
    if (r == 0)
        r = cp__bus_redis_feed(g_bus, 0, p + cut, n - cut);
    /* The publishing connection reads the same bytes as replies to PUBLISH. */
    if (cp__bus_redis_feed(g_bus, 1, p, n) < 0 && r == 0)
        r = 1;
    (void)r;
    cp__bus_redis_conn_closed(g_bus, 0);
    cp__bus_redis_conn_closed(g_bus, 1);
    return 0;
}
