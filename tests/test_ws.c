/* SPDX-License-Identifier: MIT */
/*
 * WebSocket (RFC 6455) sessions, from outside, against real clients: the npm
 * ws package (tests/ws_peer.js: a strict, independent client) and a probe of
 * RFC 6455's edge cases over raw TCP (tests/ws_probe.js), whose outcomes
 * must be those of the reference ws server (tests/ws_probe.expected) except
 * where cport differs by design (the lines marked CPORT there). The server
 * is the tracking packet-echo service of helpers.h with WebSocket on, over
 * TLS too. Run once per backend.
 */
#include "helpers.h"
#include "peers.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#ifndef CPT_WS_DIR
#  error "CPT_WS_DIR: the directory of ws_peer.js and ws_probe.js (tests/CMakeLists.txt)"
#endif

static pem g_cert;

typedef struct ws_env {
    cpt_env e;
    cp_ws *ws;
    cp_tls *tls; /* NULL: ws:// */
} ws_env;

static void env_start(ws_env *we, const cp_ws_opts *wo, bool tls)
{
    cp_ws_opts def = { 0 };
    cr_assert_eq(cp_ws_create(&we->ws, wo ? wo : &def), 0);
    we->tls = NULL;
    if (tls) {
        pem_make(&g_cert, "ws", "localhost");
        cp_tls_opts to = { .cert_file = g_cert.cert, .key_file = g_cert.key };
        cr_assert_eq(cp_tls_create(&we->tls, &to), 0);
    }
    cp_server_opts o = { .host = CPT_HOST4 };
    o.session.ws = we->ws;
    o.session.tls = we->tls;
    cpt_env_start(&we->e, 2, &o, NULL, 128, 0); /* the probe opens 87 sessions */
}

static void env_stop(ws_env *we)
{
    cpt_env_stop(&we->e);
    cp_ws_unref(we->ws);
    cp_tls_unref(we->tls);
}

static void url_of(const ws_env *we, char *url, size_t n)
{
    snprintf(url, n, "%s://127.0.0.1:%u/", we->tls ? "wss" : "ws", we->e.sport);
}

/* Runs node with script and its arguments (NULL-terminated) to its end:
 * its exit code; its output is in p. */
static int node_run(peer *p, const char *script, ...)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", CPT_WS_DIR, script);
    char *argv[16] = { NODE_BIN, path };
    int n = 2;
    va_list ap;
    va_start(ap, script);
    for (char *a; (a = va_arg(ap, char *)) != NULL && n < 15;)
        argv[n++] = a;
    va_end(ap);
    argv[n] = NULL;
    peer_start(p, argv);
    peer_close_in(p);
    return peer_xexit(p, 60000);
}

/* ws_peer.js in mode against we: it must succeed and print want. */
static void ws_peer_xrun(ws_env *we, const char *mode, const char *want)
{
    char url[64], ca[160];
    url_of(we, url, sizeof url);
    snprintf(ca, sizeof ca, "ca=%s", g_cert.cert);
    peer p;
    int rc = node_run(&p, "ws_peer.js", (char *)mode, url, we->tls ? ca : NULL, NULL);
    if (rc != 0 || !peer_has(&p, OUT, want))
        peer_dump(&p, mode);
    cr_assert_eq(rc, 0, "ws_peer.js %s failed", mode);
    cr_assert(peer_has(&p, OUT, want), "ws_peer.js %s did not print \"%s\"", mode, want);
    peer_stop(&p);
}

static void peer_modes(bool tls)
{
    ws_env we;
    env_start(&we, NULL, tls);
    ws_peer_xrun(&we, "burst", "OK 602122 408");
    ws_peer_xrun(&we, "ping", "OK");
    ws_peer_xrun(&we, "text", "CLOSED 1003");
    ws_peer_xrun(&we, "big", "CLOSED 1009");
    ws_peer_xrun(&we, "close", "CLOSED 1000");
    cr_assert_geq(cpt_stats(we.e.svc).by_reason[CP_REASON_WEBSOCKET], 2,
                  "text and big end as WebSocket errors");
    env_stop(&we);
}

/* 300 packets of 0-4000 bytes cut into messages at odd points come back
 * byte-identical; ping gets pong; text closes with 1003, 65 KB with 1009;
 * the close handshake echoes 1000. */
Test(ws, npm_ws_client_echo_ping_text_big_close, .timeout = 120) { peer_modes(false); }

Test(ws, npm_ws_client_over_tls, .timeout = 120) { peer_modes(true); }

/* Every case of the probe as the reference server answers it, or as
 * ws_probe.expected says cport answers by design. */
Test(ws, rfc6455_probe_matches_the_reference, .timeout = 300)
{
    ws_env we;
    env_start(&we, NULL, false);
    char port[16], expect[512];
    snprintf(port, sizeof port, "%u", we.e.sport);
    snprintf(expect, sizeof expect, "expect=%s/ws_probe.expected", CPT_WS_DIR);
    peer p;
    int rc = node_run(&p, "ws_probe.js", port, expect, "target=cport", NULL);
    if (rc != 0)
        peer_dump(&p, "ws_probe");
    cr_assert_eq(rc, 0, "the probe found differences (DIFF lines above)");
    cr_assert(peer_has(&p, OUT, ", 0 differ"));
    peer_stop(&p);
    env_stop(&we);
}

/* A plain GET of the path gets 426 without a page, the page with one; a
 * path the options do not serve gets 404; an Origin outside the list 403. */
Test(ws, http_answers_page_path_origin, .timeout = 60)
{
    static const char *const origins[] = { "https://game.example", NULL };
    cp_ws_opts wo = { .path = "/play", .origins = origins, .page = "<!doctype html><p>hello</p>" };
    ws_env we;
    env_start(&we, &wo, false);
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
        int fd = cpt_xconnect(we.e.sport);
        cpt_xsend(fd, cases[i].req, strlen(cases[i].req));
        char buf[1024] = "";
        size_t got = 0;
        while (got < sizeof buf - 1 && !strstr(buf, "\r\n\r\n")) {
            ssize_t r = cpt_recv_some(fd, buf + got, sizeof buf - 1 - got);
            if (r <= 0)
                break;
            got += (size_t)r;
            buf[got] = '\0';
        }
        buf[got] = '\0';
        cr_assert(strstr(buf, cases[i].want), "case %zu: wanted \"%s\", got \"%s\"", i, cases[i].want, buf);
        cpt_close(fd);
    }
    env_stop(&we);
}

/* A cport client service speaking WebSocket (and wss): connected only after
 * the 101, its packets masked, the server's echo read back; a server that
 * does not upgrade is a connect failure, never a connected session. */
static void client_echo(bool tls)
{
    ws_env we;
    env_start(&we, NULL, tls);
    cp_ws *cws;
    cp_ws_opts cwo = { .path = "/play" };
    cr_assert_eq(cp_ws_create(&cws, &cwo), 0);
    cp_tls *ctls = NULL;
    if (tls) {
        cp_tls_opts to = { .ca_file = g_cert.cert, .verify = 1, .sni = "localhost" };
        cr_assert_eq(cp_tls_create(&ctls, &to), 0);
    }
    cpt_track *t = cpt_track_new(4);
    t->echo = false;
    t->keep_refs = true;
    cp_client_opts co = { .host = CPT_HOST4, .port = we.e.sport, .sessions = 1 };
    co.session.ws = cws;
    co.session.tls = ctls;
    cp_handlers h = cpt_track_handlers();
    cp_service *svc = cpt_xclient(we.e.port, &co, &h, t);
    CPT_AWAIT(atomic_load(&t->connected) == 1, 5000, "the WebSocket client did not connect");
    static const char body[] = "masked on the way in, framed on the way out";
    for (int i = 0; i < 3; i++) {
        cp_sendbuf *b = cp_packet_make((uint16_t)(7 + i), body, sizeof body);
        cr_assert_eq(cp_session_send(t->recs[0].s, b), 0);
        cp_sendbuf_unref(b);
    }
    CPT_AWAIT(atomic_load(&t->packets) == 3, 5000, "the echoes did not come back (%lld)",
              (long long)atomic_load(&t->packets));
    cr_assert_eq(atomic_load(&t->recs[0].bytes), (long long)(3 * sizeof body));
    cr_assert_eq(atomic_load(&we.e.t->packets), 3, "the server read the client's masked packets");
    cpt_xstop(svc);
    cpt_track_stopped(t);
    cpt_track_xcheck(t);
    cpt_track_free(t);
    cp_ws_unref(cws);
    cp_tls_unref(ctls);
    env_stop(&we);
}

Test(ws, cport_client_against_a_cport_server, .timeout = 60) { client_echo(false); }

Test(ws, cport_client_over_tls, .timeout = 60) { client_echo(true); }

/* A plain TCP echo server answers the upgrade with garbage: the client's
 * session never connects, and on_connect_failed hears it. */
Test(ws, cport_client_refused_is_a_connect_failure, .timeout = 60)
{
    cpt_env e;
    cp_server_opts o = { .host = CPT_HOST4 };
    o.session.framing = CP_FRAMING_RAW;
    cp_handlers sh = cpt_track_handlers();
    sh.on_packet = NULL;
    sh.on_recv = cpt_on_recv; /* echoes the request back: no 101 */
    cpt_env_start(&e, 1, &o, &sh, 8, 0);
    cp_ws *cws;
    cp_ws_opts cwo = { 0 };
    cr_assert_eq(cp_ws_create(&cws, &cwo), 0);
    cpt_track *t = cpt_track_new(4);
    t->echo = false;
    cp_client_opts co = { .host = CPT_HOST4, .port = e.sport, .sessions = 1 };
    co.session.ws = cws;
    cp_handlers h = cpt_track_handlers();
    cp_service *svc = cpt_xclient(e.port, &co, &h, t);
    CPT_AWAIT(atomic_load(&t->connect_failed) == 1, 5000, "the refused upgrade was not a connect failure");
    cr_assert_eq(atomic_load(&t->connected), 0);
    cr_assert_eq(cpt_stats(svc).by_reason[CP_REASON_WEBSOCKET], 1);
    cpt_xstop(svc);
    cpt_track_stopped(t);
    cpt_track_xcheck(t);
    cpt_track_free(t);
    cp_ws_unref(cws);
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ hard closes */

/* A WebSocket client of our own over a blocking socket, for what the npm
 * client cannot show: the exact bytes the server sends. Returns the socket
 * after the 101. */
static int raw_upgrade_on(int fd)
{
    static const char req[] =
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    cpt_xsend(fd, req, sizeof req - 1);
    char buf[512] = "";
    size_t got = 0;
    while (!strstr(buf, "\r\n\r\n")) { /* the 101 is all the server sends before our frames */
        ssize_t r = cpt_recv_once(fd, buf + got, 1);
        cr_assert_gt(r, 0, "no 101");
        got += (size_t)r;
        cr_assert_lt(got, sizeof buf - 1);
    }
    cr_assert(strstr(buf, "HTTP/1.1 101"), "%s", buf);
    return fd;
}

static int raw_upgrade(uint16_t port) { return raw_upgrade_on(cpt_xconnect(port)); }

/* One masked binary frame with a packet of id and size (the header says
 * size; the body sent is what fits in body_len). */
static void raw_send_packet(int fd, uint16_t id, uint16_t size, size_t body_len)
{
    uint8_t f[6 + 4 + 64] = { 0x82, (uint8_t)(0x80 | (4 + body_len)), 1, 2, 3, 4 };
    uint8_t *p = f + 6;
    p[0] = (uint8_t)size;
    p[1] = (uint8_t)(size >> 8);
    p[2] = (uint8_t)id;
    p[3] = (uint8_t)(id >> 8);
    for (size_t i = 0; i < body_len; i++)
        p[4 + i] = (uint8_t)i;
    for (size_t i = 0; i < 4 + body_len; i++)
        p[i] ^= f[2 + (i & 3)];
    cpt_xsend(fd, f, 6 + 4 + body_len);
}

/* Reads frames until a Close; returns its code (0 without one). */
static int raw_close_code(int fd)
{
    for (;;) {
        uint8_t h[2];
        if (cpt_recv_exact(fd, h, 2) != 0)
            return 0;
        uint8_t body[125];
        size_t n = h[1] & 0x7f;
        cr_assert_leq(n, 125, "only short frames are expected here");
        if (n && cpt_recv_exact(fd, body, n) != 0)
            return 0;
        if ((h[0] & 0x0f) == 8)
            return n >= 2 ? body[0] << 8 | body[1] : 0;
    }
}

static int refuse_13(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    int r = cpt_on_packet(s, id, body, len);
    return id == 13 ? -1 : r;
}

/* The hard closes send the Close code of their reason: a handler's
 * refusal 1011, a packet over max_packet 1009, cp_session_disconnect 1000. */
Test(ws, hard_closes_send_their_close_code, .timeout = 60)
{
    cp_ws_opts wo = { .max_message = 65535 }; /* the packet, not the message, is too big */
    cp_server_opts o = { .host = CPT_HOST4 };
    cr_assert_eq(cp_ws_create(&o.session.ws, &wo), 0);
    cp_handlers h = cpt_track_handlers();
    h.on_packet = refuse_13;
    cpt_env e;
    cpt_env_start(&e, 2, &o, &h, 8, 0);

    int fd = raw_upgrade(e.sport);
    raw_send_packet(fd, 13, 8, 4);
    cr_assert_eq(raw_close_code(fd), 1011, "a handler's refusal");
    cpt_close(fd);

    fd = raw_upgrade(e.sport);
    raw_send_packet(fd, 5, 5000, 4); /* max_packet is 4096 */
    cr_assert_eq(raw_close_code(fd), 1009, "a packet over max_packet");
    cpt_close(fd);

    fd = raw_upgrade(e.sport);
    raw_send_packet(fd, 5, 8, 4); /* echoed: the session is up */
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
Test(ws, a_backed_up_queue_keeps_one_message_per_packet, .timeout = 60)
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

/* ------------------------------------------------------------------ refusals */

/* A client whose request is refused keeps sending (a body, a pipelined
 * request): it must still read the whole answer, then an orderly end. A
 * close over its unread bytes would send a reset, which destroys the
 * answer in the client's receive queue. */
Test(ws, a_refused_client_that_keeps_sending_reads_the_whole_answer, .timeout = 60)
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
            if (send(fd, (const char *)junk, sizeof junk, MSG_NOSIGNAL) < 0)
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
