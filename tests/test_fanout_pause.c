/* SPDX-License-Identifier: MIT */
/*
 * The pause after fan-out (cp_port_opts.fanout_pause_pct): a worker busy
 * with a room's broadcasts pauses between rounds, and loses and reorders
 * nothing; request and reply traffic never makes it pause, however busy;
 * off means off; percentages out of range are refused. One worker, so that
 * every broadcast is its own.
 */
#include "helpers.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define CLIENTS 48
#define PER_CLIENT 100
#define ROOM_ID 7

static cp_group *room;
static atomic_int failed_adds;

static void room_connected(cp_session *s)
{
    cpt_on_connected(s);
    if (cp_group_add(room, s) != 0)
        atomic_fetch_add(&failed_adds, 1);
}

/* Every packet goes to every member, as it came. */
static int room_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    cpt_enter(s);
    cp_sendbuf *b = cp_sendbuf_copy(body - CP_PACKET_HEADER, len + CP_PACKET_HEADER);
    int rc = b && id == ROOM_ID ? 0 : -1;
    if (b) {
        cp_group_broadcast(room, b);
        cp_sendbuf_unref(b);
    }
    cpt_leave(s);
    return rc;
}

typedef struct body {
    uint32_t sender, seq;
} body;

/* Sends PER_CLIENT packets from each client, round-robin, one every 100 us:
 * the worker's rounds then hold a receive or a few and a write to every
 * member, the shape of a room under load. */
static void send_room_traffic(const int *fds)
{
    for (uint32_t seq = 0; seq < PER_CLIENT; seq++)
        for (uint32_t c = 0; c < CLIENTS; c++) {
            body b = { c, seq };
            cpt_xsend_packet(fds[c], ROOM_ID, &b, sizeof b);
            cpt_sleep_us(100);
        }
}

/* Every client gets every packet of every sender, each sender's in order.
 * Read in bulk: a packet at a time, 460,000 reads took a minute under Wine. */
#define ROOM_PACKET (CP_PACKET_HEADER + sizeof(body))

static void expect_every_delivery(const int *fds)
{
    static uint8_t buf[64 * 1024];
    for (int c = 0; c < CLIENTS; c++) {
        uint32_t next[CLIENTS] = { 0 };
        size_t have = 0;
        for (int i = 0; i < CLIENTS * PER_CLIENT;) {
            ssize_t n = cpt_recv_some(fds[c], buf + have, sizeof buf - have);
            cr_assert_gt(n, 0, "client %d: delivery %d of %d: %zd", c, i, CLIENTS * PER_CLIENT, n);
            have += (size_t)n;
            size_t at = 0;
            for (; have - at >= ROOM_PACKET; at += ROOM_PACKET, i++) {
                body b;
                memcpy(&b, buf + at + CP_PACKET_HEADER, sizeof b);
                cr_assert(cp_get_u16(buf + at) == ROOM_PACKET && cp_get_u16(buf + at + 2) == ROOM_ID &&
                              b.sender < CLIENTS,
                          "client %d: a foreign packet", c);
                cr_assert_eq(b.seq, next[b.sender], "client %d: sender %u's packet %u came as its %u", c,
                             b.sender, b.seq, next[b.sender]);
                next[b.sender]++;
            }
            memmove(buf, buf + at, have - at);
            have -= at;
        }
        cr_assert_eq(have, 0, "client %d: bytes after the last delivery", c);
    }
}

static cp_worker_metrics room_run(int pause_pct)
{
    cpt_env e;
    cr_assert_eq(cp_group_create(&room), 0);
    cp_handlers h = cpt_track_handlers();
    h.on_connected = room_connected;
    h.on_packet = room_packet;
    cpt_env_start_on(&e, &(cp_port_opts){ .workers = 1, .fanout_pause_pct = pause_pct }, NULL, &h, CLIENTS,
                     0);
    int fds[CLIENTS];
    for (int c = 0; c < CLIENTS; c++)
        fds[c] = cpt_xconnect(e.sport);
    CPT_AWAIT(cp_group_size(room) == CLIENTS, 5000, "%zu of %d clients in the room", cp_group_size(room),
              CLIENTS);
    cr_assert_eq(atomic_load(&failed_adds), 0);
    send_room_traffic(fds);
    expect_every_delivery(fds);
    cp_worker_metrics m;
    cr_assert_eq(cp_port_metrics_get(e.port, -1, &m), 0);
    for (int c = 0; c < CLIENTS; c++)
        cpt_close(fds[c]);
    cpt_env_stop(&e);
    cp_group_destroy(room);
    return m;
}

/* The default: rounds that write to the whole room pause, for at most the
 * 1 ms cap each, and the room gets everything in order. Windows workers
 * never pause (cport.h). */
Test(fanout_pause, a_busy_room_pauses_and_loses_nothing, .timeout = 60)
{
    cp_worker_metrics m = room_run(0);
#ifdef _WIN32
    cr_expect_eq(m.fanout_pauses, 0, "a Windows worker paused %llu times",
                 (unsigned long long)m.fanout_pauses);
#else
    cr_expect_gt(m.fanout_pauses, 0, "a worker writing to a 48-member room after each packet never paused");
    cr_expect_gt(m.fanout_pause_ns, 0, "%llu pauses of no length", (unsigned long long)m.fanout_pauses);
    cr_expect_leq(m.fanout_pause_ns, m.fanout_pauses * 1000000u, "%llu pauses took %llu ns, over 1 ms each",
                  (unsigned long long)m.fanout_pauses, (unsigned long long)m.fanout_pause_ns);
#endif
}

/* Off: the same room, never a pause. */
Test(fanout_pause, off_never_pauses, .timeout = 60)
{
    cp_worker_metrics m = room_run(-1);
    cr_expect_eq(m.fanout_pauses, 0, "paused %llu times with the pause off",
                 (unsigned long long)m.fanout_pauses);
    cr_expect_eq(m.fanout_pause_ns, 0);
}

/* Echo: rounds write to as many sessions as they read from; waiting would
 * only delay the replies. 128 clients send at once, so epoll's rounds do
 * write to 32 sessions and more (io_uring's take 64 completions, about half
 * of them receives, and stay near 32). */
#define ECHO_CLIENTS 128
typedef struct echo_client {
    int fd;
    pthread_t th;
} echo_client;

static void *echo_burst(void *arg)
{
    echo_client *c = arg;
    uint8_t out[PER_CLIENT * 12], in[sizeof out];
    for (int i = 0; i < PER_CLIENT; i++) {
        body b = { (uint32_t)c->fd, (uint32_t)i };
        cpt_put_header(out + i * 12, 12, ROOM_ID);
        memcpy(out + i * 12 + 4, &b, sizeof b);
    }
    for (int round = 0; round < 20; round++) {
        if (cpt_send_all(c->fd, out, sizeof out) != 0 || cpt_recv_exact(c->fd, in, sizeof in) != 0 ||
            memcmp(in, out, sizeof in) != 0)
            return (void *)1;
    }
    return NULL;
}

Test(fanout_pause, request_and_reply_never_pauses, .timeout = 60)
{
    cpt_env e;
    cpt_env_start(&e, 1, NULL, NULL, ECHO_CLIENTS, 0);
    echo_client cl[ECHO_CLIENTS];
    for (int c = 0; c < ECHO_CLIENTS; c++)
        cl[c].fd = cpt_xconnect(e.sport);
    for (int c = 0; c < ECHO_CLIENTS; c++)
        cr_assert_eq(pthread_create(&cl[c].th, NULL, echo_burst, &cl[c]), 0);
    int bad = 0;
    for (int c = 0; c < ECHO_CLIENTS; c++) {
        void *r;
        pthread_join(cl[c].th, &r);
        bad += r != NULL;
    }
    cr_expect_eq(bad, 0, "%d clients did not get their bytes back exact", bad);
    cp_worker_metrics m;
    cr_assert_eq(cp_port_metrics_get(e.port, -1, &m), 0);
    cr_expect_eq(m.fanout_pauses, 0, "echo paused %llu times", (unsigned long long)m.fanout_pauses);
    for (int c = 0; c < ECHO_CLIENTS; c++)
        cpt_close(cl[c].fd);
    cpt_env_stop(&e);
}

Test(fanout_pause, percentages_out_of_range_are_refused, .timeout = 30)
{
    cpt_leak_mark mark;
    cpt_leak_begin(&mark);
    static const int bad[] = { -2, 101, -100, 1000 };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cp_port *port = (cp_port *)&port;
        cp_port_opts o = { .workers = 1, .backend = cpt_env_backend(), .fanout_pause_pct = bad[i] };
        cr_expect_eq(cp_port_create(&port, &o), -EINVAL, "fanout_pause_pct %d", bad[i]);
        cr_expect(port == NULL, "a refused create left a port");
    }
    static const int good[] = { -1, 0, 1, 100 };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        cpt_xport_destroy(cpt_xport_opts(&(cp_port_opts){ .workers = 1, .fanout_pause_pct = good[i] }));
    cpt_leak_end(&mark);
}
