/* SPDX-License-Identifier: MIT */
/* Session timeouts: idle and partial-packet, firing and not firing. */
#include "helpers.h"

#include <string.h>

static void start_env(cpt_env *e, uint32_t idle_ms, uint32_t packet_ms)
{
    cp_server_opts o = { .host = CPT_HOST4 };
    o.session.idle_timeout_ms = idle_ms;
    o.session.packet_timeout_ms = packet_ms;
    cpt_env_start(e, 0, &o, NULL, 64, 0);
}

/* The connection is up and its session has started its timers. */
static int connect_tracked(cpt_env *e)
{
    int fd = cpt_xconnect(e->sport);
    CPT_AWAIT(atomic_load(&e->t->connected) == 1, 2000, "the session did not connect");
    return fd;
}

static void expect_one_disconnect(cpt_env *e, cp_reason reason)
{
    CPT_AWAIT(atomic_load(&e->t->disconnected) == 1, 2000, "on_disconnected did not run");
    cpt_xsettle(e->svc, e->t);
    cr_expect_eq(atomic_load(&e->t->reasons[reason]), 1, "the session did not end with \"%s\"",
                 cp_reason_str(reason));
}

/* The server closes fd between min_ms and max_ms after t0, and its one
 * session ends with reason. */
static void expect_cut(cpt_env *e, int fd, uint64_t t0, unsigned min_ms, unsigned max_ms, cp_reason reason)
{
    cpt_xclosed(fd, max_ms + 3000);
    uint64_t took = cpt_now_ms() - t0;
    cr_expect_geq(took, min_ms, "cut after %llu ms, before %u ms (%s)", (unsigned long long)took, min_ms,
                  cp_reason_str(reason));
    cr_expect_lt(took, max_ms, "cut only after %llu ms, not before %u ms (%s)", (unsigned long long)took,
                 max_ms, cp_reason_str(reason));
    cpt_close(fd);
    /* The client can see the close before on_disconnected has run. */
    expect_one_disconnect(e, reason);
}

/* Sends 6 bytes of a packet whose header promises 40, and no more; returns
 * when it was sent (ms). */
static uint64_t send_half_packet(int fd)
{
    uint8_t hdr[6];
    cpt_put_header(hdr, 40, 7);
    hdr[4] = hdr[5] = 0xAA;
    uint64_t t0 = cpt_now_ms();
    cpt_xsend(fd, hdr, sizeof hdr);
    return t0;
}

Test(timeouts, half_a_packet_then_silence_is_cut_by_the_packet_timeout, .timeout = 30)
{
    cpt_env e;
    start_env(&e, 0, 200);
    int fd = cpt_xconnect(e.sport);
    uint64_t t0 = send_half_packet(fd);
    expect_cut(&e, fd, t0, 180, 1500, CP_REASON_PACKET_TIMEOUT);
    cpt_env_xneighbour(&e);
    cpt_env_stop(&e);
}

Test(timeouts, an_idle_client_is_cut_by_the_idle_timeout, .timeout = 30)
{
    cpt_env e;
    start_env(&e, 200, 0);
    int fd = cpt_xconnect(e.sport);
    uint64_t t0 = cpt_now_ms();
    expect_cut(&e, fd, t0, 180, 1500, CP_REASON_IDLE_TIMEOUT);
    cpt_env_stop(&e);
}

Test(timeouts, an_active_client_is_never_cut, .timeout = 30)
{
    cpt_env e;
    /* Timeouts ten times the gaps below: this machine's scheduler can stall a
     * thread for 150 ms, and a stall is not what this test is about. */
    start_env(&e, 500, 500);
    int fd = cpt_xconnect(e.sport);
    uint8_t body[32];
    cpt_fill(body, sizeof body, 0, 3);
    /* 1 s of traffic every 50 ms, each packet sent in two halves 20 ms apart:
     * the partial-packet clock restarts with every packet and never runs out,
     * though the whole test lasts twice the timeouts. */
    for (int i = 0; i < 20; i++) {
        uint8_t pkt[36];
        cpt_put_header(pkt, sizeof pkt, 1);
        memcpy(pkt + 4, body, sizeof body);
        cpt_xsend(fd, pkt, 10);
        cpt_sleep_ms(20); /* a sleep: the client sends at a set pace (see above) */
        cpt_xsend(fd, pkt + 10, sizeof pkt - 10);
        cpt_xrecv_packet_eq(fd, 1, body, sizeof body);
        cpt_sleep_ms(30); /* a sleep: likewise */
    }
    cr_expect_eq(cpt_peek_state(fd), 0, "the active client was disconnected");
    cpt_close(fd);
    cpt_xsettle(e.svc, e.t);
    cr_expect_eq(atomic_load(&e.t->reasons[CP_REASON_IDLE_TIMEOUT]), 0);
    cr_expect_eq(atomic_load(&e.t->reasons[CP_REASON_PACKET_TIMEOUT]), 0);
    cpt_env_stop(&e);
}

Test(timeouts, timeouts_off_keep_an_idle_client, .timeout = 30)
{
    cpt_env e;
    start_env(&e, 0, 0);
    int fd = cpt_xconnect(e.sport);
    cpt_sleep_ms(400); /* a sleep: a cut of the idle client would show in this window */
    cr_expect_eq(cpt_peek_state(fd), 0);
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ both timeouts, each at its own deadline */

/* The bug: with both timeouts on, the session's one timer stayed armed for
 * the idle deadline when a packet began, so half a packet and silence was cut
 * at the idle timeout (here 1.5 s), not at the packet timeout (0.6 s). */
Test(timeouts, packet_timeout_waited_for_the_idle_deadline, .timeout = 30)
{
    cpt_env e;
    start_env(&e, 1500, 600);
    int fd = connect_tracked(&e);
    uint64_t t0 = send_half_packet(fd);
    expect_cut(&e, fd, t0, 580, 1000, CP_REASON_PACKET_TIMEOUT);
    cpt_env_stop(&e);
}

/* A client that drips one byte of a packet every 50 ms keeps the idle clock
 * from ever running out; the packet's own deadline still ends it. */
Test(timeouts, a_drip_fed_packet_is_cut_by_the_packet_timeout, .timeout = 30)
{
    cpt_env e;
    start_env(&e, 1500, 600);
    int fd = connect_tracked(&e);
    uint8_t pkt[40];
    cpt_put_header(pkt, sizeof pkt, 7);
    memset(pkt + 4, 0xAA, sizeof pkt - 4);
    uint64_t t0 = cpt_now_ms();
    for (size_t i = 0; i < sizeof pkt - 1; i++) {
        if (cpt_peek_state(fd) == 1 || cpt_send_all(fd, pkt + i, 1) < 0)
            break;
        cpt_sleep_ms(50); /* a sleep: the client drips at a set pace */
    }
    expect_cut(&e, fd, t0, 580, 1000, CP_REASON_PACKET_TIMEOUT);
    cpt_env_stop(&e);
}

Test(timeouts, with_both_timeouts_an_idle_client_is_cut_at_the_idle_deadline, .timeout = 30)
{
    cpt_env e;
    start_env(&e, 1500, 600);
    uint64_t t0 = cpt_now_ms();
    int fd = connect_tracked(&e);
    expect_cut(&e, fd, t0, 1450, 2000, CP_REASON_IDLE_TIMEOUT);
    cpt_env_stop(&e);
}

/* The other way round: the idle deadline of half a packet comes first. */
Test(timeouts, an_idle_deadline_before_the_packet_deadline_cuts_first, .timeout = 30)
{
    cpt_env e;
    start_env(&e, 300, 1500);
    int fd = connect_tracked(&e);
    cpt_sleep_ms(100); /* a sleep: idle time, so that the idle deadline comes before the packet's */
    uint64_t t0 = send_half_packet(fd);
    expect_cut(&e, fd, t0, 280, 1000, CP_REASON_IDLE_TIMEOUT);
    cpt_env_stop(&e);
}

/* A packet finished in time leaves no deadline behind: the timer, armed for
 * the packet, finds it done and waits for the idle deadline. */
Test(timeouts, a_packet_finished_in_time_leaves_the_idle_deadline, .timeout = 30)
{
    cpt_env e;
    start_env(&e, 1000, 300);
    int fd = connect_tracked(&e);
    uint8_t pkt[12];
    cpt_put_header(pkt, sizeof pkt, 3);
    memcpy(pkt + 4, "finished", 8);
    cpt_xsend(fd, pkt, 6);
    cpt_sleep_ms(100); /* a sleep: the packet takes a while, though less than its 300 ms */
    uint64_t t0 = cpt_now_ms();
    cpt_xsend(fd, pkt + 6, sizeof pkt - 6);
    cpt_xrecv_packet_eq(fd, 3, "finished", 8);
    expect_cut(&e, fd, t0, 950, 1500, CP_REASON_IDLE_TIMEOUT);
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ raw_unconsumed_bytes_had_no_start_time */

/* The bug: raw framing kept the bytes on_recv left without noting when they
 * came, so the partial-packet check measured them from time zero and cut the
 * session the first time the timer fired, however young the bytes were. Now
 * they are timed like a packet: from the receive that left them, and afresh
 * whenever on_recv consumes some. */

/* Consumes whole lines only. */
static size_t lines_on_recv(cp_session *s, const uint8_t *data, size_t len)
{
    cpt_enter(s);
    size_t used = 0;
    for (size_t i = 0; i < len; i++)
        if (data[i] == '\n')
            used = i + 1;
    cpt_leave(s);
    return used;
}

Test(timeouts, raw_unconsumed_bytes_had_no_start_time, .timeout = 30)
{
    cpt_env e;
    cp_server_opts o = { .host = CPT_HOST4 };
    o.session.framing = CP_FRAMING_RAW;
    o.session.packet_timeout_ms = 300;
    cp_handlers h = cpt_track_handlers();
    h.on_packet = NULL;
    h.on_recv = lines_on_recv;
    cpt_env_start(&e, 0, &o, &h, 64, 0);
    int fd = connect_tracked(&e);
    uint64_t t0 = cpt_now_ms();
    cpt_xsend(fd, "ab", 2);
    cpt_sleep_ms(200); /* a sleep: a cut before the 300 ms packet timeout would show in this window */
    cr_expect_eq(cpt_peek_state(fd), 0, "cut %llu ms after 2 unconsumed bytes; the packet timeout is 300 ms",
                 (unsigned long long)(cpt_now_ms() - t0));
    uint64_t t1 = cpt_now_ms();
    cpt_xsend(fd, "c\nd", 3); /* a line consumed: "d" starts a new clock */
    expect_cut(&e, fd, t1, 280, 1000, CP_REASON_PACKET_TIMEOUT);
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ first packet */

static void start_first(cpt_env *e, uint32_t first_ms)
{
    cp_server_opts o = { .host = CPT_HOST4 };
    o.session.first_packet_timeout_ms = first_ms;
    cpt_env_start(e, 0, &o, NULL, 64, 0);
}

/* A login that never comes: connected, silent, cut at the deadline. */
Test(timeouts, a_client_that_sends_no_packet_is_cut_by_the_first_packet_timeout, .timeout = 30)
{
    cpt_env e;
    start_first(&e, 200);
    int fd = cpt_xconnect(e.sport);
    uint64_t t0 = cpt_now_ms();
    expect_cut(&e, fd, t0, 180, 1500, CP_REASON_FIRST_PACKET_TIMEOUT);
    cpt_env_stop(&e);
}

/* Half a packet is not a packet: the first packet's deadline still holds. */
Test(timeouts, half_a_first_packet_does_not_meet_the_first_packet_deadline, .timeout = 30)
{
    cpt_env e;
    start_first(&e, 300);
    int fd = cpt_xconnect(e.sport);
    send_half_packet(fd);
    cpt_xclosed(fd, 3000);
    cpt_close(fd);
    expect_one_disconnect(&e, CP_REASON_FIRST_PACKET_TIMEOUT);
    cpt_env_stop(&e);
}

/* A first packet in time lifts the deadline for good: the session then
 * stays silent past it, and is still served. */
Test(timeouts, a_first_packet_in_time_lifts_the_deadline, .timeout = 30)
{
    cpt_env e;
    start_first(&e, 200);
    int fd = cpt_xconnect(e.sport);
    cpt_xsend_packet(fd, 5, "login", 5);
    cpt_xrecv_packet_eq(fd, 5, "login", 5);
    cpt_sleep_ms(600); /* a window in which nothing may happen: three deadlines long */
    cpt_xsend_packet(fd, 6, "still here", 10);
    cpt_xrecv_packet_eq(fd, 6, "still here", 10);
    cr_assert_eq(atomic_load(&e.t->disconnected), 0, "a session past its first packet was cut");
    cpt_close(fd);
    cpt_env_stop(&e);
}
