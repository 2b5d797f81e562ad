/* SPDX-License-Identifier: MIT */
/*
 * The graceful close (cp_session_shutdown) against the hard one
 * (cp_session_disconnect): what was sent before a shutdown reaches the peer,
 * then the end of the stream; nothing is accepted after it; the peer's FIN or
 * the deadline ends the session with CP_REASON_LOCAL.
 */
#include "helpers.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define ID_KICK 7
#define ID_BYE 8
#define ID_DATA 9

enum kick_mode { KICK_SHUTDOWN, KICK_DISCONNECT };

/* On a KICK packet: sends "bye" and closes, the way the test's ctx->user says. */
static int kick_on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    cpt_track *t = cp_session_ctx(s);
    cpt_on_packet(s, id, body, len); /* counts; the env has no echo */
    if (id != ID_KICK)
        return 0;
    cpt_enter(s);
    static const char bye[] = "you are kicked";
    cp_sendbuf *b = cp_packet_make(ID_BYE, bye, sizeof bye);
    if (!b || cp_session_send(s, b) != 0)
        atomic_fetch_add(&t->failures, 1);
    cp_sendbuf_unref(b);
    enum kick_mode mode = (enum kick_mode)(intptr_t)t->user;
    int rc = mode == KICK_SHUTDOWN ? cp_session_shutdown(s, 5000) : cp_session_disconnect(s);
    if (rc != 0)
        atomic_fetch_add(&t->failures, 1);
    /* Nothing is accepted once the close has begun, gracefully or not. */
    if (cp_session_send_copy(s, "late", 4) != -ENOTCONN || cp_session_connected(s))
        atomic_fetch_add(&t->failures, 1);
    if (mode == KICK_SHUTDOWN && cp_session_shutdown(s, 5000) != -ENOTCONN)
        atomic_fetch_add(&t->failures, 1);
    cpt_leave(s);
    return 0;
}

static void kick_env(cpt_env *e, enum kick_mode mode, int workers)
{
    cp_handlers h = cpt_track_handlers();
    h.on_packet = kick_on_packet;
    cpt_env_start(e, workers, NULL, &h, 256, CPT_NO_ECHO);
    e->t->user = (void *)(intptr_t)mode;
}

/* The acceptance check: 100 clients, each kicked with a packet queued right
 * before cp_session_shutdown; every one reads the packet, then the end of the
 * stream, and the server reports CP_REASON_LOCAL with no error. */
Test(shutdown, packet_sent_before_shutdown_arrives_before_the_close, .timeout = 60)
{
    cpt_env e;
    kick_env(&e, KICK_SHUTDOWN, 2);
    int got = 0;
    for (int i = 0; i < 100; i++) {
        int fd = cpt_xconnect(e.sport);
        cpt_xsend_packet(fd, ID_KICK, NULL, 0);
        uint16_t id = 0;
        char body[64];
        size_t len = 0;
        if (cpt_recv_packet(fd, &id, body, sizeof body, &len) == 0 && id == ID_BYE &&
            len == sizeof "you are kicked")
            got++;
        /* ... and then the end of the stream, not a reset. */
        cr_assert_eq(cpt_recv_once(fd, body, sizeof body), 0, "client %d: EOF after the packet", i);
        cpt_close(fd);
    }
    cr_assert_eq(got, 100, "%d of 100 clients got the packet sent before the shutdown", got);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 100, 5000, "every session ended");
    cr_assert_eq(atomic_load(&e.t->reasons[CP_REASON_LOCAL]), 100);
    for (int i = 0; i < 100; i++)
        cr_assert_eq(atomic_load(&e.t->recs[i].err), 0, "closed by the peer's FIN, not the deadline");
    cpt_env_stop(&e);
}

/* Sends from the test's thread, then the shutdown from that thread too: a
 * queue far larger than the socket buffers is written to the end (the client
 * reads slowly at first), in order, and only then comes the end of stream. */
Test(shutdown, large_queue_from_another_thread_is_written_before_the_fin, .timeout = 60)
{
    cpt_env e;
    cp_server_opts o = { 0 };
    o.session.send_queue_limit = 16u << 20;
    cpt_env_start(&e, 2, &o, NULL, 8, CPT_KEEP_REFS | CPT_NO_ECHO);
    int fd = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 2000, "connected");
    cp_session *s = e.t->recs[0].s;
    enum { N = 4000, BODY = 1000 };
    uint8_t body[BODY];
    for (uint32_t i = 0; i < N; i++) {
        cpt_fill(body, sizeof body, (uint64_t)i * BODY, 5);
        cp_sendbuf *b = cp_packet_make(ID_DATA, body, sizeof body);
        cr_assert_not_null(b);
        cr_assert_eq(cp_session_send(s, b), 0);
        cp_sendbuf_unref(b);
    }
    uint64_t t0 = cpt_now_ms();
    cr_assert_eq(cp_session_shutdown(s, 30000), 0);
    cr_assert_eq(cp_session_send_copy(s, "x", 1), -ENOTCONN, "no send after the shutdown");
    cr_assert_eq(cp_session_shutdown(s, 10000), -ENOTCONN);
    cpt_xwrites_stalled(e.svc); /* the server meets a full socket buffer */
    for (uint32_t i = 0; i < N; i++) {
        uint16_t id;
        size_t len;
        uint8_t got[BODY];
        cr_assert_eq(cpt_recv_packet(fd, &id, got, sizeof got, &len), 0, "packet %u arrived", i);
        cr_assert_eq(id, ID_DATA);
        cr_assert_eq(len, (size_t)BODY);
        cr_assert_eq(cpt_check_pattern(got, len, (uint64_t)i * BODY, 5), -1, "packet %u intact", i);
    }
    char tail[8];
    cr_assert_eq(cpt_recv_once(fd, tail, sizeof tail), 0, "the end of stream follows the data");
    uint64_t t_eof = cpt_now_ms() - t0;
    cpt_close(fd);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 5000, "the peer's FIN ended the session");
    cr_assert_eq(atomic_load(&e.t->recs[0].reason), CP_REASON_LOCAL);
    cr_assert_eq(atomic_load(&e.t->recs[0].err), 0,
                 "closed by the peer's FIN, not with %d (EOF seen %llu ms after the shutdown)",
                 atomic_load(&e.t->recs[0].err), (unsigned long long)t_eof);
    cpt_env_stop(&e);
}

/* A peer that reads nothing: the queue never drains, and the deadline closes
 * the session hard, on time. */
Test(shutdown, deadline_closes_a_peer_that_does_not_read, .timeout = 30)
{
    cpt_env e;
    cp_server_opts o = { 0 };
    o.session.send_queue_limit = 16u << 20;
    cpt_env_start(&e, 2, &o, NULL, 8, CPT_KEEP_REFS | CPT_NO_ECHO);
    int fd = cpt_connect(CPT_HOST4, e.sport, 4096);
    cr_assert_geq(fd, 0);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 2000, "connected");
    cp_session *s = e.t->recs[0].s;
    static uint8_t big[60000];
    for (int i = 0; i < 100; i++) {
        cp_sendbuf *b = cp_packet_make(ID_DATA, big, sizeof big);
        cr_assert_eq(cp_session_send(s, b), 0);
        cp_sendbuf_unref(b);
    }
    uint64_t t0 = cpt_now_ms();
    cr_assert_eq(cp_session_shutdown(s, 500), 0);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 5000, "the deadline ended the session");
    uint64_t took = cpt_now_ms() - t0;
    cr_assert(took >= 450 && took < 1500, "closed %llu ms after a 500 ms shutdown", (unsigned long long)took);
    cr_assert_eq(atomic_load(&e.t->recs[0].reason), CP_REASON_LOCAL);
    cr_assert_eq(atomic_load(&e.t->recs[0].err), -ETIMEDOUT);
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* A peer that reads everything and sees the end of the stream but keeps its
 * socket open is closed at the deadline too; one that keeps sending while the
 * server drains has its bytes dropped, gets everything, and its FIN ends the
 * session. */
Test(shutdown, peer_that_keeps_sending_is_drained_then_closed_by_its_fin, .timeout = 30)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 8, CPT_KEEP_REFS | CPT_NO_ECHO);
    int fd = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 2000, "connected");
    cp_session *s = e.t->recs[0].s;
    cp_sendbuf *b = cp_packet_make(ID_BYE, "bye", 3);
    cr_assert_eq(cp_session_send(s, b), 0);
    cp_sendbuf_unref(b);
    cr_assert_eq(cp_session_shutdown(s, 3000), 0);
    static uint8_t junk[32768];
    for (int i = 0; i < 20; i++)
        cpt_xsend(fd, junk, sizeof junk); /* a stream of garbage the server drops unparsed */
    cpt_xrecv_packet_eq(fd, ID_BYE, "bye", 3);
    char tail[8];
    cr_assert_eq(cpt_recv_once(fd, tail, sizeof tail), 0, "the end of stream follows the packet");
    long long packets = atomic_load(&e.t->packets);
    cr_assert_eq(packets, 0, "nothing the peer sent while draining reached a handler");
    cpt_sleep_ms(100); /* a sleep: a close before the FIN or the 3 s deadline would show in this window */
    cr_assert_eq(atomic_load(&e.t->disconnected), 0, "open until the peer closes or the deadline");
    cpt_close(fd);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 2000, "the peer's FIN ended the session");
    cr_assert_eq(atomic_load(&e.t->recs[0].reason), CP_REASON_LOCAL);
    cr_assert_eq(atomic_load(&e.t->recs[0].err), 0);
    cpt_env_stop(&e);
}

/* Arguments, and the hard close still available during a graceful one. */
Test(shutdown, bad_arguments_and_hard_close_while_draining, .timeout = 30)
{
    cr_assert_eq(cp_session_shutdown(NULL, 1000), -EINVAL);
    cpt_env e;
    cp_server_opts o = { 0 };
    o.session.send_queue_limit = 16u << 20;
    cpt_env_start(&e, 1, &o, NULL, 8, CPT_KEEP_REFS | CPT_NO_ECHO);
    int fd = cpt_connect(CPT_HOST4, e.sport, 4096);
    cr_assert_geq(fd, 0);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 2000, "connected");
    cp_session *s = e.t->recs[0].s;
    cr_assert_eq(cp_session_shutdown(s, 0), -EINVAL, "a graceful close needs a deadline");
    static uint8_t big[60000];
    cp_sendbuf *b = cp_packet_make(ID_DATA, big, sizeof big);
    for (int i = 0; i < 50; i++)
        cr_assert_eq(cp_session_send(s, b), 0);
    cp_sendbuf_unref(b);
    cr_assert_eq(cp_session_shutdown(s, 60000), 0);
    cpt_sleep_ms(50); /* a sleep: an early end of the drain would show in this window */
    cr_assert_eq(atomic_load(&e.t->disconnected), 0, "the peer reads nothing: still draining");
    cr_assert_eq(cp_session_disconnect(s), 0, "the hard close ends a graceful one");
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 2000, "closed at once");
    cr_assert_eq(atomic_load(&e.t->recs[0].reason), CP_REASON_LOCAL);
    cr_assert_eq(cp_session_shutdown(s, 1000), -ENOTCONN);
    cpt_close(fd);
    cpt_env_stop(&e);
}
