/* SPDX-License-Identifier: MIT */
/*
 * Packet framing {u16 size, u16 id} little-endian: packets split across any
 * number of reads, many packets in one read, size limits, routing by id,
 * handler refusal.
 */
#include "helpers.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Route 10: body is a u32 sequence number that must follow the previous. */
static int seq_route(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    cpt_track *t = cp_session_ctx(s);
    cpt_enter(s);
    cpt_srec *r = cpt_rec(s);
    uint32_t seq = 0;
    if (id != 10 || len < 4)
        atomic_fetch_add(&t->failures, 1);
    else
        memcpy(&seq, body, 4);
    if ((long long)seq != atomic_load(&r->expect_seq))
        atomic_fetch_add(&t->failures, 1);
    for (size_t i = 4; i < len; i++)
        if (body[i] != (uint8_t)(seq + i)) {
            atomic_fetch_add(&t->failures, 1);
            break;
        }
    atomic_store(&r->expect_seq, (long long)seq + 1);
    atomic_fetch_add(&r->packets, 1);
    atomic_fetch_add(&t->packets, 1);
    cpt_leave(s);
    return 0;
}

static size_t put_seq_packet(uint8_t *p, uint32_t seq, size_t body)
{
    cpt_put_header(p, (uint16_t)(body + 4), 10);
    memcpy(p + 4, &seq, 4);
    for (size_t i = 4; i < body; i++)
        p[4 + i] = (uint8_t)(seq + i);
    return body + 4;
}

static const cp_route g_seq_routes[] = { { 10, seq_route } };

static void seq_env(cpt_env *e, uint32_t max_packet)
{
    cp_server_opts o = { .session.max_packet = max_packet,
                         .session.routes = g_seq_routes,
                         .session.nroutes = 1 };
    cpt_env_start(e, 2, &o, NULL, 8, 0);
}

/* One packet written a byte at a time, each byte its own TCP segment. */
Test(packet, split_byte_by_byte, .timeout = 20)
{
    cpt_env e;
    seq_env(&e, 0);
    int fd = cpt_xconnect(e.sport);
    uint8_t buf[256];
    size_t n = put_seq_packet(buf, 0, 40);
    n += put_seq_packet(buf + n, 1, 60);
    for (size_t i = 0; i < n; i++) {
        cpt_xsend(fd, buf + i, 1);
        cpt_xbytes_in(e.svc, i + 1);
    }
    CPT_AWAIT(atomic_load(&e.t->packets) == 2, 5000, "%lld of 2 packets dispatched",
              atomic_load(&e.t->packets));
    /* A marker: had the bytes above made a third packet, it would come before this one. */
    size_t marker = put_seq_packet(buf, 2, 8);
    cpt_xsend(fd, buf, marker);
    cpt_srec *r = &e.t->recs[0];
    CPT_AWAIT(atomic_load(&r->expect_seq) == 3 && atomic_load(&r->inside) == 0, 5000,
              "the marker packet was not dispatched");
    cr_assert_eq(atomic_load(&e.t->packets), 3);
    cr_assert_eq(atomic_load(&e.t->failures), 0, "a packet reached the handler damaged or out of order");
    cr_assert_eq(cpt_peek_state(fd), 0, "the session was closed");
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* Header split 1+3, 2+2, 3+1 bytes, then the body in two pieces. */
Test(packet, header_split_at_every_point, .timeout = 20)
{
    cpt_env e;
    seq_env(&e, 0);
    int fd = cpt_xconnect(e.sport);
    uint8_t buf[64];
    uint64_t sent = 0;
    for (uint32_t k = 1; k <= 3; k++) {
        size_t n = put_seq_packet(buf, k - 1, 20);
        cpt_xsend(fd, buf, k);
        cpt_xbytes_in(e.svc, sent += k);
        cpt_xsend(fd, buf + k, 4 - k);
        cpt_xbytes_in(e.svc, sent += 4 - k);
        cpt_xsend(fd, buf + 4, 7);
        cpt_xbytes_in(e.svc, sent += 7);
        cpt_xsend(fd, buf + 11, n - 11);
        sent += n - 11;
    }
    CPT_AWAIT(atomic_load(&e.t->packets) == 3, 5000, "%lld of 3 packets", atomic_load(&e.t->packets));
    cr_assert_eq(atomic_load(&e.t->failures), 0);
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* 500 packets in one write (one read on the server, or a few). */
Test(packet, hundreds_of_packets_in_one_read, .timeout = 20)
{
    enum { N = 500 };
    cpt_env e;
    seq_env(&e, 0);
    int fd = cpt_xconnect(e.sport);
    uint8_t *buf = malloc(N * 16);
    size_t n = 0;
    for (uint32_t i = 0; i < N; i++)
        n += put_seq_packet(buf + n, i, 8 + i % 4);
    cpt_xsend(fd, buf, n);
    free(buf);
    CPT_AWAIT(atomic_load(&e.t->packets) == N, 5000, "%lld of %d packets", atomic_load(&e.t->packets), N);
    cr_assert_eq(atomic_load(&e.t->failures), 0);
    CPT_AWAIT(cpt_stats(e.svc).packets_in == N, 2000, "packets_in %llu",
              (unsigned long long)cpt_stats(e.svc).packets_in);
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* A stream of 300 packets of random sizes up to 65535 bytes, written in
 * random-size pieces that cut packets and headers anywhere. */
Test(packet, random_sizes_random_cuts, .timeout = 30)
{
    enum { N = 300 };
    cpt_env e;
    seq_env(&e, 65535);
    int fd = cpt_xconnect(e.sport);
    size_t cap = (size_t)N * 65536;
    uint8_t *buf = malloc(cap);
    cr_assert_not_null(buf);
    size_t n = 0;
    unsigned rnd = 7;
    for (uint32_t i = 0; i < N; i++) {
        rnd = rnd * 1103515245u + 12345u;
        size_t body = i % 10 == 0 ? 65531 : 4 + (rnd >> 8) % 3000;
        n += put_seq_packet(buf + n, i, body);
    }
    size_t off = 0;
    while (off < n) {
        rnd = rnd * 1103515245u + 12345u;
        size_t piece = 1 + (rnd >> 8) % 9000;
        if (piece > n - off)
            piece = n - off;
        cpt_xsend(fd, buf + off, piece);
        off += piece;
    }
    free(buf);
    CPT_AWAIT(atomic_load(&e.t->packets) == N, 10000, "%lld of %d packets", atomic_load(&e.t->packets), N);
    cr_assert_eq(atomic_load(&e.t->failures), 0, "a packet was damaged or out of order");
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* max_packet is inclusive: size == max_packet passes, max_packet + 1 is
 * CP_REASON_TOO_BIG. Default 4096. */
Test(packet, max_packet_boundary, .timeout = 20)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 8, 0);
    int ok = cpt_xconnect(e.sport);
    uint8_t *body = calloc(1, 5000);
    cpt_xsend_packet(ok, 1, body, 4096 - 4);
    cpt_xrecv_packet_eq(ok, 1, body, 4096 - 4);
    int big = cpt_xconnect(e.sport);
    cpt_xsend_packet(big, 1, body, 4097 - 4);
    cpt_xclosed(big, 3000);
    free(body);
    CPT_AWAIT(atomic_load(&e.t->reasons[CP_REASON_TOO_BIG]) == 1, 2000, "no too-big disconnect");
    cr_assert_eq(cpt_peek_state(ok), 0, "the other session was closed");
    cpt_close(ok);
    cpt_close(big);
    cpt_env_stop(&e);
}

/* max_packet above 65535 cannot be honoured by a 16-bit size: refused. */
Test(packet, max_packet_over_65535_is_refused, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_port *p = cpt_xport(1);
    cp_server_opts o = { .host = CPT_HOST4, .session.max_packet = 70000 };
    cp_handlers h = cpt_track_handlers();
    cpt_track *t = cpt_track_new(1);
    cp_service *svc = NULL;
    int rc = cp_server_start(&svc, p, &o, &h, t);
    cr_assert_lt(rc, 0, "max_packet 70000 accepted");
    cpt_track_free(t);
    cpt_xport_destroy(p);
    cpt_leak_end(&leak);
}

typedef struct routes_seen {
    atomic_int a, b, other, bad;
} routes_seen;

static routes_seen *g_seen;

static int route_a(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    cpt_enter(s);
    if (id != 1000 || len != 5 || memcmp(body, "login", 5))
        atomic_fetch_add(&g_seen->bad, 1);
    atomic_fetch_add(&g_seen->a, 1);
    cp_sendbuf *b = cp_packet_make(1001, "ok", 2);
    cp_session_send(s, b);
    cp_sendbuf_unref(b);
    cpt_leave(s);
    return 0;
}

static int route_b(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    cpt_enter(s);
    if (id != 1004 || len != 4 || memcmp(body, "chat", 4))
        atomic_fetch_add(&g_seen->bad, 1);
    atomic_fetch_add(&g_seen->b, 1);
    cpt_leave(s);
    return 0;
}

static int route_other(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    (void)body;
    cpt_enter(s);
    if (id == 1000 || id == 1004 || len != 0)
        atomic_fetch_add(&g_seen->bad, 1);
    atomic_fetch_add(&g_seen->other, 1);
    cpt_leave(s);
    return 0;
}

/* Routes dispatch by id; unrouted ids go to on_packet; the route array is
 * copied at start (the caller's array may change afterwards). */
Test(packet, routes_dispatch_by_id_and_are_copied, .timeout = 20)
{
    routes_seen seen = { 0 };
    g_seen = &seen;
    cp_route routes[] = { { 1000, route_a }, { 1004, route_b } };
    cp_server_opts o = { .session.routes = routes, .session.nroutes = 2 };
    cp_handlers h = cpt_track_handlers();
    h.on_packet = route_other;
    cpt_env e;
    cpt_env_start(&e, 2, &o, &h, 4, 0);
    routes[0].fn = route_other; /* must not matter */
    routes[1].id = 7;
    int fd = cpt_xconnect(e.sport);
    cpt_xsend_packet(fd, 1000, "login", 5);
    cpt_xrecv_packet_eq(fd, 1001, "ok", 2);
    cpt_xsend_packet(fd, 1004, "chat", 4);
    cpt_xsend_packet(fd, 7, NULL, 0);
    cpt_xsend_packet(fd, 1002, NULL, 0);
    CPT_AWAIT(atomic_load(&seen.b) == 1 && atomic_load(&seen.other) == 2, 2000, "routes a %d b %d other %d",
              atomic_load(&seen.a), atomic_load(&seen.b), atomic_load(&seen.other));
    cr_assert_eq(atomic_load(&seen.a), 1);
    cr_assert_eq(atomic_load(&seen.bad), 0, "a handler got the wrong packet");
    cpt_close(fd);
    cpt_env_stop(&e);
}

static int refuse(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    (void)id;
    (void)body;
    (void)len;
    cpt_track *t = cp_session_ctx(s);
    cpt_enter(s);
    atomic_fetch_add(&t->packets, 1);
    cpt_leave(s);
    return -1;
}

/* A handler returning < 0 disconnects with CP_REASON_HANDLER; packets behind
 * it in the same read are not dispatched. */
Test(packet, handler_refusal_disconnects, .timeout = 20)
{
    cp_route routes[] = { { 66, refuse } };
    cp_server_opts o = { .session.routes = routes, .session.nroutes = 1 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 4, 0);
    int fd = cpt_xconnect(e.sport);
    uint8_t buf[12];
    cpt_put_header(buf, 4, 66);
    cpt_put_header(buf + 4, 4, 66);
    cpt_put_header(buf + 8, 4, 66);
    cpt_xsend(fd, buf, sizeof buf);
    cpt_xclosed(fd, 3000);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 2000, "not disconnected");
    cr_assert_eq(atomic_load(&e.t->recs[0].reason), CP_REASON_HANDLER, "reason %s",
                 cp_reason_str((cp_reason)atomic_load(&e.t->recs[0].reason)));
    cr_assert_eq(atomic_load(&e.t->packets), 1, "%lld packets dispatched after the refusal",
                 atomic_load(&e.t->packets) - 1);
    cpt_close(fd);
    cpt_env_xneighbour(&e);
    cpt_env_stop(&e);
}

/* A session that starts a packet and stops mid-way is not confused with the
 * next session in the same slot: partial state dies with the session. */
Test(packet, partial_packet_does_not_leak_into_next_session, .timeout = 20)
{
    cpt_env e;
    cpt_env_start(&e, 1, NULL, NULL, 64, 0);
    for (int i = 0; i < 20; i++) {
        int fd = cpt_xconnect(e.sport);
        uint8_t hdr[6];
        cpt_put_header(hdr, 100, 5);
        hdr[4] = 'p';
        hdr[5] = 'q';
        cpt_xsend(fd, hdr, sizeof hdr);
        cpt_xbytes_in(e.svc, sizeof hdr * (uint64_t)(i + 1)); /* the session holds the partial packet */
        cpt_close(fd);
    }
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 20, 5000, "not disconnected");
    int fd = cpt_xconnect(e.sport);
    cpt_xsend_packet(fd, 9, "clean", 5);
    cpt_xrecv_packet_eq(fd, 9, "clean", 5);
    cpt_close(fd);
    cr_assert_eq(atomic_load(&e.t->packets), 1, "a partial packet was dispatched");
    cpt_env_stop(&e);
}

/* Replies built in place on the worker: the body reversed, under id + 1, in
 * a packet reserved exactly (id 20), or far larger than needed (id 22: a
 * buffer allocated alone, closed short). */
static int reverse_in_place(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    cpt_track *t = cp_session_ctx(s);
    cpt_enter(s);
    cp_sendbuf *b = cp_packet_open((uint16_t)(id + 1), id == 20 ? len : CP_PACKET_MAX - CP_PACKET_HEADER);
    int rc = -1;
    if (b) {
        uint8_t *out = cp_packet_body(b);
        for (size_t i = 0; i < len; i++)
            out[i] = body[len - 1 - i];
        rc = cp_packet_close(b, len);
        if (rc == 0)
            rc = cp_session_send(s, b);
        cp_sendbuf_unref(b);
    }
    if (rc != 0)
        atomic_fetch_add(&t->failures, 1);
    cpt_leave(s);
    return 0;
}

Test(packet, reply_written_in_place, .timeout = 20)
{
    cp_route routes[] = { { 20, reverse_in_place }, { 22, reverse_in_place } };
    cp_server_opts o = { .session.routes = routes, .session.nroutes = 2 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 4, 0);
    int fd = cpt_xconnect(e.sport);
    cpt_xsend_packet(fd, 20, "abcdef", 6);
    cpt_xrecv_packet_eq(fd, 21, "fedcba", 6);
    cpt_xsend_packet(fd, 22, "xyz", 3);
    cpt_xrecv_packet_eq(fd, 23, "zyx", 3);
    cpt_xsend_packet(fd, 20, NULL, 0);
    cpt_xrecv_packet_eq(fd, 21, NULL, 0);
    cr_assert_eq(atomic_load(&e.t->failures), 0, "a reply could not be built or sent");
    cpt_close(fd);
    cpt_env_stop(&e);
}
