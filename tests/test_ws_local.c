/* SPDX-License-Identifier: MIT */
/*
 * WebSocket (RFC 6455) sessions against peers in this process: cport's own
 * WebSocket client, and frames written and read by hand over a blocking
 * socket. No Node, browser or child process, so this file runs under Wine
 * (IOCP) as well as on Linux, once per backend. The independent peers (the
 * npm ws client, the RFC probe, TLS, Chromium) are in test_ws.c and the
 * CTests ws_browser and ws_chat, on Linux.
 */
#include "helpers.h"

#include "buf/sendbuf.h" /* cp__sendbuf_is_view */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct ws_env {
    cpt_env e;
    cp_ws *ws;
} ws_env;

/* A tracking echo server whose sessions are WebSocket sessions. */
static void env_start(ws_env *we, const cp_ws_opts *wo)
{
    cp_ws_opts def = { 0 };
    cr_assert_eq(cp_ws_create(&we->ws, wo ? wo : &def), 0);
    cp_server_opts o = { .host = CPT_HOST4 };
    o.session.ws = we->ws;
    cpt_env_start(&we->e, 2, &o, NULL, 16, 0);
}

static void env_stop(ws_env *we)
{
    cpt_env_stop(&we->e);
    cp_ws_unref(we->ws);
}

/* ------------------------------------------------------------------ raw frames */

/* A frame as the server sent it: servers never mask. Packets of at most
 * 4 KiB fit. */
typedef struct frame {
    uint8_t first; /* FIN, RSV and opcode */
    size_t len;
    uint8_t data[8192];
} frame;

/* Sends one frame, its payload masked as a client must (a fresh key each
 * time, so a server that kept an old key would garble it), or bare. */
static void send_frame(int fd, uint8_t first, const void *payload, size_t n, bool masked)
{
    static unsigned frames;
    uint8_t *f = malloc(14 + n);
    cr_assert_not_null(f);
    size_t h = 0;
    uint8_t m = masked ? 0x80 : 0;
    f[h++] = first;
    if (n < 126) {
        f[h++] = (uint8_t)(m | n);
    } else if (n <= 0xffff) {
        f[h++] = m | 126;
        f[h++] = (uint8_t)(n >> 8);
        f[h++] = (uint8_t)n;
    } else {
        f[h++] = m | 127;
        for (int i = 7; i >= 0; i--)
            f[h++] = (uint8_t)((uint64_t)n >> (8 * i));
    }
    uint8_t key[4] = { 0 };
    if (masked) {
        frames++;
        for (int i = 0; i < 4; i++)
            key[i] = (uint8_t)(0x37 + 29 * frames + 71 * (unsigned)i);
        memcpy(f + h, key, 4);
        h += 4;
    }
    for (size_t i = 0; i < n; i++)
        f[h + i] = ((const uint8_t *)payload)[i] ^ key[i & 3];
    cpt_xsend(fd, f, h + n);
    free(f);
}

/* Reads one frame: 0, or 1 if the stream ended (or stalled) first. */
static int recv_frame(int fd, frame *f)
{
    uint8_t h[2];
    if (cpt_recv_exact(fd, h, 2) != 0)
        return 1;
    cr_assert_eq(h[1] & 0x80, 0, "the server masked a frame");
    uint64_t n = h[1] & 0x7f;
    if (n >= 126) {
        uint8_t x[8];
        size_t xl = n == 126 ? 2 : 8;
        if (cpt_recv_exact(fd, x, xl) != 0)
            return 1;
        n = 0;
        for (size_t i = 0; i < xl; i++)
            n = n << 8 | x[i];
    }
    cr_assert_leq(n, sizeof f->data, "a frame of %llu bytes", (unsigned long long)n);
    f->first = h[0];
    f->len = (size_t)n;
    return n && cpt_recv_exact(fd, f->data, (size_t)n) != 0 ? 1 : 0;
}

/* Reads frames until a Close: its code (0 if it has none, or if the
 * stream ended without one). */
static int raw_close_code(int fd)
{
    frame f;
    while (recv_frame(fd, &f) == 0)
        if ((f.first & 0x0f) == 8)
            return f.len >= 2 ? f.data[0] << 8 | f.data[1] : 0;
    return 0;
}

/* Upgrades the connection fd: fd, after the 101 (read to its blank line,
 * byte by byte, so that nothing after it is consumed). */
static int raw_upgrade_on(int fd)
{
    static const char req[] =
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    cpt_xsend(fd, req, sizeof req - 1);
    char buf[512] = "";
    size_t got = 0;
    while (!strstr(buf, "\r\n\r\n")) {
        ssize_t r = cpt_recv_once(fd, buf + got, 1);
        cr_assert_gt(r, 0, "no 101");
        got += (size_t)r;
        cr_assert_lt(got, sizeof buf - 1);
    }
    cr_assert(strstr(buf, "HTTP/1.1 101"), "%s", buf);
    return fd;
}

static int raw_upgrade(uint16_t port) { return raw_upgrade_on(cpt_xconnect(port)); }

/* Writes packet {id, body of `body` pattern bytes of seed} at p: its size. */
static size_t packet_make(uint8_t *p, uint16_t id, size_t body, uint32_t seed)
{
    cpt_put_header(p, (uint16_t)(4 + body), id);
    cpt_fill(p + 4, body, 0, seed);
    return 4 + body;
}

/* The next frame is the echo of that packet, as one binary message (the
 * server sends each packet as one). */
static void xrecv_echo(int fd, uint16_t id, size_t body, uint32_t seed)
{
    frame f;
    cr_assert_eq(recv_frame(fd, &f), 0, "no echo of packet %u", id);
    cr_assert_eq(f.first, 0x82, "packet %u came as frame 0x%02x, not one binary message", id, f.first);
    cr_assert_eq(f.len, 4 + body, "packet %u: %zu bytes", id, f.len);
    cr_assert_eq(f.data[0] | f.data[1] << 8, (int)(4 + body), "packet %u: its size field", id);
    cr_assert_eq(f.data[2] | f.data[3] << 8, id, "packet %u came as %u", id, f.data[2] | f.data[3] << 8);
    cr_assert_eq(cpt_check_pattern(f.data + 4, body, 0, seed), -1, "packet %u: its body differs", id);
}

/* ------------------------------------------------------------------ a cport client */

/* Packet k of session i: id k, this many body bytes, pattern seed. The
 * first sizes are the edges of the frame header's length classes (a
 * payload of 125, 126 bytes) and of the range. */
static size_t size_of(int k)
{
    static const size_t edges[] = { 0, 4000, 121, 122, 123, 1 };
    if (k < (int)(sizeof edges / sizeof *edges))
        return edges[k];
    return (size_t)(((uint32_t)k * 2654435761u) >> 8) % 4001;
}

static uint32_t seed_of(int session, int k) { return (uint32_t)(session * 100000 + k); }

static atomic_int g_bad_echoes;

/* A client session's echoes must come back in order and byte-identical. */
static int check_echo(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    cpt_track *t = cp_session_ctx(s);
    cpt_srec *r = cpt_rec(s);
    int k = (int)atomic_fetch_add(&r->expect_seq, 1);
    int i = (int)(r - t->recs);
    if (id != (uint16_t)k || len != size_of(k) || cpt_check_pattern(body, len, 0, seed_of(i, k)) != -1)
        atomic_fetch_add(&g_bad_echoes, 1);
    return cpt_on_packet(s, id, body, len);
}

/* Two cport client sessions each send 300 packets of 0-4000 bytes through
 * a cport server's echo: connected only after the 101, their masked
 * frames read by the server, every echo back in order, byte-identical, and
 * on_sent counting the clients' own bytes. */
Test(ws_local, cport_client_echo_of_many_packets_is_byte_identical, .timeout = 60)
{
    enum { SESSIONS = 2, PACKETS = 300, BATCH = 30 };
    ws_env we;
    env_start(&we, NULL);
    cp_ws *cws;
    cp_ws_opts cwo = { 0 };
    cr_assert_eq(cp_ws_create(&cws, &cwo), 0);
    cpt_track *t = cpt_track_new(SESSIONS);
    t->echo = false;
    t->keep_refs = true;
    cp_client_opts co = { .host = CPT_HOST4, .port = we.e.sport, .sessions = SESSIONS };
    co.session.ws = cws;
    cp_handlers h = cpt_track_handlers();
    h.on_packet = check_echo;
    cp_service *svc = cpt_xclient(we.e.port, &co, &h, t);
    CPT_AWAIT(atomic_load(&t->connected) == SESSIONS, 5000, "the WebSocket clients did not connect");

    static uint8_t body[4000];
    long long bytes = 0;
    for (int k0 = 0; k0 < PACKETS; k0 += BATCH) {
        for (int i = 0; i < SESSIONS; i++) {
            for (int k = k0; k < k0 + BATCH; k++) {
                cpt_fill(body, size_of(k), 0, seed_of(i, k));
                cp_sendbuf *b = cp_packet_make((uint16_t)k, body, size_of(k));
                cr_assert_not_null(b);
                cr_assert_eq(cp_session_send(t->recs[i].s, b), 0);
                cp_sendbuf_unref(b);
                bytes += (long long)size_of(k);
            }
        }
        long long want = (long long)SESSIONS * (k0 + BATCH);
        CPT_AWAIT(atomic_load(&t->packets) == want, 10000, "echoes: %lld of %lld",
                  (long long)atomic_load(&t->packets), want);
    }
    cr_assert_eq(atomic_load(&g_bad_echoes), 0, "echoes out of order or changed");
    cr_assert_eq(atomic_load(&t->bytes_in), bytes);
    cr_assert_eq(atomic_load(&we.e.t->packets), SESSIONS * PACKETS, "the server read the masked packets");
    cr_assert_eq(atomic_load(&we.e.t->bytes_in), bytes);
    /* on_sent counts the packets the clients sent, header included: not
     * the upgrade request, not the masked copies' frame headers. */
    long long sent = bytes + 4LL * SESSIONS * PACKETS;
    CPT_AWAIT(atomic_load(&t->bytes_sent) == sent, 5000, "the clients' on_sent counted %lld of %lld",
              (long long)atomic_load(&t->bytes_sent), sent);
    cpt_xstop(svc);
    cpt_track_stopped(t);
    cpt_track_xcheck(t);
    cpt_track_free(t);
    cp_ws_unref(cws);
    env_stop(&we);
}

/* A client service whose upgrade is refused: connect failures, never a
 * connected session; returns the error on_connect_failed heard. */
static int client_refused(cp_port *port, uint16_t sport, const char *path)
{
    cp_ws *cws;
    cp_ws_opts cwo = { .path = path };
    cr_assert_eq(cp_ws_create(&cws, &cwo), 0);
    cpt_track *t = cpt_track_new(4);
    t->echo = false;
    cp_client_opts co = { .host = CPT_HOST4, .port = sport, .sessions = 1 };
    co.session.ws = cws;
    cp_handlers h = cpt_track_handlers();
    cp_service *svc = cpt_xclient(port, &co, &h, t);
    CPT_AWAIT(atomic_load(&t->connect_failed) == 1, 5000, "the refused upgrade was not a connect failure");
    cr_assert_eq(atomic_load(&t->connected), 0);
    cr_assert_eq(cpt_stats(svc).by_reason[CP_REASON_WEBSOCKET], 1);
    int err = atomic_load(&t->last_connect_err);
    cpt_xstop(svc);
    cpt_track_stopped(t);
    cpt_track_xcheck(t);
    cpt_track_free(t);
    cp_ws_unref(cws);
    return err;
}

/* A plain TCP echo server answers the upgrade with the request itself,
 * no 101: the client's session never connects. */
Test(ws_local, cport_client_refused_is_a_connect_failure, .timeout = 60)
{
    cpt_env e;
    cp_server_opts o = { .host = CPT_HOST4 };
    o.session.framing = CP_FRAMING_RAW;
    cp_handlers sh = cpt_track_handlers();
    sh.on_packet = NULL;
    sh.on_recv = cpt_on_recv; /* echoes the request back: no 101 */
    cpt_env_start(&e, 1, &o, &sh, 8, 0);
    cr_assert_lt(client_refused(e.port, e.sport, NULL), 0);
    cpt_env_stop(&e);
}

/* A cport server that serves another path answers 404: for the cport
 * client, a refused connect (-ECONNREFUSED), counted on both sides. */
Test(ws_local, cport_client_refused_by_a_cport_server, .timeout = 60)
{
    cp_ws_opts wo = { .path = "/play" };
    ws_env we;
    env_start(&we, &wo);
    cr_assert_eq(client_refused(we.e.port, we.e.sport, "/other"), -ECONNREFUSED);
    CPT_AWAIT(cpt_stats(we.e.svc).by_reason[CP_REASON_WEBSOCKET] == 1, 5000,
              "the server's refusal was not counted");
    env_stop(&we);
}

/* ------------------------------------------------------------------ frames by hand */

/* The payloads of binary messages are one byte stream: three packets in
 * one message; one packet over three messages, cut inside its header; one
 * packet over a fragmented message (with a ping between its fragments,
 * answered at once). All echoed, one binary message per packet. */
Test(ws_local, packets_and_messages_need_not_line_up, .timeout = 60)
{
    ws_env we;
    env_start(&we, NULL);
    int fd = raw_upgrade(we.e.sport);
    static uint8_t buf[3 * 4004];

    size_t n = packet_make(buf, 1, 10, 1);
    n += packet_make(buf + n, 2, 200, 2);
    n += packet_make(buf + n, 3, 3000, 3);
    send_frame(fd, 0x82, buf, n, true);
    xrecv_echo(fd, 1, 10, 1);
    xrecv_echo(fd, 2, 200, 2);
    xrecv_echo(fd, 3, 3000, 3);

    n = packet_make(buf, 4, 1000, 4);
    send_frame(fd, 0x82, buf, 1, true); /* one byte of the size */
    send_frame(fd, 0x82, buf + 1, 500, true);
    send_frame(fd, 0x82, buf + 501, n - 501, true);
    xrecv_echo(fd, 4, 1000, 4);

    n = packet_make(buf, 5, 2000, 5);
    send_frame(fd, 0x02, buf, 700, true); /* binary, not final */
    send_frame(fd, 0x89, "mid", 3, true); /* a ping inside the message */
    frame f;
    cr_assert_eq(recv_frame(fd, &f), 0, "no pong");
    cr_assert_eq(f.first, 0x8a, "frame 0x%02x instead of the pong", f.first);
    cr_assert(f.len == 3 && !memcmp(f.data, "mid", 3), "the pong does not carry the ping's payload");
    send_frame(fd, 0x00, buf + 700, 700, true); /* continuation */
    send_frame(fd, 0x80, buf + 1400, n - 1400, true);
    xrecv_echo(fd, 5, 2000, 5);

    cr_assert_eq(atomic_load(&we.e.t->packets), 5);
    cpt_close(fd);
    env_stop(&we);
}

/* A ping gets a pong with its payload; a Close gets its code echoed and
 * then the end of the stream. */
Test(ws_local, ping_gets_pong_and_close_gets_close, .timeout = 60)
{
    ws_env we;
    env_start(&we, NULL);
    int fd = raw_upgrade(we.e.sport);
    static const char payload[] = "are you there?";
    send_frame(fd, 0x89, payload, sizeof payload - 1, true);
    frame f;
    cr_assert_eq(recv_frame(fd, &f), 0, "no pong");
    cr_assert_eq(f.first, 0x8a, "frame 0x%02x instead of a pong", f.first);
    cr_assert(f.len == sizeof payload - 1 && !memcmp(f.data, payload, f.len), "the pong's payload differs");
    static const uint8_t bye[] = { 0x03, 0xe8 }; /* 1000 */
    send_frame(fd, 0x88, bye, sizeof bye, true);
    cr_assert_eq(raw_close_code(fd), 1000);
    cpt_xclosed(fd, 3000);
    cpt_close(fd);
    CPT_AWAIT(atomic_load(&we.e.t->reasons[CP_REASON_PEER_CLOSED]) == 1, 5000,
              "the session did not end as closed by its peer");
    env_stop(&we);
}

/* A violation's Close code, then the end of the stream; the session ends
 * as a WebSocket error. */
static void xviolation(int fd, int code, const char *what)
{
    cr_assert_eq(raw_close_code(fd), code, "%s", what);
    cpt_xclosed(fd, 3000);
    cpt_close(fd);
}

/* A text message, refused by default, closes with 1003. */
Test(ws_local, text_closes_with_1003, .timeout = 60)
{
    ws_env we;
    env_start(&we, NULL);
    int fd = raw_upgrade(we.e.sport);
    send_frame(fd, 0x81, "hello", 5, true);
    xviolation(fd, 1003, "a text message");
    CPT_AWAIT(atomic_load(&we.e.t->reasons[CP_REASON_WEBSOCKET]) == 1, 5000,
              "not ended as a WebSocket error");
    env_stop(&we);
}

/* A message over max_message (by default the service's max_packet, 4096)
 * closes with 1009, whether one frame says so or its fragments add up to
 * it. */
Test(ws_local, a_message_over_the_limit_closes_with_1009, .timeout = 60)
{
    ws_env we;
    env_start(&we, NULL);
    static uint8_t buf[65536];
    int fd = raw_upgrade(we.e.sport);
    send_frame(fd, 0x82, buf, sizeof buf, true);
    xviolation(fd, 1009, "one frame of 64 KiB");

    fd = raw_upgrade(we.e.sport);
    packet_make(buf, 1, 4000, 1);
    send_frame(fd, 0x02, buf, 3000, true);
    send_frame(fd, 0x80, buf + 3000, 1097, true); /* 4097 bytes in all */
    xviolation(fd, 1009, "two fragments of 4097 bytes");
    CPT_AWAIT(atomic_load(&we.e.t->reasons[CP_REASON_WEBSOCKET]) == 2, 5000, "not ended as WebSocket errors");
    cr_assert_eq(atomic_load(&we.e.t->packets), 0);
    env_stop(&we);
}

/* A client's frame must be masked: a bare one closes with 1002, and what
 * it carried never reaches a handler. */
Test(ws_local, an_unmasked_client_frame_closes_with_1002, .timeout = 60)
{
    ws_env we;
    env_start(&we, NULL);
    int fd = raw_upgrade(we.e.sport);
    uint8_t p[12];
    size_t n = packet_make(p, 1, 8, 1);
    send_frame(fd, 0x82, p, n, false);
    xviolation(fd, 1002, "an unmasked frame");
    CPT_AWAIT(atomic_load(&we.e.t->reasons[CP_REASON_WEBSOCKET]) == 1, 5000,
              "not ended as a WebSocket error");
    cr_assert_eq(atomic_load(&we.e.t->packets), 0, "the unmasked packet was handled");
    env_stop(&we);
}

/* While two sessions are closed for violations, a neighbour's packets,
 * sent before, between and after, keep coming back; it is still
 * connected at the end, and a new session is served too. */
Test(ws_local, a_neighbour_is_served_while_others_are_closed, .timeout = 60)
{
    ws_env we;
    env_start(&we, NULL);
    uint8_t p[4004];
    int a = raw_upgrade(we.e.sport);
    send_frame(a, 0x82, p, packet_make(p, 1, 100, 1), true);
    xrecv_echo(a, 1, 100, 1);

    int b = raw_upgrade(we.e.sport);
    int c = raw_upgrade(we.e.sport);
    send_frame(b, 0x82, p, packet_make(p, 9, 8, 9), false);
    send_frame(a, 0x82, p, packet_make(p, 2, 4000, 2), true);
    send_frame(c, 0x81, "text", 4, true);
    send_frame(a, 0x82, p, packet_make(p, 3, 0, 3), true);
    xviolation(b, 1002, "b: unmasked");
    xviolation(c, 1003, "c: text");
    xrecv_echo(a, 2, 4000, 2);
    xrecv_echo(a, 3, 0, 3);

    send_frame(a, 0x82, p, packet_make(p, 4, 3000, 4), true);
    xrecv_echo(a, 4, 3000, 4);
    int d = raw_upgrade(we.e.sport);
    send_frame(d, 0x82, p, packet_make(p, 5, 50, 5), true);
    xrecv_echo(d, 5, 50, 5);

    CPT_AWAIT(atomic_load(&we.e.t->disconnected) == 2, 5000, "b and c did not end");
    cr_assert_eq(atomic_load(&we.e.t->reasons[CP_REASON_WEBSOCKET]), 2);
    cr_assert_eq(atomic_load(&we.e.t->connected), 4);
    cr_assert_eq(cpt_peek_state(a), 0, "a was closed too");
    cpt_close(a);
    cpt_close(d);
    env_stop(&we);
}

/* ------------------------------------------------------------------ HTTP */

/* Sends req on a fresh connection: the answer up to its blank line (or
 * what came before the server closed) in buf. */
static void http_ask(uint16_t port, const char *req, char *buf, size_t cap)
{
    int fd = cpt_xconnect(port);
    cpt_xsend(fd, req, strlen(req));
    size_t got = 0;
    buf[0] = '\0';
    while (got < cap - 1 && !strstr(buf, "\r\n\r\n")) {
        ssize_t r = cpt_recv_some(fd, buf + got, cap - 1 - got);
        if (r <= 0)
            break;
        got += (size_t)r;
        buf[got] = '\0';
    }
    cpt_close(fd);
}

/* A plain GET of the path gets the page; a path the options do not serve
 * gets 404; an Origin outside the list 403; the accept key of RFC 6455's
 * own example, with header names and tokens matched loosely. */
Test(ws_local, http_answers_page_path_origin, .timeout = 60)
{
    static const char *const origins[] = { "https://game.example", NULL };
    cp_ws_opts wo = { .path = "/play", .origins = origins, .page = "<!doctype html><p>hello</p>" };
    ws_env we;
    env_start(&we, &wo);
    static const struct {
        const char *req, *want;
    } cases[] = {
        { "GET /play HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 200 OK" },
        { "GET /other HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 404" },
        { "GET /play?room=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
          "Origin: https://evil.example\r\n\r\n",
          "HTTP/1.1 403" },
        { "GET /play?room=1 HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n"
          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
          "Origin: https://game.example\r\n\r\n",
          "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char buf[1024];
        http_ask(we.e.sport, cases[i].req, buf, sizeof buf);
        cr_assert(strstr(buf, cases[i].want), "case %zu: wanted \"%s\", got \"%s\"", i, cases[i].want, buf);
    }
    env_stop(&we);
}

/* Without a page, a plain GET gets 426 and the protocol to upgrade to; an
 * upgrade of another version gets 426 and the version we speak. */
Test(ws_local, http_426_without_a_page_or_for_another_version, .timeout = 60)
{
    ws_env we;
    env_start(&we, NULL);
    char buf[1024];
    http_ask(we.e.sport, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", buf, sizeof buf);
    cr_assert(strstr(buf, "HTTP/1.1 426") && strstr(buf, "Upgrade: websocket\r\n"), "a plain GET: %s", buf);
    http_ask(we.e.sport,
             "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
             buf, sizeof buf);
    cr_assert(strstr(buf, "HTTP/1.1 426") && strstr(buf, "Sec-WebSocket-Version: 13\r\n"), "version 8: %s",
              buf);
    env_stop(&we);
}

/* ------------------------------------------------------------------ hard closes */

static int refuse_13(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    int r = cpt_on_packet(s, id, body, len);
    return id == 13 ? -1 : r;
}

/* One masked frame with a packet header saying size and 4 body bytes. */
static void send_short_packet(int fd, uint16_t id, uint16_t size)
{
    uint8_t p[8];
    cpt_put_header(p, size, id);
    memcpy(p + 4, "\x00\x01\x02\x03", 4);
    send_frame(fd, 0x82, p, sizeof p, true);
}

/* The hard closes send the Close code of their reason: a handler's
 * refusal 1011, a packet over max_packet 1009, cp_session_disconnect 1000. */
Test(ws_local, hard_closes_send_their_close_code, .timeout = 60)
{
    cp_ws_opts wo = { .max_message = 65535 }; /* the packet, not the message, is too big */
    cp_server_opts o = { .host = CPT_HOST4 };
    cr_assert_eq(cp_ws_create(&o.session.ws, &wo), 0);
    cp_handlers h = cpt_track_handlers();
    h.on_packet = refuse_13;
    cpt_env e;
    cpt_env_start(&e, 2, &o, &h, 8, 0);

    int fd = raw_upgrade(e.sport);
    send_short_packet(fd, 13, 8);
    cr_assert_eq(raw_close_code(fd), 1011, "a handler's refusal");
    cpt_close(fd);

    fd = raw_upgrade(e.sport);
    send_short_packet(fd, 5, 5000); /* max_packet is 4096 */
    cr_assert_eq(raw_close_code(fd), 1009, "a packet over max_packet");
    cpt_close(fd);

    fd = raw_upgrade(e.sport);
    send_short_packet(fd, 5, 8); /* echoed: the session is up */
    /* Packets handled: the refused one, and this one (the oversized one
     * never reached a handler). */
    CPT_AWAIT(atomic_load(&e.t->packets) == 2, 5000, "the third session's packet");
    cpt_srec *r = &e.t->recs[2];
    cr_assert_eq(cp_service_disconnect_id(e.svc, r->id), 0);
    cr_assert_eq(raw_close_code(fd), 1000, "cp_session_disconnect");
    cpt_close(fd);

    CPT_AWAIT(atomic_load(&e.t->disconnected) == 3, 5000, "the sessions did not end");
    cpt_env_stop(&e);
    cp_ws_unref(o.session.ws);
}

/* ------------------------------------------------------------------ backed up */

/* A client that does not read while the server sends 6,000 small packets:
 * the session's queue backs up and copies them into blocks of its own
 * (sendq.c), yet each packet must still arrive as one binary message (a
 * block once became one message holding many), and on_sent must count the
 * user's bytes only: not the 101, not the frame headers. */
Test(ws_local, a_backed_up_queue_keeps_one_message_per_packet, .timeout = 60)
{
    enum { N = 6000 };
    cp_ws_opts wo = { 0 };
    cp_server_opts o = { .host = CPT_HOST4 };
    o.session.send_queue_limit = 256u << 10; /* backed up past 64 KiB: compaction */
    cr_assert_eq(cp_ws_create(&o.session.ws, &wo), 0);
    cpt_env e;
    cpt_env_start(&e, 1, &o, NULL, 4, CPT_KEEP_REFS | CPT_NO_ECHO);
    int fd = cpt_connect(CPT_HOST4, e.sport, 4096);
    cr_assert_geq(fd, 0);
    raw_upgrade_on(fd);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    cp_session *s = e.t->recs[0].s;
    long long user = 0;
    uint8_t body[64];
    for (int i = 0; i < N; i++) {
        size_t len = (size_t)(i % 41);
        memset(body, i & 0xff, len);
        cp_sendbuf *b = cp_packet_make((uint16_t)i, body, len);
        user += (long long)cp_sendbuf_len(b);
        cr_assert_eq(cp_session_send(s, b), 0, "send %d", i);
        cp_sendbuf_unref(b);
    }
    for (int i = 0; i < N; i++) {
        uint8_t h[4], pkt[4 + 64];
        cr_assert_eq(cpt_recv_exact(fd, h, 2), 0, "frame %d", i);
        cr_assert_eq(h[0], 0x82, "frame %d: a final binary frame", i);
        size_t n = h[1] & 0x7f;
        cr_assert_lt(n, 126, "frame %d holds %zu bytes: more than one packet", i, n);
        cr_assert_eq(n, 4 + (size_t)(i % 41), "frame %d: one packet per message", i);
        cr_assert_eq(cpt_recv_exact(fd, pkt, n), 0);
        cr_assert_eq(pkt[0] | pkt[1] << 8, (int)n, "frame %d: the packet's own size", i);
        cr_assert_eq(pkt[2] | pkt[3] << 8, i & 0xffff, "frame %d: packets in order", i);
    }
    CPT_AWAIT(atomic_load(&e.t->bytes_sent) == user, 5000, "on_sent counted %lld of the user's %lld bytes",
              (long long)atomic_load(&e.t->bytes_sent), user);
    cpt_close(fd);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 5000, "the session did not end");
    cpt_env_stop(&e);
    cp_ws_unref(o.session.ws);
}

/* ------------------------------------------------------------------ forwarding */

static atomic_int g_fwd_views;

/* Echoes each packet as it came with cp_sendbuf_from_recv: the frames are
 * unmasked in the backend's buffer, so the echo is a view, which has no
 * room for a frame header before its bytes. */
static int forward_back(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    (void)id;
    cp_sendbuf *b = cp_sendbuf_from_recv(s, body - CP_PACKET_HEADER, len + CP_PACKET_HEADER);
    if (!b)
        return -1;
    atomic_fetch_add(&g_fwd_views, cp__sendbuf_is_view(b) ? 1 : 0);
    int r = cp_session_send(s, b);
    cp_sendbuf_unref(b);
    return r;
}

/* A forwarded packet still goes out as one binary message of its own. */
Test(ws_local, a_forwarded_packet_goes_out_as_one_message, .timeout = 60)
{
    enum { BODY = 6000, N = 20 };
    cp_ws_opts wo = { 0 };
    cp_server_opts o = { .host = CPT_HOST4, .session.max_packet = 65535 };
    cr_assert_eq(cp_ws_create(&o.session.ws, &wo), 0);
    cp_handlers h = cpt_track_handlers();
    h.on_packet = forward_back;
    cpt_env e;
    cpt_env_start(&e, 2, &o, &h, 4, 0);
    int fd = raw_upgrade(e.sport);
    uint8_t *pkt = malloc(4 + BODY);
    for (int i = 0; i < N; i++) {
        size_t n = packet_make(pkt, (uint16_t)i, BODY, seed_of(1, i));
        send_frame(fd, 0x82, pkt, n, true);
        xrecv_echo(fd, (uint16_t)i, BODY, seed_of(1, i));
    }
    free(pkt);
    cr_assert_gt(atomic_load(&g_fwd_views), 0, "no packet was lent: the framed queue's copy went untested");
    cpt_close(fd);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 5000, "the session did not end");
    cpt_env_stop(&e);
    cp_ws_unref(o.session.ws);
}

/* ------------------------------------------------------------------ refusals */

/* A client whose request is refused keeps sending (a body, a pipelined
 * request): it must still read the whole answer, then an orderly end. A
 * close over its unread bytes would send a reset, which destroys the
 * answer in the client's receive queue. */
Test(ws_local, a_refused_client_that_keeps_sending_reads_the_whole_answer, .timeout = 60)
{
    cp_ws_opts wo = { .path = "/play" };
    cp_server_opts o = { .host = CPT_HOST4 };
    cr_assert_eq(cp_ws_create(&o.session.ws, &wo), 0);
    cpt_env e;
    cpt_env_start(&e, 1, &o, NULL, 4, 0);
    for (int round = 0; round < 5; round++) {
        int fd = cpt_xconnect(e.sport);
        static const char req[] = "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n";
        cpt_xsend(fd, req, sizeof req - 1);
        static uint8_t junk[16384];
        memset(junk, 'j', sizeof junk);
        for (int i = 0; i < 16; i++) /* 256 KiB more, while the server answers; errors end it */
            if (cpt_send_all(fd, junk, sizeof junk) < 0)
                break;
        char buf[1024];
        size_t got = 0;
        ssize_t r;
        while ((r = cpt_recv_once(fd, buf + got, sizeof buf - 1 - got)) > 0)
            got += (size_t)r;
        buf[got] = '\0';
        cr_assert(strncmp(buf, "HTTP/1.1 404", 12) == 0, "round %d: the answer was lost (%zu bytes: %s)",
                  round, got, buf);
        cr_assert(strstr(buf, "\r\n\r\n") != NULL, "round %d: the answer was cut", round);
        cr_assert_eq(r, 0, "round %d: the answer ended with an error, not the server's FIN", round);
        cpt_close(fd);
    }
    CPT_AWAIT(cpt_stats(e.svc).by_reason[CP_REASON_WEBSOCKET] == 5, 5000, "the refusals were not counted");
    cpt_env_stop(&e);
    cp_ws_unref(o.session.ws);
}

/* ------------------------------------------------------------------ nothing after a Close */

static _Atomic(cp_session *) g_held;
static atomic_int g_held_go;

/* Packet 21's handler holds the worker until the test has sent to the
 * session from its own thread, so that this send is still on its way to the
 * queue when the frame read behind packet 21 is handled. */
static int hold_21(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    int r = cpt_on_packet(s, id, body, len);
    if (id == 21) {
        atomic_store(&g_held, s);
        for (int i = 0; i < 5000 && !atomic_load(&g_held_go); i++)
            cpt_sleep_ms(1);
    }
    return r;
}

/* A send made from another thread before ws handled a bad frame (or the
 * peer's Close) goes out before ws's Close, and nothing goes after that
 * Close: RFC 6455 allows no data frame after it. fuzz_ws_frames found the
 * Close written at once, ahead of such a send still on its way. */
Test(ws_local, nothing_after_the_close, .timeout = 60)
{
    cp_server_opts o = { .host = CPT_HOST4 };
    cp_ws_opts wo = { 0 };
    cr_assert_eq(cp_ws_create(&o.session.ws, &wo), 0);
    cp_handlers h = cpt_track_handlers();
    h.on_packet = hold_21;
    cpt_env e;
    cpt_env_start(&e, 1, &o, &h, 8, 0);
    for (int peer_close = 0; peer_close < 2; peer_close++) {
        atomic_store(&g_held, NULL);
        atomic_store(&g_held_go, 0);
        int fd = raw_upgrade(e.sport);
        /* Packet 21, then an unmasked frame (1002) or a Close 1000, in one write. */
        uint8_t w[32] = { 0x82, 0x80 | 8, 1, 2, 3, 4 };
        cpt_put_header(w + 6, 8, 21);
        memcpy(w + 10, "hold", 4);
        for (size_t i = 0; i < 8; i++)
            w[6 + i] ^= w[2 + (i & 3)];
        size_t n = 14;
        if (peer_close) {
            static const uint8_t c[] = { 0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8 };
            memcpy(w + n, c, sizeof c);
            n += sizeof c;
        } else {
            w[n++] = 0x82;
            w[n++] = 0x00;
        }
        cpt_xsend(fd, w, n);
        CPT_AWAIT(atomic_load(&g_held) != NULL, 5000, "packet 21 was not handled");
        uint8_t late[8];
        cpt_put_header(late, sizeof late, 30);
        memcpy(late + 4, "late", 4);
        cr_assert_eq(cp_session_send_copy(atomic_load(&g_held), late, sizeof late), 0);
        atomic_store(&g_held_go, 1);
        /* Frames to the end of the stream: the late packet before the Close. */
        frame f;
        int code = -1;
        bool seen = false;
        while (recv_frame(fd, &f) == 0) {
            cr_assert_eq(code, -1, "a frame after the server's Close (0x%02x)", f.first);
            if ((f.first & 0x0f) == 8)
                code = f.len >= 2 ? f.data[0] << 8 | f.data[1] : 0;
            if (f.first == 0x82 && f.len == sizeof late && !memcmp(f.data, late, sizeof late))
                seen = true;
        }
        cr_assert_eq(code, peer_close ? 1000 : 1002, "the server's Close (%d)", code);
        cr_assert(seen, "a send made before the Close was decided did not go out before it");
        cpt_close(fd);
    }
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 2, 5000, "the sessions did not end");
    cpt_env_stop(&e);
    cp_ws_unref(o.session.ws);
}

/* ------------------------------------------------------------------ pings */

/* Pings begin when the session is upgraded, however long its upgrade took,
 * and an unanswered one closes it with 1008. fuzz_ws_frames found a session
 * whose upgrade took longer than one interval never pinged: the timer, armed
 * when the upgrade began, found it not connected yet and stopped, so a dead
 * peer went unnoticed. */
Test(ws_local, pings_after_a_slow_upgrade, .timeout = 60)
{
    cp_ws_opts wo = { .ping_interval_ms = 50 };
    ws_env we;
    env_start(&we, &wo);
    int fd = cpt_xconnect(we.e.sport);
    static const char req[] =
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    cpt_xsend(fd, req, 20);
    cpt_sleep_ms(200); /* four intervals into the upgrade */
    cpt_xsend(fd, req + 20, sizeof req - 1 - 20);
    char buf[512] = "";
    size_t got = 0;
    while (!strstr(buf, "\r\n\r\n")) {
        ssize_t r = cpt_recv_once(fd, buf + got, 1);
        cr_assert_gt(r, 0, "no 101");
        got += (size_t)r;
        cr_assert_lt(got, sizeof buf - 1);
    }
    cr_assert(strstr(buf, "HTTP/1.1 101"), "%s", buf);
    int pings = 0, code = -1;
    frame f;
    while (code < 0) {
        cr_assert_eq(cpt_poll_in(fd, 1000), 1, "no frame within 1 s (pings so far: %d)", pings);
        cr_assert_eq(recv_frame(fd, &f), 0, "the stream ended without a Close");
        if ((f.first & 0x0f) == 9)
            pings++;
        if ((f.first & 0x0f) == 8)
            code = f.len >= 2 ? f.data[0] << 8 | f.data[1] : 0;
    }
    cr_assert_geq(pings, 1, "no ping after a slow upgrade");
    cr_assert_eq(code, 1008, "an unanswered ping closes with 1008 (%d)", code);
    cpt_close(fd);
    CPT_AWAIT(atomic_load(&we.e.t->disconnected) == 1, 5000, "the session did not end");
    env_stop(&we);
}

/* A disconnect that lands while the 101's send is still in flight (io_uring:
 * the send completes on the worker after the close was requested) must not
 * make the close write those bytes again: after the 101 come frames only,
 * each buffer at most once and in order, then the Close. fuzz_ws_frames
 * found the 101 sent twice (tests/fuzz/repro/uring_disconnect_resends.c);
 * about one run in four showed it on io_uring. */
Test(ws_local, a_disconnect_during_a_send_writes_nothing_twice, .timeout = 120)
{
    enum { RUNS = 200, BUFS = 4, SIZE = 4000 };
    ws_env we;
    cp_ws_opts wo = { 0 };
    cr_assert_eq(cp_ws_create(&we.ws, &wo), 0);
    cp_server_opts o = { .host = CPT_HOST4 };
    o.session.ws = we.ws;
    cpt_env_start(&we.e, 2, &o, NULL, RUNS + 8, CPT_KEEP_REFS | CPT_NO_ECHO);
    static uint8_t junk[SIZE];
    static frame f;
    for (int it = 0; it < RUNS; it++) {
        int fd = raw_upgrade(we.e.sport);
        CPT_AWAIT(atomic_load(&we.e.t->connected) == it + 1, 5000, "run %d: not connected", it);
        cp_session *s = we.e.t->recs[it].s;
        for (int k = 0; k < BUFS; k++) {
            memset(junk, 'j', sizeof junk);
            junk[0] = (uint8_t)k; /* each buffer its own first byte */
            cr_assert_eq(cp_session_send_copy(s, junk, sizeof junk), 0);
        }
        cr_assert_eq(cp_session_disconnect(s), 0);
        int next = 0;
        bool closed = false;
        while (!closed && recv_frame(fd, &f) == 0) {
            cr_assert(f.first == 0x82 || f.first == 0x88, "run %d: not a frame after the 101 (0x%02x '%c')",
                      it, f.first, f.first);
            if (f.first == 0x88) {
                closed = true;
            } else {
                cr_assert(f.len == SIZE && f.data[0] == next, "run %d: buffer %d again or out of order", it,
                          f.data[0]);
                next++;
            }
        }
        cpt_close(fd);
        CPT_AWAIT(atomic_load(&we.e.t->disconnected) == it + 1, 5000, "run %d: the session did not end", it);
    }
    env_stop(&we);
}
